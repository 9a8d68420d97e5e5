"""What every GeoCATE Processing algorithm shares: its group, icon and how it is copied."""

from qgis.core import QgsProcessingAlgorithm
from qgis.PyQt.QtGui import QIcon

from ..plugin import ICON


class GeoCateAlgorithm(QgsProcessingAlgorithm):
    def group(self):
        return "Treatment effects"

    def groupId(self):  # noqa: N802 - QGIS's name
        return "effects"

    def icon(self):
        return QIcon(ICON)

    def createInstance(self):  # noqa: N802 - QGIS's name
        return type(self)()

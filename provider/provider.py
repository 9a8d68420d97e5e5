"""The 'geocate' Processing provider."""

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ..paths import ICON


class GeoCateProvider(QgsProcessingProvider):
    def id(self):
        return "geocate"

    def name(self):
        return "GeoCATE"

    def longName(self):  # noqa: N802 - QGIS's name
        return "GeoCATE: treatment effect heterogeneity from imagery"

    def icon(self):
        return QIcon(ICON)

    def load(self):
        """Registered (main thread): the cycle collector's main-thread timer starts (collector.py)."""
        from . import collector

        collector.install()
        return super().load()

    def unload(self):
        from . import collector

        collector.uninstall()
        super().unload()

    def loadAlgorithms(self):  # noqa: N802 - QGIS's name
        from .calibratemap import CalibrateMapAlgorithm
        from .comparesources import CompareSourcesAlgorithm
        from .estimateate import EstimateAteAlgorithm
        from .estimatecate import EstimateCateAlgorithm
        from .evaluate import EvaluateAlgorithm
        from .eventstudy import EventStudyAlgorithm
        from .imageclusters import ImageClustersAlgorithm
        from .mapeffects import ApplyClustersAlgorithm, MapEffectsAlgorithm
        from .paneleffects import PanelEffectsAlgorithm
        from .targeting import TargetingAlgorithm

        self.addAlgorithm(EstimateCateAlgorithm())
        self.addAlgorithm(EvaluateAlgorithm())
        self.addAlgorithm(CompareSourcesAlgorithm())
        self.addAlgorithm(ImageClustersAlgorithm())
        self.addAlgorithm(CalibrateMapAlgorithm())
        self.addAlgorithm(EstimateAteAlgorithm())
        self.addAlgorithm(PanelEffectsAlgorithm())
        self.addAlgorithm(EventStudyAlgorithm())
        self.addAlgorithm(MapEffectsAlgorithm())
        self.addAlgorithm(ApplyClustersAlgorithm())
        self.addAlgorithm(TargetingAlgorithm())

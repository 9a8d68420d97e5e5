"""The plugin object QGIS loads: registers the Processing provider and adds the toolbar action."""

import os

from qgis.core import QgsApplication

ICON = os.path.join(os.path.dirname(__file__), "resources", "icon.png")
MAIN_ALGORITHM = "geocate:estimatecate"


class GeoCatePlugin:
    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.action = None

    def initProcessing(self):  # noqa: N802 - QGIS's name
        """Register the provider; called by QGIS desktop (via initGui) and by qgis_process."""
        from .provider.provider import GeoCateProvider

        if self.provider is None:
            self.provider = GeoCateProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802 - QGIS's name
        from qgis.PyQt.QtGui import QIcon
        from qgis.PyQt.QtWidgets import QAction

        self.initProcessing()
        self.action = QAction(QIcon(ICON), "GeoCATE: estimate treatment effects from imagery",
                              self.iface.mainWindow())
        self.action.triggered.connect(self.open_main_dialog)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu("&GeoCATE", self.action)

    def open_main_dialog(self):
        import processing

        processing.execAlgorithmDialog(MAIN_ALGORITHM)

    def unload(self):
        if self.action is not None:
            self.iface.removeToolBarIcon(self.action)
            self.iface.removePluginMenu("&GeoCATE", self.action)
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

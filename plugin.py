"""The plugin object QGIS loads: registers the Processing provider, adds the toolbar button and the dock."""

from qgis.core import QgsApplication

from .paths import ICON

MAIN_ALGORITHM = "geocate:estimatecate"
MENU = "&GeoCATE"


class GeoCatePlugin:
    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.action = None
        self.dialog_action = None
        self.identify_action = None
        self.identify_tool = None
        self.dock = None

    def initProcessing(self):  # noqa: N802 - QGIS's name
        """Register the provider; called by QGIS desktop (via initGui) and by qgis_process."""
        from .provider.provider import GeoCateProvider
        from .ui.dependencies import add_packages_dir_to_path

        add_packages_dir_to_path()  # packages the dock installed, if any; QGIS's own come first
        if self.provider is None:
            self.provider = GeoCateProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802 - QGIS's name
        from qgis.PyQt.QtGui import QIcon
        from qgis.PyQt.QtWidgets import QAction

        self.initProcessing()
        self.action = QAction(QIcon(ICON), "GeoCATE: treatment effects from imagery", self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.triggered.connect(self.toggle_dock)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu(MENU, self.action)
        self.dialog_action = QAction(QIcon(ICON), "Estimate treatment effects (Processing dialog)...",
                                     self.iface.mainWindow())
        self.dialog_action.triggered.connect(self.open_main_dialog)
        self.iface.addPluginToMenu(MENU, self.dialog_action)
        self.identify_action = QAction(QIcon(ICON), "GeoCATE: what was found here? (click a unit or a map cell)",
                                       self.iface.mainWindow())
        self.identify_action.setCheckable(True)
        self.identify_action.triggered.connect(self.use_identify_tool)
        self.iface.addToolBarIcon(self.identify_action)
        self.iface.addPluginToMenu(MENU, self.identify_action)

    def use_identify_tool(self, checked=True):
        """The map tool: a click on a unit or an effects-map cell shows its window, CATE, group and support."""
        canvas = self.iface.mapCanvas()
        if self.identify_tool is None:
            from .ui.maptool import EffectIdentifyTool

            self.identify_tool = EffectIdentifyTool(canvas, self.iface.messageBar())
            self.identify_tool.setAction(self.identify_action)
        if checked:
            canvas.setMapTool(self.identify_tool)
        elif canvas.mapTool() is self.identify_tool:
            canvas.unsetMapTool(self.identify_tool)
        return self.identify_tool

    def toggle_dock(self, checked=True):
        """Show (creating it the first time) or hide the dock."""
        if self.dock is None:
            from qgis.PyQt.QtCore import Qt

            from .ui.dock import GeoCateDock

            self.dock = GeoCateDock(self.iface, self.iface.mainWindow())
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self.action.setChecked)
        self.dock.setVisible(checked)
        return self.dock

    def open_main_dialog(self):
        import processing

        processing.execAlgorithmDialog(MAIN_ALGORITHM)

    def unload(self):
        if self.identify_tool is not None:
            if self.identify_tool.popup is not None:
                self.identify_tool.popup.close()
            self.iface.mapCanvas().unsetMapTool(self.identify_tool)
            self.identify_tool = None
        for action in (self.action, self.dialog_action, self.identify_action):
            if action is not None:
                self.iface.removeToolBarIcon(action)
                self.iface.removePluginMenu(MENU, action)
        self.action = self.dialog_action = self.identify_action = None
        if self.dock is not None:
            self.dock.disconnect_project()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

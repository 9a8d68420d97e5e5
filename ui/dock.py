"""The GeoCATE dock: choose the trial and the imagery, run in the background, read the summary.

It runs the same Processing algorithm as the toolbox and qgis_process
(``geocate:estimatecate``) through a ``QgsProcessingAlgRunnerTask``, so there
is one implementation; QGIS stays responsive, the task manager shows progress,
and Cancel stops the run between two checks (a quarter of a second while
windows are read, at most one cross-fitting fold in the forest).
"""

import html
import os
import shutil
import time

from qgis.core import (
    QgsApplication,
    QgsCoordinateTransform,
    QgsFieldProxyModel,
    QgsMapLayerProxyModel,
    QgsProcessingAlgRunnerTask,
    QgsProcessingContext,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProcessingUtils,
    QgsProject,
    QgsRasterLayer,
    QgsTask,
    QgsVectorLayer,
)
from qgis.gui import (
    QgsCheckableComboBox,
    QgsCollapsibleGroupBox,
    QgsDockWidget,
    QgsFieldComboBox,
    QgsFileWidget,
    QgsMapLayerComboBox,
)
from qgis.PyQt.QtCore import Qt, QUrl, pyqtSignal
from qgis.PyQt.QtGui import QDesktopServices
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.record import RunRecord
from ..paths import HELP_DIR
from ..provider import collector

ALGORITHM = "geocate:estimatecate"
README = os.path.join(HELP_DIR, "index.html")   # the help pages, one per tool
RESULT_NAMES = {"geocate:estimatecate": "Treatment effects (CATE)", "geocate:imageclusters": "Effect clusters"}
TREATMENT_NAMES = ("treated", "treatment", "treat", "assigned", "arm")
OUTCOME_NAMES = ("outcome", "y", "response")
CLUSTER_ALGORITHM = "geocate:imageclusters"
SCOPE = "geocate"  # project entries: where the dock remembers its choices


class CapturingFeedback(QgsProcessingFeedback):
    """Feedback that keeps the error messages, so the dock can show them in plain words, and signals each
    stage's text (QGIS 3.22's feedback has no such signal)."""

    stage_changed = pyqtSignal(str)

    def __init__(self):
        super().__init__()
        self.errors = []
        self.infos = []

    def pushInfo(self, info):  # noqa: N802 - QGIS's name
        self.infos.append(info)
        super().pushInfo(info)

    def pushWarning(self, warning):  # noqa: N802 - QGIS's name (3.22 has it)
        self.infos.append(warning)
        super().pushWarning(warning)

    def setProgressText(self, text):  # noqa: N802 - QGIS's name
        super().setProgressText(text)
        self.stage_changed.emit(text)

    def reportError(self, error, fatalError=False):  # noqa: N802, N803 - QGIS's names
        self.errors.append(error)
        super().reportError(error, fatalError)


class GeoCateDock(QgsDockWidget):
    """The guided analysis. ``run_finished(ok)`` is emitted when a run ends (done, failed or cancelled)."""

    run_finished = pyqtSignal(bool)

    def __init__(self, iface=None, parent=None):
        super().__init__("GeoCATE: treatment effects from imagery", parent)
        self.setObjectName("GeoCateDock")
        self.iface = iface
        self.task = None
        self.run_dir = None
        self.last_results = None
        self.result_layer_id = None
        self.tracked_units = None
        self._build()
        self.restore_choices()
        self.check_dependencies()
        # Follow the project: a new or opened project brings its own choices; removed layers are let go.
        project = QgsProject.instance()
        project.cleared.connect(self.on_project_cleared)
        project.readProject.connect(self.on_project_read)
        project.layersWillBeRemoved.connect(self.on_layers_removed)

    def disconnect_project(self):
        """Called when the plugin unloads: the project must not call a deleted dock."""
        project = QgsProject.instance()
        for signal, slot in ((project.cleared, self.on_project_cleared), (project.readProject, self.on_project_read),
                             (project.layersWillBeRemoved, self.on_layers_removed)):
            try:
                signal.disconnect(slot)
            except TypeError:
                pass
        self.track_selection(None)

    @property
    def result_layer(self):
        """The last run's result layer while it is in the project, else None."""
        return QgsProject.instance().mapLayer(self.result_layer_id) if self.result_layer_id else None

    # ---------------------------------------------------------------- widgets
    def _build(self):
        body = QWidget()
        layout = QVBoxLayout(body)
        self.demo_button = QPushButton("Load the demo study")
        self.demo_button.setToolTip("A simulated trial of 1212 villages on a Landsat 8 crop of southern Brazil, whose "
                                    "effects depend on the imagery (the truth is in true_cate): for a first try.")
        self.demo_button.clicked.connect(self.load_demo)
        layout.addWidget(self.demo_button)
        form = self.form = QFormLayout()
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        self.units = QgsMapLayerComboBox()
        self.units.setFilters(QgsMapLayerProxyModel.PointLayer | QgsMapLayerProxyModel.PolygonLayer)
        self.selected_only = QCheckBox("Selected features only")
        self.treatment = QgsFieldComboBox()     # all fields: a wrong choice is explained, not hidden
        self.treatment.setAllowEmptyFieldName(True)   # nothing chosen until the user (or a field's name) says
        self.treatment_status = QLabel()
        self.treatment_status.setWordWrap(True)
        self.outcome = QgsFieldComboBox()
        self.outcome.setFilters(QgsFieldProxyModel.Numeric)
        self.outcome.setAllowEmptyFieldName(True)
        self.covariates = QgsCheckableComboBox()
        self.raster = QgsMapLayerComboBox()
        self.raster.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.bands = QgsCheckableComboBox()
        self.bands.setDefaultText("all")
        self.window = QSpinBox()
        self.window.setRange(3, 1025)
        self.window.setValue(33)
        self.window.setSuffix(" px")
        self.window_ground = QLabel()
        self.wider_context = QDoubleSpinBox()
        self.wider_context.setRange(0, 1e6)
        self.wider_context.setDecimals(0)
        self.wider_context.setSingleStep(500)
        self.wider_context.setSpecialValueText("none")
        self.wider_context.setSuffix(" m")
        self.method = QComboBox()
        self.method.addItem("Causal forest on image features", ALGORITHM)
        self.method.addItem("Latent effect clusters (image model)", CLUSTER_ALGORITHM)
        self.design = QComboBox()
        self.design.addItem("randomized trial", 0)
        self.design.addItem("observational (not randomized)", 1)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2 ** 31 - 1)
        self.seed.setValue(42)
        form.addRow("Units layer", self.units)
        form.addRow("", self.selected_only)
        form.addRow("Treatment (0/1)", self.treatment)
        form.addRow("", self.treatment_status)
        form.addRow("Outcome", self.outcome)
        self.predicted = QCheckBox("My outcome is a model's prediction (a map)")
        self.correction_file = QgsFileWidget()
        self.correction_file.setFilter("GeoCATE correction (*.json)")
        self.correction_method = QComboBox()
        for label, index in (("linear correction", 1), ("Tweedie correction", 2), ("no correction", 0)):
            self.correction_method.addItem(label, index)
        form.addRow("", self.predicted)
        form.addRow("Correction file", self.correction_file)
        form.addRow("Correction", self.correction_method)
        self.predicted_rows = (self.correction_file, self.correction_method)
        form.addRow("Covariates", self.covariates)
        form.addRow("Imagery", self.raster)
        form.addRow("Bands", self.bands)
        form.addRow("Window", self.window)
        form.addRow("", self.window_ground)
        form.addRow("Add wider context", self.wider_context)
        form.addRow("Method", self.method)
        form.addRow("Design", self.design)
        form.addRow("Seed", self.seed)
        layout.addLayout(form)
        for combo in (self.units, self.treatment, self.outcome, self.covariates, self.raster, self.bands, self.method):
            # Long layer and field names must not widen the dock beyond the screen.
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)

        self.advanced = QgsCollapsibleGroupBox("Advanced")
        self.advanced.setCollapsed(True)
        advanced = QFormLayout(self.advanced)
        advanced.setRowWrapPolicy(QFormLayout.WrapLongRows)   # labels above their field when the dock is narrow
        self.groups = QSpinBox()
        self.groups.setRange(2, 10)
        self.groups.setValue(3)
        self.spatial_block = QDoubleSpinBox()
        self.spatial_block.setRange(-1, 1e6)
        self.spatial_block.setDecimals(0)
        self.spatial_block.setSpecialValueText("auto")  # shown at the minimum, -1: chosen from the data
        self.spatial_block.setValue(-1)   # auto: neighbours whose windows overlap stay in one fold
        self.spatial_block.setSuffix(" m")
        self.spatial_block.setToolTip("Cross-fitting folds keep square blocks of this side whole, so neighbours "
                                      "whose windows overlap are never split; 0 = none, auto (-1) = chosen from "
                                      "the data.")
        self.nodata = QLineEdit()
        self.nodata.setPlaceholderText("none")
        self.nodata.setToolTip("A pixel value to treat as missing, besides the raster's own nodata.")
        self.clusters = QSpinBox()
        self.clusters.setRange(0, 12)
        self.clusters.setSpecialValueText("auto")
        self.max_clusters = QSpinBox()
        self.max_clusters.setRange(1, 12)
        self.max_clusters.setValue(4)
        advanced.addRow("Effect groups (forest)", self.groups)
        advanced.addRow("Clusters (image model)", self.clusters)
        advanced.addRow("Largest K to try", self.max_clusters)
        self.strata = QgsFieldComboBox()   # block randomization: each stratum's treated share is its probability
        self.strata.setAllowEmptyFieldName(True)
        self.strata.setToolTip("If the trial was randomized within strata (e.g. districts) with probabilities that "
                               "differ between them: the field of the stratum. Empty: one probability for every "
                               "unit.")
        form.addRow("Randomized within (strata)", self.strata)
        advanced.addRow("Spatial blocks", self.spatial_block)
        advanced.addRow("Extra nodata value", self.nodata)
        layout.addWidget(self.advanced)
        for widget, tip in (
                (self.units, "The trial's units: points or polygons (their centroid), one per unit."),
                (self.selected_only, "Use only the selected units of the layer."),
                (self.treatment, "A field of 0 (control) and 1 (treated)."),
                (self.outcome, "The outcome: a number per unit, measured after treatment."),
                (self.predicted, "Tick when the outcome was taken from a map predicted from imagery (a wealth or "
                                 "yield map): such maps are shrunk toward the mean, and effects measured on them are "
                                 "too small until corrected."),
                (self.correction_file, "The map's correction file, written by 'Calibrate a predicted-outcome map' "
                                       "from the map makers' validation data."),
                (self.correction_method, "How the map's values are corrected before estimation; the report shows "
                                         "the ATE under every correction."),
                (self.covariates, "Survey covariates measured before treatment (not the treatment or outcome)."),
                (self.raster, "The imagery around the units (e.g. Landsat or Sentinel-2 bands)."),
                (self.bands, "The bands to use; none ticked = all bands."),
                (self.window, "The side of the square window read around each unit, in pixels."),
                (self.wider_context, "Add each unit's surroundings: a square of this side on the ground around it, "
                               "averaged down to the window's pixels, so the effect can depend on what lies within "
                               "a few kilometres (multi-scale). none = the window only."),
                (self.method, "Causal forest: each unit's effect with an interval and effect groups. Clusters: "
                              "latent groups of units with their own effect, learnt from the images."),
                (self.seed, "The random seed: the same seed gives the same numbers."),
                (self.design, "Randomized: the trial's known propensity. Observational: the programme was not "
                              "randomized; the probability of treatment is estimated from the imagery and "
                              "covariates (for the average effect with IPW, Hajek and AIPW, and overlap and balance "
                              "checks, use 'Average effect with confounding adjustment from imagery')."),
                (self.groups, "How many effect groups (by estimated effect) the report and style show."),
                (self.clusters, "How many clusters the image model finds; auto = chosen by held-out fit."),
                (self.max_clusters, "The largest number of clusters tried when it is chosen from the data.")):
            if not widget.toolTip():
                widget.setToolTip(tip)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        layout.addWidget(self.progress)
        self.stage = QLabel()
        self.stage.setWordWrap(True)
        layout.addWidget(self.stage)
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.message)
        self.install_button = QPushButton("Install missing packages")
        self.install_button.hide()
        layout.addWidget(self.install_button)

        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.RichText)
        layout.addWidget(self.summary)
        self.canvas = self._plot_canvas()
        if self.canvas is not None:
            self.canvas.setMinimumHeight(220)
            self.canvas.hide()
            layout.addWidget(self.canvas)
        result_buttons = QHBoxLayout()
        self.report_button = QPushButton("Open report")
        self.zoom_button = QPushButton("Zoom to units")
        for button in (self.report_button, self.zoom_button):
            button.setEnabled(False)
            result_buttons.addWidget(button)
        layout.addLayout(result_buttons)
        self.map_button = QPushButton("Map effects over the imagery (map view's extent)")
        self.map_button.setEnabled(False)
        self.map_button.setToolTip("After a run: the same model, fitted on the trial units, predicts the effect (or "
                                   "the clusters) for every window of the imagery within the map view's extent "
                                   "('Map treatment effects over the imagery'); areas whose imagery no trial unit "
                                   "resembles are greyed out.")
        layout.addWidget(self.map_button)
        plan_row = QHBoxLayout()   # after an effects run: where the next round's budget should go
        self.budget_slider = QSlider(Qt.Horizontal)
        self.budget_slider.setRange(5, 95)
        self.budget_slider.setSingleStep(5)
        self.budget_slider.setPageStep(10)
        self.budget_slider.setValue(30)
        self.budget_label = QLabel()
        self.budget_slider.valueChanged.connect(self.update_budget_label)
        self.update_budget_label()
        self.plan_button = QPushButton("Plan the next round")
        self.plan_button.setEnabled(False)
        self.plan_button.setToolTip("After an effects run: rank the units by their effect from the imagery, treat "
                                    "the budget's share, and estimate what that targeting gains over random "
                                    "allocation ('Plan targeting within a budget').")
        for widget in (self.budget_label, self.budget_slider, self.plan_button):
            plan_row.addWidget(widget)
        layout.addLayout(plan_row)
        self.outputs = QLabel()
        self.outputs.setWordWrap(True)
        self.outputs.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.outputs)
        panel_tools = QHBoxLayout()   # the ATE, panels and roll-outs have their own dialogs
        self.panel_button = QPushButton("Panel effects...")
        self.panel_button.setToolTip("Units observed over years: the effect with unit fixed effects and year effects "
                                     "('Panel effects with fixed effects', its Processing dialog).")
        self.event_button = QPushButton("Event study...")
        self.event_button.setToolTip("A programme rolled out in waves: effects by years since adoption, with placebo "
                                     "checks ('Event study of a staggered roll-out', its Processing dialog).")
        self.ate_button = QPushButton("Average effects...")
        self.ate_button.setToolTip("The average effect with a confounding adjustment from the imagery (IPW, Hajek, "
                                   "AIPW), overlap, balance and sensitivity; under Advanced, stacked propensity and "
                                   "outcome models ('Average effect with confounding adjustment from imagery', "
                                   "its Processing dialog).")
        for button, algorithm in ((self.ate_button, "geocate:estimateate"), (self.panel_button, "geocate:paneleffects"),
                                  (self.event_button, "geocate:eventstudy")):
            button.clicked.connect(lambda _=False, a=algorithm: self.open_dialog(a))
            panel_tools.addWidget(button)
        layout.addLayout(panel_tools)
        help_link = QLabel(f'<a href="{QUrl.fromLocalFile(README).toString()}">Help: what each choice means</a>')
        help_link.setOpenExternalLinks(True)
        layout.addWidget(help_link)
        layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAsNeeded)   # a narrow dock scrolls, it does not cut
        self.setMinimumWidth(360)   # the rows and the result summary need about 352 px
        scroll.setWidget(body)
        self.setWidget(scroll)

        self.units.layerChanged.connect(self.on_units_changed)
        self.treatment.fieldChanged.connect(self.on_field_chosen)
        self.outcome.fieldChanged.connect(self.on_field_chosen)
        self.selected_only.toggled.connect(lambda _: self.clear_error())
        self.predicted.toggled.connect(self.show_correction_choices)
        self.show_correction_choices(False)
        self.raster.layerChanged.connect(self.on_raster_changed)
        self.window.valueChanged.connect(self.update_ground_size)
        self.wider_context.valueChanged.connect(self.update_ground_size)
        self.run_button.clicked.connect(self.start_run)
        self.cancel_button.clicked.connect(self.cancel_run)
        self.report_button.clicked.connect(self.open_report)
        self.zoom_button.clicked.connect(self.zoom_to_units)
        self.map_button.clicked.connect(self.start_map)
        self.plan_button.clicked.connect(self.start_plan)
        self.install_button.clicked.connect(self.install_packages)
        self.on_units_changed(self.units.currentLayer())
        self.on_raster_changed(self.raster.currentLayer())

    @staticmethod
    def _plot_canvas():
        try:
            from matplotlib.backends.backend_qt5agg import FigureCanvasQTAgg
            from matplotlib.figure import Figure
        except ImportError:
            return None
        return FigureCanvasQTAgg(Figure(figsize=(4, 2.6), dpi=90))

    # ---------------------------------------------------------------- reacting to choices
    def on_units_changed(self, layer):
        self.treatment.setLayer(layer)
        self.outcome.setLayer(layer)
        self.strata.setLayer(layer)
        self.strata.setField("")
        # Start from fields named like a treatment and an outcome, else from nothing (no error before a choice).
        names = {f.name().lower(): f.name() for f in layer.fields()} if layer is not None else {}
        self.treatment.setField(next((names[n] for n in TREATMENT_NAMES if n in names), ""))
        self.outcome.setField(next((names[n] for n in OUTCOME_NAMES if n in names), ""))
        self.track_selection(layer)
        self.refresh_covariates()
        self.check_treatment()
        self.clear_error()

    def show_correction_choices(self, shown):
        for widget in self.predicted_rows:
            widget.setVisible(bool(shown))
            label = self.form.labelForField(widget)
            if label is not None:
                label.setVisible(bool(shown))
        self.clear_error()

    def track_selection(self, layer):
        """'Selected features only' is offered only while the units layer has a selection."""
        if self.tracked_units is not None:
            try:
                self.tracked_units.selectionChanged.disconnect(self.update_selection_box)
            except (TypeError, RuntimeError):
                pass
        self.tracked_units = layer
        if layer is not None:
            layer.selectionChanged.connect(self.update_selection_box)
        self.update_selection_box()

    def update_selection_box(self, *_):
        layer = self.units.currentLayer()
        count = layer.selectedFeatureCount() if layer is not None else 0
        self.selected_only.setEnabled(count > 0)
        if not count:
            self.selected_only.setChecked(False)
        self.selected_only.setText(f"Selected only ({count} selected)" if count else "Selected only (none)")

    def on_field_chosen(self, *_):
        self.refresh_covariates()
        self.check_treatment()
        self.clear_error()

    def refresh_covariates(self):
        """Numeric fields other than the layer's key, the treatment and the outcome; ticks are kept."""
        layer = self.units.currentLayer()
        checked = set(self.covariates.checkedItems())
        self.covariates.clear()
        if layer is None:
            return
        from ..provider.widgets import OWN_FIELDS

        keys = {layer.fields().at(i).name() for i in layer.primaryKeyAttributes()} | {"fid"}
        excluded = keys | {self.treatment.currentField(), self.outcome.currentField()}
        # GeoCATE's own output fields (a result layer used as input) are effects, never covariates.
        names = [f.name() for f in layer.fields()
                 if f.isNumeric() and f.name() not in excluded and not OWN_FIELDS.match(f.name())]
        self.covariates.addItems(names)
        self.covariates.setCheckedItems([n for n in names if n in checked])

    def on_raster_changed(self, layer):
        self.bands.clear()
        if layer is not None:
            self.bands.addItems([f"{b}: {layer.bandName(b)}" for b in range(1, layer.bandCount() + 1)])
        self.update_ground_size()

    def update_ground_size(self):
        layer = self.raster.currentLayer()
        if layer is None:
            self.window_ground.setText("")
            return
        from qgis.core import QgsUnitTypes

        metres = self.window.value() * layer.rasterUnitsPerPixelX() * QgsUnitTypes.fromUnitToUnitFactor(
            layer.crs().mapUnits(), QgsUnitTypes.DistanceMeters)
        about = "about " if layer.crs().isGeographic() else ""
        context = self.context_pixels()
        self.window_ground.setText(f"= {about}{metres:,.0f} m on the ground"
                                   + (f"; context {context} px" if context else ""))

    def context_pixels(self):
        """The wider context's side in pixels of the imagery (at least the window + 1), or 0 for none."""
        layer = self.raster.currentLayer()
        if layer is None or not self.wider_context.value():
            return 0
        from qgis.core import QgsUnitTypes

        pixel = layer.rasterUnitsPerPixelX() * QgsUnitTypes.fromUnitToUnitFactor(layer.crs().mapUnits(),
                                                                                   QgsUnitTypes.DistanceMeters)
        return max(int(round(self.wider_context.value() / pixel)), self.window.value() + 1) if pixel > 0 else 0

    def check_treatment(self, *_):
        """Say at once whether the chosen treatment field is usable (numeric, only 0/1); nothing before a choice."""
        layer, name = self.units.currentLayer(), self.treatment.currentField()
        problem = treatment_problem(layer, name)
        shown = problem if name else None
        self.treatment_status.setText(shown or "")
        self.treatment_status.setStyleSheet("color: #b2182b" if shown else "")
        self.treatment_status.setVisible(bool(shown))
        return problem

    def check_dependencies(self, find_spec=None):
        from .dependencies import missing_message, missing_packages

        missing = missing_packages(find_spec) if find_spec else missing_packages()
        self.missing = missing
        if missing:
            self.show_error(missing_message(missing))
            self.install_button.show()
            self.run_button.setEnabled(False)
        else:
            self.install_button.hide()
            self.run_button.setEnabled(True)
        return missing

    # ---------------------------------------------------------------- running
    def parameters(self):
        """The Processing parameters of the current choices (outputs inside this run's folder)."""
        units = self.units.currentLayer()
        source = (QgsProcessingFeatureSourceDefinition(units.id(), True) if self.selected_only.isChecked()
                  else units.id())
        bands = [int(text.split(":")[0]) for text in self.bands.checkedItems()]
        parameters = {
            "INPUT": source, "TREATMENT": self.treatment.currentField(), "OUTCOME": self.outcome.currentField(),
            "COVARIATES": self.covariates.checkedItems(), "RASTER": self.raster.currentLayer().id(),
            "BANDS": bands or None, "PATCH_SIZE": self.window.value(), "SEED": self.seed.value(),
            "SPATIAL_BLOCK": self.spatial_block.value(), "OUTPUT": os.path.join(self.run_dir, "result.gpkg"),
        }
        if self.method.currentData() == CLUSTER_ALGORITHM:
            parameters.update(CLUSTERS=self.clusters.value(), MAX_CLUSTERS=max(self.max_clusters.value(),
                                                                               self.clusters.value()),
                              OUTPUT_CLUSTERS=os.path.join(self.run_dir, "clusters.gpkg"),
                              OUTPUT_MODEL=os.path.join(self.run_dir, "clusters.onnx"))
        else:
            parameters.update(GROUPS=self.groups.value())
        parameters["OUTPUT_REPORT"] = os.path.join(self.run_dir, "report.html")
        if self.context_pixels():
            parameters["SCALES"] = f"{self.window.value()},{self.context_pixels()}"
        if self.nodata.text().strip():
            parameters["NODATA"] = float(self.nodata.text())
        if self.method.currentData() == ALGORITHM:
            parameters["DESIGN"] = self.design.currentData()
            if self.strata.currentField() and self.design.currentData() == 0:
                parameters["STRATA"] = self.strata.currentField()
        if self.predicted.isChecked() and self.method.currentData() == ALGORITHM:
            parameters.update(OUTCOME_CORRECTION=self.correction_file.filePath(),
                              CORRECTION=self.correction_method.currentData())
        return parameters

    def validate(self):
        """A plain-words problem with the current choices, or None."""
        units = self.units.currentLayer()
        if units is None:
            return "Choose the layer of trial units (points or polygons)."

        if self.raster.currentLayer() is None:
            return "Choose the imagery (a raster layer)."
        if not self.outcome.currentField():
            return "Choose the outcome field (a number per unit)."
        if self.nodata.text().strip():
            try:
                float(self.nodata.text())
            except ValueError:
                return f"The extra nodata value '{self.nodata.text()}' is not a number."
        problem = self.check_treatment()
        if problem:
            return problem
        raster = self.raster.currentLayer()
        if self.context_pixels() > min(raster.width(), raster.height()):
            return (f"The wider context ({self.wider_context.value():,.0f} m = {self.context_pixels()} px) is larger than "
                    "the imagery: choose a smaller one, or none.")
        if self.design.currentData() == 1 and self.method.currentData() != ALGORITHM:
            return "The cluster model assumes a randomized trial; for an observational study choose the causal forest."
        if self.predicted.isChecked():
            path = self.correction_file.filePath()
            if not path or not os.path.isfile(path):
                return ("Choose the map's correction file (made with 'Calibrate a predicted-outcome map'), or untick "
                        "'My outcome is a model's prediction'.")
            if self.method.currentData() != ALGORITHM:
                return "The outcome correction works with the causal forest method; choose it under Method."
        if units.featureCount() == 0:
            return f"The layer '{units.name()}' has no features: choose the layer of trial units."

        if self.selected_only.isChecked() and units.selectedFeatureCount() == 0:
            return (f"No features are selected in '{units.name()}'. Select the units to use, or untick "
                    "'Selected features only'.")
        return None

    def start_run(self):
        problem = self.validate()
        if problem:
            self.show_error(problem)
            return False
        self.reset_results()
        self.run_name = f"GeoCATE {time.strftime('%H:%M')} - {self.outcome.currentField()}"
        base = QgsProject.instance().homePath() or QgsProcessingUtils.tempFolder()
        self.run_dir = os.path.join(base, "geocate_runs", time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(self.run_dir, exist_ok=True)
        self.save_choices()
        parameters = self.parameters()
        self.last_parameters = dict(parameters)
        self.start_task(self.method.currentData(), parameters, self.on_executed)
        self.progress.setValue(0)
        self.show_info(self.covariate_warning()
                       + f"Running {self.run_name} ... QGIS stays usable; progress is also in the task manager.")
        return True

    def load_demo(self):
        """Build the demo study (core.demo) in the profile's folder, add it and its imagery, and fill the dock."""
        from qgis.core import QgsApplication, QgsRasterLayer, QgsVectorLayer

        from ..core.demo import DEMO_RASTER, build
        from ..provider.maps import true_color

        folder = os.path.join(QgsApplication.qgisSettingsDirPath(), "geocate-demo")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "demo_units.gpkg")
        if not os.path.exists(path):
            build(path)
        raster = true_color(QgsRasterLayer(DEMO_RASTER, "Landsat 8 (demo)"))
        units = QgsVectorLayer(path, "demo trial units", "ogr")
        if not (raster.isValid() and units.isValid()):
            self.show_error(f"The demo study could not be loaded from {folder}.")
            return None
        project = QgsProject.instance()
        project.addMapLayers([raster, units])
        if not project.crs().isValid():
            project.setCrs(raster.crs())
        self.units.setLayer(units)
        self.treatment.setField("treated")
        self.outcome.setField("outcome")
        self.refresh_covariates()
        self.covariates.setCheckedItems(["assets", "distance"])
        self.raster.setLayer(raster)
        if self.iface is not None:
            self.iface.mapCanvas().setExtent(raster.extent())
        self.show_info("The demo study is loaded: press Run. Its true effects are in the field true_cate (never a "
                       "covariate).")
        return units

    def open_dialog(self, algorithm):
        """The Processing dialog of ``algorithm``, filled with the units layer chosen here."""
        import processing

        try:
            dialog = processing.createAlgorithmDialog(algorithm, {"INPUT": self.units.currentLayer()}
                                                      if self.units.currentLayer() is not None else {})
        except Exception as error:  # noqa: BLE001 - said in the dock; an exception in a slot would abort QGIS
            self.show_error(f"The dialog of {algorithm} could not be opened ({error}). Open it from the Processing "
                            "Toolbox (GeoCATE > Observational studies and panels).")
            dialog = None
        if dialog is not None:
            dialog.show()
        self.last_dialog = dialog
        return dialog

    def covariate_warning(self):
        """A warning (ending in a space) about ticked covariates named like a simulated truth or an id, or ''."""
        from ..provider.widgets import SUSPECT_FIELDS

        suspect = [name for name in self.covariates.checkedItems() if SUSPECT_FIELDS.match(name)]
        if not suspect:
            return ""
        return (f"Covariate(s) {', '.join(suspect)} look like a simulated truth or an identifier: a covariate must be "
                "measured before treatment, and a truth or an id is neither; untick them unless you mean it. ")

    def start_task(self, algorithm_id, parameters, on_executed):
        """Run ``algorithm_id`` as a background task with this dock's feedback (progress, stage, errors), recorded
        in Processing's history; ``on_executed(ok, results)`` when it ends."""
        algorithm = QgsApplication.processingRegistry().createAlgorithmById(algorithm_id)
        self.context = QgsProcessingContext()
        self.context.setProject(QgsProject.instance())
        self.feedback = CapturingFeedback()
        self.feedback.progressChanged.connect(lambda value: self.progress.setValue(int(value)))
        self.feedback.stage_changed.connect(self.stage.setText)   # "Causal forest: fold 2 of 5"
        self.add_to_history(algorithm, parameters)
        self.task = QgsProcessingAlgRunnerTask(algorithm, parameters, self.context, self.feedback)
        if self.task.status() == QgsTask.Terminated:   # prepare() refused: no task runs and none will say so
            on_executed(False, {})
            return
        # Cycle collection stays in this (the main) thread until the run ends: in the task's thread it deleted
        # main-thread Qt objects and crashed QGIS (provider/collector.py). Released first when the run ends.
        collector.hold()
        self.task.executed.connect(lambda *_: collector.release())
        self.task.executed.connect(on_executed)
        for button in (self.run_button, self.map_button, self.plan_button):
            button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        QgsApplication.taskManager().addTask(self.task)

    def cancel_run(self):
        if self.task is not None and self.feedback is not None:
            self.show_info("Cancelling ...")
            self.feedback.cancel()
            self.task.cancel()

    def on_executed(self, ok, results):
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        cancelled = self.feedback.isCanceled()
        errors = list(self.feedback.errors)
        # Drop the run's Processing objects now, not at interpreter exit after QGIS has gone.
        self.task = self.context = self.feedback = None
        self.stage.setText("")
        if ok and not cancelled:
            self.last_results = results
            self.load_results()
            self.progress.setValue(100)
            self.show_info(f"{self.run_name}: done.")
        else:
            self.progress.setValue(0)
            shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing half-written stays behind
            if cancelled:
                self.show_info("The run was cancelled; nothing was written.")
            else:
                detail = errors[-1] if errors else "see the Processing log"
                self.show_error(f"The run failed: {detail}")
        self.run_finished.emit(bool(ok and not cancelled))

    def load_results(self):
        from ..provider.styles import CATE_STYLE, GROUP_STYLE, apply_result_styles

        clusters = "OUTPUT_CLUSTERS" in self.last_results
        name = RESULT_NAMES[CLUSTER_ALGORITHM if clusters else ALGORITHM]
        layer = QgsVectorLayer(self.last_results["OUTPUT"], name, "ogr")
        apply_result_styles(layer, current=GROUP_STYLE if clusters else CATE_STYLE)
        project = QgsProject.instance()
        group = project.layerTreeRoot().insertGroup(0, self.run_name)
        project.addMapLayer(layer, False)
        group.addLayer(layer)
        if clusters:
            table = QgsVectorLayer(self.last_results["OUTPUT_CLUSTERS"], "Clusters (effects)", "ogr")
            project.addMapLayer(table, False)
            group.addLayer(table)
        group.setExpanded(True)
        self.expand_in_layers_panel(group)
        self.result_layer_id = layer.id()
        self.metadata = RunRecord.read(os.path.join(self.run_dir, "result.run.json"))
        self.show_summary(self.metadata)
        self.report_button.setEnabled(bool(self.last_results.get("OUTPUT_REPORT")))
        self.zoom_button.setEnabled(True)
        self.map_button.setEnabled(True)
        self.plan_button.setEnabled(not clusters)
        self.run_group = group
        self.outputs.setText(f"<small>Files: {self.run_dir}</small>")

    # ---------------------------------------------------------------- maps after a run
    MAP_KEEP = ("INPUT", "TREATMENT", "OUTCOME", "COVARIATES", "RASTER", "BANDS", "PATCH_SIZE", "SEED", "NODATA",
                "SPATIAL_BLOCK", "SCALES", "CLUSTERS", "MAX_CLUSTERS")

    def map_parameters(self):
        """geocate:mapeffects' parameters for the last run's study and model, over the map view's extent."""
        parameters = {key: value for key, value in self.last_parameters.items() if key in self.MAP_KEEP}
        parameters["METHOD"] = 1 if "OUTPUT_CLUSTERS" in self.last_parameters else 0
        canvas = self.iface.mapCanvas() if self.iface is not None and hasattr(self.iface, "mapCanvas") else None
        if canvas is not None and not canvas.extent().isEmpty():
            extent, crs = canvas.extent(), canvas.mapSettings().destinationCrs().authid()
            parameters["EXTENT"] = (f"{extent.xMinimum()},{extent.xMaximum()},{extent.yMinimum()},"
                                    f"{extent.yMaximum()} [{crs}]")
        parameters["OUTPUT"] = os.path.join(self.run_dir, "effects_map.tif")
        return parameters

    def start_map(self):
        self.start_task("geocate:mapeffects", self.map_parameters(), self.on_map_executed)
        self.show_info("Mapping effects over the imagery in the map view ... QGIS stays usable.")
        return True

    def on_map_executed(self, ok, results):
        from ..core.maps import SUPPORT_THRESHOLD
        from ..provider.styles import effect_map_style, support_veil_style

        for button in (self.run_button, self.map_button):
            button.setEnabled(True)
        self.plan_button.setEnabled("OUTPUT_CLUSTERS" not in self.last_parameters)
        self.cancel_button.setEnabled(False)
        cancelled = self.feedback.isCanceled()
        errors = list(self.feedback.errors)
        infos = [line for line in self.feedback.infos if "outside the trial's support" in line]
        self.task = self.context = self.feedback = None
        self.stage.setText("")
        if not ok or cancelled:
            self.progress.setValue(0)
            self.show_error("The map was cancelled; nothing was written." if cancelled else
                            f"The map failed: {errors[-1] if errors else 'see the Processing log'}")
            self.run_finished.emit(False)
            return
        from osgeo import gdal

        path = results["OUTPUT"]
        dataset = gdal.Open(path)
        names = [dataset.GetRasterBand(b + 1).GetDescription() for b in range(dataset.RasterCount)]
        dataset = None
        project = QgsProject.instance()
        group = getattr(self, "run_group", None) or project.layerTreeRoot()
        layers = [effect_map_style(QgsRasterLayer(path, "Effects map"), names)]
        if "support" in names:
            layers.insert(0, support_veil_style(QgsRasterLayer(path, "Effects map: outside the trial's support"),
                                                names, SUPPORT_THRESHOLD))
        for layer in reversed(layers):
            project.addMapLayer(layer, False)
            group.insertLayer(0, layer)
        self.map_layer_ids = [layer.id() for layer in layers]
        self.progress.setValue(100)
        self.show_info("Effects map: done. " + (infos[-1] if infos else ""))
        self.run_finished.emit(True)

    # ---------------------------------------------------------------- targeting after a run
    PLAN_KEEP = MAP_KEEP + ("CLUSTER", "STRATA", "PROPENSITY", "DESIGN", "OUTCOME_CORRECTION", "CORRECTION")

    def update_budget_label(self, *_):
        self.budget_label.setText(f"Budget: {self.budget_slider.value()} %")

    def plan_parameters(self):
        """geocate:targeting's parameters for the last run's study, at the slider's budget (a share of the units)."""
        parameters = {key: value for key, value in self.last_parameters.items() if key in self.PLAN_KEEP}
        parameters.pop("CLUSTERS", None)
        parameters.pop("MAX_CLUSTERS", None)
        budget = self.budget_slider.value()
        stem = f"targeting_{budget}"
        taken = 1
        while os.path.exists(os.path.join(self.run_dir, f"{stem}.gpkg")):   # a second plan at the same budget
            taken += 1
            stem = f"targeting_{budget}_{taken}"
        parameters.update(BUDGET=budget / 100.0, OUTPUT=os.path.join(self.run_dir, f"{stem}.gpkg"),
                          OUTPUT_REPORT=os.path.join(self.run_dir, f"{stem}.html"))
        return parameters

    def start_plan(self):
        self.plan_budget = self.budget_slider.value()   # the run's budget, whatever the slider does meanwhile
        self.budget_slider.setEnabled(False)
        self.start_task("geocate:targeting", self.plan_parameters(), self.on_plan_executed)
        self.show_info(f"Planning the next round with a budget of {self.budget_slider.value()} % of the units ... "
                       "QGIS stays usable.")
        return True

    def on_plan_executed(self, ok, results):
        from ..provider.styles import TREAT_STYLE, apply_result_styles

        for button in (self.run_button, self.map_button, self.plan_button, self.budget_slider):
            button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        cancelled = self.feedback.isCanceled()
        errors = list(self.feedback.errors)
        verdict = [line for line in self.feedback.infos   # core.targeting.targeting_message's sentence
                   if line.startswith(("No heterogeneity was detected", "Heterogeneity was detected"))]
        self.task = self.context = self.feedback = None
        self.stage.setText("")
        if not ok or cancelled:
            self.progress.setValue(0)
            self.show_error("The plan was cancelled; nothing was written." if cancelled else
                            f"The plan failed: {errors[-1] if errors else 'see the Processing log'}")
            self.run_finished.emit(False)
            return
        budget = self.plan_budget
        layer = apply_result_styles(QgsVectorLayer(results["OUTPUT"], f"Next round: {budget} % budget", "ogr"),
                                    current=TREAT_STYLE)
        project = QgsProject.instance()
        project.addMapLayer(layer, False)
        (getattr(self, "run_group", None) or project.layerTreeRoot()).insertLayer(0, layer)
        self.plan_layer_id = layer.id()
        self.last_plan = results
        if results.get("OUTPUT_REPORT"):
            self.last_results = dict(self.last_results or {}, OUTPUT_REPORT=results["OUTPUT_REPORT"])
            self.report_button.setEnabled(True)
        self.progress.setValue(100)
        gain, se = results.get("GAIN"), results.get("GAIN_SE")
        self.show_info(f"Next round, {budget} % budget: {int(results.get('N_TREAT') or 0)} units chosen; GAIN "
                       f"{gain:+.3g} (SE {se:.3g}) over the average unit. " + (verdict[-1] if verdict else ""))
        self.run_finished.emit(True)

    def expand_in_layers_panel(self, group):
        """Show the run's group open in the Layers panel (its view collapses a group inserted from code)."""
        if self.iface is None or not hasattr(self.iface, "layerTreeView") or self.iface.layerTreeView() is None:
            return
        view = self.iface.layerTreeView()
        index = view.node2index(group) if hasattr(view, "node2index") else view.layerTreeModel().node2index(group)
        view.expand(index)

    def reset_results(self):
        """Forget the last run's summary, plot, buttons and progress (a new run, a new project)."""
        self.last_results = None
        self.result_layer_id = None
        self.summary.setText("")
        self.outputs.setText("")
        self.stage.setText("")
        if self.canvas is not None:
            self.canvas.figure.clear()
            self.canvas.hide()
        self.report_button.setEnabled(False)
        self.zoom_button.setEnabled(False)
        self.map_button.setEnabled(False)
        self.plan_button.setEnabled(False)
        self.progress.setValue(0)

    def add_to_history(self, algorithm, parameters):
        """The run, as a Python command, in Processing > History (as the Processing dialog records it)."""
        try:
            command = algorithm.asPythonCommand(parameters, self.context)
            from qgis.gui import QgsGui

            if hasattr(QgsGui, "historyProviderRegistry"):   # QGIS 3.24 and later
                QgsGui.historyProviderRegistry().addEntry("processing", {
                    "python_command": command, "algorithm_id": algorithm.id(), "parameters": parameters})
            else:
                from processing.core.ProcessingLog import ProcessingLog

                ProcessingLog.addToLog(command)
        except Exception:  # noqa: BLE001 - the history is a courtesy: never stop a run for it
            pass

    # ---------------------------------------------------------------- following the project
    def on_project_cleared(self):
        self.reset_results()
        self.show_info("")

    def on_project_read(self, *_):
        self.reset_results()
        self.restore_choices()

    def on_layers_removed(self, layer_ids):
        if self.result_layer_id in layer_ids:
            self.result_layer_id = None
            self.zoom_button.setEnabled(False)
        if self.tracked_units is not None and self.tracked_units.id() in layer_ids:
            self.track_selection(None)

    def show_summary(self, metadata):
        from ..core.scores import Z95
        from ..core.study import describe_dropped

        ate, se = metadata["ate"], metadata["ate_se"]
        dropped = metadata.get("dropped") or {}
        lines = [f"<b>ATE</b> {ate:.3f} (95 % interval {ate - Z95 * se:.3f} to {ate + Z95 * se:.3f})",
                 f"<b>Units</b> {metadata['n_used']} used, {metadata['n_dropped']} dropped"
                 + (f" ({describe_dropped(dropped)})" if metadata["n_dropped"] else "")]
        lines += [f"<span style='color:#b35806'>{warning}</span>" for warning in metadata.get("warnings", [])]
        predicted = metadata.get("predicted_outcome") or {}
        if "ate_by_correction" in predicted:
            lines.append("<b>Outcome from a map</b> ATE by correction: " + ", ".join(
                f"{method} {ate['estimate']:.3f}" + (" (used)" if method == predicted["correction"] else "")
                for method, ate in predicted["ate_by_correction"].items()))
        if "heterogeneity_test" in metadata:
            test = metadata["heterogeneity_test"]
            verdict = "heterogeneity detected" if test["detected"] else "no heterogeneity detected"
            lines.append(f"<b>Heterogeneity</b> {verdict}: held-out AUTOC {test['estimate']:.3f}, "
                         f"one-sided p = {test['p_value']:.2g} (sequential cross-fold test)")
            lines.append("<small>Per-unit intervals cover the forest's noise, not its smoothing bias: "
                         "quote the group effects below.</small>")
        if "clusters" in metadata:
            k = metadata["n_clusters"]
            lines.append(f"<b>Clusters</b> K = {k}" + (" (no heterogeneity found)" if k == 1 else ""))
            test = metadata.get("effect_test")
            if test:   # do the clusters' effects differ in held-out units? Unsupported clusters are flagged.
                supported = test["p_value"] < 0.05
                lines.append(f"{'' if supported else '<b>Not supported:</b> '}held-out test of the "
                             f"{test['clusters']} clusters' effects: p = {test['p_value']:.2g}"
                             + ("" if supported else " - they may describe the outcome's shape, not who gains"))
            forest = metadata.get("forest_test")
            if forest:   # the clusters against the causal forest's own test (issue 24)
                lines.append(f"{'' if forest['supports_clusters'] else '<b>Not supported by the forest:</b> '}"
                             f"causal forest's heterogeneity test: p = {forest['p_value']:.2g}")
            masses = (metadata.get("estimator") or {}).get("point_masses")
            if masses:   # the hurdle part (issue 24): the model's effects there are approximate
                lines.append(f"<b>Point masses</b> {html.escape(masses)}: shared by all clusters; quote the "
                             "clusters' held-out effects (dr_effect)")
        lines.append(f"<b>Device</b> {metadata['device']}, {metadata['timings']['total_s']:.1f} s")
        self.summary.setText("<br>".join(lines))
        if self.canvas is not None:
            from ..core.report import draw_cluster_effects, draw_group_effects

            figure = self.canvas.figure
            figure.clear()
            if "clusters" in metadata:
                draw_cluster_effects(figure.add_subplot(1, 1, 1), metadata["clusters"], ate)
            else:
                draw_group_effects(figure.add_subplot(1, 1, 1), metadata["group_effects"], ate)
            figure.tight_layout()
            self.canvas.draw()
            self.canvas.show()

    def open_report(self):
        if self.last_results and self.last_results.get("OUTPUT_REPORT"):
            QDesktopServices.openUrl(QUrl.fromLocalFile(self.last_results["OUTPUT_REPORT"]))

    def zoom_to_units(self):
        if self.result_layer is None:
            self.zoom_button.setEnabled(False)
            self.show_info("The result layer is no longer in the project.")
            return
        if self.iface is None:
            return
        canvas = self.iface.mapCanvas()
        transform = QgsCoordinateTransform(self.result_layer.crs(), canvas.mapSettings().destinationCrs(),
                                           QgsProject.instance())
        extent = transform.transformBoundingBox(self.result_layer.extent())
        extent.scale(1.1)
        canvas.setExtent(extent)
        canvas.refresh()

    def install_packages(self):
        from .install import InstallTask

        self.install_task = InstallTask(self.missing)
        self.install_task.taskCompleted.connect(lambda: self.after_install(True))
        self.install_task.taskTerminated.connect(lambda: self.after_install(False))
        self.install_button.setEnabled(False)
        self.show_info("Installing ... (this can take several minutes; QGIS stays usable)")
        QgsApplication.taskManager().addTask(self.install_task)

    def after_install(self, ok):
        from .dependencies import add_packages_dir_to_path

        add_packages_dir_to_path()
        self.install_button.setEnabled(True)
        if not ok:
            self.show_error(f"The installation failed: {self.install_task.error}")
        elif not self.check_dependencies():
            self.show_info("Packages installed. You can run GeoCATE now.")

    # ---------------------------------------------------------------- messages and memory
    def clear_error(self):
        """A red message goes once the user changes a choice (it may be fixed now; Run checks again)."""
        if self.message.styleSheet():
            self.message.setText("")
            self.message.setStyleSheet("")

    def show_error(self, text):
        self.message.setStyleSheet("color: #b2182b")
        self.message.setText(text)

    def show_info(self, text):
        self.message.setStyleSheet("")
        self.message.setText(text)

    def save_choices(self):
        project = QgsProject.instance()
        units, raster = self.units.currentLayer(), self.raster.currentLayer()
        for key, value in (("units", units.id() if units else ""), ("raster", raster.id() if raster else ""),
                           ("treatment", self.treatment.currentField()), ("outcome", self.outcome.currentField()),
                           ("nodata", self.nodata.text())):
            project.writeEntry(SCOPE, key, value)
        project.writeEntry(SCOPE, "covariates", self.covariates.checkedItems())
        project.writeEntry(SCOPE, "bands", self.bands.checkedItems())
        project.writeEntry(SCOPE, "method", self.method.currentData())
        project.writeEntry(SCOPE, "correction_file", self.correction_file.filePath() if self.predicted.isChecked()
                           else "")
        project.writeEntry(SCOPE, "correction_method", int(self.correction_method.currentData()))
        project.writeEntry(SCOPE, "design", int(self.design.currentData()))
        for key, value in (("window", self.window.value()), ("seed", self.seed.value()),
                           ("groups", self.groups.value()), ("clusters", self.clusters.value()),
                           ("max_clusters", self.max_clusters.value())):
            project.writeEntry(SCOPE, key, int(value))
        project.writeEntryDouble(SCOPE, "spatial_block", self.spatial_block.value())
        project.writeEntryDouble(SCOPE, "context", self.wider_context.value())

    def restore_choices(self):
        project = QgsProject.instance()
        units = project.mapLayer(project.readEntry(SCOPE, "units", "")[0])
        if units is not None:
            self.units.setLayer(units)
        raster = project.mapLayer(project.readEntry(SCOPE, "raster", "")[0])
        if raster is not None:
            self.raster.setLayer(raster)
        for key, widget in (("treatment", self.treatment), ("outcome", self.outcome)):
            value, found = project.readEntry(SCOPE, key, "")
            if found:
                widget.setField(value)
        covariates, found = project.readListEntry(SCOPE, "covariates", [])
        if found:
            self.covariates.setCheckedItems(covariates)
        bands, found = project.readListEntry(SCOPE, "bands", [])
        if found:
            self.bands.setCheckedItems(bands)
        method = self.method.findData(project.readEntry(SCOPE, "method", ALGORITHM)[0])
        if method >= 0:
            self.method.setCurrentIndex(method)
        for key, widget in (("window", self.window), ("seed", self.seed), ("groups", self.groups),
                            ("clusters", self.clusters), ("max_clusters", self.max_clusters)):
            value, found = project.readNumEntry(SCOPE, key, widget.value())
            if found:
                widget.setValue(value)
        value, found = project.readDoubleEntry(SCOPE, "spatial_block", -1.0)
        if found:
            self.spatial_block.setValue(value)
        self.wider_context.setValue(project.readDoubleEntry(SCOPE, "context", 0.0)[0])
        self.nodata.setText(project.readEntry(SCOPE, "nodata", "")[0])
        correction = project.readEntry(SCOPE, "correction_file", "")[0]
        self.correction_file.setFilePath(correction)
        self.predicted.setChecked(bool(correction))
        design = self.design.findData(project.readNumEntry(SCOPE, "design", 0)[0])
        if design >= 0:
            self.design.setCurrentIndex(design)
        index = self.correction_method.findData(project.readNumEntry(SCOPE, "correction_method", 1)[0])
        if index >= 0:
            self.correction_method.setCurrentIndex(index)


def treatment_problem(layer, name):
    """Why ``name`` cannot be the treatment of ``layer`` (not numeric, not 0/1), or None."""
    if layer is None or not name:
        return "Choose the treatment field (0 = control, 1 = treated)."
    index = layer.fields().lookupField(name)
    if index < 0:
        return f"The field '{name}' is not in the layer."
    field = layer.fields().at(index)
    if not field.isNumeric():
        return (f"The treatment field '{name}' holds text ({field.typeName()}), not numbers. Choose a field of "
                f"0 (control) and 1 (treated), or make one with the Field Calculator, e.g. "
                f"if(\"{name}\" = 'treated', 1, 0).")
    values = {v for v in layer.uniqueValues(index, 50) if v is not None and str(v) != "NULL"}
    wrong = sorted(v for v in values if v not in (0, 1))
    if wrong:
        shown = ", ".join(str(v) for v in wrong[:5])
        return (f"The treatment field '{name}' must hold only 0 (control) and 1 (treated), but it also holds "
                f"{shown}. Recode it, or choose the right field.")
    return None

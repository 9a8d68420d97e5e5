"""The dock with its real widgets: filling it in, running to completion, cancelling, bad choices, missing packages."""

import os
import re
import time

import conftest  # noqa: F401 - makes 'geocate' importable
import pytest
from qgis.core import (
    QgsApplication,
    QgsCategorizedSymbolRenderer,
    QgsGraduatedSymbolRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QEvent


@pytest.fixture
def project_layers(qgis_new_project, qgis_processing, demo_units_gpkg, demo_raster):
    units = QgsVectorLayer(demo_units_gpkg, "units", "ogr")
    raster = QgsRasterLayer(demo_raster, "imagery")
    QgsProject.instance().addMapLayers([units, raster])
    return units, raster


@pytest.fixture
def plugin(qgis_iface, qgis_processing):
    import geocate

    for name in ("removePluginMenu", "removeDockWidget"):  # pytest-qgis 2.1's stub iface lacks these
        if not hasattr(qgis_iface, name):
            setattr(qgis_iface, name, lambda *args: None)
    loaded = geocate.classFactory(qgis_iface)
    loaded.initGui()
    yield loaded
    loaded.unload()
    QgsApplication.sendPostedEvents(None, QEvent.DeferredDelete)  # delete the dock while QGIS still runs


def filled_dock(plugin, units, raster):
    dock = plugin.toggle_dock(True)
    dock.units.setLayer(units)
    dock.treatment.setField("treated")
    dock.outcome.setField("outcome")
    dock.covariates.setCheckedItems(["assets", "distance"])
    dock.raster.setLayer(raster)
    dock.window.setValue(33)
    dock.seed.setValue(42)
    dock.predicted.setChecked(False)
    dock.design.setCurrentIndex(0)
    return dock


def wait_for_run(dock, timeout=300):
    finished = []
    dock.run_finished.connect(finished.append)
    started = time.monotonic()
    while not finished and time.monotonic() - started < timeout:
        QgsApplication.processEvents()
        time.sleep(0.02)
    assert finished, "the run did not finish in time"
    return finished[0]


def test_toolbar_button_opens_the_dock_with_numeric_choices(plugin, project_layers):
    units, raster = project_layers
    plugin.action.trigger()
    dock = plugin.dock
    assert dock is not None and not dock.isHidden() and plugin.action.isChecked()
    dock.units.setLayer(units)
    dock.raster.setLayer(raster)
    numeric = {f.name() for f in units.fields() if f.isNumeric()}
    outcome_choices = {dock.outcome.itemText(i) for i in range(dock.outcome.count())} - {""}
    assert outcome_choices <= numeric
    # Fields named like a treatment and an outcome are picked; the covariates offer neither, nor the key.
    assert dock.treatment.currentField() == "treated" and dock.outcome.currentField() == "outcome"
    assert {dock.covariates.itemText(i) for i in range(dock.covariates.count())} == numeric - {"fid", "treated",
                                                                                             "outcome"}
    assert dock.treatment_status.text() == "" and dock.message.text() == ""
    assert dock.bands.count() == 3
    assert dock.window_ground.text() == "= 990 m on the ground"
    dock.window.setValue(11)
    assert dock.window_ground.text() == "= 330 m on the ground"


def test_treatment_is_checked_as_soon_as_it_is_chosen(plugin, project_layers):
    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    assert dock.treatment_status.text() == ""
    dock.treatment.setField("true_group")
    assert "must hold only 0 (control) and 1 (treated)" in dock.treatment_status.text()
    assert "2, 3" in dock.treatment_status.text()
    text_layer = QgsVectorLayer("Point?crs=EPSG:4326&field=arm:string&field=y:double", "text units", "memory")
    QgsProject.instance().addMapLayer(text_layer)
    dock.units.setLayer(text_layer)
    dock.treatment.setField("arm")
    assert "holds text" in dock.treatment_status.text() and "Field Calculator" in dock.treatment_status.text()
    assert dock.start_run() is False
    assert "holds text" in dock.message.text()


def test_run_completes_in_the_background_with_styled_layers_and_a_summary(plugin, project_layers):
    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    assert dock.start_run()
    stages = []
    dock.feedback.stage_changed.connect(stages.append)
    assert dock.cancel_button.isEnabled() and not dock.run_button.isEnabled()
    assert wait_for_run(dock) is True
    root = QgsProject.instance().layerTreeRoot()
    group = root.findGroup(dock.run_name)
    assert group is not None and len(group.findLayers()) == 1
    layer = group.findLayers()[0].layer()
    assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer) and layer.featureCount() == 312
    layer.styleManager().setCurrentStyle("Effect groups")
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)
    summary = dock.summary.text()
    assert "ATE" in summary and "AUTOC" in summary and "294 used, 18 dropped" in summary
    assert dock.canvas.isVisibleTo(dock) and dock.canvas.figure.axes
    assert dock.report_button.isEnabled() and os.path.exists(dock.last_results["OUTPUT_REPORT"])
    # Choices are remembered in the project, and a new dock starts from them.
    project = QgsProject.instance()
    assert project.readEntry("geocate", "treatment", "")[0] == "treated"
    from geocate.ui.dock import GeoCateDock

    again = GeoCateDock()
    assert again.units.currentLayer() == units and again.outcome.currentField() == "outcome"
    assert sorted(again.covariates.checkedItems()) == ["assets", "distance"]
    again.disconnect_project()
    again.deleteLater()
    # The group is named by time and outcome, the layer as everywhere; the stages were shown; files are named;
    # the run is in Processing's history.
    assert re.fullmatch(r"GeoCATE \d\d:\d\d - outcome", dock.run_name)
    assert layer.name() == "Treatment effects (CATE)" and group.isExpanded()
    assert any("Causal forest: fold" in text for text in stages) and dock.stage.text() == ""
    assert dock.progress.value() == 100 and dock.run_dir in dock.outputs.text()
    assert "18 dropped (6 outcome is null; 12 window" in summary   # why units were dropped
    from processing.core.ProcessingLog import ProcessingLog

    assert "geocate:estimatecate" in ProcessingLog.getLogEntries()[-1].text
    # The result layer removed: Zoom says so instead of touching a deleted layer.
    QgsProject.instance().removeMapLayer(layer.id())
    dock.zoom_to_units()
    assert "no longer in the project" in dock.message.text() and not dock.zoom_button.isEnabled()
    # A new project: the last run's summary, plot and buttons go.
    QgsProject.instance().clear()
    assert dock.summary.text() == "" and not dock.canvas.isVisibleTo(dock) and not dock.report_button.isEnabled()
    assert dock.progress.value() == 0 and dock.message.text() == ""


def test_the_dock_follows_a_project_that_is_opened(plugin, project_layers, tmp_path):
    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    dock.seed.setValue(7)
    dock.save_choices()
    path = str(tmp_path / "trial.qgz")
    assert QgsProject.instance().write(path)
    QgsProject.instance().clear()
    assert dock.units.currentLayer() is None
    assert QgsProject.instance().read(path)
    assert dock.units.currentLayer() is not None and dock.units.currentLayer().name() == "units"
    assert dock.treatment.currentField() == "treated" and dock.seed.value() == 7
    assert sorted(dock.covariates.checkedItems()) == ["assets", "distance"]


def test_choices_start_empty_selection_and_messages_follow_the_user(plugin, project_layers):
    units, raster = project_layers
    dock = plugin.toggle_dock(True)
    plain = QgsVectorLayer("Point?crs=EPSG:32621&field=fid:integer&field=a:integer&field=b:double&field=c:double",
                           "plain", "memory")
    QgsProject.instance().addMapLayer(plain)
    dock.units.setLayer(plain)
    # No field is named like a treatment or an outcome: nothing is chosen, and no error shows before a choice.
    assert dock.treatment.currentField() == "" and dock.outcome.currentField() == ""
    assert dock.treatment_status.text() == "" and not dock.treatment_status.isVisibleTo(dock)
    assert {dock.covariates.itemText(i) for i in range(dock.covariates.count())} == {"a", "b", "c"}
    dock.treatment.setField("a")
    dock.outcome.setField("b")
    assert {dock.covariates.itemText(i) for i in range(dock.covariates.count())} == {"c"}
    dock.raster.setLayer(raster)
    assert dock.start_run() is False and "has no features" in dock.message.text()
    # Selected features only is offered only with a selection, and an empty selection is explained.
    dock.units.setLayer(units)
    assert not dock.selected_only.isEnabled() and "(none)" in dock.selected_only.text()
    units.selectByIds([f.id() for f in units.getFeatures()][:5])
    assert dock.selected_only.isEnabled() and "5 selected" in dock.selected_only.text()
    dock.selected_only.setChecked(True)
    units.removeSelection()
    assert not dock.selected_only.isChecked()
    dock.selected_only.setEnabled(True)
    dock.selected_only.setChecked(True)
    assert dock.start_run() is False and "No features are selected in 'units'" in dock.message.text()
    # A red message goes when the user changes a choice.
    dock.selected_only.setChecked(False)
    assert dock.message.text() == ""
    dock.treatment.setField("true_group")
    assert dock.start_run() is False and dock.message.text()
    dock.treatment.setField("treated")
    assert dock.message.text() == "" and dock.treatment_status.text() == ""


def test_every_choice_has_a_tooltip_and_a_narrow_dock_scrolls_instead_of_cutting(plugin, project_layers):
    from qgis.PyQt.QtCore import Qt

    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    for widget in (dock.units, dock.selected_only, dock.treatment, dock.outcome, dock.covariates, dock.raster,
                   dock.bands, dock.window, dock.method, dock.seed, dock.groups, dock.clusters, dock.max_clusters,
                   dock.spatial_block, dock.nodata, dock.predicted, dock.correction_file, dock.correction_method,
                   dock.design):
        assert widget.toolTip(), widget
    scroll = dock.widget()
    assert scroll.horizontalScrollBarPolicy() == Qt.ScrollBarAsNeeded
    dock.advanced.setCollapsed(False)
    dock.setFloating(True)
    dock.show()
    dock.resize(300, 700)
    for _ in range(5):
        QgsApplication.processEvents()
    needed, shown = scroll.widget().minimumSizeHint().width(), scroll.viewport().width()
    assert needed <= shown or scroll.horizontalScrollBar().maximum() >= needed - shown
    assert dock.spatial_block.specialValueText() == "auto" and dock.nodata.placeholderText() == "none"


def test_cancel_stops_the_run_and_leaves_nothing(plugin, project_layers):
    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    groups_before = len(QgsProject.instance().layerTreeRoot().children())
    assert dock.start_run()
    run_dir = dock.run_dir
    started = time.monotonic()
    while dock.progress.value() < 20 and time.monotonic() - started < 60:  # well inside the run
        QgsApplication.processEvents()
        time.sleep(0.02)
    dock.cancel_run()
    # No wall-clock bound (a loaded machine stretches every poll): the run ends as cancelled, short of the end.
    assert wait_for_run(dock) is False
    assert dock.progress.value() < 100
    assert "cancelled" in dock.message.text()
    assert len(QgsProject.instance().layerTreeRoot().children()) == groups_before
    assert not os.path.exists(run_dir)


def test_missing_packages_are_named_with_the_command_that_installs_them(plugin, project_layers):
    dock = plugin.toggle_dock(True)
    missing = dock.check_dependencies(find_spec=lambda name: None if name in ("torch", "econml") else object())
    assert missing == ["torch", "econml"]
    text = dock.message.text()
    assert "torch, econml" in text and "pip install" in text and "--target" in text and "numpy==" in text
    assert not dock.run_button.isEnabled() and dock.install_button.isVisibleTo(dock.widget().widget())
    assert dock.check_dependencies() == [] and dock.run_button.isEnabled()


def test_a_predicted_outcome_is_corrected_with_the_maps_file(plugin, project_layers, tmp_path):
    import numpy as np

    from geocate.core.corrections import fit_correction

    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    assert not dock.correction_file.isVisibleTo(dock)           # shown only for a predicted outcome
    dock.predicted.setChecked(True)
    assert dock.correction_file.isVisibleTo(dock) and dock.correction_method.isVisibleTo(dock)
    assert dock.start_run() is False and "correction file" in dock.message.text()
    rng = np.random.default_rng(0)
    truth = rng.standard_normal(200)
    path = fit_correction(truth, 0.5 * truth + 0.1 * rng.standard_normal(200), "outcome").save(
        str(tmp_path / "outcome.json"))
    dock.correction_file.setFilePath(path)
    assert dock.start_run()
    assert dock.parameters()["OUTCOME_CORRECTION"] == path and dock.parameters()["CORRECTION"] == 1
    assert wait_for_run(dock) is True, dock.message.text()
    assert "Outcome from a map" in dock.summary.text() and "linear" in dock.summary.text()
    assert dock.metadata["predicted_outcome"]["correction"] == "linear"


def test_the_study_design_reaches_the_algorithm_and_the_cluster_model_stays_randomized(plugin, project_layers):
    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    dock.design.setCurrentIndex(dock.design.findData(1))
    dock.run_dir = "/tmp"
    assert dock.parameters()["DESIGN"] == 1
    dock.method.setCurrentIndex(dock.method.findData("geocate:imageclusters"))
    assert dock.start_run() is False and "assumes a randomized trial" in dock.message.text()


def test_after_a_run_the_dock_maps_effects_over_the_map_views_extent(plugin, project_layers):
    from qgis.core import QgsRectangle, QgsSingleBandPseudoColorRenderer

    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    assert not dock.map_button.isEnabled()
    assert dock.start_run() and wait_for_run(dock) is True and dock.map_button.isEnabled()
    extent = raster.extent()
    dock.iface.mapCanvas().setDestinationCrs(raster.crs())
    dock.iface.mapCanvas().setExtent(QgsRectangle(extent.xMinimum(), extent.yMinimum(),
                                                  extent.xMinimum() + 9900, extent.yMinimum() + 9900))
    parameters = dock.map_parameters()
    assert parameters["METHOD"] == 0 and parameters["EXTENT"].endswith("[EPSG:32621]")
    assert parameters["OUTPUT"].startswith(dock.run_dir) and "GROUPS" not in parameters
    assert dock.start_map() and wait_for_run(dock) is True
    group = QgsProject.instance().layerTreeRoot().findGroup(dock.run_name)
    names = [node.layer().name() for node in group.findLayers()]
    assert names[:2] == ["Effects map: outside the trial's support", "Effects map"]
    effects = group.findLayers()[1].layer()
    assert isinstance(effects.renderer(), QgsSingleBandPseudoColorRenderer)
    # The map covers the map view's extent (the canvas widens it to its own shape), in cells of 990 m.
    view = dock.iface.mapCanvas().extent()
    assert effects.rasterUnitsPerPixelX() == 990 and effects.width() * effects.height() >= 9
    assert view.buffered(30).contains(effects.extent())
    assert "outside the trial's support" in dock.message.text()
    QgsProject.instance().clear()


def test_after_a_run_the_dock_plans_the_next_round_at_the_sliders_budget(plugin, project_layers):
    from qgis.core import QgsCategorizedSymbolRenderer

    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    assert not dock.plan_button.isEnabled()
    assert dock.start_run() and wait_for_run(dock) is True and dock.plan_button.isEnabled()
    dock.budget_slider.setValue(20)
    assert dock.budget_label.text() == "Budget: 20 %"
    parameters = dock.plan_parameters()
    assert parameters["BUDGET"] == 0.2 and parameters["OUTPUT"].startswith(dock.run_dir)
    assert parameters["TREATMENT"] == dock.last_parameters["TREATMENT"] and "GROUPS" not in parameters
    assert dock.start_plan() and wait_for_run(dock) is True
    group = QgsProject.instance().layerTreeRoot().findGroup(dock.run_name)
    layer = group.findLayers()[0].layer()
    assert layer.name() == "Next round: 20 % budget"
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer) and layer.renderer().classAttribute() == "treat"
    treated = [f["treat"] for f in layer.getFeatures() if f["treat"] is not None and f["treat"] == f["treat"]]
    used = [t for t in treated if t in (0, 1)]
    assert 0.17 <= sum(used) / len(used) <= 0.2   # the budget, taken within each of the five folds (floors)
    assert "units chosen; GAIN" in dock.message.text() and "heterogeneity" in dock.message.text().lower()
    assert dock.report_button.isEnabled() and dock.last_results["OUTPUT_REPORT"].endswith("targeting_20.html")
    QgsProject.instance().clear()


def test_wider_context_in_metres_becomes_scales_in_pixels(plugin, project_layers):
    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    dock.run_dir = "/tmp"
    assert "SCALES" not in dock.parameters() and dock.wider_context.text() == "none"
    dock.wider_context.setValue(4830)  # 161 pixels of 30 m
    assert dock.parameters()["SCALES"] == "33,161" and "context 161 px" in dock.window_ground.text()
    dock.wider_context.setValue(1e6)
    assert dock.validate().startswith("The wider context (1,000,000 m")
    dock.wider_context.setValue(0)


def test_the_installer_takes_the_cpu_build_of_torch_unless_a_gpu_is_present(plugin, tmp_path):
    from geocate.ui.dependencies import TORCH_CPU_INDEX, install_commands, missing_message

    without_gpu = install_commands(["torch", "econml"], target=str(tmp_path), gpu=False)
    with_gpu = install_commands(["torch", "econml"], target=str(tmp_path), gpu=True)
    assert len(without_gpu) == 2 and without_gpu[0][-1] == "torch==2.13.0" and without_gpu[1][-1] == "econml==0.16.0"
    import sys

    if sys.platform != "darwin":
        assert TORCH_CPU_INDEX in without_gpu[0]
    assert TORCH_CPU_INDEX not in with_gpu[0] and TORCH_CPU_INDEX not in without_gpu[1]
    assert all("--target" in command and any(p.startswith("numpy") for p in command) for command in without_gpu)
    assert install_commands(["econml"], target=str(tmp_path), gpu=False) == [without_gpu[1]]
    assert "CPU build of torch (no NVIDIA GPU found)" in missing_message(["torch"], gpu=False)
    # onnxruntime: the CUDA provider's build where a GPU is present (encoders and cluster models run there).
    assert install_commands(["onnxruntime"], target=str(tmp_path), gpu=True)[0][-1] == "onnxruntime-gpu==1.32.0"
    assert install_commands(["onnxruntime"], target=str(tmp_path), gpu=False)[0][-1] == "onnxruntime==1.32.0"
    assert "CUDA build" in missing_message(["torch"], gpu=True)


def test_a_failed_run_is_explained_in_the_dock_and_leaves_nothing(plugin, project_layers):
    units, raster = project_layers
    far = QgsVectorLayer("Point?crs=EPSG:4326&field=treated:integer&field=outcome:double", "far units", "memory")
    from qgis.core import QgsFeature, QgsGeometry, QgsPointXY

    features = []
    for i in range(60):
        feature = QgsFeature(far.fields())
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(10 + i * 0.01, 45)))  # in Europe, not Brazil
        feature.setAttributes([i % 2, float(i)])
        features.append(feature)
    far.dataProvider().addFeatures(features)
    QgsProject.instance().addMapLayer(far)
    dock = filled_dock(plugin, units, raster)
    dock.units.setLayer(far)
    dock.treatment.setField("treated")
    dock.outcome.setField("outcome")
    groups_before = len(QgsProject.instance().layerTreeRoot().children())
    assert dock.start_run()
    run_dir = dock.run_dir
    assert wait_for_run(dock) is False
    assert "None of the 60 units lies inside the raster" in dock.message.text()
    assert len(QgsProject.instance().layerTreeRoot().children()) == groups_before
    assert not os.path.exists(run_dir) and dock.run_button.isEnabled()


def test_dock_offers_the_cluster_model_and_shows_its_clusters(plugin, project_layers):
    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    dock.method.setCurrentIndex(dock.method.findData("geocate:imageclusters"))
    dock.clusters.setValue(2)
    assert dock.start_run()
    assert wait_for_run(dock) is True, dock.message.text()
    group = QgsProject.instance().layerTreeRoot().findGroup(dock.run_name)
    layers = {node.layer().name(): node.layer() for node in group.findLayers()}
    assert set(layers) == {"Effect clusters", "Clusters (effects)"}
    assert isinstance(layers["Effect clusters"].renderer(), QgsCategorizedSymbolRenderer)
    assert layers["Clusters (effects)"].featureCount() == 2
    assert "K = 2" in dock.summary.text() and "ATE" in dock.summary.text()
    assert "held-out test of the 2 clusters' effects: p = " in dock.summary.text()   # given K: tested, flagged if not
    assert "causal forest's heterogeneity test: p = " in dock.summary.text()   # and checked against the forest
    assert "Point masses" not in dock.summary.text()   # a Gaussian outcome has none (issue 24's hurdle part)
    assert dock.canvas.figure.axes and dock.report_button.isEnabled()
    with open(dock.last_results["OUTPUT_REPORT"], encoding="utf-8") as handle:
        report = handle.read()
    for part in ("How to read this", "cluster 1", "share of units", "most typical unit", "Settings",
                 "heterogeneity test on the same units and folds", "Outcome noise: per arm, a mixture of 3"):
        assert part in report
    assert "Point masses" not in report and "hurdle part" not in report
    assert not re.search(r"\bnan\b", re.sub(r"base64,[^\"]*", "", report.split("Run metadata")[0]))
    assert os.path.exists(os.path.join(dock.run_dir, "clusters.onnx"))


def test_the_dock_names_the_point_masses_of_an_outcome_like_hours_worked(plugin, qgis_new_project, qgis_processing,
                                                                          demo_raster, tmp_path):
    """Issue 24: with an outcome shaped like hours worked, large enough for the hurdle part, the cluster model's run
    from the dock names the point mass (zero) in the dock and the report, says which effects to quote, and writes
    finite effects for every cluster."""
    from test_dialog_paths import hours_worked_gpkg

    units = QgsVectorLayer(hours_worked_gpkg(tmp_path / "hours.gpkg"), "hours", "ogr")
    raster = QgsRasterLayer(demo_raster, "imagery")
    QgsProject.instance().addMapLayers([units, raster])
    dock = filled_dock(plugin, units, raster)
    dock.method.setCurrentIndex(dock.method.findData("geocate:imageclusters"))
    dock.clusters.setValue(2)
    assert dock.start_run()
    assert wait_for_run(dock, timeout=900) is True, dock.message.text()
    assert re.search(r"<b>Point masses</b> 0 \(controls \d+%, treated \d+%\): shared by all clusters; quote the "
                     r"clusters' held-out effects \(dr_effect\)", dock.summary.text()), dock.summary.text()
    assert dock.metadata["estimator"]["point_masses"].startswith("0 (controls ")
    group = QgsProject.instance().layerTreeRoot().findGroup(dock.run_name)
    table = {node.layer().name(): node.layer() for node in group.findLayers()}["Clusters (effects)"]
    rows = list(table.getFeatures())
    assert len(rows) == 2
    for row in rows:
        for name in ("effect", "ci_low", "ci_high", "dr_effect", "dr_se"):
            assert isinstance(row[name], float) and abs(row[name]) < 1e6, (name, row.attributes())
    with open(dock.last_results["OUTPUT_REPORT"], encoding="utf-8") as handle:
        report = handle.read()
    for part in ("a hurdle part for the point masses", "<b>Point masses:</b> 0 (controls ",
                 "quote each cluster's held-out effect (DR)"):
        assert part in report
    assert not re.search(r"\bnan\b", re.sub(r"base64,[^\"]*", "", report.split("Run metadata")[0]))


def test_the_dock_opens_wide_enough_and_leaves_geocates_own_fields_out_of_the_covariates(plugin, project_layers,
                                                                                        tmp_path):
    import processing

    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    assert dock.minimumWidth() >= 352
    result = processing.run("geocate:estimatecate", {
        "INPUT": units, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": raster, "SPATIAL_BLOCK": 0,
        "OUTPUT": str(tmp_path / "result.gpkg")})["OUTPUT"]
    again = QgsVectorLayer(result, "result", "ogr")
    QgsProject.instance().addMapLayer(again)
    dock.units.setLayer(again)
    dock.treatment.setField("treated")
    dock.outcome.setField("outcome")
    offered = set(dock.covariates.checkableItems() if hasattr(dock.covariates, "checkableItems") else
                  [dock.covariates.itemText(i) for i in range(dock.covariates.count())])
    assert {"assets", "distance", "true_cate"} <= offered
    assert not offered & {"cate", "cate_lo", "cate_hi", "cate_se", "group", "patch_ok", "fid"}
    dock.covariates.setCheckedItems(["assets", "true_cate", "unit_id"])
    warning = dock.covariate_warning()
    assert "look like a simulated truth or an identifier" in warning and "true_cate" in warning \
        and "unit_id" in warning and "assets" not in warning
    dock.covariates.deselectAllOptions()
    dock.covariates.setCheckedItems(["assets"])
    assert dock.covariate_warning() == ""


def test_load_the_demo_study_fills_the_dock(plugin, qgis_new_project):
    dock = plugin.toggle_dock(True)
    units = dock.load_demo()
    assert units is not None and units.featureCount() == 1212
    assert dock.units.currentLayer() == units and dock.treatment.currentField() == "treated"
    assert dock.outcome.currentField() == "outcome" and sorted(dock.covariates.checkedItems()) == ["assets", "distance"]
    assert dock.raster.currentLayer() is not None and dock.validate() is None


def test_the_map_tool_shows_a_units_window_effect_group_and_support(plugin, project_layers, tmp_path):
    import processing

    from geocate.ui.maptool import EffectPopup

    units, raster = project_layers
    QgsProject.instance().setCrs(raster.crs())
    results = processing.runAndLoadResults("geocate:estimatecate", {
        "INPUT": units, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": raster, "SPATIAL_BLOCK": 0,
        "OUTPUT": "TEMPORARY_OUTPUT"})
    layer = QgsProject.instance().mapLayer(results["OUTPUT"]) or QgsProject.instance().mapLayersByName(
        "Treatment effects (CATE)")[0]
    canvas = plugin.iface.mapCanvas()
    canvas.setDestinationCrs(raster.crs())
    canvas.setLayers([layer, raster])
    canvas.setExtent(raster.extent())
    tool = plugin.use_identify_tool(True)
    from qgis.core import QgsCoordinateTransform

    feature = next(f for f in layer.getFeatures() if f["patch_ok"] == 1 and f["cate"] is not None
                   and str(f["cate"]) != "NULL")
    to_map = QgsCoordinateTransform(layer.crs(), raster.crs(), QgsProject.instance())
    popup = tool.show_at(to_map.transform(feature.geometry().asPoint()))
    assert isinstance(popup, EffectPopup) and popup.has_image   # the unit's own window, read from the imagery
    text = popup.text.text()
    assert f"{feature['cate']:+.3f}" in text and f"{feature['cate_lo']:+.3f} to {feature['cate_hi']:+.3f}" in text
    assert f"<b>Group / cluster</b> {feature['group']}" in text and "usable" in text
    popup.close()
    empty = tool.show_at(to_map.transform(feature.geometry().asPoint()).__class__(0.0, 0.0))
    assert empty is None
    # A cell of an effects map: its CATE with interval, its window, and whether it is within the trial's support.
    processing.runAndLoadResults("geocate:mapeffects", {
        "INPUT": units, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": raster, "SPATIAL_BLOCK": 0,
        "STRIDE": 99, "OUTPUT": "TEMPORARY_OUTPUT"})
    effects_map = QgsProject.instance().mapLayersByName("Effects map (outcome)")[0]
    canvas.setLayers([effects_map])
    cell = tool.show_at(raster.extent().center())
    text = cell.text.text()
    assert "Map cell" in text and "<b>CATE</b>" in text and "95 % interval" in text and "<b>Support</b>" in text
    assert cell.has_image
    cell.close()
    plugin.use_identify_tool(False)
    QgsProject.instance().removeAllMapLayers()   # the next modules count the layers they load



def test_the_ate_and_panel_tools_are_reachable_from_the_dock(plugin, project_layers, qgis_iface, monkeypatch):
    import processing.tools.general

    monkeypatch.setattr(processing.tools.general, "iface", qgis_iface)   # QGIS desktop sets it; pytest-qgis does not
    if not hasattr(qgis_iface, "browserModel"):   # nor does pytest-qgis 2.1's stub have it (the file widgets ask)
        monkeypatch.setattr(qgis_iface, "browserModel", lambda: None, raising=False)
    dock = plugin.toggle_dock(True)
    for button, algorithm in ((dock.ate_button, "geocate:estimateate"), (dock.panel_button, "geocate:paneleffects"),
                              (dock.event_button, "geocate:eventstudy")):
        button.click()
        assert dock.last_dialog is not None and dock.last_dialog.algorithm().id() == algorithm, dock.message.text()
        dock.last_dialog.close()



def test_the_dock_offers_the_strata_field(plugin, project_layers):
    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    dock.method.setCurrentIndex(dock.method.findData("geocate:estimatecate"))   # an earlier test may leave clusters
    assert dock.strata.currentField() == ""   # one probability for every unit unless a stratum field is chosen
    dock.run_dir = "/tmp"
    assert "STRATA" not in dock.parameters()
    dock.strata.setField("true_group")
    assert dock.parameters()["STRATA"] == "true_group"


@pytest.mark.parametrize("path", ["dock", "dialog task"])
def test_cycle_collection_stays_in_the_main_thread_while_a_run_is_in_the_background(plugin, project_layers,
                                                                                       tmp_path, path):
    """Python's collector ran in the task's thread and deleted main-thread Qt objects caught in cycles: QGIS
    crashed at random. During a background run - the dock's, or a Processing dialog's task, which holds it
    itself - every collection happens in the main thread, and the collector is given back afterwards."""
    import gc
    import threading

    from qgis.core import QgsProcessingAlgRunnerTask, QgsProcessingContext, QgsProcessingFeedback
    from qgis.PyQt.QtWidgets import QWidget

    units, raster = project_layers
    dock = filled_dock(plugin, units, raster)
    for _ in range(50):   # main-thread widgets in reference cycles: garbage a collection would delete
        widget = QWidget()
        widget.me = widget
    del widget
    threads = set()

    def seen(phase, info):
        if phase == "start":
            threads.add(threading.get_ident())

    threshold = gc.get_threshold()
    gc.set_threshold(50, 2, 2)   # collections at every few allocations: in a thread, they would happen there
    gc.callbacks.append(seen)
    try:
        if path == "dock":
            assert dock.start_run()
            assert wait_for_run(dock) is True
        else:
            dock.run_dir = str(tmp_path)
            context, feedback, done = QgsProcessingContext(), QgsProcessingFeedback(), []
            context.setProject(QgsProject.instance())
            algorithm = QgsApplication.processingRegistry().createAlgorithmById("geocate:estimatecate")
            task = QgsProcessingAlgRunnerTask(algorithm, dock.parameters(), context, feedback)
            task.executed.connect(lambda ok, results: done.append(ok))
            QgsApplication.taskManager().addTask(task)
            started = time.monotonic()
            while not done and time.monotonic() - started < 300:
                QgsApplication.processEvents()
                time.sleep(0.02)
            assert done == [True]
        started = time.monotonic()
        while not gc.isenabled() and time.monotonic() - started < 5:   # the main-thread timer gives it back
            QgsApplication.processEvents()
            time.sleep(0.05)
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*threshold)
    assert threads == {threading.main_thread().ident}
    assert gc.isenabled()


def test_the_collector_is_given_back_as_it_was_after_nested_holds(qgis_app):
    import gc

    from geocate.provider import collector

    for was_enabled in (True, False):
        (gc.enable if was_enabled else gc.disable)()
        collector.hold()
        collector.hold()   # the dock's hold, then the task's own
        collector.release()
        assert not gc.isenabled() and collector.held() == 1
        collector.release()
        if collector._timer is not None:
            collector.collect()   # the main-thread timer's tick
        assert gc.isenabled() is was_enabled and collector.held() == 0
    gc.enable()

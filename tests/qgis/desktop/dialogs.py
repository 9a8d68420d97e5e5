"""Run inside QGIS desktop (qgis --code this.py, under Xvfb): the Processing dialogs as a user works them.

Reads GEOCATE_UNITS, GEOCATE_RASTER and GEOCATE_OUT (a folder). With the demo units and imagery in the project:
1. opens every GeoCATE algorithm's dialog, records which fields the field widgets chose by themselves, and saves
   a screenshot of each (dialog_<algorithm>.png);
2. presses Run in the dialogs of estimatecate (a .gpkg file, then a temporary output) and mapeffects (a .tif);
3. runs a model (estimatecate -> evaluate, mapeffects, targeting) from its own dialog;
4. runs estimatecate's batch dialog with two rows;
and records for each run what Processing logged and which layers it loaded. summary.json is rewritten after
every step (a crash of QGIS leaves the last step it reached), then QGIS quits.
"""

import json
import os
import time
import traceback

from qgis.core import QgsApplication, QgsMapLayerType, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QTextEdit
from qgis.utils import iface

OUT = os.environ["GEOCATE_OUT"]
UNITS, RASTER = os.environ["GEOCATE_UNITS"], os.environ["GEOCATE_RASTER"]
state = {"steps": []}


def write_state(**extra):
    state.update(extra)
    with open(os.path.join(OUT, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1, default=str)


def wait(condition, timeout=300):
    """Let QGIS run (tasks, signals) until ``condition()`` or the timeout; True when the condition held."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        QgsApplication.processEvents()
        if condition():
            return True
        time.sleep(0.05)
    return False


def log_text(dialog):
    return "\n".join(widget.toPlainText() for widget in dialog.findChildren(QTextEdit))


def project_layers():
    out = []
    root = QgsProject.instance().layerTreeRoot()
    for layer in QgsProject.instance().mapLayers().values():
        node = root.findLayer(layer.id())
        kind = "raster" if layer.type() == QgsMapLayerType.RasterLayer else "vector"
        out.append({"id": layer.id(), "name": layer.name(), "kind": kind, "source": layer.source(),
                    "renderer": layer.renderer().type() if layer.renderer() else None,
                    "index": root.layerOrder().index(layer) if layer in root.layerOrder() else None,
                    "group": node.parent().name() if node is not None and node.parent() is not root else ""})
    return out


def run_dialog(name, algorithm, parameters, keep=()):
    """Open ``algorithm``'s dialog filled with ``parameters``, press Run, wait for it; record what happened (and
    the log's lines that start with one of ``keep``)."""
    import processing

    before = {layer["id"] for layer in project_layers()}
    dialog = processing.createAlgorithmDialog(algorithm, parameters)
    dialog.show()
    finished = []
    dialog.algorithmFinished.connect(lambda ok, results: finished.append(ok))
    QgsApplication.processEvents()
    dialog.runAlgorithm()
    done = wait(lambda: bool(finished) or (dialog.feedback is None and dialog.context is None), timeout=400)
    wait(lambda: QgsApplication.taskManager().countActiveTasks() == 0, timeout=60)
    QgsApplication.processEvents()
    text = log_text(dialog)
    dialog.grab().save(os.path.join(OUT, f"run_{name}.png"))
    step = {"name": name, "done": done, "finished_ok": bool(finished and finished[0]),
            "not_correctly_generated": "not correctly generated" in text,
            "failed": "Execution failed" in text, "log_tail": text[-1500:],
            "lines": [line for line in text.splitlines() if keep and line.startswith(tuple(keep))],
            "layers": [layer for layer in project_layers() if layer["id"] not in before]}
    dialog.close()
    state["steps"].append(step)
    write_state()
    return step


def field_choices():
    """The fields each dialog's field widgets chose by themselves, with only the layer given."""
    import processing

    choices = {}
    for algorithm, names in (("geocate:estimatecate", ("TREATMENT", "OUTCOME")),
                             ("geocate:evaluate", ("PRIORITY", "TREATMENT", "OUTCOME"))):
        dialog = processing.createAlgorithmDialog(algorithm, {"INPUT": UNITS})
        QgsApplication.processEvents()
        wrappers = dialog.mainWidget().wrappers
        choices[algorithm] = {name: wrappers[name].parameterValue() for name in names}
        dialog.close()
    return choices


def screenshots():
    import processing

    trial = {"INPUT": UNITS, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": RASTER}
    shots = {}
    for algorithm in QgsApplication.processingRegistry().providerById("geocate").algorithms():
        dialog = processing.createAlgorithmDialog(algorithm.id(), trial)
        dialog.resize(900, 760)
        dialog.show()
        QgsApplication.processEvents()
        time.sleep(0.2)
        QgsApplication.processEvents()
        path = os.path.join(OUT, f"dialog_{algorithm.name()}.png")
        dialog.grab().save(path)
        shots[algorithm.name()] = path
        dialog.close()
    return shots


def model():
    from qgis.core import (
        QgsProcessingModelAlgorithm,
        QgsProcessingModelChildAlgorithm,
        QgsProcessingModelChildParameterSource,
        QgsProcessingModelOutput,
        QgsProcessingModelParameter,
        QgsProcessingParameterRasterLayer,
        QgsProcessingParameterVectorLayer,
    )

    built = QgsProcessingModelAlgorithm("CATE then its evaluation", "GeoCATE")
    built.addModelParameter(QgsProcessingParameterVectorLayer("units", "units"), QgsProcessingModelParameter("units"))
    built.addModelParameter(QgsProcessingParameterRasterLayer("imagery", "imagery"),
                            QgsProcessingModelParameter("imagery"))
    static = QgsProcessingModelChildParameterSource.fromStaticValue

    def child(algorithm_id, child_id, sources, outputs):
        step = QgsProcessingModelChildAlgorithm(algorithm_id)
        step.setChildId(child_id)
        for name, source in sources.items():
            step.addParameterSources(name, [source])
        model_outputs = {}
        for output, child_output in outputs.items():
            out = QgsProcessingModelOutput(output, output)
            out.setChildId(child_id)
            out.setChildOutputName(child_output)
            model_outputs[output] = out
        step.setModelOutputs(model_outputs)
        built.addChildAlgorithm(step)

    child("geocate:estimatecate", "estimate", {
        "INPUT": QgsProcessingModelChildParameterSource.fromModelParameter("units"),
        "RASTER": QgsProcessingModelChildParameterSource.fromModelParameter("imagery"),
        "TREATMENT": static("treated"), "OUTCOME": static("outcome"), "SEED": static(42)},
        {"effects": "OUTPUT"})
    child("geocate:evaluate", "evaluate", {
        "INPUT": QgsProcessingModelChildParameterSource.fromChildOutput("estimate", "OUTPUT"),
        "PRIORITY": static("distance"), "TREATMENT": static("treated"), "OUTCOME": static("outcome"),
        "BOOTSTRAP": static(50)}, {"evaluation": "OUTPUT"})
    child("geocate:mapeffects", "map", {
        "INPUT": QgsProcessingModelChildParameterSource.fromChildOutput("estimate", "OUTPUT"),
        "RASTER": QgsProcessingModelChildParameterSource.fromModelParameter("imagery"),
        "TREATMENT": static("treated"), "OUTCOME": static("outcome"), "STRIDE": static(99)}, {"map": "OUTPUT"})
    child("geocate:targeting", "target", {   # where the next round should go, from the estimated effects' layer
        "INPUT": QgsProcessingModelChildParameterSource.fromChildOutput("estimate", "OUTPUT"),
        "RASTER": QgsProcessingModelChildParameterSource.fromModelParameter("imagery"),
        "TREATMENT": static("treated"), "OUTCOME": static("outcome"), "BUDGET": static(0.3)},
        {"targeting": "OUTPUT"})
    built.updateDestinationParameters()
    # Saved where the model builder saves models, and run from the toolbox's entry, as a user does.
    from processing.modeler.ModelerUtils import ModelerUtils

    folder = ModelerUtils.defaultModelsFolder()
    os.makedirs(folder, exist_ok=True)
    built.toFile(os.path.join(folder, "geocate_cate_then_evaluation.model3"))
    QgsApplication.processingRegistry().providerById("model").refreshAlgorithms()
    return "model:CATE then its evaluation"


def batch():
    """estimatecate's batch dialog with two rows (two seeds), each to its own file."""
    from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog

    algorithm = QgsApplication.processingRegistry().createAlgorithmById("geocate:estimatecate")
    dialog = BatchAlgorithmDialog(algorithm, parent=iface.mainWindow())
    dialog.show()
    panel = dialog.mainWidget()
    if panel.batchRowCount() < 2:
        panel.addRow()
    context = panel.processing_context if hasattr(panel, "processing_context") else None
    values = {"INPUT": UNITS, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": RASTER}
    for row in range(2):
        wrappers = panel.wrappers[row]
        for name, value in dict(values, SEED=42 + row).items():
            wrapper = wrappers[panel.parameter_to_column[name]]
            if hasattr(wrapper, "setParameterValue"):
                from processing.tools import dataobjects

                wrapper.setParameterValue(value, context or dataobjects.createContext())
            else:
                wrapper.setValue(value)
        QgsApplication.processEvents()
        out = panel.tblParameters.cellWidget(row + 1, panel.parameter_to_column["OUTPUT"])
        out.setValue(os.path.join(OUT, f"batch_{row + 1}.gpkg"))
        # No report here: QGIS 3.22's batch dialog fails on any HTML output after the rows ran
        # (ProcessingResults.addResult() missing 'timestamp', BatchAlgorithmDialog.loadHTMLResults).
    panel.checkLoadLayersOnCompletion.setChecked(True)
    before = {layer["id"] for layer in project_layers()}
    dialog.runAlgorithm()   # runs the rows in the main thread
    wait(lambda: QgsApplication.taskManager().countActiveTasks() == 0, timeout=60)
    text = log_text(dialog)
    step = {"name": "batch", "done": True, "failed": "failed" in text.lower() and "0 executions failed" not in text,
            "not_correctly_generated": "not correctly generated" in text, "log_tail": text[-1500:],
            "files": sorted(n for n in os.listdir(OUT) if n.startswith("batch_")),
            "layers": [layer for layer in project_layers() if layer["id"] not in before]}
    dialog.close()
    state["steps"].append(step)
    write_state()


def popup_screenshot():
    """The map tool on a unit of the last estimatecate result: its popup, saved as map_tool_popup.png."""
    from qgis.core import QgsCoordinateTransform
    from qgis.utils import plugins

    layer = next(layer for layer in QgsProject.instance().mapLayersByName("Treatment effects (CATE)"))
    canvas = iface.mapCanvas()
    canvas.setDestinationCrs(QgsProject.instance().mapLayersByName("Landsat 8 (demo)")[0].crs())
    tool = plugins["geocate"].use_identify_tool(True)
    feature = next(f for f in layer.getFeatures() if f["patch_ok"] == 1 and f["cate"] is not None)
    to_map = QgsCoordinateTransform(layer.crs(), canvas.mapSettings().destinationCrs(), QgsProject.instance())
    canvas.setLayers([layer])
    popup = tool.show_at(to_map.transform(feature.geometry().centroid().asPoint()))
    if popup is None:
        return None
    QgsApplication.processEvents()
    path = os.path.join(OUT, "map_tool_popup.png")
    popup.grab().save(path)
    popup.close()
    return {"path": path, "has_image": popup.has_image, "text": popup.text.text()}


def help_screenshot():
    """estimatecate's help page (what its Help button opens) in Qt's browser, saved as help_estimatecate.png."""
    from qgis.PyQt.QtCore import QUrl
    from qgis.PyQt.QtWidgets import QTextBrowser

    algorithm = QgsApplication.processingRegistry().algorithmById("geocate:estimatecate")
    browser = QTextBrowser()
    browser.resize(900, 800)
    browser.setSource(QUrl(algorithm.helpUrl()))
    browser.show()
    QgsApplication.processEvents()
    path = os.path.join(OUT, "help_estimatecate.png")
    browser.grab().save(path)
    browser.close()
    return {"path": path, "url": algorithm.helpUrl()}


def every_other_dialog(trial):
    """Run pressed in every other algorithm's dialog, each writing a file (GEOCATE_DATA: the panel, roll-out and
    validation layers the test built)."""
    data = json.loads(os.environ.get("GEOCATE_DATA", "{}"))
    out = lambda name: os.path.join(OUT, name)   # noqa: E731 - a short local helper
    run_dialog("imageclusters_gpkg", "geocate:imageclusters",
               dict(trial, CLUSTERS=2, EPOCHS=40, OUTPUT=out("clusters.gpkg"), OUTPUT_CLUSTERS=out("clusters.csv"),
                    OUTPUT_MODEL=out("clusters.onnx")))
    run_dialog("applyclusters_tif", "geocate:applyclusters", {"MODEL": out("clusters.onnx"), "RASTER": RASTER,
                                                              "STRIDE": 99, "OUTPUT": out("clusters_map.tif")})
    run_dialog("evaluate_csv", "geocate:evaluate", {"INPUT": out("effects.gpkg"), "PRIORITY": "distance",
                                                    "TREATMENT": "treated", "OUTCOME": "outcome", "BOOTSTRAP": 50,
                                                    "OUTPUT": out("rate.csv")})
    run_dialog("comparesources_csv", "geocate:comparesources", dict(trial, BOOTSTRAP=50, OUTPUT=out("compare.csv")))
    run_dialog("estimateate_gpkg", "geocate:estimateate", dict(trial, COVARIATES=["assets", "distance"],
                                                               OUTPUT=out("ate.gpkg")))
    if data:
        run_dialog("paneleffects_gpkg", "geocate:paneleffects", {
            "INPUT": data["panel"], "UNIT_ID": "village", "TIME": "year", "TREATMENT": "programme",
            "OUTCOME": "income", "COVARIATES": ["assets"], "OUTPUT": out("panel.gpkg")})
        run_dialog("eventstudy_csv", "geocate:eventstudy", {
            "INPUT": data["rollout"], "UNIT_ID": "unit", "TIME": "year", "TREATMENT": "treated",
            "OUTCOME": "outcome", "COVARIATES": ["x"], "OUTPUT": out("event.csv")})
        run_dialog("targeting_gpkg", "geocate:targeting", dict(
            trial, BUDGET=0.3, CANDIDATES=UNITS, OUTPUT=out("targeting.gpkg"), OUTPUT_CANDIDATES=out("candidates.gpkg")))
        run_dialog("imageclusters_hours", "geocate:imageclusters", {   # issue 24: the hurdle part
            "INPUT": data["hours"], "TREATMENT": "treated", "OUTCOME": "outcome", "COVARIATES": ["assets"],
            "RASTER": RASTER, "PATCH_SIZE": 33, "SEED": 42, "CLUSTERS": 2, "OUTPUT": out("hours_clusters.gpkg"),
            "OUTPUT_CLUSTERS": out("hours_clusters.csv"), "OUTPUT_MODEL": out("hours_clusters.onnx"),
            "OUTPUT_REPORT": out("hours_clusters.html")}, keep=("Outcome noise", "Point masses"))
        run_dialog("calibratemap_json", "geocate:calibratemap", {
            "INPUT": data["validation"], "TRUTH": "wealth", "PREDICTION": "wealth_hat", "OUTPUT": out("wealth.json")})


def start():
    try:
        window = iface.mainWindow()
        window.resize(1600, 1000)
        raster = QgsRasterLayer(RASTER, "Landsat 8 (demo)")
        units = QgsVectorLayer(UNITS, "trial units", "ogr")
        QgsProject.instance().addMapLayers([raster, units])
        write_state(project_before=project_layers())
        write_state(field_choices=field_choices())
        write_state(screenshots=screenshots())
        trial = {"INPUT": UNITS, "TREATMENT": "treated", "OUTCOME": "outcome", "COVARIATES": ["assets"],
                 "RASTER": RASTER, "PATCH_SIZE": 33, "SEED": 42}
        run_dialog("estimatecate_gpkg", "geocate:estimatecate",
                   dict(trial, OUTPUT=os.path.join(OUT, "effects.gpkg"),
                        OUTPUT_REPORT=os.path.join(OUT, "effects.html")))
        run_dialog("estimatecate_temporary", "geocate:estimatecate", dict(trial, OUTPUT="TEMPORARY_OUTPUT"))
        run_dialog("mapeffects_tif", "geocate:mapeffects", dict(trial, STRIDE=99,
                                                                 OUTPUT=os.path.join(OUT, "effects_map.tif")))
        every_other_dialog(trial)
        run_dialog("model", model(), {"units": UNITS, "imagery": RASTER,
                                      "estimate:effects": os.path.join(OUT, "model_effects.gpkg"),
                                      "evaluate:evaluation": os.path.join(OUT, "model_evaluation.csv"),
                                      "map:map": os.path.join(OUT, "model_map.tif"),
                                      "target:targeting": os.path.join(OUT, "model_targeting.gpkg")})
        write_state(popup=popup_screenshot(), help_page=help_screenshot())
        batch()
        write_state(alive=True)
    except Exception:  # noqa: BLE001 - reported to the test, then QGIS quits
        write_state(error=traceback.format_exc())
    QTimer.singleShot(500, lambda: QgsApplication.exit(0))


QTimer.singleShot(1000, start)

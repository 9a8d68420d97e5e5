"""Run inside QGIS desktop (qgis --code this.py, under Xvfb): fill the GeoCATE dock, run, screenshot the window.

Reads GEOCATE_SHOT_UNITS, GEOCATE_SHOT_RASTER and GEOCATE_SHOT_OUT (a folder); writes there dock_before.png
(filled in), dock_during.png (running), dock.png (after the run), dock_other_project.png (after a new project
is started) and summary.json, then quits QGIS. Any failure is written to summary.json too, so the test can say
what broke.
"""

import json
import os
import traceback

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.utils import iface, plugins

OUT = os.environ["GEOCATE_SHOT_OUT"]
state = {}


def write_state(**extra):
    state.update(extra)
    with open(os.path.join(OUT, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)


def quit_later(ms=500):
    QTimer.singleShot(ms, lambda: QgsApplication.exit(0))


def start():
    try:
        window = iface.mainWindow()
        window.resize(1600, 1000)
        window.showMaximized()
        from geocate.provider.maps import true_color

        raster = true_color(QgsRasterLayer(os.environ["GEOCATE_SHOT_RASTER"], "Landsat 8 (demo)"))
        units = QgsVectorLayer(os.environ["GEOCATE_SHOT_UNITS"], "trial units", "ogr")
        QgsProject.instance().addMapLayers([raster, units])
        QgsProject.instance().setCrs(raster.crs())
        plugin = plugins["geocate"]
        plugin.action.trigger()
        dock = plugin.dock
        window.resizeDocks([dock], [440], Qt.Horizontal)
        dock.units.setLayer(units)
        dock.treatment.setField("treated")
        dock.outcome.setField("outcome")
        dock.covariates.setCheckedItems(["assets", "distance"])
        dock.raster.setLayer(raster)
        dock.run_finished.connect(finished)
        QgsApplication.processEvents()
        grab("dock_before.png")
        write_state(started=dock.start_run())
        QTimer.singleShot(1500, lambda: (grab("dock_during.png"),
                                         write_state(during_progress=dock.progress.value(),
                                                     during_stage=dock.stage.text())))
    except Exception:  # noqa: BLE001 - reported to the test, then QGIS quits
        write_state(error=traceback.format_exc())
        quit_later()


def finished(ok):
    dock = plugins["geocate"].dock
    group = QgsProject.instance().layerTreeRoot().findGroup(getattr(dock, "run_name", ""))
    view = iface.layerTreeView()
    write_state(ok=ok, summary=dock.summary.text(), message=dock.message.text(),
                group=group.name() if group else None,
                group_expanded=bool(group) and view.isExpanded(view.node2index(group)),
                layers=[node.layer().name() for node in group.findLayers()] if group else [])
    units = QgsProject.instance().mapLayersByName("trial units")
    if units:
        units[0].setOpacity(0.0)  # the styled result lies on top of the raw units
    dock.zoom_to_units()
    QTimer.singleShot(4000, shoot)


def grab(name):
    path = os.path.join(OUT, name)
    iface.mainWindow().grab().save(path)
    return path


def shoot():
    try:
        write_state(screenshot=grab("dock.png"))
        iface.newProject(False)   # another project: the dock must let go of the last run
        QTimer.singleShot(1500, shoot_other_project)
    except Exception:  # noqa: BLE001
        write_state(error=traceback.format_exc())
        quit_later()


def shoot_other_project():
    try:
        dock = plugins["geocate"].dock
        write_state(other_project=grab("dock_other_project.png"), other_summary=dock.summary.text(),
                    other_message=dock.message.text(), other_zoom_enabled=dock.zoom_button.isEnabled())
    except Exception:  # noqa: BLE001
        write_state(error=traceback.format_exc())
    quit_later()


QTimer.singleShot(1000, start)

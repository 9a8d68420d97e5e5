"""Run inside QGIS desktop (qgis --code this.py, under Xvfb): fill the GeoCATE dock, run, screenshot the window.

Reads GEOCATE_SHOT_UNITS, GEOCATE_SHOT_RASTER and GEOCATE_SHOT_OUT (a folder); writes dock.png and
summary.json there, then quits QGIS. Any failure is written to summary.json too, so the test can say what broke.
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
        write_state(started=dock.start_run())
    except Exception:  # noqa: BLE001 - reported to the test, then QGIS quits
        write_state(error=traceback.format_exc())
        quit_later()


def finished(ok):
    dock = plugins["geocate"].dock
    write_state(ok=ok, summary=dock.summary.text(), message=dock.message.text())
    units = QgsProject.instance().mapLayersByName("trial units")
    if units:
        units[0].setOpacity(0.0)  # the styled result lies on top of the raw units
    dock.zoom_to_units()
    QTimer.singleShot(4000, shoot)


def shoot():
    try:
        path = os.path.join(OUT, "dock.png")
        iface.mainWindow().grab().save(path)
        write_state(screenshot=path)
    except Exception:  # noqa: BLE001
        write_state(error=traceback.format_exc())
    quit_later()


QTimer.singleShot(1000, start)

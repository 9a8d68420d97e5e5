"""geocate:paneleffects end to end through qgis_process: a panel of units over three years, one image per year."""

import json
import subprocess

from qgis.core import QgsVectorLayer
from test_estimatecate_in_qgis import qgis_process_env  # noqa: I001


def test_a_panel_with_one_image_per_year_runs_through_qgis_process(demo_units_gpkg, demo_raster, tmp_path):
    from osgeo import gdal

    rasters = []
    for year, gain in ((2019, 1.0), (2020, 1.04), (2021, 1.08)):   # the scene a little brighter each year
        path = str(tmp_path / f"scene_{year}.tif")
        gdal.Translate(path, demo_raster, scaleParams=[[0, 65535, 0, 65535 * gain]], outputType=gdal.GDT_Float32)
        rasters.append(path)
    from test_dialog_paths import panel_gpkg

    panel = panel_gpkg(demo_units_gpkg, tmp_path / "panel.gpkg", n_units=240)
    out = tmp_path / "effects.gpkg"
    command = ["qgis_process.bin", "--json", "run", "geocate:paneleffects", "--", f"INPUT={panel}",
               "UNIT_ID=village", "TIME=year", "TREATMENT=programme", "OUTCOME=income", "COVARIATES=assets",
               "APPROACH=3", f"OUTPUT={out}"] + [f"RASTERS_BY_TIME={path}" for path in rasters]
    done = subprocess.run(command, env=qgis_process_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    # theta = 0.5 by construction: within four of its own (unit-clustered) SEs, which are small enough to matter.
    assert abs(results["THETA"] - 0.5) < 4 * results["THETA_SE"] and results["THETA_SE"] < 0.1
    assert results["N_UNITS"] > 150
    table = QgsVectorLayer(str(out), "effects", "ogr")
    rows = [(f["approach"], f["period"]) for f in table.getFeatures()]
    assert {("mundlak", "all"), ("within", "all"), ("first_difference", "all"), ("within", "2020")} <= set(rows)
    metadata = json.loads((tmp_path / "effects.run.json").read_text())
    assert metadata["covariates_used"][:2] == ["assets", "image_1"]
    del table
    # Bad input through the same door: a time field of text.
    bad = subprocess.run(["qgis_process.bin", "run", "geocate:paneleffects", "--", f"INPUT={panel}",
                          "UNIT_ID=village", "TIME=village", "TREATMENT=programme", "OUTCOME=income",
                          f"OUTPUT={tmp_path / 'bad.gpkg'}"], env=qgis_process_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "not a number or a date" in bad.stdout + bad.stderr


def test_an_event_study_runs_through_qgis_process_and_refuses_a_treatment_that_switches_off(tmp_path):
    from test_dialog_paths import staggered_gpkg

    panel = staggered_gpkg(tmp_path / "rollout.gpkg", n_units=300)
    out = tmp_path / "event.csv"
    command = ["qgis_process.bin", "--json", "run", "geocate:eventstudy", "--", f"INPUT={panel}", "UNIT_ID=unit",
               "TIME=year", "TREATMENT=treated", "OUTCOME=outcome", "COVARIATES=x", f"OUTPUT={out}",
               f"OUTPUT_PLOT={tmp_path / 'event.png'}", f"OUTPUT_REPORT={tmp_path / 'event.html'}"]
    done = subprocess.run(command, env=qgis_process_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    # The simulated effect is 1 in every treated year; the placebo years show none.
    assert abs(results["ATT"] - 1.0) < 4 * results["ATT_SE"] and results["ATT_SE"] < 0.2
    assert results["PRETREND_P"] > 0.001 and results["N_UNITS"] == 300
    table = QgsVectorLayer(str(out), "event", "ogr")
    event_times = sorted(int(f["event_time"]) for f in table.getFeatures() if f["aggregation"] == "event time")
    assert event_times == [-2, -1, 0, 1, 2, 3]   # cohorts 2017 and 2018 in 2015-2020
    del table
    assert (tmp_path / "event.png").read_bytes()[:4] == b"\x89PNG" and "Pre-trends" in (tmp_path / "event.html").read_text()
    # A treatment that switches off is refused, naming a unit.
    layer = QgsVectorLayer(panel, "rollout", "ogr")
    first = next(f for f in layer.getFeatures() if f["treated"] == 1)
    layer.startEditing()
    later = next(f for f in layer.getFeatures() if f["unit"] == first["unit"] and f["year"] == 2020)
    layer.changeAttributeValue(later.id(), layer.fields().lookupField("treated"), 0.0)
    layer.commitChanges()
    del layer
    bad = subprocess.run(command[:4] + ["--", f"INPUT={panel}", "UNIT_ID=unit", "TIME=year", "TREATMENT=treated",
                                        "OUTCOME=outcome", f"OUTPUT={tmp_path / 'bad.csv'}"],
                         env=qgis_process_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "switches off" in bad.stdout + bad.stderr
    assert not (tmp_path / "bad.csv").exists()

"""The path a user clicks: every algorithm through processing.runAndLoadResults (what the Processing dialog calls
after Run), with outputs to files (.gpkg, .shp, .csv, .tif), to temporary outputs and to memory:, in a QGIS of
its own (a crash there is a failed test, not a dead suite). Each case: QGIS survives, the outputs are loaded once
and styled, and Processing reports nothing as "not correctly generated"."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PLUGINS, ROOT
from qgis.core import QgsFeature, QgsField, QgsGeometry, QgsPointXY, QgsVectorFileWriter, QgsVectorLayer
from qgis.PyQt.QtCore import QVariant

pytestmark = pytest.mark.qgis
HARNESS = ROOT / "tests" / "qgis" / "paths" / "load_results.py"


def write_layer(layer, path):
    QgsVectorFileWriter.writeAsVectorFormat(layer, str(path), "utf-8", layer.crs(), "GPKG")
    return str(path)


def panel_gpkg(units_gpkg, path, n_units=150, years=(2019, 2020, 2021)):
    """Units of the demo observed over three years; half of them treated from 2020 (effect 0.5)."""
    units = QgsVectorLayer(units_gpkg, "units", "ogr")
    layer = QgsVectorLayer(f"Point?crs={units.crs().authid()}", "panel", "memory")
    layer.dataProvider().addAttributes([QgsField("village", QVariant.String), QgsField("year", QVariant.Int),
                                        QgsField("programme", QVariant.Double), QgsField("income", QVariant.Double),
                                        QgsField("assets", QVariant.Double)])
    layer.updateFields()
    rng = np.random.default_rng(0)
    features = []
    for i, unit in enumerate(list(units.getFeatures())[:n_units]):
        effect_i = rng.standard_normal()
        for year in years:
            treated = float(i % 2 == 0 and year >= 2020)
            feature = QgsFeature(layer.fields())
            feature.setGeometry(unit.geometry())
            feature.setAttributes([f"v{i}", year, treated, 0.5 * treated + effect_i + 0.5 * rng.standard_normal(),
                                   float(unit["assets"])])
            features.append(feature)
    layer.dataProvider().addFeatures(features)
    return write_layer(layer, path)


def staggered_gpkg(path, n_units=240, years=range(2015, 2021)):
    """A roll-out in waves: cohorts adopting in 2017 and 2018 and units never treated (effect 1)."""
    rng = np.random.default_rng(1)
    layer = QgsVectorLayer("None", "rollout", "memory")
    layer.dataProvider().addAttributes([QgsField("unit", QVariant.String), QgsField("year", QVariant.Int),
                                        QgsField("treated", QVariant.Double), QgsField("outcome", QVariant.Double),
                                        QgsField("x", QVariant.Double)])
    layer.updateFields()
    features = []
    for i in range(n_units):
        first, level, x = (2017, 2018, None)[i % 3], rng.normal(), rng.normal()
        for year in years:
            treated = float(first is not None and year >= first)
            feature = QgsFeature(layer.fields())
            feature.setAttributes([f"u{i}", year, treated, level + 0.2 * (year - 2015) + treated + rng.normal(), x])
            features.append(feature)
    layer.dataProvider().addFeatures(features)
    return write_layer(layer, path)


def validation_gpkg(path, n=200):
    rng = np.random.default_rng(0)
    layer = QgsVectorLayer("Point?crs=EPSG:32621", "validation", "memory")
    layer.dataProvider().addAttributes([QgsField("wealth", QVariant.Double), QgsField("wealth_hat", QVariant.Double)])
    layer.updateFields()
    truth = rng.standard_normal(n)
    features = []
    for i in range(n):
        feature = QgsFeature(layer.fields())
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(731000 + 30 * (i % 20), -2798000 - 30 * (i // 20))))
        feature.setAttributes([float(truth[i]), float(0.5 * truth[i] + 0.2 * rng.standard_normal())])
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    return write_layer(layer, path)


def hours_worked_gpkg(path, n_units=1500, seed=5):
    """The demo study at ``n_units`` with an outcome shaped like hours worked (issue 24): zero for 60 % of controls
    and 30 % of treated units, log-normal hours plus the unit's effect otherwise. Large enough for the cluster
    model's hurdle part (each arm keeps about 300 units off zero, where it needs 200; checked)."""
    from osgeo import ogr

    from geocate.core.clusters import point_mass_values
    from geocate.core.demo import build

    build(str(path), n_units=n_units, seed=seed)
    rng = np.random.default_rng(seed)
    dataset = ogr.Open(str(path), 1)
    layer = dataset.GetLayer(0)
    layer.StartTransaction()
    for feature in layer:
        if feature.IsFieldNull("outcome"):
            continue
        treated, effect = feature["treated"], feature["true_cate"]
        hours = np.exp(1.0 + 0.3 * rng.standard_normal()) + treated * (effect if np.isfinite(effect or np.nan) else 0)
        feature["outcome"] = float(hours) if rng.random() < (0.7 if treated else 0.4) else 0.0
        layer.SetFeature(feature)
    layer.CommitTransaction()
    layer.ResetReading()
    rows = [(f["treated"], f["outcome"]) for f in layer if not f.IsFieldNull("outcome")]
    dataset = None
    treated, outcome = np.array(rows, float).T
    assert point_mass_values(outcome, treated) is not None, "the study is too small for the hurdle part"
    return str(path)


def cases(units, raster, folder):
    """(name, algorithm, parameters, kind of each loaded output): every algorithm, every kind of destination."""
    f = str(folder)
    trial = {"INPUT": units, "TREATMENT": "treated", "OUTCOME": "outcome", "COVARIATES": ["assets"],
             "RASTER": raster, "PATCH_SIZE": 33, "SEED": 42}
    panel = {"INPUT": panel_gpkg(units, folder / "panel.gpkg"), "UNIT_ID": "village", "TIME": "year",
             "TREATMENT": "programme", "OUTCOME": "income", "COVARIATES": ["assets"], "APPROACH": 0}
    observational = dict(trial, COVARIATES=["assets", "distance"])
    rollout = {"INPUT": staggered_gpkg(folder / "rollout.gpkg"), "UNIT_ID": "unit", "TIME": "year",
               "TREATMENT": "treated", "OUTCOME": "outcome", "COVARIATES": ["x"]}
    evaluation = {"INPUT": "@cate_gpkg:OUTPUT", "PRIORITY": "distance", "TREATMENT": "treated",
                  "OUTCOME": "outcome", "BOOTSTRAP": 50}
    clusters = dict(trial, CLUSTERS=2, EPOCHS=40)
    maps = dict(trial, STRIDE=99)
    # Targeting: the trial's own places as candidates, the map over the demo scene's extent (UTM 21N).
    target = dict(trial, BUDGET=0.3, CANDIDATES=units, STRIDE=99,
                  EXTENT="729945,760665,-2829315,-2798595 [EPSG:32621]")
    return [
        ("cate_gpkg", "geocate:estimatecate", dict(trial, OUTPUT=f"{f}/cate.gpkg", OUTPUT_REPORT=f"{f}/cate.html")),
        ("cate_temporary", "geocate:estimatecate", dict(trial, OUTPUT="TEMPORARY_OUTPUT")),
        ("cate_memory", "geocate:estimatecate", dict(trial, OUTPUT="memory:")),
        ("cate_shp", "geocate:estimatecate", dict(trial, OUTPUT=f"{f}/cate_shp.shp")),
        ("cate_out_of_bag", "geocate:estimatecate", dict(trial, FOREST=1, OUTPUT="TEMPORARY_OUTPUT")),
        ("evaluate_csv", "geocate:evaluate", dict(evaluation, OUTPUT=f"{f}/rate.csv")),
        ("evaluate_temporary", "geocate:evaluate", dict(evaluation, OUTPUT="TEMPORARY_OUTPUT")),
        ("clusters_gpkg", "geocate:imageclusters", dict(clusters, OUTPUT=f"{f}/clusters.gpkg",
                                                        OUTPUT_CLUSTERS=f"{f}/clusters_table.csv",
                                                        OUTPUT_MODEL=f"{f}/clusters.onnx")),
        ("clusters_temporary", "geocate:imageclusters", dict(clusters, OUTPUT="TEMPORARY_OUTPUT",
                                                             OUTPUT_CLUSTERS="TEMPORARY_OUTPUT",
                                                             OUTPUT_MODEL=f"{f}/clusters_2.onnx")),
        ("map_tif", "geocate:mapeffects", dict(maps, OUTPUT=f"{f}/effects.tif")),
        ("map_temporary", "geocate:mapeffects", dict(maps, OUTPUT="TEMPORARY_OUTPUT")),
        ("applyclusters_tif", "geocate:applyclusters", {"MODEL": "@clusters_gpkg:OUTPUT_MODEL", "RASTER": raster,
                                                        "STRIDE": 99, "OUTPUT": f"{f}/clusters_map.tif"}),
        ("compare_csv", "geocate:comparesources", dict(trial, BOOTSTRAP=50, OUTPUT=f"{f}/compare.csv",
                                                       OUTPUT_PLOT="TEMPORARY_OUTPUT")),
        ("ate_gpkg", "geocate:estimateate", dict(observational, OUTPUT=f"{f}/ate.gpkg")),
        ("ate_temporary", "geocate:estimateate", dict(observational, NUISANCE=1, OUTPUT="TEMPORARY_OUTPUT")),
        ("panel_gpkg", "geocate:paneleffects", dict(panel, OUTPUT=f"{f}/panel_effects.gpkg")),
        ("panel_temporary", "geocate:paneleffects", dict(panel, OUTPUT="TEMPORARY_OUTPUT")),
        ("event_csv", "geocate:eventstudy", dict(rollout, OUTPUT=f"{f}/event.csv", OUTPUT_PLOT=f"{f}/event.png")),
        ("event_temporary", "geocate:eventstudy", dict(rollout, OUTPUT="TEMPORARY_OUTPUT",
                                                       OUTPUT_PLOT="TEMPORARY_OUTPUT")),
        ("targeting_gpkg", "geocate:targeting", dict(target, OUTPUT=f"{f}/targeting.gpkg",
                                                     OUTPUT_CANDIDATES=f"{f}/candidates.gpkg",
                                                     OUTPUT_MAP=f"{f}/cells_to_treat.tif",
                                                     OUTPUT_REPORT=f"{f}/targeting.html")),
        ("targeting_temporary", "geocate:targeting", dict(target, OUTPUT="TEMPORARY_OUTPUT",
                                                          OUTPUT_CANDIDATES="TEMPORARY_OUTPUT",
                                                          OUTPUT_MAP="TEMPORARY_OUTPUT")),
        ("calibrate_json", "geocate:calibratemap", {"INPUT": validation_gpkg(folder / "validation.gpkg"),
                                                    "TRUTH": "wealth", "PREDICTION": "wealth_hat",
                                                    "OUTPUT": f"{f}/wealth.json"}),
    ]


VEIL = "Effects map (outcome): outside the trial's support"
TARGETING = [("Targeting of the trial's units", "vector", "categorizedSymbol"),
             ("Targeting of the candidates", "vector", "categorizedSymbol"),
             ("Cells to treat (outcome)", "raster", "singlebandpseudocolor"),
             ("Cells to treat (outcome): outside the trial's support", "raster", None)]
#: The layers each case must load: (output name, kind, renderer type or None for any).
EXPECTED = {
    "cate_gpkg": [("Treatment effects (CATE)", "vector", "graduatedSymbol")],
    "cate_temporary": [("Treatment effects (CATE)", "vector", "graduatedSymbol")],
    "cate_memory": [("Treatment effects (CATE)", "vector", "graduatedSymbol")],
    "cate_shp": [("Treatment effects (CATE)", "vector", "graduatedSymbol")],
    "cate_out_of_bag": [("Treatment effects (CATE)", "vector", "graduatedSymbol")],
    "evaluate_csv": [(None, "vector", None)],
    "evaluate_temporary": [(None, "vector", None)],
    "clusters_gpkg": [("Effect clusters", "vector", "categorizedSymbol"), (None, "vector", None)],
    "clusters_temporary": [("Effect clusters", "vector", "categorizedSymbol"), (None, "vector", None)],
    "map_tif": [("Effects map (outcome)", "raster", "singlebandpseudocolor"), (VEIL, "raster", None)],
    "map_temporary": [("Effects map (outcome)", "raster", "singlebandpseudocolor"), (VEIL, "raster", None)],
    "applyclusters_tif": [("Clusters map (clusters)", "raster", "paletted")],
    "compare_csv": [(None, "vector", None)],
    "ate_gpkg": [(None, "vector", None)],
    "ate_temporary": [(None, "vector", None)],
    "panel_gpkg": [(None, "vector", None)],
    "panel_temporary": [(None, "vector", None)],
    "event_csv": [(None, "vector", None)],
    "event_temporary": [(None, "vector", None)],
    "targeting_gpkg": TARGETING,
    "targeting_temporary": TARGETING,
    "calibrate_json": [],
}


@pytest.fixture(scope="module")
def loaded(demo_units_gpkg, demo_raster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dialog paths")   # a space in the folder, as users have
    spec = [{"name": n, "algorithm": a, "parameters": p} for n, a, p in cases(demo_units_gpkg, demo_raster, folder)]
    (folder / "cases.json").write_text(json.dumps(spec))
    report = folder / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLUGINS)] + sys.path))
    done = subprocess.run([sys.executable, str(HARNESS), str(folder / "cases.json"), str(report)], env=env,
                          capture_output=True, text=True, timeout=900)
    record = json.loads(report.read_text()) if report.exists() else {"cases": {}, "finished": False}
    return done, record, folder


def test_qgis_survives_every_case_and_closes_cleanly(loaded):
    done, record, _ = loaded
    last = list(record["cases"])[-1] if record["cases"] else None
    assert done.returncode == 0, f"QGIS died (exit {done.returncode}) in case {last}: {done.stderr[-3000:]}"
    assert record["finished"] is True
    assert list(record["cases"]) == list(EXPECTED)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_each_output_is_loaded_once_styled_and_nothing_is_reported_missing(loaded, case):
    _, record, folder = loaded
    entry = record["cases"].get(case)
    assert entry is not None and "ok" in entry, f"{case} did not finish"
    assert entry["ok"], entry.get("traceback")
    assert not [e for e in entry["errors"] if "not correctly generated" in e], entry["errors"]
    assert not entry["errors"], entry["errors"]
    layers = entry["layers"]
    assert len(layers) == len(EXPECTED[case]), [(x["name"], x["source"]) for x in layers]
    assert len({x["name"] for x in layers}) == len(layers)   # no output loaded twice
    remaining = list(layers)
    for name, kind, renderer in sorted(EXPECTED[case], key=lambda e: e[0] is None):   # named outputs first
        layer = next((x for x in remaining if x["kind"] == kind and (name is None or x["name"] == name)), None)
        assert layer is not None, (name, kind, [(x["name"], x["kind"]) for x in remaining])
        remaining.remove(layer)
        assert layer["valid"]
        if renderer is not None:
            assert layer["renderer"] == renderer, layer
        if kind == "vector":
            assert layer["features"] > 0
        assert "partial" not in layer["source"]   # the committed file, never the partial one
    assert not [n for n in os.listdir(folder) if "geocate-partial" in n or n.endswith(".geocate-lock")]

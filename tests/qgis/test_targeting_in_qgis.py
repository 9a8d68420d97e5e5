"""geocate:targeting through qgis_process (file outputs, a cost field, candidates, a map) and its refusals through
processing.run: each names the problem and the fix, and leaves no file behind."""

import json
import os
import subprocess

import pytest
from qgis.core import QgsCategorizedSymbolRenderer, QgsProcessingException, QgsVectorLayer
from test_estimatecate_in_qgis import qgis_process_env  # noqa: I001

DEMO_EXTENT = "729945,745000,-2829315,-2814000 [EPSG:32621]"


@pytest.fixture(scope="module")
def costed_units(demo_units_gpkg, tmp_path_factory):
    """The demo units with a cost per unit (1 + |distance|), and a second layer of 'candidates' (the first 40 units)."""
    from osgeo import gdal

    folder = tmp_path_factory.mktemp("targeting")
    units = str(folder / "costed.gpkg")
    gdal.VectorTranslate(units, demo_units_gpkg, SQLStatement="SELECT *, 1 + abs(distance) AS cost FROM units",
                         SQLDialect="SQLite", layerName="units")
    candidates = str(folder / "candidates.gpkg")
    gdal.VectorTranslate(candidates, units, SQLStatement="SELECT * FROM units WHERE unit_id <= 40",
                         layerName="candidates")
    return units, candidates


def test_targeting_runs_through_qgis_process_with_costs_candidates_and_a_map(costed_units, demo_raster, tmp_path):
    units, candidates = costed_units
    total = QgsVectorLayer(units, "u", "ogr")
    total_cost = sum(f["cost"] for f in total.getFeatures() if f["cost"] is not None)
    del total
    out, cand, cells = tmp_path / "targeting.gpkg", tmp_path / "candidates_ranked.gpkg", tmp_path / "cells.tif"
    command = ["qgis_process.bin", "--json", "run", "geocate:targeting", "--", f"INPUT={units}", "TREATMENT=treated",
               "OUTCOME=outcome", "COVARIATES=assets", f"RASTER={demo_raster}", "SEED=7", "COST=cost",
               f"BUDGET={0.25 * total_cost}", f"CANDIDATES={candidates}", f"EXTENT={DEMO_EXTENT}", "STRIDE=99",
               f"OUTPUT={out}", f"OUTPUT_CANDIDATES={cand}", f"OUTPUT_MAP={cells}",
               f"OUTPUT_REPORT={tmp_path / 'targeting.html'}"]
    done = subprocess.run(command, env=qgis_process_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    assert 0 < results["BUDGET_USED"] <= 0.25 * total_cost + 1e-6 and results["N_TREAT"] > 0
    assert results["GAIN"] > 0 and results["GAIN_SE"] > 0 and results["CELLS_TREAT"] >= 0
    layer = QgsVectorLayer(str(out), "t", "ogr")
    rows = [(f["treat"], f["cost"], f["cate"]) for f in layer.getFeatures() if f["treat"] is not None]
    spent = sum(c for t, c, _ in rows if t == 1)
    assert spent == pytest.approx(results["BUDGET_USED"]) and all(e > 0 for t, _, e in rows if t == 1)
    # Every named style the layer has the fields for is in the file, the budget's choice as its default.
    from geocate.provider.styles import CATE_STYLE, TREAT_STYLE

    assert set(layer.listStylesInDatabase()[2]) == {CATE_STYLE, TREAT_STYLE}   # no group field
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer) and layer.renderer().classAttribute() == "treat"
    del layer
    ranked = QgsVectorLayer(str(cand), "c", "ogr")
    assert ranked.featureCount() == 40 and ranked.fields().lookupField("priority") >= 0
    del ranked
    from osgeo import gdal

    dataset = gdal.Open(str(cells))
    bands = [dataset.GetRasterBand(b + 1).GetDescription() for b in range(dataset.RasterCount)]
    dataset = None
    assert bands == ["cate", "cate_se", "support", "treat"]
    report = (tmp_path / "targeting.html").read_text()
    assert "Budget curve" in report and "Rules compared" in report and "Map of cells to treat" in report
    metadata = json.loads((tmp_path / "targeting.run.json").read_text())
    assert metadata["targeting"]["budget"]["cost_field"] == "cost" and metadata["parameters"]["COST"] == "cost"


@pytest.fixture(scope="module")
def plugin(qgis_iface, qgis_processing):
    import geocate

    if not hasattr(qgis_iface, "removePluginMenu"):
        qgis_iface.removePluginMenu = lambda menu, action: None
    loaded = geocate.classFactory(qgis_iface)
    loaded.initGui()
    yield loaded
    loaded.unload()


@pytest.mark.parametrize("extra, fragment", [
    ({"BUDGET": 0}, "treats no unit"),
    ({"BUDGET": 1.5}, "above the total"),
    ({"COST": "cost", "BUDGET": 1e9}, "above the total cost"),
    ({"COST": "assets", "BUDGET": 10}, "cost of 0 or less"),
    ({"OUTPUT_MAP": "map.tif"}, "needs an extent"),
    ({"OUTPUT_CANDIDATES": "candidates.gpkg"}, "no CANDIDATES layer"),
    ({"CANDIDATES": "far"}, "has a usable image window"),
    ({"TREE_DEPTH": 2, "PRIORITY_FIELD": "true_group", "STRATA": "unit_id", "PROPENSITY": "distance"},
     "not both"),
])
def test_bad_input_is_refused_with_its_fix_and_leaves_nothing(plugin, costed_units, demo_raster, tmp_path, extra,
                                                              fragment):
    import processing

    units, _ = costed_units
    if extra.get("CANDIDATES") == "far":   # a layer of points far from the imagery
        layer = QgsVectorLayer("Point?crs=EPSG:4326", "far", "memory")
        from qgis.core import QgsFeature, QgsGeometry, QgsPointXY

        feature = QgsFeature()
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(10.0, 50.0)))
        layer.dataProvider().addFeatures([feature])
        extra = dict(extra, CANDIDATES=layer)
    for key in ("OUTPUT_MAP", "OUTPUT_CANDIDATES"):
        if key in extra:
            extra = dict(extra, **{key: str(tmp_path / extra[key])})
    parameters = {"INPUT": units, "TREATMENT": "treated", "OUTCOME": "outcome", "COVARIATES": ["assets"],
                  "RASTER": demo_raster, "SEED": 7, "OUTPUT": str(tmp_path / "out.gpkg"),
                  "OUTPUT_REPORT": str(tmp_path / "report.html"), **extra}
    with pytest.raises(QgsProcessingException) as error:
        processing.run("geocate:targeting", parameters)
    assert fragment in str(error.value)
    assert os.listdir(tmp_path) == []   # no output, no partial file, no lock

"""Outcomes that are a map's prediction, through Processing: calibratemap, and the correction used by estimatecate
and evaluate; the prediction-powered ATE."""

import json

import numpy as np
import pytest
from conftest import write_raster
from qgis.core import QgsFeature, QgsField, QgsGeometry, QgsPointXY, QgsProcessingException, QgsVectorLayer
from qgis.PyQt.QtCore import QVariant
from test_estimatecate_in_qgis import base_parameters, memory_run, plugin, run  # noqa: F401 - fixtures


def validation_layer(n=300, slope=0.5, seed=0):
    """Points with a true outcome and a shrunk prediction of it (slope ``slope``), in UTM 21N."""
    rng = np.random.default_rng(seed)
    layer = QgsVectorLayer("Point?crs=EPSG:32621", "validation", "memory")
    layer.dataProvider().addAttributes([QgsField("wealth", QVariant.Double), QgsField("wealth_hat", QVariant.Double)])
    layer.updateFields()
    truth = rng.standard_normal(n)
    prediction = slope * truth + 0.2 * rng.standard_normal(n)
    features = []
    for i in range(n):
        feature = QgsFeature(layer.fields())
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(731000 + 30 * (i % 20) + 15, -2798000 - 30 * (i // 20) - 15)))
        feature.setAttributes([float(truth[i]), float(prediction[i])])
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    return layer, truth, prediction


def calibrate(parameters):
    import processing

    return processing.run("geocate:calibratemap", parameters)


def test_calibratemap_writes_a_correction_file_from_fields_or_from_the_map_raster(plugin, tmp_path):
    from geocate.core.corrections import OutcomeCorrection

    layer, truth, prediction = validation_layer()
    results = calibrate({"INPUT": layer, "TRUTH": "wealth", "PREDICTION": "wealth_hat",
                         "OUTPUT": str(tmp_path / "wealth.json"), "OUTPUT_REPORT": str(tmp_path / "wealth.html")})
    assert results["SLOPE"] == pytest.approx(np.polyfit(truth, prediction, 1)[0]) and results["N_VALIDATION"] == 300
    correction = OutcomeCorrection.load(str(tmp_path / "wealth.json"))
    assert correction.outcome == "wealth" and correction.map["field"] == "wealth_hat"
    assert json.loads((tmp_path / "wealth.run.json").read_text())["algorithm"] == "geocate:calibratemap"
    assert "Slope of the prediction on the truth" in (tmp_path / "wealth.html").read_text()
    # The same predictions as a one-band map raster (a 30 m pixel per unit): read at each unit.
    grid = np.full((1, 15, 20), -9999.0)
    for i, value in enumerate(prediction):
        grid[0, i // 20, i % 20] = value
    raster = write_raster(tmp_path / "wealth_map.tif", grid, origin=(731000.0, -2798000.0), pixel=30.0,
                          nodata=-9999.0)
    results = calibrate({"INPUT": layer, "TRUTH": "wealth", "PREDICTION_RASTER": str(raster), "PREDICTION_BAND": 1,
                         "OUTCOME_NAME": "wealth", "OUTPUT": str(tmp_path / "from_raster.json")})
    from_raster = OutcomeCorrection.load(str(tmp_path / "from_raster.json"))
    assert from_raster.map == {"name": "wealth_map.tif", "bands": 1, "band": 1}
    assert results["SLOPE"] == pytest.approx(correction.slope, rel=1e-5)
    with pytest.raises(QgsProcessingException, match="either as a field .* or as the map raster"):
        calibrate({"INPUT": layer, "TRUTH": "wealth", "OUTPUT": str(tmp_path / "none.json")})
    assert not (tmp_path / "none.json").exists()


def demo_with_truth(demo_units_gpkg, share=0.4, seed=1):
    """The demo units with 'outcome_truth': the outcome on a random share of units, NULL elsewhere."""
    units = QgsVectorLayer(demo_units_gpkg, "units", "ogr")
    layer = QgsVectorLayer(f"Point?crs={units.crs().authid()}", "units", "memory")
    layer.dataProvider().addAttributes(units.fields().toList() + [QgsField("outcome_truth", QVariant.Double)])
    layer.updateFields()
    rng = np.random.default_rng(seed)
    features = []
    for feature in units.getFeatures():
        copy = QgsFeature(layer.fields())
        known = rng.random() < share
        copy.setAttributes(feature.attributes() + [feature["outcome"] if known else None])
        copy.setGeometry(feature.geometry())
        features.append(copy)
    layer.dataProvider().addFeatures(features)
    return layer


def test_estimatecate_corrects_a_predicted_outcome_and_reports_every_correction(plugin, demo_units_gpkg,
                                                                                 demo_raster, tmp_path):
    layer, _, _ = validation_layer(slope=0.5)
    calibrate({"INPUT": layer, "TRUTH": "wealth", "PREDICTION": "wealth_hat", "OUTCOME_NAME": "outcome",
               "OUTPUT": str(tmp_path / "outcome.json")})
    from geocate.core.corrections import OutcomeCorrection

    slope = OutcomeCorrection.load(str(tmp_path / "outcome.json")).slope
    units = demo_with_truth(demo_units_gpkg)
    results = run(base_parameters(units, demo_raster, OUTPUT=str(tmp_path / "effects.gpkg"),
                                  OUTCOME_CORRECTION=str(tmp_path / "outcome.json"), CORRECTION=1,
                                  OUTCOME_TRUTH="outcome_truth", OUTPUT_REPORT=str(tmp_path / "effects.html")))
    record = json.loads((tmp_path / "effects.run.json").read_text())["predicted_outcome"]
    ates = record["ate_by_correction"]
    assert record["correction"] == "linear" and results["ATE"] == pytest.approx(ates["linear"]["estimate"])
    # A linear correction is (y - a) / b: the DR ATE scales by exactly 1 / b (same folds, same outcome models).
    assert ates["linear"]["estimate"] == pytest.approx(ates["none"]["estimate"] / slope, rel=1e-6)
    assert ates["tweedie"]["estimate"] > ates["none"]["estimate"] > 0
    # Prediction-powered ATE: the map value is the (corrected) outcome, the truth is known on 40 % of units.
    assert np.isfinite(results["ATE_PPI"]) and results["ATE_PPI_SE"] > 0
    assert record["prediction_powered_ate"]["n_labelled"] > 80
    report = (tmp_path / "effects.html").read_text()
    assert "Outcome from a map" in report and "linear (used)" in report and "Prediction-powered ATE" in report


def test_a_correction_for_another_outcome_is_refused_by_estimatecate_and_evaluate(plugin, demo_units_gpkg,
                                                                                 demo_raster, tmp_path, memory_run):
    import processing

    layer, _, _ = validation_layer()
    calibrate({"INPUT": layer, "TRUTH": "wealth", "PREDICTION": "wealth_hat", "OUTPUT": str(tmp_path / "w.json")})
    with pytest.raises(QgsProcessingException, match="made for the outcome 'wealth'.*outcome here is 'outcome'"):
        run(base_parameters(demo_units_gpkg, demo_raster, OUTCOME_CORRECTION=str(tmp_path / "w.json")))
    with pytest.raises(QgsProcessingException, match="made for the outcome 'wealth'"):
        processing.run("geocate:evaluate", {
            "INPUT": memory_run["OUTPUT"], "PRIORITY": "assets", "TREATMENT": "treated", "OUTCOME": "outcome",
            "OUTCOME_CORRECTION": str(tmp_path / "w.json"), "OUTPUT": "memory:"})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(QgsProcessingException, match="not a GeoCATE outcome correction file"):
        run(base_parameters(demo_units_gpkg, demo_raster, OUTCOME_CORRECTION=str(tmp_path / "bad.json")))

"""geocate:estimateate through Processing: a confounded study on the demo imagery, its table, report and warnings."""

import html
import json
import re

import numpy as np
import pytest
from qgis.core import QgsFeature, QgsField, QgsProcessingException, QgsVectorLayer
from qgis.PyQt.QtCore import QVariant
from test_estimatecate_in_qgis import plugin  # noqa: F401 - fixture

from geocate.provider.convert import as_number


def confounded_layer(demo_units_gpkg, seed=0):
    """The demo units with a treatment that settlement makes likely (brighter windows) and an outcome that
    also grows with it; the true effect is 1."""
    units = QgsVectorLayer(demo_units_gpkg, "units", "ogr")
    layer = QgsVectorLayer(f"Point?crs={units.crs().authid()}", "units", "memory")
    layer.dataProvider().addAttributes(units.fields().toList() + [QgsField("programme", QVariant.Int),
                                                                  QgsField("income", QVariant.Double)])
    layer.updateFields()
    rng = np.random.default_rng(seed)
    features = []
    for feature in units.getFeatures():
        copy = QgsFeature(layer.fields())
        base = as_number(feature["true_cate"])                     # image-defined: 0, 1 or 2.5
        base = 1.0 if np.isnan(base) else base
        programme = int(rng.random() < 1 / (1 + np.exp(-1.5 * (base - 1.2))))
        income = 1.5 * base + 1.0 * programme + rng.standard_normal()
        copy.setAttributes(feature.attributes() + [programme, float(income)])
        copy.setGeometry(feature.geometry())
        features.append(copy)
    layer.dataProvider().addFeatures(features)
    return layer


def test_estimateate_adjusts_for_what_the_image_shows_and_reports_overlap_and_balance(plugin, demo_units_gpkg,
                                                                                      demo_raster, tmp_path):
    import processing

    layer = confounded_layer(demo_units_gpkg)
    results = processing.run("geocate:estimateate", {
        "INPUT": layer, "TREATMENT": "programme", "OUTCOME": "income", "COVARIATES": ["assets"],
        "RASTER": demo_raster, "DESIGN": 0, "TRIM": 1, "OUTPUT": str(tmp_path / "ate.gpkg"),
        "OUTPUT_REPORT": str(tmp_path / "ate.html")})
    table = QgsVectorLayer(str(tmp_path / "ate.gpkg"), "ate", "ogr")
    rows = {(f["estimator"], f["estimand"]): f["estimate"] for f in table.getFeatures()}
    naive, aipw = rows[("naive difference in means", "ATE")], rows[("AIPW", "ATE")]
    assert naive - 1.0 > 0.8                                   # confounded by the image
    assert abs(aipw - 1.0) < 0.5 * (naive - 1.0)               # the image propensity removes most of it
    assert results["ATE"] == pytest.approx(aipw) and 0 <= results["SHARE_OUTSIDE"] <= 1
    metadata = json.loads((tmp_path / "ate.run.json").read_text())
    assert metadata["schema_version"] == 2 and next(iter(metadata)) == "schema_version"   # the record's layout
    assert metadata["design"] == "observational" and metadata["trim"] == "crump"
    assert metadata["balance"][0][0] == "image component 1"
    # The default spatial blocks hold several units each: the splines' penalty is chosen over whole blocks.
    assert metadata["outcome_models"]["penalty"] == "the splines' ridge penalty by cross-validation over whole groups " \
                                                    "(5 folds)" and metadata["fold_groups"] < 300
    # CALIBRATE (issue 23, point 1; on by default): the weights balance the outcome models' inputs, so the table's
    # components and covariates are near 0 after weighting, while before they were far apart. Here treatment is
    # strongly selected on 300 units, so some weights would fall below the clip's bound: balance is close (the
    # largest difference falls by more than 90 %), and the log and the report say so.
    calibration = metadata["calibration"]
    assert calibration["balance"] in ("exact", "close") and metadata["parameters"]["CALIBRATE"] is True
    before, after = (max(abs(row[column]) for row in metadata["balance"]) for column in (1, 2))
    assert before > 0.5 and after < 0.1 * before
    report = (tmp_path / "ate.html").read_text()
    for part in ("How to read this", "Overlap", "Balance", "Hajek", "ATT", "Sensitivity to an unmeasured confounder",
                 "Propensities calibrated so that each arm's weights balance the outcome models",
                 "A confounder as strong as everything the imagery shows would move the estimate",
                 "Sensitivity contours", "of that arm's weight"):
        assert part in report
    # Sensitivity (issue 23): the robustness values, and the bounds of every contrast in the run record.
    assert 0 <= results["RV_A"] <= results["RV"] < 1
    sensitivity = metadata["sensitivity"]["contrasts"]["1 vs 0"]
    assert sensitivity["rv"] == pytest.approx(results["RV"]) and sensitivity["theta"] == pytest.approx(aipw)
    assert [row["confounder"] for row in sensitivity["bounds"]][:2] == [
        "chosen (CF_Y, CF_D, RHO)", "as strong as everything the imagery shows"]
    assert metadata["parameters"]["CF_Y"] == 0.03 and metadata["parameters"]["RHO"] == 1.0
    # The ATT's bounds too: its theta is the AIPW ATT of the table, shown in the report.
    att = metadata["sensitivity"]["contrasts"]["1 vs 0 (ATT)"]
    assert att["theta"] == pytest.approx(rows[("AIPW", "ATT")]) and results["ATT"] == pytest.approx(att["theta"])
    assert att["bounds"][0]["low"] < att["theta"] < att["bounds"][0]["high"] and "1 vs 0 (ATT): estimate" in report


def test_estimateate_refuses_a_treatment_that_is_not_an_arm_number(plugin, demo_units_gpkg, demo_raster):
    import processing

    with pytest.raises(QgsProcessingException, match="arm numbers 0, 1, 2"):
        processing.run("geocate:estimateate", {"INPUT": demo_units_gpkg, "TREATMENT": "assets", "OUTCOME": "outcome",
                                               "RASTER": demo_raster, "OUTPUT": "memory:"})


def test_estimateate_corrects_a_predicted_outcome(plugin, demo_units_gpkg, demo_raster, tmp_path):
    import processing

    from geocate.core.corrections import fit_correction

    rng = np.random.default_rng(0)
    truth = rng.standard_normal(300)
    path = fit_correction(truth, 0.5 * truth + 0.1 * rng.standard_normal(300), "income").save(
        str(tmp_path / "income.json"))
    processing.run("geocate:estimateate", {
        "INPUT": confounded_layer(demo_units_gpkg), "TREATMENT": "programme", "OUTCOME": "income",
        "RASTER": demo_raster, "OUTCOME_CORRECTION": path, "OUTPUT": str(tmp_path / "ate.gpkg")})
    record = json.loads((tmp_path / "ate.run.json").read_text())["predicted_outcome"]
    ates = record["ate_by_correction"]
    assert record["correction"] == "linear" and set(ates) == {"none", "linear", "tweedie"}
    assert ates["linear"]["estimate"] == pytest.approx(ates["none"]["estimate"] / 0.5, rel=0.1)


def test_estimateate_sensitivity_runs_through_qgis_process_and_refuses_a_strength_of_one(plugin, demo_units_gpkg,
                                                                                        demo_raster, tmp_path):
    """A stronger confounder than the default (CF_Y = CF_D = 0.2) through qgis_process: wider bounds, the same
    robustness values (they do not depend on the chosen strength); CF_Y = 1 is refused before any work."""
    import subprocess

    from test_estimatecate_in_qgis import qgis_process_env

    layer = confounded_layer(demo_units_gpkg, seed=1)
    units = str(tmp_path / "confounded.gpkg")
    from qgis.core import QgsVectorFileWriter

    QgsVectorFileWriter.writeAsVectorFormat(layer, units, "utf-8", layer.crs(), "GPKG")
    common = ["qgis_process.bin", "--json", "run", "geocate:estimateate", "--", f"INPUT={units}",
              "TREATMENT=programme", "OUTCOME=income", "COVARIATES=assets", f"RASTER={demo_raster}", "DESIGN=0",
              "TRIM=1"]
    done = subprocess.run(common + ["CF_Y=0.2", "CF_D=0.2", f"OUTPUT={tmp_path / 'ate.gpkg'}"],
                          env=qgis_process_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    record = json.loads((tmp_path / "ate.run.json").read_text())["sensitivity"]
    chosen = record["contrasts"]["1 vs 0"]["bounds"][0]
    assert record["cf_y"] == 0.2 and chosen["low"] < results["ATE"] - 0.1 < results["ATE"] + 0.1 < chosen["high"]
    assert results["RV"] == pytest.approx(record["contrasts"]["1 vs 0"]["rv"])
    assert "Propensities calibrated so that each arm's weights balance" in done.stdout + done.stderr   # CALIBRATE
    refused = subprocess.run(common + ["CF_Y=1", f"OUTPUT={tmp_path / 'refused.gpkg'}"], env=qgis_process_env(),
                             capture_output=True, text=True, timeout=900)
    assert refused.returncode != 0 and "CF_Y" in refused.stdout + refused.stderr
    assert not (tmp_path / "refused.gpkg").exists() and not (tmp_path / "refused.run.json").exists()


def test_the_stacked_models_run_in_a_graphical_model(plugin, demo_units_gpkg, demo_raster, tmp_path):  # noqa: F811
    """NUISANCE in a model built as the model builder does (issue 23, point 1): the advanced choice reaches the
    algorithm as a static value, and the record and report say which models ran."""
    import processing
    from test_estimatecate_in_qgis import graphical_model, model_sources

    static, parameter, _ = model_sources()
    model = graphical_model("Observational ATE with stacked models", [("geocate:estimateate", "ate", {
        "INPUT": parameter("units"), "RASTER": parameter("imagery"), "TREATMENT": static("treated"),
        "OUTCOME": static("outcome"), "COVARIATES": static("assets"), "DESIGN": static(0), "NUISANCE": static(1),
        "SEED": static(7), "OUTPUT": static(str(tmp_path / "ate.gpkg")),
        "OUTPUT_REPORT": static(str(tmp_path / "ate.html"))})])
    processing.run(model, {"units": demo_units_gpkg, "imagery": demo_raster})
    record = json.loads((tmp_path / "ate.run.json").read_text())
    assert record["nuisance"] == "stacked" and len(record["propensity_model"]["stack"]) == 5
    assert record["calibration"]["balance"] in ("exact", "close")   # CALIBRATE's default calibrates the stack's too
    assert "Stacked models" in (tmp_path / "ate.html").read_text()
    assert QgsVectorLayer(str(tmp_path / "ate.gpkg"), "ate", "ogr").featureCount() > 0


def test_qgis_process_runs_the_stacked_models_and_reports_their_weights(demo_units_gpkg, demo_raster, tmp_path):
    """NUISANCE=1 (issue 23, point 1) from the command line: each fold's weights in the log, the run record and
    the report; the estimates are written as with the penalised models. With CALIBRATE=false the stack's own
    propensities are used (no calibration in the log or the record)."""
    import subprocess

    from test_estimatecate_in_qgis import qgis_process_env

    out = tmp_path / "stacked.gpkg"
    done = subprocess.run(
        ["qgis_process.bin", "--json", "run", "geocate:estimateate", "--", f"INPUT={demo_units_gpkg}",
         "TREATMENT=treated", "OUTCOME=outcome", "COVARIATES=assets", f"RASTER={demo_raster}", "DESIGN=0",
         "NUISANCE=1", "CALIBRATE=false", "SEED=7", f"OUTPUT={out}", f"OUTPUT_REPORT={tmp_path / 'stacked.html'}"],
        env=qgis_process_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    assert np.isfinite(results["ATE"]) and results["ATE_SE"] > 0
    record = json.loads((tmp_path / "stacked.run.json").read_text())
    assert record["nuisance"] == "stacked" and record["parameters"]["NUISANCE"].startswith("stacked")
    folds = record["propensity_model"]["stack"]
    assert len(folds) == 5
    for row in folds:   # the demo trial was randomized: no learner may beat the treated share by much
        assert row["scale"] < 0.5
        assert sum(row["weights"].values()) == pytest.approx(1, abs=1e-3) and row["winner"] in row["weights"] or \
            (sum(row["weights"].values()) == 0 and row["winner"].startswith("none"))
    for row in record["outcome_models"]["stack"]:
        assert all(sum(w.values()) == pytest.approx(1, abs=1e-3) for w in row["weights_by_arm"].values())
    assert "Propensity, fold" in done.stdout + done.stderr
    assert record["calibration"] is None and record["parameters"]["CALIBRATE"] is False
    assert "Propensities calibrated" not in done.stdout + done.stderr
    report = (tmp_path / "stacked.html").read_text()
    assert "Stacked models" in report and "gradient boosting (components)" in report


def test_a_cluster_field_keeps_villages_whole_in_the_outcome_models_penalty(plugin, demo_units_gpkg, demo_raster,
                                                                           tmp_path):
    """CLUSTER through Processing: the villages are the fold groups, and the outcome models choose their penalty over
    whole villages (the run record says so); without clusters or blocks, every unit its own group, leave-one-out."""
    import processing

    layer = confounded_layer(demo_units_gpkg)
    layer.dataProvider().addAttributes([QgsField("village", QVariant.Int)])
    layer.updateFields()
    index = layer.fields().indexOf("village")
    layer.dataProvider().changeAttributeValues({f.id(): {index: int(f.id()) // 6} for f in layer.getFeatures()})
    records = {}
    for name, cluster in (("villages", "village"), ("units", None)):
        processing.run("geocate:estimateate", {
            "INPUT": layer, "TREATMENT": "programme", "OUTCOME": "income", "COVARIATES": ["assets"],
            "RASTER": demo_raster, "DESIGN": 0, "TRIM": 1, "SPATIAL_BLOCK": 0,
            **({"CLUSTER": cluster} if cluster else {}), "OUTPUT": str(tmp_path / f"{name}.gpkg"),
            "OUTPUT_REPORT": str(tmp_path / f"{name}.html")})
        records[name] = json.loads((tmp_path / f"{name}.run.json").read_text())
    villages = len({int(f.id()) // 6 for f in layer.getFeatures()})
    assert records["villages"]["fold_groups"] <= villages < records["units"]["fold_groups"]
    assert records["villages"]["outcome_models"]["penalty"].startswith(
        "the splines' ridge penalty by cross-validation over whole groups")
    assert records["units"]["outcome_models"]["penalty"] == "the splines' ridge penalty by leave-one-out"
    # The standard errors over the villages kept are read on Student's t with G - 1 degrees of freedom, and the
    # report says so; every unit its own group, on the normal.
    rule = re.search(r"over the (\d+) fold groups .* with (\d+) degrees", records["villages"]["standard_errors"])
    g, df = map(int, rule.groups())
    assert df == g - 1 and g <= records["villages"]["fold_groups"]
    estimates = {name: (tmp_path / f"{name}.html").read_text().split("<h2>Run metadata</h2>")[0]
                 for name in records}   # the report's sections before the run record's JSON
    assert f"Standard errors: {html.escape(records['villages']['standard_errors'])}." in estimates["villages"]
    assert f"Student&#x27;s t with {df} degrees of freedom" in estimates["villages"]
    assert records["units"]["standard_errors"].endswith("read on the normal distribution")
    assert "Standard errors: robust (every unit its own cluster), read on the normal distribution." in \
        estimates["units"]

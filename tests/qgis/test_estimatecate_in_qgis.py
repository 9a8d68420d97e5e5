"""The plugin inside real QGIS: loading, the provider, processing.run, styles, bad input, and qgis_process."""

import json
import math
import os
import re
import shutil
import site
import subprocess
import sys

import numpy as np
import pytest
from conftest import PLUGINS, ROOT, write_raster
from qgis.core import (
    NULL,
    QgsApplication,
    QgsCategorizedSymbolRenderer,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsGraduatedSymbolRenderer,
    QgsPointXY,
    QgsProcessingException,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QVariant

RESULT_FIELDS = ["cate", "cate_lo", "cate_hi", "cate_se", "group", "patch_ok"]


@pytest.fixture(scope="module")
def plugin(qgis_iface, qgis_processing):
    import geocate

    if not hasattr(qgis_iface, "removePluginMenu"):  # pytest-qgis 2.1's stub iface lacks it
        qgis_iface.removePluginMenu = lambda menu, action: None
    loaded = geocate.classFactory(qgis_iface)
    loaded.initGui()
    yield loaded
    loaded.unload()


def run(parameters):
    import processing

    return processing.run("geocate:estimatecate", parameters)


def base_parameters(units, demo_raster, **extra):
    parameters = {"INPUT": units, "TREATMENT": "treated", "OUTCOME": "outcome",
                  "COVARIATES": ["assets", "distance"], "RASTER": demo_raster, "PATCH_SIZE": 33,
                  "SEED": 42, "OUTPUT": "memory:"}
    parameters.update(extra)
    return parameters


@pytest.fixture(scope="module")
def memory_run(plugin, demo_units_gpkg, demo_raster):
    return run(base_parameters(demo_units_gpkg, demo_raster))


def values(layer, name):
    return [None if f[name] == NULL else f[name] for f in layer.getFeatures()]


def test_plugin_loads_registers_the_provider_and_adds_a_toolbar_action(plugin):
    registry = QgsApplication.processingRegistry()
    assert registry.providerById("geocate") is not None
    algorithm = registry.algorithmById("geocate:estimatecate")
    assert algorithm.displayName() == "Estimate treatment effects from imagery"
    names = {p.name() for p in algorithm.parameterDefinitions()}
    assert {"INPUT", "TREATMENT", "OUTCOME", "COVARIATES", "RASTER", "BANDS", "PATCH_SIZE", "NODATA",
            "SEED", "OUTPUT"} <= names
    assert {o.name() for o in algorithm.outputDefinitions()} >= {"OUTPUT", "ATE", "ATE_SE", "N_USED", "N_DROPPED"}
    assert plugin.action is not None and "GeoCATE" in plugin.action.text()


def test_plugin_module_imports_nothing_heavy():
    code = (f"import sys; sys.path.insert(0, {str(PLUGINS)!r}); import geocate, geocate.plugin; "
            "print(sorted(m for m in ('torch', 'econml', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr


def test_processing_run_gives_the_documented_fields_and_sensible_values(memory_run, demo_units_gpkg):
    layer = memory_run["OUTPUT"]
    source = QgsVectorLayer(demo_units_gpkg, "units", "ogr")
    assert layer.featureCount() == source.featureCount() == 312
    names = [f.name() for f in layer.fields()]
    assert names == [f.name() for f in source.fields()] + RESULT_FIELDS
    assert values(layer, "unit_id") == values(source, "unit_id")   # every row kept, in order
    ok = np.array(values(layer, "patch_ok"))
    assert ok.sum() == 300 and set(ok) == {0, 1}
    cate = np.array([np.nan if v is None else v for v in values(layer, "cate")], dtype=float)
    low = np.array([np.nan if v is None else v for v in values(layer, "cate_lo")], dtype=float)
    high = np.array([np.nan if v is None else v for v in values(layer, "cate_hi")], dtype=float)
    assert np.isnan(cate[ok == 0]).all() and all(g is None for g, o in zip(values(layer, "group"), ok) if o == 0)
    used = np.isfinite(cate)
    assert used.sum() == memory_run["N_USED"] == 294           # 300 usable windows, 6 outcomes missing
    assert memory_run["N_DROPPED"] == 18
    assert np.all(low[used] <= cate[used]) and np.all(cate[used] <= high[used])
    assert {g for g in values(layer, "group") if g is not None} == {1, 2, 3}
    truth = np.array([np.nan if v is None else v for v in values(layer, "true_cate")], dtype=float)
    assert np.corrcoef(cate[used], truth[used])[0, 1] > 0.6
    assert abs(memory_run["ATE"] - truth[used].mean()) < 3 * memory_run["ATE_SE"]
    # A temporary (memory) output has no file, so no run metadata is written anywhere.
    assert not [name for name in os.listdir(os.getcwd()) if name.endswith(".run.json")]


def test_output_is_styled_diverging_about_zero_with_a_group_style(memory_run):
    layer = memory_run["OUTPUT"]
    renderer = layer.renderer()
    assert isinstance(renderer, QgsGraduatedSymbolRenderer) and renderer.classAttribute() == "cate"
    ranges = renderer.ranges()
    cate = np.array([v for v in values(layer, "cate") if v is not None])
    # Zero is a class edge, classes have equal steps, and every class reaches the data (no empty red classes).
    edges = [r.lowerValue() for r in ranges] + [ranges[-1].upperValue()]
    assert any(abs(edge) < 1e-12 for edge in edges) or edges[0] >= 0 or edges[-1] <= 0
    assert np.diff(edges[1:-1]) == pytest.approx(np.full(len(edges) - 3, edges[2] - edges[1]))
    assert edges[0] <= cate.min() and edges[-1] >= cate.max()
    assert edges[1] > cate.min() and edges[-2] < cate.max()   # the outer classes hold units
    red_classes = [r for r in ranges if r.upperValue() <= 0]
    assert all(cate.min() < r.upperValue() for r in red_classes)
    manager = layer.styleManager()
    assert "Effect groups" in manager.styles()
    manager.setCurrentStyle("Effect groups")
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)
    categories = layer.renderer().categories()
    assert [str(c.value()) for c in categories] == ["1", "2", "3"]
    group = np.array([v for v in values(layer, "group")], dtype=float)
    all_cate = np.array([np.nan if v is None else v for v in values(layer, "cate")])
    for category in categories:   # "group 1: +0.16, 33 %": the group's mean estimated effect and share
        members = group == int(category.value())
        assert category.label() == (f"group {category.value()}: {np.nanmean(all_cate[members]):+.2f}, "
                                    f"{members.sum() / np.isfinite(group).sum():.0%}")
    # Colours follow the effect's sign: a group with a positive mean effect is never drawn red.
    for category in categories:
        colour = category.symbol().color()
        mean = np.nanmean(all_cate[group == int(category.value())])
        assert (colour.blue() >= colour.red()) == (mean >= 0)


def test_geopackage_output_loads_styled_and_has_its_run_metadata(plugin, demo_units_gpkg, demo_raster, tmp_path):
    out = tmp_path / "effects.gpkg"
    results = run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(out), COVARIATES=[],
                                  OUTPUT_REPORT=str(tmp_path / "effects.html")))
    reloaded = QgsVectorLayer(str(out), "effects", "ogr")
    assert reloaded.isValid() and isinstance(reloaded.renderer(), QgsGraduatedSymbolRenderer)
    from geocate.provider.styles import CATE_STYLE, GROUP_STYLE

    assert set(reloaded.listStylesInDatabase()[2]) == {CATE_STYLE, GROUP_STYLE}
    metadata = json.loads((tmp_path / "effects.run.json").read_text())
    assert metadata["algorithm"] == "geocate:estimatecate" and metadata["parameters"]["SEED"] == 42
    assert list(metadata)[:3] == ["schema_version", "algorithm", "parameters"]
    # The record's parameters come from the algorithm's definitions: every input, by its Processing name.
    algorithm = QgsApplication.processingRegistry().algorithmById("geocate:estimatecate")
    inputs = [d.name() for d in algorithm.parameterDefinitions() if not d.isDestination()]
    assert list(metadata["parameters"]) == inputs
    assert metadata["parameters"]["DESIGN"] == "randomized" and metadata["parameters"]["COVARIATES"] == []
    assert metadata["parameters"]["RASTER"] == str(demo_raster) and metadata["parameters"]["NODATA"] is None
    assert metadata["device"] == "cpu" and metadata["n_used"] == results["N_USED"]
    assert "econml" in metadata["versions"] and metadata["timings"]["total_s"] > 0
    assert [row["group"] for row in metadata["group_effects"]] == [1, 2, 3]
    report = (tmp_path / "effects.html").read_text()
    assert results["OUTPUT_REPORT"] == str(tmp_path / "effects.html")
    for part in ("Average treatment effect", "Effects by group", "Targeting operator characteristic", "Map",
                 "Run metadata"):
        assert part in report
    assert report.count("data:image/png;base64") == 3
    # Read like a report: how to read it first, settings with their labels and readable values, no "nan",
    # the raw JSON folded away, and no figure files left beside it.
    body = report.split("<h2>Run metadata</h2>")[0]
    assert body.index("How to read this") < body.index("Summary") < body.index("Inputs and settings")
    for label, value in (("Spatial blocks", "chosen from the data"), ("Bands", "all"), ("Window size (pixels)", "33"),
                         ("Covariates", "none")):
        assert f"<td>{label}</td><td>{value}</td>" in body
    import re

    text = re.sub(r'src="data:image/png;base64,[^"]*"', "", body)   # the figures' bytes are not words
    assert not re.search(r"\bnan\b", text, re.IGNORECASE) and "PATCH_SIZE" not in text
    assert "<details><summary>" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["effects.gpkg", "effects.html", "effects.run.json"]


def units_layer(treatment_values, treatment_type=QVariant.Int, n=60):
    """A memory layer of n points on the demo imagery (UTM 21N) with a given treatment column."""
    layer = QgsVectorLayer("Point?crs=EPSG:32621", "units", "memory")
    provider = layer.dataProvider()
    provider.addAttributes([QgsField("treated", treatment_type), QgsField("outcome", QVariant.Double)])
    layer.updateFields()
    rng = np.random.default_rng(0)
    features = []
    for i in range(n):
        feature = QgsFeature(layer.fields())
        x, y = 731000 + rng.uniform(2000, 27000), -2798000 - rng.uniform(2000, 28000)
        feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(x, y)))
        feature.setAttributes([treatment_values[i % len(treatment_values)], float(rng.normal())])
        features.append(feature)
    provider.addFeatures(features)
    return layer


def test_text_treatment_field_gets_a_clear_message_and_no_output(plugin, demo_raster, tmp_path):
    layer = units_layer(["yes", "no"], QVariant.String)
    out = tmp_path / "never.gpkg"
    with pytest.raises(QgsProcessingException, match="'treated' is of type .*not a number.*to_int"):
        run({"INPUT": layer, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": demo_raster,
             "OUTPUT": str(out)})
    assert not out.exists()


def test_non_binary_treatment_gets_a_clear_message_and_no_output(plugin, demo_raster, tmp_path):
    layer = units_layer([0, 1, 2])
    out = tmp_path / "never.gpkg"
    with pytest.raises(QgsProcessingException, match=r"only 0 \(control\) and 1 \(treated\)"):
        run({"INPUT": layer, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": demo_raster,
             "OUTPUT": str(out)})
    assert not out.exists() and not (tmp_path / "never.run.json").exists()


def test_raster_without_crs_and_oversized_window_are_refused(plugin, demo_raster, tmp_path):
    no_crs = write_raster(tmp_path / "nocrs.tif", np.ones((1, 50, 50)) * 3, with_crs=False)
    layer = units_layer([0, 1])
    with pytest.raises(QgsProcessingException, match="no coordinate reference system"):
        run({"INPUT": layer, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": no_crs, "OUTPUT": "memory:"})
    with pytest.raises(QgsProcessingException, match="larger than the raster"):
        run({"INPUT": layer, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": demo_raster,
             "PATCH_SIZE": 1025, "OUTPUT": "memory:"})


def test_too_few_units_in_an_arm_is_refused(plugin, demo_raster):
    layer = units_layer([0, 0, 0, 1], n=60)   # 15 treated
    with pytest.raises(QgsProcessingException, match="Only 15 treated unit"):
        run({"INPUT": layer, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": demo_raster, "OUTPUT": "memory:"})


def qgis_process_env():
    env = dict(os.environ)
    profile = ROOT / ".qgis-profile"
    env.update(QGIS_CUSTOM_CONFIG_PATH=str(profile), QT_QPA_PLATFORM="offscreen",
               PYTHONPATH=os.pathsep.join([str(PLUGINS)] + site.getsitepackages()))
    subprocess.run(["qgis_process.bin", "plugins", "enable", "geocate"], env=env, capture_output=True, timeout=120)
    return env


def test_qgis_process_runs_the_algorithm_from_the_command_line(demo_units_gpkg, demo_raster, tmp_path):
    out = tmp_path / "cli.gpkg"
    done = subprocess.run(
        ["qgis_process.bin", "--json", "run", "geocate:estimatecate", "--",
         f"INPUT={demo_units_gpkg}", "TREATMENT=treated", "OUTCOME=outcome", "COVARIATES=assets",
         f"RASTER={demo_raster}", "SEED=7", f"OUTPUT={out}"],
        env=qgis_process_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    assert results["N_USED"] == 294 and results["N_DROPPED"] == 18
    assert math.isfinite(results["ATE"]) and results["ATE_SE"] > 0
    layer = QgsVectorLayer(str(out), "cli", "ogr")
    assert layer.isValid() and layer.featureCount() == 312
    assert [f.name() for f in layer.fields()][-6:] == RESULT_FIELDS
    assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
    assert (tmp_path / "cli.run.json").exists()


def test_qgis_process_runs_the_out_of_bag_forest(demo_units_gpkg, demo_raster, tmp_path):
    """FOREST=1 (one forest, out of bag by groups; issue 26) from the command line: the record names it."""
    out = tmp_path / "oob.gpkg"
    done = subprocess.run(
        ["qgis_process.bin", "--json", "run", "geocate:estimatecate", "--",
         f"INPUT={demo_units_gpkg}", "TREATMENT=treated", "OUTCOME=outcome", "COVARIATES=assets",
         f"RASTER={demo_raster}", "SEED=7", "FOREST=1", f"OUTPUT={out}"],
        env=qgis_process_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    assert results["N_USED"] == 294 and math.isfinite(results["ATE"]) and results["ATE_SE"] > 0
    layer = QgsVectorLayer(str(out), "oob", "ogr")
    cate = [f["cate"] for f in layer.getFeatures() if isinstance(f["cate"], float)]
    assert len(cate) == 294 and all(math.isfinite(value) for value in cate)
    record = json.loads((tmp_path / "oob.run.json").read_text())
    assert record["forest"] == "out-of-bag"
    assert record["parameters"]["FOREST"].startswith("One forest, out of bag")


def test_qgis_process_reports_bad_input_without_writing(demo_units_gpkg, demo_raster, tmp_path):
    out = tmp_path / "bad.gpkg"
    done = subprocess.run(
        ["qgis_process.bin", "run", "geocate:estimatecate", "--", f"INPUT={demo_units_gpkg}",
         "TREATMENT=true_group", "OUTCOME=outcome", f"RASTER={demo_raster}", f"OUTPUT={out}"],
        env=qgis_process_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "only 0 (control) and 1 (treated)" in done.stdout + done.stderr
    assert not out.exists()


def test_a_truncated_raster_is_named_without_library_noise(demo_units_gpkg, demo_raster, tmp_path):
    from osgeo import gdal

    whole = str(tmp_path / "whole.tif")
    gdal.Translate(whole, demo_raster, format="COG")        # header first, so a cut file still opens
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(open(whole, "rb").read()[:2_500_000])
    out = tmp_path / "out.gpkg"
    done = subprocess.run(
        ["qgis_process.bin", "run", "geocate:estimatecate", "--", f"INPUT={demo_units_gpkg}", "TREATMENT=treated",
         "OUTCOME=outcome", f"RASTER={truncated}", f"OUTPUT={out}"],
        env=qgis_process_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    text = done.stdout + done.stderr
    assert "cannot be read around pixel" in text and "truncated download or copy" in text
    for noise in ("Traceback", "ERROR 1:", "RuntimeWarning", "UserWarning", "FutureWarning"):
        assert noise not in text, noise
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if "geocate" in p]


def test_a_saved_project_opens_on_the_units_not_on_a_blank_map(memory_run, demo_raster, tmp_path):
    from qgis.core import QgsProject, QgsRasterLayer

    from geocate.provider.maps import set_view_extent, true_color

    project = QgsProject()
    raster = true_color(QgsRasterLayer(demo_raster, "imagery"))
    project.addMapLayer(raster)
    project.setCrs(raster.crs())
    layer = memory_run["OUTPUT"]
    set_view_extent(project, layer)
    path = str(tmp_path / "demo.qgz")
    assert project.write(path)
    reopened = QgsProject()
    assert reopened.read(path)
    extent = reopened.viewSettings().defaultViewExtent()
    assert not extent.isEmpty() and extent.crs() == raster.crs()
    assert raster.extent().intersects(extent) and extent.width() < raster.extent().width() * 1.5
    # The renderer of a raster that declares its colours shows red, green and blue as such.
    assert (raster.renderer().redBand(), raster.renderer().greenBand(), raster.renderer().blueBand()) == (3, 2, 1)


def test_a_csv_output_and_units_without_geometry_are_written_as_such(plugin, demo_units_gpkg, demo_raster, tmp_path):
    units = QgsVectorLayer(demo_units_gpkg, "units", "ogr")
    layer = QgsVectorLayer(f"Point?crs={units.crs().authid()}", "units", "memory")
    layer.dataProvider().addAttributes(units.fields().toList())
    layer.updateFields()
    features = []
    for i, feature in enumerate(units.getFeatures()):
        copy = QgsFeature(layer.fields())
        copy.setAttributes(feature.attributes())
        copy.setGeometry(QgsGeometry() if i < 3 else feature.geometry())   # three units lost their location
        features.append(copy)
    layer.dataProvider().addFeatures(features)
    out = tmp_path / "effects.gpkg"
    results = run(base_parameters(layer, demo_raster, OUTPUT=str(out)))
    assert results["N_DROPPED"] >= 3
    written = list(QgsVectorLayer(str(out), "out", "ogr").getFeatures())
    assert [f.geometry().isNull() for f in written[:4]] == [True, True, True, False]   # NULL, not POINT EMPTY
    table = tmp_path / "effects.csv"
    run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(table)))
    header = table.read_text().splitlines()[0].split(",")
    assert header[-6:] == RESULT_FIELDS and (tmp_path / "effects.run.json").exists()
    assert len(table.read_text().splitlines()) == 313


def test_estimatecate_in_an_observational_design_says_so(plugin, demo_units_gpkg, demo_raster, tmp_path):
    results = run(base_parameters(demo_units_gpkg, demo_raster, DESIGN=1, CF_Y=0.1, OUTPUT=str(tmp_path / "obs.gpkg"),
                                  OUTPUT_REPORT=str(tmp_path / "obs.html")))
    metadata = json.loads((tmp_path / "obs.run.json").read_text())
    assert metadata["study_design"] == "observational" and metadata["parameters"]["DESIGN"] == "observational"
    assert metadata["propensity_model"]["model"].startswith("multinomial logistic") and math.isfinite(results["ATE"])
    # The ATE's sensitivity to an unmeasured confounder (issue 23): on the ATE itself, in the outputs, record, report.
    sensitivity = metadata["sensitivity"]
    assert sensitivity["cf_y"] == 0.1 and metadata["parameters"]["CF_Y"] == 0.1
    assert sensitivity["contrasts"]["1 vs 0"]["theta"] == pytest.approx(results["ATE"])
    assert results["RV"] == pytest.approx(sensitivity["contrasts"]["1 vs 0"]["rv"]) and 0 <= results["RV_A"] <= results["RV"]
    report = (tmp_path / "obs.html").read_text()
    assert "Sensitivity to an unmeasured confounder" in report and "as strong as everything the imagery shows" in report
    # A randomized run has none.
    randomized = run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(tmp_path / "trial.gpkg")))
    assert randomized["RV"] is None and "sensitivity" not in json.loads((tmp_path / "trial.run.json").read_text())


def test_polygon_units_use_their_centroid(plugin, memory_run, demo_units_gpkg, demo_raster):
    import processing

    # Polygons drawn around the demo villages, in the raster's CRS (UTM, metres).
    projected = processing.run("native:reprojectlayer", {
        "INPUT": demo_units_gpkg, "TARGET_CRS": "EPSG:32621", "OUTPUT": "memory:"})["OUTPUT"]
    polygons = processing.run("native:buffer", {
        "INPUT": projected, "DISTANCE": 40, "SEGMENTS": 8, "DISSOLVE": False, "OUTPUT": "memory:"})["OUTPUT"]
    results = run(base_parameters(polygons, demo_raster))
    assert results["N_USED"] == memory_run["N_USED"]
    by_polygon = values(results["OUTPUT"], "cate")
    by_point = values(memory_run["OUTPUT"], "cate")
    assert [v is None for v in by_polygon] == [v is None for v in by_point]
    np.testing.assert_allclose([v for v in by_polygon if v is not None], [v for v in by_point if v is not None],
                               rtol=1e-6)


def test_without_the_estimation_packages_qgis_process_lists_the_algorithm_and_says_what_to_install(
        demo_units_gpkg, demo_raster, tmp_path):
    env = qgis_process_env()
    env["PYTHONPATH"] = str(PLUGINS)  # Debian's Python alone: no torch, no econml
    listed = subprocess.run(["qgis_process.bin", "list"], env=env, capture_output=True, text=True, timeout=300)
    assert "geocate:estimatecate" in listed.stdout
    out = tmp_path / "never.gpkg"
    done = subprocess.run(
        ["qgis_process.bin", "run", "geocate:estimatecate", "--", f"INPUT={demo_units_gpkg}",
         "TREATMENT=treated", "OUTCOME=outcome", f"RASTER={demo_raster}", f"OUTPUT={out}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "is not installed in the Python that runs QGIS" in done.stdout + done.stderr
    assert "pip install" in done.stdout + done.stderr
    assert not out.exists()


def test_estimatecate_reports_the_sequential_heterogeneity_test(memory_run):
    """The demo's effects (0, 1, 2.5 by image) are detected by the valid test; the pooled AUTOC is there too."""
    assert memory_run["AUTOC"] > 0 and memory_run["AUTOC_SE"] > 0
    assert memory_run["AUTOC_T"] > 1.645 and memory_run["AUTOC_P"] < 0.05
    assert memory_run["AUTOC_POOLED"] > 0


def test_evaluate_gives_table_plot_and_report_for_a_geocate_cate(memory_run, tmp_path):
    import processing

    results = processing.run("geocate:evaluate", {
        "INPUT": memory_run["OUTPUT"], "PRIORITY": "cate", "PRIORITY_2": "assets", "TREATMENT": "treated",
        "OUTCOME": "outcome", "COVARIATES": ["assets"], "SPATIAL_BLOCK": 3000, "BOOTSTRAP": 100,
        "OUTPUT": "memory:", "OUTPUT_PLOT": str(tmp_path / "toc.png"), "OUTPUT_REPORT": str(tmp_path / "report.html")})
    assert results["N_USED"] == 294
    assert results["AUTOC"] > 0 and results["AUTOC"] - 1.96 * results["AUTOC_SE"] > 0
    table = results["OUTPUT"]
    metrics = [(f["metric"], f["rule"]) for f in table.getFeatures()]
    assert ("AUTOC", "cate - assets") in metrics and ("QINI", "cate") in metrics
    assert ("BLP differential (b2)", "cate") in metrics and ("GATE group 5 (n=58)", "cate") in metrics
    assert (tmp_path / "toc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.html").read_text()
    assert "AUTOC" in report and "data:image/png;base64" in report and "spatial block (m)" in report


def test_evaluate_priority_has_no_default_and_warns_that_cate_is_not_a_test(memory_run):
    import processing
    from qgis.core import QgsProcessingFeedback

    algorithm = QgsApplication.processingRegistry().algorithmById("geocate:evaluate")
    assert algorithm.parameterDefinition("PRIORITY").defaultValue() is None   # 'cate' is not valid for the test
    warnings = []

    class Feedback(QgsProcessingFeedback):
        def pushWarning(self, text):  # noqa: N802 - QGIS's name
            warnings.append(text)

    results = processing.run("geocate:evaluate", {   # a GeoCATE result's own CATE
        "INPUT": memory_run["OUTPUT"], "PRIORITY": "cate", "TREATMENT": "treated", "OUTCOME": "outcome",
        "BOOTSTRAP": 50,
        "OUTPUT": "memory:"}, feedback=Feedback())
    assert results["N_USED"] == 294
    assert any("not a valid test" in text and "AUTOC_P" in text for text in warnings)


def test_evaluate_refuses_a_text_priority_and_writes_nothing(plugin, tmp_path):
    import processing

    layer = units_layer(["a", "b"], QVariant.String)
    with pytest.raises(QgsProcessingException, match="priority field 'treated' is of type"):
        processing.run("geocate:evaluate", {
            "INPUT": layer, "PRIORITY": "treated", "TREATMENT": "outcome", "OUTCOME": "outcome",
            "OUTPUT": str(tmp_path / "t.gpkg"), "OUTPUT_PLOT": str(tmp_path / "t.png"),
            "OUTPUT_REPORT": str(tmp_path / "t.html")})
    assert not any(tmp_path.iterdir())


def test_comparesources_shows_what_the_imagery_adds(plugin, demo_units_gpkg, demo_raster, tmp_path):
    import processing

    results = processing.run("geocate:comparesources", dict(
        base_parameters(demo_units_gpkg, demo_raster), BOOTSTRAP=100, OUTPUT="memory:",
        OUTPUT_PLOT=str(tmp_path / "toc.png"), OUTPUT_REPORT=str(tmp_path / "compare.html")))
    rows = {(f["metric"], f["rule"]): f for f in results["OUTPUT"].getFeatures()}
    test, pooled = "AUTOC (held-out test)", "AUTOC (pooled, descriptive)"
    assert set(rows) >= {(test, "imagery"), (test, "covariates"), (test, "imagery + covariates"),
                         (test, "imagery + covariates - covariates"), ("QINI (held-out test)", "imagery - covariates"),
                         (pooled, "imagery"), (pooled, "imagery + covariates - covariates")}
    gain = rows[(test, "imagery + covariates - covariates")]
    assert gain["estimate"] > 0 and gain["p_value"] < 0.05      # the simulated effect lives in the images
    assert results["P_IMAGERY_ADDS"] == pytest.approx(gain["p_value"])
    assert results["AUTOC_IMAGERY"] > results["AUTOC_COVARIATES"]
    assert "what the imagery adds" in (tmp_path / "compare.html").read_text().lower()


def test_imageclusters_writes_units_clusters_model_and_salience(plugin, demo_units_gpkg, demo_raster, tmp_path):
    from geocate.core.clusters import OnnxClusterModel

    results = run_clusters(demo_units_gpkg, demo_raster, tmp_path, CLUSTERS=2, EPOCHS=150,
                           OUTPUT_SALIENCE=str(tmp_path / "salience"))
    layer = results["OUTPUT"]
    names = [f.name() for f in layer.fields()]
    assert names[-8:] == RESULT_FIELDS + ["p_1", "p_2"] and layer.featureCount() == 312
    assert results["N_CLUSTERS"] == 2 and results["N_USED"] == 294
    assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)   # the cluster layer loads categorized
    clusters = list(results["OUTPUT_CLUSTERS"].getFeatures())
    assert [c["cluster"] for c in clusters] == [1, 2] and clusters[0]["effect"] < clusters[1]["effect"]
    assert abs(sum(c["share"] for c in clusters) - 1) < 1e-3
    # Issue 24: each cluster's held-out doubly robust effect, and its units, beside the model's effect.
    assert sum(c["n_assigned"] for c in clusters) == 294 and all(c["dr_se"] > 0 for c in clusters)
    model = OnnxClusterModel(results["OUTPUT_MODEL"])
    assert model.description["window_size_px"] == 33 and model.description["n_clusters"] == 2
    rasters = sorted((tmp_path / "salience").glob("*.tif"))
    assert len(rasters) == 6
    # Each cluster's typical units are its own members (core.clusters.typical_units), the unit numbered in the layer.
    groups = [f["group"] for f in layer.getFeatures()]
    for raster in rasters:
        cluster, unit = (int(part) for part in re.fullmatch(r"cluster(\d+)_unit(\d+)\.tif", raster.name).groups())
        assert groups[unit - 1] == cluster
    from osgeo import gdal

    salience_raster = gdal.Open(str(rasters[0]))
    assert (salience_raster.RasterCount, salience_raster.RasterXSize) == (2, 33)
    assert salience_raster.GetProjection() and salience_raster.GetGeoTransform()[1] == 30.0


def run_clusters(units, raster, tmp_path, **extra):
    import processing

    parameters = {"INPUT": units, "TREATMENT": "treated", "OUTCOME": "outcome", "COVARIATES": ["assets"],
                  "RASTER": raster, "OUTPUT": "memory:", "OUTPUT_CLUSTERS": "memory:",
                  "OUTPUT_MODEL": str(tmp_path / "clusters.onnx")}
    parameters.update(extra)
    return processing.run("geocate:imageclusters", parameters)


def test_imageclusters_refuses_more_clusters_than_allowed_and_cuda_without_gpu(plugin, demo_units_gpkg, demo_raster,
                                                                              tmp_path):
    import torch

    with pytest.raises(QgsProcessingException, match="larger than MAX_CLUSTERS"):
        run_clusters(demo_units_gpkg, demo_raster, tmp_path, CLUSTERS=5, MAX_CLUSTERS=3)
    if not torch.cuda.is_available():
        with pytest.raises(QgsProcessingException, match="CUDA was asked for"):
            run_clusters(demo_units_gpkg, demo_raster, tmp_path, DEVICE=2)
    assert not (tmp_path / "clusters.onnx").exists()


def graphical_model(name, steps):
    """A model built as the model builder does: parameters "units" (a vector layer) and "imagery" (a raster), and
    ``steps`` [(algorithm id, child id, {parameter: source})], sources made with model_sources()."""
    from qgis.core import (
        QgsProcessingModelAlgorithm,
        QgsProcessingModelChildAlgorithm,
        QgsProcessingModelParameter,
        QgsProcessingParameterRasterLayer,
        QgsProcessingParameterVectorLayer,
    )

    model = QgsProcessingModelAlgorithm(name, "GeoCATE")
    model.addModelParameter(QgsProcessingParameterVectorLayer("units", "units"), QgsProcessingModelParameter("units"))
    model.addModelParameter(QgsProcessingParameterRasterLayer("imagery", "imagery"),
                            QgsProcessingModelParameter("imagery"))
    for algorithm_id, child_id, sources in steps:
        step = QgsProcessingModelChildAlgorithm(algorithm_id)
        step.setChildId(child_id)
        for parameter, source in sources.items():
            step.addParameterSources(parameter, [source])
        model.addChildAlgorithm(step)
    return model


def model_sources():
    """(static value, model parameter, child output) source makers of a model's steps."""
    from qgis.core import QgsProcessingModelChildParameterSource as Source

    return Source.fromStaticValue, Source.fromModelParameter, Source.fromChildOutput


def test_algorithms_chain_in_a_graphical_model(plugin, demo_units_gpkg, demo_raster, tmp_path):
    """A model built as the model builder does: estimate the CATE, then evaluate it."""
    import processing

    static, parameter, child_output = model_sources()
    model = graphical_model("CATE then its evaluation", [
        ("geocate:estimatecate", "estimate", {
            "INPUT": parameter("units"), "RASTER": parameter("imagery"),
            "TREATMENT": static("treated"), "OUTCOME": static("outcome"), "SEED": static(42),
            "OUTPUT": static(str(tmp_path / "effects.gpkg"))}),
        ("geocate:evaluate", "evaluate", {
            "INPUT": child_output("estimate", "OUTPUT"),
            "PRIORITY": static("cate"), "TREATMENT": static("treated"), "OUTCOME": static("outcome"),
            "BOOTSTRAP": static(50), "OUTPUT": static(str(tmp_path / "evaluation.gpkg")),
            "OUTPUT_PLOT": static(str(tmp_path / "toc.png")), "OUTPUT_REPORT": static(str(tmp_path / "report.html"))})])
    assert model.childAlgorithm("estimate").algorithm().id() == "geocate:estimatecate"
    processing.run(model, {"units": demo_units_gpkg, "imagery": demo_raster})
    assert (tmp_path / "effects.gpkg").exists() and (tmp_path / "report.html").exists()
    evaluation = QgsVectorLayer(str(tmp_path / "evaluation.gpkg"), "evaluation", "ogr")
    autoc = [f for f in evaluation.getFeatures() if f["metric"] == "AUTOC"][0]
    assert autoc["rule"] == "cate" and autoc["estimate"] > 0


def test_a_cluster_field_keeps_villages_together_in_folds_and_standard_errors(plugin, demo_units_gpkg, demo_raster,
                                                                              tmp_path):
    """CLUSTER (any field type, e.g. a village name): units of a cluster share a fold, the run metadata
    counts the clusters as fold groups, and the standard errors are computed over them."""
    import processing

    with_village = processing.run("native:fieldcalculator", {
        "INPUT": demo_units_gpkg, "FIELD_NAME": "village", "FIELD_TYPE": 2, "FIELD_LENGTH": 10,
        "FORMULA": "'v' || to_string(floor($id / 10))",
        "OUTPUT": str(tmp_path / "villages.gpkg")})["OUTPUT"]
    clustered = run(base_parameters(with_village, demo_raster, CLUSTER="village", OUTPUT=str(tmp_path / "c.gpkg")))
    plain = run(base_parameters(with_village, demo_raster, OUTPUT=str(tmp_path / "p.gpkg")))
    metadata = json.loads((tmp_path / "c.run.json").read_text())
    assert metadata["parameters"]["CLUSTER"] == "village"
    assert metadata["clustered_by"] == "cluster field and shared locations"
    assert metadata["fold_groups"] <= 32 < json.loads((tmp_path / "p.run.json").read_text())["fold_groups"]
    assert clustered["ATE_SE"] != plain["ATE_SE"] and 0 <= clustered["AUTOC_P"] <= 1


def test_lines_and_tables_are_refused_as_units_and_a_seed_beyond_32_bits_too(plugin, demo_raster, tmp_path):
    lines = QgsVectorLayer("LineString?crs=EPSG:32621", "roads", "memory")
    lines.dataProvider().addAttributes([QgsField("treated", QVariant.Int), QgsField("outcome", QVariant.Double)])
    lines.updateFields()
    table = QgsVectorLayer("None", "survey", "memory")
    table.dataProvider().addAttributes([QgsField("treated", QVariant.Int), QgsField("outcome", QVariant.Double)])
    table.updateFields()
    for layer, kind in ((lines, "holds lines"), (table, "holds no geometries")):
        with pytest.raises(QgsProcessingException, match=f"{kind}: each unit needs a point or a polygon"):
            run({"INPUT": layer, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": demo_raster,
                 "OUTPUT": str(tmp_path / "never.gpkg")})
    with pytest.raises(QgsProcessingException, match="SEED"):
        run({"INPUT": units_layer([0, 1]), "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": demo_raster,
             "SEED": 2**31, "OUTPUT": str(tmp_path / "never.gpkg")})
    assert not (tmp_path / "never.gpkg").exists()


def test_the_toolbox_finds_every_algorithm_by_causal_words_with_help_and_a_description(plugin):
    registry = QgsApplication.processingRegistry()
    ours = [a for a in registry.algorithms() if a.provider() is not None and a.provider().id() == "geocate"]
    assert {a.name() for a in ours} >= {"estimatecate", "imageclusters", "evaluate", "comparesources", "mapeffects",
                                        "applyclusters"}
    for algorithm in ours:
        tags = [t.lower() for t in algorithm.tags()]
        assert {"causal", "rct", "cate", "treatment effect", "heterogeneity", "randomized trial"} <= set(tags)
        assert len(algorithm.shortDescription()) > 40
        assert algorithm.helpUrl().startswith("file://") and os.path.exists(algorithm.helpUrl()[len("file://"):])


def test_evaluate_runs_without_plot_or_report_destinations(memory_run, tmp_path):
    """qgis_process refused to run evaluate without OUTPUT_PLOT and OUTPUT_REPORT: both are optional now."""
    import processing

    results = processing.run("geocate:evaluate", {
        "INPUT": memory_run["OUTPUT"], "PRIORITY": "assets", "TREATMENT": "treated", "OUTCOME": "outcome",
        "BOOTSTRAP": 50, "OUTPUT": "memory:", "OUTPUT_PLOT": None, "OUTPUT_REPORT": None})
    assert results["N_USED"] == 306 and results["OUTPUT_REPORT"] is None and results["OUTPUT_PLOT"] is None
    report_only = processing.run("geocate:evaluate", {
        "INPUT": memory_run["OUTPUT"], "PRIORITY": "assets", "TREATMENT": "treated", "OUTCOME": "outcome",
        "BOOTSTRAP": 50, "OUTPUT": "memory:", "OUTPUT_REPORT": str(tmp_path / "r.html")})
    assert "data:image/png;base64" in (tmp_path / "r.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
    assert report_only["OUTPUT_PLOT"] is None


def test_imageclusters_runs_without_the_cluster_table_and_model(plugin, demo_units_gpkg, demo_raster, tmp_path):
    """The cluster table and the ONNX model are optional destinations (qgis_process ran only with both). The log
    names the noise model and gives the causal forest's check of the clusters (issue 24); NOISE and FOREST_CHECK
    reach the core."""
    from qgis.core import QgsProcessingFeedback

    log = []

    class Feedback(QgsProcessingFeedback):
        def pushInfo(self, text):  # noqa: N802 - QGIS's name
            log.append(text)

        def pushWarning(self, text):  # noqa: N802 - QGIS's name
            log.append(text)

    import processing

    results = processing.run("geocate:imageclusters", {
        "INPUT": demo_units_gpkg, "TREATMENT": "treated", "OUTCOME": "outcome", "COVARIATES": ["assets"],
        "RASTER": demo_raster, "OUTPUT": "memory:", "CLUSTERS": 2, "EPOCHS": 20}, feedback=Feedback())
    assert results["N_CLUSTERS"] == 2 and results["OUTPUT_CLUSTERS"] is None and results["OUTPUT_MODEL"] is None
    assert results["OUTPUT"].featureCount() == 312 and not any(tmp_path.iterdir())
    assert any(line.startswith("Outcome noise: per arm, a mixture of 3") for line in log)
    forest = [line for line in log if line.startswith("Causal forest's heterogeneity test")]
    assert len(forest) == 1 and " p = " in forest[0]
    # The forest's out-of-fold effects inform each unit's cluster (issue 24), and the log says so.
    assignment = [line for line in log if line.startswith("Each unit's cluster (group) from")]
    assert len(assignment) == 1 and "causal forest's out-of-fold effect" in assignment[0]
    log.clear()
    processing.run("geocate:imageclusters", {
        "INPUT": demo_units_gpkg, "TREATMENT": "treated", "OUTCOME": "outcome", "RASTER": demo_raster,
        "OUTPUT": "memory:", "CLUSTERS": 2, "EPOCHS": 20, "NOISE": 1, "FOREST_CHECK": False}, feedback=Feedback())
    assert any(line.startswith("Outcome noise: one Gaussian per cluster") for line in log)
    assert not any(line.startswith("Causal forest's") for line in log)
    assert any(line.startswith("Each unit's cluster (group) from the cluster model's out-of-fold probabilities (the "
                               "most probable") for line in log)


def test_run_metadata_is_strict_json_without_nan(plugin, tmp_path):
    from geocate.provider.base import write_json_atomically

    path = str(tmp_path / "r.run.json")
    write_json_atomically(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float64("nan"),
                                 "d": np.array([1.5, np.nan]), "e": "text"})
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": None, "d": [1.5, None], "e": "text"}


def test_a_package_missing_on_any_path_gives_the_install_message(plugin, monkeypatch):
    """scikit-learn, scipy or matplotlib missing inside a run: the 'install X' message, not an ImportError."""
    from geocate.provider.base import GeoCateAlgorithm

    class Probe(GeoCateAlgorithm):
        def name(self):
            return "probe"

        def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
            raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    with pytest.raises(QgsProcessingException, match=r"'sklearn' is not installed.*install \"scikit-learn\""):
        Probe().processAlgorithm({}, None, None)


def test_rarely_changed_parameters_sit_under_advanced_and_labels_say_optional_once(plugin):
    from qgis.core import QgsProcessingParameterDefinition

    registry = QgsApplication.processingRegistry()
    for name in ("estimatecate", "imageclusters", "comparesources", "evaluate"):
        algorithm = registry.algorithmById(f"geocate:{name}")
        for parameter in algorithm.parameterDefinitions():
            assert "(optional)" not in parameter.description()
            if parameter.name() in ("SEED", "NODATA", "DEVICE") and name != "evaluate":
                assert parameter.flags() & QgsProcessingParameterDefinition.FlagAdvanced, (name, parameter.name())


def test_destinations_are_checked_before_any_work(plugin, demo_units_gpkg, demo_raster, tmp_path):
    """A destination folder that does not exist, or an output that is the input, is refused at once."""
    import processing

    missing = tmp_path / "no such folder"
    with pytest.raises(QgsProcessingException, match="does not exist.*Nothing was computed"):
        run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT_REPORT=str(missing / "report.html")))
    with pytest.raises(QgsProcessingException, match="does not exist"):
        processing.run("geocate:evaluate", {
            "INPUT": demo_units_gpkg, "PRIORITY": "assets", "TREATMENT": "treated", "OUTCOME": "outcome",
            "OUTPUT": "memory:", "OUTPUT_PLOT": str(missing / "toc.png"), "OUTPUT_REPORT": None})
    copy = tmp_path / "units.gpkg"
    shutil.copy(demo_units_gpkg, copy)
    with pytest.raises(QgsProcessingException, match="is one of the run.s inputs"):
        run(base_parameters(str(copy), demo_raster, OUTPUT=str(copy)))
    assert not missing.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["units.gpkg"]


def test_strata_through_processing_and_qgis_process(plugin, demo_units_gpkg, demo_raster, tmp_path):
    """STRATA: a district field; the design's probabilities reach the run record; a stratum without controls is
    refused by name, through the command line too, and nothing is written."""
    import processing

    with_district = processing.run("native:fieldcalculator", {
        "INPUT": demo_units_gpkg, "FIELD_NAME": "district", "FIELD_TYPE": 2, "FIELD_LENGTH": 10,
        "FORMULA": "CASE WHEN $x < 0 AND \"unit_id\" % 2 = 0 THEN 'north' ELSE 'south' END",
        "OUTPUT": str(tmp_path / "districts.gpkg")})["OUTPUT"]
    results = run(base_parameters(with_district, demo_raster, STRATA="district", OUTPUT=str(tmp_path / "s.gpkg")))
    record = json.loads((tmp_path / "s.run.json").read_text())
    assert record["parameters"]["STRATA"] == "district" and record["strata"] == 2
    assert record["propensity"] == "the treated share of each stratum (known by design)"
    assert abs(results["ATE"] - 1.0) < 1.0 and results["ATE_SE"] > 0
    one_arm = processing.run("native:fieldcalculator", {
        "INPUT": with_district, "FIELD_NAME": "block", "FIELD_TYPE": 2, "FIELD_LENGTH": 20,
        "FORMULA": "CASE WHEN \"treated\" = 1 THEN 'all_treated' ELSE 'mixed' || to_string(\"unit_id\" % 2) END",
        "OUTPUT": str(tmp_path / "one_arm.gpkg")})["OUTPUT"]
    done = subprocess.run(["qgis_process.bin", "run", "geocate:estimatecate", "--", f"INPUT={one_arm}",
                           "TREATMENT=treated", "OUTCOME=outcome", f"RASTER={demo_raster}", "STRATA=block",
                           f"OUTPUT={tmp_path / 'never.gpkg'}"], env=qgis_process_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "stratum 'all_treated' has no control unit" in done.stdout + done.stderr
    assert not (tmp_path / "never.gpkg").exists()


def test_the_design_parameters_reach_every_algorithm_that_estimates_from_the_trial(plugin, demo_units_gpkg,
                                                                                demo_raster, tmp_path):
    """Issue 25, point 5: CLUSTER, STRATA and PROPENSITY through the shared parameters in comparesources,
    imageclusters, mapeffects and evaluate (targeting's are tested with it), recorded in each run record."""
    import processing

    layer = processing.run("native:fieldcalculator", {
        "INPUT": demo_units_gpkg, "FIELD_NAME": "district", "FIELD_TYPE": 2, "FIELD_LENGTH": 10,
        "FORMULA": "CASE WHEN \"unit_id\" % 2 = 0 THEN 'north' ELSE 'south' END",
        "OUTPUT": str(tmp_path / "districts.gpkg")})["OUTPUT"]
    trial = {"INPUT": layer, "TREATMENT": "treated", "OUTCOME": "outcome", "COVARIATES": ["assets"],
             "RASTER": demo_raster, "SEED": 7, "STRATA": "district", "CLUSTER": "unit_id"}
    runs = {
        "comparesources": dict(trial, BOOTSTRAP=30, OUTPUT=str(tmp_path / "compare.csv")),
        "imageclusters": dict(trial, CLUSTERS=2, EPOCHS=30, OUTPUT=str(tmp_path / "clusters.gpkg"),
                              OUTPUT_MODEL=str(tmp_path / "clusters.onnx")),
        "mapeffects": dict(trial, STRIDE=99, OUTPUT=str(tmp_path / "map.tif")),
        "evaluate": {"INPUT": layer, "PRIORITY": "assets", "TREATMENT": "treated", "OUTCOME": "outcome",
                     "STRATA": "district", "CLUSTER": "unit_id", "BOOTSTRAP": 30, "OUTPUT": str(tmp_path / "rate.gpkg")},
    }
    records = {"comparesources": "compare.run.json", "imageclusters": "clusters.run.json", "mapeffects": "map.run.json",
               "evaluate": "rate.run.json"}
    for name, parameters in runs.items():
        processing.run(f"geocate:{name}", parameters)
        record = json.loads((tmp_path / records[name]).read_text())
        assert record["parameters"]["STRATA"] == "district" and record["parameters"]["CLUSTER"] == "unit_id", name
    model = json.loads((tmp_path / "clusters.onnx.json").read_text())
    assert model["covariates"] == ["assets", "stratum north", "stratum south"]
    with pytest.raises(QgsProcessingException, match="cluster model assumes a randomized trial"):
        processing.run("geocate:mapeffects", dict(runs["mapeffects"], METHOD=1, DESIGN=1, STRATA=None,
                                                   OUTPUT=str(tmp_path / "never.tif")))
    assert not (tmp_path / "never.tif").exists()

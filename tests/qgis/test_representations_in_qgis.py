"""Scales, dates, ONNX encoders and the feature cache through QGIS: processing.run and qgis_process."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from qgis.core import QgsProcessingException
from test_estimatecate_in_qgis import base_parameters, plugin, qgis_process_env, run  # noqa: F401 - fixtures

from geocate.core.encoders import OnnxEncoder, export_encoder


def tiny_encoder():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    module = tiny_encoder()
    path = str(tmp_path_factory.mktemp("encoder") / "tiny.onnx")
    export_encoder(module, path, 3, 33, [8000, 9000, 9000], [1500, 1500, 1500], band_order=["blue", "green", "red"],
                   resolution_m=30, name="tiny test encoder", licence="MIT")
    return path, module


def test_encoder_gives_torchs_features_inside_qgis(plugin, encoder_file, demo_raster):  # noqa: F811
    """The same check as tests/core, but in the QGIS process with the plugin loaded (its numpy, its GDAL)."""
    import torch

    from geocate.core.patches import extract_patches
    from geocate.core.simulate import simulate_trial

    path, module = encoder_file
    trial = simulate_trial(demo_raster, 40, seed=1)
    windows = extract_patches(demo_raster, trial.coords, trial.crs_wkt, None, 33).patches
    features = OnnxEncoder(path, device="cpu").transform(windows)
    scaled = (windows - np.array([8000, 9000, 9000], np.float32)[None, :, None, None]) / 1500
    with torch.no_grad():
        reference = module(torch.from_numpy(scaled.astype(np.float32))).numpy()
    assert np.abs(features - reference).max() < 1e-4


def test_qgis_process_runs_estimatecate_with_an_encoder_scales_and_dates(encoder_file, demo_units_gpkg, demo_raster,
                                                                         tmp_path):
    later = str(tmp_path / "later.tif")
    shutil.copy(demo_raster, later)
    out = tmp_path / "encoded.gpkg"
    done = subprocess.run(
        ["qgis_process.bin", "--json", "run", "geocate:estimatecate", "--", f"INPUT={demo_units_gpkg}",
         "TREATMENT=treated", "OUTCOME=outcome", f"RASTER={demo_raster}", f"RASTERS_TIME={later}",
         "TIME_POOLING=1", "SCALES=33,65", f"ENCODER={encoder_file[0]}", "FEATURE_CACHE=false", "SEED=7",
         f"OUTPUT={out}"], env=qgis_process_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "encoded.run.json").read_text())
    pipeline = record["feature_pipeline"]
    assert [v["size_px"] for v in pipeline["views"]] == [33, 65] and pipeline["time_pooling"] == "difference"
    assert pipeline["representation"][0]["name"] == "tiny test encoder"
    assert pipeline["representation"][0]["provider"] == "CPUExecutionProvider"
    assert record["n_features"] == 2 * 2 * 16  # two views, mean and difference of 16 features
    assert record["parameters"]["ENCODER"] == encoder_file[0] and record["parameters"]["SCALES"] == "33,65"


def test_a_wrong_encoder_or_scale_is_named_and_nothing_is_written(plugin, demo_units_gpkg, demo_raster,  # noqa: F811
                                                                   tmp_path):
    four_bands = str(tmp_path / "four.onnx")
    import torch

    export_encoder(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                   four_bands, 4, 33, [0] * 4, [1] * 4)
    out = str(tmp_path / "out.gpkg")
    with pytest.raises(QgsProcessingException, match="takes 4 band"):
        run(base_parameters(demo_units_gpkg, demo_raster, ENCODER=four_bands, OUTPUT=out))
    with pytest.raises(QgsProcessingException, match="smaller than the window"):
        run(base_parameters(demo_units_gpkg, demo_raster, SCALES="9", OUTPUT=out))
    with pytest.raises(QgsProcessingException, match="two dates"):
        run(base_parameters(demo_units_gpkg, demo_raster, TIME_POOLING=2, OUTPUT=out))
    assert not any(tmp_path.glob("out*"))


def test_a_second_identical_run_takes_its_features_from_the_cache(plugin, demo_units_gpkg, demo_raster,  # noqa: F811
                                                                   tmp_path):
    from geocate.provider.study_parameters import feature_cache_folder

    shutil.rmtree(feature_cache_folder(), ignore_errors=True)
    records = []
    for k in range(2):
        out = tmp_path / f"run{k}.gpkg"
        run(base_parameters(demo_units_gpkg, demo_raster, SCALES="33,49", OUTPUT=str(out)))
        records.append(json.loads((tmp_path / f"run{k}.run.json").read_text()))
    assert [r["features_from_cache"] for r in records] == [False, True]
    assert records[0]["ate"] == records[1]["ate"]


def test_comparesources_compares_scales_with_the_paired_test(plugin, demo_units_gpkg, demo_raster,  # noqa: F811
                                                              tmp_path):
    import processing

    results = processing.run("geocate:comparesources", dict(
        base_parameters(demo_units_gpkg, demo_raster), SCALES="33,97", COMPARE=1, BOOTSTRAP=50, OUTPUT="memory:",
        OUTPUT_PLOT=str(tmp_path / "toc.png"), OUTPUT_REPORT=str(tmp_path / "compare.html")))
    rows = {(f["metric"], f["rule"]): f for f in results["OUTPUT"].getFeatures()}
    assert ("AUTOC (held-out test)", "multi-scale - window only") in rows
    assert ("AUTOC (held-out test)", "window only") in rows
    assert 0 <= results["P_RICHER_BETTER"] <= 1 and results["P_IMAGERY_ADDS"] is None

"""Views (scales, dates), representations (random convolutions, ONNX encoders), the feature pipeline and its cache."""

import os

import numpy as np
import pytest
from conftest import UTM21N, crs_wkt, pixel_centre, unit_table, write_raster

from geocate.core.embed import BandScaler, RandomConvFeatures
from geocate.core.errors import GeoCateError
from geocate.core.patches import extract_patches, resize_matrix
from geocate.core.represent import (
    FeatureCache,
    FeaturePipeline,
    ImageryOptions,
    RandomConvolutions,
    WindowSource,
    parse_scales,
    pool_over_time,
)


def test_resize_matrix_averages_blocks_and_keeps_constants():
    down = resize_matrix(99, 33)
    assert np.allclose(down.sum(axis=1), 1)
    window = np.random.default_rng(0).random((99, 99))
    blocks = window.reshape(33, 3, 33, 3).mean(axis=(1, 3))
    assert np.allclose(down @ window @ down.T, blocks)
    for size_in, size_out in ((161, 33), (33, 224), (5, 7)):
        weights = resize_matrix(size_in, size_out)
        assert np.allclose(weights @ np.full((size_in, size_in), 4.0) @ weights.T, 4.0)
    # Non-integer ratio: every input pixel counts in proportion to its area.
    assert np.allclose(resize_matrix(161, 33).sum(axis=0), 33 / 161)


def test_parse_scales():
    assert parse_scales(None, 33) == (33,)
    assert parse_scales("161, 33,97", 33) == (33, 97, 161)
    assert parse_scales([161], 33) == (33, 161)
    for bad, words in (("20", "smaller than the window"), ("33,abc", "whole pixels"), ("40.5", "whole pixels")):
        with pytest.raises(GeoCateError, match=words):
            parse_scales(bad, 33)


@pytest.fixture()
def scene(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(100, 4000, (3, 300, 300)).astype(np.uint16)
    return write_raster(tmp_path / "scene.tif", image), image


def test_wider_scale_is_the_full_window_averaged_down(scene):
    path, image = scene
    xy = np.array([pixel_centre(150, 150), pixel_centre(10, 150)])
    source = WindowSource(path, xy, crs_wkt(UTM21N), window_size_px=11, scales="33")
    views, coords, ok, reason = source.read()
    assert [v.windows.shape for v in views] == [(2, 1, 3, 11, 11)] * 2
    full = image[:, 150 - 16:150 + 17, 150 - 16:150 + 17].astype(float)
    assert np.allclose(views[1].windows[0, 0], full.reshape(3, 11, 3, 11, 3).mean(axis=(2, 4)), rtol=1e-5)
    assert np.array_equal(views[0].windows[0, 0], image[:, 145:156, 145:156])
    # The second unit's own window fits, its 33-px context crosses the edge: dropped, and why.
    assert ok.tolist() == [True, False] and reason[1] == "edge@33 px"
    assert views[1].pixel_size_m == pytest.approx(90.0) and views[1].footprint_m == pytest.approx(990.0)


def test_dates_on_another_grid_and_crs_cover_the_same_ground(tmp_path):
    from osgeo import gdal

    rows, cols = np.mgrid[0:300, 0:300]
    image = np.stack([100 + 3 * rows + 2 * cols, 500 + rows * cols / 50, 2000 - 4 * cols]).astype(np.float32)
    path = write_raster(tmp_path / "smooth.tif", image)
    later = str(tmp_path / "later_wgs84.tif")
    gdal.Warp(later, path, dstSRS="EPSG:4326", resampleAlg="bilinear")
    xy = np.array([pixel_centre(150, 150), pixel_centre(60, 200)])
    views, _, ok, _ = WindowSource([path, later], xy, crs_wkt(UTM21N), window_size_px=11).read()
    assert views[0].windows.shape == (2, 2, 3, 11, 11) and ok.all()
    early, late = views[0].windows[:, 0], views[0].windows[:, 1]
    # Reprojected to degrees and read back over the same 330 m: the same place, the same content.
    assert np.allclose(late, early, rtol=0.03)


def test_a_date_with_other_bands_is_refused(scene, tmp_path):
    path, image = scene
    other = write_raster(tmp_path / "two_bands.tif", image[:2])
    with pytest.raises(GeoCateError, match="same bands"):
        WindowSource([path, other], np.array([pixel_centre(150, 150)]), crs_wkt(UTM21N), window_size_px=11)


def test_default_pipeline_is_the_released_construction(small_trial, demo_raster):
    """One window, one date, random convolutions: exactly the features estimatecate computed before the pipeline."""
    found = extract_patches(demo_raster, small_trial.coords, small_trial.crs_wkt, None, 33)
    views, _, ok, _ = WindowSource(demo_raster, small_trial.coords, small_trial.crs_wkt).read()
    features = FeaturePipeline(lambda: RandomConvolutions(seed=5, device="cpu"), seed=5).fit_transform(views, ok)
    scaler = BandScaler(seed=5).fit(found.patches)
    old = RandomConvFeatures(seed=5, device="cpu").fit(scaler.transform(found.patches)).transform(
        found.patches, prepare=scaler.transform, rows=np.arange(len(found.patches)))
    assert np.array_equal(features, np.log1p(old.astype(np.float64)))


def test_pooling_over_time():
    a, b, c = np.ones((4, 3)), np.full((4, 3), 3.0), np.full((4, 3), 8.0)
    assert pool_over_time([a, b], "concatenate").shape == (4, 6)
    assert np.allclose(pool_over_time([a, b, c], "difference"), np.hstack([np.full((4, 3), 4.0), np.full((4, 3), 3.5)]))
    assert np.allclose(pool_over_time([a, b], "variance"), np.hstack([np.full((4, 3), 2.0), np.ones((4, 3))]))
    assert pool_over_time([a], "variance") is a
    with pytest.raises(GeoCateError, match="two dates"):
        ImageryOptions(time_pooling="difference").pipeline()


def test_cache_skips_the_imagery_and_a_changed_file_is_read_again(small_trial, demo_raster, tmp_path, monkeypatch):
    import shutil

    from geocate.core import represent
    from geocate.core import study as study_module
    from geocate.core.pipeline import image_features

    raster = str(tmp_path / "scene.tif")
    shutil.copy(demo_raster, raster)
    cache = FeatureCache(tmp_path / "cache")
    imagery = ImageryOptions(cache=cache)
    units = unit_table(small_trial)
    first = study_module.build_study(units, raster, **imagery.study_kwargs())
    features, _ = image_features(first, seed=3, device="cpu", imagery=imagery)
    assert cache.hits == 0

    def no_reading(*args, **kwargs):
        raise AssertionError("the imagery was read although the features are cached")

    monkeypatch.setattr(represent, "extract_patches", no_reading)
    second = study_module.build_study(units, raster, **imagery.study_kwargs())
    again, pipeline = image_features(second, seed=3, device="cpu", imagery=imagery)
    assert cache.hits == 2 and second.views is None and np.array_equal(features, again)
    assert pipeline.describe()["representation"][0]["kind"] == "random convolutions"
    # Another seed is another key: read again (and refused here, as reading is switched off).
    with pytest.raises(AssertionError, match="was read"):
        image_features(second, seed=4, device="cpu", imagery=imagery)
    monkeypatch.undo()
    os.utime(raster, ns=(1, 1))  # the file changed: its identity, so the key, changes
    third = study_module.build_study(units, raster, **imagery.study_kwargs())
    assert third.views is not None and cache.hits == 2


def test_estimate_with_scales_and_dates_records_its_pipeline(small_trial, demo_raster, tmp_path):
    from geocate.core.pipeline import estimate_cate

    later = str(tmp_path / "later.tif")
    import shutil

    shutil.copy(demo_raster, later)
    units = unit_table(small_trial)
    study, result = estimate_cate(units, demo_raster, seed=3, n_estimators=20, n_draws=20,
                                  imagery=ImageryOptions(scales="33,65", rasters_time=(later,),
                                                         time_pooling="variance"))
    described = result.metadata["feature_pipeline"]
    assert [v["size_px"] for v in described["views"]] == [33, 65]
    assert described["time_pooling"] == "variance" and described["n_features"] == 4 * 512
    assert result.metadata["n_features"] == 2048
    assert study.n_used + sum(study.dropped.values()) == len(small_trial.treated)


def tiny_encoder(spatial=False, bands=3):
    import torch

    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(bands, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2)]
    if not spatial:
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers).eval()


@pytest.mark.parametrize("spatial", [False, True])
def test_onnx_encoder_gives_torchs_features(tmp_path, spatial):
    import torch

    from geocate.core.encoders import OnnxEncoder, export_encoder

    module = tiny_encoder(spatial)
    path = export_encoder(module, str(tmp_path / "enc.onnx"), 3, 32, [100, 110, 120], [20, 25, 30], pixel_scale=2,
                          band_order=["blue", "green", "red"], resolution_m=30, name="tiny", licence="MIT")
    encoder = OnnxEncoder(path, device="cpu")
    windows = np.random.default_rng(0).uniform(100, 400, (20, 3, 32, 32)).astype(np.float32)
    features = encoder.fit(windows).transform(windows, rows=np.arange(3, 20))
    scaled = (windows[3:] / 2 - np.array([100, 110, 120], np.float32)[None, :, None, None]) / \
        np.array([20, 25, 30], np.float32)[None, :, None, None]
    with torch.no_grad():
        reference = module(torch.from_numpy(scaled)).numpy()
    reference = reference.mean(axis=(2, 3)) if spatial else reference
    assert features.shape == (17, 16) and np.abs(features - reference).max() < 1e-4
    described = encoder.describe()
    assert described["provider"] == "CPUExecutionProvider" and described["licence"] == "MIT"
    assert described["resolution_m"] == 30 and described["sha256"] == encoder.params()["sha256"]
    # Windows of another size are resized to the encoder's input.
    assert encoder.transform(np.random.default_rng(1).uniform(100, 400, (2, 3, 33, 33))).shape == (2, 16)


def test_onnx_encoder_refuses_what_does_not_fit(tmp_path):
    import onnx

    from geocate.core.encoders import OnnxEncoder, export_encoder

    path = export_encoder(tiny_encoder(), str(tmp_path / "enc.onnx"), 3, 32, [0, 0, 0], [1, 1, 1])
    with pytest.raises(GeoCateError, match="takes 3 band"):
        OnnxEncoder(path, device="cpu").fit(np.zeros((2, 4, 32, 32), np.float32))
    damaged = tmp_path / "damaged.onnx"
    from pathlib import Path

    damaged.write_bytes(Path(path).read_bytes()[:200])
    with pytest.raises(GeoCateError, match="damaged"):
        OnnxEncoder(str(damaged))
    bare = onnx.load(path)
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(GeoCateError, match="input_size, mean, std"):
        OnnxEncoder(str(tmp_path / "bare.onnx"))
    with pytest.raises(GeoCateError, match="does not exist"):
        OnnxEncoder(str(tmp_path / "missing.onnx"))


def test_deepness_metadata_is_read(tmp_path):
    import json

    import onnx

    from geocate.core.encoders import OnnxEncoder, export_encoder

    path = export_encoder(tiny_encoder(), str(tmp_path / "enc.onnx"), 3, 32, [0, 0, 0], [1, 1, 1])
    model = onnx.load(path)
    del model.metadata_props[:]
    for key, value in (("model_type", "Regressor"), ("tiles_size", 32), ("resolution", 300),
                       ("standardization_mean", [0.4, 0.4, 0.4]), ("standardization_std", [0.2, 0.2, 0.2])):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(tmp_path / "deepness.onnx"))
    encoder = OnnxEncoder(str(tmp_path / "deepness.onnx"), device="cpu")
    assert encoder.description["metadata"] == "Deepness" and encoder.description["input_size"] == 32
    assert encoder.description["pixel_scale"] == 255 and encoder.description["resolution_m"] == 3.0


@pytest.mark.slow
def test_multi_scale_finds_effects_that_depend_on_the_surroundings(demo_raster):
    """Seeded, small version of bench_representations.py scales (there, on the full scene: at least +0.1). On the
    smaller demo scene the context adds +0.063 here (0.834 -> 0.897); a context view that were ignored or misread
    would add nothing."""
    from scipy.stats import spearmanr

    from geocate.core.pipeline import estimate_cate
    from geocate.core.simulate import simulate_context_trial

    trial = simulate_context_trial(demo_raster, 800, context_px=161, seed=2)
    units = unit_table(trial)
    alone = estimate_cate(units, demo_raster, seed=2, n_draws=20)[1]
    both = estimate_cate(units, demo_raster, seed=2, n_draws=20, imagery=ImageryOptions(scales="33,161"))[1]
    rho_alone = spearmanr(alone.cate, trial.true_cate).correlation
    rho_both = spearmanr(both.cate, trial.true_cate).correlation
    assert rho_both > rho_alone + 0.04


@pytest.mark.slow
def test_an_image_sequence_finds_effects_of_change(demo_raster, tmp_path):
    """Seeded, small version of bench_representations.py time: the later date alone cannot see the change."""
    from geocate.core.pipeline import estimate_cate
    from geocate.core.simulate import simulate_change_trial

    later = str(tmp_path / "later.tif")
    trial = simulate_change_trial(demo_raster, later, 400, seed=3)
    units = unit_table(trial)

    def r2(result):
        return 1 - np.mean((result.cate - trial.true_cate) ** 2) / np.var(trial.true_cate)

    alone = estimate_cate(units, later, seed=3, n_draws=50)[1]
    both = estimate_cate(units, demo_raster, seed=3, n_draws=50,
                         imagery=ImageryOptions(rasters_time=(later,), time_pooling="variance"))[1]
    assert r2(alone) < 0.2 and r2(both) > 0.6 and both.heterogeneity.p_value < 0.01


def test_memory_follows_the_units_not_the_raster(demo_raster, tmp_path):
    """Windows are read one by one: on a VRT mosaic of the demo scene repeated 20 x 20 times (2.5 GB if read whole),
    featurising 100 units allocates about what their windows take, never the raster."""
    import tracemalloc

    from osgeo import gdal

    from geocate.core.pipeline import image_features
    from geocate.core.simulate import repeat_mosaic, simulate_trial
    from geocate.core.study import build_study

    scene = gdal.Open(demo_raster)
    gt, width, height = scene.GetGeoTransform(), scene.RasterXSize, scene.RasterYSize
    mosaic = repeat_mosaic(demo_raster, tmp_path)
    whole = gdal.Open(mosaic)
    whole_bytes = whole.RasterXSize * whole.RasterYSize * whole.RasterCount * 2
    whole = None
    trial = simulate_trial(demo_raster, 100, seed=4)
    units = unit_table(trial)
    far = units.__class__(**dict(units.__dict__, xy=units.xy + [19 * width * gt[1], 19 * height * gt[5]]))
    tracemalloc.start()
    study = build_study(far, mosaic)
    features = image_features(study, seed=4, device="cpu")[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert study.n_used == 100 and features.shape == (100, 512)
    print(f"peak {peak / 1e6:.1f} MB of {whole_bytes / 1e9:.1f} GB")
    assert whole_bytes > 2e9 and peak < 100e6


def test_export_encoder_script_writes_a_checked_encoder(tmp_path):
    """scripts/export_encoder.py from the command line, with the user's own module, and --check."""
    import subprocess
    import sys

    from conftest import ROOT

    from geocate.core.encoders import OnnxEncoder

    module = tmp_path / "my_encoder.py"
    module.write_text("import torch\n\ndef build():\n    torch.manual_seed(0)\n    return torch.nn.Sequential("
                      "torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n")
    out = tmp_path / "mine.onnx"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_encoder.py"), "module", str(out),
                           "--module", f"{module}:build", "--bands", "4", "--input-size", "16",
                           "--mean", "0.1,0.1,0.1,0.1", "--std", "0.2,0.2,0.2,0.2", "--pixel-scale", "10000",
                           "--band-order", "b,g,r,nir", "--licence", "MIT", "--check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    difference = float(done.stdout.strip().splitlines()[-1].split(":")[-1])
    assert difference < 1e-4
    described = OnnxEncoder(str(out), device="cpu").describe()
    assert described["bands"] == 4 and described["input_size"] == 16 and described["band_order"][3] == "nir"
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_encoder.py"), "module", str(out),
                          "--module", f"{module}:build", "--bands", "4", "--mean", "0.1", "--std", "0.2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "one per band" in bad.stderr


def test_windows_beyond_the_memory_budget_go_to_a_file_and_give_the_same_features(small_trial, demo_raster):
    """Issue 26, point 2: windows over WindowSource's memory budget are memory-mapped on an anonymous temporary file
    (core.patches.window_store); the features are the same to the last bit, and no file is left behind."""
    import glob
    import tempfile

    from geocate.core.patches import window_store

    def features_of(memory_mb):
        views, _, ok, _ = WindowSource(demo_raster, small_trial.coords, small_trial.crs_wkt, scales=(33, 99),
                                       memory_mb=memory_mb).read()
        pipeline = FeaturePipeline(lambda: RandomConvolutions(seed=5, device="cpu"), seed=5)
        return views, pipeline.fit_transform(views, ok)

    in_memory, expected = features_of(None)
    on_disk, features = features_of(1)           # 600 units x 2 views x 13 KB: over 1 MB
    assert not isinstance(in_memory[0].windows, np.memmap) and isinstance(on_disk[0].windows, np.memmap)
    for a, b in zip(in_memory, on_disk):
        assert np.array_equal(a.windows, b.windows) and np.array_equal(a.ok, b.ok)
    assert np.array_equal(features, expected)
    store = window_store((10, 1, 3, 33, 33), memory_mb=0.01)
    assert isinstance(store, np.memmap) and not store.any()
    del store, on_disk
    import gc

    gc.collect()
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "geocate-windows-*"))   # anonymous: no name to leave


def test_features_beyond_the_memory_budget_are_float32_in_a_file(small_trial, demo_raster, monkeypatch):
    """Issue 26, point 2: random convolution features over FEATURE_MEMORY_MB (in double precision) are kept in
    single precision in a memory-mapped anonymous temporary file: each one the in-memory feature rounded to float32,
    written a block at a time; the forest's design matrix is built from them; no file is left behind."""
    import gc
    import glob
    import tempfile

    import geocate.core.represent as represent
    from geocate.core.inputs import design_matrix

    views, _, ok, _ = WindowSource(demo_raster, small_trial.coords, small_trial.crs_wkt).read()

    def features_of():
        return FeaturePipeline(lambda: RandomConvolutions(seed=5, device="cpu"), seed=5).fit_transform(views, ok)

    expected = features_of()
    before = len(deleted_files_mapped())
    monkeypatch.setattr(represent, "FEATURE_MEMORY_MB", 1)     # 600 units x 512 features x 8 bytes: over 1 MB
    monkeypatch.setattr(represent, "FEATURE_BLOCK", 128)       # several blocks, the last one short
    stored = features_of()
    assert isinstance(expected, np.ndarray) and expected.dtype == np.float64 and not isinstance(expected, np.memmap)
    assert isinstance(stored, np.memmap) and stored.dtype == np.float32 and stored.shape == expected.shape
    np.testing.assert_array_equal(stored, expected.astype(np.float32))
    np.testing.assert_allclose(design_matrix(stored)[0], design_matrix(expected)[0], atol=1e-4)
    # The file has no name (nothing to leave behind), and its mapping goes with the array.
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "geocate-features-*"))
    assert len(deleted_files_mapped()) > before
    del stored
    gc.collect()
    assert len(deleted_files_mapped()) == before


def deleted_files_mapped():
    """This process's memory mappings of deleted files (an anonymous temporary file is one from the start)."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps: not Linux")
    with open("/proc/self/maps") as maps:
        return [line for line in maps if line.rstrip().endswith("(deleted)")]

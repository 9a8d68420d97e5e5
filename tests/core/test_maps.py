"""Maps of effects over whole rasters: the grid, the per-tile function, support, streaming, Dask, saved models."""

import numpy as np
import pytest
from conftest import unit_table
from osgeo import gdal

from geocate.core.errors import Cancelled, GeoCateError
from geocate.core.maps import NODATA, SUPPORT_THRESHOLD, apply_cluster_model, map_effects, map_grid, predict_tile
from geocate.core.simulate import simulate_trial


def test_map_grid_and_its_refusals(demo_raster):
    grid = map_grid(demo_raster, 33)
    assert (grid.n_cols, grid.n_rows, grid.stride) == (31, 31, 33)
    gt = gdal.Open(demo_raster).GetGeoTransform()
    assert grid.map_geotransform == pytest.approx((gt[0], 990.0, 0, gt[3], 0, -990.0))
    # A cell's centre pixel is where a unit's 33-px window would be centred.
    assert grid.centres([0], [0])[0] == pytest.approx((gt[0] + 16.5 * 30, gt[3] - 16.5 * 30))
    part = map_grid(demo_raster, 33, stride=10, extent=(gt[0] + 3000, gt[3] - 6000, gt[0] + 6000, gt[3] - 3000))
    assert (part.col0, part.row0, part.n_cols, part.n_rows) == (100, 100, 10, 10)
    for kwargs, words in ((dict(stride=0), "at least 1 pixel"),
                          (dict(extent=(0, 0, 10, 10)), "does not overlap"),
                          (dict(extent=(gt[0], gt[3] - 300, gt[0] + 300, gt[3])), "less than one map cell")):
        with pytest.raises(GeoCateError, match=words):
            map_grid(demo_raster, 33, **kwargs)


@pytest.fixture(scope="module")
def forest_map(demo_raster, tmp_path_factory):
    trial = simulate_trial(demo_raster, 300, seed=1)
    path = str(tmp_path_factory.mktemp("map") / "effects.tif")
    study, summary, cate, spec = map_effects(unit_table(trial), demo_raster, path, seed=1, n_estimators=40)
    return trial, study, summary, spec, path


def test_forest_map_is_a_styled_cog_with_named_bands(forest_map):
    trial, study, summary, spec, path = forest_map
    dataset = gdal.Open(path)
    assert [dataset.GetRasterBand(b + 1).GetDescription() for b in range(3)] == ["cate", "cate_se", "support"]
    assert dataset.GetMetadata("IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    values = dataset.ReadAsArray()
    assert summary["cells"] == 961 and summary["usable"] == 961 and (values != NODATA).all()
    assert np.all(values[1] > 0) and 0 < summary["share_outside_support"] < 0.5
    # The map's effects follow the imagery as the trial's truth does: bright, textured cells gain more.
    from scipy.stats import spearmanr

    from geocate.core.patches import extract_patches
    from geocate.core.simulate import _window_statistics, _z

    rows, cols = np.meshgrid(np.arange(31), np.arange(31), indexing="ij")
    cells = extract_patches(spec.raster_paths[0],
                            spec.grid.centres(rows.ravel(), cols.ravel()), spec.grid.crs_wkt, None, 33)
    brightness, texture = _window_statistics(cells.patches)
    assert spearmanr(values[0].ravel(), _z(brightness) + 0.5 * _z(texture)).correlation > 0.7


def test_a_cell_centred_on_a_trial_unit_gives_that_units_prediction(forest_map, demo_raster):
    """The same model, the same window: a map cell on a unit's own pixel reproduces the unit's prediction."""
    from geocate.core.pipeline import image_features

    trial, study, summary, spec, path = forest_map
    gt = gdal.Open(demo_raster).GetGeoTransform()
    features = image_features(study, seed=1)[0]
    standardised = (features - spec.feature_mean) / spec.feature_sd
    for unit in (0, 7, 123):
        col = int((trial.coords[unit, 0] - gt[0]) // gt[1])
        row = int((trial.coords[unit, 1] - gt[3]) // gt[5])
        grid = map_grid(demo_raster, 33, stride=33,
                        extent=(gt[0] + (col - 16) * gt[1], gt[3] + (row + 17) * gt[5],
                                gt[0] + (col + 17) * gt[1], gt[3] + (row - 16) * gt[5]))
        assert (grid.n_rows, grid.n_cols) == (1, 1)
        tile = predict_tile(type(spec)(**dict(spec.__dict__, grid=grid)), (0, 1, 0, 1))
        expected = np.mean([calibration(f.predict(standardised[unit:unit + 1]).ravel())[0]
                            for f, calibration in zip(spec.model.forests, spec.model.calibrations)])
        assert tile[0, 0, 0] == pytest.approx(expected, abs=1e-5)
        assert tile[2, 0, 0] == pytest.approx(0, abs=1e-5)  # a trial unit is at distance 0 from the trial


def test_support_flags_imagery_no_trial_unit_resembles(demo_raster, tmp_path):
    """Units only on bright land: the darkest cells (water, forest) lie outside the trial's support."""
    from geocate.core.patches import extract_patches

    candidates = simulate_trial(demo_raster, 1500, seed=2)
    found = extract_patches(demo_raster, candidates.coords, candidates.crs_wkt, None, 33)
    brightness = np.log(np.maximum(found.patches, 1)).mean(axis=(1, 2, 3))
    bright = np.flatnonzero(brightness > np.quantile(brightness, 0.5))[:400]
    units = unit_table(candidates)
    units = units.__class__(**dict(units.__dict__, xy=units.xy[bright], treated=units.treated[bright],
                                   outcome=units.outcome[bright], covariates=units.covariates[bright]))
    path = str(tmp_path / "support.tif")
    map_effects(units, demo_raster, path, seed=2, n_estimators=20)
    support = gdal.Open(path).ReadAsArray()[2]
    grid = map_grid(demo_raster, 33)
    rows, cols = np.meshgrid(np.arange(grid.n_rows), np.arange(grid.n_cols), indexing="ij")
    cells = extract_patches(demo_raster, grid.centres(rows.ravel(), cols.ravel()), grid.crs_wkt, None, 33)
    cell_brightness = np.log(np.maximum(cells.patches, 1)).mean(axis=(1, 2, 3)).reshape(grid.n_rows, grid.n_cols)
    dark = cell_brightness < np.quantile(brightness, 0.1)
    alike = cell_brightness > np.quantile(brightness[bright], 0.25)
    assert dark.sum() > 20 and alike.sum() > 100
    assert np.mean(support[dark] > SUPPORT_THRESHOLD) > 0.6
    assert np.mean(support[alike] > SUPPORT_THRESHOLD) < 0.15


def test_a_mask_maps_only_inside_it_and_a_cancelled_map_leaves_no_file(forest_map, demo_raster, tmp_path):
    from geocate.core.maps import mask_cells, run_map

    trial, study, summary, spec, path = forest_map
    gt = gdal.Open(demo_raster).GetGeoTransform()
    x0, y0 = gt[0] + 990 * 5, gt[3] - 990 * 5
    square = f"POLYGON(({x0} {y0},{x0 + 9900} {y0},{x0 + 9900} {y0 - 9900},{x0} {y0 - 9900},{x0} {y0}))"
    cells = mask_cells(spec.grid, [square])
    assert cells.sum() == 100
    masked = str(tmp_path / "masked.tif")
    run_map(type(spec)(**dict(spec.__dict__, mask=cells)), masked)
    values = gdal.Open(masked).ReadAsArray()[0]
    assert ((values != NODATA) == cells).all()
    cancelled = str(tmp_path / "cancelled.tif")
    with pytest.raises(Cancelled):
        run_map(spec, cancelled, is_cancelled=lambda: True)
    assert not list(tmp_path.glob("cancelled*"))
    with pytest.raises(GeoCateError, match="covers no map cell"):
        mask_cells(spec.grid, ["POLYGON((0 0,1 0,1 1,0 0))"])


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_raster(forest_map, tmp_path):
    from distributed import Client, LocalCluster

    from geocate.core.maps import run_map

    trial, study, summary, spec, path = forest_map
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        on_dask = str(tmp_path / "dask.tif")
        run_map(spec, on_dask, scheduler=client, tile_cells=8)
    in_process = gdal.Open(path).ReadAsArray()
    assert np.abs(gdal.Open(on_dask).ReadAsArray() - in_process).max() <= 1e-6


def test_an_unreachable_dask_scheduler_is_named_and_leaves_no_file(forest_map, tmp_path, monkeypatch):
    from geocate.core import maps

    trial, study, summary, spec, path = forest_map
    monkeypatch.setattr(maps, "DASK_CONNECT_TIMEOUT", 2)
    with pytest.raises(GeoCateError, match="cannot be reached"):
        maps.run_map(spec, str(tmp_path / "never.tif"), scheduler="tcp://127.0.0.1:9")
    assert not list(tmp_path.iterdir())


def test_a_saved_cluster_model_maps_the_units_own_probabilities(demo_raster, tmp_path):
    from geocate.core.clusters import OnnxClusterModel, export_onnx
    from geocate.core.patches import extract_patches
    from geocate.core.pipeline import find_clusters

    trial = simulate_trial(demo_raster, 200, seed=5)
    units = unit_table(trial)
    units = units.__class__(**dict(units.__dict__, covariates=np.zeros((200, 0)), covariate_names=()))
    study, result, extras = find_clusters(units, demo_raster, seed=5, n_clusters=2, epochs=60)
    model_path = str(tmp_path / "clusters.onnx")
    export_onnx(extras["model"], model_path, 3, 33, 0, {"bands_used": [1, 2, 3], "clusters": extras["clusters"],
                                                        "covariate_means": []})
    gt = gdal.Open(demo_raster).GetGeoTransform()
    windows = extract_patches(demo_raster, trial.coords[:5], trial.crs_wkt, None, 33).patches
    expected = OnnxClusterModel(model_path).probabilities(windows)
    for unit in range(5):
        col = int((trial.coords[unit, 0] - gt[0]) // gt[1])
        row = int((trial.coords[unit, 1] - gt[3]) // gt[5])
        out = str(tmp_path / f"unit{unit}.tif")
        summary = apply_cluster_model(model_path, demo_raster, out, extent=(
            gt[0] + (col - 16) * gt[1], gt[3] + (row + 17) * gt[5], gt[0] + (col + 17) * gt[1],
            gt[3] + (row - 16) * gt[5]))
        values = gdal.Open(out).ReadAsArray()
        assert summary["bands"] == ["p_1", "p_2", "cluster", "cate"]
        assert np.abs(values[:2, 0, 0] - expected[unit]).max() < 1e-5
    with pytest.raises(GeoCateError, match="reads band"):
        two_bands = str(tmp_path / "two.tif")
        gdal.Translate(two_bands, demo_raster, bandList=[1, 2])
        apply_cluster_model(model_path, two_bands, str(tmp_path / "x.tif"))


def test_memory_of_a_map_follows_the_tile_not_the_raster(demo_raster, tmp_path):
    """A map over the whole of a VRT mosaic of the demo scene repeated 20 x 20 times (2.5 GB if read whole):
    allocations stay those of a tile and the fitted model."""
    import tracemalloc

    from geocate.core.maps import run_map
    from geocate.core.simulate import repeat_mosaic

    mosaic = repeat_mosaic(demo_raster, tmp_path)
    trial = simulate_trial(demo_raster, 200, seed=6)
    study, summary, cate, spec = map_effects(unit_table(trial), demo_raster, str(tmp_path / "small.tif"), seed=6,
                                             n_estimators=20)
    big = type(spec)(**dict(spec.__dict__, grid=map_grid(mosaic, 33, stride=660), raster_paths=(mosaic,)))
    tracemalloc.start()
    summary = run_map(big, str(tmp_path / "big.tif"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert summary["cells"] == 31 * 31 and summary["usable"] == 961
    assert peak < 150e6     # a tile and its features; the mosaic would be 2.5 GB


def test_a_saved_model_whose_window_does_not_fit_the_raster_is_refused(demo_raster, tmp_path):
    import torch

    from geocate.core.clusters import export_onnx

    class TwoClusters(torch.nn.Module):
        def forward(self, image, covariates):
            brightness = image.mean(dim=(1, 2, 3))[:, None]
            return torch.softmax(torch.cat([brightness, -brightness], dim=1), dim=1)

    model = str(tmp_path / "model.onnx")
    export_onnx(TwoClusters(), model, 3, 33, 0, {"bands_used": [1, 2, 3], "clusters": [[1, 0.0], [2, 1.0]],
                                                 "covariate_means": []})
    small = str(tmp_path / "small.tif")
    gdal.Translate(small, demo_raster, srcWin=[0, 0, 20, 20])
    with pytest.raises(GeoCateError, match="larger than the raster"):
        apply_cluster_model(model, small, str(tmp_path / "never.tif"))
    assert not (tmp_path / "never.tif").exists()

"""Shared fixtures: the package importable as 'geocate', small rasters, and a simulated study."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

# Headless unless a display is given on purpose (the screenshot test runs under Xvfb).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / ".qgis-profile" / "profiles" / "default" / "python" / "plugins"
DEMO_RASTER = ROOT / "resources" / "demo" / "landsat8_demo_b234.tif"

# The repository is the plugin package; it is imported as 'geocate' through the profile's link, as QGIS does.
if not (PLUGINS / "geocate").exists():
    PLUGINS.mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT, PLUGINS / "geocate")
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))

UTM21N = 32621


def write_raster(path, array, epsg=UTM21N, origin=(700000.0, 7300000.0), pixel=30.0, nodata=None,
                 with_crs=True, dtype=None):
    """Write (bands, h, w) ``array`` as a GeoTIFF; returns the path as str."""
    from osgeo import gdal, gdal_array, osr

    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    bands, height, width = array.shape
    driver = gdal.GetDriverByName("GTiff")
    dataset = driver.Create(str(path), width, height, bands, gdal_array.NumericTypeCodeToGDALTypeCode(array.dtype))
    dataset.SetGeoTransform((origin[0], pixel, 0.0, origin[1], 0.0, -pixel))
    if with_crs:
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(epsg)
        dataset.SetProjection(srs.ExportToWkt())
    for b in range(bands):
        band = dataset.GetRasterBand(b + 1)
        band.WriteArray(array[b])
        if nodata is not None:
            band.SetNoDataValue(nodata)
    dataset = None
    return str(path)


def pixel_centre(col, row, origin=(700000.0, 7300000.0), pixel=30.0):
    return origin[0] + (col + 0.5) * pixel, origin[1] - (row + 0.5) * pixel


def crs_wkt(epsg):
    from osgeo import osr

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    return srs.ExportToWkt()


@pytest.fixture
def ramp_raster(tmp_path):
    """3 bands, 100 x 80 pixels, value = 1 + col + 1000 * row + 100000 * band (never 0)."""
    rows, cols = np.mgrid[0:80, 0:100]
    array = np.stack([1 + cols + 1000 * rows + 100000 * b for b in range(3)]).astype(np.float64)
    return write_raster(tmp_path / "ramp.tif", array)


@pytest.fixture(scope="session")
def demo_raster():
    return str(DEMO_RASTER)


@pytest.fixture(scope="session")
def small_trial(demo_raster):
    """A 600-unit simulated trial on the demo imagery, with strong image-driven heterogeneity."""
    from geocate.core.simulate import simulate_trial

    return simulate_trial(demo_raster, n_units=600, seed=7)


@pytest.fixture(scope="session")
def demo_units_gpkg(tmp_path_factory):
    """The demo study (scripts/build_demo.py) at 300 + 12 units, as a GeoPackage in WGS 84."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_demo

    path = tmp_path_factory.mktemp("demo") / "units.gpkg"
    build_demo.build(str(path), n_units=300, seed=11, n_missing=6, n_edge=12)
    return str(path)


def unit_table(trial, treated=None, outcome=None, covariates=None):
    from geocate.core.study import UnitTable

    return UnitTable(
        xy=trial.coords, crs_wkt=trial.crs_wkt,
        treated=np.asarray(trial.treated if treated is None else treated, dtype=float),
        outcome=np.asarray(trial.outcome if outcome is None else outcome, dtype=float),
        covariates=trial.covariates if covariates is None else covariates,
        covariate_names=trial.covariate_names,
    )


def pytest_collection_modifyitems(config, items):
    """Tiers: every test under tests/qgis is marked 'qgis'; the screenshot test also 'desktop' and 'slow'."""
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}tests{os.sep}qgis{os.sep}" in path:
            item.add_marker(pytest.mark.qgis)
        if path.endswith("test_screenshot.py"):
            item.add_marker(pytest.mark.desktop)
            item.add_marker(pytest.mark.slow)

"""Image windows: placement, CRS transformation, edges, nodata and fill, and the refusals."""

import numpy as np
import pytest
from conftest import crs_wkt, pixel_centre, write_raster

from geocate.core import patches as patches_module
from geocate.core.errors import GeoCateError
from geocate.core.patches import EDGE, NODATA, OUTSIDE, extract_patches, to_raster_crs

UTM = crs_wkt(32621)


def read_direct(path, col, row, size):
    from osgeo import gdal

    return gdal.Open(path).ReadAsArray(col, row, size, size)


def test_window_is_centred_on_the_units_pixel(ramp_raster):
    found = extract_patches(ramp_raster, [pixel_centre(40, 30), pixel_centre(10, 70)], UTM, window_size_px=5)
    assert found.ok.tolist() == [True, True]
    np.testing.assert_array_equal(found.patches[0], read_direct(ramp_raster, 38, 28, 5))
    np.testing.assert_array_equal(found.patches[1], read_direct(ramp_raster, 8, 68, 5))
    assert found.patches[0][0, 2, 2] == 1 + 40 + 1000 * 30


def test_units_in_another_crs_get_the_same_window(ramp_raster):
    utm_points = np.array([pixel_centre(40, 30), pixel_centre(77, 12)])
    lonlat = to_raster_crs(utm_points, UTM, crs_wkt(4326))
    assert np.all(np.abs(lonlat[:, 0] - (-55.0)) < 5)  # longitudes near UTM 21N's meridian, not metres
    from_wgs84 = extract_patches(ramp_raster, lonlat, crs_wkt(4326), window_size_px=7)
    from_utm = extract_patches(ramp_raster, utm_points, UTM, window_size_px=7)
    np.testing.assert_array_equal(from_wgs84.patches, from_utm.patches)
    np.testing.assert_allclose(from_wgs84.coords, utm_points, atol=1e-4)


def test_windows_crossing_the_edge_or_outside_are_not_ok(ramp_raster):
    points = [pixel_centre(1, 40), pixel_centre(98, 40), pixel_centre(50, 0), pixel_centre(500, 40),
              (np.nan, np.nan), pixel_centre(2, 2)]
    found = extract_patches(ramp_raster, points, UTM, window_size_px=5)
    assert found.reason.tolist() == [EDGE, EDGE, EDGE, OUTSIDE, OUTSIDE, ""]
    assert not found.patches[:5].any()


def test_declared_nodata_extra_nodata_and_fill_make_a_window_unusable(tmp_path):
    array = np.full((2, 40, 40), 500, dtype=np.uint16)
    array[:, 5, 5] = 9999            # declared nodata, both bands
    array[1, 20, 20] = 7             # the user's extra nodata, one band only
    array[:, 30, 30] = 0             # fill: zero in every band
    array[0, 10, 30] = 0             # zero in one band only is a real value
    path = write_raster(tmp_path / "holes.tif", array, nodata=9999)
    points = [pixel_centre(5, 5), pixel_centre(20, 20), pixel_centre(30, 30), pixel_centre(30, 10)]
    found = extract_patches(path, points, UTM, window_size_px=5, nodata=7)
    assert found.reason.tolist() == [NODATA, NODATA, NODATA, ""]
    without_extra = extract_patches(path, points, UTM, window_size_px=5)
    assert without_extra.reason.tolist() == [NODATA, "", NODATA, ""]


def test_fill_of_the_real_landsat_scene_is_flagged(demo_raster):
    from pathlib import Path

    scene = Path(__file__).resolve().parents[3] / "shared" / "data" / "landsat8_224078_20200518_b234.tif"
    if not scene.exists():
        pytest.skip("the full Landsat scene of ../shared/data is not here")
    # Top right corner of the scene is fill (0); the centre is land.
    from osgeo import gdal

    gt = gdal.Open(str(scene)).GetGeoTransform()
    points = [(gt[0] + 2000 * 30, gt[3] - 30 * 30), (gt[0] + 1000 * 30, gt[3] - 900 * 30)]
    found = extract_patches(str(scene), points, UTM, window_size_px=33)
    assert found.reason.tolist() == [NODATA, ""]


def test_only_windows_are_read_never_the_whole_raster(ramp_raster, monkeypatch):
    reads = []
    original = patches_module._open

    class Recorder:
        def __init__(self, dataset):
            self.dataset = dataset

        def ReadAsArray(self, *args, **kwargs):  # noqa: N802 - GDAL's name
            reads.append(args[2:4])
            return self.dataset.ReadAsArray(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.dataset, name)

    monkeypatch.setattr(patches_module, "_open", lambda path: Recorder(original(path)))
    extract_patches(ramp_raster, [pixel_centre(c, 40) for c in (10, 50, 90)], UTM, window_size_px=9)
    assert reads == [(9, 9)] * 3


def test_band_selection_and_missing_bands(ramp_raster):
    found = extract_patches(ramp_raster, [pixel_centre(40, 30)], UTM, bands=[3, 1], window_size_px=3)
    assert found.bands == (3, 1)
    assert found.patches[0, 0, 1, 1] == 1 + 40 + 30000 + 200000
    with pytest.raises(GeoCateError, match="has 3 band"):
        extract_patches(ramp_raster, [pixel_centre(40, 30)], UTM, bands=[4], window_size_px=3)


def test_raster_without_crs_is_refused_with_the_fix(tmp_path):
    path = write_raster(tmp_path / "nocrs.tif", np.ones((1, 20, 20)), with_crs=False)
    with pytest.raises(GeoCateError, match="no coordinate reference system") as error:
        extract_patches(path, [pixel_centre(5, 5)], UTM, window_size_px=3)
    assert "Assign" in str(error.value)


def test_window_larger_than_the_raster_is_refused(ramp_raster):
    with pytest.raises(GeoCateError, match="larger than the raster.*at most 80"):
        extract_patches(ramp_raster, [pixel_centre(40, 30)], UTM, window_size_px=81)


def test_units_layer_without_crs_is_refused(ramp_raster):
    with pytest.raises(GeoCateError, match="units layer has no coordinate reference system"):
        extract_patches(ramp_raster, [pixel_centre(40, 30)], "", window_size_px=3)


def test_the_pixel_size_in_metres_of_a_geographic_raster(tmp_path):
    """Degrees are not metres: 0.00025 degrees at 25 degrees south are about 25 m by 28 m on the ground."""
    from geocate.core.patches import raster_info

    path = write_raster(tmp_path / "wgs84.tif", np.ones((1, 40, 40)), epsg=4326, origin=(-54.0, -25.0),
                        pixel=0.00025)
    info = raster_info(path)
    expected = np.sqrt(0.00025 * 111320 * np.cos(np.radians(-25.005)) * 0.00025 * 110540)
    assert info.pixel_size == pytest.approx(0.00025) and info.pixel_size_m == pytest.approx(expected, rel=1e-6)
    utm = raster_info(write_raster(tmp_path / "utm.tif", np.ones((1, 10, 10))))
    assert utm.pixel_size_m == pytest.approx(30.0)


def test_a_single_band_raster_keeps_its_real_zeros(tmp_path):
    """With one band, zero is not fill (elevation at sea level, a count of nothing): only declared nodata,
    or the NODATA value given, make a window unusable."""
    array = np.ones((1, 40, 40))
    array[0, 10:30, 10:30] = 0
    path = write_raster(tmp_path / "one_band.tif", array)
    centre = [pixel_centre(20, 20)]
    assert extract_patches(path, centre, crs_wkt(32621), window_size_px=5).ok.all()
    assert not extract_patches(path, centre, crs_wkt(32621), window_size_px=5, nodata=0).ok.any()


def test_natural_colour_bands_come_from_the_raster_not_from_an_assumed_order(tmp_path, demo_raster):
    from osgeo import gdal

    from geocate.core.patches import rgb_bands

    assert rgb_bands(demo_raster) == (3, 2, 1)            # the demo declares blue, green, red
    path = str(tmp_path / "rgbn.tif")
    dataset = gdal.GetDriverByName("GTiff").Create(path, 4, 4, 4, gdal.GDT_Byte)
    for band, interpretation in zip((1, 2, 3, 4), (gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand,
                                                   gdal.GCI_Undefined)):
        dataset.GetRasterBand(band).SetColorInterpretation(interpretation)
    dataset = None
    assert rgb_bands(path) == (1, 2, 3)                     # red, green, blue, near-infrared
    named = str(tmp_path / "named.tif")
    dataset = gdal.GetDriverByName("GTiff").Create(named, 4, 4, 4, gdal.GDT_UInt16)
    for band, name in zip((1, 2, 3, 4), ("B8 nir", "B4 red", "B3 green", "B2 blue")):
        dataset.GetRasterBand(band).SetDescription(name)
    dataset = None
    assert rgb_bands(named) == (2, 3, 4)                    # from the band names
    plain = str(tmp_path / "plain.tif")
    gdal.GetDriverByName("GTiff").Create(plain, 4, 4, 5, gdal.GDT_Byte)
    assert rgb_bands(plain, bands=[5, 4, 1]) == (5, 4, 1)   # nothing declared: the user's band choice, in order
    assert rgb_bands(plain, bands=[2, 3]) is None           # two bands: grey

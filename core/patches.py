"""Image windows around trial units, read through GDAL one window at a time.

The raster is never read whole: each unit's window is a separate
``ReadAsArray`` call, so imagery larger than memory works. A window is usable
(``ok``) only if it lies entirely inside the raster and none of its pixels is
nodata (GDAL's mask band: declared nodata, alpha or internal masks), equal to
the user's extra ``nodata`` value, non-finite, or fill (zero in every band, the
convention of Landsat and most satellite products that declare no nodata).
"""

from dataclasses import dataclass

import numpy as np

from .errors import GeoCateError
from .progress import Throttle

# Why a window could not be used, one code per unit ("" = usable).
OUTSIDE = "outside"   # the unit lies outside the raster
EDGE = "edge"         # the window crosses the raster's edge
NODATA = "nodata"     # the window holds nodata, fill or non-finite pixels


@dataclass(frozen=True)
class RasterInfo:
    """What the core needs to know about a raster, read from its header."""

    path: str
    crs_wkt: str
    width: int
    height: int
    band_count: int
    geotransform: tuple
    pixel_size: float  # mean ground size of one pixel, in CRS units

    @property
    def crs_is_geographic(self):
        from osgeo import osr

        srs = osr.SpatialReference()
        srs.ImportFromWkt(self.crs_wkt)
        return bool(srs.IsGeographic())

    @property
    def pixel_size_m(self):
        """Mean ground size of one pixel in metres: degrees converted at the raster's central latitude
        (equirectangular, ample for windows of kilometres), projected units by their linear unit."""
        from osgeo import osr

        srs = osr.SpatialReference()
        srs.ImportFromWkt(self.crs_wkt)
        gt = self.geotransform
        if srs.IsGeographic():
            latitude = np.radians(gt[3] + gt[5] * self.height / 2 + gt[4] * self.width / 2)
            dx = np.hypot(gt[1], gt[4]) * 111320.0 * np.cos(latitude)
            dy = np.hypot(gt[2], gt[5]) * 110540.0
            return float(np.sqrt(dx * dy))
        return float(self.pixel_size * srs.GetLinearUnits())


@dataclass(frozen=True)
class PatchSet:
    """Windows of a set of units.

    patches: (n, bands, h, w) float32, zeros where not ok;
    ok: (n,) bool; reason: (n,) str code ("" where ok, else OUTSIDE/EDGE/NODATA);
    coords: (n, 2) unit coordinates in the raster's CRS;
    bands: the 1-based band numbers read.
    """

    patches: np.ndarray
    ok: np.ndarray
    reason: np.ndarray
    coords: np.ndarray
    bands: tuple


def _open(path):
    from osgeo import gdal

    gdal.UseExceptions()
    try:
        dataset = gdal.Open(str(path), gdal.GA_ReadOnly)
    except RuntimeError as exc:
        raise GeoCateError(
            f"The raster '{path}' cannot be opened ({exc}).",
            "Check that the file exists and is a raster GDAL can read.",
        ) from exc
    return dataset


def raster_info(path):
    """Read the header of ``path``; raises GeoCateError if it has no CRS."""
    dataset = _open(path)
    crs_wkt = dataset.GetProjection() or ""
    if not crs_wkt.strip():
        raise GeoCateError(
            f"The raster '{path}' has no coordinate reference system, so units cannot be placed on it.",
            "Assign its CRS first (Raster > Projections > Assign Projection, or gdal_edit.py -a_srs EPSG:xxxx).",
        )
    gt = dataset.GetGeoTransform()
    pixel_size = float(np.sqrt(abs(gt[1] * gt[5] - gt[2] * gt[4])))
    return RasterInfo(
        path=str(path),
        crs_wkt=crs_wkt,
        width=dataset.RasterXSize,
        height=dataset.RasterYSize,
        band_count=dataset.RasterCount,
        geotransform=tuple(gt),
        pixel_size=pixel_size,
    )


def to_raster_crs(xy, source_crs_wkt, raster_crs_wkt):
    """Transform (n, 2) coordinates, x/easting/longitude first, between two CRSs."""
    from osgeo import osr

    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    if not source_crs_wkt or not source_crs_wkt.strip():
        raise GeoCateError(
            "The units layer has no coordinate reference system.",
            "Set the layer's CRS (Layer Properties > Source) before running.",
        )
    src, dst = osr.SpatialReference(), osr.SpatialReference()
    src.ImportFromWkt(source_crs_wkt)
    dst.ImportFromWkt(raster_crs_wkt)
    for srs in (src, dst):
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    if src.IsSame(dst) or len(xy) == 0:
        return xy.copy()
    transform = osr.CoordinateTransformation(src, dst)
    out = np.full_like(xy, np.nan)
    finite = np.all(np.isfinite(xy), axis=1)
    if finite.any():
        points = transform.TransformPoints(xy[finite].tolist())
        out[finite] = np.asarray(points, dtype=float)[:, :2]
    return out


def window_origin(coords, geotransform, window_size_px):
    """Top-left pixel (col, row) of the window centred on each unit: (n, 2) int.

    The unit's pixel is the window's centre (for an even size, the pixel just
    below and right of the centre).
    """
    from osgeo import gdal

    inverse = gdal.InvGeoTransform(tuple(geotransform))
    x, y = coords[:, 0], coords[:, 1]
    col = inverse[0] + inverse[1] * x + inverse[2] * y
    row = inverse[3] + inverse[4] * x + inverse[5] * y
    half = window_size_px // 2
    with np.errstate(invalid="ignore"):
        origin = np.stack([np.floor(col), np.floor(row)], axis=1) - half
    return origin


def extract_patches(
    raster_path,
    xy,
    xy_crs_wkt,
    bands=None,
    window_size_px=33,
    nodata=None,
    progress=None,
    is_cancelled=None,
    output_size_px=None,
    out=None,
):
    """Read the ``window_size_px`` square window around each unit.

    xy: (n, 2) unit coordinates in ``xy_crs_wkt`` (transformed to the raster's CRS here);
    bands: 1-based band numbers (default all); nodata: an extra value treated
    as missing in every band; output_size_px: each window is averaged down (or
    interpolated up) to this many pixels per side after its pixels were checked
    at full resolution (default: kept as read). out: a zeroed (n, bands, size, size) float32 array the windows
    are written into (a view of a window_store; default a new array in memory). Returns a :class:`PatchSet`.
    """
    info = raster_info(raster_path)
    bands = _check_bands(bands, info)
    window_size_px = int(window_size_px)
    if window_size_px < 1:
        raise GeoCateError(
            f"The window size must be at least 1 pixel (got {window_size_px}).",
            "Set the window size to a positive number of pixels, e.g. 33.",
        )
    if window_size_px > min(info.width, info.height):
        raise GeoCateError(
            f"The window of {window_size_px} pixels is larger than the raster "
            f"({info.width} x {info.height} pixels).",
            f"Choose a window size of at most {min(info.width, info.height)} pixels, or a larger raster.",
        )
    coords = to_raster_crs(xy, xy_crs_wkt, info.crs_wkt)
    n = len(coords)
    origin = window_origin(coords, info.geotransform, window_size_px)
    out_size = int(output_size_px or window_size_px)
    resize = None if out_size == window_size_px else resize_matrix(window_size_px, out_size)
    patches = np.zeros((n, len(bands), out_size, out_size), dtype=np.float32) if out is None else out
    reason = np.full(n, OUTSIDE, dtype=object)

    centre = origin + window_size_px // 2
    finite = np.all(np.isfinite(origin), axis=1)
    inside = finite.copy()
    inside[finite] &= (
        (centre[finite, 0] >= 0) & (centre[finite, 0] < info.width)
        & (centre[finite, 1] >= 0) & (centre[finite, 1] < info.height)
    )
    whole = inside.copy()
    whole[inside] &= (
        (origin[inside, 0] >= 0) & (origin[inside, 1] >= 0)
        & (origin[inside, 0] + window_size_px <= info.width)
        & (origin[inside, 1] + window_size_px <= info.height)
    )
    reason[inside & ~whole] = EDGE

    dataset = _open(raster_path)
    band_objects = [dataset.GetRasterBand(b) for b in bands]
    from osgeo import gdal

    masked = [b for b in band_objects if b.GetMaskFlags() != gdal.GMF_ALL_VALID]
    todo = np.flatnonzero(whole)
    # Row-major order keeps GDAL's block cache warm on tiled and striped files.
    todo = todo[np.lexsort((origin[todo, 0], origin[todo, 1]))]
    throttle = Throttle(progress, is_cancelled)
    for done, i in enumerate(todo):
        col, row = int(origin[i, 0]), int(origin[i, 1])
        try:
            window = dataset.ReadAsArray(
                col, row, window_size_px, window_size_px, band_list=list(bands)
            ).reshape(len(bands), window_size_px, window_size_px)
            masks = [band.GetMaskBand().ReadAsArray(col, row, window_size_px, window_size_px) for band in masked]
        except (RuntimeError, AttributeError) as error:  # GDAL raises, or returns None, on a damaged block
            raise GeoCateError(
                f"The raster '{raster_path}' cannot be read around pixel ({col}, {row}) (GDAL: {error}): the file is "
                "damaged or incomplete (a truncated download or copy?).",
                "Download or copy it again; 'gdalinfo -checksum' on the file shows whether GDAL can read it all.",
            ) from None
        bad = ~np.isfinite(window).all(axis=0) if window.dtype.kind == "f" else np.zeros(window.shape[1:], bool)
        if len(bands) > 1:  # fill: zero in every band; with one band a zero is as likely a real value
            bad |= (window == 0).all(axis=0)
        if nodata is not None:
            bad |= (window == nodata).any(axis=0)
        for mask in masks:
            bad |= mask == 0
        if bad.any():
            reason[i] = NODATA
        else:
            reason[i] = ""
            patches[i] = window if resize is None else resize @ window.astype(np.float64) @ resize.T
        throttle.tick(done / max(len(todo), 1), f"Reading image windows: {done} of {len(todo)}")
    if progress is not None:
        progress(1.0, f"Read {len(todo)} image windows")
    ok = reason == ""
    return PatchSet(patches=patches, ok=ok, reason=reason.astype(str), coords=coords, bands=tuple(bands))


#: Image windows larger than this (all units, views and dates together) are kept in a file on disk, memory-mapped,
#: instead of in memory (issue 26): at 33 x 33 pixels and 3 bands, about 80,000 windows. Memory then holds only the
#: pages being read, whatever the number of windows.
WINDOW_MEMORY_MB = 1024


def float32_store(shape, memory_mb, prefix="geocate-"):
    """A zeroed float32 array of ``shape``: in memory when it fits in ``memory_mb``, else memory-mapped on an
    anonymous temporary file (removed by the system when the array is released or the process ends: a cancelled
    or refused run leaves no file behind). Memory then holds only the pages being read or written (issue 26:
    image windows, and the image features of studies of hundreds of thousands of units)."""
    import tempfile

    size = int(np.prod(shape)) * 4
    if size <= memory_mb * 2 ** 20:
        return np.zeros(shape, dtype=np.float32)
    with tempfile.TemporaryFile(prefix=prefix) as handle:   # the mapping keeps its own descriptor
        handle.truncate(size)      # a sparse file of zeros
        return np.memmap(handle, dtype=np.float32, mode="r+", shape=tuple(shape))


def window_store(shape, memory_mb=None):
    """float32_store for image windows, with the windows' budget (default WINDOW_MEMORY_MB)."""
    return float32_store(shape, WINDOW_MEMORY_MB if memory_mb is None else memory_mb, "geocate-windows-")


def resize_matrix(size_in, size_out):
    """(size_out, size_in) weights that resize one axis of a window: area averaging when shrinking (each output
    pixel is the mean of the input pixels it covers, in proportion to the overlap), linear interpolation between
    pixel centres when enlarging. ``M @ window @ M.T`` resizes a (size_in, size_in) window."""
    size_in, size_out = int(size_in), int(size_out)
    weights = np.zeros((size_out, size_in))
    if size_out <= size_in:
        ratio = size_in / size_out
        for i in range(size_out):
            low, high = i * ratio, (i + 1) * ratio
            for j in range(int(np.floor(low)), min(int(np.ceil(high)), size_in)):
                weights[i, j] = (min(high, j + 1) - max(low, j)) / ratio
    else:
        centres = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        below = np.floor(centres).astype(int)
        above = np.minimum(below + 1, size_in - 1)
        fraction = centres - below
        weights[np.arange(size_out), below] += 1 - fraction
        weights[np.arange(size_out), above] += fraction
    return weights


def _check_bands(bands, info):
    if bands is None or len(bands) == 0:
        return tuple(range(1, info.band_count + 1))
    bands = tuple(int(b) for b in bands)
    wrong = [b for b in bands if b < 1 or b > info.band_count]
    if wrong:
        raise GeoCateError(
            f"Band(s) {wrong} do not exist: the raster has {info.band_count} band(s).",
            f"Choose bands between 1 and {info.band_count}, or leave BANDS empty for all.",
        )
    return bands


def rgb_bands(raster_path, bands=None):
    """1-based (red, green, blue) band numbers for showing the imagery in natural colour, or None (grey).

    Taken from the raster's colour interpretation, else from band descriptions
    that name the colour ("B4 red"), else the first three of ``bands`` (the
    user's choice, in the order given; default all bands) read as red, green,
    blue. Among ``bands`` only when given.
    """
    from osgeo import gdal

    dataset = gdal.Open(raster_path)
    candidates = list(bands) if bands else list(range(1, dataset.RasterCount + 1))
    if len(candidates) < 3:
        return None
    by_interpretation = {dataset.GetRasterBand(b).GetColorInterpretation(): b for b in candidates}
    wanted = (gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand)
    if all(c in by_interpretation for c in wanted):
        return tuple(by_interpretation[c] for c in wanted)
    by_name = {}
    for b in candidates:
        words = (dataset.GetRasterBand(b).GetDescription() or "").lower().replace("_", " ").split()
        for colour in ("red", "green", "blue"):
            if colour in words:
                by_name.setdefault(colour, b)
    if len(by_name) == 3:
        return by_name["red"], by_name["green"], by_name["blue"]
    return tuple(candidates[:3])

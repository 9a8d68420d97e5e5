"""Maps of effects and clusters over whole rasters: a grid of map cells, the pure per-tile function, streaming.

A **map cell** is a ``stride`` x ``stride`` block of the first raster's
pixels; its window (``window`` pixels, and every scale and date of the fitted
feature pipeline) is centred on the cell's centre, exactly as a unit's window
is centred on the unit's pixel, so a cell centred on a trial unit sees that
unit's window. The map is computed tile by tile (``TILE_CELLS`` x
``TILE_CELLS`` cells): each tile's windows are read through
core.represent.WindowSource (one GDAL read per window and view), embedded by
the study's fitted FeaturePipeline and predicted by the fitted model, so
memory is bounded by one tile whatever the raster's size: about
TILE_CELLS^2 x (views x dates x bands x window^2 x 4 bytes + features x 8
bytes), 150 MB for 33-px windows of 3 bands and 512 features, plus the
output GeoTIFF's block cache. :func:`predict_tile` is pure (a MapSpec and a
tile in, arrays out), so it runs in-process or on a Dask cluster unchanged
(:func:`run_map`).

Support: each cell's image features (standardised as the trial's) are
projected on the trial's leading principal components; its distance to the
nearest trial unit is divided by the 95th percentile of the trial units'
distances to their nearest other unit. ``support`` <= 1 means the cell's
imagery looks like some trial unit's as much as trial units look like each
other; above 1 the map extrapolates (SUPPORT_THRESHOLD).
"""

import contextlib
import dataclasses
import functools
import os

import numpy as np

from .errors import Cancelled, GeoCateError
from .patches import raster_info

TILE_CELLS = 32
SUPPORT_THRESHOLD = 1.0
SUPPORT_COMPONENTS = 10
NODATA = -9999.0
#: Seconds to wait for a Dask scheduler before saying it cannot be reached.
DASK_CONNECT_TIMEOUT = 30


@dataclasses.dataclass(frozen=True)
class MapGrid:
    """Map cells over the first raster: cell (i, j) covers pixels [col0 + j stride, col0 + (j + 1) stride) x
    [row0 + i stride, ...); the output raster has one pixel per cell."""

    raster_path: str
    crs_wkt: str
    geotransform: tuple
    window: int
    stride: int
    col0: int
    row0: int
    n_cols: int
    n_rows: int

    @property
    def map_geotransform(self):
        gt = self.geotransform
        return (gt[0] + self.col0 * gt[1], self.stride * gt[1], 0.0, gt[3] + self.row0 * gt[5], 0.0,
                self.stride * gt[5])

    def centres(self, rows, cols):
        """Coordinates (n, 2), in the raster's CRS, of the centre pixel of cells (rows, cols): the pixel a unit's
        window would be centred on."""
        gt = self.geotransform
        col = self.col0 + np.asarray(cols) * self.stride + self.stride // 2
        row = self.row0 + np.asarray(rows) * self.stride + self.stride // 2
        return np.column_stack([gt[0] + (col + 0.5) * gt[1], gt[3] + (row + 0.5) * gt[5]])

    def tiles(self, size=TILE_CELLS):
        """(row_start, row_stop, col_start, col_stop) of each tile of at most size x size cells, row by row."""
        return [(r, min(r + size, self.n_rows), c, min(c + size, self.n_cols))
                for r in range(0, self.n_rows, size) for c in range(0, self.n_cols, size)]


def map_grid(raster_path, window, stride=None, extent=None):
    """The grid of map cells over ``raster_path`` within ``extent`` ((xmin, ymin, xmax, ymax) in the raster's CRS;
    default the whole raster). Raises GeoCateError for a stride below 1, a rotated raster, an extent that misses
    the raster, or one too small for a single cell."""
    info = raster_info(raster_path)
    stride = int(window if stride is None else stride)
    if stride < 1:
        raise GeoCateError(f"The stride must be at least 1 pixel (got {stride}).",
                           f"Set STRIDE to a positive number of pixels, e.g. the window size ({window}).")
    gt = info.geotransform
    if gt[2] or gt[4]:
        raise GeoCateError(f"The raster '{raster_path}' is rotated; maps need a north-up raster.",
                           "Warp it to a north-up grid first (Raster > Projections > Warp).")
    col_lo, col_hi, row_lo, row_hi = 0, info.width, 0, info.height
    if extent is not None:
        xmin, ymin, xmax, ymax = extent
        cols = sorted(((xmin - gt[0]) / gt[1], (xmax - gt[0]) / gt[1]))
        rows = sorted(((ymax - gt[3]) / gt[5], (ymin - gt[3]) / gt[5]))
        col_lo, col_hi = max(int(np.floor(cols[0])), 0), min(int(np.ceil(cols[1])), info.width)
        row_lo, row_hi = max(int(np.floor(rows[0])), 0), min(int(np.ceil(rows[1])), info.height)
        if col_lo >= col_hi or row_lo >= row_hi:
            raise GeoCateError("The extent does not overlap the raster.",
                               "Choose an extent over the imagery (e.g. the raster's own, the default).")
    n_cols, n_rows = (col_hi - col_lo) // stride, (row_hi - row_lo) // stride
    if n_cols < 1 or n_rows < 1:
        raise GeoCateError(f"The extent holds {col_hi - col_lo} x {row_hi - row_lo} pixels: less than one map cell "
                           f"of {stride} pixels.", "Choose a larger extent or a smaller STRIDE.")
    return MapGrid(str(raster_path), info.crs_wkt, tuple(gt), int(window), stride, col_lo, row_lo, n_cols, n_rows)


def mask_cells(grid, polygons_wkt):
    """(n_rows, n_cols) bool: map cells whose centre lies inside any of the polygons (WKT in the raster's CRS),
    rasterised with GDAL onto the map grid."""
    from osgeo import gdal, ogr, osr

    srs = osr.SpatialReference()
    srs.ImportFromWkt(grid.crs_wkt)
    source = ogr.GetDriverByName("Memory").CreateDataSource("mask")
    layer = source.CreateLayer("mask", srs, ogr.wkbUnknown)
    for wkt in polygons_wkt:
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
        layer.CreateFeature(feature)
    target = gdal.GetDriverByName("MEM").Create("", grid.n_cols, grid.n_rows, 1, gdal.GDT_Byte)
    target.SetGeoTransform(grid.map_geotransform)
    target.SetProjection(grid.crs_wkt)
    gdal.RasterizeLayer(target, [1], layer, burn_values=[1])
    cells = target.ReadAsArray().astype(bool)
    if not cells.any():
        raise GeoCateError("The mask covers no map cell of the extent.",
                           "Check that the mask polygons lie over the imagery, or map without a mask.")
    return cells


class SupportScore:
    """How far a cell's imagery lies from the trial units' (see the module docstring). Fit on the trial's
    standardised image features; ``score(x)`` <= 1 inside the support."""

    def fit(self, features):
        from scipy.spatial import cKDTree
        from sklearn.decomposition import PCA

        features = np.asarray(features, float)
        k = int(min(SUPPORT_COMPONENTS, features.shape[1], max(len(features) - 1, 1)))
        self.pca_ = PCA(n_components=k, random_state=0).fit(features)
        projected = self.pca_.transform(features)
        self.tree_ = cKDTree(projected)
        nearest_other = self.tree_.query(projected, k=2)[0][:, 1]
        self.reference_ = float(np.quantile(nearest_other, 0.95)) or 1.0
        return self

    def score(self, features):
        return self.tree_.query(self.pca_.transform(np.asarray(features, float)), k=1)[0] / self.reference_


@dataclasses.dataclass
class MapSpec:
    """Everything a tile needs, picklable for Dask workers: the grid, how windows are read (rasters of every date,
    bands, scales, nodata), the fitted feature pipeline, the standardisation of its features, the fitted model
    (``method`` "forest": core.learners.FoldForests, the fold forests with their calibrations; "clusters": a
    core.clusters.ClusterFit with its cluster effects; "onnx": a saved cluster model: {"path", "n_clusters", "effects", "covariate_means"}), the
    support score and an optional mask ((n_rows, n_cols) bool over the grid: cells to map, mask_cells)."""

    grid: MapGrid
    raster_paths: tuple
    bands: object
    scales: tuple
    nodata: object
    pipeline: object
    feature_mean: object
    feature_sd: object
    method: str
    model: object
    support: object = None
    mask: object = None
    covariates: object = None  # (p,) covariates the cluster model sees at every cell (standardised: zeros)
    treat_cut: object = None  # forest: a "treat" band, 1 where cate >= treat_cut (inside the support), core.plan
    treat_outside_support: bool = False  # the treat band may choose cells outside the trial's support

    def band_names(self):
        if self.method == "forest":
            return ["cate", "cate_se", "support"] + (["treat"] if self.treat_cut is not None else [])
        k = self.n_clusters()
        return [f"p_{j + 1}" for j in range(k)] + ["cluster", "cate"] + (["support"] if self.support else [])

    def n_clusters(self):
        if self.method == "onnx":
            return int(self.model["n_clusters"])
        return int(self.model.n_clusters)


def _onnx_model(path):
    """A saved cluster model, opened (and its digest checked) once per process and file version, not per tile."""
    def version(file):
        stat = os.stat(file) if os.path.exists(file) else None
        return (stat.st_mtime_ns, stat.st_size) if stat else None

    return _opened_model(path, version(path), version(path + ".json"))   # the description is part of the model


@functools.lru_cache(maxsize=4)
def _opened_model(path, model_version, description_version):
    from .clusters import OnnxClusterModel

    return OnnxClusterModel(path)


def predict_tile(spec, tile):
    """The pure per-tile function: (row_start, row_stop, col_start, col_stop) -> (bands, rows, cols) float32 with
    NODATA where a cell's window is unusable or outside the mask. Runs in-process or on a Dask worker."""
    r0, r1, c0, c1 = tile
    rows, cols = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    inside = np.ones(len(rows), bool) if spec.mask is None else np.asarray(spec.mask, bool)[rows, cols]
    out = predict_at(spec, spec.grid.centres(rows, cols), spec.grid.crs_wkt, inside)
    return out.reshape(len(out), r1 - r0, c1 - c0)


def predict_at(spec, centres, crs_wkt, inside=None):
    """The model of ``spec`` at points ``centres`` (in ``crs_wkt``): (bands, n) float32, NODATA where a point's
    window is unusable or not ``inside``. A map tile's cells, or targeting's candidate units (core.plan)."""
    from .represent import WindowSource

    centres = np.asarray(centres, float).reshape(-1, 2)
    n_bands = len(spec.band_names())
    out = np.full((n_bands, len(centres)), NODATA, dtype=np.float32)
    inside = np.ones(len(centres), bool) if inside is None else np.asarray(inside, bool)
    if inside.any():
        if spec.method == "onnx":
            probabilities, ok = _onnx_tile(spec, centres, inside)
            features = None
        else:
            source = WindowSource(spec.raster_paths, centres[inside], crs_wkt, spec.bands, spec.grid.window,
                                  spec.scales, spec.nodata)
            views, _, ok_inside, _ = source.read()
            ok = np.zeros(len(centres), bool)
            ok[inside] = ok_inside
            features = None
            if ok_inside.any():
                raw = spec.pipeline.transform(views, np.flatnonzero(ok_inside))
                features = (raw - spec.feature_mean) / spec.feature_sd
        if ok.any():
            if spec.method == "forest":   # the estimator's own effect at new points (core.learners.FoldForests)
                out[0, ok], out[1, ok] = spec.model.effect_and_se(features)
            else:
                if spec.method == "clusters":   # the cluster model's own probabilities and effect (ClusterFit)
                    covariates = np.zeros((len(features), 0)) if spec.covariates is None else \
                        np.tile(spec.covariates, (len(features), 1))
                    probabilities = spec.model.probabilities(features, covariates)
                    effect = spec.model.effect_of(probabilities)
                else:
                    effect = probabilities @ np.asarray(spec.model["effects"])
                k = probabilities.shape[1]
                out[:k, ok] = probabilities.T
                out[k, ok] = probabilities.argmax(axis=1) + 1
                out[k + 1, ok] = effect
            if spec.support is not None and features is not None:
                out[2 if spec.method == "forest" else n_bands - 1, ok] = spec.support.score(features)
            if spec.method == "forest" and spec.treat_cut is not None:
                chosen = out[0, ok] >= spec.treat_cut
                if not spec.treat_outside_support:
                    chosen &= out[2, ok] <= SUPPORT_THRESHOLD
                out[3, ok] = chosen
    return out


def _onnx_tile(spec, centres, inside):
    """Cluster probabilities of a saved ONNX cluster model at the cells: raw windows in, as the model was made."""
    from .patches import extract_patches

    model = _onnx_model(spec.model["path"])
    found = extract_patches(spec.raster_paths[0], centres[inside], spec.grid.crs_wkt, spec.bands, spec.grid.window,
                            spec.nodata)
    ok = np.zeros(len(centres), bool)
    ok[inside] = found.ok
    probabilities = np.empty((0, spec.n_clusters()))
    if found.ok.any():
        covariates = np.tile(np.asarray(spec.model["covariate_means"], np.float32), (int(found.ok.sum()), 1))
        probabilities = model.probabilities(found.patches[found.ok], covariates)
    return probabilities, ok


@contextlib.contextmanager
def gdal_writing():
    """GDAL's errors while the map is written (a full disk, a removed folder) as a message with the fix."""
    try:
        yield
    except (RuntimeError, OSError) as error:
        raise GeoCateError(f"Writing the map failed ({error}).",
                           "Is the disk full, or the folder removable? Free some space or choose another folder; "
                           "nothing was written.") from None


def run_map(spec, path, scheduler=None, progress=None, is_cancelled=None, tile_cells=TILE_CELLS):
    """Compute every tile of ``spec`` and write the map to ``path`` (a Cloud-Optimized GeoTIFF with overviews,
    band descriptions from spec.band_names(), nodata NODATA). Tiles stream into a temporary tiled GeoTIFF beside
    ``path`` as they finish (in-process, or on the Dask cluster at ``scheduler``: the same predict_tile), then
    the COG is written and moved into place; a cancelled or failed run leaves neither. Returns a summary dict."""
    from osgeo import gdal

    gdal.UseExceptions()
    grid = spec.grid
    names = spec.band_names()
    tiles = grid.tiles(tile_cells)
    scratch = f"{path}.tiles-{os.getpid()}.tif"
    cog = f"{path}.cog-{os.getpid()}.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(scratch, grid.n_cols, grid.n_rows, len(names), gdal.GDT_Float32,
                                                   options=["TILED=YES", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER"])
    dataset.SetGeoTransform(grid.map_geotransform)
    dataset.SetProjection(grid.crs_wkt)
    for b, name in enumerate(names):
        band = dataset.GetRasterBand(b + 1)
        band.SetDescription(name)
        band.SetNoDataValue(NODATA)
    counts = {"cells": 0, "usable": 0, "outside_support": 0}

    def write(tile, block):
        r0, r1, c0, c1 = tile
        with gdal_writing():
            for b in range(block.shape[0]):
                dataset.GetRasterBand(b + 1).WriteArray(block[b], c0, r0)
        usable = block[0] != NODATA
        counts["cells"] += block[0].size
        counts["usable"] += int(usable.sum())
        if "support" in names:
            counts["outside_support"] += int((block[names.index("support")][usable] > SUPPORT_THRESHOLD).sum())
        if "treat" in names:   # cells chosen, and cells the cut-off would choose but the support excluded
            counts["treat"] = counts.get("treat", 0) + int((block[names.index("treat")][usable] == 1).sum())
            reached = (block[0][usable] >= spec.treat_cut) & (block[names.index("support")][usable] > SUPPORT_THRESHOLD)
            counts["treat_outside_support"] = counts.get("treat_outside_support", 0) + int(reached.sum())

    try:
        if scheduler:
            _run_on_dask(spec, tiles, write, scheduler, progress, is_cancelled)
        else:
            for done, tile in enumerate(tiles):
                if is_cancelled is not None and is_cancelled():
                    raise Cancelled()
                write(tile, predict_tile(spec, tile))
                if progress is not None:
                    progress((done + 1) / len(tiles), f"Map: tile {done + 1} of {len(tiles)}")
        if counts["usable"] == 0:
            raise GeoCateError(
                f"No map cell of the {grid.n_rows} x {grid.n_cols} cells has a usable image window: the raster holds "
                "only nodata (or windows crossing its edge) in the area mapped.",
                "Check the raster's nodata value and the extent or mask; map an area with imagery.")
        with gdal_writing():
            dataset.FlushCache()
            dataset = None
            gdal.Translate(cog, scratch, format="COG", creationOptions=["COMPRESS=DEFLATE", "OVERVIEWS=AUTO",
                                                                         "RESAMPLING=NEAREST", "BIGTIFF=IF_SAFER"])
            os.replace(cog, path)
    finally:
        dataset = None
        for leftover in (scratch, cog):
            if os.path.exists(leftover):
                os.remove(leftover)
    counts["share_outside_support"] = counts["outside_support"] / max(counts["usable"], 1)
    counts.update(bands=names, n_rows=grid.n_rows, n_cols=grid.n_cols, stride=grid.stride, tiles=len(tiles))
    return counts


def check_dask_scheduler(address, timeout=5.0):
    """Before any work: ``address`` answers as a Dask scheduler does, within ``timeout`` seconds.

    A Dask scheduler greets a new connection first, with a frame whose 8-byte length is small. Something else
    (a web server, SSH) either says nothing (Dask's own client then waited for ever) or sends text whose first
    bytes read as an enormous length (Dask then tried to allocate exabytes). Only tcp:// addresses are probed;
    others are checked when the client connects."""
    import socket
    import struct
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else "tcp://" + address)
    fix = ("Give the address of a running Dask scheduler (e.g. tcp://10.0.0.5:8786), or leave DASK_SCHEDULER "
           "empty to map on this machine.")
    if parts.scheme != "tcp":
        return
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise GeoCateError(f"'{address}' is not a Dask scheduler address (host and port).", fix)
    head = b""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as error:   # refused, unknown host, or no answer to the connection itself (a timeout)
        raise GeoCateError(f"The Dask scheduler at '{address}' cannot be reached ({error.__class__.__name__}: "
                           f"{error}).", fix) from None
    try:
        with sock:
            sock.settimeout(timeout)
            while len(head) < 8:
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        if not head:
            raise GeoCateError(f"'{address}' accepted the connection but did not greet as a Dask scheduler does "
                               f"within {timeout:g} s: it is not a Dask scheduler.", fix) from None
    except OSError as error:
        raise GeoCateError(f"The connection to '{address}' failed ({error.__class__.__name__}: {error}).",
                           fix) from None
    if len(head) < 8 or not 0 < struct.unpack("<Q", head)[0] < (1 << 24):
        raise GeoCateError(f"'{address}' answered, but not as a Dask scheduler does: it is something else.", fix)


def _run_on_dask(spec, tiles, write, scheduler, progress=None, is_cancelled=None):
    """predict_tile on a Dask cluster (``scheduler``: an address, or a distributed.Client), results written here
    as they arrive; cancelling cancels the futures."""
    from .errors import require

    distributed = require("distributed", "dask[distributed]==2026.8.0")
    if isinstance(scheduler, distributed.Client):
        client = scheduler
    else:
        try:
            client = distributed.Client(scheduler, timeout=DASK_CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as error:
            raise GeoCateError(
                f"The Dask scheduler at '{scheduler}' cannot be reached ({error.__class__.__name__}: {error}).",
                "Check the address (e.g. tcp://10.0.0.5:8786) and that the scheduler runs, or leave DASK_SCHEDULER "
                "empty to map on this machine.") from None
    try:
        shared = client.scatter(spec, broadcast=True)
        futures = {client.submit(predict_tile, shared, tile, pure=False): tile for tile in tiles}
        for done, future in enumerate(distributed.as_completed(futures)):
            if is_cancelled is not None and is_cancelled():
                client.cancel(list(futures))
                raise Cancelled()
            write(futures[future], future.result())
            if progress is not None:
                progress((done + 1) / len(tiles), f"Map: tile {done + 1} of {len(tiles)} (Dask)")
    finally:
        if client is not scheduler:
            client.close()


METHODS = ("forest", "clusters")


def forest_model(learner):
    """A fitted CrossFittedCausalForest as a MapSpec's "forest" model: its effect at new points (FoldForests).
    Tiles are the unit of parallel work (Dask workers); inside a tile of 1024 cells joblib's threads cost more
    than they give (0.23 s per tile on one thread, 0.37 s with two, bench_maps.py machine): one thread each."""
    return learner.effect_model(n_jobs=1)


def forest_spec(grid, study, features, feature_pipeline, learner, nodata=None, mask=None, treat_cut=None,
                treat_outside_support=False):
    """The MapSpec of a cross-fitted forest fitted on ``study``'s used units with image ``features`` alone as its
    effect modifiers (map_effects; core.plan for targeting's candidates and map); ``grid`` may be None when
    only points are predicted (predict_at)."""
    from .clusters import feature_scaling

    mean, sd = feature_scaling(features)
    source = study.source
    return MapSpec(grid=grid, raster_paths=source.raster_paths, bands=source.bands, scales=source.scales,
                   nodata=nodata, pipeline=feature_pipeline, feature_mean=mean, feature_sd=sd, method="forest",
                   model=forest_model(learner), support=SupportScore().fit((features - mean) / sd), mask=mask,
                   treat_cut=treat_cut, treat_outside_support=treat_outside_support)


def map_effects(units, raster_path, path, bands=None, window_size_px=33, nodata=None, seed=42, imagery=None,
                method="forest", stride=None, extent=None, mask=None, scheduler=None, n_folds=5, n_estimators=100,
                n_clusters=0, max_clusters=4, epochs=300, device="auto", spatial_block=0, progress=None,
                is_cancelled=None, study_design=None):
    """Fit on the trial units and map predicted effects (or clusters) over the raster: the job of geocate:mapeffects.

    method "forest": the cross-fitted causal forest of estimate_cate with the
    image features as the only effect modifiers (no covariates exist where no
    trial ran; covariates still enter the outcome models); a cell's CATE is the
    mean of the fold forests' calibrated predictions, its SE the root of their
    mean variance, the same model (CrossFittedCausalForest.effect) that gives a
    trial unit at that place the same value. method "clusters": the cluster
    model of find_clusters, fit on all units, at average covariates; the map
    holds p_1..p_K, the most likely cluster and sum_k p_k tau_k. The forest follows the trial's design as
    estimate_cate does (core.pipeline.trial_design: strata, known probabilities, ``study_design``). Every cell gets
    a support score (SupportScore). Returns (study, summary, unit_cate) where
    unit_cate is the units' out-of-fold CATE (forest) or probabilities (clusters).
    """
    from .clusters import feature_scaling
    from .inputs import outcome_inputs, propensity_inputs
    from .learners import default_learner
    from .pipeline import find_clusters, prepare_study, trial_design
    from .progress import stage
    from .represent import ImageryOptions

    if method not in METHODS:
        raise GeoCateError(f"Unknown method '{method}'.", f"Choose one of {', '.join(METHODS)}.")
    imagery = imagery or ImageryOptions()
    grid = map_grid(raster_path, window_size_px, stride, extent)
    cells = mask_cells(grid, mask) if mask else None
    if method == "forest":
        feature_pipeline = imagery.pipeline(seed=seed, device=device)
        prepared = prepare_study(units, raster_path, bands, window_size_px, nodata, feature_pipeline, imagery,
                                 spatial_block, stage(progress, 0.0, 0.1), is_cancelled)
        study, features, feature_pipeline, groups = (prepared.study, prepared.features, prepared.pipeline,
                                                     prepared.groups)
        used = study.used
        covariates = study.covariates[used] if study.covariates.shape[1] else None
        design, _, learner = default_learner(features, None, n_folds=n_folds, n_estimators=n_estimators, seed=seed)
        trial = trial_design(study, propensity_inputs(features, covariates), outcome_inputs(features, covariates, seed),
                             groups, n_folds, seed, study_design)   # strata, known or estimated propensities
        learner.fit(study.outcome[used], study.treated[used].astype(int), design, groups=groups,
                    outcome_inputs=trial.inputs, folds=trial.folds, progress=stage(progress, 0.1, 0.3),
                    is_cancelled=is_cancelled, propensity=trial.propensity)
        model, fitted, unit_values = forest_model(learner), None, learner.cate_
    else:
        study, result, extras = find_clusters(units, raster_path, bands, window_size_px, nodata, seed, n_clusters,
                                              max_clusters, epochs, device, n_folds, spatial_block,
                                              stage(progress, 0.0, 0.3), is_cancelled, imagery=imagery)
        features, feature_pipeline, fitted = extras["features"], extras["pipeline"], extras["fit"]
        model, unit_values = fitted, result.probabilities[study.used]
        cluster_table = [list(row) for row in extras["clusters"]]
    mean, sd = feature_scaling(features)
    standardised = (features - mean) / sd
    source = study.source
    spec = MapSpec(grid=grid, raster_paths=source.raster_paths, bands=source.bands, scales=source.scales,
                   nodata=nodata, pipeline=feature_pipeline, feature_mean=mean, feature_sd=sd,
                   method=method, model=model, support=SupportScore().fit(standardised), mask=cells,
                   covariates=None if fitted is None or not study.covariates.shape[1] else
                   np.zeros(study.covariates.shape[1]))
    summary = run_map(spec, path, scheduler, stage(progress, 0.3, 1.0), is_cancelled)
    summary.update(method=method, window_size_px=int(window_size_px), feature_pipeline=feature_pipeline.describe(),
                   support_threshold=SUPPORT_THRESHOLD, support_reference=spec.support.reference_,
                   n_units=int(study.n_used), device=feature_pipeline.device_,
                   unit_support=spec.support.score(standardised).tolist())
    if method != "forest":   # (cluster, effect, ci_low, ci_high, share, ...) per cluster: the map's legend
        summary["clusters"] = cluster_table
    return study, summary, unit_values, spec


def apply_cluster_model(model_path, raster_path, path, extent=None, mask=None, stride=None, scheduler=None,
                        progress=None, is_cancelled=None):
    """Map a saved cluster model (geocate:imageclusters' .onnx and its .json) over any raster: the job of
    geocate:applyclusters. The model's bands and window are read from its description and checked against the
    raster; cells get p_1..p_K, the most likely cluster and sum_k p_k tau_k, at the trial's mean covariates.
    Returns the run_map summary."""
    model = _onnx_model(str(model_path))   # checks the file, its description and digest
    description = model.description
    info = raster_info(raster_path)
    bands = description.get("bands_used") or list(range(1, int(description["bands"]) + 1))
    if max(bands) > info.band_count or len(bands) != int(description["bands"]):
        raise GeoCateError(
            f"The model reads band(s) {list(bands)}, but the raster '{raster_path}' has {info.band_count}.",
            "Apply it to imagery with the same bands as the imagery it was made from.")
    window = int(description["window_size_px"])
    made_at = description.get("pixel_size_m")   # models written before GeoCATE stored it are not checked
    if made_at and abs(info.pixel_size_m / made_at - 1) > 0.05:
        raise GeoCateError(
            f"The model was made from imagery of {made_at:g} m pixels, but '{raster_path}' has "
            f"{info.pixel_size_m:g} m pixels: its {window}-pixel windows would cover "
            f"{info.pixel_size_m / made_at:.2f} times the ground they were trained on.",
            f"Resample the raster to {made_at:g} m (Raster > Projections > Warp, 'Output file resolution'), or "
            "make a model from imagery of this resolution.")
    if window > min(info.width, info.height):
        raise GeoCateError(f"The model's window ({window} px) is larger than the raster ({info.width} x "
                           f"{info.height} pixels).", "Apply it to a larger raster.")
    if "covariate_means" not in description and int(description["n_covariates"]):
        raise GeoCateError("The model's description lacks the covariates' means it needs for a map.",
                           "Run 'Find effect clusters in imagery' again to write a new model.")
    grid = map_grid(raster_path, window, stride, extent)
    spec = MapSpec(grid=grid, raster_paths=(str(raster_path),), bands=tuple(bands), scales=(window,), nodata=None,
                   pipeline=None, feature_mean=None, feature_sd=None, method="onnx",
                   model={"path": str(model_path), "n_clusters": len(description["clusters"]),
                          "effects": [row[1] for row in description["clusters"]],
                          "covariate_means": description.get("covariate_means", [])},
                   mask=mask_cells(grid, mask) if mask else None)
    summary = run_map(spec, path, scheduler, progress, is_cancelled)
    summary.update(method="saved cluster model", model=str(model_path), provider=model.provider,
                   window_size_px=window, clusters=description["clusters"])
    return summary

"""Views of each unit's surroundings, their representations, and the one fitted feature pipeline.

A **view** is a stack of windows around every unit, of shape (units, time
steps, bands, height, width), with the units whose windows are usable at every
date (``ok``) and the ground size of its pixels in metres. The base view is the
``window_size_px`` window; a wider **scale** is read at full resolution around
the same pixel, checked for nodata there, then averaged down to the base
window's pixel count, so the context costs no more to embed than the unit
itself (Rolf et al.'s MOSAIKS and the multi-scale concatenation of "Optimizing
Multi-Scale Representations to Detect Effect Heterogeneity", CLeaR 2025). More
**dates** (rasters in time order, on any grid or CRS) are read at the unit's
location over the same ground footprint.

A **representation** has ``fit`` / ``transform`` / ``describe``: random
convolution features (MOSAIKS, the default, core.embed) or an ONNX encoder
(core.encoders). The **FeaturePipeline** fits one representation per view on
the used units' windows (every date pooled), embeds every date, pools over time
(``concatenate``: random convolutions see the dates' bands stacked as the
channels of one window, so a filter can respond to change; an encoder's
embeddings of each date are concatenated; ``difference``: mean over time and
mean first difference; ``variance``: mean and variance over time, as
causalimages' ``temporalAggregation``) and concatenates the views. Its output is on the
modelling scale (log1p of MOSAIKS features; an encoder's embeddings as they
come), ready for the forest's standardisation (inputs.design_matrix). It is
fit once per run, stored with the result, and reused unchanged by the forest,
the cluster model and the evaluation.
"""

import dataclasses
import hashlib
import json
import os
import pickle
import time

import numpy as np

from .embed import BandScaler, RandomConvFeatures
from .errors import GeoCateError
from .patches import WINDOW_MEMORY_MB, extract_patches, float32_store, raster_info, window_store

#: The representation's filters and band scaling are fit on at most this many used windows (per date).
FIT_WINDOWS = 5000
#: Random convolution features larger than this in double precision are kept in single precision in a
#: memory-mapped temporary file (issue 26: 4.1 GB in double at a million units, beside the forest's design matrix
#: of the same size). Smaller ones stay in memory in double, so their numbers are the same as before.
FEATURE_MEMORY_MB = 1024
#: Rows of the feature store taken through the logarithm at a time.
FEATURE_BLOCK = 65536
POOLINGS = ("concatenate", "difference", "variance")
#: Version of what a cached entry holds; bump it when the features for the same key would change.
CACHE_VERSION = 2   # 2: features beyond FEATURE_MEMORY_MB are float32 (issue 26)


@dataclasses.dataclass(frozen=True)
class View:
    """One view of every unit: windows (n, t, bands, h, w) float32 (zeros where not ok), ok (n,) usable at every
    date, reason (n,) why not ("" where ok, else a core.patches code and where: "edge", "edge@161 px",
    "nodata@date 2"), pixel_size_m of the windows' pixels after averaging, footprint_m the window's side on the
    ground, size_px its side in pixels of the first date's raster, dates the raster of each time step."""

    name: str
    windows: np.ndarray
    ok: np.ndarray
    reason: np.ndarray
    pixel_size_m: float
    footprint_m: float
    size_px: int
    dates: tuple


def parse_scales(scales, window_size_px):
    """SCALES ("33,161", a list, or None) -> sorted window sizes in pixels, the base window first.

    Every scale must be a whole number of pixels at least as large as the base window."""
    if scales is None or (isinstance(scales, str) and not scales.strip()):
        return (int(window_size_px),)
    items = scales.replace(";", ",").split(",") if isinstance(scales, str) else list(scales)
    sizes = set()
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or value != int(value) or value < 1:
            raise GeoCateError(f"The scale '{text}' is not a window size in whole pixels.",
                               "Give SCALES as window sizes in pixels separated by commas, e.g. 33,161.")
        if value < window_size_px:
            raise GeoCateError(
                f"The scale {int(value)} px is smaller than the window ({window_size_px} px): scales add wider "
                "context around the unit's own window.",
                f"Give scales of at least {window_size_px} pixels, e.g. {window_size_px},{5 * window_size_px}.")
        sizes.add(int(value))
    sizes.add(int(window_size_px))
    return (int(window_size_px),) + tuple(sorted(sizes - {int(window_size_px)}))


class WindowSource:
    """Where a study's views come from: rasters (one per date, the first is RASTER), the units' coordinates, the
    bands, the base window and the scales. ``read`` returns the views; ``identity`` is what a cache keys on (each
    raster's path, size and modification time, so a changed file is read again). memory_mb: the windows beyond
    this many MB are kept in a memory-mapped file (core.patches.window_store; default WINDOW_MEMORY_MB)."""

    def __init__(self, raster_paths, xy, crs_wkt, bands=None, window_size_px=33, scales=None, nodata=None,
                 memory_mb=None):
        self.raster_paths = tuple(str(p) for p in ([raster_paths] if isinstance(raster_paths, str) else raster_paths))
        self.xy = np.asarray(xy, float).reshape(-1, 2)
        self.crs_wkt = crs_wkt
        self.bands = None if not bands else tuple(int(b) for b in bands)
        self.window_size_px = int(window_size_px)
        self.scales = parse_scales(scales, self.window_size_px)
        self.nodata = nodata
        self.memory_mb = memory_mb
        self.infos = [raster_info(p) for p in self.raster_paths]
        base = self.infos[0]
        wanted = self.bands or tuple(range(1, base.band_count + 1))
        for info in self.infos[1:]:
            if max(wanted) > info.band_count or (not self.bands and info.band_count != base.band_count):
                raise GeoCateError(
                    f"The raster '{info.path}' has {info.band_count} band(s), but the first date "
                    f"'{base.path}' has {base.band_count}" + (f" and bands {list(self.bands)} were chosen."
                                                              if self.bands else "."),
                    "Give rasters of every date with the same bands, in the same order.")
        widest = max(self.scales)
        if widest > min(base.width, base.height):
            raise GeoCateError(
                f"The widest scale ({widest} px) is larger than the raster ({base.width} x {base.height} pixels).",
                f"Choose scales of at most {min(base.width, base.height)} pixels.")

    @property
    def n_dates(self):
        return len(self.raster_paths)

    def view_names(self):
        metres = self.infos[0].pixel_size_m
        return [f"{s} px ({s * metres:,.0f} m)" for s in self.scales]

    def identity(self):
        files = []
        for path in self.raster_paths:
            stat = os.stat(path) if os.path.exists(path) else None
            files.append([os.path.realpath(path), stat.st_size if stat else None,
                          stat.st_mtime_ns if stat else None])
        return {"rasters": files, "bands": self.bands, "window_size_px": self.window_size_px,
                "scales": list(self.scales), "nodata": self.nodata, "crs": self.crs_wkt,
                "xy": hashlib.sha256(np.ascontiguousarray(self.xy).tobytes()).hexdigest()}

    def _budget_mb(self):
        return WINDOW_MEMORY_MB if self.memory_mb is None else self.memory_mb

    def windows_held(self, n_units=None):
        """Where read() keeps the windows: "memory", or "a memory-mapped temporary file" when all of them (every
        view and date) are over the memory budget (core.patches.window_store's rule)."""
        n = len(self.xy) if n_units is None else n_units
        bands = len(self.bands) if self.bands else self.infos[0].band_count
        size = n * self.n_dates * bands * self.window_size_px ** 2 * 4 * len(self.scales)
        return "a memory-mapped temporary file" if size > self._budget_mb() * 2 ** 20 else "memory"

    def read(self, progress=None, is_cancelled=None):
        """(views, coords (n, 2) in the first raster's CRS, ok (n,), reason (n,)) over every view and date."""
        base = self.infos[0]
        n_reads = len(self.scales) * self.n_dates
        views, coords = [], None
        ok = np.ones(len(self.xy), bool)
        reason = np.full(len(self.xy), "", dtype=object)
        step = 0
        n, n_bands, side = len(self.xy), len(self.bands or range(base.band_count)), self.window_size_px
        for k, size in enumerate(self.scales):
            footprint = size * base.pixel_size_m
            view_ok, view_reason = np.ones(n, bool), np.full(n, "", dtype=object)
            windows = window_store((n, self.n_dates, n_bands, side, side), self._budget_mb() / len(self.scales))
            for d, (path, info) in enumerate(zip(self.raster_paths, self.infos)):
                read_px = size if d == 0 else max(int(round(footprint / info.pixel_size_m)), 1)
                stage = None if progress is None else (
                    lambda f, m="", s=step: progress((s + f) / n_reads, m))
                found = extract_patches(path, self.xy, self.crs_wkt, self.bands, read_px, self.nodata, stage,
                                        is_cancelled, output_size_px=self.window_size_px, out=windows[:, d])
                step += 1
                if coords is None:
                    coords = found.coords
                where = [w for w, show in ((f"{size} px", k > 0), (f"date {d + 1}", d > 0)) if show]
                bad = ~found.ok & view_ok
                view_reason[bad] = [r + ("@" + ", ".join(where) if where else "") for r in found.reason[bad]]
                view_ok &= found.ok
            views.append(View(name=self.view_names()[k], windows=windows, ok=view_ok, reason=view_reason.astype(str),
                              pixel_size_m=footprint / self.window_size_px, footprint_m=footprint, size_px=size,
                              dates=self.raster_paths))
            first = ~view_ok & ok
            reason[first] = view_reason[first]
            ok &= view_ok
        return views, coords, ok, reason.astype(str)


class RandomConvolutions:
    """MOSAIKS random convolution features (core.embed) behind robust band scaling; output log1p(features)."""

    kind = "random convolutions"
    #: Dates are concatenated as channels of one window: filters drawn from such stacks see every date at once,
    #: and whitening amplifies the rare directions in which dates differ, so responses can be to change.
    stacks_dates = True
    #: ZCA regulariser for stacked dates. Where nothing changed the dates' channels are equal, so the directions
    #: of change have little variance; core.embed's 1e-2 damps them, 1e-5 lets whitening amplify them. On the
    #: change trial of bench_representations.py (1000 units) R^2 of the CATE: 0.78 at 1e-2, 0.81 at 1e-3, 0.85 at
    #: 1e-4, 0.86 at 1e-5 and 1e-6 (a plateau).
    stacked_zca_eps = 1e-5

    def __init__(self, n_filters=256, seed=42, device="auto", zca_eps=1e-2):
        self.n_filters = n_filters
        self.seed = seed
        self.device = device
        self.zca_eps = zca_eps

    def params(self):
        return {"kind": self.kind, "n_filters": self.n_filters, "seed": self.seed, "zca_eps": self.zca_eps}

    def fit(self, windows):
        """windows: (m, bands, h, w) raw pixel values of used units."""
        self.scaler_ = BandScaler(seed=self.seed).fit(windows)
        self.embedder_ = RandomConvFeatures(n_filters=self.n_filters, seed=self.seed, device=self.device,
                                            zca_eps=self.zca_eps).fit(self.scaler_.transform(windows))
        return self

    @property
    def device_(self):
        return self.embedder_.device_

    def transform(self, windows, rows=None, progress=None, is_cancelled=None):
        """Windows -> log1p of the pooled responses, (n, 2 n_filters): in double precision in memory, or, beyond
        FEATURE_MEMORY_MB in double, in single precision in a memory-mapped temporary file (each block's
        logarithm taken in double, then stored). The budget is per view and date: several scales or dates are
        joined (FeaturePipeline) in memory, in single precision; features read back from the cache are in memory."""
        n = len(windows) if rows is None else len(rows)
        store = None
        if n * 2 * self.n_filters * 8 > FEATURE_MEMORY_MB * 2 ** 20:
            store = float32_store((n, 2 * self.n_filters), 0, "geocate-features-")
        features = self.embedder_.transform(windows, progress, is_cancelled, prepare=self.scaler_.transform,
                                            rows=rows, out=store)
        if store is None:
            features = features.astype(np.float64)   # the log in double, as the forest sees it
            np.maximum(features, 0, out=features)
            return np.log1p(features, out=features)
        for start in range(0, n, FEATURE_BLOCK):
            block = store[start:start + FEATURE_BLOCK].astype(np.float64)
            np.maximum(block, 0, out=block)
            store[start:start + FEATURE_BLOCK] = np.log1p(block, out=block)
        return store

    def describe(self):
        return dict(self.params(), zca_eps=self.embedder_.zca_eps, filter_size=self.embedder_.filter_size, n_features=2 * self.n_filters,
                    device=self.device_, band_scaling=self.scaler_.to_dict(), output="log1p of pooled responses")


def pool_over_time(per_date, pooling):
    """[(n, d) per date] -> (n, d') by ``pooling``: concatenate (d' = t d), difference (mean, mean first
    difference: 2 d), variance (mean, variance: 2 d)."""
    if pooling == "concatenate" or len(per_date) == 1:
        return per_date[0] if len(per_date) == 1 else np.hstack(per_date)
    stack = np.stack(per_date, axis=0)
    mean = stack.mean(axis=0)
    if pooling == "difference":
        return np.hstack([mean, np.diff(stack, axis=0).mean(axis=0)])
    return np.hstack([mean, stack.var(axis=0)])


class FeaturePipeline:
    """Band scaling -> representation -> pooling over time -> concatenation of views, fit once.

    make_representation: a callable returning a fresh unfitted representation
    (one per view); time_pooling: one of POOLINGS. ``fit_transform(views, used)``
    fits on at most FIT_WINDOWS used windows (drawn with ``seed``; every date's
    window of a drawn unit) and returns the used units' features; ``transform``
    applies the fitted pipeline to views of other windows (the same view names
    and dates), e.g. tiles of a map.
    """

    def __init__(self, make_representation, time_pooling="concatenate", seed=42, fit_windows=FIT_WINDOWS):
        if time_pooling not in POOLINGS:
            raise GeoCateError(f"Unknown time pooling '{time_pooling}'.", f"Choose one of {', '.join(POOLINGS)}.")
        self.make_representation = make_representation
        self.time_pooling = time_pooling
        self.seed = seed
        self.fit_windows = fit_windows

    def fit_transform(self, views, used, progress=None, is_cancelled=None):
        rows = np.flatnonzero(used)
        sample = rows
        if len(rows) > self.fit_windows:
            sample = np.sort(np.random.default_rng(self.seed).choice(rows, self.fit_windows, replace=False))
        n_dates = views[0].windows.shape[1]
        if n_dates < 2 and self.time_pooling != "concatenate":
            raise GeoCateError(f"Time pooling '{self.time_pooling}' needs images of at least two dates.",
                               "Add the rasters of the other dates (RASTERS_TIME), or choose 'concatenate'.")
        self.representations_, self.views_ = [], []
        for view in views:
            representation = self.make_representation()
            windows = self._windows(view, representation)[sample]
            representation.fit(windows.reshape((-1,) + windows.shape[2:]))
            del windows
            self.representations_.append(representation)
            self.views_.append({"name": view.name, "footprint_m": view.footprint_m, "size_px": view.size_px,
                                "pixel_size_m": view.pixel_size_m, "dates": list(view.dates)})
        features = self.transform(views, rows, progress, is_cancelled)
        self.n_features_ = int(features.shape[1])
        return features

    def _windows(self, view, representation):
        """(n, t, bands, h, w) windows as the representation takes them: concatenated dates as one window of t x
        bands channels (n, 1, t bands, h, w) where it stacks dates, else as they are."""
        windows = view.windows
        if self.time_pooling == "concatenate" and windows.shape[1] > 1 and getattr(representation, "stacks_dates",
                                                                                     False):
            representation.zca_eps = representation.stacked_zca_eps
            return windows.reshape((len(windows), 1, -1) + windows.shape[3:])
        return windows

    def transform(self, views, rows=None, progress=None, is_cancelled=None):
        parts = []
        n_steps = sum(v.windows.shape[1] for v in views)
        step = 0
        for view, representation in zip(views, self.representations_):
            per_date = []
            windows = self._windows(view, representation)
            for d in range(windows.shape[1]):
                stage = None if progress is None else (lambda f, m="", s=step: progress((s + f) / n_steps, m))
                per_date.append(representation.transform(windows[:, d], rows, stage, is_cancelled))
                step += 1
            parts.append(pool_over_time(per_date, self.time_pooling))
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    @property
    def device_(self):
        return getattr(self.representations_[0], "device_", "cpu")

    def describe(self):
        return {"views": self.views_, "time_pooling": self.time_pooling, "n_features": getattr(self, "n_features_", None),
                "fit_windows": self.fit_windows, "representation": [r.describe() for r in self.representations_]}

    def params(self):
        return {"representation": self.make_representation().params(), "time_pooling": self.time_pooling,
                "seed": self.seed, "fit_windows": self.fit_windows}

    def __getstate__(self):  # the factory may be a closure: a fitted pipeline needs only what it learned
        state = dict(self.__dict__)
        state.pop("make_representation", None)
        return state


class FeatureCache:
    """Features of a study's used units, on disk, keyed by what they depend on.

    The key holds the window source's identity (each raster's path, size and
    modification time; bands; window; scales; nodata; the units' coordinates),
    the representation's settings (an encoder by its SHA-256), the time pooling,
    the seed and which units are used; a changed file or setting is a new key.
    An entry holds the windows' usability, the features and the fitted pipeline
    (pickled: the cache lives in the user's own QGIS profile, written only by
    GeoCATE). Oldest entries are removed beyond ``max_bytes``.
    """

    def __init__(self, directory, max_bytes=2 * 1024 ** 3):
        self.directory = str(directory)
        self.max_bytes = max_bytes
        self.hits = 0

    @staticmethod
    def key(*parts):
        text = json.dumps([CACHE_VERSION] + list(parts), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def _path(self, key, kind):
        return os.path.join(self.directory, f"{key}.{kind}.pkl")

    def load(self, key, kind):
        path = self._path(key, kind)
        try:
            with open(path, "rb") as handle:
                value = pickle.load(handle)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, ValueError):
            return None
        self.hits += 1
        os.utime(path)
        return value

    def store(self, key, kind, value):
        try:
            os.makedirs(self.directory, exist_ok=True)
            path = self._path(key, kind)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as handle:
                pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
            self._evict()
        except OSError:  # a full or read-only cache only costs the next run time
            pass

    def _evict(self):
        entries = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(".pkl"):
                stat = os.stat(path)
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            os.remove(path)
            total -= size


def make_representation_factory(encoder=None, n_filters=256, seed=42, device="auto"):
    """ENCODER None or 'random convolutions' -> RandomConvolutions; a path to an .onnx file -> OnnxEncoder."""
    if not encoder or str(encoder).strip().lower() in ("random convolutions", "random", "mosaiks"):
        return lambda: RandomConvolutions(n_filters=n_filters, seed=seed, device=device)
    from .encoders import OnnxEncoder

    loaded = OnnxEncoder(str(encoder), device=device)  # checked once, before any window is read
    return lambda: loaded


def study_features(study, source, pipeline, cache=None, progress=None, is_cancelled=None):
    """The used units' features from the study's views through ``pipeline`` (fit here), or from the cache.

    Returns (features (n_used, d), pipeline fitted, seconds spent, cache hit?). When the study was built from
    cached window usability (study.views is None), the windows are read only on a cache miss."""
    started = time.monotonic()
    key = None
    if cache is not None:
        key = cache.key(source.identity(), pipeline.params(),
                        hashlib.sha256(np.packbits(study.used).tobytes()).hexdigest())
        hit = cache.load(key, "features")
        if hit is not None:
            return hit["features"], hit["pipeline"], time.monotonic() - started, True
    views = study.views
    if views is None:
        views = source.read(progress, is_cancelled)[0]
    features = pipeline.fit_transform(views, study.used, progress, is_cancelled)
    if cache is not None:
        # A plain array: a memory-mapped store would be pickled through a copy of all of it (2 GB at a million).
        cache.store(key, "features", {"features": np.asarray(features), "pipeline": pipeline})
    return features, pipeline, time.monotonic() - started, False


@dataclasses.dataclass(frozen=True)
class ImageryOptions:
    """How a study sees its imagery, beyond RASTER and the window: SCALES (wider windows, pixels), RASTERS_TIME
    (rasters of later dates, in time order), TIME_POOLING, ENCODER (None = random convolutions, or an ONNX file)
    and the feature cache (None: none). The default is one window at one date through random convolutions."""

    scales: object = None
    rasters_time: tuple = ()
    time_pooling: str = "concatenate"
    encoder: object = None
    cache: object = None

    def study_kwargs(self):
        return {"scales": self.scales, "rasters_time": tuple(self.rasters_time or ()), "cache": self.cache}

    def pipeline(self, n_filters=256, seed=42, device="auto"):
        """An unfitted FeaturePipeline (an ONNX encoder is opened and checked here, before any window is read)."""
        pipeline = FeaturePipeline(make_representation_factory(self.encoder, n_filters, seed, device),
                                   self.time_pooling, seed)   # refuses an unknown pooling
        if self.time_pooling != "concatenate" and not self.rasters_time:
            raise GeoCateError(f"Time pooling '{self.time_pooling}' needs images of at least two dates.",
                               "Add the rasters of the other dates (RASTERS_TIME), or choose 'concatenate'.")
        return pipeline


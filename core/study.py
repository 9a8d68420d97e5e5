"""What passes between the stages: the trial as plain arrays (Study) and the estimates (Result)."""

from dataclasses import dataclass, field

import numpy as np

from .errors import GeoCateError
from .patches import EDGE, NODATA, OUTSIDE

MIN_UNITS_PER_ARM = 20


@dataclass(frozen=True)
class UnitTable:
    """The units layer as arrays, before any check (what the provider hands over).

    xy: (n, 2) coordinates in ``crs_wkt``; treated, outcome: (n,) float with
    nan for nulls; covariates: (n, p) float with nan for nulls.
    """

    xy: np.ndarray
    crs_wkt: str
    treated: np.ndarray
    outcome: np.ndarray
    covariates: np.ndarray
    covariate_names: tuple = ()
    treatment_name: str = "treatment"
    outcome_name: str = "outcome"
    clusters: object = None  # (n,) cluster ids (e.g. a village field; None for nulls), or None: no clusters
    strata: object = None    # (n,) strata of a block-randomized trial (any labels; None for nulls), or None
    propensity: object = None  # (n,) known assignment probabilities (nan for nulls), or None


@dataclass(frozen=True)
class Study:
    """A checked trial ready for estimation; arrays cover every input unit.

    coords: (n, 2) in the raster's CRS; treated, outcome: (n,); covariates: (n, p);
    patches: (n, bands, h, w) float32, the base window at the first date (zeros where not ok; None once the
    windows are embedded, to free their memory, or when their usability came from the feature cache);
    patch_ok: (n,) bool, the window usable at every scale and date; patch_reason: why not;
    used: (n,) bool, units that enter estimation (window usable, no nulls);
    dropped: counts of units left out, by reason.
    """

    coords: np.ndarray
    treated: np.ndarray
    outcome: np.ndarray
    covariates: np.ndarray
    covariate_names: tuple
    patches: np.ndarray
    patch_ok: np.ndarray
    patch_reason: np.ndarray
    used: np.ndarray
    dropped: dict
    raster_path: str
    raster_crs_wkt: str
    pixel_size: float  # in the raster's CRS units (degrees for a geographic raster)
    bands: tuple
    clusters: object = None  # (n,) int cluster ids (-1 where null), or None
    pixel_size_m: float = None  # ground size of a pixel in metres (RasterInfo.pixel_size_m)
    views: object = None  # [core.represent.View]: every scale and date; None once embedded, or when read from cache
    source: object = None  # the core.represent.WindowSource the views come from
    notes: list = field(default_factory=list, compare=False, hash=False)  # warnings found while folding
    strata: object = None       # (n,) int stratum codes (-1 where null), or None
    stratum_labels: tuple = ()  # the label of each stratum code
    propensity: object = None   # (n,) known assignment probabilities, or None

    @property
    def n_used(self):
        return int(self.used.sum())

    @property
    def n_dropped(self):
        return int(len(self.used) - self.used.sum())


@dataclass(frozen=True)
class Result:
    """Per-unit estimates (nan / 0 for units not used) and the study-level summary.

    cate, cate_lo, cate_hi, cate_se: (n,) out-of-fold CATE, its 95 % interval
    and standard error; group: (n,) effect group 1..G by out-of-fold CATE
    quantile (1 = smallest effects), 0 where not used; dr_scores: (n,)
    doubly robust scores Gamma_i; fold: (n,) cross-fitting fold, -1 where not used.
    """

    cate: np.ndarray
    cate_lo: np.ndarray
    cate_hi: np.ndarray
    cate_se: np.ndarray
    group: np.ndarray
    dr_scores: np.ndarray
    fold: np.ndarray
    ate: float
    ate_se: float
    n_used: int
    n_dropped: int
    autoc: object = None  # evaluate.RateResult of the pooled out-of-fold CATE (descriptive only), where computed
    heterogeneity: object = None  # evaluate.HeterogeneityTest: the valid (sequential cross-fold) test, where computed
    probabilities: object = None  # (n, K) out-of-fold cluster probabilities (nan where not used), cluster models
    metadata: dict = field(default_factory=dict)
    fitted: object = None  # core.pipeline.FittedForest where estimate_cate was asked to keep its fit (core.plan)
    sensitivity: object = None  # core.sensitivity.Sensitivity of the ATE (observational design, when asked)


def check_treatment(treated, name="treatment", arms=False):
    """Raise GeoCateError unless every non-null value is 0 or 1 (``arms``: a whole number 0, 1, 2, ... of an arm,
    0 the reference, e.g. no programme)."""
    values = np.asarray(treated, dtype=float)
    present = values[~np.isnan(values)]
    if arms:
        wrong = np.unique(present[(present < 0) | (present != np.round(present))])
        if len(wrong):
            raise GeoCateError(
                f"The treatment field '{name}' must hold arm numbers 0, 1, 2, ... (0 = the reference, e.g. no "
                f"programme), but it also holds {', '.join(f'{v:g}' for v in wrong[:5])}.",
                "Recode it to whole numbers (e.g. with the Field Calculator) or choose the right field.")
        return
    wrong = np.unique(present[(present != 0) & (present != 1)])
    if len(wrong):
        shown = ", ".join(f"{v:g}" for v in wrong[:5]) + (" ..." if len(wrong) > 5 else "")
        raise GeoCateError(
            f"The treatment field '{name}' must hold only 0 (control) and 1 (treated), "
            f"but it also holds {shown}.",
            "Recode it to 0/1 (e.g. with the Field Calculator) or choose the right field.",
        )


def check_columns(treated, covariates, covariate_names=(), treatment_name="treatment"):
    """Before reading any window: an arm with no unit at all, or a covariate null for every unit, is named."""
    present = treated[~np.isnan(treated)]
    for arm, label, other in ((0, "control", 1), (1, "treated", 0)):
        if len(present) and not (present == arm).any():
            raise GeoCateError(
                f"The treatment field '{treatment_name}' has no {label} units: every unit with a value is {other}.",
                "A treatment effect needs both arms: choose the field that says who was treated (1) and who was "
                "not (0).")
    for j, name in enumerate(covariate_names):
        if j < covariates.shape[1] and len(covariates) and np.isnan(covariates[:, j]).all():
            raise GeoCateError(f"The covariate '{name}' is null for every unit.",
                               "Remove it from the covariates, or fill it.")


def check_estimable(treated, outcome, covariates, covariate_names=(), treatment_name="treatment",
                    outcome_name="outcome"):
    """Refuse, in plain words, studies no estimate can come from: an outcome that does not vary, or a
    covariate that is the treatment itself (it would absorb the effect: the ATE came out 0.49 for 1.15)."""
    if len(outcome) > 1 and np.ptp(outcome) == 0:
        raise GeoCateError(
            f"The outcome '{outcome_name}' has the same value ({outcome[0]:g}) for every unit used: there is no "
            "effect to estimate.", "Check that the right field was chosen as the outcome.")
    if len(outcome) > 1 and np.ptp(treated) > 0 and abs(np.corrcoef(treated, outcome)[0, 1]) > 1 - 1e-12:
        raise GeoCateError(
            f"The outcome '{outcome_name}' is the treatment '{treatment_name}' (or an exact linear function of it): "
            "the 'effect' would only restate the treatment.", "Choose the outcome field and the treatment field "
            "separately.")
    for j, name in enumerate(covariate_names):
        if len(treated) and np.array_equal(covariates[:, j], treated):
            raise GeoCateError(
                f"The covariate '{name}' is identical to the treatment '{treatment_name}'.",
                "Remove it from the covariates: a covariate must be measured before treatment, not be the treatment.")


def check_window_memory(source, n_units, share=0.6):
    """Refuse, before reading, windows that would not fit (a window of 999 pixels reached 14 GB before anything
    said so): units x bands x window^2 x 4 bytes for each scale and date, against the memory free - or, beyond
    WindowSource's memory budget (core.patches.window_store: those windows go to a memory-mapped temporary file),
    against the disk space free where temporary files go, with their features (which then go to a file too)."""
    import shutil
    import tempfile

    bands = len(source.bands) if source.bands else source.infos[0].band_count
    per_pixel = n_units * bands * 4 * max(len(source.scales), 1) * len(source.raster_paths)
    need = per_pixel * source.window_size_px ** 2
    what, feature_need = "The image windows", 0
    if source.windows_held(n_units) != "memory":
        # Their features go to a temporary file too (core.represent.FEATURE_MEMORY_MB): 512 random convolution
        # features per window and date in single precision (an estimate: smaller studies keep them in memory, and
        # an encoder's may be fewer; features over the budget beside windows held in memory are not counted).
        feature_need = n_units * 512 * 4 * max(len(source.scales), 1) * len(source.raster_paths)
        need += feature_need
        what = "The image windows and their features"
        where, free = f"disk space in {tempfile.gettempdir()}", shutil.disk_usage(tempfile.gettempdir()).free
        fix_place = "free disk space there (or point TMPDIR elsewhere)"
    else:
        where, fix_place = "memory", "close other programs"
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:  # without psutil: only the plainly impossible is refused
            free = 64 * 2 ** 30
    if need > share * free:
        fits = int((max(share * free - feature_need, 0) / per_pixel) ** 0.5)
        raise GeoCateError(
            f"{what} would need {need / 2 ** 30:.1f} GB of {where} ({n_units} units x {bands} band(s) x "
            f"{source.window_size_px} x {source.window_size_px} pixels), and {free / 2 ** 30:.1f} GB are free.",
            f"Use a smaller window size (at most about {max(fits, 3)} pixels here), fewer bands, or fewer units; "
            f"or {fix_place}.")


def build_study(units, raster_path, bands=None, window_size_px=33, nodata=None,
                progress=None, is_cancelled=None, arms=False, scales=None, rasters_time=(), cache=None):
    """Check ``units`` (a UnitTable), read their windows and return a Study.

    scales: wider windows (core.represent.parse_scales); rasters_time: rasters
    of later dates. A unit is used only if its window is usable at every scale
    and date. cache: a core.represent.FeatureCache: where the windows' usability
    was cached for the same rasters, units and windows, no window is read here
    (core.represent.study_features reads them only if the features are not cached).

    Raises GeoCateError for: a treatment other than 0/1, a raster without CRS,
    a window larger than the raster, no unit inside the raster, fewer than
    MIN_UNITS_PER_ARM units in an arm after dropping.
    """
    from .represent import WindowSource

    treated = np.asarray(units.treated, dtype=float)
    if len(treated) == 0:
        raise GeoCateError("The units layer has no features.", "Choose a layer with trial units (or clear a filter "
                           "or selection that leaves none).")
    outcome = np.asarray(units.outcome, dtype=float)
    covariates = np.asarray(units.covariates, dtype=float).reshape(len(treated), -1)
    check_treatment(treated, units.treatment_name, arms)
    check_columns(treated if not arms else np.minimum(treated, 1), covariates, units.covariate_names,
                  units.treatment_name)
    source = WindowSource([raster_path] + [str(p) for p in (rasters_time or ())], units.xy, units.crs_wkt, bands,
                          window_size_px, scales, nodata)
    info = source.infos[0]
    status = cache.load(cache.key(source.identity()), "windows") if cache is not None else None
    if status is not None:
        views, (coords, window_ok, window_reason) = None, status
    else:
        check_window_memory(source, len(treated))
        views, coords, window_ok, window_reason = source.read(progress, is_cancelled)
        if cache is not None:
            cache.store(cache.key(source.identity()), "windows", (coords, window_ok, window_reason))
    codes = np.array([r.split("@")[0] for r in window_reason], dtype=object)
    no_geometry = ~np.isfinite(np.asarray(units.xy, dtype=float).reshape(len(treated), 2)).all(axis=1)
    if len(treated) and no_geometry.all():
        raise GeoCateError("None of the units has a geometry (or all are empty).",
                           "Give the units points or polygons, e.g. with 'Create points layer from table'.")
    if len(treated) and (codes == OUTSIDE).all():
        raise GeoCateError(
            f"None of the {len(treated)} units lies inside the raster '{info.path}'.",
            "Check that the units and the imagery cover the same area and that both layers have the right CRS.",
        )
    null_treated = np.isnan(treated)
    null_outcome = np.isnan(outcome)
    null_covariate = np.isnan(covariates).any(axis=1) if covariates.shape[1] else np.zeros(len(treated), bool)
    dropped = {
        "treatment is null": int(null_treated.sum()),
        "outcome is null": int((null_outcome & ~null_treated).sum()),
        "a covariate is null": int((null_covariate & ~null_outcome & ~null_treated).sum()),
    }
    complete = ~(null_treated | null_outcome | null_covariate)
    clusters = None
    if units.clusters is not None:
        labels = [None if c is None else str(c) for c in units.clusters]
        null_cluster = np.array([c is None for c in labels], bool)
        dropped["cluster is null"] = int((null_cluster & complete).sum())
        complete &= ~null_cluster
        known = sorted({c for c in labels if c is not None})
        index = {c: i for i, c in enumerate(known)}
        clusters = np.array([-1 if c is None else index[c] for c in labels], int)
    strata, stratum_labels, propensity = None, (), None
    if getattr(units, "strata", None) is not None and getattr(units, "propensity", None) is not None:
        raise GeoCateError("Both strata and known assignment probabilities were given.",
                           "Give one: with strata, each stratum's treated share is the probability.")
    if getattr(units, "strata", None) is not None:
        labels = [None if c is None else str(c) for c in units.strata]
        null_stratum = np.array([c is None for c in labels], bool)
        dropped["stratum is null"] = int((null_stratum & complete).sum())
        complete &= ~null_stratum
        stratum_labels = tuple(sorted({c for c in labels if c is not None}))
        index = {c: i for i, c in enumerate(stratum_labels)}
        strata = np.array([-1 if c is None else index[c] for c in labels], int)
    if getattr(units, "propensity", None) is not None:
        propensity = np.asarray(units.propensity, dtype=float)
        null_propensity = np.isnan(propensity)
        dropped["assignment probability is null"] = int((null_propensity & complete).sum())
        complete &= ~null_propensity
        bad = complete & ((propensity <= 0) | (propensity >= 1))
        if bad.any():
            raise GeoCateError(
                f"{int(bad.sum())} unit(s) have an assignment probability outside (0, 1) (e.g. "
                f"{propensity[bad][0]:g}): a unit certain to be treated, or never, tells nothing about the effect.",
                "Give each unit's probability of treatment under the design, strictly between 0 and 1 (or leave the "
                "units out).")
    dropped["no geometry"] = int((no_geometry & complete).sum())
    for code, label in ((OUTSIDE, "outside the raster"), (EDGE, "window crosses the raster edge"),
                        (NODATA, "window holds nodata or fill")):
        dropped[label] = int(((codes == code) & complete & ~no_geometry).sum())
        for where in sorted({r.split("@")[1] for r in window_reason if r.startswith(code + "@")}):
            dropped[f"{label} ({where})"] = int(((window_reason == f"{code}@{where}") & complete & ~no_geometry).sum())
            dropped[label] -= dropped[f"{label} ({where})"]
    used = complete & window_ok
    if strata is not None and not arms:
        for code, label in enumerate(stratum_labels):
            members = used & (strata == code)
            n_treated = int((treated[members] == 1).sum())
            if members.any() and n_treated in (0, int(members.sum())):
                raise GeoCateError(
                    f"The stratum '{label}' has {'no treated' if n_treated == 0 else 'no control'} unit among the "
                    f"{int(members.sum())} used: within it, treated and control units cannot be compared.",
                    "Check the strata field (the blocks the trial was randomized in); merge this stratum with a "
                    "neighbouring one, or leave its units out.")
    check_estimable(treated[used], outcome[used], covariates[used], units.covariate_names, units.treatment_name,
                    units.outcome_name)
    arm_labels = ((1, "treated"), (0, "control")) if not arms else \
        tuple((a, f"arm {a:g}") for a in np.unique(treated[used]))
    for arm, label in arm_labels:
        count = int((used & (treated == arm)).sum())
        if count < MIN_UNITS_PER_ARM:
            raise GeoCateError(
                f"Only {count} {label} unit(s) remain after dropping units with nulls or unusable "
                f"image windows ({describe_dropped(dropped)}); at least {MIN_UNITS_PER_ARM} per arm are needed.",
                "Add units, fix the nulls, or use imagery that covers more of them (a smaller window size helps near edges).",
            )
    return Study(
        coords=coords, treated=treated, outcome=outcome, covariates=covariates,
        covariate_names=tuple(units.covariate_names), patches=None if views is None else views[0].windows[:, 0],
        patch_ok=window_ok, patch_reason=window_reason, used=used, dropped=dropped, raster_path=str(raster_path),
        raster_crs_wkt=info.crs_wkt, pixel_size=info.pixel_size,
        bands=tuple(bands) if bands else tuple(range(1, info.band_count + 1)), clusters=clusters,
        pixel_size_m=info.pixel_size_m, views=views, source=source, strata=strata, stratum_labels=stratum_labels,
        propensity=propensity,
    )


def describe_dropped(dropped):
    parts = [f"{count} {why}" for why, count in dropped.items() if count]
    return "; ".join(parts) if parts else "none dropped"


def spread_over(used, values, fill=np.nan, dtype=float):
    """Per-unit ``values`` of the used units laid out over every input unit (``fill`` for the others): the one
    place estimates go back to the layer's rows. ``values`` may have more axes (e.g. cluster probabilities)."""
    used = np.asarray(used, bool)
    out = np.full((len(used),) + np.shape(values)[1:], fill, dtype=dtype)
    out[used] = values
    return out

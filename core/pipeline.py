"""The main job: from a unit table and a raster to out-of-fold CATEs, in one call the provider and the dock share."""

import platform
import time

import numpy as np

from .embed import BandScaler, RandomConvFeatures
from .learners import default_learner, effect_groups, location_ids
from .study import Result, build_study


def _stage(progress, start, end):
    """Map a stage's 0..1 progress onto [start, end] of the whole run."""
    if progress is None:
        return None
    return lambda fraction, message="": progress(start + (end - start) * fraction, message)


def package_versions():
    versions = {"python": platform.python_version()}
    for name in ("numpy", "sklearn", "econml", "torch", "scipy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        from osgeo import gdal

        versions["gdal"] = gdal.__version__
    except ImportError:  # pragma: no cover
        versions["gdal"] = None
    return versions


def estimate_cate(units, raster_path, bands=None, window_size_px=33, nodata=None, seed=42,
                  n_groups=3, n_folds=5, n_filters=256, n_components=20, n_estimators=200,
                  device="auto", progress=None, is_cancelled=None):
    """Estimate each unit's CATE from its image window (and covariates).

    units: a :class:`UnitTable`. Returns (Study, Result). Steps: read and check
    the windows (build_study); MOSAIKS features of the windows (RandomConvFeatures
    on BandScaler-scaled bands); the cross-fitted causal forest of default_learner;
    effect groups 1..n_groups by out-of-fold CATE. ``progress(fraction, message)``
    is called, and ``is_cancelled()`` polled, every quarter second while windows
    are read and embedded and at each cross-fitting fold; cancelling raises
    :class:`Cancelled`.
    """
    timings = {}
    started = time.monotonic()
    study = build_study(units, raster_path, bands, window_size_px, nodata,
                        _stage(progress, 0.0, 0.15), is_cancelled)
    timings["read_windows_s"] = time.monotonic() - started

    used = study.used
    t = time.monotonic()
    scaler = BandScaler(seed=seed).fit(study.patches[used])
    scaled = scaler.transform(study.patches[used])
    embedder = RandomConvFeatures(n_filters=n_filters, seed=seed, device=device).fit(scaled)
    features = embedder.transform(scaled, _stage(progress, 0.15, 0.3), is_cancelled)
    timings["image_features_s"] = time.monotonic() - t

    t = time.monotonic()
    design, learner = default_learner(features, study.covariates[used], n_components, n_folds,
                                      n_estimators, seed)
    learner.fit(study.outcome[used], study.treated[used].astype(int), design,
                locations=location_ids(study.coords[used]),
                progress=_stage(progress, 0.3, 1.0), is_cancelled=is_cancelled)
    timings["causal_forest_s"] = time.monotonic() - t
    timings["total_s"] = time.monotonic() - started

    n = len(used)

    def spread(values, fill=np.nan, dtype=float):
        out = np.full(n, fill, dtype=dtype)
        out[used] = values
        return out

    metadata = {
        "seed": seed,
        "window_size_px": int(window_size_px),
        "window_size_m": float(window_size_px * study.pixel_size),
        "bands": list(study.bands),
        "nodata": nodata,
        "n_groups": n_groups,
        "n_folds": n_folds,
        "n_filters": n_filters,
        "n_features": int(features.shape[1]),
        "outcome_model_pca_components": int(learner.model_y.steps[0][1].transformers[0][1].n_components),
        "covariates": list(study.covariate_names),
        "n_estimators": n_estimators,
        "propensity": learner.propensity_,
        "band_scaling": scaler.to_dict(),
        "device": embedder.device_,
        "dropped": study.dropped,
        "versions": package_versions(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    result = Result(
        cate=spread(learner.cate_), cate_lo=spread(learner.cate_lo_), cate_hi=spread(learner.cate_hi_),
        cate_se=spread(learner.cate_se_), group=spread(effect_groups(learner.cate_, n_groups), 0, int),
        dr_scores=spread(learner.dr_scores_), fold=spread(learner.fold_, -1, int),
        ate=learner.ate_, ate_se=learner.ate_se_, n_used=study.n_used, n_dropped=study.n_dropped,
        metadata=metadata,
    )
    return study, result

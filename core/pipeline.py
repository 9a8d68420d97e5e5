"""The main job: from a unit table and a raster to out-of-fold CATEs, in one call the provider and the dock share."""

import dataclasses
import functools
import platform
import time

import numpy as np

from .corrections import corrected_units, correction_record, prediction_powered_ate
from .crossfit import Folds, location_folds, location_ids
from .errors import GeoCateError
from .evaluate import (
    auto_block_size,
    effect_groups,
    group_average_effects,
    honest_fold_groups,
    merge_groups,
    metric_coords,
    rank_average_treatment_effect,
    sequential_rate_test,
)
from .inputs import design_matrix, outcome_inputs
from .learners import default_learner
from .observational import suspicious_covariates
from .patches import extract_patches
from .progress import FitCount, stage
from .represent import ImageryOptions, RandomConvolutions, study_features
from .scores import aipw_scores, cross_fitted_scores, doubly_robust_ate
from .study import Result, build_study, spread_over


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


def image_features(study, seed=42, n_filters=256, device="auto", progress=None, is_cancelled=None, imagery=None):
    """The used units' image features through one FeaturePipeline (core.represent): (features (n_used, d), pipeline).

    Default (``imagery`` None): one window at one date through band scaling and
    MOSAIKS random convolutions, fit on at most FIT_WINDOWS used windows (drawn
    with ``seed``), every window then scaled and embedded batch by batch (no
    second copy of all windows), output log1p of the pooled responses. ``imagery``
    (core.represent.ImageryOptions) adds scales, dates, an ONNX encoder and the cache."""
    imagery = imagery or ImageryOptions()
    pipeline = imagery.pipeline(n_filters, seed, device)
    features, pipeline, _, _ = study_features(study, study.source, pipeline, imagery.cache, progress, is_cancelled)
    return features, pipeline


def single_window_model(pipeline):
    """(scaler, embedder) when the pipeline is one window at one date through random convolutions, the case the
    cluster model's image network (core.clusters.image_model) reproduces; else None."""
    if len(pipeline.views_) != 1 or len(pipeline.views_[0]["dates"]) != 1:
        return None
    representation = pipeline.representations_[0]
    if not isinstance(representation, RandomConvolutions):
        return None
    return representation.scaler_, representation.embedder_


def overlap_warning(study, window_size_px, block_size):
    """A warning when random folds would split units whose image windows overlap, else None.

    With no spatial blocks, a unit and a neighbour whose windows overlap can
    land in different folds, so the forest partly learns a unit's own
    surroundings from its neighbour's outcome, and the held-out figures look
    better than they are (bench/bench_estimate.py measures it on the demo).
    """
    from scipy.spatial import cKDTree

    if study.notes:   # the automatic blocks had to be smaller than the windows
        return " ".join(study.notes)
    if block_size or study.n_used < 2:
        return None
    coords = metric_coords(study.coords[study.used], study.raster_crs_wkt)
    footprint = window_size_px * study.pixel_size_m
    distance = cKDTree(coords).query(coords, k=2)[0][:, 1]
    share = float(np.mean((distance > 0) & (distance < footprint)))
    if share < 0.05:
        return None
    return (f"{share:.0%} of the units have an image window overlapping a neighbour's (windows of {footprint:,.0f} m), "
            "and the folds do not keep neighbours apart: held-out figures may overstate heterogeneity. Set spatial "
            "blocks to auto (-1: chosen from the data) for an honest split.")


def fold_groups(study, spatial_block=0, window_size_px=33, n_folds=5):
    """Groups the cross-fitting folds must keep whole, for the used units: (group ids, block size in metres or None).

    These groups are also the bootstrap's clusters and the clusters of every
    standard error. Units sharing coordinates, or a cluster id (``study.clusters``,
    e.g. a village field), are always one group.
    spatial_block 0: no blocks; > 0: square blocks of that
    many metres; < 0: blocks chosen from the data, the larger of the outcome's
    correlation range (correlation_range of the outcome less its arm mean) and
    the window's footprint on the ground.
    """
    coords = metric_coords(study.coords[study.used], study.raster_crs_wkt)
    locations = location_ids(study.coords[study.used])
    if study.clusters is not None:
        locations = merge_groups(locations, study.clusters[study.used])
    if not spatial_block:
        return locations, None
    if spatial_block < 0:
        spatial_block, note = auto_block_size(coords, study.outcome[study.used], study.treated[study.used], locations,
                                              footprint=window_size_px * study.pixel_size_m, n_folds=n_folds)
        if note and note not in study.notes:
            study.notes.append(note)
    groups = honest_fold_groups(coords, spatial_block, locations)
    if len(np.unique(groups)) < 5:
        extent = float(max(np.ptp(coords[:, 0]), np.ptp(coords[:, 1])))
        raise GeoCateError(
            f"Spatial blocks of {spatial_block:,.0f} m leave only {len(np.unique(groups))} group(s) of units "
            f"(the units span about {extent:,.0f} m): cross-fitting needs at least 5.",
            f"Use smaller spatial blocks (well under {extent / 3:,.0f} m), or 0 for none.")
    return groups, float(spatial_block)


@dataclasses.dataclass
class PreparedStudy:
    """A study ready for an estimator (prepare_study): the checked ``study`` (its windows released unless kept),
    the used units' image ``features`` and the fitted feature ``pipeline`` that made them (``cached``: read from
    the feature cache), the fold ``groups`` every estimator keeps whole (and the bootstrap's and standard errors'
    clusters) with the spatial ``block_size`` in metres or None, the ``timings`` of the two steps, and where the
    windows were held (``windows_held``: "memory", "a memory-mapped temporary file" beyond WindowSource's budget,
    or "not read" when the features came from the cache)."""

    study: object
    features: np.ndarray
    pipeline: object
    cached: bool
    groups: np.ndarray
    block_size: object
    timings: dict
    windows_held: str = "memory"


def prepare_study(units, raster_path, bands, window_size_px, nodata, feature_pipeline, imagery, spatial_block,
                  progress=None, is_cancelled=None, read_share=0.5, keep_windows=False, arms=False, check=None):
    """The one orchestration every algorithm (and maps) starts with: the units' windows read and checked
    (core.study.build_study) -> ``check(study)`` (an algorithm's own refusal, before the features are computed)
    -> the image features through ``feature_pipeline`` (core.represent.study_features, with ``imagery``'s cache)
    -> the windows released (unless ``keep_windows``: the cluster model's salience and the comparison of
    representations read them again) -> the fold groups (fold_groups). ``progress`` covers the whole step,
    ``read_share`` of it for the windows."""
    timings, started = {}, time.monotonic()
    study = build_study(units, raster_path, bands, window_size_px, nodata, stage(progress, 0.0, read_share),
                        is_cancelled, arms=arms, **imagery.study_kwargs())
    timings["read_windows_s"] = time.monotonic() - started
    if check is not None:
        check(study)
    t = time.monotonic()
    features, feature_pipeline, _, cached = study_features(study, study.source, feature_pipeline, imagery.cache,
                                                           stage(progress, read_share, 1.0), is_cancelled)
    timings["image_features_s"] = time.monotonic() - t
    held = "not read (features from the cache)" if cached else study.source.windows_held()
    if not keep_windows:
        study = dataclasses.replace(study, patches=None, views=None)  # the windows are no longer needed: free them
    groups, block_size = fold_groups(study, spatial_block, window_size_px)
    return PreparedStudy(study, features, feature_pipeline, cached, groups, block_size, timings, held)


def known_propensity(study):
    """(P(treated) of each used unit, where it comes from) when the design fixes it: given per unit
    (PROPENSITY), or the treated share of each stratum of a block-randomized trial (STRATA); (None, None)
    when one probability holds for every unit."""
    used = study.used
    if study.propensity is not None:
        return study.propensity[used], "assignment probabilities given per unit (known by design)"
    if study.strata is not None:
        codes, treated = study.strata[used], study.treated[used]
        k = len(study.stratum_labels)
        share = np.bincount(codes, treated, minlength=k) / np.maximum(np.bincount(codes, minlength=k), 1)
        return share[codes], "the treated share of each stratum (known by design)"
    return None, None


def assignment_units(study):
    """The units of assignment of a trial, for the used units: the cluster ids when treatment is constant within
    every cluster (a cluster-randomized trial; units without a cluster are their own), else None (units)."""
    if study.clusters is None:
        return None
    from .evaluate import cluster_assignment

    used = study.used
    clusters = study.clusters[used].copy()
    own = np.flatnonzero(clusters < 0)
    clusters[own] = clusters.max() + 1 + np.arange(len(own))
    return cluster_assignment(clusters, study.treated[used])


def design_rerandomization(study, learner):
    """How the randomized trial assigned treatment (core.evaluate.Rerandomization): whole clusters when treatment
    is constant within clusters, within strata when given, or with the known per-unit probabilities."""
    used = study.used
    return learner.rerandomization(
        assignment=assignment_units(study),
        strata=None if study.strata is None else study.strata[used],
        known=None if study.propensity is None else study.propensity[used])


#: Fewer clusters than this in a held-out fold and the log says so (the test's SEs then lean on re-randomization).
FEW_CLUSTERS_PER_FOLD = 20


def few_clusters_warning(study, folds):
    """A warning when the trial's clusters leave few in each held-out fold."""
    if study.clusters is None:
        return None
    clusters = study.clusters[study.used]
    per_fold = [len(np.unique(clusters[test])) for _, _, test in Folds(folds).split()]
    if min(per_fold) >= FEW_CLUSTERS_PER_FOLD:
        return None
    return (f"Each held-out fold holds only {min(per_fold)} to {max(per_fold)} clusters: with so few, the "
            "half-sample bootstrap understates the uncertainty of the heterogeneity test, so each fold's standard "
            "error is also taken from re-randomizing treatment as the design did (by cluster when whole clusters "
            "were assigned), and the larger is used. Group effects and per-unit intervals rest on few clusters too: "
            "read them with care.")


def check_randomization(study, inputs, groups, n_folds, seed, known=False):
    """core.design.randomization_check on what was known before treatment: the outcome models' inputs (the
    image's leading components and the covariates) and the location (coordinates, their squares and product);
    treatment permuted by cluster and within strata as the design assigned it. With given probabilities
    (PROPENSITY) treatment is predictable by design: no check."""
    from .design import randomization_check

    if known and study.strata is None:
        return None
    used = study.used
    coords = metric_coords(study.coords[used], study.raster_crs_wkt)
    c = (coords - coords.mean(axis=0)) / np.where(coords.std(axis=0) > 0, coords.std(axis=0), 1)
    location = np.column_stack([c, c ** 2, c[:, 0] * c[:, 1]])
    report = randomization_check(
        study.treated[used], np.column_stack([inputs, location]), location_folds(groups, n_folds, seed),
        groups=None if study.clusters is None else study.clusters[used],
        strata=None if study.strata is None else study.strata[used], seed=seed)
    report["inputs"] = ["image component / covariate"] * int(np.asarray(inputs).shape[1]) + [
        "x", "y", "x^2", "y^2", "x*y"]
    return report


def randomization_warning(check):
    """The plain warning when treatment is predictable from what was known before it, else None."""
    if not check or not check["warns"]:
        return None
    return (f"Treatment is predictable from the covariates, the imagery and the location (cross-fitted AUC "
            f"{check['auc']:.2f}, permutation p = {check['p_value']:.3f}): the trial does not look randomized with "
            "one probability for every unit. If it was randomized within strata (e.g. districts), give STRATA; "
            "with unit-level probabilities, PROPENSITY; if it was not randomized, use the observational design. "
            "The report's balance table shows where the arms differ.")


def propensity_check(propensity, treated, n_bins=5, z_limit=3.5):
    """A warning when given assignment probabilities disagree with the data: in bins of similar probability, the
    treated share strays from the mean probability by more than ``z_limit`` binomial standard errors; else None."""
    e, W = np.asarray(propensity, float), np.asarray(treated, float)
    values = np.unique(e)
    if len(values) <= n_bins:   # a few fixed probabilities (e.g. by design arm): one bin each
        which = np.searchsorted(values, e)
    else:
        edges = np.unique(np.quantile(e, np.linspace(0, 1, n_bins + 1)))
        which = np.clip(np.searchsorted(edges, e, side="right") - 1, 0, max(len(edges) - 2, 0))
    worst = None
    for b in np.unique(which):
        members = which == b
        expected, observed = e[members].mean(), W[members].mean()
        se = np.sqrt(np.sum(e[members] * (1 - e[members]))) / members.sum()
        z = (observed - expected) / se if se > 0 else 0.0
        if abs(z) > z_limit and (worst is None or abs(z) > abs(worst[0])):
            worst = (z, expected, observed, int(members.sum()))
    if worst is None:
        return None
    z, expected, observed, n = worst
    return (f"The given assignment probabilities disagree with who was treated: among {n} units with probabilities "
            f"near {expected:.2f}, {observed:.0%} were treated (z = {z:.1f}). Check the PROPENSITY field (it must be "
            "each unit's probability of treatment under the design), or use strata or the observational design.")


@dataclasses.dataclass
class TrialDesign:
    """How a study's treatment was assigned, as the estimators need it (trial_design): ``folds`` (strata spread
    over every fold when given), outcome-model ``inputs`` (with strata indicators), ``propensity`` ((n_used,) or
    None: the treated share), ``propensity_fit`` (its record), ``known_from`` (where a known propensity came
    from, or None), ``kind`` ("randomized" or the observational design's), ``check`` (the randomization check
    of a randomized trial, or None)."""

    folds: np.ndarray
    inputs: np.ndarray
    propensity: object
    propensity_fit: object
    known_from: object
    kind: str
    check: object


def with_strata(study, inputs):
    """Outcome-model ``inputs`` with the strata's indicators beside them (a block-randomized trial), else as they are."""
    if study.strata is None:
        return inputs
    return np.column_stack([inputs, np.eye(len(study.stratum_labels))[study.strata[study.used]]])


def trial_design(study, design, inputs, groups, n_folds, seed, study_design=None, is_cancelled=None):
    """The one place a study's design becomes folds, outcome inputs and a propensity (estimate_cate,
    compare_sources, map_effects): randomized (the treated share); block-randomized (STRATA: each stratum's
    treated share, strata indicators in the outcome models, folds that spread each stratum) or with known
    probabilities (PROPENSITY); observational (the propensity cross-fitted from ``design``, the standardised
    image features and covariates, on the same folds). A randomized trial also gets its randomization check."""
    used = study.used
    randomized = study_design is None or study_design.kind == "randomized"
    known, known_from = known_propensity(study)
    check = check_randomization(study, inputs, groups, n_folds, seed, known is not None) if randomized else None
    if known is not None and randomized:
        folds = Folds.of_groups(groups, n_folds, seed, None if study.strata is None else study.strata[used]).fold
        inputs = with_strata(study, inputs)
        return TrialDesign(folds, inputs, known, {"model": known_from}, known_from, "randomized", check)
    folds = Folds.of_groups(groups, n_folds, seed).fold
    if not randomized:
        probabilities, fit = study_design.propensities(study.treated[used].astype(int), design, folds, is_cancelled)
        return TrialDesign(folds, inputs, probabilities[:, 1], fit, None, study_design.kind, None)
    return TrialDesign(folds, inputs, None, None, None, "randomized", check)


def estimate_cate(units, raster_path, bands=None, window_size_px=33, nodata=None, seed=42,
                  n_groups=3, n_folds=5, n_filters=256, n_components=20, n_estimators=100,
                  device="auto", spatial_block=0, n_draws=200, progress=None, is_cancelled=None,
                  outcome_correction=None, correction="linear", outcome_truth=None, study_design=None,
                  imagery=None, covariates_modify=True, keep_fit=False, sensitivity=None, forest="folds"):
    """Estimate each unit's CATE from its image window (and covariates), and test for heterogeneity.

    units: a :class:`UnitTable`. Returns (Study, Result). Steps: read and check
    the windows (build_study); MOSAIKS features of the windows (RandomConvFeatures
    on BandScaler-scaled bands); the cross-fitted causal forest of default_learner
    (out-of-fold CATE, DR scores, the DR ATE with an SE robust to the fold groups);
    effect groups 1..n_groups by out-of-fold CATE with their cluster-robust GATEs;
    the sequential cross-fold test of heterogeneity (result.heterogeneity: each
    fold ranked by a forest built on the earlier folds only); and, as a
    descriptive figure only, the AUTOC of the pooled out-of-fold CATE (result.autoc).
    Folds keep units at one place, of one cluster (``units.clusters``), or in one
    spatial block (``spatial_block``, see fold_groups), together; the same groups
    are the clusters of every standard error and of the bootstrap.
    ``progress(fraction, message)`` is called, and ``is_cancelled()`` polled, every
    quarter second while windows are read and embedded, in each cross-fitting fold
    and in each fold of the test; cancelling raises :class:`Cancelled`.

    An outcome that is a map's prediction: ``outcome_correction`` (a
    core.corrections.OutcomeCorrection for that outcome) corrects it with
    ``correction`` ("none", "linear" or "tweedie") before anything is
    estimated, and the metadata gives the DR ATE under every correction side
    by side; ``outcome_truth`` ((n,), NaN where unknown), the true outcome of
    a random subset of units, adds the prediction-powered ATE.

    study_design: a core.design.StudyDesign (default randomized: the known
    propensity). Observational: the propensity is cross-fitted from the image
    features' components and the covariates, on the same folds, and the
    forests and DR scores (so the ATE, the test, the RATE and the BLP) use it.

    imagery: a core.represent.ImageryOptions (wider scales, later dates and their
    pooling, an ONNX encoder, the feature cache); default one window, one date,
    random convolutions.

    covariates_modify False: the image features are the forest's only effect
    modifiers (the covariates still enter the outcome models), so that the
    model can rank places where no covariate was measured (targeting's
    candidates and map cells, as map_effects). keep_fit: ``result.fitted`` is
    a :class:`FittedForest` (the learner, its inputs and the feature pipeline)
    for the steps that reuse the fit (core.plan).

    forest: "folds" (five fold forests, each unit predicted by the forest grown without its fold) or
    "out-of-bag" (one forest, each unit predicted by the bags of trees grown without its group:
    core.learners.GroupBaggedCausalForest); the heterogeneity test is the same procedure for both (each fold ranked
    by a forest grown on the earlier folds; the out-of-bag learner grows 50-tree ranking forests for every step,
    the fold learner reuses its last fold forest for the last one).
    """
    imagery = imagery or ImageryOptions()
    feature_pipeline = imagery.pipeline(n_filters, seed, device)
    timings = {}
    started = time.monotonic()
    units, versions = corrected_units(units, outcome_correction, correction)
    prepared = prepare_study(units, raster_path, bands, window_size_px, nodata, feature_pipeline, imagery,
                             spatial_block, stage(progress, 0.0, 0.22), is_cancelled, read_share=0.12 / 0.22)
    study, features, feature_pipeline, cached = prepared.study, prepared.features, prepared.pipeline, prepared.cached
    groups, block_size = prepared.groups, prepared.block_size
    timings.update(prepared.timings)
    used = study.used
    t = time.monotonic()
    design, inputs, learner = default_learner(features, study.covariates[used], n_components, n_folds,
                                              n_estimators, seed, forest)
    # The observational propensity always sees every image feature and covariate (core.inputs.propensity_inputs);
    # without covariates as effect modifiers only the forest's design drops them.
    trial = trial_design(study, design, inputs, groups, n_folds, seed, study_design, is_cancelled)
    if not covariates_modify:
        design = design_matrix(features, None)[0]
    check, inputs, propensity = trial.check, trial.inputs, trial.propensity
    randomized = study_design is None or study_design.kind == "randomized"
    n_features = int(features.shape[1])
    if not keep_fit and (randomized or sensitivity is None):
        # Nothing below reads the features (the design matrix holds them, scaled): at 100,000 units they are
        # 400 MB beside the forest's copies of its rows (issue 26).
        features = prepared.features = None
    learner.fit(study.outcome[used], study.treated[used].astype(int), design, groups=groups, outcome_inputs=inputs,
                folds=trial.folds, progress=stage(progress, 0.22, 0.75), is_cancelled=is_cancelled,
                propensity=propensity)
    timings["causal_forest_s"] = time.monotonic() - t
    timings.update(learner.timings_)   # the forest stage's parts (outcome models; fold forests, or growth and OOB)

    t = time.monotonic()
    rerandomization = design_rerandomization(study, learner) if randomized else None
    test = learner.heterogeneity_test("AUTOC", n_draws, progress=stage(progress, 0.75, 0.98),
                                      is_cancelled=is_cancelled, rerandomization=rerandomization)
    if rerandomization is not None:   # the ATE's SE: also from treatment assigned again (few clusters)
        from .evaluate import rerandomized_ate
        from .scores import AverageEffect

        ate = rerandomized_ate(AverageEffect(learner.ate_, learner.ate_se_, int(len(np.unique(groups)))),
                               rerandomization, seed=seed)
        learner.ate_se_ = ate.std_err
    timings["heterogeneity_test_s"] = time.monotonic() - t
    predicted_outcome = predicted_outcome_record(study, learner, inputs, groups, versions, correction,
                                                 outcome_correction, outcome_truth)
    analysis, sensitivity_warnings = None, []
    if sensitivity is not None and not randomized:   # the ATE's: its folds and nuisance models, refit the same way
        from .sensitivity import analyse_or_warn, check_strengths

        check_strengths(*sensitivity)
        analysis = analyse_or_warn(sensitivity_warnings, study.outcome[used], study.treated[used].astype(int),
                                   study_design, features,
                                   study.covariates[used] if study.covariates.shape[1] else None,
                                   study.covariate_names, trial.folds, groups, seed, *sensitivity,
                                   is_cancelled=is_cancelled, n_components=n_components,
                                   tick=stage(progress, 0.98, 0.99))
    t = time.monotonic()
    autoc = rank_average_treatment_effect(learner.dr_scores_, learner.cate_, "AUTOC", n_draws=n_draws,
                                          clusters=groups, names=["cate"], seed=seed)[0]
    timings["autoc_s"] = time.monotonic() - t
    timings["total_s"] = time.monotonic() - started
    if progress is not None:
        progress(1.0, "Done")

    groups_of_units = effect_groups(learner.cate_, n_groups)

    spread = functools.partial(spread_over, used)

    metadata = {
        "seed": seed,
        "window_size_px": int(window_size_px),
        "window_size_m": float(window_size_px * study.pixel_size_m),
        "bands": list(study.bands),
        "nodata": nodata,
        "n_groups": n_groups,
        "n_folds": n_folds,
        "n_filters": n_filters,
        "n_features": n_features,
        "feature_pipeline": feature_pipeline.describe(),
        "features_from_cache": bool(cached),
        "outcome_model_inputs": int(inputs.shape[1]),
        "covariates": list(study.covariate_names),
        "n_estimators": int(learner.n_estimators),
        "estimator": learner.describe(),
        "forest": forest,
        "cate_calibration": None if not learner.calibrate else (
            "per fold: monotone spline of E[DR score | out-of-bag forest prediction] on the fold's training units"
            if forest == "folds" else "per fold: monotone spline of E[DR score | out-of-bag prediction] on the other "
                                      "folds' units"),
        "propensity": learner.propensity_ if propensity is None else
        ("cross-fitted per unit" if trial.known_from is None else trial.known_from),
        "study_design": trial.kind,
        "strata": len(study.stratum_labels) if study.strata is not None else None,
        "randomization_check": check,
        "propensity_model": trial.propensity_fit,
        "band_scaling": feature_pipeline.describe()["representation"][0].get("band_scaling"),
        "device": feature_pipeline.device_,
        "ran_on": where_parts_ran(feature_pipeline.device_, windows_held=prepared.windows_held),
        "spatial_block_m": block_size,
        "clustered_by": "cluster field and shared locations" if study.clusters is not None else "shared locations",
        "fold_groups": int(len(np.unique(groups))),
        "warnings": [w for w in (overlap_warning(study, window_size_px, block_size),
                                 propensity_check(study.propensity[used], study.treated[used])
                                 if study.propensity is not None else None,
                                 randomization_warning(check), few_clusters_warning(study, learner.fold_)) if w]
        + suspicious_covariates(study.covariates[used], study.covariate_names, study.treated[used]),
        "heterogeneity_test": dict(heterogeneity_record(test), fold_standard_errors=(
            "the larger of the half-sample bootstrap over the fold groups and the spread over re-randomized "
            + ("clusters" if rerandomization.assignment is not None else "units")
            + (" within strata" if rerandomization.strata is not None else "")
            + (" (known probabilities)" if rerandomization.known is not None else "")
            if rerandomization is not None else "half-sample bootstrap over the fold groups")),
        "ate_standard_error": ("the larger of the cluster-robust (CR1) one over the fold groups (on Student's t with "
                               "G - 1 degrees of freedom when treatment was assigned by cluster) and the spread of the "
                               "DR ATE over re-randomized assignments" if rerandomization is not None else
                               "cluster-robust (CR1) over the fold groups"),
        "predicted_outcome": predicted_outcome,
        "autoc": {"estimate": autoc.estimate, "std_err": autoc.std_err, "ci": list(autoc.ci),
                  "draws": n_draws, "q": autoc.q.tolist(), "toc": autoc.toc.tolist(),
                  "toc_se": autoc.toc_se.tolist(),
                  "note": "descriptive only: the pooled out-of-fold CATE ranks units with models that saw the other "
                          "ranked units; the test of heterogeneity is heterogeneity_test"},
        "group_effects": [dict(zip(("group", "n", "effect", "std_err", "ci_low", "ci_high", "mean_cate"),
                                   row + (float(learner.cate_[groups_of_units == row[0]].mean()),)))
                          for row in group_average_effects(learner.dr_scores_, learner.cate_, n_groups, groups)],
        "dropped": study.dropped,
        "versions": package_versions(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    result = Result(
        cate=spread(learner.cate_), cate_lo=spread(learner.cate_lo_), cate_hi=spread(learner.cate_hi_),
        cate_se=spread(learner.cate_se_), group=spread(groups_of_units, 0, int),
        dr_scores=spread(learner.dr_scores_), fold=spread(learner.fold_, -1, int),
        ate=learner.ate_, ate_se=learner.ate_se_, n_used=study.n_used, n_dropped=study.n_dropped,
        autoc=autoc, heterogeneity=test, metadata=metadata,
        fitted=FittedForest(learner=learner, design=design, inputs=inputs, features=features, groups=groups,
                            pipeline=feature_pipeline) if keep_fit else None,
        sensitivity=analysis,
    )
    metadata["warnings"] += sensitivity_warnings
    if analysis is not None:
        metadata["sensitivity"] = analysis.record()
        metadata["warnings"] += analysis.warnings
    metadata["effect_modifiers"] = "image features and covariates" if covariates_modify else "image features"
    return study, result


@dataclasses.dataclass
class FittedForest:
    """What estimate_cate fitted, for the steps that reuse it (core.plan): the cross-fitted forest (``learner``:
    cate_, dr_scores_, fold_, forests_, priority_for), its design matrix and outcome-model inputs over the used
    units, the image features, the fold groups (the SE clusters) and the fitted feature pipeline."""

    learner: object
    design: np.ndarray
    inputs: np.ndarray
    features: np.ndarray
    groups: np.ndarray
    pipeline: object


def predicted_outcome_record(study, learner, inputs, groups, versions, correction, outcome_correction,
                             outcome_truth):
    """What an outcome taken from a map's predictions adds to the run metadata (None when it is not one): the
    correction used, units outside its range, the DR ATE under each correction on the same folds, and the
    prediction-powered ATE where some units have the true outcome."""
    if versions is None and outcome_truth is None:
        return None
    used, W = study.used, study.treated[study.used].astype(int)
    record = {}
    if versions is not None:
        record.update(correction_record(outcome_correction, correction, versions["none"][0][used], W, inputs,
                                        learner.fold_, groups))
    if outcome_truth is not None:
        truth = np.asarray(outcome_truth, float)[used]
        ppi = prediction_powered_ate(study.outcome[used], truth, W, groups)
        record["prediction_powered_ate"] = {"estimate": ppi.estimate, "std_err": ppi.std_err,
                                            "n_labelled": int(np.isfinite(truth).sum())}
    return record


def heterogeneity_record(test):
    """A HeterogeneityTest as plain JSON for the run metadata, the dock and the report."""
    return {"method": "sequential cross-fold RATE test (one-sided)", "target": test.target,
            "estimate": test.estimate, "std_err": test.std_err, "t_stat": test.t_stat, "p_value": test.p_value,
            "detected": test.detected, "held_out_folds": len(test.folds),
            "fold_estimates": [rate.estimate for rate in test.folds],
            "fold_std_errs": [rate.std_err for rate in test.folds]}


SOURCES = ("imagery", "covariates", "imagery + covariates")
COMPARISONS = (("imagery + covariates", "covariates"), ("imagery + covariates", "imagery"), ("imagery", "covariates"))
#: What comparesources compares: the sources, or the run's representation against a simpler one on the same views.
COMPARE_MODES = ("sources", "scales", "dates", "encoder")
REPRESENTATION_LABELS = {"scales": ("multi-scale", "window only"), "dates": ("sequence", "last date"),
                         "encoder": ("encoder", "random convolutions")}


def simpler_representation(compare, study, views, imagery, seed, device, progress=None, is_cancelled=None):
    """The features of the simpler representation ``compare`` sets the run's against, on the same units and views:
    'scales': the base window only; 'dates': the last date only; 'encoder': random convolutions."""
    if compare == "scales" and len(views) < 2:
        raise GeoCateError("Comparing scales needs wider scales.", "Give SCALES, e.g. 33,161.")
    if compare == "dates" and views[0].windows.shape[1] < 2:
        raise GeoCateError("Comparing dates needs imagery of more than one date.", "Give RASTERS_TIME.")
    if compare == "encoder" and not imagery.encoder:
        raise GeoCateError("Comparing encoders needs an ONNX encoder.", "Give ENCODER.")
    if compare == "scales":
        views, pipeline = views[:1], imagery.pipeline(seed=seed, device=device)
    elif compare == "dates":
        views = [dataclasses.replace(v, windows=v.windows[:, -1:], dates=v.dates[-1:]) for v in views]
        pipeline = dataclasses.replace(imagery, time_pooling="concatenate", rasters_time=()).pipeline(
            seed=seed, device=device)
    else:
        pipeline = dataclasses.replace(imagery, encoder=None).pipeline(seed=seed, device=device)
    return pipeline.fit_transform(views, study.used, progress, is_cancelled)


def compare_sources(units, raster_path, bands=None, window_size_px=33, nodata=None, seed=42, n_folds=5,
                    n_estimators=100, n_draws=200, spatial_block=0, device="auto", progress=None,
                    is_cancelled=None, study_design=None, imagery=None, compare="sources"):
    """What the imagery adds: the CATE learner with imagery only, covariates only, and both, on the same folds.

    Every source's learner is cross-fitted on the same honest folds (fold_groups);
    all rules are judged on the same DR scores (outcome models on the image
    features' leading principal components and the covariates, cross-fitted on
    those folds). The formal comparison is the sequential cross-fold test
    (core.evaluate.sequential_rate_test): in each fold k >= 2, every source's
    learner, built on the earlier folds only, ranks fold k, with paired
    half-samples, so differences are paired. The pooled out-of-fold RATEs are
    reported too, as descriptive figures.
    Returns (study, {"cate": {source: (n_used,)}, "tests": {"AUTOC": [...], "QINI": [...]},
    "test_differences": {...}, "rates": {...} (pooled, descriptive), "differences": {...},
    "block_size", "n_clusters", "scores", "ate"}).

    compare (COMPARE_MODES): 'sources' as above; 'scales', 'dates' or 'encoder'
    set the run's representation (``imagery``) against a simpler one on the same
    units, views and folds (simpler_representation), each with the covariates,
    with the same paired test: does the wider context, the sequence or the
    encoder find more heterogeneity?
    """
    if compare not in COMPARE_MODES:
        raise GeoCateError(f"Unknown comparison '{compare}'.", f"Choose one of {', '.join(COMPARE_MODES)}.")
    imagery = imagery or ImageryOptions()
    feature_pipeline = imagery.pipeline(seed=seed, device=device)
    prepared = prepare_study(units, raster_path, bands, window_size_px, nodata, feature_pipeline, imagery,
                             spatial_block, stage(progress, 0.0, 0.2), is_cancelled, keep_windows=compare != "sources")
    study, features, feature_pipeline = prepared.study, prepared.features, prepared.pipeline
    groups, block_size, used = prepared.groups, prepared.block_size, prepared.study.used
    covariates = study.covariates[used] if study.covariates.shape[1] else None
    if compare == "sources":
        rules = {s: (features if "imagery" in s else None, covariates if "covariates" in s else None)
                 for s in SOURCES if covariates is not None or s == "imagery"}
        comparisons = COMPARISONS
    else:
        views = study.views if study.views is not None else study.source.read(None, is_cancelled)[0]
        simpler = simpler_representation(compare, study, views, imagery, seed, device, None, is_cancelled)
        richer_label, simpler_label = REPRESENTATION_LABELS[compare]
        rules = {richer_label: (features, covariates), simpler_label: (simpler, covariates)}
        comparisons = ((richer_label, simpler_label),)
        del views
    study = dataclasses.replace(study, patches=None, views=None)
    sources = list(rules)
    Y, W = study.outcome[used], study.treated[used].astype(int)
    from .design import CLIP
    from .inputs import propensity_inputs

    # One design for every source: folds (strata spread over them), a propensity (known, or estimated once).
    trial = trial_design(study, propensity_inputs(features, covariates), outcome_inputs(features, covariates, seed),
                         groups, n_folds, seed, study_design, is_cancelled)
    folds, inputs_all = trial.folds, trial.inputs
    propensity = None if trial.propensity is None else np.clip(trial.propensity, CLIP, 1 - CLIP)
    cate, learners = {}, {}
    for k, source in enumerate(sources):
        design, inputs, learner = default_learner(*rules[source], n_folds=n_folds, n_estimators=n_estimators,
                                                  seed=seed)
        inputs = with_strata(study, inputs)
        learner.fit(Y, W, design, groups=groups, outcome_inputs=inputs, folds=folds, is_cancelled=is_cancelled,
                    progress=stage(progress, 0.2 + 0.4 * k / len(sources), 0.2 + 0.4 * (k + 1) / len(sources)),
                    propensity=propensity)
        cate[source], learners[source] = learner.cate_, learner
    scores, mu0, mu1, e = cross_fitted_scores(Y, W, inputs_all, folds, seed=seed, is_cancelled=is_cancelled)
    if propensity is not None:
        scores, e = aipw_scores(Y, W, mu0, mu1, propensity), propensity
    rerandomization = None
    if trial.kind == "randomized":   # the test's SEs also from treatment assigned again, as the design did
        from .evaluate import Rerandomization

        rerandomization = Rerandomization(
            outcome=Y, treated=W, mu0=mu0, mu1=mu1, propensity=e, tau=float(scores.mean()),
            assignment=assignment_units(study), strata=None if study.strata is None else study.strata[used],
            known=None if study.propensity is None else study.propensity[used])
    priorities = {}

    def priority_for(sources_wanted):
        def compute(train, test):
            key = int(folds[test][0])
            if key not in priorities:
                priorities[key] = {s: learners[s].priority_for(train, test) for s in sources}
            return np.column_stack([priorities[key][s] for s in sources_wanted])
        return compute

    ate = doubly_robust_ate(scores, groups)
    if rerandomization is not None:
        from .evaluate import rerandomized_ate

        ate = rerandomized_ate(ate, rerandomization, seed=seed)
    tests, test_differences, rates, differences = {}, {}, {}, {}
    pairs = [(a, b) for a, b in comparisons if a in cate and b in cate]
    for step, target in enumerate(("AUTOC", "QINI")):
        step_progress = stage(progress, 0.6 + 0.2 * step, 0.8 + 0.2 * step)
        tests[target] = [sequential_rate_test(scores, folds, priority_for([s]), target, groups, [s], n_draws=n_draws,
                                              seed=seed, progress=step_progress, is_cancelled=is_cancelled,
                                              rerandomization=rerandomization)[0]
                         for s in sources]
        test_differences[target] = [sequential_rate_test(scores, folds, priority_for([a, b]), target, groups, [a, b],
                                                         n_draws=n_draws, seed=seed, is_cancelled=is_cancelled,
                                                         rerandomization=rerandomization)[2]
                                    for a, b in pairs]
        rates[target] = [rank_average_treatment_effect(scores, cate[s], target, n_draws=n_draws, clusters=groups,
                                                       names=[s], seed=seed)[0] for s in sources]
        differences[target] = [rank_average_treatment_effect(scores, np.column_stack([cate[a], cate[b]]), target,
                                                             n_draws=n_draws, clusters=groups, names=[a, b],
                                                             seed=seed)[2] for a, b in pairs]
    if progress is not None:
        progress(1.0, "Done")
    return study, {"cate": cate, "tests": tests, "test_differences": test_differences, "rates": rates,
                   "differences": differences, "block_size": block_size, "n_clusters": int(len(np.unique(groups))),
                   "warnings": [w for w in (overlap_warning(study, window_size_px, block_size),
                                            few_clusters_warning(study, folds), randomization_warning(trial.check))
                                if w],
                   "study_design": trial.kind, "propensity": trial.known_from or (
                       "cross-fitted per unit" if propensity is not None else "the treated share"),
                   "strata": len(study.stratum_labels) if study.strata is not None else None,
                   "randomization_check": trial.check,
                   "device": feature_pipeline.device_, "feature_pipeline": feature_pipeline.describe(),
                   "scores": scores, "ate": ate}


MIN_UNITS_PER_CLUSTER = 20


def where_parts_ran(image_device, cluster_device=None, windows_held="memory"):
    """Which parts of a run ran where (issue 26, point 3), for the run record: the image windows in memory or in a
    memory-mapped file (PreparedStudy.windows_held), the image features on the feature pipeline's device, the
    outcome and propensity models (scikit-learn) and the causal forest (econml) on the processor, the cluster
    model (torch) on its device."""
    parts = {"image windows": windows_held, "image features": image_device,
             "outcome and propensity models": "cpu (scikit-learn)", "causal forest": "cpu (econml)"}
    if cluster_device is not None:
        parts["cluster model"] = cluster_device
    return parts


def forest_heterogeneity_test(study, features, trial, groups, n_folds, seed, is_cancelled=None):
    """estimatecate's heterogeneity test (the sequential cross-fold AUTOC of its causal forest, default settings)
    on a study's used units, with the given trial design's folds, outcome-model inputs and propensity: the check
    imageclusters runs on its clusters (issue 24). Returns (the HeterogeneityTest, the fitted learner: its
    out-of-fold cate_ and cate_se_ inform the clusters' assignment)."""
    used = study.used
    design, _, learner = default_learner(features, study.covariates[used], n_folds=n_folds, seed=seed)
    learner.fit(study.outcome[used], study.treated[used].astype(int), design, groups=groups,
                outcome_inputs=trial.inputs, folds=trial.folds, is_cancelled=is_cancelled,
                propensity=trial.propensity)
    return learner.heterogeneity_test("AUTOC", is_cancelled=is_cancelled,
                                      rerandomization=design_rerandomization(study, learner)), learner


def find_clusters(units, raster_path, bands=None, window_size_px=33, nodata=None, seed=42, n_clusters=0,
                  max_clusters=4, epochs=300, device="auto", n_folds=5, spatial_block=0, progress=None,
                  is_cancelled=None, imagery=None, noise_components=None, forest_check=True):
    """Latent effect clusters from imagery (core.clusters): choose K, cross-fit, summarise, build the image model.

    n_clusters 0: K chosen over 1..max_clusters by cross-fitted held-out
    likelihood, kept above 1 only when the held-out test of the clusters' effects
    rejects; neighbouring clusters whose held-out effects do not differ are then
    merged (refit with one cluster fewer; core.clusters.indistinct_neighbours, on the same sequential models as the
    test, fitted again for each smaller K).
    noise_components: Gaussians in each arm's shared noise mixture (None:
    core.clusters.NOISE_COMPONENTS; 0: the paper's Gaussian noise per cluster).
    forest_check: with K > 1, estimatecate's causal forest and its heterogeneity
    test run on the same units and folds (forest_heterogeneity_test); clusters
    the forest's test does not support are flagged in the warnings; where the
    test supports heterogeneity, each unit's group is its most probable cluster
    given both the cluster model's out-of-fold probabilities and the forest's
    out-of-fold effect (core.clusters.forest_informed_assignment; otherwise the
    model's most probable cluster). Returns (study, result, extras) where result is a Result whose
    cate/interval/group/probabilities are out-of-fold, and extras holds ``fit``
    (the ClusterFit on all units), ``features`` and ``pipeline`` (the fitted
    feature pipeline), ``covariate_means``,
    ``k_table`` (K, held-out log-likelihood per unit, SE), ``clusters`` (rows
    of cluster_table, from a model fit on all units) and ``model`` (the torch
    image -> probabilities network of that model).
    """
    from .clusters import (
        CLUSTER_TEST_ALPHA,
        NOISE_COMPONENTS,
        assigned_by_effect,
        choose_n_clusters,
        cluster_effect_test,
        cluster_table,
        cross_fitted_clusters,
        feature_scaling,
        fit_clusters,
        forest_informed_assignment,
        held_out_cluster_effect,
        image_model,
        indistinct_neighbours,
        point_mass_values,
        sequential_cluster_fits,
        without_empty_clusters,
    )
    from .embed import resolve_device
    from .errors import Cancelled, GeoCateError
    if n_clusters > max_clusters:
        raise GeoCateError(f"CLUSTERS ({n_clusters}) is larger than MAX_CLUSTERS ({max_clusters}).",
                           "Lower CLUSTERS, raise MAX_CLUSTERS, or set CLUSTERS to 0 to choose K from the data.")
    device = resolve_device(device)
    imagery = imagery or ImageryOptions()
    feature_pipeline = imagery.pipeline(seed=seed, device=device)
    timings, started = {}, time.monotonic()

    def enough_units(study):
        if study.n_used / max(n_clusters or max_clusters, 1) < MIN_UNITS_PER_CLUSTER:
            raise GeoCateError(
                f"{study.n_used} units are too few for {n_clusters or max_clusters} clusters: each cluster needs "
                f"about {MIN_UNITS_PER_CLUSTER} units or more.",
                f"Use at most {max(study.n_used // MIN_UNITS_PER_CLUSTER, 1)} clusters, or more units.")

    # The windows are kept: the report's typical windows and the salience rasters read them.
    prepared = prepare_study(units, raster_path, bands, window_size_px, nodata, feature_pipeline, imagery,
                             spatial_block, stage(progress, 0.0, 0.2), is_cancelled, keep_windows=True,
                             check=enough_units)
    study, features, feature_pipeline = prepared.study, prepared.features, prepared.pipeline
    groups, block_size, used = prepared.groups, prepared.block_size, prepared.study.used
    # A block-randomized trial: the strata join the cluster model's covariates (as estimatecate's outcome models).
    covariates = with_strata(study, study.covariates[used])
    design, n_image = design_matrix(features, covariates)
    image_part, covariate_part = design[:, :n_image], design[:, n_image:]
    trial = trial_design(study, design, outcome_inputs(features, study.covariates[used], seed), groups, n_folds, seed)
    folds = trial.folds
    Y, W = study.outcome[used], study.treated[used].astype(int)
    timings["features_s"] = time.monotonic() - started
    # Fits expected: choosing K, the sequential walk of the test, the final model and its cross-fitted folds, the
    # forest's check; a merge of clusters adds its refits (fits.more) without moving the bar back.
    fits = FitCount((max_clusters * n_folds if not n_clusters else 0) + n_folds + 1 + (n_folds - 1)
                    + bool(forest_check))

    def tick(message):
        fraction = fits.tick()
        if is_cancelled is not None and is_cancelled():
            raise Cancelled()
        if progress is not None:
            progress(0.2 + 0.75 * fraction, message)

    # The hurdle's point masses, decided once on the study so that every model of the run (each K, fold and
    # sequential step) has the same; False: none.
    masses = point_mass_values(Y, W)
    options = dict(epochs=epochs, device=device, is_cancelled=is_cancelled,
                   noise_components=NOISE_COMPONENTS if noise_components is None else int(noise_components),
                   point_masses=False if masses is None else masses)
    # The same DR scores and ATE as estimatecate's (same outcome-model inputs, folds and seed): one ATE per study.
    scores, mu0, mu1, _ = cross_fitted_scores(Y, W, trial.inputs, folds, seed=seed, is_cancelled=is_cancelled)
    if trial.propensity is not None:   # strata or known probabilities: the design's own propensity
        scores = aipw_scores(Y, W, mu0, mu1, trial.propensity)
    ate = doubly_robust_ate(scores, groups)
    rerandomization = None
    if trial.kind == "randomized":   # as estimatecate's: its SE also from treatment assigned again
        from .evaluate import Rerandomization, rerandomized_ate

        rerandomization = Rerandomization(
            outcome=Y, treated=W, mu0=mu0, mu1=mu1, propensity=W.mean() if trial.propensity is None else
            trial.propensity, tau=float(scores.mean()), assignment=assignment_units(study),
            strata=None if study.strata is None else study.strata[used],
            known=None if study.propensity is None else study.propensity[used])
        ate = rerandomized_ate(ate, rerandomization, seed=seed)
    t = time.monotonic()
    k_table = None
    chosen_by_data = not n_clusters
    if chosen_by_data:
        n_clusters, k_table = choose_n_clusters(image_part, covariate_part, W, Y, folds, max_clusters, seed, tick,
                                                **options)
    effect_test, k_rule = None, (f"K = {n_clusters} was given (CLUSTERS)" if not chosen_by_data else
                                 f"K = {n_clusters}: the held-out likelihood's choice (the smallest K within one SE "
                                 "of the best)")
    tested_k = n_clusters
    steps = {}      # K -> the sequential walk's models (sequential_cluster_fits): the test's and the merge rule's

    walks_counted = [1]   # walks whose fits the bar counts: the test's, then one per merge to a K > 1

    def walk_for(k):
        if k not in steps:
            if walks_counted[0] > 0:
                walks_counted[0] -= 1
            else:          # a walk the bar did not expect
                fits.more(n_folds - 1)
            steps[k] = sequential_cluster_fits(image_part, covariate_part, W, Y, k, folds, seed, tick, **options)
        return steps[k]

    if n_clusters > 1:   # do the clusters' effects differ in units the model did not see? (issue 24)
        effect_test = cluster_effect_test(image_part, covariate_part, W, Y, n_clusters, scores, folds, groups,
                                          seed, rerandomization, tick, steps=walk_for(n_clusters), **options)
        if effect_test.p_value >= CLUSTER_TEST_ALPHA and chosen_by_data:
            k_rule = (f"K = 1: the likelihood preferred K = {n_clusters}, but the held-out test finds no difference "
                      f"between those clusters' effects in units the model did not see (p = {effect_test.p_value:.3f}"
                      "): the extra clusters describe the outcome's shape, not its effect")
            n_clusters = 1
        elif chosen_by_data:
            k_rule += (f"; the held-out test confirms that the clusters' effects differ (p = "
                       f"{effect_test.p_value:.3f})")
    if not steps:      # K = 1 from the start: no test, so no walk
        fits.skip(n_folds - 1)
        walks_counted[0] = 0
    timings["choose_k_s"] = time.monotonic() - t
    t = time.monotonic()

    def fit_final(k):
        """(final model on all units, its K, the out-of-fold clusters), K = k less any empty clusters."""
        fit, k = without_empty_clusters(lambda k: fit_clusters(image_part, covariate_part, W, Y, k, seed=seed,
                                                               **options),
                                        k, lambda fit: fit.probabilities(image_part, covariate_part))
        tick("Final model on all units")
        return fit, k, cross_fitted_clusters(image_part, covariate_part, W, Y, k, folds, seed=seed, tick=tick,
                                             **options)

    requested = n_clusters
    # Room on the bar for one merge's refits (the final model, its folds and the walk at the smaller K), kept while
    # a merge may follow and passed over when none does.
    reserve = (1 + n_folds + (n_folds - 1) * (n_clusters > 2)) if chosen_by_data and n_clusters > 1 else 0
    fits.more(reserve)
    final, n_clusters, out = fit_final(requested)
    dropped = requested - n_clusters
    # Issue 24, point 2: a K the data chose keeps only clusters whose held-out effects differ from their
    # neighbours' (a likelihood can split one effect into two clusters to fit a point mass or a tail).
    while chosen_by_data and n_clusters > 1:
        pair = indistinct_neighbours(scores, [(test, assigned_by_effect(probabilities, effects))
                                              for test, probabilities, effects in walk_for(n_clusters)],
                                     n_clusters, groups)
        if pair is None:
            break
        why = (f"had held-out effects that do not differ (one-sided p = {pair[2]:.3f}, sequential over the folds)"
               if np.isfinite(pair[2]) else
               "could not be compared (no held-out fold where both held 2 units and 2 groups, or folds without "
               "spread that disagree)")
        # The refit: the final model and its folds, and the sequential walk at the smaller K if it is to be tested.
        need = 1 + n_folds + (n_folds - 1) * (n_clusters - 1 > 1)
        fits.more(max(need - reserve, 0))
        reserve = max(reserve - need, 0)
        walks_counted[0] += n_clusters - 1 > 1
        final, k, out = fit_final(n_clusters - 1)
        if k == 1 and n_clusters - 1 > 1:      # empty clusters dropped down to one: no walk follows
            fits.skip(n_folds - 1)
            walks_counted[0] -= 1
        dropped += n_clusters - 1 - k
        k_rule += f"; clusters {pair[0]} and {pair[1]} of {n_clusters} {why}: refit with K = {k}"
        n_clusters = k
    # Unused room, walks counted that did not run, and no forest check at K = 1.
    fits.skip(reserve + walks_counted[0] * (n_folds - 1) + bool(forest_check and n_clusters == 1))
    timings["clusters_s"] = time.monotonic() - t
    forest_test, assignment = None, "the cluster model's out-of-fold probabilities (the most probable cluster)"
    if forest_check and n_clusters > 1:   # issue 24: does estimatecate's own test support heterogeneity here?
        t = time.monotonic()
        forest_test, forest = forest_heterogeneity_test(study, features, trial, groups, n_folds, seed, is_cancelled)
        tick("Causal forest's heterogeneity test")
        # Each unit's cluster from both out-of-fold views of it: the model's probabilities and the forest's effect,
        # where the forest (fitted on the same folds) finds heterogeneity at all; otherwise its effects are noise.
        if forest_test.p_value < CLUSTER_TEST_ALPHA and np.array_equal(np.asarray(forest.fold_), np.asarray(folds)):
            model_group = out["group"]
            out["group"] = forest_informed_assignment(out["probabilities"], forest.cate_, forest.cate_se_, folds,
                                                      out["effects"])[1]
            assignment = ("the cluster model's out-of-fold probabilities as the prior and the causal forest's "
                          "out-of-fold effect (with its SE) as a measurement of the cluster's effect, the clusters' "
                          "centres fitted in each held-out fold from its model's effects "
                          f"(forest_informed_assignment); {np.mean(out['group'] == model_group):.0%} of units keep "
                          "the model's most probable cluster")
        else:
            assignment += "; the forest's effects were not used, as its test finds no heterogeneity"
        timings["forest_test_s"] = time.monotonic() - t
    table = [row + held_out_cluster_effect(scores, out["group"], row[0], groups)
             for row in cluster_table(final, image_part, covariate_part)]
    raw_covariates = covariates if covariates.shape[1] else np.zeros((len(Y), 0))
    sd = raw_covariates.std(axis=0)
    single = single_window_model(feature_pipeline)
    model = None
    if single is not None:  # the exportable, differentiable image network covers one window at one date
        model = image_model(final, *single, *feature_scaling(features), raw_covariates.mean(axis=0),
                            np.where(sd > 0, sd, 1.0))
        if study.patches is None:  # usability came from the cache: the typical windows are read for the report
            study = dataclasses.replace(study, patches=study.source.read()[0][0].windows[:, 0])
    unsupported = (f"The {tested_k} clusters were given (CLUSTERS), but the held-out test finds no difference "
                   f"between their effects in units the model did not see (p = {effect_test.p_value:.3f}): they may "
                   "describe the outcome's shape (zeros, skew, noise) rather than who gains. Set CLUSTERS to 0 to "
                   "let the data choose, and quote the clusters' held-out effects (dr_effect), not their model "
                   "effects." if effect_test is not None and not chosen_by_data
                   and effect_test.p_value >= CLUSTER_TEST_ALPHA else None)

    forest_disagrees = (f"The causal forest's heterogeneity test (estimatecate's, on the same units and folds) "
                        f"does not support heterogeneity here (held-out AUTOC {forest_test.estimate:.3f}, p = "
                        f"{forest_test.p_value:.3f}) while the cluster model keeps {n_clusters} clusters: treat the "
                        "clusters as exploratory, and quote their held-out effects (dr_effect) rather than the "
                        "model's." if forest_test is not None and forest_test.p_value >= CLUSTER_TEST_ALPHA else None)

    spread = functools.partial(spread_over, used)

    timings["total_s"] = time.monotonic() - started
    metadata = {
        "seed": seed, "window_size_px": int(window_size_px), "window_size_m": float(window_size_px * study.pixel_size_m),
        "bands": list(study.bands), "nodata": nodata, "n_folds": n_folds, "epochs": epochs, "device": device,
        "ran_on": where_parts_ran(feature_pipeline.device_, device, prepared.windows_held),
        "n_clusters": int(n_clusters), "max_clusters": int(max_clusters), "k_table": k_table, "k_rule": k_rule,
        "noise": final.noise_description(), "estimator": final.describe(), "assignment": assignment,
        "effect_test": None if effect_test is None else {
            "method": "sequential cross-fold AUTOC test of the cluster model's CATE (each fold ranked by a model fit "
                      "on the earlier folds; one-sided)", "clusters": int(tested_k),
            "estimate": effect_test.estimate, "std_err": effect_test.std_err, "t": effect_test.t_stat,
            "p_value": effect_test.p_value},
        "forest_test": None if forest_test is None else {
            "method": "estimatecate's sequential cross-fold AUTOC test of the causal forest's CATE, same units and "
                      "folds", "estimate": forest_test.estimate, "std_err": forest_test.std_err,
            "p_value": forest_test.p_value, "supports_clusters": bool(forest_test.p_value < CLUSTER_TEST_ALPHA)},
        "warnings": [w for w in (unsupported, forest_disagrees, overlap_warning(study, window_size_px, block_size),
                                 f"{dropped} of the clusters held (almost) no units and were dropped: "
                                 f"{n_clusters} remain." if dropped else None,
                                 randomization_warning(trial.check), few_clusters_warning(study, folds)) if w],
        "strata": len(study.stratum_labels) if study.strata is not None else None,
        "propensity": trial.known_from or "the treated share", "randomization_check": trial.check,
        "clusters": table, "spatial_block_m": block_size, "dropped": study.dropped, "band_scaling": feature_pipeline.describe()["representation"][0].get("band_scaling"),
        "feature_pipeline": feature_pipeline.describe(),
        "covariates": list(study.covariate_names) + ([f"stratum {label}" for label in study.stratum_labels]
                                                     if study.strata is not None else []),
        "versions": package_versions(), "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    result = Result(
        cate=spread(out["cate"]), cate_lo=spread(out["cate_lo"]), cate_hi=spread(out["cate_hi"]),
        cate_se=spread(out["cate_se"]), group=spread(out["group"], 0, int), dr_scores=spread(scores),
        fold=spread(folds, -1, int), ate=ate.estimate, ate_se=ate.std_err,
        n_used=study.n_used, n_dropped=study.n_dropped, probabilities=spread(out["probabilities"]),
        metadata=metadata)
    if progress is not None:
        progress(1.0, "Done")
    return study, result, {"k_table": k_table, "clusters": table, "model": model, "fit": final, "features": features,
                           "pipeline": feature_pipeline, "covariate_means": raw_covariates.mean(axis=0).tolist()}


def estimate_ate(units, raster_path, design, bands=None, window_size_px=33, nodata=None, seed=42, n_folds=5,
                 n_filters=256, spatial_block=0, device="auto", progress=None, is_cancelled=None,
                 outcome_correction=None, correction="linear", imagery=None, sensitivity=None, nuisance="penalised"):
    """Average effects with a confounding adjustment from the imagery (geocate:estimateate).

    design: a core.design.StudyDesign. The image windows are embedded as in
    estimate_cate; the propensity model (observational designs) sees every
    feature and covariate (core.inputs.propensity_inputs), the outcome models
    the features' leading principal components and the covariates; both
    cross-fitted on folds that keep groups whole. With a binary treatment,
    units outside the design's trimming bounds are left out of the
    estimates (and counted). Returns (study, {"effects": [AdjustedEffect],
    "propensity": (n_used,) P(treated) or (n_used, A), "kept": (n_used,) bool,
    "overlap", "balance", "warnings", "metadata"}). An outcome that is a map's
    prediction is corrected first (``outcome_correction``, as in
    estimate_cate), and the metadata gives the AIPW ATE under every correction.
    ``sensitivity``: (CF_Y, CF_D, RHO) for the omitted-variable analysis of each AIPW contrast
    (core.sensitivity.analyse, observational designs; None: none); the result's "sensitivity".
    ``nuisance`` (core.stacking.NUISANCE_CHOICES; observational designs): "penalised" (the models above),
    "stacked" (each model a super learner over them and gradient boosting, its weights chosen in each training
    fold and reported per fold in the metadata's "propensity_model" and "outcome_models") or "stacked with
    windows" (a small network on the windows joins the propensity's learners and, with the covariates, each
    arm's outcome learners). The sensitivity analysis, and the AIPW ATE under each outcome correction
    (``predicted_outcome``), keep the penalised outcome models. A design with ``calibrate`` (observational)
    calibrates the propensities, after trimming, to balance the outcome models' inputs exactly
    (core.design.balancing_propensities; the metadata's "calibration"); every estimate, the balance table, the
    weights' share and the sensitivity analysis use them, while "propensity" (overlap, trimming, the report's
    plot) stays the model's, and "calibrated_propensity" gives the calibrated ones (None without calibration).
    """
    from .design import RANDOMIZED, overlap_summary
    from .inputs import propensity_inputs
    from .observational import AdjustedContrasts, adjusted_effects, balance_table
    from .stacking import NUISANCE_CHOICES

    if nuisance not in NUISANCE_CHOICES:
        raise GeoCateError(f"Unknown nuisance models '{nuisance}'.", f"Choose one of {', '.join(NUISANCE_CHOICES)}.")
    stacked = nuisance != "penalised" and design.kind != RANDOMIZED
    with_windows = stacked and nuisance == "stacked with windows"
    from .embed import resolve_device

    network_device = resolve_device(device) if with_windows else None   # the window networks' (torch) device
    started = time.monotonic()
    units, versions = corrected_units(units, outcome_correction, correction)
    imagery = imagery or ImageryOptions()
    prepared = prepare_study(units, raster_path, bands, window_size_px, nodata,
                             imagery.pipeline(n_filters, seed, device), imagery, spatial_block,
                             stage(progress, 0.0, 0.5), is_cancelled, read_share=0.6, arms=True,
                             keep_windows=with_windows,
                             check=(lambda s: check_window_network(s, window_size_px)) if with_windows else None)
    study, features, feature_pipeline = prepared.study, prepared.features, prepared.pipeline
    groups, block_size, used = prepared.groups, prepared.block_size, prepared.study.used
    covariates = study.covariates[used] if study.covariates.shape[1] else None
    inputs = outcome_inputs(features, covariates, seed)
    folds = Folds.of_groups(groups, n_folds, seed).fold
    arms = study.treated[used]
    index = np.unique(arms, return_inverse=True)[1]      # each unit's arm, 0..A-1
    n_arms = int(index.max()) + 1
    learners = None
    if stacked:
        from .stacking import nuisance_learners, stacked_propensities

        learners = nuisance_learners(nuisance, index, n_arms, propensity_inputs(features, covariates), inputs,
                                     study.outcome[used], scaled_windows(study, seed) if with_windows else None,
                                     seed, covariates, network_device, groups)
        propensities, fit = stacked_propensities(arms, learners[0], folds, is_cancelled, stage(progress, 0.5, 0.7))
        study = dataclasses.replace(study, patches=None, views=None)   # the networks hold their scaled copy
    else:
        if progress is not None:
            progress(0.6, "Propensity model (cross-fitted)")
        propensities, fit = design.propensities(arms, propensity_inputs(features, covariates), folds, is_cancelled)
    binary = propensities.shape[1] == 2
    kept, bounds = design.keep(propensities[:, 1]) if binary else (np.ones(len(arms), bool), None)
    if binary and kept.sum() < len(kept):
        for arm in (0, 1):
            if (arms[kept] == arm).sum() < 20:
                raise GeoCateError(f"Trimming to propensities in [{bounds[0]:.2f}, {bounds[1]:.2f}] leaves fewer than "
                                   f"20 units in arm {arm}.", "Trim less, or use a design with more overlap.")
    model_propensities = propensities      # the model's: overlap, trimming and its plot describe these
    propensities, calibration = design.calibrated(arms, propensities, inputs, kept)
    mu, outcome_fit = None, {"model": "additive cubic splines under ridge on the components and covariates, "
                                      "per arm, cross-fitted"}
    from .scores import penalty_rule

    penalty = {"penalty": "the splines' ridge penalty by " + penalty_rule(groups[kept])}
    if stacked:
        from .stacking import stacked_arm_models

        # The outcome learners were built on every unit; the stack fits them on the kept units' folds alone.
        rows = np.flatnonzero(kept)
        mu, outcome_fit = stacked_arm_models(study.outcome[used][kept], index[kept], n_arms,
                                             {name: _on_rows(f, rows, len(kept)) for name, f in learners[1].items()},
                                             folds[kept], is_cancelled, stage(progress, 0.7, 0.78))
    elif progress is not None:
        progress(0.75, "Outcome models and estimates")
    contrasts = AdjustedContrasts(n_folds, seed).fit(study.outcome[used][kept], arms[kept], propensities[kept],
                                                     inputs[kept], folds[kept], groups[kept], is_cancelled, mu)
    effects = contrasts.effects_
    warnings = [w for w in (overlap_warning(study, window_size_px, block_size),
                            (calibration or {}).get("warning")) if w]
    analysis = None
    if sensitivity is not None and design.kind != RANDOMIZED:
        from .sensitivity import analyse_or_warn, check_strengths

        check_strengths(*sensitivity)
        analysis = analyse_or_warn(warnings, study.outcome[used], arms, design, features, covariates,
                                   study.covariate_names, folds, groups, seed, *sensitivity, kept=kept,
                                   tick=stage(progress, 0.8, 0.95), is_cancelled=is_cancelled,
                                   estimands=("ATE", "ATT"), penalty_groups=groups, small_sample=True)
        warnings += analysis.warnings if analysis is not None else []
    predicted = None
    if versions is not None:
        ates = {}
        for method, (values, _) in versions.items():
            first = next(e for e in adjusted_effects(values[used][kept], arms[kept], propensities[kept], inputs[kept],
                                                     folds[kept], groups[kept]) if e.estimator == "AIPW")
            ates[method] = {"estimate": first.estimate, "std_err": first.std_err}
        predicted = {"correction": correction, "outcome": outcome_correction.outcome, "map": outcome_correction.map,
                     "outcome_models": "penalised (splines), whatever NUISANCE",
                     "outside_range": int(versions["none"][1][used].sum()),
                     "validation_range": [outcome_correction.low, outcome_correction.high],
                     "ate_by_correction": ates}
    overlap, balance = None, None
    n_pcs = min(5, inputs.shape[1] - (covariates.shape[1] if covariates is not None else 0))
    names = [f"image component {j + 1}" for j in range(n_pcs)] + list(study.covariate_names)
    balance_inputs = np.column_stack([inputs[:, :n_pcs]] + ([covariates] if covariates is not None else []))
    if binary:
        overlap = overlap_summary(model_propensities[:, 1], arms, kept=kept, weights_from=propensities[:, 1])
        if design.kind != RANDOMIZED and overlap["share_outside"] > 0.1:
            warnings.append(f"Poor overlap: {overlap['share_outside']:.0%} of the units have a propensity outside "
                            "[0.05, 0.95], where some units have almost no comparable units in the other arm; "
                            "estimates there rest on few units and large weights. Trim (Crump's rule) and report "
                            "the trimmed population.")
        balance = balance_table(balance_inputs[kept], names, arms[kept], propensities[kept, 1])
        if design.kind == RANDOMIZED and covariates is not None:
            warnings += suspicious_covariates(covariates, study.covariate_names, arms)
    n = len(used)
    metadata = {"design": design.kind, "trim": design.trim if not isinstance(design.trim, tuple) else list(design.trim),
                "trim_bounds": bounds, "n_trimmed": int((~kept).sum()), "propensity_model": fit,
                "calibration": calibration,
                "nuisance": nuisance if stacked else "penalised", "outcome_models": {**outcome_fit, **penalty},
                "overlap": overlap, "warnings": warnings, "seed": seed, "n_folds": n_folds,
                "predicted_outcome": predicted, "feature_pipeline": feature_pipeline.describe(),
                "ran_on": {"image windows": prepared.windows_held, "image features": feature_pipeline.device_,
                           "outcome and propensity models": "cpu (scikit-learn)",
                           **({"window networks": network_device} if with_windows else {})},
                "window_size_px": int(window_size_px), "fold_groups": int(len(np.unique(groups))),
                "standard_errors": standard_errors_rule(groups[kept]),
                "spatial_block_m": block_size, "dropped": study.dropped, "n_used": int(used.sum()),
                "n_dropped": int(n - used.sum()), "arms": [float(a) for a in np.unique(arms)],
                "effects": [dataclasses.asdict(e) for e in effects], "estimator": contrasts.describe(),
                "versions": package_versions(),
                "sensitivity": analysis.record() if analysis is not None else None,
                "timings": {"total_s": round(time.monotonic() - started, 3)}}
    if progress is not None:
        progress(1.0, "Done")
    return study, {"effects": effects, "propensity": model_propensities,
                   "calibrated_propensity": propensities if calibration is not None else None, "arms": arms,
                   "kept": kept, "overlap": overlap, "balance": balance, "warnings": warnings, "metadata": metadata,
                   "sensitivity": analysis}


def standard_errors_rule(groups):
    """The run record's words for estimateate's standard errors (core.observational.adjusted_effects)."""
    from .scores import grouped_clusters

    n_groups = grouped_clusters(groups, len(groups))
    if n_groups is None:
        return "robust (every unit its own cluster), read on the normal distribution"
    return (f"cluster-robust (CR1) over the {n_groups} fold groups (clusters, spatial blocks, units sharing "
            f"coordinates), read on Student's t with {n_groups - 1} degrees of freedom (each SE scaled by t / z)")


def _on_rows(fit_predict, rows, n):
    """A fit_predict over a subset's masks (``rows``: the subset's indices among the ``n`` units fit_predict
    knows)."""

    def on_rows(train, test):
        full_train, full_test = np.zeros(n, bool), np.zeros(n, bool)
        full_train[rows[train]], full_test[rows[test]] = True, True
        return fit_predict(full_train, full_test)

    return on_rows


def check_window_network(study, window_size_px):
    """Refuse, before any feature is computed, a study the network on the windows cannot take (NUISANCE "stacked
    with windows"): more than WINDOW_NETWORK_UNITS units, or windows under 7 pixels (its two convolutions need
    a 2 x 2 map at least to pool a standard deviation over)."""
    from .stacking import WINDOW_NETWORK_UNITS

    if int(study.used.sum()) > WINDOW_NETWORK_UNITS:
        raise GeoCateError(f"The network on the windows is fitted on at most {WINDOW_NETWORK_UNITS} units; this study "
                           f"uses {int(study.used.sum())}.", "Use NUISANCE = stacked (without the windows).")
    if window_size_px < 7:
        raise GeoCateError(f"The network on the windows needs windows of at least 7 pixels; these are {window_size_px}.",
                           "Use a larger window (PATCH_SIZE), or NUISANCE = stacked (without the windows).")


def scaled_windows(study, seed):
    """The used units' windows (the study's first view and date; read again when the feature cache spared
    reading them), scaled band by band (core.embed.BandScaler, as the random convolutions scale them), for the
    networks of the stacked models."""
    from .embed import BandScaler

    windows = study.patches if study.patches is not None else study.source.read()[0][0].windows[:, 0]
    patches = np.asarray(windows[study.used], np.float32)
    return BandScaler(seed=seed).fit(patches).transform(patches)


def panel_image_features(raster_paths, xy, crs_wkt, row_time, window_size_px=33, seed=42, n_components=5,
                         n_filters=128, progress=None, is_cancelled=None):
    """Image features of each (unit, period) row from the raster of its period: (n, n_components), NaN where the
    window is unusable. raster_paths are matched to the distinct times in ascending order. One feature pipeline
    (band scaling and random convolution features, fitted on the first period's windows, then PCA over all rows)
    serves every period, so a unit's features change only when its image does."""
    from sklearn.decomposition import PCA

    row_time = np.asarray(row_time, float)
    periods = np.unique(row_time[np.isfinite(row_time)])
    if len(periods) != len(raster_paths):
        raise GeoCateError(f"{len(raster_paths)} raster(s) were given for {len(periods)} distinct time values.",
                           "Give one raster per time value, in the order of the times (earliest first).")
    features = None
    representation = None
    for k, (period, path) in enumerate(zip(periods, raster_paths)):
        rows = np.flatnonzero(row_time == period)
        found = extract_patches(path, np.asarray(xy, float)[rows], crs_wkt, None, window_size_px, None,
                                stage(progress, k / len(periods), (k + 0.5) / len(periods)), is_cancelled)
        if not found.ok.any():
            raise GeoCateError(f"No unit of period {period:g} has a usable window in '{path}'.",
                               "Check that each period's raster covers the units.")
        if representation is None:
            representation = RandomConvolutions(n_filters=n_filters, seed=seed).fit(found.patches[found.ok])
        values = representation.transform(found.patches, np.flatnonzero(found.ok))
        if features is None:
            features = np.full((len(row_time), values.shape[1]), np.nan)
        features[rows[found.ok]] = values
    usable = np.isfinite(features).all(axis=1)
    scaled = design_matrix(features[usable], None)[0]
    out = np.full((len(row_time), min(n_components, scaled.shape[1])), np.nan)
    out[usable] = PCA(n_components=out.shape[1], random_state=seed).fit_transform(scaled)
    return out

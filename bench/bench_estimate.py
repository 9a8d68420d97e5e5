"""Benchmark of geocate:estimatecate's core on the demo imagery, measured in one process.

Usage: python bench/bench_estimate.py [--units 3000] [--seed 11] [--json out.json] [--skip-defaults]

On one simulated trial (core/simulate.py, 512 image features + 2 covariates):

1. Image features for N windows of 33 x 33 x 3 (GDAL windows, band scaling,
   MOSAIKS features): seconds.
2. The whole job after the features, as estimatecate runs it now: the
   cross-fitted causal forest (fold forests on econml's GRF, nuisances
   cross-fitted inside each fold, spline-ridge outcome models), the
   sequential cross-fold heterogeneity test and the pooled AUTOC.
3. The previous construction, kept here as the reference: five complete
   econml CausalForestDML fits (one per fold, each with its own inner
   cross-fitting; outcome model a random forest on 20 principal components;
   200 trees; grf's max_features) and the pooled AUTOC.
4. One forest with out-of-bag predictions (econml's ``oob_predict``) on the
   same residuals, for the record: why the fold design stays (see below).
5. econml's CausalForestDML with its defaults on the raw features: one fit on
   the units outside fold 1, predicting fold 1, timed; out-of-fold CATEs for
   all units need five such fits, so five times that time is the cost of
   that route (--skip-defaults leaves it out: it takes minutes).

Prints the times, the out-of-fold RMSE and Spearman against the true CATE,
and the ratios; the machine's noise cancels in the ratios.
"""

import argparse
import os
import platform
import sys
import time
import warnings

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO_RASTER = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))


def rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def spearman(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).correlation)


def previous_construction(features, covariates, Y, W, seed):
    """The estimatecate forest of GeoCATE 0.1 (the reference for the speed-up): out-of-fold CATE, pooled AUTOC."""
    import math

    from econml.dml import CausalForestDML
    from sklearn.compose import ColumnTransformer
    from sklearn.decomposition import PCA
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.pipeline import make_pipeline

    from geocate.core.crossfit import location_folds
    from geocate.core.evaluate import rank_average_treatment_effect
    from geocate.core.inputs import design_matrix

    X, n_image = design_matrix(features, covariates)
    n, p = X.shape
    model_y = make_pipeline(
        ColumnTransformer([("image_pca", PCA(n_components=20, random_state=seed), list(range(n_image))),
                           ("covariates", "passthrough", list(range(n_image, p)))]),
        RandomForestRegressor(n_estimators=100, min_samples_leaf=5, max_features=0.33, n_jobs=1, random_state=seed))
    folds = location_folds(np.arange(n), 5, seed)
    cate, m = np.empty(n), np.empty(n)
    for k in range(5):
        train, test = folds != k, folds == k
        forest = CausalForestDML(model_y=model_y, model_t=DummyClassifier(strategy="prior"), discrete_treatment=True,
                                 n_estimators=200, min_samples_leaf=5,
                                 max_features=int(min(math.ceil(math.sqrt(p) + 20), p)), honest=True,
                                 inference=True, cv=2, random_state=seed, n_jobs=-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            forest.fit(Y[train], W[train], X=X[train], groups=np.arange(n)[train])
            cate[test] = forest.effect_inference(X[test]).point_estimate.ravel()
        m[test] = np.mean([model.predict(X[test]) for model in forest.models_y[0]], axis=0)
    e = W.mean()
    scores = cate + (W - e) / (e * (1 - e)) * (Y - m - (W - e) * cate)
    autoc = rank_average_treatment_effect(scores, cate, n_draws=200, seed=seed)[0]
    return cate, folds, autoc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-defaults", action="store_true")
    args = parser.parse_args(argv)

    from geocate.core.embed import BandScaler, RandomConvFeatures
    from geocate.core.evaluate import rank_average_treatment_effect, sequential_rate_test
    from geocate.core.learners import default_learner
    from geocate.core.patches import extract_patches
    from geocate.core.simulate import simulate_trial

    trial = simulate_trial(DEMO_RASTER, n_units=args.units, seed=args.seed)
    truth, Y, W = trial.true_cate, trial.outcome, trial.treated

    started = time.perf_counter()
    found = extract_patches(DEMO_RASTER, trial.coords, trial.crs_wkt, window_size_px=33)
    scaled = BandScaler(seed=args.seed).fit(found.patches).transform(found.patches)
    embedder = RandomConvFeatures(seed=args.seed, device=args.device).fit(scaled)
    features = np.log1p(embedder.transform(scaled))  # core.represent scale
    feature_s = time.perf_counter() - started
    print(f"Image features: {args.units} windows -> {features.shape[1]} features in {feature_s:.2f} s "
          f"on {embedder.device_}", flush=True)

    started = time.perf_counter()
    design, inputs, ours = default_learner(features, trial.covariates, seed=args.seed)
    ours.fit(Y, W, design, outcome_inputs=inputs)
    forest_s = time.perf_counter() - started
    test = sequential_rate_test(ours.dr_scores_, ours.fold_, ours.priority_for, seed=args.seed)[0]
    rank_average_treatment_effect(ours.dr_scores_, ours.cate_, n_draws=200, seed=args.seed)
    ours_s = time.perf_counter() - started
    print(f"Now: forest {forest_s:.1f} s, with the heterogeneity test and pooled AUTOC {ours_s:.1f} s; "
          f"RMSE {rmse(ours.cate_, truth):.4f}, Spearman {spearman(ours.cate_, truth):.4f}; "
          f"test t = {test.t_stat:.1f}", flush=True)

    started = time.perf_counter()
    old_cate, old_folds, _ = previous_construction(features, trial.covariates, Y, W, args.seed)
    old_s = time.perf_counter() - started
    print(f"Previous construction: {old_s:.1f} s; RMSE {rmse(old_cate, truth):.4f}, "
          f"Spearman {spearman(old_cate, truth):.4f}", flush=True)

    from econml.grf import CausalForest

    started = time.perf_counter()
    residual_y = Y - ours.outcome_hat_
    oob_forest = CausalForest(n_estimators=500, min_samples_leaf=5, max_features=ours._forest(design.shape[1]).max_features,
                              honest=True, inference=False, max_samples=0.45, n_jobs=-1, random_state=args.seed)
    oob_forest.fit(design, W - W.mean(), residual_y)
    oob = oob_forest.oob_predict(design).ravel()
    oob_s = time.perf_counter() - started
    print(f"One forest, out-of-bag (500 trees, unit subsampling): {oob_s:.1f} s; RMSE {rmse(oob, truth):.4f}, "
          f"Spearman {spearman(oob, truth):.4f}", flush=True)

    figures = {
        "units": args.units, "device": embedder.device_, "feature_extraction_s": round(feature_s, 2),
        "now_forest_s": round(forest_s, 2), "now_job_after_features_s": round(ours_s, 2),
        "now_whole_job_s": round(feature_s + ours_s, 2),
        "now_rmse": rmse(ours.cate_, truth), "now_spearman": spearman(ours.cate_, truth),
        "previous_job_after_features_s": round(old_s, 2), "previous_whole_job_s": round(feature_s + old_s, 2),
        "previous_rmse": rmse(old_cate, truth), "previous_spearman": spearman(old_cate, truth),
        "oob_one_forest_s": round(oob_s, 2), "oob_rmse": rmse(oob, truth), "oob_spearman": spearman(oob, truth),
        "speed_ratio_whole_job": (feature_s + old_s) / (feature_s + ours_s),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    figures["rmse_ratio_vs_previous"] = figures["now_rmse"] / figures["previous_rmse"]
    print(f"Whole job: previous {figures['previous_whole_job_s']:.1f} s / now {figures['now_whole_job_s']:.1f} s = "
          f"{figures['speed_ratio_whole_job']:.2f}x; RMSE ratio {figures['rmse_ratio_vs_previous']:.3f}, "
          f"Spearman {figures['now_spearman'] - figures['previous_spearman']:+.4f}", flush=True)

    if not args.skip_defaults:
        from econml.dml import CausalForestDML

        held_out = ours.fold_ == 0
        raw = np.column_stack([features, trial.covariates])
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            baseline = CausalForestDML(random_state=args.seed)
            baseline.fit(Y[~held_out], W[~held_out], X=raw[~held_out])
            baseline_cate = baseline.effect(raw[held_out])
        one_fit_s = time.perf_counter() - started
        figures.update({
            "econml_defaults_one_fit_s": round(one_fit_s, 2), "econml_defaults_five_fits_s": round(5 * one_fit_s, 2),
            "econml_defaults_rmse_fold1": rmse(baseline_cate, truth[held_out]),
            "now_rmse_fold1": rmse(ours.cate_[held_out], truth[held_out]),
            "speed_ratio_vs_econml_defaults": 5 * one_fit_s / ours_s,
        })
        figures["rmse_ratio_vs_econml_defaults"] = figures["now_rmse_fold1"] / figures["econml_defaults_rmse_fold1"]
        print(f"econml CausalForestDML defaults on the raw {raw.shape[1]} columns: one fit {one_fit_s:.1f} s, five "
              f"{5 * one_fit_s:.0f} s; RMSE on fold 1 {figures['econml_defaults_rmse_fold1']:.4f} vs ours "
              f"{figures['now_rmse_fold1']:.4f} (ratio {figures['rmse_ratio_vs_econml_defaults']:.3f}); speed ratio "
              f"(five fits / our whole job after features) {figures['speed_ratio_vs_econml_defaults']:.0f}x")
    save_figures(args.json, figures)
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

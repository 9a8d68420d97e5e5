"""Validity of GeoCATE's inference, at full size and seeded: tests of tests, by repetition.

Usage: python bench/bench_validity.py [null|power|clusters|coverage|all] [--reps 200] [--json out.json]

* null: grf's no-heterogeneity design (n = 1000, tau = 1, mu0 depends on X):
  how often each test rejects at 5 % over --reps trials, with its Monte
  Carlo SE: the sequential cross-fold test (what estimatecate reports,
  one-sided) and the previous test (the pooled out-of-fold AUTOC, two-sided);
  then the same on the Landsat demo imagery (500 units, no heterogeneity,
  --reps / 2 outcome draws on the same units).
* power: the demo's heterogeneity (effects 0, 1, 2.5 by image, 500 units) and
  a weaker one (effects 0.6, 1, 1.4), --reps / 2 outcome draws each: the
  rejection rate of both tests.
* clusters: --reps trials of 150 villages x 20 units, intra-village
  correlation 0.3, treatment assigned by village: coverage of the 95 % ATE
  interval with the cluster-robust SE (what GeoCATE reports) and with the
  unit-level SE (what it reported before).
* coverage: the 3000-unit semi-synthetic image trial: coverage of the 95 %
  per-unit intervals overall and by true-effect tercile, the mean bias by
  tercile, for 100, 200 and 400 trees per fold, for the calibrated estimate
  GeoCATE reports, the forest's own prediction and the forest's prediction
  stretched by the BLP calibration slope; the default forest on two more
  trials (--coverage-seeds).

Every figure is a rate or ratio measured in this run; the seeds fix the result.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO_RASTER = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")
PLUGINS = os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins")
sys.path.insert(0, PLUGINS)


def rate_with_se(hits, reps):
    p = hits / reps
    return {"rate": round(p, 4), "mc_se": round(float(np.sqrt(p * (1 - p) / reps)), 4), "reps": reps}


#: The forest the level runs use (--forest): estimatecate's FOREST, "folds" or "out-of-bag".
FOREST = ["folds"]


def both_tests(Y, W, X, seed, inputs=None, n_estimators=100, n_draws=200):
    """(sequential test, previous pooled test) on one trial, as estimatecate runs them.

    inputs: the outcome models' inputs (estimatecate's: the image features'
    leading principal components and the covariates); default X. The forest is FOREST[0] (default_learner's
    classes with n_estimators trees per fold forest, twice that in the out-of-bag forest).
    """
    from geocate.core.evaluate import rank_average_treatment_effect
    from geocate.core.learners import CrossFittedCausalForest, GroupBaggedCausalForest

    model = (CrossFittedCausalForest(n_estimators=n_estimators, seed=seed) if FOREST[0] == "folds" else
             GroupBaggedCausalForest(n_estimators=2 * n_estimators, seed=seed)).fit(Y, W, X, outcome_inputs=inputs)
    test = model.heterogeneity_test(n_draws=n_draws)
    pooled = rank_average_treatment_effect(model.dr_scores_, model.cate_, n_draws=n_draws, seed=seed)[0]
    return test, pooled


def grf_null(n, rng):
    X = rng.uniform(size=(n, 5))
    W = rng.integers(0, 2, n)
    Y = np.maximum(X[:, 0] + X[:, 1], 0) + W * 1.0 + rng.standard_normal(n)
    return X, W, Y


def image_design(n_units=500, seed=3):
    """Features and true scores of a fixed set of units on the demo imagery (outcomes redrawn per rep)."""
    from geocate.core.embed import BandScaler, RandomConvFeatures
    from geocate.core.inputs import design_matrix, outcome_inputs
    from geocate.core.simulate import _window_statistics, _z, simulate_trial

    trial = simulate_trial(DEMO_RASTER, n_units=n_units, seed=seed)
    from geocate.core.patches import extract_patches

    patches = extract_patches(DEMO_RASTER, trial.coords, trial.crs_wkt, window_size_px=33).patches
    scaled = BandScaler(seed=seed).fit(patches).transform(patches)
    features = np.log1p(RandomConvFeatures(seed=seed).fit(scaled).transform(scaled))  # core.represent scale
    brightness, texture = _window_statistics(patches)
    score = _z(brightness) + 0.5 * _z(texture)
    design = design_matrix(features, trial.covariates)[0]
    return design, outcome_inputs(features, trial.covariates, seed, design=design), score, texture, trial.covariates


def image_outcomes(score, texture, covariates, effects, rng):
    effects = np.atleast_1d(np.asarray(effects, float))
    edges = np.quantile(score, np.linspace(0, 1, len(effects) + 1)[1:-1])
    tau = effects[np.searchsorted(edges, score, side="right")]
    n = len(score)
    W = (rng.permutation(n) < n // 2).astype(int)
    from geocate.core.simulate import _z

    Y = _z(texture) + 0.5 * covariates[:, 0] + W * tau + rng.standard_normal(n)
    return W, Y


def run_null(reps, seed=2026, image=True):
    rng = np.random.default_rng(seed)
    seq = old = 0
    t_stats = []
    started = time.perf_counter()
    for rep in range(reps):
        X, W, Y = grf_null(1000, rng)
        test, pooled = both_tests(Y, W, X, seed=rep)
        seq += test.p_value < 0.05
        old += pooled.p_value < 0.05
        t_stats.append(test.t_stat)
    out = {"design": "grf no-heterogeneity, n = 1000", "sequential_one_sided": rate_with_se(seq, reps),
           "previous_pooled_two_sided": rate_with_se(old, reps),
           "sequential_t_mean": round(float(np.mean(t_stats)), 3), "sequential_t_sd": round(float(np.std(t_stats)), 3),
           "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(out), flush=True)
    if not image:
        return {"grf_null": out}
    design, inputs, score, texture, covariates = image_design()
    seq = old = 0
    half = max(reps // 2, 1)
    for rep in range(half):
        W, Y = image_outcomes(score, texture, covariates, [1.0], np.random.default_rng(500 + rep))
        test, pooled = both_tests(Y, W, design, seed=rep, inputs=inputs)
        seq += test.p_value < 0.05
        old += pooled.p_value < 0.05
    image = {"design": "Landsat demo imagery, 500 units, no heterogeneity, outcome redrawn",
             "sequential_one_sided": rate_with_se(seq, half), "previous_pooled_two_sided": rate_with_se(old, half)}
    print(json.dumps(image), flush=True)
    return {"grf_null": out, "image_null": image}


def run_power(reps):
    design, inputs, score, texture, covariates = image_design()
    half = max(reps // 2, 1)
    results = {}
    for name, effects in (("demo effects 0, 1, 2.5", (0.0, 1.0, 2.5)), ("weaker effects 0.6, 1, 1.4", (0.6, 1.0, 1.4))):
        seq = old = 0
        for rep in range(half):
            W, Y = image_outcomes(score, texture, covariates, effects, np.random.default_rng(900 + rep))
            test, pooled = both_tests(Y, W, design, seed=rep, inputs=inputs)
            seq += test.p_value < 0.05
            old += pooled.p_value < 0.05 and pooled.estimate > 0
        results[name] = {"sequential_one_sided": rate_with_se(seq, half),
                         "previous_pooled_two_sided_positive": rate_with_se(old, half)}
        print(name, json.dumps(results[name]), flush=True)
    return results


def run_clusters(reps):
    from geocate.core.crossfit import location_folds
    from geocate.core.scores import cross_fitted_scores, doubly_robust_ate

    clustered = unit_level = 0
    ratio = []
    for rep in range(reps):
        rng = np.random.default_rng(7000 + rep)
        village = np.repeat(np.arange(150), 20)
        W = (rng.random(150) < 0.5).astype(int)[village]
        X = rng.standard_normal((3000, 2))
        Y = 1.0 * W + 0.5 * X[:, 0] + rng.normal(0, np.sqrt(0.3), 150)[village] + rng.normal(0, np.sqrt(0.7), 3000)
        scores = cross_fitted_scores(Y, W, X, location_folds(village, 5, rep), seed=rep)[0]
        by_village, by_unit = doubly_robust_ate(scores, village), doubly_robust_ate(scores)
        clustered += by_village.interval()[0] <= 1 <= by_village.interval()[1]
        unit_level += by_unit.interval()[0] <= 1 <= by_unit.interval()[1]
        ratio.append(by_village.std_err / by_unit.std_err)
    out = {"design": "150 villages x 20 units, ICC 0.3, treatment by village, true ATE 1",
           "cluster_robust_coverage": rate_with_se(clustered, reps),
           "unit_level_coverage": rate_with_se(unit_level, reps),
           "se_ratio_cluster_over_unit": round(float(np.mean(ratio)), 2)}
    print(json.dumps(out), flush=True)
    return out


def run_coverage(seeds=(11,)):
    from scipy.stats import spearmanr

    from geocate.core.embed import BandScaler, RandomConvFeatures
    from geocate.core.evaluate import best_linear_predictor
    from geocate.core.learners import default_learner
    from geocate.core.patches import extract_patches
    from geocate.core.simulate import simulate_trial

    results = {}
    for seed in seeds:
        trial = simulate_trial(DEMO_RASTER, n_units=3000, seed=seed)
        patches = extract_patches(DEMO_RASTER, trial.coords, trial.crs_wkt, window_size_px=33).patches
        scaled = BandScaler(seed=11).fit(patches).transform(patches)
        features = np.log1p(RandomConvFeatures(seed=11).fit(scaled).transform(scaled))  # core.represent scale
        tau = trial.true_cate
        tercile = np.searchsorted(np.quantile(tau, [1 / 3, 2 / 3]), tau, side="right")
        configurations = ((100, 3), (100, 1), (100, 5), (200, 3), (400, 3)) if seed == seeds[0] else ((100, 3),)
        for trees, leaf in configurations:
            design, inputs, learner = default_learner(features, trial.covariates, n_estimators=trees, seed=11)
            learner.min_samples_leaf = leaf
            started = time.perf_counter()
            learner.fit(trial.outcome, trial.treated, design, outcome_inputs=inputs)
            seconds = time.perf_counter() - started
            # Monte Carlo stability: the same folds and data, another forest seed.
            twin = default_learner(features, trial.covariates, n_estimators=trees, seed=12)[2]
            twin.min_samples_leaf = leaf
            twin.fit(trial.outcome, trial.treated, design, outcome_inputs=inputs, folds=learner.fold_)
            stability = {"se_median_relative_change": round(float(np.median(np.abs(twin.cate_se_ - learner.cate_se_)
                                                                             / learner.cate_se_)), 3),
                         "cate_sd_of_difference": round(float(np.std(twin.cate_ - learner.cate_)), 4)}
            # The BLP slope b2 (> 1 when predictions are compressed) stretches the forest's own predictions.
            slope = best_linear_predictor(learner.dr_scores_, learner.cate_raw_).differential
            stretched = learner.cate_raw_.mean() + slope * (learner.cate_raw_ - learner.cate_raw_.mean())
            for label, cate in (("calibrated (reported)", learner.cate_), ("forest alone", learner.cate_raw_),
                                ("forest, BLP slope applied", stretched)):
                low, high = cate - 1.959964 * learner.cate_se_, cate + 1.959964 * learner.cate_se_
                covered = (low <= tau) & (tau <= high)
                key = f"seed {seed}, {trees} trees, leaf {leaf}, {label}"
                results[key] = {
                    "coverage": round(float(covered.mean()), 3),
                    "coverage_by_tercile": [round(float(covered[tercile == t].mean()), 3) for t in range(3)],
                    "bias_by_tercile": [round(float((cate - tau)[tercile == t].mean()), 3) for t in range(3)],
                    "rmse": round(float(np.sqrt(np.mean((cate - tau) ** 2))), 4),
                    "spearman": round(float(spearmanr(cate, tau).correlation), 4),
                    "mean_interval_width": round(float(np.mean(high - low)), 3), "forest_seconds": round(seconds, 1),
                    **stability}
                print(key, json.dumps(results[key]), flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default="all", choices=["null", "power", "clusters", "coverage", "all"])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2026, help="null: the seed of grf's design's draws")
    parser.add_argument("--grf-only", action="store_true", help="null: grf's design only, not the imagery")
    parser.add_argument("--coverage-seeds", type=int, nargs="+", default=[11, 12, 13],
                        help="coverage: trials (every forest setting on the first, the default on all)")
    parser.add_argument("--forest", default="folds", choices=["folds", "out-of-bag"],
                        help="null: estimatecate's FOREST (the fold forests or the out-of-bag forest)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    FOREST[0] = args.forest
    figures = {"forest": args.forest}
    if args.study in ("null", "all"):
        figures["null"] = run_null(args.reps, args.seed, image=not args.grf_only)
    if args.study in ("power", "all"):
        figures["power"] = run_power(args.reps)
    if args.study in ("clusters", "all"):
        figures["clusters"] = run_clusters(args.reps)
    if args.study in ("coverage", "all"):
        figures["coverage"] = run_coverage(tuple(args.coverage_seeds))
    save_figures(args.json, figures)
    return figures


if __name__ == "__main__":
    main()

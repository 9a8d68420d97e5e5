"""The out-of-bag forest (issue 26) beside the fold forests, on the project's trials and two more designs.

Usage: python bench/bench_forest.py [--units 3000] [--trees 200 400 1000] [--bag-sample 0.5] [--variance-parts]
[--json out.json]

Designs (3000 units of the demo imagery, core/simulate.py; 512 image features + 2 covariates): the 3000-unit
trials of bench_validity's ``coverage`` (seeds 11, 12, 13: effects 0, 1, 2.5 by terciles of an image score),
a smooth effect surface (seed 11's units, tau = 1 + 0.8 z(texture) of the window) and effects that jump at one
discontinuity in the imagery (seed 11's units, tau = 0 or 2 on either side of the image score's median). For
each, estimatecate's learners on the same folds and outcome-model inputs: the five fold forests (100 trees each,
the default) and the out-of-bag forest with each number of trees in --trees. Per-unit coverage of the 95 %
interval, its mean width, RMSE and Spearman against the true effects, and the forest's wall time (2 cores).

--variance-parts: for the out-of-bag forest, also the interval's parts (means over units): the little bags'
unbiased variance before its debiasing, the debiased one, the Monte Carlo and calibration parts, and the mean
squared error they should account for; and the coverage of an interval whose little-bag part is the unbiased one,
averaged over the 301 units nearest in rank of raw prediction (151-300 at either end) and clipped at 0 (the same
in expectation whatever the number of bags), with the Monte Carlo and calibration parts.
"""

import argparse
import os
import sys
import time

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO_RASTER = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))


def designs(units):
    """(name, features, covariates, treated, outcome, truth) of every design."""
    from geocate.core.embed import BandScaler, RandomConvFeatures
    from geocate.core.patches import extract_patches
    from geocate.core.simulate import _window_statistics, _z, simulate_trial

    for seed in (11, 12, 13):
        trial = simulate_trial(DEMO_RASTER, n_units=units, seed=seed)
        patches = extract_patches(DEMO_RASTER, trial.coords, trial.crs_wkt, window_size_px=33).patches
        scaled = BandScaler(seed=11).fit(patches).transform(patches)
        features = np.log1p(RandomConvFeatures(seed=11).fit(scaled).transform(scaled))
        yield f"trial seed {seed} (terciles 0, 1, 2.5)", features, trial.covariates, trial.treated, trial.outcome, \
            trial.true_cate
        if seed != 11:
            continue
        brightness, texture = _window_statistics(patches)
        untreated = trial.outcome - trial.treated * trial.true_cate
        smooth = 1 + 0.8 * _z(texture)
        yield "smooth surface (1 + 0.8 z(texture))", features, trial.covariates, trial.treated, \
            untreated + trial.treated * smooth, smooth
        score = _z(brightness) + 0.5 * _z(texture)
        jump = np.where(score > np.median(score), 2.0, 0.0)
        yield "one discontinuity (0 or 2 at the score's median)", features, trial.covariates, trial.treated, \
            untreated + trial.treated * jump, jump


def measure(model, truth, seconds):
    from scipy.stats import spearmanr

    covered = (model.cate_lo_ <= truth) & (truth <= model.cate_hi_)
    return {"coverage": round(float(covered.mean()), 3),
            "mean_width": round(float(np.mean(model.cate_hi_ - model.cate_lo_)), 3),
            "rmse": round(float(np.sqrt(np.mean((model.cate_ - truth) ** 2))), 4),
            "spearman": round(float(spearmanr(model.cate_, truth).correlation), 4),
            "forest_seconds": round(seconds, 1)}


def smoothed(values, key, width=301):
    """values averaged over the ``width`` units nearest in rank of ``key`` (a running mean in key order; half of
    that, plus one, to width - 1 units at either end)."""
    order = np.argsort(key, kind="stable")
    sums = np.concatenate([[0.0], np.cumsum(values[order])])
    n, half = len(values), width // 2
    low, high = np.clip(np.arange(n) - half, 0, n), np.clip(np.arange(n) + half + 1, 0, n)
    out = np.empty(n)
    out[order] = (sums[high] - sums[low]) / (high - low)
    return out


def variance_parts(model, truth):
    """The out-of-bag interval's parts and the coverage of its unbiased, smoothed version (see --variance-parts)."""
    parts = model.variance_parts_
    debiased = parts["debiased"]
    se = np.sqrt(np.maximum(smoothed(parts["unbiased"], model.cate_raw_), 0) + parts["monte_carlo"]
                 + parts["calibration"])
    return {"mean_squared_error": round(float(np.mean((model.cate_ - truth) ** 2)), 4),
            "variance_unbiased": round(float(np.mean(parts["unbiased"])), 4),
            "unbiased_negative_share": round(float(np.mean(parts["unbiased"] < 0)), 3),
            "variance_debiased": round(float(np.mean(debiased)), 4),
            "variance_monte_carlo": round(float(np.mean(parts["monte_carlo"])), 4),
            "variance_calibration": round(float(np.mean(parts["calibration"])), 4),
            "coverage_unbiased_smoothed": round(float(np.mean(np.abs(model.cate_ - truth) <= 1.959964 * se)), 3),
            "mean_width_unbiased_smoothed": round(float(np.mean(2 * 1.959964 * se)), 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=3000)
    parser.add_argument("--trees", type=int, nargs="+", default=[200, 400, 1000])
    parser.add_argument("--bag-sample", type=float, default=0.5,
                        help="share of its bag's units each out-of-bag tree grows on (default 0.5, estimatecate's)")
    parser.add_argument("--variance-parts", action="store_true",
                        help="also the out-of-bag interval's parts and an unbiased, smoothed interval's coverage")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from geocate.core.learners import GroupBaggedCausalForest, default_learner

    figures = {}
    for name, features, covariates, W, Y, truth in designs(args.units):
        design, inputs, folds_model = default_learner(features, covariates, seed=11)
        started = time.perf_counter()
        folds_model.fit(Y, W, design, outcome_inputs=inputs)
        rows = {"five fold forests, 100 trees each (default)": measure(folds_model, truth,
                                                                      time.perf_counter() - started)}
        for trees in args.trees:
            model = GroupBaggedCausalForest(n_estimators=trees, seed=11, bag_sample=args.bag_sample)
            started = time.perf_counter()
            model.fit(Y, W, design, outcome_inputs=inputs, folds=folds_model.fold_)
            rows[f"out-of-bag forest, {trees} trees"] = measure(model, truth, time.perf_counter() - started)
            if args.variance_parts:
                rows[f"out-of-bag forest, {trees} trees"].update(variance_parts(model, truth))
        figures[name] = rows
        for label, row in rows.items():
            print(f"{name:52s} {label:45s} {row}", flush=True)
    save_figures(args.json, figures)
    return figures


if __name__ == "__main__":
    main()

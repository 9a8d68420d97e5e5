"""Benchmark of geocate:estimatecate's core on the demo study, measured in one process.

Usage: python bench/bench_estimate.py [--units 3000] [--seed 11] [--json out.json]

1. Image feature extraction for N windows of 33 x 33 x 3 (GDAL windows, band
   scaling, MOSAIKS features): seconds.
2. The default CATE learner (PCA of the features + covariates, cross-fitted
   CausalForestDML with explicit nuisances, 5 folds): seconds, and RMSE and
   Spearman against the true CATE, out-of-fold.
3. The baseline: econml's CausalForestDML with its defaults on the raw feature
   matrix (all 2 x 256 features + covariates). Reported CATEs must be
   out-of-fold, so the baseline is fit once on the units outside fold 1 and
   judged on fold 1; the default learner is judged on the same units. The
   same-task speed ratio times that fit against the default learner's fold 1
   (fit on the same units, predicting the same units); the whole-run ratio
   times it against all five folds of the default learner (a lower bound).

Prints both times, their ratio, and both RMSEs; the machine noise cancels in
the ratios.
"""

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_RASTER = os.path.join(os.path.dirname(HERE), "resources", "demo", "landsat8_demo_b234.tif")


def rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def spearman(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).correlation)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from geocate.core.embed import BandScaler, RandomConvFeatures
    from geocate.core.learners import default_learner
    from geocate.core.patches import extract_patches
    from geocate.core.simulate import simulate_trial

    trial = simulate_trial(DEMO_RASTER, n_units=args.units, seed=args.seed)
    truth = trial.true_cate

    started = time.perf_counter()
    found = extract_patches(DEMO_RASTER, trial.coords, trial.crs_wkt, window_size_px=33)
    scaled = BandScaler(seed=args.seed).fit(found.patches).transform(found.patches)
    embedder = RandomConvFeatures(seed=args.seed, device=args.device).fit(scaled)
    features = embedder.transform(scaled)
    feature_s = time.perf_counter() - started
    print(f"Image features: {args.units} windows of 33 x 33 x 3 -> {features.shape[1]} features "
          f"in {feature_s:.2f} s on {embedder.device_}", flush=True)

    started = time.perf_counter()
    design, ours = default_learner(features, trial.covariates, seed=args.seed)
    ours.fit(trial.outcome, trial.treated, design)
    ours_s = time.perf_counter() - started
    print(f"Default learner (causal forest on the features, PCA outcome model, 5 folds cross-fitted): {ours_s:.1f} s, "
          f"out-of-fold RMSE {rmse(ours.cate_, truth):.3f}, Spearman {spearman(ours.cate_, truth):.3f}",
          flush=True)

    from econml.dml import CausalForestDML

    held_out = ours.fold_ == 0
    raw = np.column_stack([features, trial.covariates])
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        baseline = CausalForestDML(random_state=args.seed)
        baseline.fit(trial.outcome[~held_out], trial.treated[~held_out], X=raw[~held_out])
        baseline_cate = baseline.effect(raw[held_out])
    baseline_s = time.perf_counter() - started
    figures = {
        "units": args.units,
        "feature_extraction_s": round(feature_s, 2),
        "device": embedder.device_,
        "default_learner_s": round(ours_s, 2),
        "default_learner_rmse_all": rmse(ours.cate_, truth),
        "default_learner_rmse_fold1": rmse(ours.cate_[held_out], truth[held_out]),
        "default_learner_spearman_fold1": spearman(ours.cate_[held_out], truth[held_out]),
        "econml_defaults_one_fit_s": round(baseline_s, 2),
        "econml_defaults_rmse_fold1": rmse(baseline_cate, truth[held_out]),
        "econml_defaults_spearman_fold1": spearman(baseline_cate, truth[held_out]),
        "n_fold1": int(held_out.sum()),
        "default_learner_fold1_s": round(ours.fold_seconds_[0], 2),
        "speed_ratio_same_task": baseline_s / ours.fold_seconds_[0],
        "speed_ratio_whole_run": baseline_s / ours_s,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    figures["rmse_ratio"] = figures["default_learner_rmse_fold1"] / figures["econml_defaults_rmse_fold1"]
    print(f"econml CausalForestDML defaults on the raw {raw.shape[1]} columns, one fit: {baseline_s:.1f} s, "
          f"RMSE on fold 1 {figures['econml_defaults_rmse_fold1']:.3f} "
          f"(default learner on the same {figures['n_fold1']} units: {figures['default_learner_rmse_fold1']:.3f})")
    print(f"Speed ratio, same task (fit on the units outside fold 1, predict fold 1): "
          f"{baseline_s:.1f} s / {ours.fold_seconds_[0]:.1f} s = {figures['speed_ratio_same_task']:.1f}x")
    print(f"Speed ratio, whole run (one baseline fit / all 5 folds of the default learner): "
          f"{figures['speed_ratio_whole_run']:.1f}x (a lower bound)")
    print(f"RMSE ratio on fold 1 (default learner / defaults): {figures['rmse_ratio']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

"""Outcomes taken from a map predicted from imagery ("One Map, Many Trials"): attenuation and its corrections.

Usage: python bench/bench_corrections.py [--trials 100] [--units 1000] [--json out.json]

A world (core.simulate.simulate_predicted_outcome_world, seed 1): the true
outcome y is a latent state driven by the image and a covariate; the map is a
ridge regression of y on 20 noisy image features, fit on 2000 training units,
so it predicts E[y | image], shrunk toward the mean; the map makers'
validation set is 1000 further units. The correction is fit on the
validation units only. Then --trials randomized trials of --units further
units each, with true effects drawn uniformly from -2 to 2, take their outcome
from the map. For each correction (none, linear, Tweedie): the slope of the
estimated ATE (doubly robust, covariate in the outcome models) on the true
effect, the mean absolute error of the ATE, and the coverage of its 95 %
interval; and the prediction-powered ATE with the truth measured on a random
20 % of each trial's units. Every figure is measured in this run; the seeds fix it.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), ".qgis-profile", "profiles", "default", "python", "plugins"))


def main(argv=None):
    from geocate.core.corrections import ate_by_correction, fit_correction, prediction_powered_ate
    from geocate.core.simulate import simulate_predicted_outcome_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--units", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    world = simulate_predicted_outcome_world(seed=1)
    correction = fit_correction(world.validation_truth, world.validation_prediction, "y")
    rng = np.random.default_rng(2026)
    taus, estimates, covered = [], {}, {}
    for trial in range(args.trials):
        tau = float(rng.uniform(-2, 2))
        treated, truth, prediction, z = world.trial(args.units, tau, 10_000 + trial)
        taus.append(tau)
        ates = ate_by_correction(correction, prediction, treated, z[:, None], seed=trial)
        labelled = np.random.default_rng(20_000 + trial).random(args.units) < 0.2
        ates["prediction-powered (20 % truth)"] = prediction_powered_ate(prediction, np.where(labelled, truth, np.nan),
                                                                         treated)
        for name, ate in ates.items():
            low, high = ate.interval()
            estimates.setdefault(name, []).append(ate.estimate)
            covered.setdefault(name, []).append(low <= tau <= high)
    taus = np.array(taus)
    naive_error = float(np.mean(np.abs(np.array(estimates["none"]) - taus)))
    figures = {"trials": args.trials, "units_per_trial": args.units,
               "validation": {"n": correction.n_validation, "slope_of_prediction_on_truth": correction.slope,
                              "sigma": float(np.sqrt(correction.sigma2))}, "by_correction": {}}
    for name, values in estimates.items():
        values = np.array(values)
        error = float(np.mean(np.abs(values - taus)))
        figures["by_correction"][name] = {
            "slope_on_true_effect": round(float(np.polyfit(taus, values, 1)[0]), 3),
            "mean_abs_error": round(error, 4), "error_reduction": round(1 - error / naive_error, 3),
            "coverage_95": round(float(np.mean(covered[name])), 3)}
        print(name, json.dumps(figures["by_correction"][name]), flush=True)
    save_figures(args.json, figures, started)
    return figures


if __name__ == "__main__":
    main()

"""Trials randomized within strata (issue 25): the ATE with and without STRATA, over repeated draws.

Usage: python bench/bench_strata.py [--draws 100] [--units 1000] [--json out.json]

Design (a new draw of units, effects, assignment and noise per repetition; seeds 1000 + r): units of
core.simulate.simulate_trial on the demo imagery (effects 0, 1, 2.5 by image), split into two districts at the
scene's middle; randomized with probability 0.25 in the west and 0.75 in the east; the east's outcomes 2
higher. Reported: mean ATE minus the truth (the mean true CATE of the units used) and the coverage of the 95 %
interval, with STRATA and without (one probability for every unit, the behaviour before); the per-unit CATE RMSE
with STRATA against simple trials of the same units (no district effect): with probability 0.5, and with
probability 0.25 for every unit - the same information per unit as the strata's 0.25 / 0.75 (p (1 - p) = 0.1875
in both), so that the comparison shows what the estimator loses to the strata themselves rather than to
unbalanced arms; and how often the randomization check warns (goal: in >= 95 % of the draws without STRATA, in
<= 5 % of the simple trials). ``--designs`` runs some of them (the draws are the same whichever are run).
"""

import argparse
import json
import os
import sys

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))
DEMO_RASTER = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")


def draw(seed, n_units):
    from geocate.core.simulate import simulate_trial
    from geocate.core.study import UnitTable

    trial = simulate_trial(DEMO_RASTER, n_units=n_units, seed=seed)
    rng = np.random.default_rng(seed + 1)
    east = trial.coords[:, 0] > np.median(trial.coords[:, 0])
    baseline = trial.outcome - trial.treated * trial.true_cate
    stratified_w = (rng.random(n_units) < np.where(east, 0.75, 0.25)).astype(float)
    simple_w = (rng.random(n_units) < 0.5).astype(float)
    quarter_w = (rng.random(n_units) < 0.25).astype(float)

    def table(treated, outcome, strata=None):
        return UnitTable(xy=trial.coords, crs_wkt=trial.crs_wkt, treated=treated, outcome=outcome,
                         covariates=trial.covariates, covariate_names=trial.covariate_names, strata=strata)

    district = list(np.where(east, "east", "west"))
    stratified_y = baseline + 2.0 * east + stratified_w * trial.true_cate
    simple_y = baseline + simple_w * trial.true_cate
    return trial.true_cate, {"with STRATA": table(stratified_w, stratified_y, district),
                             "without STRATA": table(stratified_w, stratified_y),
                             "simple trial": table(simple_w, simple_y),
                             "simple trial at 0.25": table(quarter_w, baseline + quarter_w * trial.true_cate)}


def main(argv=None):
    from geocate.core.pipeline import estimate_cate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--units", type=int, default=1000)
    parser.add_argument("--designs", help="comma-separated names of the designs to run (default: all)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = {}
    for r in range(args.draws):
        truth_cate, tables = draw(1000 + r, args.units)
        for name, units in tables.items():
            if args.designs and name not in args.designs.split(","):
                continue
            _, result = estimate_cate(units, DEMO_RASTER, seed=r)
            used = np.isfinite(result.cate)
            truth = float(truth_cate[used].mean())
            covered = abs(result.ate - truth) <= 1.959964 * result.ate_se
            rmse = float(np.sqrt(np.mean((result.cate[used] - truth_cate[used]) ** 2)))
            check = result.metadata.get("randomization_check") or {}
            rows.setdefault(name, []).append((result.ate - truth, covered, rmse, bool(check.get("warns"))))
        if (r + 1) % 10 == 0:
            print(f"{r + 1} draws", flush=True)
    figures = {name: {"bias": float(np.mean([v[0] for v in values])),
                      "coverage_95": float(np.mean([v[1] for v in values])),
                      "rmse": float(np.mean([v[2] for v in values])),
                      "randomization_check_warns": float(np.mean([v[3] for v in values])), "draws": len(values)}
               for name, values in rows.items()}
    print(json.dumps(figures, indent=2))
    save_figures(args.json, figures)


if __name__ == "__main__":
    main()

"""Sensitivity to an unobserved confounder (core.sensitivity, issue 23): coverage at a withheld confounder's
strength, and a cross-check against DoubleML on the same nuisance predictions.

Usage: python bench/bench_sensitivity.py [withheld|doubleml|all] [--draws 100] [--units 2000]
       [--calibrate on|off] [--doubleml-venv outputs/doubleml-venv] [--json out.json]

--calibrate: estimateate's CALIBRATE (on, its default: the propensities calibrated to balance the outcome models'
inputs, core.design.balancing_propensities; off: the model's, as the figures before 2026-12-07's eighteenth session).

* withheld (--draws draws, seeds 0..; for the ATE, then for the ATT with an effect 1 + 0.5 X): treatment and outcome both driven by an observed X and a confounder U the
  user does not have (logit P(W = 1) = 0.5 X + 0.5 U; Y = W + X + 0.6 U + noise; true ATE 1). The nuisance models
  are estimateate's (core.design propensity, core.scores arm models; 5 folds). U's strength is what it adds to the
  model that sees it (its gain statistics, core.sensitivity.benchmark: the "true strength by construction"). Reported:
  the naive AIPW interval's coverage of 1 (without U), and the coverage of the sensitivity interval at U's strength
  (goal >= 0.90), the mean bias, the mean strengths.
* doubleml: one draw of the same design; DoubleMLIRM (ATE and ATTE scores, trimming 0.01 as GeoCATE's clip) fit on GeoCATE's
  own cross-fitted predictions (external_predictions), its sensitivity_analysis at CF_Y = CF_D = 0.03, RHO = 1 and
  its robustness values, against core.sensitivity; run in a separate virtual environment without QGIS (DoubleML
  needs numpy 2; created if missing with pip install doubleml scikit-learn numpy pandas).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))
sys.path.insert(0, HERE)

DOUBLEML_SCRIPT = r'''
import json, sys, warnings
import numpy as np, pandas as pd
import doubleml as dml
from sklearn.linear_model import LinearRegression, LogisticRegression
warnings.simplefilter("ignore")
data = np.load(sys.argv[1])
df = pd.DataFrame({"y": data["y"], "d": data["d"], "x": data["x"]})
model = dml.DoubleMLIRM(dml.DoubleMLData(df, "y", "d", ["x"]), ml_g=LinearRegression(), ml_m=LogisticRegression(),
                        score=sys.argv[3], trimming_threshold=0.01, n_folds=5)
model.fit(external_predictions={"d": {"ml_g0": data["g0"][:, None], "ml_g1": data["g1"][:, None],
                                      "ml_m": data["m"][:, None]}})
model.sensitivity_analysis(cf_y=0.03, cf_d=0.03, rho=1.0, level=0.975)   # one-sided 97.5 %: econml's two-sided 95 %
params = model.sensitivity_params
out = {"version": dml.__version__, "theta": float(model.coef[0]),
       "sigma2": float(np.ravel(model.sensitivity_elements["sigma2"])[0]),
       "nu2": float(np.ravel(model.sensitivity_elements["nu2"])[0]),
       "theta_low": float(np.ravel(params["theta"]["lower"])[0]), "theta_high": float(np.ravel(params["theta"]["upper"])[0]),
       "ci_low": float(np.ravel(params["ci"]["lower"])[0]), "ci_high": float(np.ravel(params["ci"]["upper"])[0]),
       "rv": float(np.ravel(params["rv"])[0]), "rva": float(np.ravel(params["rva"])[0])}
json.dump(out, open(sys.argv[2], "w"))
'''


def draw(seed, n):
    rng = np.random.default_rng(seed)
    X, U = rng.standard_normal(n), rng.standard_normal(n)
    W = (rng.random(n) < 1 / (1 + np.exp(-(0.5 * X + 0.5 * U)))).astype(int)
    Y = 1.0 * W + X + 0.6 * U + rng.standard_normal(n)
    return X, U, W, Y


CALIBRATE = True   # --calibrate


def nuisances(Y, W, inputs, seed):
    from geocate.core.crossfit import location_folds
    from geocate.core.design import CLIP, StudyDesign
    from geocate.core.scores import arm_models

    folds = location_folds(np.arange(len(Y)), 5, seed)
    design = StudyDesign("observational", calibrate=CALIBRATE)
    e, _ = design.propensities(W, inputs, folds)
    e, _ = design.calibrated(W, e, inputs)
    return arm_models(Y, W, 2, inputs, folds), np.clip(e, CLIP, 1 - CLIP)


def withheld(draws, n, estimand="ATE"):
    """estimand "ATT": the same design with an effect that grows with X (1 + 0.5 X; treated units have larger X),
    the truth each draw's mean effect over its treated units."""
    from geocate.core.scores import Z95
    from geocate.core.sensitivity import benchmark, bounds, contrast_elements

    rows = []
    for seed in range(draws):
        X, U, W, Y = draw(seed, n)
        truth = 1.0
        if estimand == "ATT":
            Y = Y + W * 0.5 * X
            truth = float(np.mean(1 + 0.5 * X[W == 1]))
        long = contrast_elements(Y, W, *nuisances(Y, W, np.column_stack([X, U]), seed), 1, 0, estimand=estimand)
        short = contrast_elements(Y, W, *nuisances(Y, W, X[:, None], seed), 1, 0, estimand=estimand)
        strength = benchmark("U", long, short)
        _, _, ci_low, ci_high = bounds(short, min(strength.cf_y, 0.999), min(strength.cf_d, 0.999), 1.0)
        se = float(np.sqrt(short.cov[0, 0]))
        rows.append({"seed": seed, "theta": short.theta - truth + 1,
                     "naive_covers": bool(abs(short.theta - truth) <= Z95 * se),
                     "bounds_cover": bool(ci_low <= truth <= ci_high), "cf_y": strength.cf_y, "cf_d": strength.cf_d,
                     "rho": strength.rho, "ci": [ci_low, ci_high]})
    figures = {"estimand": estimand, "draws": draws, "units": n,
               "naive_coverage": float(np.mean([r["naive_covers"] for r in rows])),
               "bounds_coverage": float(np.mean([r["bounds_cover"] for r in rows])),
               "mean_bias_without_u": float(np.mean([r["theta"] - 1 for r in rows])),
               "mean_cf_y": float(np.mean([r["cf_y"] for r in rows])),
               "mean_cf_d": float(np.mean([r["cf_d"] for r in rows])),
               "mean_rho": float(np.mean([r["rho"] for r in rows])),
               "mean_interval_width": float(np.mean([r["ci"][1] - r["ci"][0] for r in rows]))}
    print("withheld", estimand, json.dumps(figures), flush=True)
    return figures


def doubleml(n, venv):
    """The ATE (DoubleML's score "ATE") and the ATT (score "ATTE") on the same nuisance predictions."""
    from bench_eventstudy import _clean_environment, _doubleml_python

    from geocate.core.sensitivity import bounds, contrast_elements, robustness_values

    X, U, W, Y = draw(0, n)
    mu, e = nuisances(Y, W, X[:, None], 0)
    python = _doubleml_python(venv)
    figures = {}
    for estimand, score in (("ATE", "ATE"), ("ATT", "ATTE")):
        ours = contrast_elements(Y, W, mu, e, 1, 0, estimand=estimand)
        low, high, ci_low, ci_high = bounds(ours, 0.03, 0.03, 1.0)
        rv, rva = robustness_values(ours)
        with tempfile.TemporaryDirectory() as folder:
            data, out, script = (os.path.join(folder, name) for name in ("data.npz", "out.json", "run.py"))
            np.savez(data, y=Y, d=W.astype(float), x=X, g0=mu[:, 0], g1=mu[:, 1], m=e[:, 1])
            with open(script, "w", encoding="utf-8") as handle:
                handle.write(DOUBLEML_SCRIPT)
            subprocess.run([python, script, data, out, score], check=True, env=_clean_environment())
            with open(out, encoding="utf-8") as handle:
                theirs = json.load(handle)
        mine = {"theta": ours.theta, "sigma2": ours.sigma2, "nu2": ours.nu2, "theta_low": low, "theta_high": high,
                "ci_low": ci_low, "ci_high": ci_high, "rv": rv, "rva": rva}
        figures[estimand] = {"doubleml": theirs["version"], "geocate": mine, "doubleml_values": theirs,
                             "max_abs_difference": {k: abs(mine[k] - theirs[k]) for k in mine}}
        print("doubleml", estimand, json.dumps(figures[estimand]), flush=True)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default="all", choices=["withheld", "doubleml", "all"])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--calibrate", default="on", choices=("on", "off"))
    parser.add_argument("--doubleml-venv", default=os.path.join(ROOT, "outputs", "doubleml-venv"))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    global CALIBRATE
    CALIBRATE = args.calibrate == "on"
    results = {"calibrate": args.calibrate}
    if args.study in ("withheld", "all"):
        results["withheld"] = withheld(args.draws, args.units)
        results["withheld_att"] = withheld(args.draws, args.units, "ATT")
    if args.study in ("doubleml", "all"):
        results["doubleml"] = doubleml(args.units, args.doubleml_venv)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"total {results['seconds']} s", flush=True)
    save_figures(args.json, results)


if __name__ == "__main__":
    main()

"""Staggered adoption: Callaway & Sant'Anna ATT(g,t) (core.eventstudy) on a staggered design with known effects.

Usage: python bench/bench_eventstudy.py [--n-units 1500] [--reps 20] [--timing-units 10000] [--timing-periods 10]
       [--no-doubleml] [--doubleml-venv outputs/doubleml-venv] [--seed 0] [--json out.json]

The design (tests/core/test_eventstudy.py's simulate_staggered): T = 8 periods, cohorts adopting in periods 3, 5
and 7 and never-treated units, adoption driven by two baseline covariates; unit effects larger for early
adopters, trending and uneven year shocks that jump in the adoption years, a covariate-specific trend (parallel
trends hold only given the covariates), effects growing with time since adoption and larger for earlier cohorts.

* accuracy (one panel, --n-units, --seed): the overall ATT (post ATT(g,t) weighted by cohort size) and the
  event-time effects against the truth (acceptance: overall within 0.05, e = 0..3 within 0.08, placebo effects
  covering 0), for the never-treated and the not-yet-treated comparison groups; the difference of means without
  covariates and two-way fixed-effects OLS (static TWFE) on the same panel alongside.
* coverage (--reps panels of --n-units, seeds 100 + r): coverage of the 95 % interval of the overall ATT
  (acceptance: >= 0.9) and of e = 0..3, bias, mean SE against the spread of the estimates; TWFE's mean bias.
* timing: --timing-units x --timing-periods, a cohort adopting in every period from the second on (the most
  cells: 81 at T = 10), covariates and the spline ridge, both comparison groups, 999 bootstrap draws.
* DoubleML: DoubleMLDIDMulti (gt_combinations "standard": the same base periods) on the accuracy panel with
  linear regression and logistic regression, run in a separate virtual environment without QGIS (DoubleML needs
  numpy 2; created with ``python3 -m venv`` and ``pip install doubleml scikit-learn numpy pandas`` if missing),
  against core.eventstudy with the linear outcome regression (and the spline ridge): max |difference| / combined
  SE over the ATT(g,t), both comparison groups.
Every figure is measured in this run; the seeds fix it.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))

DOUBLEML_SCRIPT = r'''
import json, sys, warnings
import numpy as np, pandas as pd
import doubleml as dml
from sklearn.linear_model import LinearRegression, LogisticRegression
warnings.simplefilter("ignore")
path, out = sys.argv[1], sys.argv[2]
df = pd.read_csv(path)
df["G"] = df["G"].astype(float)
data = dml.data.DoubleMLPanelData(df, y_col="y", d_cols="G", id_col="id", t_col="t", x_cols=["x1", "x2"])
result = {"version": dml.__version__, "numpy": np.__version__}
for control in ("never_treated", "not_yet_treated"):
    np.random.seed(3)                       # DoubleML draws its folds with numpy's global generator
    model = dml.did.DoubleMLDIDMulti(data, ml_g=LinearRegression(), ml_m=LogisticRegression(),
                                     gt_combinations="standard", control_group=control, n_folds=5)
    model.fit()
    cells = [{"g": float(g), "base": float(b), "t": float(t), "att": float(c), "se": float(s)}
             for (g, b, t), c, s in zip(model.gt_combinations, np.ravel(model.coef), np.ravel(model.se))]
    event = model.aggregate("eventstudy")
    frame = event.aggregated_frameworks
    result[control] = {"cells": cells, "event_names": [str(n) for n in event.aggregation_names],
                       "event_att": np.ravel(frame.thetas).tolist(), "event_se": np.ravel(frame.ses).tolist(),
                       "overall_att": float(np.ravel(event.overall_aggregated_framework.thetas)[0])}
with open(out, "w") as handle:
    json.dump(result, handle)
'''


def _simulator():
    spec = importlib.util.spec_from_file_location("test_eventstudy",
                                                  os.path.join(ROOT, "tests", "core", "test_eventstudy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _r(value, digits=4):
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def accuracy(sim, n_units, seed):
    from geocate.core.eventstudy import event_study

    unit, period, D, Y, X, truth = sim.simulate_staggered(n_units, 8, (3, 5, 7), seed=seed)
    simple, by_e = sim.true_aggregates(truth)
    figures = {"n_units": n_units, "seed": seed, "truth_overall": _r(simple),
               "cohort_sizes": None, "twfe": _r(sim.twfe(unit, period, D, Y))}
    figures["twfe_bias"] = _r(figures["twfe"] - simple)
    for name, kwargs in (("never", {"covariates": X}), ("not_yet", {"covariates": X, "control": "not_yet"}),
                         ("difference_of_means", {})):
        started = time.perf_counter()
        result = event_study(unit, period, D, Y, **kwargs)
        seconds = time.perf_counter() - started
        figures["cohort_sizes"] = {str(g): n for g, n in result.cohorts.items()}
        events = {str(row.key): {"truth": _r(by_e[row.key]), "att": _r(row.att), "se": _r(row.std_err),
                                 "error": _r(row.att - by_e[row.key]), "ci": [_r(row.ci_low), _r(row.ci_high)],
                                 "band": [_r(row.band_low), _r(row.band_high)]} for row in result.event_time}
        placebo = [row for row in result.event_time if row.key < 0]
        error = result.overall.att - simple
        figures[name] = {
            "overall": {"att": _r(result.overall.att), "se": _r(result.overall.std_err), "error": _r(error)},
            "event_time": events,
            "pre_trend": {"chi2": _r(result.pre_trend.statistic, 3), "df": result.pre_trend.df,
                          "p_value": _r(result.pre_trend.p_value, 4)},
            "sup_t_critical_value": _r(result.critical_value, 3),
            "overall_within_0.05": bool(abs(error) < 0.05),
            "event_0_3_within_0.08": bool(all(abs(result.event(e).att - by_e[e]) < 0.08 for e in range(4))),
            "placebo_cis_cover_0": bool(all(row.ci_low <= 0 <= row.ci_high for row in placebo)),
            "placebo_bands_cover_0": bool(all(row.band_low <= 0 <= row.band_high for row in placebo)),
            "share_clipped": _r(result.overlap.get("share_clipped", 0.0)),
            "seconds": round(seconds, 2)}
        print(name, json.dumps({k: v for k, v in figures[name].items() if k != "event_time"}), flush=True)
        print("  event time: e truth estimate (se):",
              "; ".join(f"{e} {v['truth']:.3f} {v['att']:.3f} ({v['se']:.3f})" for e, v in events.items()), flush=True)
    print("TWFE", figures["twfe"], "truth", figures["truth_overall"], flush=True)
    return figures, (unit, period, D, Y, X)


def coverage(sim, n_units, reps):
    from geocate.core.eventstudy import event_study

    rows = []
    for rep in range(reps):
        unit, period, D, Y, X, truth = sim.simulate_staggered(n_units, 8, (3, 5, 7), seed=100 + rep)
        simple, by_e = sim.true_aggregates(truth)
        result = event_study(unit, period, D, Y, X, n_boot=0, seed=rep)
        row = [result.overall.att - simple, result.overall.std_err,
               result.overall.ci_low <= simple <= result.overall.ci_high, sim.twfe(unit, period, D, Y) - simple]
        for e in range(4):
            effect = result.event(e)
            row += [effect.att - by_e[e], effect.std_err, effect.ci_low <= by_e[e] <= effect.ci_high]
        rows.append(row)
    a = np.array(rows, dtype=float)
    figures = {"reps": reps, "n_units": n_units,
               "overall": {"coverage_95": _r(a[:, 2].mean(), 3), "bias": _r(a[:, 0].mean()),
                           "sd_of_estimates": _r(a[:, 0].std(ddof=1)), "mean_se": _r(a[:, 1].mean()),
                           "max_abs_error": _r(np.abs(a[:, 0]).max())},
               "twfe_mean_bias": _r(a[:, 3].mean())}
    for e in range(4):
        j = 4 + 3 * e
        figures[f"event_{e}"] = {"coverage_95": _r(a[:, j + 2].mean(), 3), "bias": _r(a[:, j].mean()),
                                 "sd_of_estimates": _r(a[:, j].std(ddof=1)), "mean_se": _r(a[:, j + 1].mean())}
    print("coverage", json.dumps(figures), flush=True)
    return figures


def timing(sim, n_units, n_periods):
    from geocate.core.eventstudy import event_study

    unit, period, D, Y, X, truth = sim.simulate_staggered(n_units, n_periods, tuple(range(2, n_periods + 1)), seed=7)
    simple = sim.true_aggregates(truth)[0]
    figures = {"n_units": n_units, "n_periods": n_periods, "cohorts": n_periods - 1}
    for control in ("never", "not_yet"):
        started = time.perf_counter()
        result = event_study(unit, period, D, Y, X, control=control)
        figures[control] = {"seconds": round(time.perf_counter() - started, 1), "cells": len(result.group_time),
                            "overall_error": _r(result.overall.att - simple), "overall_se": _r(result.overall.std_err)}
    print("timing", json.dumps(figures), flush=True)
    return figures


def _clean_environment():
    """This process's environment without the QGIS Python paths (whose numpy 1 would shadow the venv's numpy 2)."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}


def _doubleml_python(venv):
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print("creating", venv, flush=True)
        subprocess.run([shutil.which("python3") or "python3", "-m", "venv", venv], check=True,
                       env=_clean_environment())
        subprocess.run([python, "-m", "pip", "install", "-q", "doubleml", "scikit-learn", "numpy", "pandas"],
                       check=True, env=_clean_environment())
    return python


def doubleml_check(panel, venv, seed):
    from geocate.core.eventstudy import event_study

    unit, period, D, Y, X = panel
    n_periods = len(np.unique(period))
    d = D.reshape(-1, n_periods)
    first = np.where(d.any(axis=1), np.unique(period)[d.argmax(axis=1)], np.inf)
    python = _doubleml_python(venv)
    with tempfile.TemporaryDirectory() as folder:
        csv, out, script = (os.path.join(folder, name) for name in ("panel.csv", "doubleml.json", "run.py"))
        with open(csv, "w", encoding="utf-8") as handle:
            handle.write("id,t,y,G,x1,x2\n")
            for u, t, y, g, x in zip(unit, period, Y, np.repeat(first, n_periods), X):
                handle.write(f"{u},{t!r},{y!r},{g!r},{x[0]!r},{x[1]!r}\n")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(DOUBLEML_SCRIPT)
        started = time.perf_counter()
        subprocess.run([python, script, csv, out], check=True, env=_clean_environment())
        seconds = time.perf_counter() - started
        with open(out, encoding="utf-8") as handle:
            theirs = json.load(handle)
    figures = {"doubleml": theirs["version"], "numpy": theirs["numpy"], "doubleml_seconds": round(seconds, 1)}
    for control, their_name in (("never", "never_treated"), ("not_yet", "not_yet_treated")):
        cells = {(c["g"], c["base"], c["t"]): c for c in theirs[their_name]["cells"]}
        for learner in ("linear", "spline ridge"):
            ours = event_study(unit, period, D, Y, X, control=control, learner=learner, seed=seed)
            ratios, diffs, matched = [], [], 0
            for cell in ours.group_time:
                other = cells.get((cell.g, cell.base_period, cell.t))
                if other is None:
                    continue
                matched += 1
                diffs.append(cell.att - other["att"])
                ratios.append(abs(cell.att - other["att"]) / np.hypot(cell.std_err, other["se"]))
            se_ratio = np.median([c.std_err / cells[(c.g, c.base_period, c.t)]["se"] for c in ours.group_time
                                  if (c.g, c.base_period, c.t) in cells])
            event = {round(float(name)): value for name, value in zip(theirs[their_name]["event_names"],
                                                                      theirs[their_name]["event_att"])}
            event_diff = [abs(row.att - event[row.key]) for row in ours.event_time if row.key in event]
            dynamic = np.mean([row.att for row in ours.event_time if row.key >= 0])
            figures[f"{control}, {learner}"] = {
                "cells_matched": f"{matched} of {len(ours.group_time)} (DoubleML: {len(cells)})",
                "max_abs_diff_over_combined_se": _r(max(ratios), 3),
                "mean_abs_diff_over_combined_se": _r(np.mean(ratios), 3),
                "max_abs_diff": _r(np.max(np.abs(diffs))), "median_se_ratio_ours_to_doubleml": _r(se_ratio, 3),
                "max_abs_diff_event_time": _r(max(event_diff)) if event_diff else None,
                "mean_post_event_effect_ours": _r(dynamic),
                "mean_post_event_effect_doubleml": _r(theirs[their_name]["overall_att"])}
    print("doubleml", json.dumps(figures), flush=True)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-units", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--timing-units", type=int, default=10000)
    parser.add_argument("--timing-periods", type=int, default=10)
    parser.add_argument("--no-doubleml", action="store_true")
    parser.add_argument("--doubleml-venv", default=os.path.join(ROOT, "outputs", "doubleml-venv"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sim = _simulator()
    figures = {}
    figures["accuracy"], panel = accuracy(sim, args.n_units, args.seed)
    if args.reps:
        figures["coverage"] = coverage(sim, args.n_units, args.reps)
    if args.timing_units:
        figures["timing"] = timing(sim, args.timing_units, args.timing_periods)
    if not args.no_doubleml:
        figures["doubleml"] = doubleml_check(panel, args.doubleml_venv, args.seed)
    save_figures(args.json, figures, started)
    return figures


if __name__ == "__main__":
    main()

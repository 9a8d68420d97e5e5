"""Do two versions of GeoCATE give the same numbers? (Issue 20: a restructuring changes no number beyond 1e-9.)

Usage: python bench/bench_same_numbers.py --before REF [--after REF] [--json out.json]

Each version (a git commit of this repository; --after defaults to the working tree) is checked out into a
temporary worktree and run in its own process on the same small studies: estimatecate (randomized, 400 units on
the demo imagery; the demo study's 1200-unit trial with the default settings; and observational), estimateate with the sensitivity analysis, comparesources, imageclusters
(K = 2, 30 epochs), evaluate, the four panel estimators, the event study (without and with covariates),
targeting (30 % of the units) and mapeffects (the forest's map over the scene, every 66 pixels). The
figures compared are every per-unit effect, standard error, score and probability, the tests' estimates and
p-values, and the ATEs. Prints the largest absolute difference of each; exits 1 when one exceeds --tolerance.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FINGERPRINT = r'''
import dataclasses, json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[3])
sys.path.insert(2, sys.argv[3] + "/core")
import os
import numpy as np
import geocate   # the version under test, imported before the tests' conftest puts the installed plugin first
assert os.path.realpath(geocate.__file__).startswith(os.path.realpath(sys.argv[1] + "/geocate")), geocate.__file__
from conftest import unit_table
from test_eventstudy import simulate_staggered
raster = sys.argv[4]
from geocate.core.design import StudyDesign
from geocate.core.evaluate import evaluate_priorities
from geocate.core.eventstudy import event_study
from geocate.core.panel import make_panel, panel_effect
from geocate.core.pipeline import compare_sources, estimate_ate, estimate_cate, find_clusters
from geocate.core.simulate import confound, simulate_panel, simulate_trial

def flat(*values):
    return [float(v) for value in values for v in np.asarray(value, float).ravel()]

out = {}
trial = simulate_trial(raster, n_units=400, seed=3)
units = unit_table(trial)
_, cate = estimate_cate(units, raster, seed=1, n_filters=64)
test = cate.metadata["heterogeneity_test"]
out["estimatecate"] = flat(cate.cate, cate.cate_se, cate.dr_scores, cate.ate, cate.ate_se, test["estimate"],
                           test["std_err"], test["p_value"])
demo = simulate_trial(raster, n_units=1200, seed=2020)   # the demo study's trial (core.demo), default settings
_, on_demo = estimate_cate(unit_table(demo), raster)
out["estimatecate, demo study"] = flat(on_demo.cate, on_demo.cate_se, on_demo.ate, on_demo.ate_se,
                                       on_demo.metadata["heterogeneity_test"]["p_value"])
treated, outcome, _ = confound(trial, seed=2)
observational = dataclasses.replace(units, treated=treated.astype(float), outcome=outcome)
_, ate = estimate_ate(observational, raster, StudyDesign("observational", seed=2), n_filters=64,
                      sensitivity=(0.03, 0.03, 1.0))
out["estimateate"] = flat([(e.estimate, e.std_err) for e in ate["effects"]], ate["propensity"])
_, obs = estimate_cate(observational, raster, seed=1, n_filters=64, study_design=StudyDesign("observational", seed=1))
out["estimatecate, observational"] = flat(obs.cate, obs.ate, obs.ate_se)
_, compared = compare_sources(units, raster, seed=1, n_draws=50)
out["comparesources"] = flat(compared["scores"], [t.estimate for ts in compared["tests"].values() for t in ts],
                             [t.p_value for ts in compared["tests"].values() for t in ts],
                             [c for c in compared["cate"].values()])
_, clusters, _ = find_clusters(units, raster, n_clusters=2, max_clusters=2, epochs=30, seed=1, n_folds=3,
                               forest_check=False)
out["imageclusters"] = flat(clusters.cate, clusters.probabilities, clusters.ate, clusters.ate_se)
evaluation = evaluate_priorities(trial.outcome, trial.treated, np.column_stack([trial.true_cate]),
                                 coords=trial.coords, n_draws=50, seed=1)
out["evaluate"] = flat(evaluation.scores, [r.estimate for rs in evaluation.rates.values() for r in rs],
                       [r.std_err for rs in evaluation.rates.values() for r in rs])
panel = make_panel(*simulate_panel(n_units=120, n_periods=5, n_covariates=5, seed=1))
for approach in ("mundlak", "within", "first_difference", "pooled"):
    estimate = panel_effect(panel, approach, seed=1)
    out["paneleffects " + approach] = flat(estimate.theta, estimate.std_err)
unit, time, D, Y, X, _ = simulate_staggered(n_units=300, seed=1)
for covariates in (None, X):
    study = event_study(unit, time, D, Y, covariates, seed=1, n_boot=99)
    out["eventstudy" + (" with covariates" if covariates is not None else "")] = flat(
        [g.att for g in study.group_time], [g.std_err for g in study.group_time], study.overall.att,
        study.overall.std_err)
from geocate.core.maps import map_effects
from geocate.core.plan import Budget, plan_targeting
from osgeo import gdal
import tempfile
_, result, plan = plan_targeting(units, raster, Budget(share=0.3), seed=1)
out["targeting"] = flat(result.cate, plan.priority, plan.treat, plan.value.gain.estimate, plan.value.gain.std_err)
with tempfile.TemporaryDirectory() as folder:
    map_effects(units, raster, folder + "/map.tif", seed=1, stride=66)
    out["mapeffects"] = flat(gdal.Open(folder + "/map.tif").ReadAsArray())
for name in ("core.pipeline", "core.maps", "core.panel", "core.eventstudy", "core.evaluate", "core.plan"):
    module = sys.modules["geocate." + name]
    assert os.path.realpath(module.__file__).startswith(os.path.realpath(sys.argv[1] + "/geocate")), module.__file__
json.dump(out, open(sys.argv[2], "w"))
'''


DEMO_RASTER = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")


def run_version(checkout, code, *arguments):
    """Run the script ``code`` on the GeoCATE in ``checkout`` (importable as package geocate from the script's
    first argument, the installed plugin kept off the path): its standard output."""
    with tempfile.TemporaryDirectory() as folder:
        os.symlink(checkout, os.path.join(folder, "geocate"))
        script = os.path.join(folder, "version.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(code)
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if "plugins" not in p))
        return subprocess.run([sys.executable, script, folder, *map(str, arguments)], check=True, env=environment,
                              stdout=subprocess.PIPE, text=True).stdout


def fingerprint(checkout, path):
    """Run FINGERPRINT on the GeoCATE in ``checkout``, results to ``path``."""
    run_version(checkout, FINGERPRINT, path, os.path.join(ROOT, "tests"), DEMO_RASTER)
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def checkout_of(ref, folder):
    """A worktree of ``ref`` in ``folder`` (None: this working tree)."""
    if ref is None:
        return ROOT
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", folder, ref], check=True,
                   capture_output=True)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git commit of the version before")
    parser.add_argument("--after", default=None, help="git commit of the version after (default: the working tree)")
    parser.add_argument("--tolerance", type=float, default=1e-9)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="geocate-versions-")
    worktrees = []
    try:
        figures = {}
        for name, ref in (("before", args.before), ("after", args.after)):
            checkout = checkout_of(ref, os.path.join(folder, name))
            if ref is not None:
                worktrees.append(checkout)
            figures[name] = fingerprint(checkout, os.path.join(folder, f"{name}.json"))
    finally:
        for tree in worktrees:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    differences, worst = {}, 0.0
    for key, before in figures["before"].items():
        after = figures["after"].get(key)
        if after is None or len(after) != len(before):
            differences[key] = "missing or of another length"
            worst = float("inf")
            continue
        a, b = np.asarray(before, float), np.asarray(after, float)
        same_nan = bool(np.array_equal(np.isnan(a), np.isnan(b)))
        difference = float(np.nanmax(np.abs(a - b))) if np.isfinite(a).any() else 0.0
        differences[key] = {"values": len(a), "max_abs_difference": difference, "same_missing": same_nan}
        worst = max(worst, difference if same_nan else float("inf"))
        print(f"{key:32s} {len(a):6d} values  largest difference {difference:.3g}"
              + ("" if same_nan else "  (missing values differ)"), flush=True)
    print(f"largest difference {worst:.3g} (tolerance {args.tolerance:g})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"before": args.before, "after": args.after or "working tree", "differences": differences,
                       "largest": worst}, handle, indent=2)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())

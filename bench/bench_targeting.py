"""Acceptance bench of budgeted targeting (core/targeting.py): known truth, seeded, by repetition.

Usage: OMP_NUM_THREADS=1 python bench/bench_targeting.py [tabular|image|plan|all] [--reps 20] [--seeds 11-30]
       [--units 3000] [--budget 0.3] [--jobs 1] [--json out.json]

* tabular: the issue's check, --reps draws of X ~ U(-1, 1)^5, tau = 1 if X1 > 0 else -0.5, mu0 = X2 + X3^2,
  n = 4000, half treated, DR scores cross-fitted on 5 folds (core.scores, spline-ridge outcome models).
  The depth-2 exhaustive policy tree on all units: its agreement with the oracle rule (treat where X1 > 0), and
  econml's greedy DRPolicyTree (depth 2, its own nuisances) as a cross-check; the out-of-fold rule (each fold
  decided by a tree of the other folds): its advantage over a random set of the same size, over treating
  everyone and over treating nobody (AIPW, policy_value), the coverage of their 95 % intervals of the true
  advantages of those decisions, and their errors (goal: coverage >= 90 %, every error within 0.08,
  agreement >= 95 %).
* image: simulated trials on the demo raster (core.simulate.simulate_trial, --units units, seeds --seeds),
  GeoCATE's cross-fitted causal forest on MOSAIKS features + covariates (core.learners.default_learner,
  as estimatecate) for out-of-fold CATE and DR scores; the budget rule at --budget of the units:
  heterogeneous design (effects 0, 1, 2.5 by image): the share of the oracle's gain the chosen units
  achieve (goal >= 80 %), and the coverage of the true gain of the chosen units by the GAIN interval
  (goal >= 90 %), for the budget within each fold ("per fold", what core/targeting.py recommends for the
  trial's own units), over all units at once ("pooled"), and for the sequential gain (fold k ranked by a
  forest of folds 1..k-1, the forests of the heterogeneity test);
  the rules compared (imagery CATE, covariates-only CATE, the 'assets' field); with costs
  (exp(0.5 distance)), the cost curve at 30 % of the total cost: coverage of the true gain and the curve
  against the LP brute force on 200 units. Null design (one effect, 1.0, same units): the coverage of 0 by
  each GAIN interval (goal >= 90 %), the heterogeneity test's detections and the targeting message.
* plan: geocate:targeting's core end to end (core.plan.plan_targeting), heterogeneous and null trials, with the
  covariates as effect modifiers and with the image alone (candidates or a map); see run_plan.
The full run (20 draws, 20 seeds, 3000 units) takes about 18 minutes on one core.
Worst cases are reported. Every figure is measured in this run; the seeds fix the result.
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
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))


def rate(hits, reps):
    p = hits / reps if reps else float("nan")
    return {"rate": round(p, 4), "hits": int(hits), "reps": int(reps),
            "mc_se": round(float(np.sqrt(p * (1 - p) / reps)), 4) if reps else None}


def tabular_draw(n, seed):
    from geocate.core.crossfit import location_folds
    from geocate.core.scores import cross_fitted_scores

    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 5))
    tau = np.where(X[:, 0] > 0, 1.0, -0.5)
    W = (rng.permutation(n) < n // 2).astype(int)
    Y = X[:, 1] + X[:, 2] ** 2 + W * tau + rng.standard_normal(n)
    folds = location_folds(np.arange(n), 5, seed)
    return X, W, Y, tau, cross_fitted_scores(Y, W, X, folds)[0], folds


def run_tabular(reps, n=4000, with_econml=True):
    from geocate.core.targeting import cross_fitted_policy, policy_tree, policy_value

    started = time.perf_counter()
    rows = []
    for rep in range(reps):
        seed = 1000 + rep
        X, W, Y, tau, scores, folds = tabular_draw(n, seed)
        oracle = X[:, 0] > 0
        t = time.perf_counter()
        tree = policy_tree(X, scores, depth=2, names=("x1", "x2", "x3", "x4", "x5"))
        tree_s = time.perf_counter() - t
        row = {"seed": seed, "agreement": float(np.mean(tree.predict(X) == oracle)), "tree_s": tree_s,
               "tree": tree.describe()}
        if with_econml:
            import warnings

            from econml.policy import DRPolicyTree

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                greedy = DRPolicyTree(max_depth=2, min_samples_leaf=tree.min_leaf, random_state=seed).fit(Y, W, X=X)
            row["econml_agreement"] = float(np.mean(greedy.predict(X) == oracle))
        T = cross_fitted_policy(X, scores, folds, depth=2)[0].astype(bool)
        value = policy_value(scores, T)
        truths = {"vs_random": np.mean(tau * T) - T.mean() * tau.mean(),
                  "vs_everyone": np.mean(tau * T) - tau.mean(), "value": np.mean(tau * T)}
        for name, truth in truths.items():
            estimate = getattr(value, name)
            row[name] = {"estimate": estimate.estimate, "std_err": estimate.std_err, "truth": float(truth),
                         "error": estimate.estimate - truth, "covered": estimate.covers(truth)}
        row["oos_agreement"] = float(np.mean(T == oracle))
        rows.append(row)
        print(f"tabular seed {seed}: agreement {row['agreement']:.4f} (econml {row.get('econml_agreement', 0):.4f}), "
              f"advantage vs random {row['vs_random']['estimate']:.3f} (truth {row['vs_random']['truth']:.3f}, "
              f"SE {row['vs_random']['std_err']:.3f})", flush=True)
    out = {"design": f"X ~ U(-1,1)^5, tau = 1 if X1 > 0 else -0.5, n = {n}, {reps} draws",
           "agreement_min": min(r["agreement"] for r in rows),
           "agreement_mean": float(np.mean([r["agreement"] for r in rows])),
           "agreement_at_least_95": rate(sum(r["agreement"] >= 0.95 for r in rows), reps),
           "out_of_fold_agreement_mean": float(np.mean([r["oos_agreement"] for r in rows])),
           "tree_seconds_mean": float(np.mean([r["tree_s"] for r in rows])),
           "worst_tree": min(rows, key=lambda r: r["agreement"])["tree"]}
    if with_econml:
        out["econml_greedy_agreement_min"] = min(r["econml_agreement"] for r in rows)
        out["econml_greedy_agreement_mean"] = float(np.mean([r["econml_agreement"] for r in rows]))
    for name in ("vs_random", "vs_everyone", "value"):
        errors = np.array([r[name]["error"] for r in rows])
        out[f"advantage_{name}"] = {
            "coverage": rate(sum(r[name]["covered"] for r in rows), reps), "bias": float(errors.mean()),
            "max_abs_error": float(np.abs(errors).max()), "within_0.08": rate(int(np.sum(np.abs(errors) <= 0.08)), reps),
            "mean_std_err": float(np.mean([r[name]["std_err"] for r in rows])),
            "sd_of_errors": float(errors.std(ddof=1)) if reps > 1 else None}
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: v for k, v in out.items() if k != "worst_tree"}), flush=True)
    print("worst tree:\n" + out["worst_tree"], flush=True)
    return out


def image_features(trial, seed):
    from geocate.core.embed import BandScaler, RandomConvFeatures
    from geocate.core.patches import extract_patches

    patches = extract_patches(DEMO_RASTER, trial.coords, trial.crs_wkt, window_size_px=trial.window_size_px).patches
    scaled = BandScaler(seed=seed).fit(patches).transform(patches)
    return np.log1p(RandomConvFeatures(seed=seed).fit(scaled).transform(scaled))   # core.represent's scale


def cached_priorities(learner):
    """learner.priority_for, remembered: the heterogeneity test and the sequential gain rank with the same forests."""
    memory = {}

    def priority_for(train, test):
        key = (np.flatnonzero(train).tobytes(), np.flatnonzero(test).tobytes())
        if key not in memory:
            memory[key] = learner.priority_for(train, test)
        return memory[key]

    return priority_for


def judge_trial(trial, features, seed, budget, jobs, extras):
    """One trial: forest, rules, values against the truth."""
    from geocate.core.evaluate import sequential_rate_test
    from geocate.core.inputs import design_matrix
    from geocate.core.learners import CrossFittedCausalForest, default_learner
    from geocate.core.targeting import (
        budget_rule,
        compare_rules,
        cost_curve,
        lp_gain,
        policy_value,
        sequential_gain,
        targeting_message,
    )

    design, inputs, learner = default_learner(features, trial.covariates, seed=seed)
    learner.n_jobs = jobs
    t = time.perf_counter()
    learner.fit(trial.outcome, trial.treated, design, outcome_inputs=inputs)
    fit_s = time.perf_counter() - t
    scores, cate, folds, groups = learner.dr_scores_, learner.cate_, learner.fold_, learner.groups_
    tau = trial.true_cate
    n = len(tau)
    k = int(np.floor(budget * n + 1e-9))
    oracle_gain = float(np.sort(tau)[::-1][:k].mean() - tau.mean())
    priority_for = cached_priorities(learner)
    test = sequential_rate_test(scores, folds, priority_for, "AUTOC", clusters=groups, names=["cate"], n_draws=200,
                                seed=seed)[0]
    row = {"seed": seed, "fit_s": round(fit_s, 2), "test_p": test.p_value, "oracle_gain": oracle_gain}
    for name, rule_folds in (("pooled", None), ("per_fold", folds)):
        T = budget_rule(cate, budget, folds=rule_folds)
        value = policy_value(scores, T, groups)
        truth = float(tau[T].mean() - tau.mean())
        row[name] = {"gain": value.gain.estimate, "se": value.gain.std_err, "truth": truth,
                     "covered": value.gain.covers(truth), "covers_0": value.gain.covers(0.0),
                     "share_of_oracle": truth / oracle_gain if oracle_gain > 0 else None}
        if name == "per_fold":   # what core/targeting.py recommends for the trial's own units
            row["message"] = targeting_message(test.p_value, value)
    sequential = sequential_gain(scores, folds, priority_for, budget, clusters=groups)
    fold_truths = [tau[(folds == f) & sequential.treat].mean() - tau[folds == f].mean()
                   for f in np.unique(folds)[1:]]
    truth = float(np.mean(fold_truths))
    row["sequential"] = {"gain": sequential.gain.estimate, "se": sequential.gain.std_err, "truth": truth,
                         "covered": sequential.gain.covers(truth), "covers_0": sequential.gain.covers(0.0),
                         "share_of_oracle": truth / oracle_gain if oracle_gain > 0 else None, "p": sequential.p_value}
    if not extras:
        return row
    # Rules compared on the same folds and scores: the imagery CATE, a covariates-only forest, a priority field.
    covariate_design = design_matrix(None, trial.covariates)[0]
    covariates_only = CrossFittedCausalForest(seed=seed, n_jobs=jobs).fit(
        trial.outcome, trial.treated, covariate_design, outcome_inputs=inputs, folds=folds)
    comparison = compare_rules(scores, {"imagery CATE": cate, "covariates-only CATE": covariates_only.cate_,
                                        "assets field": trial.covariates[:, 0]}, budget_share=budget, clusters=groups)
    row["compare"] = {f"{d.first} - {d.second}": {"gain": d.gain.estimate, "se": d.gain.std_err,
                                                  "p": d.gain.p_value} for d in comparison.differences}
    # Costs: the cost curve at 30 % of the total cost.
    cost = np.exp(0.5 * trial.covariates[:, 1])
    curve = cost_curve(scores, cate, cost, groups, budget_total=0.3 * cost.sum())
    x = curve.allocation(curve.budget)
    at_budget, vs_random = curve.at_budget, curve.vs_random_at(curve.budget)
    truth = float(np.mean(x * tau))
    rho = min(curve.budget / curve.mean_cost, 1.0)
    row["cost_curve"] = {"gain": at_budget.estimate, "se": at_budget.std_err, "truth": truth,
                         "covered": at_budget.covers(truth), "vs_random": vs_random.estimate,
                         "vs_random_truth": truth - rho * tau.mean(),
                         "vs_random_covered": vs_random.covers(truth - rho * tau.mean()),
                         "treated_share": float(np.mean(x > 0))}
    small = np.random.default_rng(seed).choice(n, 200, replace=False)
    small_curve = cost_curve(scores[small], cate[small], cost[small])
    gaps = [abs(small_curve.at(b / 200).estimate - lp_gain(scores[small], cate[small], cost[small], b)[0])
            for b in np.linspace(0.05, 1.0, 20) * cost[small].sum()]
    row["cost_curve"]["lp_max_abs_difference"] = float(max(gaps))
    return row


def parse_seeds(text):
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def run_image(seeds, n_units, budget, jobs):
    from geocate.core.simulate import simulate_trial

    started = time.perf_counter()
    heterogeneous, null = [], []
    for seed in seeds:
        t = time.perf_counter()
        trial = simulate_trial(DEMO_RASTER, n_units=n_units, seed=seed)
        features = image_features(trial, seed)
        features_s = time.perf_counter() - t
        flat = simulate_trial(DEMO_RASTER, n_units=n_units, seed=seed, effects=(1.0,))
        assert np.array_equal(flat.coords, trial.coords)
        row = judge_trial(trial, features, seed, budget, jobs, extras=True)
        row["features_s"] = round(features_s, 2)
        heterogeneous.append(row)
        print(f"image seed {seed}: share of oracle {row['pooled']['share_of_oracle']:.3f} (per fold "
              f"{row['per_fold']['share_of_oracle']:.3f}, sequential {row['sequential']['share_of_oracle']:.3f}); "
              f"GAIN {row['pooled']['gain']:.3f} (SE {row['pooled']['se']:.3f}) vs truth {row['pooled']['truth']:.3f}; "
              f"test p {row['test_p']:.2g}; fit {row['fit_s']} s", flush=True)
        row = judge_trial(flat, features, seed, budget, jobs, extras=False)
        null.append(row)
        print(f"null seed {seed}: GAIN pooled {row['pooled']['gain']:.3f} (SE {row['pooled']['se']:.3f}), per fold "
              f"{row['per_fold']['gain']:.3f} ({row['per_fold']['se']:.3f}), sequential {row['sequential']['gain']:.3f} "
              f"({row['sequential']['se']:.3f}); test p {row['test_p']:.2g}", flush=True)
    reps = len(seeds)

    def summary(rows, key, field_name):
        return rate(sum(r[key][field_name] for r in rows), reps)

    out = {"design": f"simulate_trial on the demo raster, {n_units} units, seeds {seeds[0]}-{seeds[-1]}, "
                     f"budget {budget:.0%}", "heterogeneous": {}, "null": {}}
    for key in ("pooled", "per_fold", "sequential"):
        shares = [r[key]["share_of_oracle"] for r in heterogeneous]
        t_stats = [(r[key]["gain"] - r[key]["truth"]) / r[key]["se"] for r in heterogeneous]
        out["heterogeneous"][key] = {
            "share_of_oracle_min": float(min(shares)), "share_of_oracle_mean": float(np.mean(shares)),
            "worst_seed": heterogeneous[int(np.argmin(shares))]["seed"],
            "share_at_least_0.8": rate(sum(s >= 0.8 for s in shares), reps),
            "coverage_of_true_gain": summary(heterogeneous, key, "covered"),
            "missed_seeds": [r["seed"] for r in heterogeneous if not r[key]["covered"]],
            "mean_error": float(np.mean([r[key]["gain"] - r[key]["truth"] for r in heterogeneous])),
            "sd_t": float(np.std(t_stats, ddof=1)) if reps > 1 else None}
        null_t = [r[key]["gain"] / r[key]["se"] for r in null]
        out["null"][key] = {"coverage_of_0": summary(null, key, "covers_0"),
                            "missed_seeds": [r["seed"] for r in null if not r[key]["covers_0"]],
                            "mean_t": float(np.mean(null_t)), "sd_t": float(np.std(null_t, ddof=1)) if reps > 1 else None}
    out["heterogeneous"]["test_detected"] = rate(sum(r["test_p"] < 0.05 for r in heterogeneous), reps)
    out["null"]["test_detected"] = rate(sum(r["test_p"] < 0.05 for r in null), reps)
    out["null"]["message_example"] = null[0]["message"]
    out["heterogeneous"]["message_example"] = heterogeneous[0]["message"]
    names = list(heterogeneous[0]["compare"])
    out["heterogeneous"]["compare"] = {name: {
        "mean_difference": float(np.mean([r["compare"][name]["gain"] for r in heterogeneous])),
        "significant_at_5pct": rate(sum(r["compare"][name]["p"] < 0.05 for r in heterogeneous), reps)}
        for name in names}
    out["heterogeneous"]["cost_curve"] = {
        "coverage_of_true_gain": rate(sum(r["cost_curve"]["covered"] for r in heterogeneous), reps),
        "coverage_vs_random": rate(sum(r["cost_curve"]["vs_random_covered"] for r in heterogeneous), reps),
        "mean_gain": float(np.mean([r["cost_curve"]["gain"] for r in heterogeneous])),
        "mean_vs_random": float(np.mean([r["cost_curve"]["vs_random"] for r in heterogeneous])),
        "lp_max_abs_difference": float(max(r["cost_curve"]["lp_max_abs_difference"] for r in heterogeneous))}
    out["mean_fit_s"] = float(np.mean([r["fit_s"] for r in heterogeneous + null]))
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["rows"] = {"heterogeneous": [{k: v for k, v in r.items() if k != "message"} for r in heterogeneous],
                   "null": [{k: v for k, v in r.items() if k != "message"} for r in null]}
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)
    return out


def run_plan(seeds, n_units, budget):
    """geocate:targeting's core end to end (core.plan.plan_targeting: estimate_cate's fit, the rule within folds,
    its value), on simulated image trials with known effects, as a user runs it: heterogeneous (effects 0, 1, 2.5
    by image) and null (1.0 everywhere), each with the trial's covariates as effect modifiers (the default) and
    with the image alone (what candidates or a map switch to). Per draw: the true gain of the chosen units, its
    share of the oracle's (the same number of units with the largest true effects), whether the GAIN interval
    covers the true gain (and 0 under the null), and the fold-by-fold GAIN's coverage of 0 under the null."""
    from geocate.core.plan import Budget, Candidates, plan_targeting
    from geocate.core.simulate import simulate_trial
    from geocate.core.study import UnitTable

    started = time.perf_counter()
    rows = []
    for design, effects in (("heterogeneous", (0.0, 1.0, 2.5)), ("null", (1.0,))):
        for modifiers in ("covariates", "image only"):
            for seed in seeds:
                trial = simulate_trial(DEMO_RASTER, n_units=n_units, effects=effects, seed=seed)
                units = UnitTable(trial.coords, trial.crs_wkt, trial.treated.astype(float), trial.outcome,
                                  trial.covariates, tuple(trial.covariate_names))
                candidates = Candidates(trial.coords[:5], trial.crs_wkt) if modifiers == "image only" else None
                t = time.perf_counter()
                _, result, plan = plan_targeting(units, DEMO_RASTER, Budget(share=budget),
                                                 window_size_px=trial.window_size_px, seed=seed,
                                                 candidates=candidates)
                tau, T = trial.true_cate, plan.treat
                truth = float(tau[T].mean() - tau.mean())
                oracle = float(np.sort(tau)[::-1][:T.sum()].mean() - tau.mean())
                row = {"design": design, "modifiers": modifiers, "seed": seed, "seconds": time.perf_counter() - t,
                       "truth": truth, "oracle": oracle, "share_of_oracle": truth / oracle if oracle > 0 else None,
                       "gain": plan.value.gain.estimate, "se": plan.value.gain.std_err,
                       "covered": plan.value.gain.covers(truth), "covers_0": plan.value.gain.covers(0.0),
                       "sequential_covers_0": plan.sequential.gain.covers(0.0),
                       "test_p": result.heterogeneity.p_value, "message": plan.message[:40]}
                rows.append(row)
                print(f"plan {design} {modifiers} seed {seed}: true gain {truth:.3f} (oracle {oracle:.3f}), "
                      f"GAIN {row['gain']:.3f} (SE {row['se']:.3f}), {row['seconds']:.1f} s", flush=True)
    out = {"units": n_units, "budget": budget, "seeds": list(seeds)}
    for design in ("heterogeneous", "null"):
        for modifiers in ("covariates", "image only"):
            part = [r for r in rows if r["design"] == design and r["modifiers"] == modifiers]
            key = f"{design}, {modifiers}"
            if design == "heterogeneous":
                shares = [r["share_of_oracle"] for r in part]
                out[key] = {"share_of_oracle_min": min(shares), "share_of_oracle_mean": float(np.mean(shares)),
                            "at_least_80": rate(sum(s >= 0.8 for s in shares), len(part)),
                            "gain_coverage": rate(sum(r["covered"] for r in part), len(part)),
                            "gain_bias": float(np.mean([r["gain"] - r["truth"] for r in part]))}
            else:
                out[key] = {"gain_covers_0": rate(sum(r["covers_0"] for r in part), len(part)),
                            "gain_coverage_of_truth": rate(sum(r["covered"] for r in part), len(part)),
                            "sequential_covers_0": rate(sum(r["sequential_covers_0"] for r in part), len(part)),
                            "says_no_heterogeneity": rate(sum(r["message"].startswith("No heterogeneity")
                                                              for r in part), len(part)),
                            "mean_t": float(np.mean([r["gain"] / r["se"] for r in part]))}
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["rows"] = rows
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="all", choices=("tabular", "image", "plan", "all"))
    parser.add_argument("--reps", type=int, default=20, help="tabular draws")
    parser.add_argument("--seeds", default="11-30", help="image trial seeds, e.g. 11-30 or 11,12")
    parser.add_argument("--units", type=int, default=3000)
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--jobs", type=int, default=1, help="forest threads (econml n_jobs)")
    parser.add_argument("--no-econml", action="store_true", help="skip econml's DRPolicyTree cross-check")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    results = {"threads": os.environ.get("OMP_NUM_THREADS"), "jobs": args.jobs}
    started = time.perf_counter()
    if args.part in ("tabular", "all"):
        results["tabular"] = run_tabular(args.reps, with_econml=not args.no_econml)
    if args.part in ("image", "all"):
        results["image"] = run_image(parse_seeds(args.seeds), args.units, args.budget, args.jobs)
    if args.part == "plan":   # the algorithm's core end to end; not in "all" (its own run)
        results["plan"] = run_plan(parse_seeds(args.seeds), args.units, args.budget)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"total {results['seconds']} s", flush=True)
    save_figures(args.json, results)


if __name__ == "__main__":
    main()

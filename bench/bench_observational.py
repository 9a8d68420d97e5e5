"""Observational designs: confounding adjustment from imagery (geocate:estimateate's estimators).

Usage: python bench/bench_observational.py [--reps 200] [--causalimages-reps 50] [--nuisance penalised]
       [--calibrate on|off] [--designs causalimages,scene,scene-builtup,overlap,clustered] [--first-draw 0]
       [--villages 80] [--village-size 8] [--oracle none|proxy|"boosted proxy"|truth] [--filters 256]
       [--json out.json]

--nuisance: geocate:estimateate's NUISANCE (core.stacking): "penalised" (the default models), "stacked"
(with gradient boosting) or "stacked with windows" (and a network on the windows, for both models); the
stacks' per-fold weights are summarised (the mean share of each learner). --calibrate: estimateate's CALIBRATE
(on, its default: the propensities calibrated to balance the outcome models' inputs, core.design.
balancing_propensities, after trimming; the draws whose balance was only close, or not reached, are counted).

* causalimages: causalimages' own confounding simulation, with images: n = 1000
  windows of 3 x 16 x 16 pixels whose red channel is set by a latent
  confounder C (plus texture noise), X1, X2 observed, logit P(W) = C + X1 + X2,
  Y = 2 W + C + X1 + X2 + noise. The windows are embedded as estimatecate
  embeds them (band scaling, random convolution features); the propensity
  model sees every feature and X1, X2, the outcome models the features'
  leading components and X1, X2 (as geocate:estimateate). --causalimages-reps
  repetitions (default --reps / 4): bias and 95 % coverage of naive, IPW,
  Hajek, AIPW.
* scene: the bundled Landsat scene, 600 units (core.simulate.confound): treatment
  more likely where the window shows settlement (propensities about 0.1 to
  0.9), the outcome also driven by the image, true effect 1. --reps draws of
  treatment and outcome on the same units.
* scene-builtup: the scene's units and draws, a design not tuned on: the confounder is the window's built-up
  share (core.simulate.built_up_share: its share of pixels brighter than the 90th percentile of all windows'),
  in texture's place in the propensity and the outcome.
  --oracle (both scene designs) adds to the nuisance models' inputs what no user has: the confounder z itself
  ("truth"), or the features' best proxy of it fitted with z ("proxy": a cross-fitted ridge of z on every
  standardised feature; "boosted proxy": gradient boosting), to split AIPW's bias into what the features do not
  hold of the confounder and what the nuisance models make of it (docs/benchmarks.md); --filters: the random
  convolutions' number (the features' linear proxy's R^2 is recorded either way).
* kang-schafer: Kang & Schafer's (2007) design, the classic test of doubly robust estimators when both
  models are wrong, as an ATE: Z ~ N(0, I4), logit P(W) = -Z1 + 0.5 Z2 - 0.25 Z3 - 0.1 Z4, Y(0) = 210 +
  27.4 Z1 + 13.7 (Z2 + Z3 + Z4) + noise, Y(1) = Y(0) + 10 + 5 Z1 (ATE 10), n = 1000; the models see only
  their transformation X = (exp(Z1 / 2), Z2 / (1 + exp(Z1)) + 10, (Z1 Z3 / 25 + 0.6)^3, (Z2 + Z4 + 20)^2)
  (or Z itself, "correct"), --reps / 4 repetitions: bias and coverage with estimateate's models on X.
* clustered: units in villages (core.simulate.confounded_villages: --villages 80 villages of --village-size 8 units, a village trait V
  confounding treatment and outcome, a village shock in the outcome, true ATE 1), the programme given to whole
  villages or to units within them; --reps draws: bias and coverage with standard errors clustered by village and,
  to show what ignoring the villages does, without; folds keep villages whole.
* overlap: x uniform on [-3, 3], logit P(W) = 3 x (no overlap at the ends),
  tau(x) = 1 + x / 2, n = 2000, --reps / 4 repetitions: the share of units
  the diagnostics flag, and the coverage of AIPW's interval for the whole
  study and, after Crump trimming, for the units kept.
Every figure is measured in this run; the seeds fix it.
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
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))
DEMO_RASTER = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")


def summarise(errors, covered, truth_name="bias"):
    return {name: {truth_name: round(float(np.mean(errors[name])), 4),
                   "coverage_95": round(float(np.mean(covered[name])), 3), "reps": len(errors[name])}
            for name in errors}


def record(effects, truth, errors, covered, estimand="ATE"):
    for effect in effects:
        if effect.estimand != estimand:
            continue
        low, high = effect.interval()
        errors.setdefault(effect.estimator, []).append(effect.estimate - truth)
        covered.setdefault(effect.estimator, []).append(low <= truth <= high)


def estimates(Y, W, features, covariates, inputs, seed, nuisance, scaled, shares, calibrate=True):
    """The estimators of geocate:estimateate with ``nuisance`` models and CALIBRATE (core.pipeline.estimate_ate's
    steps)."""
    from geocate.core.crossfit import location_folds
    from geocate.core.design import StudyDesign
    from geocate.core.inputs import propensity_inputs
    from geocate.core.observational import adjusted_effects
    from geocate.core.stacking import nuisance_learners, stacked_arm_models, stacked_propensities

    every_feature = propensity_inputs(features, covariates)
    design = StudyDesign("observational", seed=seed, calibrate=calibrate)

    def calibrated(propensity):
        propensity, record = design.calibrated(W, propensity, inputs)
        for state in ("close", "not reached"):
            shares.setdefault(f"balance {state}", []).append(float(record is not None and record["balance"] == state))
        return propensity

    if nuisance == "penalised":
        propensity, _ = design.propensities(W, every_feature)
        return adjusted_effects(Y, W, calibrated(propensity), inputs)
    folds = location_folds(np.arange(len(Y)), 5, seed)
    p_learners, o_learners = nuisance_learners(nuisance, W, 2, every_feature, inputs, Y, scaled, seed, covariates)
    propensity, fit = stacked_propensities(W, p_learners, folds)
    mu, outcome_fit = stacked_arm_models(Y, W, 2, o_learners, folds)
    for row in fit["stack"]:
        for name, w in row["weights"].items():
            shares.setdefault("propensity: " + name, []).append(w)
    for row in outcome_fit["stack"]:
        for arm, weights in row["weights_by_arm"].items():
            for name, w in weights.items():
                shares.setdefault(f"outcome arm {arm}: " + name, []).append(w)
    return adjusted_effects(Y, W, calibrated(propensity), inputs, folds, mu=mu)


def with_shares(out, shares):
    for state in ("close", "not reached"):
        out[f"draws_balance_{state.replace(' ', '_')}"] = int(np.sum(shares.pop(f"balance {state}", [])))
    if shares:
        out["mean_weight"] = {name: round(float(np.mean(v)), 3) for name, v in shares.items()}
    return out


def run_causalimages(reps, nuisance="penalised", first=0, calibrate=True):
    from geocate.core.embed import BandScaler, RandomConvFeatures
    from geocate.core.inputs import outcome_inputs

    errors, covered, shares = {}, {}, {}
    for rep in range(first, first + reps):
        rng = np.random.default_rng(300 + rep)
        n = 1000
        C, X = rng.standard_normal(n), rng.standard_normal((n, 2))
        W = (rng.random(n) < 1 / (1 + np.exp(-(C + X[:, 0] + X[:, 1])))).astype(int)
        Y = 2 * W + C + X[:, 0] + X[:, 1] + rng.standard_normal(n)
        windows = 100 + 10 * rng.standard_normal((n, 3, 16, 16))
        windows[:, 0] += 20 * C[:, None, None]                     # the confounder sets the red channel
        scaled = BandScaler(seed=rep).fit(windows).transform(windows)
        features = np.log1p(RandomConvFeatures(seed=rep, n_filters=64).fit(scaled).transform(scaled))  # core.represent scale
        inputs = outcome_inputs(features, X, seed=rep)
        record(estimates(Y, W, features, X, inputs, rep, nuisance, scaled, shares, calibrate), 2.0, errors, covered)
        print(rep, round(float(np.mean(errors["AIPW"])), 4), flush=True)
    out = with_shares(summarise(errors, covered), shares)
    print("causalimages", json.dumps(out), flush=True)
    return out


def oracle_input(features, z, kind):
    """(n,) the confounder z as an oracle would add it to the nuisance models' inputs: "truth" (z itself), "proxy"
    (the features' best linear proxy of z: a ridge of z on every standardised feature, cross-fitted on 5 folds) or
    "boosted proxy" (gradient boosting of z on the same), with the proxy's out-of-fold R^2."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    from geocate.core.inputs import propensity_inputs

    if kind == "truth":
        return z, 1.0
    model = RidgeCV(alphas=np.logspace(-3, 4, 30)) if kind == "proxy" else \
        HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=0)
    proxy = cross_val_predict(model, propensity_inputs(features), z, cv=KFold(5, shuffle=True, random_state=0))
    return proxy, float(1 - np.mean((z - proxy) ** 2) / np.var(z))


def run_scene(reps, nuisance="penalised", first=0, calibrate=True, confounder="texture", oracle="none", filters=256):
    """oracle: "none", or what an oracle adds to the nuisance models' inputs (oracle_input), to measure how much of
    AIPW's bias comes from what the features do not hold of the confounder; filters: the random convolutions'
    number (256, core.represent's default, gives 512 features). The features' linear proxy's R^2 is recorded
    whatever ``oracle``."""
    from geocate.core.embed import BandScaler, RandomConvFeatures
    from geocate.core.inputs import outcome_inputs
    from geocate.core.patches import extract_patches
    from geocate.core.simulate import built_up_share, confound, image_confounder, simulate_trial

    trial = simulate_trial(DEMO_RASTER, n_units=600, seed=7)
    patches = extract_patches(DEMO_RASTER, trial.coords, trial.crs_wkt, window_size_px=33).patches
    scaled = BandScaler(seed=7).fit(patches).transform(patches)
    features = RandomConvFeatures(seed=7, n_filters=filters).fit(scaled).transform(scaled)
    features = np.log1p(features)                                                   # core.represent's scale
    image = built_up_share(patches) if confounder == "built-up" else None
    z = image_confounder(trial, image)
    covariates, (proxy, linear_r2) = trial.covariates, oracle_input(features, z, "proxy")
    if oracle != "none":
        extra, r2 = (proxy, linear_r2) if oracle == "proxy" else oracle_input(features, z, oracle)
        covariates = np.column_stack([covariates, extra])
    inputs = outcome_inputs(features, covariates, seed=7)
    errors, covered, spans, shares = {}, {}, [], {}
    for rep in range(first, first + reps):
        W, Y, true_propensity = confound(trial, seed=rep, image=image)
        spans.append(np.quantile(true_propensity, [0.05, 0.95]))
        record(estimates(Y, W, features, covariates, inputs, rep, nuisance, scaled, shares, calibrate), 1.0,
               errors, covered)
        print(rep, round(float(np.mean(errors["AIPW"])), 4), flush=True)
    out = with_shares(summarise(errors, covered), shares)
    out["true_propensity_5_95_percent"] = np.mean(spans, axis=0).round(3).tolist()
    out["features"] = {"random_filters": filters, "linear_proxy_out_of_fold_r2": round(linear_r2, 4)}
    if oracle != "none":
        out["oracle_input"] = {"kind": oracle, "out_of_fold_r2": round(r2, 4)}
    print("scene" if confounder == "texture" else "scene-builtup", json.dumps(out), flush=True)
    return out


def kang_schafer(seed, n=1000):
    """One draw of the Kang & Schafer (2007) design as an ATE: (W, Y, Z, X, the sample's mean effect)."""
    rng = np.random.default_rng(900 + seed)
    Z = rng.standard_normal((n, 4))
    W = (rng.random(n) < 1 / (1 + np.exp(Z[:, 0] - 0.5 * Z[:, 1] + 0.25 * Z[:, 2] + 0.1 * Z[:, 3]))).astype(int)
    y0 = 210 + 27.4 * Z[:, 0] + 13.7 * (Z[:, 1] + Z[:, 2] + Z[:, 3]) + rng.standard_normal(n)
    tau = 10 + 5 * Z[:, 0]
    X = np.column_stack([np.exp(Z[:, 0] / 2), Z[:, 1] / (1 + np.exp(Z[:, 0])) + 10, (Z[:, 0] * Z[:, 2] / 25 + 0.6) ** 3,
                         (Z[:, 1] + Z[:, 3] + 20) ** 2])
    return W, y0 + W * tau, Z, X, float(tau.mean())


def run_kang_schafer(reps, calibrate=True):
    from geocate.core.design import StudyDesign
    from geocate.core.observational import adjusted_effects

    out = {}
    for inputs_name in ("transformed X (both models wrong)", "Z (both models right)"):
        errors, covered, shares = {}, {}, {}
        for rep in range(reps):
            W, Y, Z, X, ate = kang_schafer(rep)
            inputs = X if inputs_name.startswith("transformed") else Z
            design = StudyDesign("observational", seed=rep, calibrate=calibrate)
            model, _ = design.propensities(W, inputs)
            propensity, calibration = design.calibrated(W, model, inputs)
            for state in ("close", "not reached"):
                shares.setdefault(f"balance {state}", []).append(
                    float(calibration is not None and calibration["balance"] == state))
            record(adjusted_effects(Y, W, propensity, inputs), ate, errors, covered)
        out[inputs_name] = with_shares(summarise(errors, covered), shares)
    print("kang-schafer", json.dumps(out), flush=True)
    return out


def run_overlap(reps, calibrate=True):
    from geocate.core.design import StudyDesign, overlap_summary
    from geocate.core.observational import adjusted_effects

    flagged, cover_all, cover_trimmed, trimmed = [], [], [], []
    for rep in range(reps):
        rng = np.random.default_rng(700 + rep)
        n = 2000
        x = rng.uniform(-3, 3, n)
        W = (rng.random(n) < 1 / (1 + np.exp(-3 * x))).astype(int)
        tau = 1 + 0.5 * x
        Y = x + W * tau + rng.standard_normal(n)
        design = StudyDesign("observational", trim="crump", seed=rep, calibrate=calibrate)
        model, _ = design.propensities(W, x[:, None])
        flagged.append(overlap_summary(model[:, 1], W)["share_outside"])
        keep, _ = design.keep(model[:, 1])
        trimmed.append(1 - keep.mean())
        propensity = design.calibrated(W, model, x[:, None])[0]
        full = next(e for e in adjusted_effects(Y, W, propensity, x[:, None]) if e.estimator == "AIPW")
        kept_propensity = design.calibrated(W, model, x[:, None], keep)[0]
        kept = next(e for e in adjusted_effects(Y[keep], W[keep], kept_propensity[keep], x[keep, None])
                    if e.estimator == "AIPW")
        cover_all.append(full.interval()[0] <= tau.mean() <= full.interval()[1])
        cover_trimmed.append(kept.interval()[0] <= tau[keep].mean() <= kept.interval()[1])
    out = {"share_flagged_outside_0.05_0.95": round(float(np.mean(flagged)), 3),
           "share_trimmed_crump": round(float(np.mean(trimmed)), 3),
           "aipw_coverage_whole_study": round(float(np.mean(cover_all)), 3),
           "aipw_coverage_trimmed_population": round(float(np.mean(cover_trimmed)), 3), "reps": reps}
    print("overlap", json.dumps(out), flush=True)
    return out


def run_clustered(reps, calibrate=True, villages=80, size=8):
    """Coverage of the population ATE (1) when units share villages: each estimator's interval with standard errors
    clustered by village and read on Student's t with G - 1 degrees of freedom (as estimateate's CLUSTER gives
    them; core.observational.adjusted_effects) and, to show what ignoring the villages does,
    without; folds keep villages whole."""
    from geocate.core.crossfit import Folds
    from geocate.core.design import StudyDesign
    from geocate.core.observational import adjusted_effects
    from geocate.core.simulate import confounded_villages

    out = {}
    for assignment in ("village", "unit"):
        errors, covered, ignored, shares = {}, {}, {}, {}
        for rep in range(reps):
            Y, W, inputs, village, ate = confounded_villages(1100 + rep, villages, size, assignment)
            folds = Folds.of_groups(village, 5, rep).fold
            design = StudyDesign("observational", seed=rep, calibrate=calibrate)
            model, _ = design.propensities(W, inputs, folds)
            propensity, calibration = design.calibrated(W, model, inputs)
            for state in ("close", "not reached"):
                shares.setdefault(f"balance {state}", []).append(
                    float(calibration is not None and calibration["balance"] == state))
            record(adjusted_effects(Y, W, propensity, inputs, folds, village), ate, errors, covered)
            record(adjusted_effects(Y, W, propensity, inputs, folds), ate, {}, ignored)
        out[f"treatment by {assignment}"] = with_shares(summarise(errors, covered), shares)
        for name, hits in ignored.items():
            out[f"treatment by {assignment}"][name]["coverage_95_ignoring_villages"] = round(float(np.mean(hits)), 3)
    print("clustered", json.dumps(out), flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--causalimages-reps", type=int, default=None)
    parser.add_argument("--nuisance", default="penalised", choices=("penalised", "stacked", "stacked with windows"))
    parser.add_argument("--calibrate", default="on", choices=("on", "off"))
    parser.add_argument("--designs", default="causalimages,scene,scene-builtup,overlap,clustered")
    parser.add_argument("--first-draw", type=int, default=0, help="the scene's and causalimages' first draw (seed)")
    parser.add_argument("--villages", type=int, default=80, help="the clustered design's villages")
    parser.add_argument("--village-size", type=int, default=8, help="the clustered design's units per village")
    parser.add_argument("--oracle", default="none", choices=("none", "proxy", "boosted proxy", "truth"),
                        help="the scene designs: what an oracle adds to the nuisance models' inputs")
    parser.add_argument("--filters", type=int, default=256, help="the scene designs: random convolution filters")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    others = set(args.designs.split(",")) - {"scene", "scene-builtup"}
    if (args.oracle != "none" or args.filters != 256) and others:
        parser.error(f"--oracle and --filters apply to the scene designs only, not {', '.join(sorted(others))}")
    started = time.perf_counter()
    causalimages_reps = args.causalimages_reps or max(args.reps // 4, 1)
    calibrate = args.calibrate == "on"
    runs = {"causalimages": lambda: run_causalimages(causalimages_reps, args.nuisance, args.first_draw, calibrate),
            "scene": lambda: run_scene(args.reps, args.nuisance, args.first_draw, calibrate, "texture", args.oracle,
                                       args.filters),
            "scene-builtup": lambda: run_scene(args.reps, args.nuisance, args.first_draw, calibrate, "built-up",
                                               args.oracle, args.filters),
            "overlap": lambda: run_overlap(max(args.reps // 4, 1), calibrate),
            "kang-schafer": lambda: run_kang_schafer(max(args.reps // 4, 1), calibrate),
            "clustered": lambda: run_clustered(args.reps, calibrate, args.villages, args.village_size)}
    figures = {"nuisance": args.nuisance, "calibrate": args.calibrate}
    figures.update({name: runs[name]() for name in args.designs.split(",")})
    save_figures(args.json, figures, started)
    return figures


if __name__ == "__main__":
    main()

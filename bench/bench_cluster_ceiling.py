"""What limits the cluster model's agreement with the true clusters on the three-cluster design (issue 24).

Usage: python bench/bench_cluster_ceiling.py [--seeds 500,501,502] [--iterations 24] [--c 0.1] [--json out.json]

On bench_clusters.py's three-cluster design (3000 units, effects 0 / 1.5 / 3, Gaussian noise sd 1, the true groups
tertiles of an image score), with K = 3 given and every assignment out of fold (5 folds by unit), ARI against the
true groups of:

* ``supervised``: a multinomial logistic regression (LogisticRegressionCV) trained on the true groups themselves:
  how well the image features separate the groups when the labels are known;
* ``em true baseline`` / ``em estimated baseline``: expectation-maximisation of the same Gaussian mixture the
  cluster model fits, with its gate a penalised multinomial logistic regression on the image features and
  covariates (each unit's posterior as sample weights; ``--c`` its inverse penalty), the treated units' residuals
  taken about the **true** untreated outcome (the simulation's mu0) or about a ridge regression fitted to the
  controls of the training folds; effects and noise sd re-estimated at each of ``--iterations`` steps;
* ``network true baseline`` / ``network estimated baseline``: core.clusters.fit_clusters (the cluster model, its
  defaults) on the outcome with the true baseline subtracted, or on the outcome as users give it;
* ``baseline error``: the sd of the ridge baseline's error on held-out units, fitted to the noisy outcomes of the
  controls and to the noise-free baseline (what the features can say about it).

The cluster model's own defaults are not changed here; the script only measures (18 minutes for 3 seeds on 2
cores, with another bench beside it).
"""

import argparse
import os
import sys
import time

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
EFFECTS = (0.0, 1.5, 3.0)


def study_of(seed):
    """(design matrix of the standardised image features and covariates, number of image columns, treated,
    outcome, true baseline, true groups) of the three-cluster trial drawn with ``seed``."""
    from bench_clusters import DEMO_RASTER
    from conftest import unit_table

    from geocate.core.inputs import design_matrix
    from geocate.core.pipeline import prepare_study
    from geocate.core.represent import ImageryOptions
    from geocate.core.simulate import simulate_trial

    trial = simulate_trial(DEMO_RASTER, n_units=3000, seed=seed, effects=EFFECTS)
    imagery = ImageryOptions()
    prepared = prepare_study(unit_table(trial), DEMO_RASTER, None, 33, None, imagery.pipeline(seed=seed, device="cpu"),
                             imagery, 0)
    used = prepared.study.used
    x, n_image = design_matrix(prepared.features, prepared.study.covariates[used])
    return (x, n_image, trial.treated[used].astype(int), trial.outcome[used], trial.true_mu0[used],
            trial.true_group[used])


def folds_of(n):
    from sklearn.model_selection import KFold

    return list(KFold(5, shuffle=True, random_state=0).split(np.arange(n)))


def supervised(x, groups):
    from sklearn.linear_model import LogisticRegressionCV

    predicted = np.zeros(len(groups), int)
    for train, test in folds_of(len(groups)):
        predicted[test] = LogisticRegressionCV(Cs=8, max_iter=2000).fit(x[train], groups[train]).predict(x[test])
    return predicted


def em_logistic(x, treated, outcome, baseline, iterations, c):
    """Out-of-fold groups from EM with a logistic gate; ``baseline`` None: a ridge on the training folds' controls."""
    from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
    from sklearn.model_selection import cross_val_predict

    k = len(EFFECTS)
    predicted = np.zeros(len(outcome), int)
    for train, test in folds_of(len(outcome)):
        controls, treated_units = train[treated[train] == 0], train[treated[train] == 1]
        if baseline is None:
            alpha = RidgeCV(alphas=np.logspace(-1, 4, 11)).fit(x[controls], outcome[controls]).alpha_
            mu0 = Ridge(alpha=alpha).fit(x[controls], outcome[controls]).predict(x[treated_units])
            sigma = np.std(outcome[controls] - cross_val_predict(Ridge(alpha=alpha), x[controls], outcome[controls],
                                                                 cv=5))
        else:
            mu0, sigma = baseline[treated_units], np.std(outcome[controls] - baseline[controls])
        residual = outcome[treated_units] - mu0
        tau = residual.mean() + np.linspace(-1, 1, k) * residual.std()
        prior = np.full((len(treated_units), k), 1 / k)
        for _ in range(iterations):
            log_density = -0.5 * ((residual[:, None] - tau[None, :]) / sigma) ** 2
            posterior = prior * np.exp(log_density - log_density.max(axis=1, keepdims=True))
            posterior /= posterior.sum(axis=1, keepdims=True)
            tau = (posterior * residual[:, None]).sum(axis=0) / posterior.sum(axis=0)
            sigma = np.sqrt(np.sum(posterior * (residual[:, None] - tau[None, :]) ** 2) / len(residual))
            gate = LogisticRegression(C=c, max_iter=300, tol=1e-3).fit(
                np.repeat(x[treated_units], k, axis=0), np.tile(np.arange(k), len(treated_units)),
                sample_weight=posterior.ravel())
            prior = gate.predict_proba(x[treated_units])
        predicted[test] = np.argsort(np.argsort(tau))[gate.predict(x[test])]
    return predicted


def network(x, n_image, treated, outcome, seed):
    from geocate.core.clusters import fit_clusters

    predicted = np.zeros(len(outcome), int)
    for train, test in folds_of(len(outcome)):
        fit = fit_clusters(x[train, :n_image], x[train, n_image:], treated[train], outcome[train], len(EFFECTS),
                           seed=seed)
        predicted[test] = fit.probabilities(x[test, :n_image], x[test, n_image:]).argmax(axis=1)
    return predicted


def baseline_error(x, treated, outcome, baseline):
    from sklearn.linear_model import RidgeCV

    test = np.random.default_rng(0).random(len(outcome)) < 0.2
    controls = ~test & (treated == 0)
    errors = {}
    for name, target in (("from the controls' outcomes", outcome), ("from the noise-free baseline", baseline)):
        fitted = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit(x[controls], target[controls])
        errors[name] = float(np.std(fitted.predict(x[test]) - baseline[test]))
    return errors


def one_seed(seed, args, wanted):
    """The rows of ``wanted`` (all when empty) and the baseline's error on the trial drawn with ``seed``."""
    from sklearn.metrics import adjusted_rand_score

    x, n_image, treated, outcome, baseline, groups = study_of(seed)
    rows = {"supervised": lambda: supervised(x, groups),
            "em true baseline": lambda: em_logistic(x, treated, outcome, baseline, args.iterations, args.c),
            "em estimated baseline": lambda: em_logistic(x, treated, outcome, None, args.iterations, args.c),
            "network true baseline": lambda: network(x, n_image, treated, outcome - baseline, seed),
            "network estimated baseline": lambda: network(x, n_image, treated, outcome, seed)}
    result = {"baseline error": baseline_error(x, treated, outcome, baseline)}
    print(seed, "baseline error sd", {k: round(v, 3) for k, v in result["baseline error"].items()}, flush=True)
    for name, make in rows.items():
        if not wanted or name in wanted:
            result[name] = float(adjusted_rand_score(groups, make()))
            print(seed, f"{name:28s} ARI {result[name]:.3f}", flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="500,501,502")
    parser.add_argument("--iterations", type=int, default=24)
    parser.add_argument("--c", type=float, default=0.1)
    parser.add_argument("--only", default="", help="comma-separated names of the rows to run (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    started = time.perf_counter()
    wanted = set(filter(None, args.only.split(",")))
    figures = {"iterations": args.iterations, "c": args.c,
               "seeds": {seed: one_seed(seed, args, wanted) for seed in (int(s) for s in args.seeds.split(","))}}
    names = [n for n in next(iter(figures["seeds"].values())) if n != "baseline error"]
    figures["mean"] = {n: float(np.mean([r[n] for r in figures["seeds"].values()])) for n in names}
    print("mean", {n: round(v, 3) for n, v in figures["mean"].items()})
    save_figures(args.json, figures, started)


if __name__ == "__main__":
    main()

"""Benchmark of the evaluation estimators (core/evaluate.py), measured in one process.

Usage: python bench/bench_evaluate.py [--units 10000] [--draws 200]

Times, for a simulated trial of N units with a known linear effect: the
cross-fitted DR scores (arm means, 5 folds), and the AUTOC of one priority
with its half-sample bootstrap (grf's defaults: 200 draws), and the paired
comparison of two priorities. Goal: AUTOC of n = 10000 with 200 draws in under 5 s.
"""

import argparse
import time

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=10000)
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args(argv)
    from geocate.core.evaluate import rank_average_treatment_effect
    from geocate.core.scores import cross_fitted_scores

    rng = np.random.default_rng(0)
    n = args.units
    x = rng.normal(size=n)
    W = rng.integers(0, 2, n)
    Y = W * (1 + x) + rng.normal(size=n)

    started = time.perf_counter()
    scores = cross_fitted_scores(Y, W)[0]
    scores_s = time.perf_counter() - started
    started = time.perf_counter()
    autoc = rank_average_treatment_effect(scores, x, n_draws=args.draws)[0]
    autoc_s = time.perf_counter() - started
    started = time.perf_counter()
    paired = rank_average_treatment_effect(scores, np.column_stack([x, rng.normal(size=n)]), n_draws=args.draws)
    paired_s = time.perf_counter() - started
    print(f"n = {n}: DR scores {scores_s:.2f} s; AUTOC with {args.draws} draws {autoc_s:.2f} s "
          f"(estimate {autoc.estimate:.3f}, SE {autoc.std_err:.3f}); two rules paired {paired_s:.2f} s "
          f"(difference {paired[2].estimate:.3f}, SE {paired[2].std_err:.3f}); "
          f"scores + AUTOC {scores_s + autoc_s:.2f} s against the goal of 5 s")


if __name__ == "__main__":
    main()

"""The heterogeneity test's randomization inference (core.evaluate.Rerandomization): treatment redrawn as the design
assigned it, outcomes imputed under the null of one effect, and the level of the test on a cluster-randomized null
trial with few clusters per fold (seeded and small here; bench/bench_clustered.py at full size)."""

import numpy as np
import pytest

from geocate.core.evaluate import Rerandomization, rank_average_treatment_effect, rerandomized_rates


def design(n=120, villages=12, seed=0):
    rng = np.random.default_rng(seed)
    village = np.repeat(np.arange(villages), n // villages)
    strata = village % 2                      # two strata of villages
    treated_village = np.zeros(villages)
    for s in (0, 1):                          # half the villages of each stratum treated
        members = np.flatnonzero(np.arange(villages) % 2 == s)
        treated_village[rng.permutation(members)[:len(members) // 2]] = 1
    W = treated_village[village]
    Y = rng.normal(size=n) + 0.7 * rng.normal(size=villages)[village] + 1.0 * W
    return Rerandomization(outcome=Y, treated=W, mu0=np.zeros(n), mu1=np.full(n, 1.0), propensity=0.5, tau=1.0,
                           assignment=village, strata=strata), village, strata


def test_clusters_are_redrawn_whole_within_their_strata():
    rerandomization, village, strata = design()
    test = np.ones(len(village), bool)
    draws = rerandomization.draws(test, np.random.default_rng(1), 50)
    for w in draws:
        for v in np.unique(village):                      # a village is all treated or all not
            assert len(np.unique(w[village == v])) == 1
        for s in (0, 1):                                  # each stratum keeps its number of treated villages
            assert w[strata == s].sum() == rerandomization.treated[strata == s].sum()
    assert len({tuple(w) for w in draws}) > 10            # and the draws differ


def test_unit_assignment_permutes_units_and_known_probabilities_are_drawn():
    rerandomization, village, _ = design()
    units = Rerandomization(**{**rerandomization.__dict__, "assignment": None, "strata": None})
    draws = units.draws(np.ones(len(village), bool), np.random.default_rng(2), 200)
    assert np.all(draws.sum(axis=1) == rerandomization.treated.sum())
    assert any(len(np.unique(w[village == 0])) == 2 for w in draws)   # villages split: units were permuted
    known = Rerandomization(**{**rerandomization.__dict__, "assignment": None, "strata": None,
                               "known": np.where(village < 6, 0.2, 0.8)})
    draws = known.draws(np.ones(len(village), bool), np.random.default_rng(3), 2000)
    assert draws[:, village < 6].mean() == pytest.approx(0.2, abs=0.01)
    assert draws[:, village >= 6].mean() == pytest.approx(0.8, abs=0.01)


def test_under_the_null_redrawn_outcomes_keep_every_untreated_outcome():
    rerandomization, village, _ = design()
    test = np.ones(len(village), bool)
    rng = np.random.default_rng(4)
    scores = rerandomization.scores(test, rng, 3)
    w = rerandomization.draws(test, np.random.default_rng(4), 3)
    untreated = rerandomization.outcome - rerandomization.tau * rerandomization.treated
    # with mu0 = 0, mu1 = 1, e = 1/2: Gamma = 1 + 2 W (Y* - 1) - 2 (1 - W) Y*, Y* = Y(0) + W*
    expected = 1 + 2 * w * (untreated + w - 1) - 2 * (1 - w) * (untreated + w)
    assert np.allclose(scores, expected)


def test_the_rate_takes_the_larger_standard_error():
    rng = np.random.default_rng(5)
    scores, priority = rng.normal(size=200), rng.normal(size=200)
    rate = rank_average_treatment_effect(scores, priority, n_draws=100)[0]
    wide = rerandomized_rates([rate], 3 * rate.std_err * rng.normal(size=(100, 1)))[0]
    assert wide.std_err > rate.std_err and wide.ci[0] < rate.ci[0]
    assert rerandomized_rates([rate], 0.01 * rate.std_err * rng.normal(size=(100, 1)))[0] is rate


def test_a_fold_with_one_cluster_per_stratum_still_varies():
    """Pairs of villages randomized within pairs: a fold holding one village of each pair sees its villages'
    treatment change between redraws (the whole trial is assigned again, not the fold alone)."""
    village = np.repeat(np.arange(8), 5)
    pair = village // 2
    treated = (village % 2 == 0).astype(float)
    rerandomization = Rerandomization(outcome=np.zeros(40), treated=treated, mu0=np.zeros(40), mu1=np.zeros(40),
                                      propensity=0.5, tau=0.0, assignment=village, strata=pair)
    fold = village % 2 == 0                                  # one village of each pair
    draws = rerandomization.draws(fold, np.random.default_rng(0), 100)
    assert 0.3 < draws.mean() < 0.7 and len({tuple(d) for d in draws}) > 5


def clustered_null_trial(n_villages, per_village, sd, seed, effect=None):
    """Covariates per unit, whole villages treated (half), village effects N(0, sd^2); one effect (1) unless
    ``effect(X)`` is given."""
    rng = np.random.default_rng(seed)
    village = np.repeat(np.arange(n_villages), per_village)
    X = rng.standard_normal((len(village), 4)) + rng.standard_normal((n_villages, 4))[village]
    W = (rng.permutation(n_villages) < n_villages // 2)[village].astype(int)
    tau = 1.0 if effect is None else effect(X)
    Y = X[:, 1] + rng.normal(0, sd, n_villages)[village] + W * tau + rng.standard_normal(len(village))
    return X, W, Y, village


def clustered_test(X, W, Y, village, seed, rerandomize=True):
    from geocate.core.evaluate import cluster_assignment, sequential_rate_test
    from geocate.core.learners import CrossFittedCausalForest

    model = CrossFittedCausalForest(n_estimators=40, seed=seed).fit(Y, W, X, groups=village)
    rerandomization = model.rerandomization(assignment=cluster_assignment(village, W)) if rerandomize else None
    return sequential_rate_test(model.dr_scores_, model.fold_, model.priority_for, n_draws=100, seed=seed,
                                clusters=village, rerandomization=rerandomization)[0]


@pytest.mark.slow
def test_with_few_villages_per_fold_the_test_keeps_its_level():
    """30 cluster-randomized null trials, 40 villages (8 per fold) of 12 units, village effects with sd 0.7: the
    combined t-statistic is about standard normal (sd in [0.6, 1.15]) and at most 3 of 30 reject at 5 %
    (P = 6 % for a test at its level). On these seeds the half-sample bootstrap alone, with normal fold
    t-statistics (the test before issue 25), gave sd 1.17 and 4 rejections; the re-randomized test sd 0.88 and
    none. bench/bench_clustered.py runs the issue's designs at full size."""
    t_stats, rejections = [], 0
    for rep in range(30):
        X, W, Y, village = clustered_null_trial(40, 12, 0.7, 500 + rep)
        test = clustered_test(X, W, Y, village, rep)
        t_stats.append(test.t_stat)
        rejections += test.detected
    assert abs(np.mean(t_stats)) < 0.55 and 0.6 < np.std(t_stats) < 1.15
    assert rejections <= 3


def test_with_few_villages_per_fold_real_heterogeneity_is_still_detected():
    X, W, Y, village = clustered_null_trial(60, 15, 0.3, 7, effect=lambda X: 1 + 2.0 * (X[:, 0] > 0))
    test = clustered_test(X, W, Y, village, 7)
    assert test.detected and test.estimate > 0.2


def test_the_ates_interval_covers_in_a_cluster_randomized_trial_with_ten_villages():
    """200 seeded trials of 10 villages (5 treated) of 20 units, village effects with sd 0.7, one effect (1): the
    DR ATE's 95 % interval with the re-randomization SE (the larger of it and CR1 on t with G - 1 df) covers 1 in at least 90 %
    (here 186 / 200; CR1 alone 184). bench/bench_clustered.py checks it on imagery at full size."""
    from geocate.core.crossfit import location_folds
    from geocate.core.evaluate import cluster_assignment, rerandomized_ate
    from geocate.core.scores import cross_fitted_scores, doubly_robust_ate, small_sample_se

    covered = 0
    for rep in range(200):
        X, W, Y, village = clustered_null_trial(10, 20, 0.7, 900 + rep)
        scores, mu0, mu1, e = cross_fitted_scores(Y, W, X, location_folds(village, 5, rep), seed=rep)
        cr1 = doubly_robust_ate(scores, village)
        ate = rerandomized_ate(cr1, Rerandomization(Y, W, mu0, mu1, e, float(scores.mean()),
                                                    assignment=cluster_assignment(village, W)), 100, rep)
        # CR1 over 10 villages read on t with 9 df (scaled by 2.262 / 1.960), or the redraws' spread if larger
        assert ate.std_err >= small_sample_se(cr1.std_err, 10) > 1.15 * cr1.std_err and ate.estimate == cr1.estimate
        covered += abs(ate.estimate - 1.0) < 1.959964 * ate.std_err
    assert covered >= 180


def test_the_small_sample_correction_is_students_t_with_g_minus_one_degrees_of_freedom():
    from geocate.core.scores import small_sample_se

    assert small_sample_se(1.0, 2) == pytest.approx(12.706205 / 1.959964, rel=1e-6)
    assert small_sample_se(1.0, 26) == pytest.approx(2.059539 / 1.959964, rel=1e-6)
    assert small_sample_se(1.0, 100000) == pytest.approx(1.0, abs=1e-4)
    assert small_sample_se(0.3, 1) == 0.3

"""Inference as it is used: the sequential heterogeneity test holds its level, standard errors respect
clusters, numerical noise is not evidence, and one study has one ATE. Seeded, small versions of the
studies in bench/bench_validity.py."""

import dataclasses

import numpy as np
import pytest
from conftest import unit_table

from geocate.core.crossfit import location_folds
from geocate.core.errors import GeoCateError
from geocate.core.evaluate import (
    best_linear_predictor,
    group_average_effects,
    rank_average_treatment_effect,
    sequential_rate_test,
    toc_and_rate,
)
from geocate.core.learners import CrossFittedCausalForest
from geocate.core.scores import cross_fitted_scores, doubly_robust_ate, mean_and_se


def null_trial(n, seed):
    """grf's no-heterogeneity design: tau = 1 for everyone, mu0 depends on X, W ~ Bernoulli(0.5)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 6))
    W = rng.integers(0, 2, n)
    Y = X[:, 0] + np.maximum(X[:, 1], 0) + W + rng.standard_normal(n)
    return X, W, Y


@pytest.mark.slow
def test_the_sequential_test_holds_its_level_on_a_trial_without_heterogeneity():
    """30 null trials of 500 units: the combined t-statistic is about standard normal (mean within
    3 SE = 0.55 of 0, sd in [0.6, 1.25]) and at most 4 of 30 runs reject at 5 % (P = 2 % for a test
    at its level). The naive pooled test rejects in 12-18 % of such runs (bench/bench_validity.py)."""
    t_stats, rejections = [], 0
    for rep in range(30):
        X, W, Y = null_trial(500, 1000 + rep)
        model = CrossFittedCausalForest(n_estimators=40, seed=rep).fit(Y, W, X)
        test = sequential_rate_test(model.dr_scores_, model.fold_, model.priority_for, n_draws=100, seed=rep)[0]
        assert len(test.folds) == 4 and 0 <= test.p_value <= 1
        t_stats.append(test.t_stat)
        rejections += test.detected
    assert abs(np.mean(t_stats)) < 0.55 and 0.6 < np.std(t_stats) < 1.25
    assert rejections <= 4


def test_the_sequential_test_detects_real_heterogeneity():
    rng = np.random.default_rng(8)
    n = 800
    X = rng.standard_normal((n, 4))
    W = rng.integers(0, 2, n)
    Y = X[:, 1] + W * (1 + 1.5 * (X[:, 0] > 0)) + rng.standard_normal(n)
    model = CrossFittedCausalForest(n_estimators=60, seed=3).fit(Y, W, X)
    test = sequential_rate_test(model.dr_scores_, model.fold_, model.priority_for, seed=3)[0]
    assert test.detected and test.t_stat > 3 and test.estimate > 0.2
    assert "heterogeneity detected" in test.describe() and "one-sided" in test.describe()


def test_the_priority_of_a_held_out_fold_never_sees_that_folds_outcomes():
    X, W, Y = null_trial(400, 5)
    model = CrossFittedCausalForest(n_estimators=30, seed=1).fit(Y, W, X)
    train, test = model.fold_ < 2, model.fold_ == 2
    first = model.priority_for(train, test)
    changed = Y.copy()
    changed[~train] += 40 * W[~train]       # every outcome outside the training folds
    other = CrossFittedCausalForest(n_estimators=30, seed=1).fit(changed, W, X)
    np.testing.assert_allclose(other.priority_for(train, test), first)
    # The last step reuses the fold forest grown on folds 0-3: fold 4's outcomes reach it neither.
    last_train, last = model.fold_ != 4, model.fold_ == 4
    reused = model.priority_for(last_train, last)
    np.testing.assert_allclose(reused, model.cate_raw_[last])     # the forest's own ranking, before calibration
    changed = Y.copy()
    changed[last] += 40 * W[last]
    again = CrossFittedCausalForest(n_estimators=30, seed=1).fit(changed, W, X)
    np.testing.assert_allclose(again.priority_for(last_train, last), reused)


def test_a_constant_priority_is_never_detected_and_noise_is_zero():
    rng = np.random.default_rng(2)
    scores = rng.normal(1.0, 2.0, 300)
    rate = rank_average_treatment_effect(scores, np.full(300, 0.7), n_draws=50)[0]
    assert rate.estimate == 0.0 and rate.std_err == 0.0 and rate.p_value == 1.0
    assert np.all(rate.toc == 0.0)
    folds = location_folds(np.arange(300), 5, 1)
    test = sequential_rate_test(scores, folds, lambda train, held: np.full(int(held.sum()), 3.0), n_draws=50)[0]
    assert test.estimate == 0.0 and test.t_stat == 0.0 and test.p_value == 0.5 and not test.detected
    calibration = best_linear_predictor(scores, np.full(300, 2.0))
    assert calibration.differential == 0.0 and calibration.differential_p == 1.0
    assert calibration.mean_forest == pytest.approx(scores.mean())


@pytest.mark.parametrize("q", [[0.5, 0.2, 1.0], [0.0, 0.5, 1.0], [0.2, 0.5], [0.5, 1.0, 1.2], [0.5, 0.5, 1.0], []])
def test_q_grids_are_validated(q):
    with pytest.raises(GeoCateError, match="q grid"):
        toc_and_rate(np.arange(10.0), np.arange(10.0), q=q)


def village_trial(seed, villages=150, size=20, icc=0.3, cluster_randomized=True):
    """Villages of ``size`` units, outcome shock shared in a village (intra-village correlation ``icc``),
    treatment assigned by village (or by unit); true ATE 1."""
    rng = np.random.default_rng(seed)
    village = np.repeat(np.arange(villages), size)
    W = (rng.random(villages) < 0.5).astype(int)[village] if cluster_randomized else rng.integers(0, 2, len(village))
    Y = W + rng.normal(0, np.sqrt(icc), villages)[village] + rng.normal(0, np.sqrt(1 - icc), len(village))
    return village, W, Y


def test_the_ate_interval_covers_with_village_shocks_only_when_clustered():
    """200 cluster-randomized trials of 150 villages x 20 units, ICC 0.3: the cluster-robust 95 % interval
    covers the true ATE in at least 90 % (3 binomial SE below 95 %); the unit-level one in under 75 %."""
    clustered = unit_level = 0
    for rep in range(200):
        village, W, Y = village_trial(rep)
        scores = cross_fitted_scores(Y, W, folds=location_folds(village, 5, rep))[0]
        low, high = doubly_robust_ate(scores, village).interval()
        clustered += low <= 1.0 <= high
        low, high = doubly_robust_ate(scores).interval()
        unit_level += low <= 1.0 <= high
    assert clustered / 200 >= 0.90
    assert unit_level / 200 < 0.75


def test_cluster_robust_standard_errors_by_hand_and_against_statsmodels():
    import statsmodels.api as sm

    values = np.array([1.0, 3.0, 2.0, 6.0, 4.0, 8.0])
    mean, se = mean_and_se(values)
    assert mean == pytest.approx(4.0) and se == pytest.approx(values.std(ddof=1) / np.sqrt(6))
    clusters = np.array([0, 0, 1, 1, 2, 2])   # cluster sums of deviations: -4, 0, 4
    assert mean_and_se(values, clusters)[1] == pytest.approx(np.sqrt(3 / 2 * 32) / 6)
    rng = np.random.default_rng(4)
    village, W, Y = village_trial(9, villages=40, size=8)
    fit = sm.OLS(Y, np.ones(len(Y))).fit(cov_type="cluster", cov_kwds={"groups": village})
    n = len(Y)   # statsmodels' CR1: G / (G - 1) * (n - 1) / (n - k), and k = 1 here
    assert mean_and_se(Y, village)[1] == pytest.approx(fit.bse[0], rel=1e-9)
    # GATEs and the BLP use the same clusters.
    cate = rng.normal(size=n)
    rows = group_average_effects(Y, cate, n_groups=2, clusters=village)
    from geocate.core.evaluate import effect_groups

    low_group = effect_groups(cate, 2) == 1
    assert rows[0][3] == pytest.approx(mean_and_se(Y[low_group], village[low_group])[1])
    assert best_linear_predictor(Y, cate, village).mean_forest_se > best_linear_predictor(Y, cate).mean_forest_se


def test_estimatecate_keeps_a_cluster_field_together_and_drops_null_clusters(small_trial, demo_raster):
    from geocate.core.pipeline import estimate_cate

    rng = np.random.default_rng(1)
    villages = [f"v{v}" for v in rng.integers(0, 60, len(small_trial.outcome))]
    villages[0] = None
    units = dataclasses.replace(unit_table(small_trial), clusters=villages)
    study, result = estimate_cate(units, demo_raster, seed=2, n_draws=50)
    assert study.dropped["cluster is null"] == 1 and not study.used[0]
    labels = np.array(villages, dtype=object)
    for village in set(villages) - {None}:
        assert len(set(result.fold[labels == village])) == 1
    assert result.metadata["fold_groups"] <= 60
    assert result.metadata["clustered_by"] == "cluster field and shared locations"
    assert result.heterogeneity.detected


def test_estimatecate_and_imageclusters_report_one_ate(small_trial, demo_raster):
    from geocate.core.pipeline import estimate_cate, find_clusters

    units = unit_table(small_trial)
    _, forest = estimate_cate(units, demo_raster, seed=4, n_draws=20)
    _, clusters, _ = find_clusters(units, demo_raster, seed=4, n_clusters=2, max_clusters=2, epochs=10)
    assert clusters.ate == pytest.approx(forest.ate, rel=1e-12)
    assert clusters.ate_se == pytest.approx(forest.ate_se, rel=1e-12)
    assert abs(forest.ate - small_trial.true_cate.mean()) < 3 * forest.ate_se


def test_studies_nothing_can_be_estimated_from_are_refused_in_plain_words(small_trial, demo_raster):
    from geocate.core.evaluate import evaluate_priorities
    from geocate.core.pipeline import estimate_cate

    constant = np.full(len(small_trial.outcome), 3.0)
    with pytest.raises(GeoCateError, match="outcome 'outcome' has the same value"):
        estimate_cate(unit_table(small_trial, outcome=constant), demo_raster)
    with pytest.raises(GeoCateError, match="has the same value"):
        evaluate_priorities(constant, small_trial.treated, small_trial.true_cate)
    covariates = np.column_stack([small_trial.covariates[:, 0], small_trial.treated])
    with pytest.raises(GeoCateError, match="covariate 'distance' is identical to the treatment"):
        estimate_cate(unit_table(small_trial, covariates=covariates), demo_raster)


def test_a_constant_priority_gives_a_report_table_not_a_zero_division(small_trial):
    from geocate.core.evaluate import evaluate_priorities
    from geocate.core.report import rate_rows

    n = len(small_trial.outcome)
    evaluation = evaluate_priorities(small_trial.outcome, small_trial.treated, np.ones(n), n_draws=20)
    rows = rate_rows(evaluation)
    autoc = [row for row in rows if row[0] == "AUTOC"][0]
    assert autoc[2] == 0.0 and autoc[6] == 1.0
    assert evaluation.calibration[0].differential_p == 1.0
    assert all(np.isnan(row[7]) or np.isfinite(row[7]) for row in rows)


def test_evaluate_is_cancelled_within_its_bootstrap():
    from geocate.core.errors import Cancelled
    from geocate.core.evaluate import evaluate_priorities

    rng = np.random.default_rng(3)
    n = 2000
    W = rng.integers(0, 2, n)
    polls = []
    with pytest.raises(Cancelled):
        evaluate_priorities(W + rng.normal(size=n), W, rng.normal(size=n), n_draws=200,
                            is_cancelled=lambda: polls.append(1) or len(polls) > 5)
    assert len(polls) == 6     # stopped at the sixth poll, a few draws into the first bootstrap


def test_messages_name_the_real_problem(small_trial, demo_raster):
    """No control units, an all-null covariate, units without geometry, and blocks too large for the study."""
    from geocate.core.pipeline import estimate_cate

    n = len(small_trial.outcome)
    with pytest.raises(GeoCateError, match="has no control units: every unit with a value is 1"):
        estimate_cate(unit_table(small_trial, treated=np.ones(n)), demo_raster)
    covariates = small_trial.covariates.copy()
    covariates[:, 1] = np.nan
    with pytest.raises(GeoCateError, match="covariate 'distance' is null for every unit"):
        estimate_cate(unit_table(small_trial, covariates=covariates), demo_raster)
    units = unit_table(small_trial)
    xy = units.xy.copy()
    xy[:5] = np.nan
    study, _ = estimate_cate(dataclasses.replace(units, xy=xy), demo_raster, n_draws=20)
    assert study.dropped["no geometry"] == 5 and study.dropped["outside the raster"] == 0
    with pytest.raises(GeoCateError, match=r"Spatial blocks of 100,000 m leave only [1-4] group.*Use smaller spatial blocks"):
        estimate_cate(units, demo_raster, spatial_block=100000)

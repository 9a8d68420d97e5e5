"""RATE, TOC, calibration and honest folds: hand-checked formulas and simulations with known truth."""

import numpy as np
import pytest
from conftest import unit_table

from geocate.core.errors import GeoCateError
from geocate.core.evaluate import (
    DEFAULT_Q,
    Rerandomization,
    best_linear_predictor,
    correlation_range,
    group_average_effects,
    honest_folds,
    rank_average_treatment_effect,
    rates_of_rows,
    rerandomized_values,
    spatial_blocks,
    toc_and_rate,
)
from geocate.core.learners import CrossFittedCausalForest
from geocate.core.scores import aipw_scores, cross_fitted_scores

SCORES = np.array([4.0, 0.0, 2.0, 6.0])


def test_toc_autoc_and_qini_by_hand():
    priority = np.array([0.9, 0.1, 0.5, 0.7])      # order: 4, 6, 2, 0; ATE 3
    autoc, toc = toc_and_rate(SCORES, priority, q=[0.25, 0.5, 0.6, 0.75, 1.0])
    np.testing.assert_allclose(toc, [1.0, 2.0, (4 + 6 + 0.4 * 2) / 2.4 - 3, 1.0, 0.0])
    assert autoc == pytest.approx((1 + 2 + 1 + 0) / 4)
    qini, _ = toc_and_rate(SCORES, priority, target="QINI")
    assert qini == pytest.approx((0.25 * 1 + 0.5 * 2 + 0.75 * 1 + 1.0 * 0) / 4)


def test_tied_priorities_share_their_groups_mean_score():
    # Top tie group {4, 0} -> 2, 2; bottom {2, 6} -> 4, 4; ATE 3.
    autoc, toc = toc_and_rate(SCORES, [1, 1, 0, 0], q=[0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(toc, [-1.0, -1.0, 8 / 3 - 3, 0.0])
    assert autoc == pytest.approx((-1 - 1 - 1 / 3 + 0) / 4)
    # All tied: no rule, no gain anywhere.
    assert toc_and_rate(SCORES, [5, 5, 5, 5])[0] == pytest.approx(0.0)


def test_toc_at_one_is_zero_and_a_fractional_unit_fills_the_grid():
    rng = np.random.default_rng(1)
    scores, priority = rng.normal(size=37), rng.normal(size=37)
    _, toc = toc_and_rate(scores, priority, q=[0.01, 0.5, 1.0])
    order = np.argsort(-priority)
    assert toc[-1] == pytest.approx(0.0, abs=1e-12)
    assert toc[0] == pytest.approx(scores[order[0]] - scores.mean())   # 0.37 of a unit: the top unit's score


@pytest.mark.parametrize("target", ["AUTOC", "QINI"])
def test_rates_of_many_score_rows_equal_one_row_at_a_time(target):
    # The re-randomization's redraws share one ranking: sorted once, each row's RATE as toc_and_rate gives it.
    rng = np.random.default_rng(3)
    rows, priority = rng.normal(size=(7, 501)), rng.normal(size=501)
    one_by_one = [toc_and_rate(row, priority, target=target)[0] for row in rows]
    np.testing.assert_allclose(rates_of_rows(rows, priority, target=target), one_by_one, rtol=0, atol=1e-13)
    tied = np.round(priority)                               # ties: each row through toc_and_rate
    assert np.array_equal(rates_of_rows(rows, tied, target=target),
                          [toc_and_rate(row, tied, target=target)[0] for row in rows])
    assert rates_of_rows(rows[:, :1], priority[:1], target=target).tolist() == [0.0] * 7
    with pytest.raises(GeoCateError, match="Unknown RATE target"):
        rates_of_rows(rows, priority, target="AUC")
    with pytest.raises(GeoCateError):
        rates_of_rows(rows, priority, q=[0.2, 0.5], target=target)     # the grid must end at 1, as toc_and_rate's
    # No redraws: no values (the re-randomization SE is then not used), not an error.
    trial = Rerandomization(outcome=rows[0], treated=(priority > 0).astype(float), mu0=np.zeros(501),
                            mu1=np.zeros(501), propensity=0.5, tau=0.0)
    assert rerandomized_values(trial, np.ones(501, bool), rng, 0, priority, target, DEFAULT_Q).shape == (0, 1)


def test_aipw_scores_by_hand():
    gamma = aipw_scores([3.0, 1.0], [1, 0], mu0=np.array([1.0, 0.5]), mu1=np.array([2.0, 1.5]), propensity=0.5)
    np.testing.assert_allclose(gamma, [2 - 1 + (3 - 2) / 0.5, 1.5 - 0.5 - (1 - 0.5) / 0.5])


def null_trial(n, rng):
    W = rng.integers(0, 2, n)
    Y = 1.0 * W + rng.normal(size=n)
    return Y, W


@pytest.mark.slow
def test_random_priorities_give_intervals_that_cover_zero_95_percent_of_the_time():
    """Monte Carlo: 300 trials of 400 units, 200 draws each; the coverage of the 95 % AUTOC
    interval must lie in [0.91, 0.99], 3 binomial standard deviations (0.0126 each) around 0.95.
    (500 trials gave 0.948, with the mean SE 0.0986 against an actual sd of the estimate of 0.0989.)"""
    rng = np.random.default_rng(2024)
    covered = 0
    for trial in range(300):
        Y, W = null_trial(400, rng)
        scores = cross_fitted_scores(Y, W, n_folds=2, seed=trial)[0]
        rate = rank_average_treatment_effect(scores, rng.normal(size=400), n_draws=200, seed=trial)[0]
        covered += rate.ci[0] <= 0 <= rate.ci[1]
    assert 0.91 <= covered / 300 <= 0.99


def test_paired_difference_of_two_rules_and_its_draws():
    rng = np.random.default_rng(3)
    n = 2000
    x = rng.normal(size=n)
    W = rng.integers(0, 2, n)
    Y = W * (1 + x) + rng.normal(size=n)
    scores = cross_fitted_scores(Y, W, seed=1)[0]
    good, noise = x, rng.normal(size=n)
    results = rank_average_treatment_effect(scores, np.column_stack([good, noise]), names=["x", "noise"], seed=4)
    assert [r.priority for r in results] == ["x", "noise", "x - noise"]
    assert results[0].estimate == pytest.approx(results[1].estimate + results[2].estimate)
    np.testing.assert_allclose(results[2].draws, results[0].draws - results[1].draws)
    assert results[0].p_value < 1e-4 and results[2].ci[0] > 0
    assert results[0].ci[0] <= results[0].estimate <= results[0].ci[1]
    assert results[0].ratio == pytest.approx(results[0].estimate / results[0].std_err)


def test_calibration_and_group_effects_on_a_known_linear_effect():
    rng = np.random.default_rng(5)
    n = 4000
    tau = 1 + rng.normal(size=n)
    W = rng.integers(0, 2, n)
    Y = W * tau + rng.normal(size=n)
    scores = aipw_scores(Y, W, np.zeros(n), tau, 0.5)    # oracle outcome models
    calibrated = best_linear_predictor(scores, tau)
    assert abs(calibrated.mean_forest - 1) < 3 * calibrated.mean_forest_se
    assert abs(calibrated.differential - 1) < 3 * calibrated.differential_se and calibrated.differential_p < 1e-6
    useless = best_linear_predictor(scores, rng.normal(size=n))
    assert abs(useless.differential) < 3 * useless.differential_se
    rows = group_average_effects(scores, tau, n_groups=4)
    assert [r[1] for r in rows] == [1000] * 4
    assert all(rows[g][2] < rows[g + 1][2] for g in range(3))
    true_gates = [tau[np.argsort(tau)[g * 1000:(g + 1) * 1000]].mean() for g in range(4)]
    assert all(row[4] - 0.1 < truth < row[5] + 0.1 for row, truth in zip(rows, true_gates))


def test_strong_image_heterogeneity_is_detected_by_the_valid_test_and_covariates_are_not(small_trial, demo_raster):
    """The sequential cross-fold test: the image CATE's heterogeneity is detected, pure-noise covariates'
    is not, and the paired difference favours the imagery."""
    from geocate.core.evaluate import sequential_rate_test
    from geocate.core.pipeline import estimate_cate

    study, result = estimate_cate(unit_table(small_trial), demo_raster, seed=5)
    test = result.heterogeneity
    assert test.detected and test.p_value < 1e-3 and test.estimate > 0.3 and len(test.folds) == 4
    assert result.metadata["heterogeneity_test"]["p_value"] == test.p_value
    covariate_only = CrossFittedCausalForest(seed=5).fit(small_trial.outcome, small_trial.treated,
                                                         small_trial.covariates)
    used = study.used
    assert used.all()
    scores = result.dr_scores[used]
    covariates = sequential_rate_test(scores, covariate_only.fold_, covariate_only.priority_for, seed=5)[0]
    assert not covariates.detected and covariates.p_value > 0.05


def test_spatial_leakage_random_folds_overstate_autoc_and_blocked_folds_do_not():
    """Effect shocks shared by 36 blocks of 2 km (not predictable in a new place): with random
    folds, a forest on coordinates learns each block's shock from its neighbours and its
    'heterogeneity' looks real; with blocked folds it does not."""
    rng = np.random.default_rng(11)
    n = 1440
    coords = rng.uniform(0, 12000, (n, 2))
    blocks = spatial_blocks(coords, 2000)
    shock = rng.normal(0, 1.5, blocks.max() + 1)[blocks]
    W = rng.integers(0, 2, n)
    Y = W * (1.0 + shock) + rng.normal(size=n)
    X = coords / 1000

    def autoc(folds_by, clusters):
        model = CrossFittedCausalForest(n_estimators=100, seed=1).fit(Y, W, X, groups=folds_by)
        return rank_average_treatment_effect(model.dr_scores_, model.cate_, clusters=clusters, seed=2)[0]

    random_folds = autoc(np.arange(n), np.arange(n))
    blocked = autoc(blocks, blocks)
    assert random_folds.estimate > 0.3 and random_folds.p_value < 0.001
    assert blocked.estimate < random_folds.estimate / 2
    assert blocked.ci[0] <= 0


def test_honest_folds_keep_locations_and_blocks_together():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 10000, (500, 2))
    folds = honest_folds(coords, n_folds=5, block_size=2500, seed=1)
    blocks = spatial_blocks(coords, 2500)
    assert all(len(set(folds[blocks == b])) == 1 for b in np.unique(blocks))
    # Villages of about 300 m: some straddle a block border, and then join both blocks in one fold.
    village = rng.integers(0, 60, 500)
    coords = rng.uniform(0, 10000, (60, 2))[village] + rng.normal(0, 150, (500, 2))
    blocks = spatial_blocks(coords, 2500)
    merged = honest_folds(coords, n_folds=3, block_size=2500, locations=village, seed=1)
    assert all(len(set(merged[village == v])) == 1 for v in np.unique(village))
    assert all(len(set(merged[blocks == b])) == 1 for b in np.unique(blocks))
    with pytest.raises(GeoCateError, match="must be positive"):
        spatial_blocks(coords, 0)


def test_correlation_range_finds_the_scale_of_a_spatial_field():
    rng = np.random.default_rng(3)
    coords = rng.uniform(0, 20000, (1500, 2))
    field_value = np.sin(coords[:, 0] / 3000) + np.sin(coords[:, 1] / 3000) + 0.3 * rng.normal(size=1500)
    found = correlation_range(coords, field_value)
    assert 1000 < found < 8000
    assert correlation_range(coords, rng.normal(size=1500)) < 2500


def test_an_empty_layer_is_refused_in_plain_words():
    with pytest.raises(GeoCateError, match="holds no units"):
        from geocate.core.evaluate import evaluate_priorities

        evaluate_priorities([], [], np.zeros((0, 1)))


def test_plots_leave_the_process_pyplot_backend_alone(tmp_path):
    """Inside QGIS, matplotlib.use('Agg') would switch the whole process's backend and close others' figures."""
    import matplotlib

    from geocate.core.report import plot_toc

    before = matplotlib.get_backend()
    rates = rank_average_treatment_effect(np.random.default_rng(0).normal(size=200), np.arange(200.0), n_draws=20)
    plot_toc(rates, str(tmp_path / "toc.png"))
    assert (tmp_path / "toc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == before


def test_automatic_blocks_stop_when_clusters_not_blocks_are_what_is_missing():
    """30 villages and no window footprint (evaluate's call) used to loop for ever; 15 villages are too few for
    4 groups per fold whatever the blocks, and the note says so instead of shrinking the blocks for nothing."""
    from geocate.core.evaluate import auto_block_size, honest_fold_groups

    rng = np.random.default_rng(0)
    xy, y, w = rng.uniform(0, 10000, (300, 2)), rng.normal(size=300), rng.integers(0, 2, 300)
    size, note = auto_block_size(xy, y, w, locations=np.repeat(np.arange(30), 10), footprint=0.0)
    assert note is None and len(np.unique(honest_fold_groups(xy, size, np.repeat(np.arange(30), 10)))) >= 20
    size, note = auto_block_size(xy, y, w, locations=np.repeat(np.arange(15), 20), footprint=0.0)
    assert size > 0 and "Only 15 groups of units can be kept apart" in note

"""The cross-fitted causal forest, the DR ATE, folds and effect groups, on data with known truth."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from geocate.core.crossfit import location_folds, location_ids
from geocate.core.errors import Cancelled, GeoCateError
from geocate.core.evaluate import effect_groups
from geocate.core.learners import CrossFittedCausalForest, forest_max_features


def tabular_trial(n=1500, seed=0, heterogeneous=True):
    """tau(x) = 1 + 2 * 1[x0 > 0] (or 1); mu0(x) = x1 + sin(2 x2); W ~ Bernoulli(0.5); noise N(0, 1)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5))
    tau = 1 + 2 * (X[:, 0] > 0) if heterogeneous else np.ones(n)
    T = rng.integers(0, 2, n)
    Y = X[:, 1] + np.sin(2 * X[:, 2]) + T * tau + rng.standard_normal(n)
    return X, T, Y, tau


@pytest.fixture(scope="module")
def fitted():
    X, T, Y, tau = tabular_trial()
    return CrossFittedCausalForest(n_folds=5, n_estimators=200, seed=1).fit(Y, T, X), X, T, Y, tau


def test_forest_recovers_a_known_heterogeneous_effect(fitted):
    model, X, T, Y, tau = fitted
    assert spearmanr(model.cate_, tau).correlation > 0.75
    assert np.sqrt(np.mean((model.cate_ - tau) ** 2)) < 0.6  # sd of tau is 1: a constant guess scores 1.0
    assert abs(model.cate_[tau == 3].mean() - model.cate_[tau == 1].mean() - 2) < 0.5


def test_intervals_are_ordered_and_mostly_cover_the_truth(fitted):
    model, X, T, Y, tau = fitted
    assert np.all(model.cate_lo_ <= model.cate_) and np.all(model.cate_ <= model.cate_hi_)
    np.testing.assert_allclose(model.cate_hi_ - model.cate_lo_, 2 * 1.959964 * model.cate_se_, rtol=1e-4)
    coverage = np.mean((model.cate_lo_ <= tau) & (tau <= model.cate_hi_))
    # 0.989 with a mean width of 0.82 (tau is 1 or 3) when measured: broken SEs, too narrow or too wide, show.
    assert coverage > 0.9 and np.mean(model.cate_hi_ - model.cate_lo_) < 1.2


def test_doubly_robust_ate_its_interval_and_scores_that_carry_the_effect(fitted):
    model, X, T, Y, tau = fitted
    low, high = model.ate_interval()
    assert low < tau.mean() < high
    # An oracle difference in means has SE about sqrt(4 * var(Y | arm) / n) ~ 0.08; the DR SE must be of that order.
    assert 0.03 < model.ate_se_ < 0.12
    # E[Gamma_i | X_i] = tau(X_i): the scores, averaged by true effect, recover each effect.
    for value in (1, 3):
        assert abs(model.dr_scores_[tau == value].mean() - value) < 0.3
    assert model.ate_ == pytest.approx(model.dr_scores_.mean())


def test_ate_interval_covers_a_constant_effect_over_seeds():
    hits = 0
    for seed in range(6):
        X, T, Y, tau = tabular_trial(n=600, seed=100 + seed, heterogeneous=False)
        model = CrossFittedCausalForest(n_folds=3, n_estimators=40, seed=seed).fit(Y, T, X)
        low, high = model.ate_interval()
        hits += low < 1.0 < high
    assert hits >= 5  # 95 % intervals: P(fewer than 5 of 6) = 3 %


def test_a_units_cate_does_not_depend_on_its_own_outcome():
    """Out-of-fold: changing the outcomes of fold 0 leaves fold 0's estimates exactly as they were."""
    X, T, Y, tau = tabular_trial(n=400, seed=3)
    first = CrossFittedCausalForest(n_folds=4, n_estimators=40, seed=2).fit(Y, T, X)
    in_fold = first.fold_ == 0
    changed = Y.copy()
    changed[in_fold] += 50 * T[in_fold]
    second = CrossFittedCausalForest(n_folds=4, n_estimators=40, seed=2).fit(changed, T, X)
    np.testing.assert_array_equal(second.fold_, first.fold_)
    np.testing.assert_allclose(second.cate_[in_fold], first.cate_[in_fold])        # calibrated
    np.testing.assert_allclose(second.cate_raw_[in_fold], first.cate_raw_[in_fold])
    assert any(c.grid is not None for c in first.calibrations_)                      # the calibration ran
    assert not np.allclose(second.cate_[~in_fold], first.cate_[~in_fold])


def test_calibration_undoes_a_forests_shrinkage_and_keeps_ranks():
    """E[DR score | prediction] on simulated predictions shrunk by half toward the mean: the curve doubles
    the distance back (to within noise); the map never reverses the order of two predictions."""
    from geocate.core.learners import EffectCalibration

    rng = np.random.default_rng(4)
    tau = rng.uniform(-2, 2, 4000)
    shrunk = 0.5 * tau + 0.1 * rng.standard_normal(4000)
    scores = tau + 2.0 * rng.standard_normal(4000)           # unbiased and noisy, as DR scores are
    calibration = EffectCalibration.fit(shrunk, scores)
    probe = np.array([-0.8, -0.4, 0.0, 0.4, 0.8])
    np.testing.assert_allclose(calibration(probe), 2 * probe, atol=0.15)
    grid = np.linspace(-1.5, 1.5, 301)
    assert np.all(np.diff(calibration(grid)) >= 0)
    assert np.array_equal(EffectCalibration.identity()(probe), probe)
    assert EffectCalibration.fit(shrunk[:50], scores[:50]).grid is None          # too few units: left alone


def test_calibration_curves_variance_is_its_spread_over_repeated_draws():
    """EffectCalibration.variance (the spline's sandwich) against the curve's own spread over 400 draws of the
    same design, with noise that grows with the effect: within 20 % at points inside the bulk of the predictions
    (0.98 to 1.04 when written). A sandwich that adds the intercept's variance apart from the basis's (ignoring
    their covariance under heteroscedastic noise) gave 1.49 to 1.55 at -0.2 and 0.2."""
    from geocate.core.learners import EffectCalibration

    probe = np.array([-0.6, -0.2, 0.2, 0.6])
    values, predicted = [], []
    for draw in range(400):
        rng = np.random.default_rng(100 + draw)
        tau = rng.uniform(-2, 2, 2000)
        shrunk = 0.5 * tau + 0.1 * rng.standard_normal(2000)
        scores = tau + (1.0 + 0.75 * np.abs(tau)) * rng.standard_normal(2000)
        calibration = EffectCalibration.fit(shrunk, scores)
        values.append(calibration(probe))
        predicted.append(calibration.variance(probe))
    ratio = np.mean(predicted, axis=0) / np.var(values, axis=0, ddof=1)
    assert np.all((ratio > 0.8) & (ratio < 1.2)), ratio
    assert np.array_equal(EffectCalibration.identity().variance(probe), np.zeros(4))


def test_calibration_curves_variance_is_cluster_robust_and_the_ridge_smoothers():
    """Scores that share their cluster's shock (40 clusters): given the groups, the curve's variance matches its
    spread over 200 draws (within 30 %); taken as independent units it is far too small. And at 150 units, where
    the ridge's penalty matters, it is exactly sum over groups of (sum of w_i r_i)^2 * G / (G - 1), with w the
    weights of sklearn's own Ridge at the chosen penalty."""
    from sklearn.linear_model import Ridge

    from geocate.core.learners import EffectCalibration
    from geocate.core.scores import outcome_model

    probe = np.array([-0.6, -0.2, 0.2, 0.6])
    values, clustered, independent = [], [], []
    for draw in range(200):
        rng = np.random.default_rng(900 + draw)
        tau = rng.uniform(-2, 2, 2000)
        shrunk = 0.5 * tau + 0.1 * rng.standard_normal(2000)
        village = rng.integers(0, 40, 2000)
        scores = tau + rng.standard_normal(2000) + rng.standard_normal(40)[village]
        values.append(EffectCalibration.fit(shrunk, scores, village)(probe))
        clustered.append(EffectCalibration.fit(shrunk, scores, village).variance(probe))
        independent.append(EffectCalibration.fit(shrunk, scores).variance(probe))
    spread = np.var(values, axis=0, ddof=1)
    ratio = np.mean(clustered, axis=0) / spread
    assert np.all((ratio > 0.7) & (ratio < 1.3)), ratio
    assert np.all(np.mean(independent, axis=0) / spread < 0.5)

    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, 150)
    y = 0.2 * x + rng.standard_normal(150)                          # a weak signal: a strong penalty
    groups = np.arange(150) // 3
    calibration = EffectCalibration.fit(x, y, groups)
    curve = outcome_model().fit(x[:, None], y)
    basis = curve.steps[0][1].transform(x[:, None])
    at = curve.steps[0][1].transform(calibration.grid[:, None])
    ridge = lambda target: Ridge(alpha=curve.steps[-1][1].alpha_).fit(basis, target).predict(at)   # noqa: E731
    weights = np.column_stack([ridge(np.eye(150)[i]) - ridge(np.zeros(150)) for i in range(150)])
    residual = y - curve.predict(x[:, None])
    sums = np.column_stack([weights[:, groups == g] @ residual[groups == g] for g in range(50)])
    np.testing.assert_allclose(calibration.variances, np.sum(sums ** 2, axis=1) * 50 / 49, rtol=1e-6)
    assert curve.steps[-1][1].alpha_ >= 10                              # the penalty binds here


def test_calibration_lowers_the_forests_error_and_keeps_each_folds_ranks(fitted):
    model, X, T, Y, tau = fitted
    rmse = {name: np.sqrt(np.mean((values - tau) ** 2)) for name, values in (("raw", model.cate_raw_),
                                                                              ("calibrated", model.cate_))}
    assert rmse["calibrated"] < 0.85 * rmse["raw"]             # measured: 0.20 -> 0.14
    for k in np.unique(model.fold_):                           # within a fold, one monotone map: ranks kept
        rows = model.fold_ == k
        assert np.all(np.diff(model.cate_[rows][np.argsort(model.cate_raw_[rows])]) >= -1e-12)


def test_units_sharing_a_location_share_a_fold():
    coords = np.repeat(np.random.default_rng(0).uniform(0, 1000, (50, 2)), 4, axis=0)
    folds = location_folds(location_ids(coords), 5, seed=1)
    assert all(len(set(folds[i * 4:(i + 1) * 4])) == 1 for i in range(50))
    assert sorted(np.bincount(folds).tolist()) == [40] * 5
    with pytest.raises(GeoCateError, match=r"group\(s\) of units can be kept apart"):
        location_folds(np.zeros(30), 5, seed=1)


def test_effect_groups_are_equal_sized_and_ordered():
    cate = np.array([5.0, -1.0, 2.0, 2.0, 0.0, 9.0])
    groups = effect_groups(cate, 3)
    assert np.bincount(groups).tolist() == [0, 2, 2, 2]
    assert groups[1] == 1 and groups[5] == 3
    assert cate[groups == 1].max() <= cate[groups == 2].min() <= cate[groups == 2].max() <= cate[groups == 3].min()


def test_forest_max_features():
    assert forest_max_features(5) == 5 and forest_max_features(22) == 20
    assert forest_max_features(514) == 23


def test_cancel_during_a_fold_stops_waiting_at_the_next_poll():
    """econml's forest has no callback: the fold runs in a worker thread and the caller stops
    waiting at the first poll after cancel. No wall-clock bound (a loaded machine stretches every
    poll): the fold must still be running when Cancelled is raised, and only a few polls may pass."""
    import threading

    from geocate.core.errors import Cancelled
    from geocate.core.progress import run_cancellable

    release = threading.Event()
    polls = []

    def slow_fold():
        release.wait(30)
        return "finished"

    def is_cancelled():
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(Cancelled):
        run_cancellable(slow_fold, is_cancelled, poll_seconds=0.05)
    assert not release.is_set() and len(polls) == 3
    release.set()
    assert run_cancellable(lambda: 7, lambda: False) == 7


def test_a_forest_cancelled_during_a_fold_raises_cancelled():
    X, T, Y, tau = tabular_trial(n=800, seed=4)
    calls = []
    with pytest.raises(Cancelled):
        CrossFittedCausalForest(n_estimators=40, seed=1).fit(Y, T, X, is_cancelled=lambda: calls.append(1) or len(calls) > 2)


def test_out_of_bag_on_some_units_matches_econmls_on_all(fitted):
    from geocate.core.learners import out_of_bag

    model, X, T, Y, tau = fitted
    train = model.fold_ != 0
    forest = model.forests_[0]
    everything = np.ravel(forest.oob_predict(X[train]))
    n_train = int(train.sum())
    rows = np.array([0, 5, 17, 200, n_train - 1])
    np.testing.assert_allclose(out_of_bag(forest, X[train][rows], rows, n_train), everything[rows],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out_of_bag(forest, X[train], np.arange(n_train), n_train), everything,
                               rtol=1e-10, atol=1e-12, equal_nan=True)


def test_a_fit_waited_on_from_the_main_thread_collects_cycles_only_there():
    """run_cancellable fits in a worker thread while the caller polls: cycle collection then happens in the
    caller's (QGIS's main) thread, never in the worker, where it could delete main-thread Qt objects; the
    collector is given back afterwards (core.progress.collection_here)."""
    import gc
    import threading
    import time

    from geocate.core.progress import run_cancellable

    class Node:
        pass

    def work():
        for _ in range(20000):   # cyclic garbage: automatic collection would run here, in the worker
            node = Node()
            node.me = node
        time.sleep(0.6)
        return threading.get_ident()

    threads = set()

    def seen(phase, info):
        if phase == "start":
            threads.add(threading.get_ident())

    threshold = gc.get_threshold()
    gc.set_threshold(100, 5, 5)
    gc.callbacks.append(seen)
    try:
        worker = run_cancellable(work, lambda: False, poll_seconds=0.05)
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*threshold)
    assert worker != threading.get_ident() and threads == {threading.get_ident()} and gc.isenabled()

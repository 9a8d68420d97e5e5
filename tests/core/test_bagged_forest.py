"""One causal forest with out-of-bag predictions by groups (issue 26): grf's construction beside the fold forests.

Known truth: the tabular trial of test_learners (tau = 1 or 3). The arithmetic of the little bags' variance is
checked against econml's own; "no tree that saw a unit's group predicts for it" is checked by changing one group's
data and seeing that group's predictions stay the same to the last bit.
"""

import numpy as np
import pytest
from scipy.stats import spearmanr
from test_learners import tabular_trial

from geocate.core.errors import GeoCateError
from geocate.core.learners import (
    BaggedForest,
    CrossFittedCausalForest,
    GroupBaggedCausalForest,
    default_learner,
    grow_bagged_forest,
    little_bag_variance,
)


@pytest.fixture(scope="module")
def bagged():
    X, T, Y, tau = tabular_trial()
    return GroupBaggedCausalForest(n_estimators=200, seed=1).fit(Y, T, X), X, T, Y, tau


def test_out_of_bag_forest_recovers_a_known_heterogeneous_effect(bagged):
    model, X, T, Y, tau = bagged
    assert np.all(np.isfinite(model.cate_)) and np.all(np.isfinite(model.cate_se_))
    assert spearmanr(model.cate_, tau).correlation > 0.75
    assert np.sqrt(np.mean((model.cate_ - tau) ** 2)) < 0.6       # a constant guess scores 1.0
    assert abs(model.cate_[tau == 3].mean() - model.cate_[tau == 1].mean() - 2) < 0.5


def test_out_of_bag_intervals_cover_without_being_wide(bagged):
    model, X, T, Y, tau = bagged
    coverage = np.mean((model.cate_lo_ <= tau) & (tau <= model.cate_hi_))
    width = np.mean(model.cate_hi_ - model.cate_lo_)
    assert coverage > 0.85 and width < 1.5, (coverage, width)


def test_out_of_bag_forest_is_as_accurate_as_the_fold_forests(bagged):
    model, X, T, Y, tau = bagged
    folds = CrossFittedCausalForest(n_estimators=100, seed=1).fit(Y, T, X, folds=model.fold_)
    rmse = lambda cate: np.sqrt(np.mean((cate - tau) ** 2))   # noqa: E731
    assert rmse(model.cate_) < 1.1 * rmse(folds.cate_)
    # Both share the DR scores and the ATE: only the forest stage differs.
    np.testing.assert_allclose(model.dr_scores_, folds.dr_scores_)
    assert model.ate_ == pytest.approx(folds.ate_)


def test_little_bag_variance_is_econml_arithmetic():
    """Given econml's own forest (bags of 4 trees), the variance from the bags' moments equals econml's."""
    from econml.grf import CausalForest

    X, T, Y, tau = tabular_trial(n=800, seed=3)
    forest = CausalForest(n_estimators=40, subforest_size=4, inference=True, max_samples=0.4, honest=True,
                          random_state=0).fit(X, T - 0.5, Y - Y.mean())
    new = np.random.default_rng(4).standard_normal((50, X.shape[1]))
    expected = np.ravel(forest.predict_var(new))
    alpha, jac = forest.predict_alpha_and_jac(new)
    theta = np.einsum("ijk,ik->ij", np.linalg.pinv(jac), alpha)
    k = forest.n_outputs_
    moment_sum, moment_sq, tree_sq = np.zeros((50, k)), np.zeros((50, k, k)), np.zeros((50, k, k))
    for bag in forest.slices_:
        moments = np.array([forest.estimators_[t].predict_moment(new, theta) for t in bag])
        mean = moments.mean(axis=0)
        moment_sum += mean
        moment_sq += mean[:, :, None] * mean[:, None, :]
        tree_sq += np.einsum("tij,tik->ijk", moments, moments) / len(bag)
    counts = np.full(50, len(forest.slices_))
    np.testing.assert_allclose(little_bag_variance(moment_sum, moment_sq, tree_sq, counts, jac, 4), expected,
                               rtol=1e-8, atol=1e-12)
    # With the finite forest's Monte Carlo part: plus the spread of the bags' estimates over their number.
    bag_theta = np.array([np.einsum("ijk,ik->ij", np.linalg.pinv(jac), moment)[:, 0] for moment in (
        np.mean([forest.estimators_[t].predict_moment(new, theta) for t in bag], axis=0) for bag in forest.slices_)])
    np.testing.assert_allclose(little_bag_variance(moment_sum, moment_sq, tree_sq, counts, jac, 4, monte_carlo=True),
                               expected + np.var(bag_theta, axis=0) / len(forest.slices_), rtol=1e-8, atol=1e-12)


def test_out_of_bag_standard_error_holds_the_monte_carlo_and_calibration_parts(bagged):
    """cate_se_^2 = the little bags' variance with the Monte Carlo part + the unit's fold calibration curve's
    variance (each fold's curve fitted on the other folds' raw predictions and DR scores)."""
    from geocate.core.crossfit import Folds
    from geocate.core.learners import EffectCalibration

    model, X, T, Y, tau = bagged
    group_index = np.unique(model.groups_, return_inverse=True)[1]
    raw, var = model.model_.out_of_bag(model._data[2], group_index)      # the design the forest grew on
    np.testing.assert_array_equal(raw, model.cate_raw_)
    expected = np.maximum(var, 0)
    for k in Folds(model.fold_).ids:
        held = model.fold_ == k
        expected[held] += EffectCalibration.fit(raw[~held], model.dr_scores_[~held]).variance(raw[held])
    np.testing.assert_allclose(model.cate_se_ ** 2, expected, rtol=1e-12)
    assert np.all(expected > np.maximum(var, 0))        # every curve's variance is positive
    parts = model.variance_parts_                      # what bench_forest decomposes
    np.testing.assert_allclose(parts["calibration"], expected - np.maximum(var, 0), rtol=1e-12)
    np.testing.assert_allclose(parts["debiased"] + parts["monte_carlo"], var, rtol=1e-12)
    assert np.all(parts["debiased"] > 0)                   # objective-Bayes debiasing keeps it positive
    assert np.mean(parts["unbiased"] < 0) > 0.05 and np.all(np.isfinite(parts["unbiased"]))


def test_forest_passes_add_the_monte_carlo_part_and_new_points_the_curves_variance(bagged, monkeypatch):
    import geocate.core.learners as learners

    model, X, T, Y, tau = bagged
    forest = model.effect_model()
    asked = []
    plain = learners.little_bag_variance
    monkeypatch.setattr(learners, "little_bag_variance", lambda *args, **kwargs: asked.append(kwargs) or plain(
        *args, **kwargs))
    point, se = forest.effect_and_se(X[:200])
    assert asked == [{"monte_carlo": True, "parts": True}]
    raw, var = forest._passes(learners._checked(X[:200]), lambda b: np.arange(200))
    np.testing.assert_array_equal(point, forest.calibration(raw))
    np.testing.assert_allclose(se ** 2, np.maximum(var, 0) + forest.calibration.variance(raw), rtol=1e-12)
    assert np.all(forest.calibration.variance(raw) > 0)


def test_bags_grown_on_row_indices_are_econml_forests_grown_on_copied_rows():
    """fit_on_rows (no copy of a bag's rows) grows the trees econml's fit grows on X[rows], bit for bit."""
    from econml.grf import CausalForest

    from geocate.core.learners import fit_on_rows

    X, T, Y, tau = tabular_trial(n=900, seed=9)
    rows = np.sort(np.random.default_rng(1).choice(900, 450, replace=False))
    T_res, Y_res = T - 0.5, Y - Y.mean()
    settings = dict(n_estimators=2, min_samples_leaf=3, max_features=3, honest=True, inference=False,
                    max_samples=0.5, n_jobs=1, random_state=12345)
    copied = CausalForest(**settings).fit(X[rows], T_res[rows], Y_res[rows])
    indexed = fit_on_rows(CausalForest(**settings), X, T_res, Y_res, rows)
    assert indexed.n_outputs_ == copied.n_outputs_ and len(indexed.estimators_) == 2
    for ours, theirs in zip(indexed.estimators_, copied.estimators_):
        for a, b in zip(ours.predict_alpha_and_jac(X), theirs.predict_alpha_and_jac(X)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(indexed.predict(X), copied.predict(X))
    with pytest.raises(ValueError, match="without inference"):
        fit_on_rows(CausalForest(**dict(settings, inference=True, n_estimators=4)), X, T_res, Y_res, rows)


def test_no_tree_that_saw_a_units_group_predicts_for_it():
    X, T, Y, tau = tabular_trial(n=600, seed=5)
    group = np.repeat(np.arange(60), 10)                     # villages of 10 units
    T_res, Y_res = T - 0.5, Y - Y.mean()
    before = grow_bagged_forest(X, T_res, Y_res, group, n_estimators=40, max_features=3, seed=2)
    changed = Y_res.copy()
    village = group == 7
    changed[village] += 50.0 * np.random.default_rng(0).standard_normal(village.sum())   # its outcomes, wrecked
    after = grow_bagged_forest(X, T_res, changed, group, n_estimators=40, max_features=3, seed=2)
    first, second = before.out_of_bag(X, group)[0], after.out_of_bag(X, group)[0]
    np.testing.assert_array_equal(first[village], second[village])
    assert not np.allclose(first[~village], second[~village])   # other villages' bags did see village 7
    # every unit is out of some bag, and the bags hold half of the groups
    assert np.all(np.isfinite(first)) and np.all(before.drawn.sum(axis=1) <= 30)


def test_effect_at_new_points_uses_every_bag_and_the_calibration(bagged):
    model, X, T, Y, tau = bagged
    forest = model.effect_model()
    assert isinstance(forest, BaggedForest)
    point, se = forest.effect_and_se(X[:200])
    assert np.all(np.isfinite(point)) and np.all(se > 0)
    # In-sample predictions with every bag rank the units as the out-of-bag ones do.
    assert spearmanr(point, model.cate_[:200]).correlation > 0.8
    low, high = model.effect_interval(X[:200])
    np.testing.assert_allclose(high - low, 2 * 1.959964 * se, rtol=1e-5)


def test_too_few_groups_are_refused_with_the_fix():
    X, T, Y, tau = tabular_trial(n=200, seed=6)
    with pytest.raises(GeoCateError, match="at least 4 groups"):
        grow_bagged_forest(X, T - 0.5, Y, np.repeat(np.arange(3), [70, 70, 60]), n_estimators=10)
    with pytest.raises(GeoCateError, match="Unknown forest"):
        default_learner(X, None, forest="one")


def test_cancelling_stops_between_bags_and_progress_reaches_the_end():
    from geocate.core.errors import Cancelled

    X, T, Y, tau = tabular_trial(n=400, seed=7)
    bags, seen = [], []

    def progress(fraction, message):      # cancel pressed once the first round of bags is grown
        if message.startswith("Causal forest: bag"):
            bags.append(message)

    with pytest.raises(Cancelled):
        GroupBaggedCausalForest(n_estimators=40, seed=1).fit(Y, T, X, progress=progress,
                                                             is_cancelled=lambda: bool(bags))
    assert len(bags) == 1                   # stopped between bags, at the first check after the first round
    GroupBaggedCausalForest(n_estimators=40, seed=1).fit(Y, T, X, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("Causal forest: bag") for _, m in seen)


def test_ranking_forests_grow_on_whole_groups_of_the_earlier_folds_at_most_rank_units():
    """Issue 26: the test's ranking forests are capped at rank_units units, whole groups drawn from the units they
    may see (a subset of the earlier folds, so the ranking still never sees the fold it ranks)."""
    X, T, Y, tau = tabular_trial(n=1200, seed=8)
    group = np.repeat(np.arange(240), 5)                      # villages of 5 units
    model = GroupBaggedCausalForest(n_estimators=40, seed=3, rank_units=300).fit(Y, T, X, groups=group)
    grown_on = []
    fold_forest = model._fold_forest
    model._fold_forest = lambda train, **kw: grown_on.append(train.copy()) or fold_forest(train, **kw)
    test = model.heterogeneity_test(n_draws=50)
    assert len(grown_on) == 4
    for k, train in zip(np.unique(model.fold_)[1:], grown_on):
        earlier = model.fold_ < k
        assert not np.any(train & ~earlier)                    # only units of the earlier folds
        if earlier.sum() <= 300:
            assert np.array_equal(train, earlier)              # under the cap: every earlier unit
        else:
            assert 300 - 5 < train.sum() <= 300                # as many as the cap allows, in whole villages
        villages = np.unique(group[train])
        assert np.all(np.isin(group, villages) == train)       # every drawn village whole
    assert test.p_value < 0.01                                  # tau 1 or 3: a ranking on 300 units finds it
    model.rank_units = None                                    # no cap: every earlier unit
    assert np.array_equal(model._ranking_units(model.fold_ < 3), model.fold_ < 3)
    # Groups of unequal sizes: one village larger than the cap is skipped, not allowed to end the draw.
    model.groups_ = np.where(np.arange(1200) < 400, 0, group)  # village 0: 400 units
    model.rank_units = 300
    for seed in range(10):
        model.seed = seed
        subset = model._ranking_units(np.ones(1200, bool))
        assert 300 - 5 < subset.sum() <= 300 and not subset[:400].any()
    model.groups_ = np.repeat(np.arange(3), 400)               # every village larger than the cap: one, whole
    assert model._ranking_units(np.ones(1200, bool)).sum() == 400


def test_trees_grow_on_at_most_tree_units_and_smaller_studies_are_unchanged(monkeypatch):
    """Issue 26: each tree of the out-of-bag forest grows on bag_sample of its bag, at most tree_units units; where
    the cap does not bind the forest is the same bit for bit, and a capped forest still finds the effect."""
    X, T, Y, tau = tabular_trial(n=1200, seed=8)
    group = np.arange(1200)
    T_res, Y_res = T - 0.5, Y - Y.mean()
    settings = dict(n_estimators=40, max_features=3, seed=4)
    default = grow_bagged_forest(X, T_res, Y_res, group, **settings)
    loose = grow_bagged_forest(X, T_res, Y_res, group, tree_units=300, **settings)   # a bag's half: exactly 300
    capped = grow_bagged_forest(X, T_res, Y_res, group, tree_units=120, **settings)
    assert {n for bag in default.bags for n in bag.n_samples_subsample_} == {300}
    assert {n for bag in capped.bags for n in bag.n_samples_subsample_} == {120}
    np.testing.assert_array_equal(default.out_of_bag(X, group)[0], loose.out_of_bag(X, group)[0])
    point = capped.out_of_bag(X, group)[0]
    assert not np.allclose(point, default.out_of_bag(X, group)[0])
    assert spearmanr(point, tau).correlation > 0.6
    # None (the default) is core.learners.TREE_UNITS when the forest grows (bench_scaling.py --tree-units sets it).
    import geocate.core.learners as learners

    monkeypatch.setattr(learners, "TREE_UNITS", 150)
    assert {n for bag in grow_bagged_forest(X, T_res, Y_res, group, **settings).bags
            for n in bag.n_samples_subsample_} == {150}
    model = GroupBaggedCausalForest(n_estimators=20, seed=1).fit(Y, T, X)
    assert model.tree_units is None and {n for bag in model.model_.bags for n in bag.n_samples_subsample_} == {150}

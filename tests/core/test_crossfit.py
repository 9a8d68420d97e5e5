"""core.crossfit.Folds (issue 20, point 1): folds made from the groups, inner folds within a training set, and the
checks that every unit is held out once and no group is split."""

import numpy as np
import pytest

from geocate.core.crossfit import Folds, crossfit, location_folds, stratified_folds
from geocate.core.errors import GeoCateError


def test_folds_of_groups_keep_each_group_whole_and_hold_every_unit_out_once():
    groups = np.repeat(np.arange(40), 5)
    folds = Folds.of_groups(groups, 5, seed=3)
    np.testing.assert_array_equal(folds.fold, location_folds(groups, 5, 3))   # the one way folds are dealt
    assert len(folds) == 5
    held_out = np.zeros(len(groups), int)
    for _, train, test in folds.split():
        assert not (train & test).any()
        held_out += test
        assert not set(groups[train]) & set(groups[test])                    # no group on both sides
    assert (held_out == 1).all()
    strata = np.repeat(np.arange(4), 50)
    np.testing.assert_array_equal(Folds.of_groups(groups, 5, 3, strata).fold, stratified_folds(groups, strata, 5, 3))


def test_inner_folds_stay_within_the_training_units_and_keep_groups_whole():
    groups = np.repeat(np.arange(60), 3)
    outer = Folds.of_groups(groups, 5, seed=1)
    _, train, _ = next(outer.split())
    inner = outer.inner(train, groups, 2, seed=1)
    assert len(inner.fold) == train.sum() and len(inner) == 2
    inner_groups = groups[train]
    for _, a, b in inner.split():
        assert not set(inner_groups[a]) & set(inner_groups[b])


def test_folds_that_split_a_group_or_miss_a_unit_are_refused():
    groups = np.repeat(np.arange(10), 2)
    split = np.arange(20) % 2                      # each pair of units of one group in two folds
    with pytest.raises(GeoCateError, match="split between cross-fitting folds"):
        Folds(split).check(groups)
    with pytest.raises(GeoCateError, match="no cross-fitting fold"):
        Folds(np.array([0.0, 1.0, np.nan])).check()
    with pytest.raises(GeoCateError, match="different units"):
        Folds(np.zeros(4)).check(np.arange(5))
    np.testing.assert_array_equal(crossfit(lambda train, test: np.full(test.sum(), 1.0), Folds(split)), 1.0)

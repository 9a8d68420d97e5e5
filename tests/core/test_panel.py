"""Panels: DML with unit fixed effects on Clarke & Polselli's designs (known theta = 0.5), and bad panels."""

import numpy as np
import pytest

from geocate.core.errors import GeoCateError
from geocate.core.panel import make_panel, panel_effect
from geocate.core.simulate import simulate_panel


@pytest.fixture(scope="module")
def linear_estimates():
    out = {}
    for seed in range(3):
        unit, time, D, Y, X = simulate_panel(300, 6, 10, seed=seed)
        panel = make_panel(unit, time, D, Y, X)
        for approach in ("pooled", "mundlak", "within", "first_difference"):
            out.setdefault(approach, []).append(panel_effect(panel, approach, seed=seed))
    return out


@pytest.mark.slow
def test_fixed_effects_approaches_recover_theta_where_pooled_dml_is_biased(linear_estimates):
    for approach in ("mundlak", "within", "first_difference"):
        thetas = [e.theta for e in linear_estimates[approach]]
        assert abs(np.mean(thetas) - 0.5) < 0.05, approach
        assert sum(e.interval()[0] <= 0.5 <= e.interval()[1] for e in linear_estimates[approach]) >= 2
    pooled = np.mean([e.theta for e in linear_estimates["pooled"]])
    assert pooled - 0.5 > 0.08                       # alpha_i is correlated with D: ignoring it biases theta up


def test_each_period_gets_its_own_estimate_and_units_seen_once_are_counted():
    unit, time, D, Y, X = simulate_panel(200, 5, 5, seed=9)
    keep = ~((unit < 10) & (time > 1))               # ten units observed in the first year only
    panel = make_panel(unit[keep], time[keep], D[keep], Y[keep], X[keep])
    within = panel_effect(panel, "within")
    assert within.units_observed_once == 10 and within.n_units == 190
    assert [row[0] for row in within.by_period] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert panel_effect(panel, "mundlak").units_observed_once == 0


def test_bad_panels_are_refused_saying_what_to_fix():
    unit, time, D, Y, X = simulate_panel(50, 3, 3, seed=1)
    with pytest.raises(GeoCateError, match="Unit '0' has two rows for year = 1"):
        make_panel(np.r_[unit, 0], np.r_[time, 1], np.r_[D, 0], np.r_[Y, 0], np.r_[X, X[:1]], time_name="year")
    with pytest.raises(GeoCateError, match="not a number or a date"):
        make_panel(unit, np.array(["a"] * len(unit)), D, Y, X)
    # A treatment fixed per unit is absorbed by the unit effects (Mundlak gave theta -490, SE 2499 on it).
    constant_within = np.repeat(np.random.default_rng(0).standard_normal(50), 3)
    with pytest.raises(GeoCateError, match="never changes within a unit.*estimatecate"):
        make_panel(unit, time, constant_within, Y, X)
    with pytest.raises(GeoCateError, match="outcome 'outcome' has the same value in every row"):
        make_panel(unit, time, D, np.ones_like(Y), X)
    with pytest.raises(GeoCateError, match="is the treatment"):
        make_panel(unit, time, D, D.copy(), X)
    with pytest.raises(GeoCateError, match="observed in one period only"):
        make_panel(np.arange(len(unit)), time, D, Y, X)
    with pytest.raises(GeoCateError, match="Every one of the 150 rows has a null"):
        make_panel(unit, time, D, np.full_like(Y, np.nan), X)


def test_first_difference_boosting_is_additive_across_the_two_periods():
    # The model makes E[Delta Y | X_it, X_i,t-1] = f(X_it) - f(X_i,t-1): no interaction of the two periods.
    from geocate.core.panel import _learner

    rng = np.random.default_rng(3)
    inputs = rng.standard_normal((3000, 4))                 # columns 0-1: this period, 2-3: the previous one
    target = inputs[:, 0] * inputs[:, 2] + inputs[:, 0] * inputs[:, 1] + 0.1 * rng.standard_normal(3000)
    grid = np.array([[a, 0.5, b, 0.0] for a in (-1.0, 1.0) for b in (-1.0, 1.0)])

    def cross_contrast(model):
        f = model.fit(inputs, target).predict(grid)
        return f[3] - f[2] - f[1] + f[0]                     # zero exactly when additive in (col 0, col 2)

    assert abs(cross_contrast(_learner("boosting", 0, [[0, 1], [2, 3]]))) < 1e-9
    assert abs(cross_contrast(_learner("boosting", 0))) > 1.0     # unconstrained, it learns x0 x2 (true: 4)
    within = _learner("boosting", 0, [[0, 1], [2, 3]]).fit(inputs, target).predict(
        np.array([[a, b, 0.0, 0.0] for a in (-1.0, 1.0) for b in (-1.0, 1.0)]))
    assert within[3] - within[2] - within[1] + within[0] > 1.0   # interactions within a period stay (true: 4)


def test_year_effects_are_absorbed_by_default_and_ignoring_them_biases_theta():
    """Uneven year shocks that trend upward and move D and Y together (the user's panel, no year covariate):
    every approach recovers theta with the period effects absorbed; without them theta is far off."""
    unit, time, D, Y, X = simulate_panel(300, 6, 5, theta=0.5, design="smooth", seed=4, year_shocks=0.5)
    panel = make_panel(unit, time, D, Y, X)
    for approach in ("mundlak", "within", "first_difference"):
        estimate = panel_effect(panel, approach)
        assert estimate.time_effects and abs(estimate.theta - 0.5) < max(0.06, 3 * estimate.std_err), approach
        if approach != "first_difference":   # differencing removes most of a slow trend by itself
            assert panel_effect(panel, approach, time_effects=False).theta - 0.5 > 0.15, approach


def test_periods_without_treated_and_untreated_rows_are_not_estimated():
    from geocate.core.panel import PeriodEffects, _two_way_demean

    rng = np.random.default_rng(2)
    n_units, n_periods = 120, 4
    unit, time = np.repeat(np.arange(n_units), n_periods), np.tile(np.arange(1, n_periods + 1), n_units)
    D = ((unit % 2 == 0) & (time >= 3)).astype(float)          # nobody treated in periods 1 and 2
    Y = 0.5 * D + np.repeat(rng.standard_normal(n_units), n_periods) + 0.3 * time + rng.standard_normal(len(D))
    X = rng.standard_normal((len(D), 2))
    estimate = panel_effect(make_panel(unit, time, D, Y, X), "within")
    assert [row[0] for row in estimate.by_period] == [3.0, 4.0]
    assert estimate.not_estimable == [(1.0, "no unit is treated in this period"),
                                      (2.0, "no unit is treated in this period")]
    # Two-way demeaning of a balanced panel is exact: unit and period means of the result are 0.
    demeaned = _two_way_demean(Y, unit, time)
    assert np.abs(np.bincount(unit, demeaned)).max() < 1e-9 and np.abs(np.bincount(time, demeaned)).max() < 1e-9
    # The backfitting learner recovers additive period effects exactly for a linear model.
    from sklearn.linear_model import LinearRegression

    target = 2 * X[:, 0] + np.array([0.0, 1.0, -1.0, 3.0])[time - 1]
    fitted = PeriodEffects(LinearRegression, tolerance=1e-9, max_iterations=100).fit(X, target, time)
    assert np.abs(fitted.predict(X, time) - target).max() < 1e-6
    # A covariate that trends with the period (correlation about 0.9): the default stopping rule still recovers
    # its coefficient (four fixed rounds left it at 1.66 of 2).
    trending = (time + 0.5 * rng.standard_normal(len(time)))[:, None]
    target = 2 * trending[:, 0] + np.array([0.0, 1.0, -1.0, 3.0])[time - 1]
    fitted = PeriodEffects(LinearRegression).fit(trending, target, time)
    assert abs(fitted.model_.coef_[0] - 2) < 0.02

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

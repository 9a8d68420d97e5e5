"""Staggered adoption: Callaway & Sant'Anna ATT(g,t) on a simulated staggered design with known effects, and bad panels."""

import numpy as np
import pytest

from geocate.core.errors import Cancelled, GeoCateError
from geocate.core.eventstudy import event_study


def simulate_staggered(n_units=1500, n_periods=8, cohorts=(3, 5, 7), seed=0, covariate_trend=0.3, selection=1.0,
                       noise=0.3, never_treated=True, growth=0.25, gap=0.25):
    """A staggered adoption panel with known ATT(g,t), in long format sorted by unit then period 1..n_periods.

    Units adopt in one of ``cohorts`` (periods) or never (if ``never_treated``), by a multinomial logit in
    x1 + 0.5 x2 (two standard normal baseline covariates): earlier cohorts have larger x (slope ``selection``
    (k - j) / k for the j-th cohort). Untreated outcome

        Y_it(0) = alpha_i + lambda_t + covariate_trend * x1_i * (t - 1) + noise * eps_it,

    with unit effects alpha_i larger for earlier adopters (and in x1), year shocks lambda_t trending (0.2 t),
    uneven (N(0, 0.5^2)) and jumping (+0.8) in the adoption periods; the x1 trend makes parallel trends hold only
    given x (unconditionally when covariate_trend = 0). Effects are dynamic and larger for earlier cohorts:
    tau(g, e) = (1 + growth e) (1 + gap (k - 1 - j)), e = t - g >= 0, homogeneous within a cohort (so the sample
    and population ATT(g,t) agree). Returns (unit, time, D, Y, X, truth), truth = {"att_gt": {(g, t): ATT},
    "shares": {g: population P(G = g)}} (the shares by Monte Carlo over 400,000 draws).
    """
    rng = np.random.default_rng(seed)
    k = len(cohorts)
    slopes = selection * (k - np.arange(k)) / k

    def probabilities(index):
        logits = np.column_stack(([np.zeros(len(index))] if never_treated else []) + [s * index for s in slopes])
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        return prob / prob.sum(axis=1, keepdims=True)

    x1, x2 = rng.standard_normal(n_units), rng.standard_normal(n_units)
    choice = (rng.random(n_units)[:, None] > np.cumsum(probabilities(x1 + 0.5 * x2), axis=1)).sum(axis=1)
    j = choice - 1 if never_treated else choice                     # cohort position; -1: never treated
    G = np.where(j >= 0, np.asarray(cohorts, float)[np.maximum(j, 0)], np.inf)
    earliness = np.where(j >= 0, (k - j) / k, 0.0)
    alpha = earliness + 0.5 * x1 + rng.standard_normal(n_units)
    t = np.arange(1, n_periods + 1, dtype=float)
    shocks = 0.2 * t + rng.normal(0, 0.5, n_periods) + 0.8 * np.isin(t, cohorts)
    e = t[None, :] - G[:, None]
    D = (e >= 0).astype(float)
    scale = 1 + gap * (k - 1 - np.arange(k))
    tau = np.where(D > 0, (1 + growth * np.maximum(e, 0)) * scale[np.maximum(j, 0)][:, None], 0.0)
    Y = (alpha[:, None] + shocks[None, :] + covariate_trend * x1[:, None] * (t[None, :] - 1)
         + noise * rng.standard_normal((n_units, n_periods)) + tau)
    truth = {(float(g), float(s)): float((1 + growth * (s - g)) * scale[jj]) if s >= g else 0.0
             for jj, g in enumerate(cohorts) for s in t[1:]}
    population = probabilities(np.random.default_rng(12345).standard_normal((400000, 2)) @ [1.0, 0.5]).mean(axis=0)
    shares = dict(zip([float(g) for g in cohorts], population[-k:].tolist()))
    unit, time = np.repeat(np.arange(n_units), n_periods), np.tile(t, n_units)
    X = np.repeat(np.column_stack([x1, x2]), n_periods, axis=0)
    return unit, time, D.ravel(), Y.ravel(), X, {"att_gt": truth, "shares": shares}


def true_aggregates(truth):
    """The overall ("simple") ATT and the event-time ATTs {e: ATT} implied by ``truth`` (population cohort shares)."""
    att, shares = truth["att_gt"], truth["shares"]
    post = [(g, t) for (g, t) in att if t >= g]
    simple = sum(shares[g] * att[(g, t)] for g, t in post) / sum(shares[g] for g, t in post)
    by_e = {}
    for (g, t), value in att.items():
        by_e.setdefault(int(t - g), []).append((shares[g], value))
    return simple, {e: sum(s * v for s, v in rows) / sum(s for s, v in rows) for e, rows in by_e.items()}


def twfe(unit, time, D, Y):
    """The static two-way fixed-effects OLS coefficient of D (balanced panel: double demeaning)."""
    n_units, n_periods = len(np.unique(unit)), len(np.unique(time))
    d, y = D.reshape(n_units, n_periods), Y.reshape(n_units, n_periods)
    dd = d - d.mean(axis=1, keepdims=True) - d.mean(axis=0, keepdims=True) + d.mean()
    return float(np.sum(dd * y) / np.sum(dd * dd))


@pytest.fixture(scope="module")
def design():
    return simulate_staggered(1500, 8, (3, 5, 7), seed=11)


@pytest.fixture(scope="module")
def fits(design):
    unit, time, D, Y, X, truth = design
    return {"never": event_study(unit, time, D, Y, X, covariate_names=("x1", "x2")),
            "not_yet": event_study(unit, time, D, Y, X, control="not_yet"),
            "unconditional": event_study(unit, time, D, Y)}


def _check_recovers(result, truth):
    simple, by_e = true_aggregates(truth)
    errors = {"overall": (result.overall.att - simple, result.overall.std_err)}
    errors.update({e: (result.event(e).att - by_e[e], result.event(e).std_err) for e in range(4)})
    print({key: (round(err, 4), round(se, 4)) for key, (err, se) in errors.items()})
    for key, (err, se) in errors.items():
        assert abs(err) < 4 * se, key
        assert abs(err) < (0.05 if key == "overall" else 0.08), key
    for row in result.event_time:
        if row.key < 0:                                   # placebo effects: the simultaneous band covers 0
            assert row.band_low <= 0 <= row.band_high, row
    assert result.pre_trend.p_value > 0.05 and result.pre_trend.event_times == (-5, -4, -3, -2, -1)


def test_without_covariates_att_gt_is_the_exact_two_by_two_did_of_means():
    unit, time, D, Y, X, truth = simulate_staggered(400, 6, (3, 5), seed=2, covariate_trend=0.0)
    y = Y.reshape(400, 6)
    first = np.where(D.reshape(400, 6).any(axis=1), D.reshape(400, 6).argmax(axis=1) + 1, np.inf)
    for control in ("never", "not_yet"):
        result = event_study(unit, time, D, Y, control=control, n_boot=0)
        assert result.learner == "none (difference of means)" and len(result.group_time) == 10
        for cell in result.group_time:
            g, t, b = int(cell.g), int(cell.t), int(cell.base_period)
            assert b == (g - 1 if t >= g else t - 1)
            comparison = np.isinf(first) if control == "never" else (first > t) & (first != g)
            treated = first == g
            dy = y[:, t - 1] - y[:, b - 1]
            by_hand = dy[treated].mean() - dy[comparison].mean()
            se = np.sqrt(dy[treated].var() / treated.sum() + dy[comparison].var() / comparison.sum())
            assert abs(cell.att - by_hand) < 1e-10 and abs(cell.std_err - se) < 1e-10, (control, g, t)
            assert (cell.n_treated, cell.n_control) == (treated.sum(), comparison.sum())


def test_doubly_robust_att_recovers_the_truth_where_unconditional_did_fails(design, fits):
    truth = design[-1]
    _check_recovers(fits["never"], truth)
    assert fits["never"].learner == "spline ridge" and fits["never"].overlap["share_clipped"] < 0.01
    # x1 shifts trends and drives adoption: the difference of means fails its own pre-trend test, and is off.
    unconditional = fits["unconditional"]
    simple = true_aggregates(truth)[0]
    print("unconditional DiD", unconditional.overall.att, "truth", simple, "pre-trend p", unconditional.pre_trend.p_value)
    assert unconditional.pre_trend.p_value < 1e-3
    assert abs(unconditional.overall.att - simple) > 0.2


def test_not_yet_treated_comparison_group_also_recovers_the_truth(design, fits):
    result = fits["not_yet"]
    _check_recovers(result, design[-1])
    # more comparison units than never-treated alone, where later cohorts are not yet treated
    assert result.cell(3.0, 4.0).n_control > fits["never"].cell(3.0, 4.0).n_control
    assert result.cell(3.0, 8.0).n_control == fits["never"].cell(3.0, 8.0).n_control


def test_two_way_fixed_effects_is_biased_on_the_same_data(design, fits):
    unit, time, D, Y, X, truth = design
    simple = true_aggregates(truth)[0]
    beta = twfe(unit, time, D, Y)
    print(f"truth {simple:.3f}, TWFE {beta:.3f}, DR {fits['never'].overall.att:.3f}")
    assert abs(beta - simple) > 0.2
    assert abs(beta - simple) > 5 * abs(fits["never"].overall.att - simple)


def test_aggregations_are_cohort_size_weighted_means_with_wider_simultaneous_bands(fits):
    result = fits["never"]
    size = result.cohorts
    post = [c for c in result.group_time if c.post]
    assert result.overall.att == pytest.approx(sum(size[c.g] * c.att for c in post) / sum(size[c.g] for c in post))
    for row in result.event_time:
        cells = [c for c in result.group_time if c.event_time == row.key]
        assert row.att == pytest.approx(sum(size[c.g] * c.att for c in cells) / sum(size[c.g] for c in cells))
        assert row.n_units == sum(size[g] for g in {c.g for c in cells})
        assert row.band_low < row.ci_low and row.band_high > row.ci_high
    for row in result.cohort:
        assert row.att == pytest.approx(np.mean([c.att for c in post if c.g == row.key]))
    for row in result.calendar:
        cells = [c for c in post if c.t == row.key]
        assert row.att == pytest.approx(sum(size[c.g] * c.att for c in cells) / sum(size[c.g] for c in cells))
    assert 1.96 < result.critical_value < 4
    assert result.influence.shape == (result.n_units, len(result.group_time))
    se = np.sqrt(np.sum(result.influence ** 2, axis=0)) / result.n_units
    assert np.allclose(se, [c.std_err for c in result.group_time])


def test_switching_off_is_refused_naming_the_unit():
    unit, time, D, Y, X, _ = simulate_staggered(200, 6, (3, 5), seed=3)
    treated_unit = int(unit[np.flatnonzero(D)[0]])
    D = D.copy()
    D[(unit == treated_unit) & (time == 6)] = 0
    labels = np.array([f"village {u}" for u in unit], dtype=object)
    with pytest.raises(GeoCateError, match=f"village {treated_unit}' switches off .*absorbing"):
        event_study(labels, time, D, Y)
    with pytest.raises(GeoCateError, match="values other than 0 and 1"):
        event_study(unit, time, D * 2.5, Y)
    with pytest.raises(GeoCateError, match="two rows for"):
        event_study(np.r_[unit, 0], np.r_[time, 1], np.r_[D, 0], np.r_[Y, 0])


def test_comparison_groups_that_do_not_exist_are_refused_or_listed():
    unit, time, D, Y, X, _ = simulate_staggered(300, 6, (3, 5), seed=4, never_treated=False)
    with pytest.raises(GeoCateError, match="No unit is never treated.*control='not_yet'"):
        event_study(unit, time, D, Y, X)
    # not yet treated: no comparison unit is left once both cohorts are treated (and, before cohort 5 adopts,
    # from period 3 on, when cohort 3 is treated already); those cells are listed, not estimated
    result = event_study(unit, time, D, Y, control="not_yet", n_boot=0)
    assert [(g, t) for g, t, _ in result.not_estimable] == [(3.0, 5.0), (3.0, 6.0), (5.0, 3.0), (5.0, 4.0),
                                                            (5.0, 5.0), (5.0, 6.0)]
    assert all(reason.startswith("no not-yet-treated") for _, _, reason in result.not_estimable)
    with_covariates = event_study(unit, time, D, Y, X, control="not_yet", n_boot=0)
    assert [(c.g, c.t) for c in with_covariates.group_time] == [(c.g, c.t) for c in result.group_time]
    assert {(c.g, c.t) for c in result.group_time if c.post} == {(3.0, 3.0), (3.0, 4.0)}
    single = simulate_staggered(300, 6, (4,), seed=4, never_treated=False)
    with pytest.raises(GeoCateError, match="adopts in the same period .* no comparison group"):
        event_study(*single[:4], control="not_yet")


def test_units_treated_from_the_first_period_and_unbalanced_units_are_dropped_and_counted():
    unit, time, D, Y, X, _ = simulate_staggered(300, 6, (3, 5), seed=5, covariate_trend=0.0)
    reference = event_study(unit, time, D, Y, n_boot=0)
    # 12 more units treated from period 1 (no pre-treatment period), and 15 more missing period 4
    extra = np.repeat(np.arange(1000, 1012), 6)
    early = (extra, np.tile(np.arange(1.0, 7.0), 12), np.ones(72), np.random.default_rng(0).standard_normal(72))
    gappy_unit = np.repeat(np.arange(2000, 2015), 5)
    gappy = (gappy_unit, np.tile([1.0, 2.0, 3.0, 5.0, 6.0], 15), np.tile([0, 0, 1, 1, 1.0], 15),
             np.random.default_rng(1).standard_normal(75))
    result = event_study(*(np.r_[a, b, c] for a, b, c in zip((unit, time, D, Y), early, gappy)), n_boot=0)
    assert result.dropped["treated from the first period, no pre-treatment period (units)"] == 12
    assert result.dropped["observed in only some periods (units)"] == 15
    assert result.n_units == reference.n_units == 300
    assert [c.att for c in result.group_time] == [c.att for c in reference.group_time]
    with pytest.raises(GeoCateError, match="No unit is first treated after the first period"):
        event_study(*simulate_staggered(100, 5, (3,), seed=5)[:4], anticipation=2)


def test_anticipation_moves_the_base_period_and_a_tiny_cohort_is_estimated_and_flagged():
    unit, time, D, Y, X, _ = simulate_staggered(300, 6, (3, 5), seed=1)
    result = event_study(unit, time, D, Y, X, anticipation=1, n_boot=0)
    cells = {(c.g, c.t): c for c in result.group_time}
    assert cells[(5.0, 5.0)].base_period == 3.0 and cells[(5.0, 6.0)].base_period == 3.0   # g - 1 - anticipation
    assert cells[(5.0, 4.0)].base_period == 3.0 and not cells[(5.0, 4.0)].post           # varying before adoption
    assert result.pre_trend.event_times == (-3, -2)                                       # e = -1 may anticipate
    # three units adopting in period 4: too few for the penalty's inner cross-validation; estimated, and their
    # cells' clipped propensities reported
    d = D.reshape(300, 6).copy()
    d[np.flatnonzero(~d.any(axis=1))[:3], 3:] = 1
    result = event_study(unit, time, d.ravel(), Y, X, n_boot=0)
    assert result.cohorts[4.0] == 3 and np.isfinite(result.cell(4.0, 6.0).std_err)
    assert {(g, t) for g, t, _ in result.overlap["cells_over_5_percent_clipped"]} <= {(4.0, t) for t in range(2, 7)}


def test_progress_is_reported_and_a_cancel_stops_the_run():
    unit, time, D, Y, X, _ = simulate_staggered(200, 5, (3,), seed=6)
    seen = []
    event_study(unit, time, D, Y, X, progress=lambda f, m: seen.append(f), n_boot=0)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(Cancelled):
        event_study(unit, time, D, Y, X, is_cancelled=lambda: True)


@pytest.mark.slow
def test_overall_att_interval_covers_the_truth_by_repetition():
    covered = []
    for rep in range(20):
        unit, time, D, Y, X, truth = simulate_staggered(600, 8, (3, 5, 7), seed=100 + rep)
        result = event_study(unit, time, D, Y, X, n_boot=0, seed=rep)
        covered.append(result.overall.ci_low <= true_aggregates(truth)[0] <= result.overall.ci_high)
    print("coverage", np.mean(covered))
    assert np.mean(covered) >= 0.85

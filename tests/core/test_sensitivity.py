"""Sensitivity to an unobserved confounder (core.sensitivity): econml's arithmetic on GeoCATE's nuisance
predictions, bounds that cover at a withheld confounder's true strength, and benchmarks that rank what matters."""

import numpy as np
import pytest

from geocate.core.sensitivity import benchmark, bounds, contrast_elements, robustness_values, sensitivity_table


def nuisances(seed, n=600, k=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    logits = np.column_stack([np.zeros(n)] + [0.5 * x * (j + 1) for j in range(1, k)])
    e = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    index = np.array([rng.choice(k, p=p) for p in e])
    mu = np.column_stack([x + j for j in range(k)]) + 0.1 * rng.standard_normal((n, k))
    Y = mu[np.arange(n), index] + rng.standard_normal(n)
    return Y, index, mu, e


@pytest.mark.parametrize("arms", [2, 3])
def test_the_elements_equal_econmls_on_the_same_nuisance_predictions(arms):
    from econml.validate.sensitivity_analysis import RV, dr_sensitivity_values, sensitivity_interval

    Y, index, mu, e = nuisances(arms, k=arms)
    T = np.eye(arms)[index][:, 1:]
    npp = np.eye(arms)[index] / e
    y_pred = mu * (1 - npp) + npp * Y[:, None]   # econml's DR-corrected predictions of the same mu
    theirs = dr_sensitivity_values(Y, T, y_pred, e)
    for a in range(1, arms):
        ours = contrast_elements(Y, index, mu, e, a, 0)
        assert ours.theta == pytest.approx(theirs.theta[a - 1], abs=1e-9)
        assert ours.sigma2 == pytest.approx(theirs.sigma[a - 1], abs=1e-9)
        assert ours.nu2 == pytest.approx(theirs.nu[a - 1], abs=1e-9)
        np.testing.assert_allclose(ours.cov, theirs.cov[a - 1], atol=1e-12)
        for strengths in [(0.03, 0.03, 1.0), (0.2, 0.1, 0.5), (0.0, 0.0, 1.0)]:
            expected = sensitivity_interval(theirs.theta[a - 1], theirs.sigma[a - 1], theirs.nu[a - 1],
                                            theirs.cov[a - 1], 0.05, *strengths, interval_type="theta") + \
                sensitivity_interval(theirs.theta[a - 1], theirs.sigma[a - 1], theirs.nu[a - 1],
                                     theirs.cov[a - 1], 0.05, *strengths, interval_type="ci")
            np.testing.assert_allclose(bounds(ours, *strengths), expected, atol=1e-6)
        rv = robustness_values(ours)
        assert rv[0] == pytest.approx(RV(theirs.theta[a - 1], theirs.sigma[a - 1], theirs.nu[a - 1],
                                         theirs.cov[a - 1], 0.05, interval_type="theta"), abs=1e-6)
        assert 0 <= rv[1] <= rv[0] < 1


def test_no_confounding_gives_the_estimate_and_the_robustness_value_moves_it_to_zero():
    from econml.validate.sensitivity_analysis import sensitivity_interval

    Y, index, mu, e = nuisances(7)
    el = contrast_elements(Y, index, mu, e, 1, 0)
    low, high, ci_low, ci_high = bounds(el, 0.0, 0.0)
    assert low == pytest.approx(el.theta) and high == pytest.approx(el.theta) and ci_low < el.theta < ci_high
    rv, rv_a = robustness_values(el)
    at_rv = sensitivity_interval(el.theta, el.sigma2, el.nu2, el.cov, 0.05, rv, rv, 1.0, interval_type="theta")
    assert min(abs(at_rv[0]), abs(at_rv[1])) < 1e-4    # the bound at RV touches 0
    assert rv_a < rv


def test_clusters_widen_the_interval_bound_and_strengths_are_checked():
    from geocate.core.errors import GeoCateError

    Y, index, mu, e = nuisances(3)
    village = np.repeat(np.arange(60), 10)
    index = (np.arange(60) % 2)[village]   # treatment assigned by village, village effects in the outcome
    e = np.full_like(e, 0.5)
    Y = mu[np.arange(len(Y)), index] + np.random.default_rng(0).normal(0, 1.0, 60)[village]
    units, clustered = contrast_elements(Y, index, mu, e, 1, 0), contrast_elements(Y, index, mu, e, 1, 0, village)
    assert clustered.cov[0, 0] > 2 * units.cov[0, 0]
    assert bounds(clustered, 0.05, 0.05)[2] < bounds(units, 0.05, 0.05)[2]
    for wrong in [(1.0, 0.1, 1.0), (0.1, -0.1, 1.0), (0.1, 0.1, 1.5)]:
        with pytest.raises(GeoCateError, match="CF_Y|CF_D|RHO"):
            bounds(units, *wrong)


def confounded(seed, n=2000):
    """Treatment and outcome both driven by an observed X and an unobserved U (true ATE 1)."""
    rng = np.random.default_rng(seed)
    X, U = rng.standard_normal(n), rng.standard_normal(n)
    e = 1 / (1 + np.exp(-(0.5 * X + 0.5 * U)))
    W = (rng.random(n) < e).astype(int)
    Y = 1.0 * W + X + 0.6 * U + rng.standard_normal(n)
    return X, U, W, Y


def elements_of(Y, W, inputs, seed):
    from geocate.core.crossfit import location_folds
    from geocate.core.design import StudyDesign
    from geocate.core.scores import arm_models

    folds = location_folds(np.arange(len(Y)), 5, seed)
    e, _ = StudyDesign("observational").propensities(W, inputs, folds)
    e = np.clip(e, 0.01, 0.99)
    mu = arm_models(Y, W, 2, inputs, folds)
    return contrast_elements(Y, W, mu, e, 1, 0)


def test_the_bounds_at_a_withheld_confounders_strength_cover_the_truth():
    """30 seeded draws (the bench runs 100): the interval without U misses the true ATE (1) in most draws; the
    sensitivity interval at U's own strength (its gain statistics, from the fit that sees U) covers it in at least
    90 %, and the benchmark of the observed X is stronger than U in the outcome, as built."""
    naive, covered = 0, 0
    for seed in range(30):
        X, U, W, Y = confounded(seed)
        long = elements_of(Y, W, np.column_stack([X, U]), seed)
        short = elements_of(Y, W, X[:, None], seed)
        strength = benchmark("U", long, short)
        low, high, ci_low, ci_high = bounds(short, min(strength.cf_y, 0.999), min(strength.cf_d, 0.999), 1.0)
        se = np.sqrt(short.cov[0, 0])
        naive += abs(short.theta - 1) <= 1.96 * se
        covered += ci_low <= 1 <= ci_high
    assert naive <= 5 and covered >= 27


def test_a_benchmark_ranks_the_stronger_confounder_first_and_tables_list_each():
    rng = np.random.default_rng(5)
    n = 3000
    strong, weak = rng.standard_normal(n), rng.standard_normal(n)
    W = (rng.random(n) < 1 / (1 + np.exp(-(1.0 * strong + 0.2 * weak)))).astype(int)
    Y = W + 1.5 * strong + 0.2 * weak + rng.standard_normal(n)
    both = np.column_stack([strong, weak])
    long = elements_of(Y, W, both, 1)
    b_strong = benchmark("strong", long, elements_of(Y, W, weak[:, None], 1))
    b_weak = benchmark("weak", long, elements_of(Y, W, strong[:, None], 1))
    assert b_strong.cf_y > 5 * b_weak.cf_y and b_strong.cf_d > b_weak.cf_d
    assert b_strong.delta_theta > 0.3   # leaving the strong confounder out biases the estimate upwards
    rows = sensitivity_table(long, 0.03, 0.03, 1.0, benchmarks=[b_strong, b_weak])
    assert [r["confounder"] for r in rows] == ["chosen (CF_Y, CF_D, RHO)", "as strong as strong", "as strong as weak"]
    assert rows[1]["low"] < rows[2]["low"] < long.theta


def test_att_elements_are_the_att_estimate_and_reduce_to_the_ates_in_a_trial():
    """The ATT's elements (issue 23): theta and its SE are core.observational's doubly robust ATT of the same
    nuisance predictions; with the treated share as every unit's propensity (a trial) the ATT's Riesz
    representer is the ATE's, so sigma2 and nu2 equal the ATE's exactly."""
    from geocate.core.observational import adjusted_effects
    from geocate.core.scores import mean_and_se

    Y, index, mu, e = nuisances(11)
    att = contrast_elements(Y, index, mu, e, 1, 0, contrast="1 vs 0 (ATT)", estimand="ATT")
    share = index.mean()
    psi = (index * (Y - mu[:, 0]) - (1 - index) * e[:, 1] / e[:, 0] * (Y - mu[:, 0])) / share
    assert att.theta == pytest.approx(psi.mean(), abs=1e-12)
    influence = psi - index * psi.mean() / share
    assert np.sqrt(att.cov[0, 0]) == pytest.approx(mean_and_se(influence)[1], rel=0.01)
    trial_e = np.column_stack([np.full(len(Y), 1 - share), np.full(len(Y), share)])
    ate, att = (contrast_elements(Y, index, mu, trial_e, 1, 0, estimand=estimand) for estimand in ("ATE", "ATT"))
    assert att.nu2 == pytest.approx(ate.nu2, rel=1e-12) and att.sigma2 == pytest.approx(ate.sigma2, rel=1e-12)
    # The ATT's theta is the estimate estimateate reports for it (its own nuisance models on the same folds).
    from geocate.core.crossfit import location_folds

    x = np.random.default_rng(2).standard_normal((len(Y), 1))
    folds = location_folds(np.arange(len(Y)), 5, 0)
    reported = next(r for r in adjusted_effects(Y, index, e, x, folds) if r.estimator == "AIPW" and r.estimand == "ATT")
    from geocate.core.scores import arm_models

    own = contrast_elements(Y, index, arm_models(Y, index, 2, x, folds), np.clip(e, 0.01, 0.99), 1, 0, estimand="ATT")
    assert own.theta == pytest.approx(reported.estimate, abs=1e-9)


def test_att_bounds_at_a_withheld_confounders_strength_cover_the_true_att():
    """30 seeded draws with an effect that grows with X (treated units have larger X, so ATT > ATE): without U the
    ATT's interval misses the true ATT in most draws; the ATT's sensitivity interval at U's own strength (its gain
    statistics for the ATT) covers it in at least 90 %."""
    from geocate.core.crossfit import location_folds
    from geocate.core.design import StudyDesign
    from geocate.core.scores import arm_models

    def att_of(Y, W, inputs, seed):
        folds = location_folds(np.arange(len(Y)), 5, seed)
        e = np.clip(StudyDesign("observational").propensities(W, inputs, folds)[0], 0.01, 0.99)
        return contrast_elements(Y, W, arm_models(Y, W, 2, inputs, folds), e, 1, 0, estimand="ATT")

    naive, covered = 0, 0
    for seed in range(30):
        X, U, W, _ = confounded(seed)
        tau = 1 + 0.5 * X
        Y = tau * W + X + 0.6 * U + np.random.default_rng(100 + seed).standard_normal(len(X))
        truth = tau[W == 1].mean()
        long, short = att_of(Y, W, np.column_stack([X, U]), seed), att_of(Y, W, X[:, None], seed)
        strength = benchmark("U", long, short)
        _, _, ci_low, ci_high = bounds(short, min(strength.cf_y, 0.999), min(strength.cf_d, 0.999), 1.0)
        naive += abs(short.theta - truth) <= 1.96 * np.sqrt(short.cov[0, 0])
        covered += ci_low <= truth <= ci_high
    assert naive <= 6 and covered >= 27, (naive, covered)

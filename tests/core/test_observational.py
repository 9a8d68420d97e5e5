"""Observational designs: the propensity from the imagery, IPW / Hajek / AIPW / ATT, overlap and trimming,
balance, and covariates that look affected by treatment, on simulated data with known effects."""

import numpy as np
import pytest

from geocate.core.design import StudyDesign, crump_bounds, overlap_summary
from geocate.core.errors import GeoCateError
from geocate.core.observational import adjusted_effects, balance_table, suspicious_covariates


def causalimages_confounding(seed, n=1000):
    """causalimages' confounding simulation: a latent confounder sets the image's red channel (here: a noisy
    measurement of it), logit P(W) = C + X1 + X2, Y = 2 W + C + X1 + X2 + noise."""
    rng = np.random.default_rng(seed)
    C, X = rng.standard_normal(n), rng.standard_normal((n, 2))
    W = (rng.random(n) < 1 / (1 + np.exp(-(C + X[:, 0] + X[:, 1])))).astype(int)
    Y = 2 * W + C + X[:, 0] + X[:, 1] + rng.standard_normal(n)
    red = C + 0.3 * rng.standard_normal(n)
    return W, Y, np.column_stack([red, X])


def by_name(effects, estimator, estimand="ATE"):
    return next(e for e in effects if e.estimator.startswith(estimator) and e.estimand == estimand)


@pytest.mark.slow
def test_aipw_removes_the_confounding_the_image_shows_and_covers():
    errors, covered, naive, hajek = [], [], [], []
    for rep in range(12):
        W, Y, inputs = causalimages_confounding(rep)
        propensity, fit = StudyDesign("observational", seed=rep).propensities(W, inputs)
        effects = adjusted_effects(Y, W, propensity, inputs)
        aipw = by_name(effects, "AIPW")
        low, high = aipw.interval()
        errors.append(aipw.estimate - 2)
        covered.append(low <= 2 <= high)
        naive.append(by_name(effects, "naive").estimate - 2)
        hajek.append(by_name(effects, "Hajek").estimate - 2)
    assert np.mean(naive) > 1.5                          # about 1.9, as in causalimages
    assert abs(np.mean(errors)) < 0.15 and np.mean(covered) >= 0.75
    assert abs(np.mean(hajek)) < 0.4                     # biased by the image's noisy view of C (bench: 0.33)
    assert 0.7 < fit["calibration_slope"] < 1.4          # the cross-fitted propensity is calibrated


def test_ipw_and_hajek_are_unbiased_with_the_true_propensity():
    """With the design's own propensity IPW and Hajek are unbiased (the bias above is the fitted propensity's):
    over 40 draws of causalimages' design their mean error is within 3 Monte Carlo SEs of 0 and below 0.06, so an
    error in their arithmetic (a weight, a normalisation) would show."""
    ipw, hajek = [], []
    for rep in range(40):
        rng = np.random.default_rng(500 + rep)
        n = 1000
        C, X = rng.standard_normal(n), rng.standard_normal((n, 2))
        p = 1 / (1 + np.exp(-(C + X[:, 0] + X[:, 1])))
        W = (rng.random(n) < p).astype(int)
        Y = 2 * W + C + X[:, 0] + X[:, 1] + rng.standard_normal(n)
        effects = adjusted_effects(Y, W, np.column_stack([1 - p, p]), X)
        ipw.append(by_name(effects, "IPW").estimate - 2)
        hajek.append(by_name(effects, "Hajek").estimate - 2)
    for errors in (ipw, hajek):
        assert abs(np.mean(errors)) < max(3 * np.std(errors) / np.sqrt(40), 0.06), np.mean(errors)


def test_the_att_is_the_treated_units_effect_and_arms_are_compared():
    rng = np.random.default_rng(1)
    n = 3000
    x = rng.standard_normal(n)
    W = (rng.random(n) < 1 / (1 + np.exp(-x))).astype(int)
    tau = 1 + x                                          # treated units have larger x: ATT > ATE = 1
    Y = x + W * tau + rng.standard_normal(n)
    propensity, _ = StudyDesign("observational").propensities(W, x[:, None])
    effects = adjusted_effects(Y, W, propensity, x[:, None])
    assert by_name(effects, "AIPW", "ATE").estimate == pytest.approx(1.0, abs=0.15)
    assert by_name(effects, "AIPW", "ATT").estimate == pytest.approx(tau[W == 1].mean(), abs=0.15)
    # Three arms: 0 = no project, 1 = donor A (effect 1), 2 = donor B (effect 3).
    arms = rng.integers(0, 3, n)
    Y3 = x + np.array([0.0, 1.0, 3.0])[arms] + rng.standard_normal(n)
    p3, _ = StudyDesign("randomized").propensities(arms)
    effects = adjusted_effects(Y3, arms, p3, x[:, None])
    aipw = {e.contrast: e for e in effects if e.estimator == "AIPW" and e.estimand == "ATE"}
    assert set(aipw) == {"1 vs 0", "2 vs 0", "2 vs 1"}
    assert aipw["1 vs 0"].estimate == pytest.approx(1, abs=0.15) and aipw["2 vs 1"].estimate == pytest.approx(2, abs=0.15)


@pytest.mark.slow
def test_no_overlap_is_flagged_and_trimming_recovers_the_trimmed_populations_effect():
    cover_all, cover_trimmed, flagged = [], [], []
    for rep in range(10):
        rng = np.random.default_rng(100 + rep)
        n = 2000
        x = rng.uniform(-3, 3, n)
        e = 1 / (1 + np.exp(-3 * x))                      # near 0 and 1 at the ends: no overlap there
        W = (rng.random(n) < e).astype(int)
        tau = 1 + 0.5 * x
        Y = x + W * tau + rng.standard_normal(n)
        design = StudyDesign("observational", trim="crump", seed=rep)
        propensity, _ = design.propensities(W, x[:, None])
        flagged.append(overlap_summary(propensity[:, 1], W)["share_outside"])
        keep, bounds = design.keep(propensity[:, 1])
        assert 0.01 < bounds[0] < 0.2 and bounds[1] == pytest.approx(1 - bounds[0])
        full = by_name(adjusted_effects(Y, W, propensity, x[:, None]), "AIPW")
        trimmed = by_name(adjusted_effects(Y[keep], W[keep], propensity[keep], x[keep, None]), "AIPW")
        cover_all.append(full.interval()[0] <= tau.mean() <= full.interval()[1])
        cover_trimmed.append(trimmed.interval()[0] <= tau[keep].mean() <= trimmed.interval()[1])
    assert np.mean(flagged) > 0.3                         # a third of the units have propensity beyond [0.05, 0.95]
    assert np.mean(cover_trimmed) >= 0.8
    assert crump_bounds(np.full(100, 0.5)) == (0.0, 1.0)  # nothing to trim when overlap is good


def test_balance_improves_after_weighting_and_treatment_affected_covariates_are_named():
    W, Y, inputs = causalimages_confounding(3)
    propensity, _ = StudyDesign("observational").propensities(W, inputs)
    rows = balance_table(inputs, ["red", "x1", "x2"], W, propensity[:, 1])
    assert all(flag_before and abs(after) < 0.1 for _, _, after, flag_before, _ in rows)
    # A randomized study: silent when clean, names a covariate that is zero in every control unit.
    rng = np.random.default_rng(0)
    W = (rng.permutation(400) < 200).astype(int)
    Z = rng.standard_normal((400, 3))
    assert suspicious_covariates(Z, ["a", "b", "c"], W) == []
    Z[:, 2] = W * Z[:, 1]
    Z[:, 0] += 0.8 * W                                    # measured after treatment
    warnings = suspicious_covariates(Z, ["a", "b", "c_times_treated"], W)
    assert len(warnings) == 2 and "'c_times_treated' is 0 in every control unit" in warnings[1]
    assert "'a' differs between the arms far more than randomization allows" in warnings[0]


def test_a_randomized_design_knows_its_propensity_and_bad_designs_are_refused():
    W = np.array([0, 1] * 50)
    propensity, fit = StudyDesign("randomized").propensities(W, np.ones((100, 2)))
    assert np.all(propensity == 0.5) and "known" in fit["model"]
    with pytest.raises(GeoCateError, match="Unknown study design"):
        StudyDesign("quasi")
    with pytest.raises(GeoCateError, match="Trimming bounds"):
        StudyDesign("observational", trim=(0.9, 0.1))


def test_evaluate_scores_in_an_observational_design_use_the_propensity():
    from geocate.core.evaluate import evaluate_priorities

    W, Y, inputs = causalimages_confounding(5)
    priority = inputs[:, 1]
    randomized = evaluate_priorities(Y, W, priority, covariates=inputs, n_draws=50)
    observational = evaluate_priorities(Y, W, priority, covariates=inputs, n_draws=50,
                                        design=StudyDesign("observational", seed=5))
    # The BLP intercept is the ATE (true 2). Here the outcome models already adjust for the confounder's proxy, so
    # both are close; the observational scores carry each unit's propensity, so they differ, and stay on the truth.
    assert abs(observational.calibration[0].mean_forest - 2) < 0.25
    assert observational.calibration[0].mean_forest != randomized.calibration[0].mean_forest
    assert observational.calibration[0].mean_forest_se > randomized.calibration[0].mean_forest_se   # the weights


def test_the_share_of_weight_on_the_largest_one_percent_is_reported():
    """Equal propensities: the top 1 % carry 1 % of each arm's weight; one treated unit with e = 0.001 (clipped to
    0.01, as the estimate weighs it) among e = 0.5 carries a third of the treated arm's (100 against 99 x 2);
    trimmed, it carries none; arms of 50 units: one unit is 2 % of equal weights."""
    W = np.tile([0, 1], 100)
    summary = overlap_summary(np.full(200, 0.5), W)
    assert summary["top_1pct_weight_share"] == pytest.approx(0.01) == summary["top_1pct_equal_share"]
    e = np.full(200, 0.5)
    e[1] = 0.001
    assert overlap_summary(e, W)["top_1pct_weight_share"] == pytest.approx(100 / (100 + 99 * 2))
    kept = np.arange(200) != 1
    assert overlap_summary(e, W, kept=kept)["top_1pct_weight_share"] == pytest.approx(1 / 99)
    assert overlap_summary(np.full(100, 0.5), np.tile([0, 1], 50))["top_1pct_equal_share"] == pytest.approx(0.02)


def test_one_linear_score_gives_the_mean_the_ratio_and_their_clustered_errors():
    """core.scores.linear_score (issue 20): psi_a = -1 is a mean with mean_and_se's SE; a ratio (Hajek's weighted
    mean, the panel's partialling-out) its closed form, with the sandwich SE clustered as asked."""
    from geocate.core.scores import linear_score, mean_and_se

    rng = np.random.default_rng(4)
    n = 400
    y, w, rd = rng.normal(size=n), rng.uniform(0.5, 2, n), rng.normal(size=n)
    village = np.repeat(np.arange(40), 10)
    mean = linear_score(-1.0, y, village)
    assert (mean.estimate, mean.std_err) == pytest.approx(mean_and_se(y, village), rel=1e-12)
    ratio = linear_score(-w, w * y, village)
    theta = np.sum(w * y) / np.sum(w)
    assert ratio.estimate == pytest.approx(theta, rel=1e-12)
    sums = np.bincount(village, weights=w * (y - theta))
    assert ratio.std_err == pytest.approx(np.sqrt(40 / 39 * np.sum(sums ** 2)) / np.sum(w), rel=1e-10)
    ry = 0.5 * rd + rng.normal(size=n)
    slope = linear_score(-rd * rd, ry * rd)
    assert slope.estimate == pytest.approx(np.sum(ry * rd) / np.sum(rd * rd), rel=1e-12)


def test_the_propensity_and_outcome_models_stop_between_folds_when_cancelled():
    """Issue 20: estimateate's nuisance models (and comparesources' DR scores) are cancellable: each cross-fitted
    model polls between folds (core.crossfit), so a cancel stops it after the fold in progress."""
    from geocate.core.design import StudyDesign
    from geocate.core.errors import Cancelled
    from geocate.core.scores import arm_models, cross_fitted_scores

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3))
    W = rng.integers(0, 2, 200)
    Y = X[:, 0] + W + rng.normal(size=200)
    folds = np.arange(200) % 5
    for run in (lambda c: StudyDesign("observational").propensities(W, X, folds, is_cancelled=c),
                lambda c: arm_models(Y, W, 2, X, folds, is_cancelled=c),
                lambda c: cross_fitted_scores(Y, W, X, folds, is_cancelled=c)):
        polls = []
        with pytest.raises(Cancelled):
            run(lambda polls=polls: polls.append(1) or len(polls) >= 3)
        assert len(polls) == 3      # stopped before the third fold, not after the fifth


def linear_confounding(seed, n=1000):
    """A design whose outcome is linear in the inputs: logit P(W) = z1 - 0.5 z2, Y = 1 + 2 z1 + z2 + 0.5 z3 + 2 W +
    noise; the ATE is 2, and the true propensity is returned."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, 3))
    e = 1 / (1 + np.exp(-(Z[:, 0] - 0.5 * Z[:, 1])))
    W = (rng.random(n) < e).astype(int)
    Y = 1 + 2 * Z[:, 0] + Z[:, 1] + 0.5 * Z[:, 2] + 2 * W + rng.standard_normal(n)
    return W, Y, Z, np.column_stack([1 - e, e])


def test_calibrated_propensities_balance_the_inputs_of_every_arm_exactly():
    """Issue 23, point 1: each arm's weights, formed from the calibrated propensities, give the arm the kept units'
    mean of every input; rows sum to 1; units left out are untouched; three arms too."""
    from geocate.core.design import balancing_propensities

    W, _, Z, truth = linear_confounding(0)
    model = np.clip(truth ** 0.7 / (truth ** 0.7).sum(axis=1, keepdims=True), 0.05, 0.95)   # a wrong model
    kept = np.abs(Z[:, 0]) < 2.5
    calibrated, record = balancing_propensities(W, model, Z, kept)
    assert record["balance"] == "exact" and record["largest_standardized_difference"] < 1e-8 and record["inputs"] == 3
    np.testing.assert_allclose(calibrated.sum(axis=1), 1)
    np.testing.assert_array_equal(calibrated[~kept], model[~kept])
    for arm in (0, 1):
        units = kept & (W == arm)
        weights = 1 / calibrated[units, arm]
        np.testing.assert_allclose(np.average(Z[units], axis=0, weights=weights), Z[kept].mean(axis=0), atol=1e-8)
    before = np.abs(np.average(Z[kept & (W == 1)], axis=0, weights=1 / model[kept & (W == 1), 1]) - Z[kept].mean(0))
    assert before.max() > 0.1                               # the wrong model left them apart
    arms = np.random.default_rng(1).integers(0, 3, len(W))
    three, record = balancing_propensities(arms, np.full((len(W), 3), 1 / 3), Z)
    assert record["balance"] == "exact"
    np.testing.assert_allclose(three.sum(axis=1), 1)
    for arm in range(3):
        np.testing.assert_allclose(np.average(Z[arms == arm], axis=0, weights=1 / three[arms == arm, arm]),
                                   Z.mean(axis=0), atol=1e-8)


def test_calibration_that_cannot_balance_says_so_and_keeps_the_models_propensities():
    from geocate.core.design import balancing_propensities

    W, _, Z, truth = linear_confounding(2)
    separated = np.column_stack([Z, W + 0.01 * Z[:, 0]])   # an input that no weighting of one arm can match
    propensities, record = balancing_propensities(W, truth, separated)
    assert record["balance"] == "not reached" and "could not be calibrated" in record["warning"] and \
        "fewer covariates" in record["warning"]
    np.testing.assert_array_equal(propensities, np.clip(truth, 0.01, 0.99))
    # Inputs that are all constant leave nothing to balance: the model's propensities, said exact.
    same, record = balancing_propensities(W, truth, np.ones((len(W), 2)))
    assert record["balance"] == "exact" and np.array_equal(same, np.clip(truth, 0.01, 0.99))
    # A randomized design, or one that does not ask, leaves the propensities alone.
    for design in (StudyDesign("randomized", calibrate=True), StudyDesign("observational")):
        assert design.calibrated(W, truth, Z) == (truth, None)


def test_calibration_holds_weights_within_the_clip_and_says_when_balance_is_only_close():
    """An arm over-represented where it was likely (treated units far more common where z is high): exact balance
    would give some units less weight than a propensity of 0.99 allows. Those are held at the bound, every
    propensity stays within [0.01, 0.99], and the record gives the standardized difference the estimators' weights
    truly leave (under half the model's), with each arm's weights summing to the study's size. No weights within
    the bounds balance here (a linear program finds none for the control arm)."""
    from geocate.core.design import balancing_propensities

    rng = np.random.default_rng(0)
    Z = rng.standard_normal((300, 4))
    truth = 1 / (1 + np.exp(-(0.5 + 2.5 * Z[:, 0])))
    W = (rng.random(300) < truth).astype(int)
    share = np.tile([1 - W.mean(), W.mean()], (300, 1))
    calibrated, record = balancing_propensities(W, share, Z)
    assert record["balance"] == "close" and calibrated.min() >= 0.01 - 1e-12 and calibrated.max() <= 0.99 + 1e-12
    standardized = (Z - Z.mean(axis=0)) / Z.std(axis=0)
    left = max(np.abs(np.average(standardized[W == arm], axis=0, weights=1 / calibrated[W == arm, arm])).max()
               for arm in (0, 1))
    model = max(np.abs(standardized[W == arm].mean(axis=0)).max() for arm in (0, 1))
    assert record["largest_standardized_difference"] == pytest.approx(left, rel=1e-6) and left < model / 2
    for arm in (0, 1):   # each arm's weights still sum to the study's size: a constant outcome's IPW is exact
        assert np.sum(1 / calibrated[W == arm, arm]) == pytest.approx(300, rel=1e-6)
    ones = by_name(adjusted_effects(np.ones(300), W, calibrated, mu=np.zeros((300, 2))), "AIPW")
    assert ones.estimate == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_calibrated_aipw_is_unbiased_when_the_outcome_is_linear_in_the_inputs_whatever_the_propensity():
    """Known truth (ATE 2): with outcome models that know nothing (0) AIPW is IPW; with the treated share as every
    unit's propensity it keeps the confounding (bias above 0.5), calibrated to balance the inputs it is unbiased,
    as it is from the true propensity calibrated; its interval covers."""
    from geocate.core.design import balancing_propensities

    errors, uncalibrated, covered = {"share": [], "true": []}, [], []
    for rep in range(30):
        W, Y, Z, truth = linear_confounding(100 + rep)
        nothing = np.zeros((len(W), 2))
        share = np.tile([1 - W.mean(), W.mean()], (len(W), 1))
        uncalibrated.append(by_name(adjusted_effects(Y, W, share, mu=nothing), "AIPW").estimate - 2)
        for name, model in (("share", share), ("true", truth)):
            calibrated, record = balancing_propensities(W, model, Z)
            assert record["balance"] == "exact"
            aipw = by_name(adjusted_effects(Y, W, calibrated, mu=nothing), "AIPW")
            errors[name].append(aipw.estimate - 2)
            low, high = aipw.interval()
            covered.append(low <= 2 <= high)
    assert np.mean(uncalibrated) > 0.5
    for name in errors:   # the draws' sd is about 0.1: the mean of 30 is within 0.02 of the truth
        assert abs(np.mean(errors[name])) < 0.06, (name, np.mean(errors[name]))
    assert np.mean(covered) >= 0.9


def village_data(seed, villages=60, size=8):
    """Units in villages whose trait V (one value per village) drives the outcome, with a village shock u:
    Y = V + V^2 / 2 + u + noise. V identifies the village, so a model can learn each village's shock through it."""
    rng = np.random.default_rng(seed)
    village = np.repeat(np.arange(villages), size)
    V = rng.standard_normal(villages)[village]
    Y = V + V ** 2 / 2 + 1.5 * rng.standard_normal(villages)[village] + rng.standard_normal(len(village))
    return V[:, None], Y, village


def test_the_outcome_models_penalty_keeps_villages_whole_and_predicts_other_villages_better():
    """Leave-one-out keeps a unit's village in training and so rewards learning the village shocks through V: it
    chooses a smaller penalty than cross-validation by whole villages, and predicts villages it never saw worse
    (known truth: the mean V + V^2 / 2); with one unit per group the grouped model is the leave-one-out one."""
    from geocate.core.scores import outcome_model

    alphas, errors = [], []
    for seed in range(20):
        X, Y, village = village_data(seed)
        train = village < 40
        by_unit = outcome_model().fit(X[train], Y[train])
        by_village = outcome_model(village[train]).fit(X[train], Y[train])
        truth = X[~train, 0] + X[~train, 0] ** 2 / 2
        alphas.append([by_unit[-1].alpha_, by_village[-1].alpha_])
        errors.append([np.mean((model.predict(X[~train]) - truth) ** 2) for model in (by_unit, by_village)])
    alphas, errors = np.array(alphas), np.array(errors).mean(axis=0)
    # Measured over seeds 0-39: leave-one-out's penalty never larger, smaller in 85 %; held-out error 1.64 against
    # 0.91.
    assert np.all(alphas[:, 0] <= alphas[:, 1]) and np.mean(alphas[:, 0] < alphas[:, 1]) >= 0.6
    assert errors[0] > 1.3 * errors[1], errors
    X, Y, _ = village_data(0)
    assert outcome_model(np.arange(len(Y)))[-1].cv is None      # singletons: efficient leave-one-out, as before


def test_aipw_with_village_shocks_uses_whole_villages_for_every_penalty():
    """adjusted_effects passes its clusters to the outcome models: the same estimate as outcome models fitted by hand
    with the villages' penalty, another without."""
    from geocate.core.crossfit import Folds
    from geocate.core.scores import arm_models

    X, Y, village = village_data(3)
    W = (np.random.default_rng(3).random(60) < 0.5).astype(int)[village]
    Y = Y + W
    folds = Folds.of_groups(village, 5, 3).fold
    e = StudyDesign("observational", seed=3).propensities(W, X, folds)[0]
    aipw = by_name(adjusted_effects(Y, W, e, X, folds, village), "AIPW").estimate
    for groups, same in ((village, True), (None, False)):
        mu = arm_models(Y, W, 2, X, folds, groups=groups)
        assert (by_name(adjusted_effects(Y, W, e, mu=mu, clusters=village), "AIPW").estimate
                == pytest.approx(aipw, abs=1e-12)) is same


@pytest.mark.slow
def test_aipw_covers_when_whole_villages_are_treated_and_only_with_village_clusters():
    """Known truth (ATE 1; bench_observational.py clustered at 200 draws: coverage 0.925 clustered, 0.43 not):
    the programme reaches whole villages, confounded by a village trait; with calibrated propensities and standard
    errors clustered by village AIPW covers, with the villages ignored it does not. This checks the clustered
    standard errors; the penalty over whole villages is checked by the two tests above."""
    from geocate.core.crossfit import Folds
    from geocate.core.simulate import confounded_villages

    clustered, ignored, errors = [], [], []
    for rep in range(40):
        Y, W, inputs, village, ate = confounded_villages(1100 + rep)
        folds = Folds.of_groups(village, 5, rep).fold
        design = StudyDesign("observational", seed=rep, calibrate=True)
        e = design.calibrated(W, design.propensities(W, inputs, folds)[0], inputs)[0]
        for clusters, hits in ((village, clustered), (None, ignored)):
            aipw = by_name(adjusted_effects(Y, W, e, inputs, folds, clusters), "AIPW")
            low, high = aipw.interval()
            hits.append(low <= ate <= high)
            if clusters is not None:
                errors.append(aipw.estimate - ate)
    assert np.mean(clustered) >= 0.85 and np.mean(ignored) <= 0.65, (np.mean(clustered), np.mean(ignored))
    assert abs(np.mean(errors)) < 0.2      # the draws' sd is about 0.55: the mean of 40 within 0.17 of the truth


def test_clustered_errors_are_read_on_t_with_g_minus_one_degrees_of_freedom():
    """Every estimate's SE over 40 villages is the CR1 one scaled by t_39 / z (2.0227 / 1.96), so +/- 1.96 SE is the
    t interval (bench_observational.py clustered, 40 villages of 16 units treated within them: coverage 0.91 on
    the normal, docs/benchmarks.md); with every unit its own group nothing is scaled; the sensitivity analysis's
    interval at zero strength is the estimate's own."""
    from scipy.stats import t as student

    from geocate.core.crossfit import Folds
    from geocate.core.scores import arm_models, linear_score, mean_and_se
    from geocate.core.sensitivity import bounds, contrast_elements

    Y, W, inputs, village, _ = confounded_villages_for_test(7)
    folds = Folds.of_groups(village, 5, 7).fold
    e = StudyDesign("observational", seed=7).propensities(W, inputs, folds)[0]
    mu = arm_models(Y, W, 2, inputs, folds, groups=village)
    scale = student.ppf(0.975, 39) / 1.959964
    aipw = mu[:, 1] - mu[:, 0] + W * (Y - mu[:, 1]) / e[:, 1] - (1 - W) * (Y - mu[:, 0]) / e[:, 0]
    for clusters, factor in ((village, scale), (np.arange(len(Y)), 1.0), (None, 1.0)):
        effects = adjusted_effects(Y, W, e, mu=mu, clusters=clusters)
        cr1 = linear_score(-1.0, aipw, clusters)
        assert by_name(effects, "AIPW").estimate == pytest.approx(cr1.estimate, abs=1e-12)
        assert by_name(effects, "AIPW").std_err == pytest.approx(factor * cr1.std_err, rel=1e-9)
        naive = linear_score(-W, W * Y, clusters).influence - linear_score(-(1 - W), (1 - W) * Y, clusters).influence
        assert by_name(effects, "naive").std_err == pytest.approx(factor * mean_and_se(naive, clusters)[1], rel=1e-9)
    assert scale == pytest.approx(1.0320, abs=1e-4)
    clustered = by_name(adjusted_effects(Y, W, e, mu=mu, clusters=village), "AIPW")
    elements = contrast_elements(Y, W, mu, np.clip(e, 0.01, 0.99), 1, 0, village, small_sample=True)
    assert bounds(elements, 0.0, 0.0)[2:] == pytest.approx(clustered.interval(), abs=1e-9)
    normal = contrast_elements(Y, W, mu, np.clip(e, 0.01, 0.99), 1, 0, village)   # estimatecate's: on the normal
    assert np.sqrt(normal.cov[0, 0]) == pytest.approx(clustered.std_err / scale, rel=1e-9)


def confounded_villages_for_test(seed):
    from geocate.core.simulate import confounded_villages

    return confounded_villages(seed, villages=40, size=16, assignment="unit")

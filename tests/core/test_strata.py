"""Trials as they were randomized (issue 25, points 1-2): strata with their own assignment probabilities, and
probabilities given per unit. The design's propensity must enter the doubly robust scores; ignoring it biases
the ATE when outcomes differ between strata."""

import numpy as np
import pytest
from conftest import unit_table

from geocate.core.crossfit import stratified_folds
from geocate.core.errors import GeoCateError
from geocate.core.pipeline import estimate_cate, propensity_check


@pytest.fixture(scope="module")
def stratified(demo_raster):
    """600 units in two districts (west / east of the scene's middle), randomized with probability 0.25 in the
    west and 0.75 in the east; the east's outcomes are 2 higher; the effect depends on the image as in
    simulate_trial."""
    from geocate.core.simulate import simulate_trial

    trial = simulate_trial(demo_raster, n_units=600, seed=21)
    rng = np.random.default_rng(5)
    east = trial.coords[:, 0] > np.median(trial.coords[:, 0])
    probability = np.where(east, 0.75, 0.25)
    treated = (rng.random(len(east)) < probability).astype(float)
    baseline = trial.outcome - trial.treated * trial.true_cate    # the simulated untreated outcome
    outcome = baseline + 2.0 * east + treated * trial.true_cate
    district = np.where(east, "east", "west").astype(object)
    return trial, treated, outcome, district, probability


def run(trial, treated, outcome, demo_raster, **extra):
    units = unit_table(trial, treated=treated, outcome=outcome)
    for key, value in extra.items():
        units = type(units)(**{**units.__dict__, key: value})
    return estimate_cate(units, demo_raster, seed=3)[1]


def test_strata_give_each_unit_its_stratums_probability_and_the_ate_comes_back(stratified, demo_raster):
    trial, treated, outcome, district, probability = stratified
    truth = trial.true_cate.mean()
    naive = run(trial, treated, outcome, demo_raster)
    with_strata = run(trial, treated, outcome, demo_raster, strata=list(district))
    given = run(trial, treated, outcome, demo_raster, propensity=probability)
    # Ignoring the design: treated units sit mostly in the east, whose outcomes are 2 higher.
    assert naive.ate - truth > 4 * naive.ate_se
    for result in (with_strata, given):
        assert abs(result.ate - truth) < 3 * result.ate_se and result.ate_se < 0.3
    assert with_strata.metadata["strata"] == 2 and "stratum" in with_strata.metadata["propensity"]
    assert with_strata.metadata["study_design"] == "randomized"


def test_a_stratum_without_controls_is_refused_by_name(stratified, demo_raster):
    trial, treated, outcome, district, _ = stratified
    all_treated_west = np.where(district == "west", 1.0, treated)
    with pytest.raises(GeoCateError, match="stratum 'west' has no control unit"):
        run(trial, all_treated_west, outcome, demo_raster, strata=list(district))
    with pytest.raises(GeoCateError, match=r"outside \(0, 1\)"):
        run(trial, treated, outcome, demo_raster, propensity=np.where(district == "west", 0.0, 0.75))


def test_folds_spread_every_stratum_over_every_fold():
    strata = np.repeat([0, 1, 2], [50, 30, 20])
    folds = stratified_folds(np.arange(100), strata, 5, seed=1)
    for s in range(3):
        counts = np.bincount(folds[strata == s], minlength=5)
        assert counts.max() - counts.min() <= 1


def test_given_probabilities_that_disagree_with_the_data_are_flagged():
    rng = np.random.default_rng(0)
    e = rng.uniform(0.2, 0.8, 2000)
    assert propensity_check(e, rng.random(2000) < e) is None
    assert "disagree with who was treated" in propensity_check(e, rng.random(2000) < 0.5 + 0 * e)


def test_the_randomization_check_warns_when_treatment_follows_the_location(stratified, demo_raster):
    """Randomized within districts but declared simple: treatment follows the location and the check says so;
    with STRATA (permutations within districts), and on a simple trial, it does not."""
    trial, treated, outcome, district, _ = stratified
    naive = run(trial, treated, outcome, demo_raster)
    assert naive.metadata["randomization_check"]["warns"]
    assert any("Treatment is predictable" in w and "STRATA" in w for w in naive.metadata["warnings"])
    assert not run(trial, treated, outcome, demo_raster, strata=list(district)).metadata["randomization_check"]["warns"]
    simple = run(trial, trial.treated, trial.outcome, demo_raster)
    assert not simple.metadata["randomization_check"]["warns"] and simple.metadata["randomization_check"]["auc"] < 0.6


def test_the_randomization_check_of_a_large_study_uses_a_subset_of_whole_clusters():
    from geocate.core.design import randomization_check

    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(800), 10)                       # 8000 units in 800 villages
    W = np.repeat(rng.random(800) < 0.5, 10).astype(int)           # randomized by village
    X = rng.standard_normal((8000, 4))
    folds = np.repeat(np.arange(800) % 5, 10)
    check = randomization_check(W, X, folds, groups=clusters, max_units=2000)
    assert not check["warns"] and 0.4 < check["auc"] < 0.6 and check["permutations"] >= 19
    X[:, 0] += 0.8 * W                                             # a covariate that follows treatment
    assert randomization_check(W, X, folds, groups=clusters, max_units=2000)["warns"]


def test_checks_catch_swapped_fixed_probabilities_and_assignment_within_clusters():
    from geocate.core.design import randomization_check

    rng = np.random.default_rng(3)
    east = rng.random(3000) < 0.5
    treated = rng.random(3000) < np.where(east, 0.75, 0.25)
    swapped = np.where(east, 0.25, 0.75)                          # the two design probabilities swapped
    assert "disagree with who was treated" in propensity_check(swapped, treated)
    assert propensity_check(np.where(east, 0.75, 0.25), treated) is None
    # Units of 100 villages assigned one by one with a probability that follows the location: the check permutes
    # units (treatment varies within villages), not villages, and finds it.
    x = rng.uniform(-1, 1, 1000)
    village = np.repeat(np.arange(100), 10)
    W = (rng.random(1000) < 1 / (1 + np.exp(-1.5 * x))).astype(int)
    check = randomization_check(W, np.column_stack([x, x ** 2]), village % 5, groups=village)
    assert check["warns"] and check["p_value"] < 0.01


def test_every_algorithm_that_estimates_from_the_trial_follows_its_strata(stratified, demo_raster, tmp_path):
    """Point 5: comparesources, imageclusters and evaluate (the ATE of their DR scores) and mapeffects (its forest's
    mean effect over the units) come back to the truth with STRATA; the first three miss it without."""
    from geocate.core.evaluate import evaluate_priorities
    from geocate.core.maps import map_effects
    from geocate.core.pipeline import compare_sources, find_clusters

    trial, treated, outcome, district, _ = stratified
    truth = trial.true_cate.mean()
    plain = unit_table(trial, treated=treated, outcome=outcome)
    blocked = type(plain)(**{**plain.__dict__, "strata": list(district)})
    for units, follows in ((plain, False), (blocked, True)):
        _, comparison = compare_sources(units, demo_raster, seed=3, n_draws=30)
        ate = comparison["ate"]
        assert bool(abs(ate.estimate - truth) < 3 * ate.std_err) == follows, ("compare_sources", follows, ate)
        assert comparison["strata"] == (2 if follows else None)
        _, clusters, extras = find_clusters(units, demo_raster, seed=3, n_clusters=2, epochs=30)
        assert bool(abs(clusters.ate - truth) < 3 * clusters.ate_se) == follows, ("find_clusters", follows, clusters.ate)
        if follows:
            assert clusters.metadata["covariates"][-2:] == ["stratum east", "stratum west"]
            assert len(extras["covariate_means"]) == len(clusters.metadata["covariates"])
        evaluation = evaluate_priorities(outcome, treated, trial.covariates[:, :1], covariates=trial.covariates,
                                         strata=list(district) if follows else None, seed=3, n_draws=30)
        mean, se = evaluation.scores.mean(), evaluation.scores.std() / np.sqrt(len(evaluation.scores))
        assert bool(abs(mean - truth) < 3 * se) == follows, ("evaluate_priorities", follows, mean)
    study, summary, unit_cate, _ = map_effects(blocked, demo_raster, str(tmp_path / "map.tif"), seed=3, stride=99)
    assert abs(np.mean(unit_cate) - truth) < 0.3

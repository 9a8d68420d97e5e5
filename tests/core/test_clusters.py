"""The image cluster model: recovery of image-defined clusters and their effects, K = 1 without heterogeneity,
ONNX export that agrees with torch, salience, and the refusals."""

import numpy as np
import pytest
from conftest import unit_table
from sklearn.metrics import adjusted_rand_score

from geocate.core.errors import GeoCateError
from geocate.core.pipeline import find_clusters
from geocate.core.simulate import simulate_trial


@pytest.fixture(scope="module")
def separated(demo_raster):
    """Two image-defined clusters with effects -1 and 3 (noise sd 1), 1000 units, K chosen from 1..3."""
    trial = simulate_trial(demo_raster, n_units=1000, seed=5, effects=(-1.0, 3.0))
    return trial, find_clusters(unit_table(trial), demo_raster, max_clusters=3, n_folds=3, seed=1)


def test_well_separated_clusters_are_recovered_with_their_effects(separated):
    trial, (study, result, extras) = separated
    assert result.metadata["n_clusters"] >= 2
    assert adjusted_rand_score(trial.true_group, result.group) >= 0.8
    # The populated clusters carry the true effects inside their 95 % intervals.
    populated = [row for row in extras["clusters"] if row[4] > 0.1]
    assert len(populated) == 2
    for truth, (_, _, low, high, share, *_) in zip((-1.0, 3.0), populated):
        assert low <= truth <= high and abs(share - 0.5) < 0.1
    probabilities = result.probabilities
    assert probabilities.shape == (1000, result.metadata["n_clusters"])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_real_clusters_pass_the_held_out_test_and_report_their_held_out_effects(separated):
    """Issue 24: K > 1 is kept because the clusters' effects differ in units the model did not see, and each
    cluster's table row carries the doubly robust effect of the units assigned to it out of fold."""
    trial, (study, result, extras) = separated
    test = result.metadata["effect_test"]
    assert test["p_value"] < 0.01 and "confirms" in result.metadata["k_rule"]
    populated = [row for row in extras["clusters"] if row[4] > 0.1]
    for truth, row in zip((-1.0, 3.0), populated):
        dr_effect, dr_se, n_assigned = row[7:10]
        assert abs(dr_effect - truth) < 3 * dr_se + 0.3 and 300 < n_assigned < 700


def zero_inflated_null(demo_raster, seed, n_units=600):
    """A null trial (the effect the same for every unit) whose outcome is zero for 70 % of controls and 30 % of
    treated units, independently of the imagery (issue 24's first case): hours worked."""
    import dataclasses

    trial = simulate_trial(demo_raster, n_units=n_units, seed=seed, effects=(1.0,))
    rng = np.random.default_rng(seed)
    W = trial.treated
    working = rng.random(n_units) < np.where(W == 1, 0.7, 0.3)
    hours = np.where(working, np.exp(1.0 + 0.3 * rng.standard_normal(n_units)), 0.0)
    return dataclasses.replace(unit_table(trial), outcome=hours)


@pytest.mark.slow
def test_a_zero_inflated_null_trial_gets_one_cluster_and_says_why(demo_raster):
    """The likelihood alone chose K > 1 on such outcomes (the point mass of zeros as a 'cluster'); the held-out
    test keeps K = 1 and the log says which rule chose K. Three seeds here; bench_clusters.py runs 20 per shape."""
    chosen = []
    for seed in range(3):
        result = find_clusters(zero_inflated_null(demo_raster, 60 + seed), demo_raster, max_clusters=3, n_folds=3,
                               seed=seed)[1]
        chosen.append(result.metadata["n_clusters"])
        assert result.metadata["k_rule"].startswith("K = ")
    assert chosen == [1, 1, 1], chosen
    # Clusters forced by the user are run, but flagged when the held-out test does not support them.
    study, result, extras = find_clusters(zero_inflated_null(demo_raster, 70), demo_raster, n_clusters=3,
                                          max_clusters=3, n_folds=3, seed=0)
    if result.metadata["effect_test"]["p_value"] >= 0.05:
        assert any("held-out test finds no difference" in w for w in result.metadata["warnings"])


def test_every_model_of_a_run_has_the_studys_point_masses(demo_raster, monkeypatch):
    """find_clusters decides the hurdle's point masses once on the study: every training of the run (each K, fold
    and sequential step, however few its units) gets the same values, and the run record says so. The threshold is
    lowered so that this study (about 90 controls off zero) reaches it while the test's first sequential step (one
    fold, about 30) would not, had each training decided for itself."""
    import geocate.core.clusters as clusters

    monkeypatch.setattr(clusters, "CONTINUOUS_MIN_UNITS", 60)
    given = []
    original = clusters._train_clusters
    monkeypatch.setattr(clusters, "_train_clusters", lambda *args: given.append(args[14]) or original(*args))
    result = find_clusters(zero_inflated_null(demo_raster, 61), demo_raster, n_clusters=2, max_clusters=2, n_folds=3,
                           epochs=20, seed=0, forest_check=False)[1]
    assert result.metadata["effect_test"] is not None      # the sequential walk ran
    assert len(given) >= 2 * (1 + 3 + 2) and all(values is not None and list(values) == [0.0] for values in given), given
    assert "hurdle part" in result.metadata["noise"] and "0 (controls" in result.metadata["noise"]


def test_clusters_are_checked_against_the_forest_and_the_noise_is_estimated(separated):
    """Issue 24, points 1 and 3: the forest's own test (same units and folds) supports the real clusters; the shared
    noise's sd in each cluster and arm is the simulation's (1), where the outcome's sd is about 2."""
    trial, (study, result, extras) = separated
    forest = result.metadata["forest_test"]
    assert forest["supports_clusters"] and forest["p_value"] < 0.01
    assert not any("causal forest's heterogeneity test" in w for w in result.metadata["warnings"])
    assert result.metadata["noise"].startswith("per arm, a mixture of 3")
    assert result.metadata["ran_on"]["cluster model"] == result.metadata["device"]   # issue 26: where parts ran
    # The forest supports the clusters, so its out-of-fold effects inform each unit's group (issue 24); the group
    # stays a cluster of the model, and most units keep the model's choice on this well-separated design.
    assert "forest_informed_assignment" in result.metadata["assignment"]
    used = result.group > 0
    assert set(np.unique(result.group[used])) <= set(range(1, result.metadata["n_clusters"] + 1))
    assert np.mean(result.group[used] == result.probabilities[used].argmax(axis=1) + 1) > 0.8
    for row in extras["clusters"]:
        assert 0.75 < row[5] < 1.3 and 0.75 < row[6] < 1.3, row


def forest_views(seed, n=3000, forest_sd=0.4, prior_right=None, effects=(0.0, 1.5, 3.0)):
    """Clusters with ``effects`` and the two views forest_informed_assignment combines: the forest's effect (the
    cluster's effect plus noise of sd ``forest_sd``, which it reports as its SE) and the model's probabilities
    (``prior_right`` on the true cluster and the rest spread over the others)."""
    rng = np.random.default_rng(seed)
    k = len(effects)
    truth = rng.integers(0, k, n)
    cate = np.asarray(effects)[truth] + forest_sd * rng.standard_normal(n)
    said = np.where(rng.random(n) < prior_right, truth, (truth + rng.integers(1, k, n)) % k)
    prior = np.full((n, k), (1 - prior_right) / (k - 1))
    prior[np.arange(n), said] = prior_right
    return truth, cate, np.full(n, forest_sd), prior, np.arange(n) % 5


def nearest(cate, centres=(0.0, 1.5, 3.0)):
    return np.abs(np.asarray(cate)[:, None] - np.asarray(centres)).argmin(axis=1)


def test_the_forest_informs_each_units_cluster_with_centres_fitted_per_held_out_fold():
    """Issue 24: each unit's group combines the model's out-of-fold probabilities with the forest's out-of-fold
    effect. With a prior that says little (right for 40 % of units, 30 % each other cluster) and a start 0.4 off,
    the forest's effect decides: the centres are the true effects, the forest's SE is all its error (omega 0) and
    each unit goes to the nearest centre."""
    from geocate.core.clusters import forest_informed_assignment

    truth, cate, se, prior, folds = forest_views(1, prior_right=0.4)
    started = np.tile([0.4, 1.2, 2.6], (len(truth), 1))     # the fold models' effects, off by up to 0.4
    posterior, group, centres, omega = forest_informed_assignment(prior, cate, se, folds, started)
    np.testing.assert_allclose(centres, np.tile([0.0, 1.5, 3.0], (5, 1)), atol=0.12)
    assert (omega < 0.15).all(), omega
    assert np.mean(group - 1 == truth) > 0.9 and np.mean(group - 1 == nearest(cate)) > 0.95
    np.testing.assert_allclose(posterior.sum(axis=1), 1)


def test_the_two_views_together_assign_better_than_either():
    """A prior right for 60 % of units and a forest with noise of sd 0.8 (clusters 1.5 apart): the posterior beats
    both the prior's argmax and the forest's nearest centre (0.806 against 0.603 and 0.768 on the first version;
    the paired difference's SE is about 0.006), and is as good as the assignment that knows the true centres. With
    the forest's SE understated by half, omega takes up the rest and the assignment stays as good."""
    from scipy.stats import norm

    from geocate.core.clusters import forest_informed_assignment

    truth, cate, se, prior, folds = forest_views(2, forest_sd=0.8, prior_right=0.6)
    started = np.tile([0.0, 1.5, 3.0], (len(truth), 1))
    bayes = np.mean((np.log(prior) + norm.logpdf(cate[:, None], [0.0, 1.5, 3.0], se[:, None])).argmax(axis=1)
                    == truth)
    alone = (np.mean(prior.argmax(axis=1) == truth), np.mean(nearest(cate) == truth))
    for reported in (se, se / 2):
        _, group, _, omega = forest_informed_assignment(prior, cate, reported, folds, started)
        combined = np.mean(group - 1 == truth)
        assert combined > max(alone) + 0.025 and combined > bayes - 0.01, (combined, alone, bayes)
    assert (np.abs(omega - np.sqrt(0.8 ** 2 - 0.4 ** 2)) < 0.15).all(), omega   # the half the SE left out


def test_a_forest_that_sees_no_difference_leaves_the_models_clusters():
    """Two clusters the forest cannot tell apart (its effects pure noise, honestly reported): each fold keeps the
    model's clusters, with their numbering, instead of swapping them on noise."""
    from geocate.core.clusters import forest_informed_assignment

    truth, _, se, prior, folds = forest_views(5, forest_sd=0.3, prior_right=0.7, effects=(0.0, 1.0))
    cate = 0.5 + 0.3 * np.random.default_rng(6).standard_normal(len(truth))
    group = forest_informed_assignment(prior, cate, se, folds, np.tile([0.0, 1.0], (len(truth), 1)))[1]
    for fold in range(5):
        inside = folds == fold
        assert np.mean(group[inside] == prior[inside].argmax(axis=1) + 1) > 0.85, fold


def test_units_without_a_usable_forest_se_neither_decide_nor_are_decided():
    """A unit whose SE is zero or missing: a zero SE is raised to half the fold's median, so the unit cannot
    pull its fold's centres to itself; a missing one leaves the unit with the model's probabilities."""
    from geocate.core.clusters import forest_informed_assignment

    truth, cate, se, prior, folds = forest_views(7, prior_right=0.5)
    started = np.tile([0.0, 1.5, 3.0], (len(truth), 1))
    _, _, centres, _ = forest_informed_assignment(prior, cate, se, folds, started)
    odd_cate, odd_se = cate.copy(), se.copy()
    odd_cate[0], odd_se[0] = 0.75, 0.0       # fold 0: exact, between two clusters
    odd_se[1] = np.nan                       # fold 1: no SE
    posterior, _, odd_centres, _ = forest_informed_assignment(prior, odd_cate, odd_se, folds, started)
    np.testing.assert_allclose(odd_centres, centres, atol=0.03)
    np.testing.assert_allclose(posterior[1], prior[1])


def test_a_units_cluster_depends_on_no_other_fold_of_the_forest():
    """The centres of a held-out fold are fitted on that fold's units alone: changing another fold's forest effects
    and SEs (whose models saw this fold's outcomes) leaves this fold's groups and centres as they were."""
    from geocate.core.clusters import forest_informed_assignment

    truth, cate, se, prior, folds = forest_views(3, prior_right=0.5)
    _, group, centres, omega = forest_informed_assignment(prior, cate, se, folds)
    changed, changed_se = cate.copy(), se.copy()
    changed[folds == 2] += 5.0
    changed_se[folds == 2] *= 10.0
    _, group_after, centres_after, omega_after = forest_informed_assignment(prior, changed, changed_se, folds)
    others = folds != 2
    assert (group_after[others] == group[others]).all()
    np.testing.assert_array_equal(np.delete(centres_after, 2, axis=0), np.delete(centres, 2, axis=0))
    np.testing.assert_array_equal(np.delete(omega_after, 2), np.delete(omega, 2))
    assert not np.allclose(centres_after[2], centres[2])


def zero_inflated_features_trial(seed, n=600):
    """Units with uninformative 'image' features and a null zero-inflated outcome (issue 24's first case)."""
    rng = np.random.default_rng(seed)
    W = rng.integers(0, 2, n)
    working = rng.random(n) < np.where(W == 1, 0.7, 0.3)
    outcome = np.where(working, np.exp(1.0 + 0.3 * rng.standard_normal(n)), 0.0)
    return rng.normal(size=(n, 8)), W, outcome


def test_a_clusters_typical_units_are_its_own_members():
    """The report's typical window and the salience rasters of cluster k show units whose group is k, the most
    probable of k first: a unit the forest-informed assignment moved to another group is not shown as k's, and a
    cluster that holds no unit shows none."""
    from geocate.core.clusters import typical_units

    probabilities = np.array([[0.9, 0.1, 0.0],    # the most probable for cluster 1, but its group is 2
                              [0.7, 0.3, 0.0],
                              [0.6, 0.4, 0.0],
                              [0.2, 0.8, 0.0],
                              [np.nan, np.nan, np.nan],
                              [0.05, 0.05, 0.9]])
    group = np.array([2, 1, 1, 2, np.nan, 2])
    chosen = typical_units(probabilities, group, per_cluster=2)
    assert [list(units) for units in chosen] == [[1, 2], [3, 0], []]
    assert [list(units) for units in typical_units(probabilities, group)] == [[1], [3], []]


def test_the_shared_flexible_noise_absorbs_a_point_mass_of_zeros():
    """The paper's Gaussian-per-cluster noise fits a zero-inflated null outcome badly with one cluster, so more
    'clusters' (the zeros) buy likelihood; the shared flexible noise fits it with one cluster: its K = 1 held-out
    likelihood is far higher, and no K > 1 does better than one SE over it (the likelihood's own rule picks K = 1)."""
    from geocate.core.clusters import choose_n_clusters
    from geocate.core.crossfit import location_folds

    for seed in (0, 1):
        features, W, Y = zero_inflated_features_trial(seed)
        folds = location_folds(np.arange(len(Y)), 3, seed)
        k_flexible, flexible = choose_n_clusters(features, None, W, Y, folds, 3, seed, epochs=300)
        _, gaussian = choose_n_clusters(features, None, W, Y, folds, 1, seed, epochs=300, noise_components=0)
        assert flexible[0][1] > gaussian[0][1] + 0.3, (flexible, gaussian)
        assert k_flexible == 1, flexible


def test_point_masses_are_found_once_for_both_arms_and_only_with_a_continuous_part_left():
    """The hurdle part's point masses: values held by at least 5 % of either arm's units (and 5 units), a point mass
    in both arms; none for an outcome without ties, and no hurdle where an arm keeps too little off them (a binary
    outcome, a small study), which then keeps the mixture alone. Each arm's shares are fitted, smoothed so that a
    value an arm never shows keeps a finite probability."""
    from geocate.core.clusters import CONTINUOUS_MIN_UNITS, PointMasses, point_mass_values

    rng = np.random.default_rng(0)
    n = 4000
    W = np.arange(n) % 2
    Y = rng.normal(size=n)
    assert point_mass_values(Y, W) is None                                # no ties
    Y[(W == 0) & (rng.random(n) < 0.6)] = 0.0                             # 60 % of controls at 0
    Y[(W == 1) & (rng.random(n) < 0.03)] = 0.0                            # 3 % of the treated: still a point mass
    Y[(W == 1) & (rng.random(n) < 0.03)] = 7.0                            # 3 % of the treated only: not one
    Y[5] = np.nan
    values = point_mass_values(Y, W)
    assert list(values) == [0.0]
    masses = PointMasses.fitted(values, Y, W)
    for w in (0, 1):
        assert masses.shares[w][0] == pytest.approx(np.mean(Y[W == w] == 0), abs=1e-3)
    assert masses.tied(Y).sum() == (Y == 0).sum()
    log_p = masses.log_probability(Y, W)
    np.testing.assert_allclose(log_p[(Y == 0) & (W == 1)], np.log(masses.shares[1][0]))
    np.testing.assert_allclose(log_p[(Y != 0) & (W == 0)], np.log1p(-masses.total[0]))
    unseen = PointMasses.fitted(values, np.ones(10), np.r_[np.zeros(5), np.ones(5)])   # no tie in training
    assert np.isfinite(unseen.log_probability(np.zeros(2), np.array([0, 1]))).all()
    assert point_mass_values(rng.integers(0, 2, n).astype(float), W) is None   # a binary outcome
    small = np.r_[np.zeros(300), rng.normal(size=CONTINUOUS_MIN_UNITS - 1)]
    assert point_mass_values(np.r_[small, small], np.r_[np.zeros(len(small)), np.ones(len(small))]) is None


def test_the_hurdle_models_effect_on_the_mean_is_the_effect():
    """With point masses, a cluster's reported effect is the model's effect on the outcome's mean:
    Q_1 v_1 - Q_0 v_0 + (1 - Q_1) tau + (Q_0 - Q_1) E[mu0 | k]. Checked against the differences in means of a large
    simulated hurdle outcome with two clusters whose untreated outcomes differ (zeros for 70 % of controls and 40 %
    of treated; among the others, treated outcomes higher by tau_k)."""
    from geocate.core.clusters import PointMasses, point_mass_values

    rng = np.random.default_rng(1)
    n = 400_000
    W = np.arange(n) % 2
    cluster = rng.integers(0, 2, n)
    tau, mu0 = np.array([0.8, 0.3]), np.array([2.5, 4.0])
    working = rng.random(n) < np.where(W == 1, 0.6, 0.3)
    Y = np.where(working, mu0[cluster] + W * tau[cluster] + rng.normal(size=n), 0.0)
    masses = PointMasses.fitted(point_mass_values(Y, W), Y, W)
    effect, sd = masses.effect(tau, np.array([0.1, 0.1]), mu0)
    for k in (0, 1):
        inside = cluster == k
        assert effect[k] == pytest.approx(Y[inside & (W == 1)].mean() - Y[inside & (W == 0)].mean(), abs=0.03)
    assert effect[1] > effect[0]        # the cluster with the smaller tau gains more on the mean (its baseline)
    np.testing.assert_allclose(sd, (1 - masses.total[1]) * 0.1)


def test_the_hurdle_recovers_clusters_that_zeros_in_both_arms_hide():
    """Issue 24, point 1's hurdle part, on a design it was not tuned on (the bench's zero-inflated design adds the
    effect to the zeros; here zeros stay zero, as hours worked do): with the hurdle, the clusters are recovered and
    their effects on the mean are right; the mixture alone takes the zeros' spike for clusters."""
    import geocate.core.clusters as clusters

    none = np.zeros((3000, 0))
    for seed in (0, 1):
        features, W, Y, group = zero_inflated_three_cluster_trial(seed, 3000, zeros_stay_zero=True)
        fit = clusters.fit_clusters(features, None, W, Y, 3, seed=seed)
        assert list(fit.point_masses.values) == [0.0] and "hurdle" in fit.noise_description()
        assert adjusted_rand_score(group, fit.probabilities(features, none).argmax(axis=1)) >= 0.75
        np.testing.assert_allclose(fit.effects()[0], 0.4 * np.exp(1.045) + 0.7 * np.array([0, 1.5, 3]), atol=0.25)
    for seed in (0, 1):
        features, W, Y, group = zero_inflated_three_cluster_trial(seed, 3000, zeros_stay_zero=True)
        fit = clusters.fit_clusters(features, None, W, Y, 3, seed=seed, point_masses=False)
        assert fit.point_masses is None
        assert adjusted_rand_score(group, fit.probabilities(features, none).argmax(axis=1)) < 0.5


def zero_inflated_three_cluster_trial(seed, n=1200, zeros_stay_zero=False):
    """Three clusters (effects 0, 1.5, 3 by terciles of a feature score) on bench_clusters' zero-inflated outcome
    (zero for 70 % of controls and 30 % of treated units, log-normal otherwise): the effect is added to every
    treated unit, so the treated ties sit at a different value in each cluster. ``zeros_stay_zero``: shaped like
    hours worked instead, the effects among the units off zero; the ties sit at zero in both arms and say nothing
    about the cluster (the effects on the mean are then 0.7 (E[lognormal] + tau) - 0.3 E[lognormal])."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 8))
    score = features[:, 0] + 0.5 * features[:, 1]
    group = np.searchsorted(np.quantile(score, [1 / 3, 2 / 3]), score)
    W = rng.integers(0, 2, n)
    working = rng.random(n) < np.where(W == 1, 0.7, 0.3)
    tau = np.array([0.0, 1.5, 3.0])
    lognormal = np.exp(1.0 + 0.3 * rng.standard_normal(n))
    if zeros_stay_zero:
        return features, W, np.where(working, lognormal + W * tau[group], 0.0), group
    return features, W, np.where(working, lognormal, 0.0) + W * (tau[group] - 1), group


def test_the_noise_starts_from_both_arms_and_the_controls_and_the_better_fit_is_kept(monkeypatch):
    """Issue 24: with K > 1 the model is trained with its noise started from each arm's outcomes and from the
    controls' (NOISE_STARTS), and the fit with the higher likelihood on its training units is kept. On a
    zero-inflated three-cluster design the arm's own start takes the treated ties (a different value in each
    cluster) for noise in some seeds; keeping the better fit recovers the clusters far better on average. The
    starts are those of the mixture, so the hurdle part is off here (seed 3's 1200 units would just reach it)."""
    import geocate.core.clusters as clusters
    from geocate.core.clusters import fit_clusters

    monkeypatch.setattr(clusters, "point_mass_values", lambda outcome, treated: None)

    none = np.zeros((1200, 0))
    kept_ari, arm_ari, winners = [], [], []
    for seed in range(4):
        features, W, Y, group = zero_inflated_three_cluster_trial(seed)
        fits = {start: fit_clusters(features, None, W, Y, 3, seed=seed, noise_starts=(start,))
                for start in ("arm", "controls")}
        fitted = {start: fit.log_likelihood(features, none, W, Y).sum() for start, fit in fits.items()}
        kept = fit_clusters(features, None, W, Y, 3, seed=seed)
        assert kept.noise_start == max(fitted, key=fitted.get)
        winners.append(kept.noise_start)
        assert kept.log_likelihood(features, none, W, Y).sum() == pytest.approx(max(fitted.values()), rel=1e-6)
        kept_ari.append(adjusted_rand_score(group, kept.probabilities(features, none).argmax(axis=1)))
        arm_ari.append(adjusted_rand_score(group, fits["arm"].probabilities(features, none).argmax(axis=1)))
    assert set(winners) == {"arm", "controls"}, winners          # each start is the better one in some seed
    assert np.mean(kept_ari) >= np.mean(arm_ari) + 0.1, (kept_ari, arm_ari)
    assert min(kept_ari) >= 0.7, kept_ari

    trained = []
    original = clusters._train_clusters
    clusters._train_clusters = lambda *args: trained.append(args[13]) or original(*args)   # the start
    try:
        assert fit_clusters(features, None, W, Y, 1, seed=0, epochs=5).noise_start == "arm"   # K = 1: one start
        assert fit_clusters(features, None, W, Y, 2, seed=0, epochs=5, noise_components=0).noise_start == "arm"
    finally:
        clusters._train_clusters = original
    assert trained == ["arm", "arm"], trained       # nor the paper's noise, which has no mixture to start
    with pytest.raises(ValueError, match="noise_starts"):
        fit_clusters(features, None, W, Y, 2, epochs=5, noise_starts=("treated",))


def test_a_cluster_solution_the_forest_does_not_support_is_flagged(demo_raster):
    """Clusters forced on a null trial: the forest's test finds no heterogeneity and the warnings say so."""
    trial = simulate_trial(demo_raster, n_units=500, seed=41, effects=(1.0,))
    result = find_clusters(unit_table(trial), demo_raster, n_clusters=2, max_clusters=2, n_folds=3, seed=1)[1]
    forest = result.metadata["forest_test"]
    assert forest["p_value"] >= 0.05 and not forest["supports_clusters"]
    assert any("causal forest's heterogeneity test" in w and "does not support" in w
               for w in result.metadata["warnings"])
    unchecked = find_clusters(unit_table(trial), demo_raster, n_clusters=2, max_clusters=2, n_folds=3, seed=1,
                              forest_check=False)[1]
    assert unchecked.metadata["forest_test"] is None
    # Without the forest, or with a forest whose test finds no heterogeneity, each unit's group is the model's
    # most probable cluster (issue 24: the forest's effects inform it only where they hold heterogeneity).
    used = unchecked.group > 0
    assert (unchecked.group[used] == unchecked.probabilities[used].argmax(axis=1) + 1).all()
    assert unchecked.metadata["assignment"].startswith("the cluster model's out-of-fold probabilities")
    assert "were not used, as its test finds no heterogeneity" in result.metadata["assignment"]
    np.testing.assert_allclose(result.probabilities[used], unchecked.probabilities[used])
    assert (result.group == unchecked.group).all()


def test_unit_effects_are_out_of_fold_with_intervals(separated):
    trial, (study, result, extras) = separated
    assert np.all(result.cate_lo <= result.cate) and np.all(result.cate <= result.cate_hi)
    assert np.sqrt(np.mean((result.cate - trial.true_cate) ** 2)) < 0.8    # sd of the truth is 2
    assert np.mean((result.cate_lo <= trial.true_cate) & (trial.true_cate <= result.cate_hi)) > 0.8
    assert set(np.unique(result.fold)) == {0, 1, 2}
    k_table = extras["k_table"]
    assert [row[0] for row in k_table] == [1, 2, 3] and k_table[1][1] > k_table[0][1] + 0.1


@pytest.mark.slow
def test_no_heterogeneity_gives_one_cluster_in_most_seeds(demo_raster):
    chosen = []
    for seed in range(5):
        trial = simulate_trial(demo_raster, n_units=500, seed=40 + seed, effects=(1.0,))
        chosen.append(find_clusters(unit_table(trial), demo_raster, max_clusters=3, n_folds=3, seed=seed)[1]
                      .metadata["n_clusters"])
    assert chosen.count(1) >= 4, chosen


def test_onnx_model_agrees_with_torch_and_checks_its_inputs(separated, demo_raster, tmp_path):
    import torch

    from geocate.core.clusters import OnnxClusterModel, export_onnx

    trial, (study, result, extras) = separated
    model = extras["model"]
    windows = study.patches[:64]
    covariates = study.covariates[:64]
    with torch.no_grad():
        expected = model(torch.as_tensor(windows), torch.as_tensor(covariates, dtype=torch.float32)).numpy()
    # The exported network reproduces the out-of-fold pipeline's final model on raw windows.
    path = export_onnx(model, str(tmp_path / "clusters.onnx"), 3, 33, 2, {"n_clusters": result.metadata["n_clusters"]})
    loaded = OnnxClusterModel(path)
    assert loaded.provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    np.testing.assert_allclose(loaded.probabilities(windows, covariates), expected, atol=1e-4)
    with pytest.raises(GeoCateError, match="trained on windows of 3 band.*33 x 33.*got 3 band.*17 x 17"):
        loaded.probabilities(windows[:, :, :17, :17], covariates)
    with pytest.raises(GeoCateError, match="stack of windows.*shape \\(3, 33, 33\\)"):
        loaded.probabilities(windows[0], covariates[:1])
    # Damaged files are refused when loaded: garbage, an empty description, one flipped byte.
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    (tmp_path / "broken.onnx.json").write_text("{}")
    with pytest.raises(GeoCateError, match="damaged"):
        OnnxClusterModel(str(tmp_path / "broken.onnx"))
    (tmp_path / "broken.onnx.json").write_text("")
    with pytest.raises(GeoCateError, match="damaged"):
        OnnxClusterModel(str(tmp_path / "broken.onnx"))
    data = bytearray((tmp_path / "clusters.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "clusters.onnx").write_bytes(bytes(data))
    with pytest.raises(GeoCateError, match="damaged.*digest"):
        OnnxClusterModel(path)


def test_salience_and_occlusion_point_at_the_image(separated):
    from geocate.core.clusters import occlusion_sensitivity, salience

    trial, (study, result, extras) = separated
    # A unit the model is unsure about (its probabilities near a half): where a certain unit's saturate, the
    # gradient is zero to 1e-11 and any check of it passes.
    unit = int(np.argmin(np.abs(result.probabilities[:, -1] - 0.5)))
    model, window, covariates, cluster = extras["model"], study.patches[unit], study.covariates[unit], \
        result.group[unit] - 1
    gradient = salience(model, window, covariates, cluster)
    assert gradient.shape == (33, 33) and gradient.max() > 0 and np.isfinite(gradient).all()
    # The salience is the model's own derivative: at the most salient pixel, the summed |change| of the cluster's
    # probability per unit change of each band, by central finite differences, is the gradient's value.
    import torch

    row, col = np.unravel_index(np.argmax(gradient), gradient.shape)
    c = torch.as_tensor(np.asarray(covariates, np.float32).reshape(1, -1))
    step = 1e-3 * float(np.abs(window).max())

    def probability(image):
        with torch.no_grad():
            return float(model(torch.as_tensor(image[None].astype(np.float64)).float(), c)[0, cluster])

    total = 0.0
    for band in range(window.shape[0]):
        up, down = window.astype(np.float64), window.astype(np.float64)
        up[band, row, col] += step
        down[band, row, col] -= step
        total += abs(probability(up) - probability(down)) / (2 * step)
    assert gradient[row, col] > 1e-6     # 2.8e-5 per raw unit when measured: a probability that moves
    assert total == pytest.approx(gradient[row, col], rel=0.05)
    # Occlusion: masking a cell moves the probability by exactly base - masked, which the model confirms.
    moves = occlusion_sensitivity(model, window, covariates, cluster)
    assert moves.shape == (3, 3) and np.abs(moves).max() > 0
    i, j = np.unravel_index(np.argmax(np.abs(moves)), moves.shape)
    masked = window.astype(np.float64)
    masked[:, 11 * i:11 * (i + 1), 11 * j:11 * (j + 1)] = model.median.numpy().reshape(-1)[:, None, None]
    assert probability(window.astype(np.float64)) - probability(masked) == pytest.approx(moves[i, j], abs=1e-5)


def test_refusals_name_the_problem(small_trial, demo_raster):
    with pytest.raises(GeoCateError, match=r"CLUSTERS \(5\) is larger than MAX_CLUSTERS \(4\)"):
        find_clusters(unit_table(small_trial), demo_raster, n_clusters=5, max_clusters=4)
    few = simulate_trial(demo_raster, n_units=60, seed=2)
    with pytest.raises(GeoCateError, match="60 units are too few for 4 clusters.*at most 3 clusters"):
        find_clusters(unit_table(few), demo_raster, max_clusters=4)


def test_training_is_cancelled_between_epochs():
    from geocate.core.clusters import fit_clusters
    from geocate.core.errors import Cancelled

    rng = np.random.default_rng(0)
    n = 200
    polls = []
    with pytest.raises(Cancelled):
        fit_clusters(rng.normal(size=(n, 8)), None, rng.integers(0, 2, n), rng.normal(size=n), 2, epochs=300,
                     is_cancelled=lambda: polls.append(1) or len(polls) >= 3)
    assert len(polls) == 3      # polled at epochs 0, 10 and 20: stopped long before the 300th


def test_empty_clusters_are_dropped_from_the_model_and_the_table(demo_raster):
    from geocate.core.clusters import without_empty_clusters

    fitted = []

    def fit_k(k):   # a stand-in model: with K > 2, all but two clusters hold nobody
        fitted.append(k)
        return k

    def probabilities_of(k):
        p = np.zeros((100, k))
        p[:60, 0], p[60:, 1 % k] = 1.0, 1.0
        return p

    fit, k = without_empty_clusters(fit_k, 4, probabilities_of)
    assert (fit, k) == (2, 2) and fitted == [4, 2]
    assert without_empty_clusters(fit_k, 1, probabilities_of) == (1, 1)
    # A real run asked for more clusters than the data hold reports none that is empty.
    trial = simulate_trial(demo_raster, n_units=400, seed=8, effects=(-1.0, 3.0))
    study, result, extras = find_clusters(unit_table(trial), demo_raster, n_clusters=4, max_clusters=4, n_folds=3, seed=8)
    assert all(row[4] >= 0.01 for row in extras["clusters"])
    assert len(extras["clusters"]) == result.metadata["n_clusters"] <= 4


def test_neighbouring_clusters_whose_held_out_effects_do_not_differ_are_found():
    """Issue 24, point 2: the test of two neighbouring clusters' held-out DR effects, fold by fold (each fold's
    clusters from a model of the earlier folds), with a cluster-robust SE (CR1 by groups; with every unit its own
    group, the two-sample SE times sqrt(C / (C - 1))), each fold's t read with C - 1 degrees of freedom (C: the
    groups of the smaller side), the folds' normal quantiles summed over sqrt(the number of folds that could be
    compared), one-sided (the larger cluster's effect must be larger)."""
    from scipy.stats import norm
    from scipy.stats import t as student

    from geocate.core.clusters import assigned_by_effect, indistinct_neighbours

    rng = np.random.default_rng(4)
    assigned = np.repeat([1, 2, 3], 400)
    everyone = [(np.ones(1200, bool), assigned)]                  # one fold holding every unit
    noise = rng.standard_normal(1200)
    apart = np.repeat([0.0, 1.0, 2.0], 400) + noise
    assert indistinct_neighbours(apart, everyone, 3, np.arange(1200)) is None
    close = np.repeat([0.0, 2.0, 2.0], 400) + noise
    low, high, p_value = indistinct_neighbours(close, everyone, 3, np.arange(1200))
    a, b = close[400:800], close[800:]
    se = np.sqrt(800 / 799 * (a.var() / 400 + b.var() / 400))
    assert (low, high) == (2, 3)
    np.testing.assert_allclose(p_value, student.sf((b.mean() - a.mean()) / se, 399), rtol=1e-8)
    # Groups that hold units of both clusters: the CR1 SE sums each group's parts of the difference first.
    mixed = np.arange(1200) % 40
    parts = np.where(assigned == 3, (close - b.mean()) / 400, -(close - a.mean()) / 400)[400:]
    sums = np.bincount(mixed[400:], weights=parts)
    se = np.sqrt(40 / 39 * np.sum(sums ** 2))
    low, high, p_value = indistinct_neighbours(close, everyone, 3, mixed)
    assert (low, high) == (2, 3)
    np.testing.assert_allclose(p_value, student.sf((b.mean() - a.mean()) / se, 39), rtol=1e-8)
    # Two folds: each fold's t (as a normal quantile) summed over sqrt(2).
    first, second = np.arange(1200) % 2 == 0, np.arange(1200) % 2 == 1
    folds = [(first, assigned[first]), (second, assigned[second])]
    z = []
    for held in (first, second):
        a, b = close[held & (assigned == 2)], close[held & (assigned == 3)]
        se = np.sqrt(len(a) + len(b)) / np.sqrt(len(a) + len(b) - 1) * np.sqrt(a.var() / len(a) + b.var() / len(b))
        z.append(norm.isf(student.sf((b.mean() - a.mean()) / se, min(len(a), len(b)) - 1)))
    np.testing.assert_allclose(indistinct_neighbours(close, folds, 3, np.arange(1200))[2],
                               norm.sf(np.sum(z) / np.sqrt(2)), rtol=1e-8)
    # A third fold where cluster 3 holds one unit: left out, the other two still summed over sqrt(2).
    third = np.zeros(1200, bool)
    third[[0, 1, 2, 401, 402, 403, 801]] = True
    unusable = (third, assigned[third])
    np.testing.assert_allclose(indistinct_neighbours(close, folds + [unusable], 3, np.arange(1200))[2],
                               norm.sf(np.sum(z) / np.sqrt(2)), rtol=1e-8)
    # One-sided: a 'larger' cluster whose held-out effect is clearly smaller is not supported.
    reversed_ = np.repeat([0.0, 2.0, 1.0], 400) + noise
    assert indistinct_neighbours(reversed_, everyone, 3, np.arange(1200))[:2] == (2, 3)
    # No spread within the clusters: different means differ, equal ones cannot be told apart.
    assert indistinct_neighbours(np.repeat([0.0, 1.0, 2.0], 400), everyone, 3, np.arange(1200)) is None
    same = indistinct_neighbours(np.repeat([0.0, 1.0, 1.0], 400), everyone, 3, np.arange(1200))
    assert same[:2] == (2, 3) and np.isnan(same[2])
    # Villages of 20 units that share a shock: the SE grows, so a difference that looked real no longer is.
    village = np.arange(1200) // 20
    shocked = np.repeat([0.0, 0.2, 2.0], 400) + 0.2 * noise + 0.5 * rng.standard_normal(60)[village]
    assert indistinct_neighbours(shocked, everyone, 3, np.arange(1200)) is None
    assert indistinct_neighbours(shocked, everyone, 3, village)[:2] == (1, 2)
    # A cluster no held-out unit is assigned to, or one inside a single group, does not differ from its neighbour.
    empty = indistinct_neighbours(apart, [(np.ones(1200, bool), np.where(assigned == 2, 1, assigned))], 3,
                                  np.arange(1200))
    assert empty[:2] == (1, 2) and np.isnan(empty[2])
    one_group = indistinct_neighbours(apart, everyone, 3, np.repeat([0, 1, 2], 400))
    assert one_group[:2] == (1, 2) and np.isnan(one_group[2])
    # Clusters numbered by the model's effects, whatever its internal order.
    probabilities = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert assigned_by_effect(probabilities, [2.0, -1.0, 0.5]).tolist() == [1, 3, 2]


def test_neighbours_test_keeps_its_level_when_clusters_are_whole_groups():
    """Null by repetition (1000 draws, seeded): 40 villages of 10 units sharing a shock, 5 folds of 8 villages,
    each fold's villages put whole into cluster 1 or 2 at random (as image clusters follow spatial blocks). The
    two clusters are kept apart in at most 6 % of draws (2.4 % when written; reading each fold's t with the
    groups of both sides as degrees of freedom gave 7.6-8.2 %), and in some draws (the test is not empty)."""
    from geocate.core.clusters import indistinct_neighbours

    rng = np.random.default_rng(1)
    groups = np.arange(400) // 10
    fold = groups % 5
    kept = 0
    for _ in range(1000):
        scores = rng.standard_normal(400) + rng.standard_normal(40)[groups]
        cluster = rng.integers(1, 3, 40)[groups]
        kept += indistinct_neighbours(scores, [(fold == k, cluster[fold == k]) for k in range(1, 5)], 2,
                                      groups) is None
    assert 0.005 <= kept / 1000 <= 0.06, kept / 1000


def test_clusters_the_data_chose_but_whose_held_out_effects_do_not_differ_are_merged(demo_raster, monkeypatch):
    """Issue 24, point 2: when the likelihood proposes more clusters than there are effects (here forced to
    K = 3 on a design with two), the neighbours whose held-out effects do not differ are merged, the log says
    so, and the two effects are found. The progress bar counts the merge's refits: it never moves back and is
    near its end before "Done" (it used to wait near 95 % while the refits ran)."""
    import geocate.core.clusters as clusters

    trial = simulate_trial(demo_raster, n_units=800, seed=6, effects=(-1.0, 3.0))
    def choose_three(features, covariates, treated, outcome, folds, max_clusters, seed, tick, **options):
        for k in range(1, max_clusters + 1):      # as many progress ticks as choosing K gives
            for j in range(len(np.unique(folds))):
                tick(f"Choosing K: K = {k}, fold {j + 1}")
        return 3, [(1, 0, 0), (2, 0, 0), (3, 0, 0)]

    monkeypatch.setattr(clusters, "choose_n_clusters", choose_three)
    reported = []
    study, result, extras = find_clusters(unit_table(trial), demo_raster, max_clusters=3, n_folds=3, seed=2,
                                          forest_check=False, progress=lambda f, m="": reported.append((f, m)))
    fractions = [f for f, _ in reported]
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), fractions
    refits = [f for f, m in reported if m.startswith("Cluster model: fold")][3:]   # the merge's cross-fitted folds
    assert len(refits) == 3 and all(b > a for a, b in zip(refits, refits[1:])) and refits[-1] < 0.95, refits
    assert reported[-1] == (1.0, "Done") and fractions[-2] >= 0.94, reported[-3:]
    assert result.metadata["effect_test"]["clusters"] == 3 and result.metadata["effect_test"]["p_value"] < 0.05
    assert result.metadata["n_clusters"] == 2, result.metadata["k_rule"]
    assert "do not differ" in result.metadata["k_rule"] and "K = 2" in result.metadata["k_rule"]
    assert adjusted_rand_score(trial.true_group, result.group) >= 0.8
    for truth, row in zip((-1.0, 3.0), extras["clusters"]):
        assert abs(row[7] - truth) < 3 * row[8] + 0.3

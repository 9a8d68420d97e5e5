"""core.estimate (issue 20, point 3): every estimator answers the same questions the same way, and each still
recovers a known truth through that interface."""

import numpy as np
import pytest

from geocate.core.errors import GeoCateError
from geocate.core.estimate import Estimator, z_value
from geocate.core.scores import Z95


@pytest.fixture(scope="module")
def forest():
    """A randomized trial with tau(x) = 1 + x0 on 600 units and 300 new points (known truth)."""
    from geocate.core.learners import CrossFittedCausalForest

    rng = np.random.default_rng(5)
    X = rng.normal(size=(900, 4))
    W = rng.integers(0, 2, 900)
    tau = 1 + X[:, 0]
    Y = X[:, 1] + W * tau + rng.normal(size=900)
    model = CrossFittedCausalForest(n_estimators=100, seed=1).fit(Y[:600], W[:600], X[:600])
    return model, X[600:], tau


def test_the_forest_answers_through_the_interface_with_its_own_numbers(forest):
    model, new, tau = forest
    assert isinstance(model, Estimator)
    np.testing.assert_array_equal(model.effect(), model.cate_)
    np.testing.assert_array_equal(model.effect_se(), model.cate_se_)
    low, high = model.effect_interval()
    np.testing.assert_allclose(low, model.cate_lo_, atol=1e-12)
    np.testing.assert_allclose(high, model.cate_hi_, atol=1e-12)
    assert model.ate() == model.ate_ and model.ate_se() == model.ate_se_
    assert model.ate_interval() == pytest.approx((model.ate_ - Z95 * model.ate_se_, model.ate_ + Z95 * model.ate_se_))
    wide = model.ate_interval(alpha=0.01)
    assert wide[0] < model.ate_interval()[0] and z_value(0.01) == pytest.approx(2.5758, abs=1e-4)
    described = model.describe()
    assert described["estimator"] == "cross-fitted causal forest" and described["n_estimators"] == 100
    assert described["n_folds"] == 5 and described["seed"] == 1


def test_the_forest_effect_at_new_points_is_what_the_maps_read_and_recovers_the_truth(forest):
    model, new, tau = forest
    point, se = model.effect_model().effect_and_se(new)
    np.testing.assert_allclose(model.effect(new), point, atol=1e-12)   # (trees summed by threads: 1e-15 apart)
    np.testing.assert_allclose(model.effect_se(new), se, atol=1e-12)
    assert np.corrcoef(point, tau[600:])[0, 1] > 0.8 and np.all(se > 0)
    assert abs(model.ate() - tau[:600].mean()) < 3 * model.ate_se()
    from geocate.core.maps import forest_model

    assert forest_model(model).forests[0].n_jobs == 1   # one thread per map tile


def test_the_panel_estimator_gives_theta_and_no_per_unit_effect():
    from geocate.core.panel import PanelDML, make_panel
    from geocate.core.simulate import simulate_panel

    panel = make_panel(*simulate_panel(300, 6, 10, seed=2))
    model = PanelDML("within", seed=2).fit(panel)
    assert abs(model.ate() - 0.5) < 4 * model.ate_se() and model.ate_se() < 0.05
    assert model.ate_interval() == pytest.approx(model.estimate_.interval(), abs=1e-6)
    assert model.describe() == {"estimator": "panel double machine learning", "approach": "within",
                                "learner": "spline ridge", "n_folds": 5, "seed": 2, "time_effects": True}
    with pytest.raises(GeoCateError, match="no per-unit effect"):
        model.effect()


def test_the_observational_contrasts_give_the_aipw_ate_of_the_first_contrast():
    from geocate.core.observational import AdjustedContrasts, adjusted_effects

    rng = np.random.default_rng(3)
    x = rng.normal(size=2000)
    p = 1 / (1 + np.exp(-1.5 * x))
    W = (rng.random(2000) < p).astype(int)
    Y = 2 * W + 3 * x + rng.normal(size=2000)           # confounded by x; the true ATE is 2
    propensities = np.column_stack([1 - p, p])
    model = AdjustedContrasts(seed=3).fit(Y, W, propensities, x[:, None])
    aipw = next(e for e in adjusted_effects(Y, W, propensities, x[:, None], seed=3)
                if (e.estimator, e.estimand) == ("AIPW", "ATE"))
    assert model.ate() == aipw.estimate and model.ate_se() == aipw.std_err
    assert abs(model.ate() - 2) < 4 * model.ate_se()
    naive = model.first("naive difference in means")
    assert naive.estimate - 2 > 1.0                      # what the adjustment removed
    assert model.describe()["estimator"].startswith("observational contrasts")


def test_the_cluster_model_effect_is_its_probabilities_times_its_cluster_effects():
    from geocate.core.clusters import fit_clusters

    rng = np.random.default_rng(4)
    features = rng.normal(size=(300, 6))
    W = rng.integers(0, 2, 300)
    Y = W * np.where(features[:, 0] > 0, 2.0, 0.0) + rng.normal(size=300)
    covariates = np.zeros((300, 0))
    fit = fit_clusters(features, covariates, W, Y, n_clusters=2, epochs=60, seed=4)
    probabilities = fit.probabilities(features, covariates)
    np.testing.assert_allclose(fit.effect(features, covariates), probabilities @ fit.effects()[0], atol=1e-12)
    np.testing.assert_allclose(fit.effect(features), fit.effect(features, covariates), atol=1e-12)
    with pytest.raises(GeoCateError, match="no per-unit standard error"):
        fit.effect_interval(features)
    assert fit.describe()["estimator"] == "image cluster model" and fit.describe()["n_clusters"] == 2
    with pytest.raises(GeoCateError, match="no average effect"):
        fit.ate()

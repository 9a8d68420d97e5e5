"""Outcomes that are a map's predictions: the linear and Tweedie corrections, their file, and prediction-powered
inference, on simulated worlds with known truth."""

import numpy as np
import pytest

from geocate.core.corrections import (
    OutcomeCorrection,
    corrected_outcomes,
    fit_correction,
    prediction_powered_ate,
)
from geocate.core.errors import GeoCateError
from geocate.core.simulate import simulate_predicted_outcome_world


@pytest.fixture(scope="module")
def world():
    return simulate_predicted_outcome_world(seed=1)


@pytest.fixture(scope="module")
def correction(world):
    return fit_correction(world.validation_truth, world.validation_prediction, "wealth",
                          {"name": "wealth_map.tif", "bands": 1, "band": 1})


def test_both_corrections_undo_the_attenuation_of_effects_measured_on_the_map(world, correction):
    rng = np.random.default_rng(3)
    taus, estimates = [], {method: [] for method in ("none", "linear", "tweedie")}
    for trial in range(30):
        tau = rng.uniform(-2, 2)
        treated, truth, prediction, _ = world.trial(400, tau, 50 + trial)
        taus.append(tau)
        for method, (values, _) in corrected_outcomes(correction, prediction).items():
            estimates[method].append(values[treated == 1].mean() - values[treated == 0].mean())
    taus = np.array(taus)
    slope = {m: np.polyfit(taus, np.array(e), 1)[0] for m, e in estimates.items()}
    error = {m: np.mean(np.abs(np.array(e) - taus)) for m, e in estimates.items()}
    assert slope["none"] < 0.7                                      # the map attenuates effects (about 0.55)
    assert 0.9 <= slope["linear"] <= 1.1 and 0.88 <= slope["tweedie"] <= 1.1
    assert error["linear"] < 0.3 * error["none"] and error["tweedie"] < 0.3 * error["none"]
    # The validation figures say so too: each corrected value's slope on the truth.
    assert correction.validation["none"]["slope_on_truth"] == pytest.approx(correction.slope)
    assert correction.validation["linear"]["slope_on_truth"] == pytest.approx(1.0)
    assert 0.85 < correction.validation["tweedie"]["slope_on_truth"] < 1.1


def test_the_tweedie_correction_is_the_linear_one_for_gaussian_predictions():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal(20000)
    prediction = 0.6 * truth + 0.3 * rng.standard_normal(20000)
    fitted = fit_correction(truth, prediction, "y")
    middle = np.linspace(-1, 1, 8) * prediction.std()
    linear, tweedie = fitted.apply(middle, "linear")[0], fitted.apply(middle, "tweedie")[0]
    # For Gaussian y_hat: y_hat - sigma2 s(y_hat) = y_hat (1 + sigma2 / var(y_hat)); the linear slope differs
    # only through the noise in y_hat; both expand the predictions about their mean by the same order.
    expected = middle * (1 + fitted.sigma2 / prediction.var())
    np.testing.assert_allclose(tweedie, expected, atol=0.08)   # the kernel density's own noise; a wrong sign
    assert np.abs(tweedie - middle).max() > 0.3                # or a missing sigma2 is off by 0.3 or more
    assert np.all(np.sign(linear) == np.sign(middle)) and np.all(np.abs(linear) > np.abs(middle))


def test_the_correction_file_round_trips_and_flags_predictions_beyond_its_range(correction, tmp_path):
    path = correction.save(str(tmp_path / "wealth.correction.json"))
    loaded = OutcomeCorrection.load(path)
    assert loaded == correction
    values = np.array([correction.low - 1, 0.0, correction.high + 1, np.nan])
    corrected, outside = loaded.apply(values, "tweedie")
    assert outside.tolist() == [True, False, True, False] and np.isnan(corrected[3])
    np.testing.assert_array_equal(loaded.apply(values, "none")[0], values)


def test_a_correction_from_another_map_or_a_broken_file_is_refused_saying_which(correction, tmp_path):
    correction.check_compatible("Wealth", map_bands=1)      # names compare without case
    with pytest.raises(GeoCateError, match="made for the outcome 'wealth' of the map 'wealth_map.tif'.*"
                                           "outcome here is 'consumption'"):
        correction.check_compatible("consumption")
    with pytest.raises(GeoCateError, match="map of 1 band.*this map has 4"):
        correction.check_compatible("wealth", map_bands=4)
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(GeoCateError, match="not a GeoCATE outcome correction file"):
        OutcomeCorrection.load(str(tmp_path / "other.json"))
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(GeoCateError, match="cannot be read"):
        OutcomeCorrection.load(str(tmp_path / "empty.json"))
    with pytest.raises(GeoCateError, match="Only 10 validation units"):
        fit_correction(np.arange(10.0), np.arange(10.0), "y")
    with pytest.raises(GeoCateError, match="do not rise with the truth"):
        fit_correction(np.arange(50.0), -np.arange(50.0), "y")
    with pytest.raises(GeoCateError, match="Unknown outcome correction"):
        correction.apply([1.0], "cubic")


@pytest.mark.slow
def test_prediction_powered_ate_is_unbiased_with_biased_predictions_and_covers(world):
    hits, errors, naive = 0, [], []
    for rep in range(200):
        rng = np.random.default_rng(900 + rep)
        treated, truth, prediction, _ = world.trial(300, 1.0, 900 + rep)
        labelled = rng.random(300) < 0.3
        ate = prediction_powered_ate(prediction, np.where(labelled, truth, np.nan), treated)
        low, high = ate.interval()
        hits += low <= 1.0 <= high
        errors.append(ate.estimate - 1.0)
        naive.append(prediction[treated == 1].mean() - prediction[treated == 0].mean() - 1.0)
    assert abs(np.mean(naive)) > 0.35                      # the map alone is attenuated
    assert abs(np.mean(errors)) < 0.05                     # the rectified estimate is not
    assert 0.90 <= hits / 200 <= 0.99                      # 95 % intervals cover (Monte Carlo SE 1.5 %)


def test_prediction_powered_standard_errors_respect_clusters(world):
    rng = np.random.default_rng(4)
    village = np.repeat(np.arange(40), 10)
    treated = (rng.random(40) < 0.5).astype(int)[village]
    truth = 1.0 * treated + rng.normal(0, 1, 40)[village] + rng.normal(0, 0.5, 400)
    prediction = 0.5 * truth + 0.2 * rng.standard_normal(400)
    labelled = np.where(rng.random(400) < 0.5, truth, np.nan)
    by_unit = prediction_powered_ate(prediction, labelled, treated)
    by_village = prediction_powered_ate(prediction, labelled, treated, clusters=village)
    assert by_village.std_err > 1.5 * by_unit.std_err and by_village.n_clusters == 40
    with pytest.raises(GeoCateError, match="Only 0 treated unit"):
        prediction_powered_ate(prediction, np.where(treated == 1, np.nan, truth), treated)

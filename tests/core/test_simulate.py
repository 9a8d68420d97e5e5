"""The semi-synthetic trial simulator: determinism and image-driven truth."""

import numpy as np
import pytest

from geocate.core.errors import GeoCateError
from geocate.core.patches import extract_patches
from geocate.core.simulate import simulate_trial


def test_same_seed_same_trial_and_another_seed_another(demo_raster):
    a = simulate_trial(demo_raster, n_units=150, seed=5)
    b = simulate_trial(demo_raster, n_units=150, seed=5)
    c = simulate_trial(demo_raster, n_units=150, seed=6)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.outcome, b.outcome)
    assert not np.array_equal(a.coords, c.coords)


def test_units_have_usable_windows_and_balanced_arms(small_trial, demo_raster):
    found = extract_patches(demo_raster, small_trial.coords, small_trial.crs_wkt, window_size_px=33)
    assert found.ok.all()
    assert small_trial.treated.sum() == 300


def test_effect_groups_come_from_what_the_windows_show(small_trial, demo_raster):
    assert np.bincount(small_trial.true_group).tolist() == [0, 200, 200, 200]
    assert set(np.unique(small_trial.true_cate)) == {0.0, 1.0, 2.5}
    found = extract_patches(demo_raster, small_trial.coords, small_trial.crs_wkt, window_size_px=33)
    brightness = np.log(found.patches).mean(axis=(1, 2, 3))
    # Dark windows (water, forest) are in the low-effect group, bright ones (town, bare fields) in the high one.
    assert brightness[small_trial.true_group == 3].mean() > brightness[small_trial.true_group == 1].mean() + 0.05
    assert np.corrcoef(brightness, small_trial.true_cate)[0, 1] > 0.5


def test_no_heterogeneity_when_one_effect_is_given(demo_raster):
    trial = simulate_trial(demo_raster, n_units=100, effects=(1.5,), seed=1)
    assert np.all(trial.true_cate == 1.5) and np.all(trial.true_group == 1)


def test_a_trial_larger_than_the_raster_holds_is_refused_at_once(demo_raster, monkeypatch):
    """The demo crop (1024 x 1024 pixels) holds at most 992 x 992 units 33 pixels wide at distinct pixels: more is
    refused before any window is read, naming the room and the fix (a million-unit bench once read for an hour)."""
    import geocate.core.simulate as simulate

    def no_reading(*args, **kwargs):
        raise AssertionError("a window was read")

    monkeypatch.setattr(simulate, "extract_patches", no_reading)
    with pytest.raises(GeoCateError, match="room for at most 984,064 units") as refused:
        simulate_trial(demo_raster, n_units=1_000_000)
    assert "larger raster" in refused.value.fix
    with pytest.raises(GeoCateError, match="30 pixels apart"):
        simulate_trial(demo_raster, n_units=2000, min_spacing_px=30)


def test_a_confounder_given_in_texture_s_place_drives_treatment_and_outcome(small_trial, demo_raster):
    """confound(image=...): the built-up share (pixels brighter than all windows' 90th percentile) confounds as the
    texture did: the true propensity is logistic in its z-score, the untreated outcome's mean 1.5 (z + X1 / 2), and it
    is a different quantity from the texture (bench_observational.py's scene-builtup, a design not tuned on)."""
    from geocate.core.simulate import built_up_share, confound, image_confounder

    patches = extract_patches(demo_raster, small_trial.coords, small_trial.crs_wkt, window_size_px=33).patches
    share = built_up_share(patches)
    assert share.min() >= 0 and share.max() <= 1 and share.mean() == pytest.approx(0.1, abs=0.01)
    assert 0.2 < np.mean(share == 0) < 0.6      # a point mass: many windows have no built-up pixel (ties, skew)
    z = (share - share.mean()) / share.std()
    W, Y, e = confound(small_trial, seed=3, image=share)
    assert e == pytest.approx(1 / (1 + np.exp(-1.2 * z)), abs=1e-12)
    W_again, _, _ = confound(small_trial, seed=3)
    assert (W == W_again).mean() < 0.95              # another confounder, other units treated
    residual = Y - W - 1.5 * (z + 0.5 * small_trial.covariates[:, 0])
    assert abs(residual.mean()) < 0.15 and residual.std() == pytest.approx(1.0, abs=0.1)   # the noise, N(0, 1)
    texture = small_trial.true_mu0 - 0.5 * small_trial.covariates[:, 0]
    assert abs(np.corrcoef(z, texture)[0, 1]) < 0.9
    # image_confounder: what confounds (the bench's --oracle truth), for either design
    assert image_confounder(small_trial, share) == pytest.approx(z, abs=1e-12)
    assert image_confounder(small_trial) == pytest.approx(texture, abs=1e-12)
    W_texture, Y_texture, e_texture = confound(small_trial, seed=3)
    assert e_texture == pytest.approx(1 / (1 + np.exp(-1.2 * texture)), abs=1e-12)
    residual = Y_texture - W_texture - 1.5 * (texture + 0.5 * small_trial.covariates[:, 0])   # mu0 = the trial's
    assert abs(residual.mean()) < 0.15 and residual.std() == pytest.approx(1.0, abs=0.1)

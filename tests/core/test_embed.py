"""MOSAIKS random convolutional features and robust band scaling."""

import numpy as np
import pytest

from geocate.core.embed import BandScaler, RandomConvFeatures, resolve_device
from geocate.core.errors import GeoCateError


@pytest.fixture(scope="module")
def windows(small_trial, demo_raster):
    from geocate.core.patches import extract_patches

    found = extract_patches(demo_raster, small_trial.coords[:200], small_trial.crs_wkt, window_size_px=17)
    assert found.ok.all()
    return found.patches


def features(windows, seed, **kwargs):
    scaled = BandScaler().fit(windows).transform(windows)
    return RandomConvFeatures(n_filters=32, seed=seed, device="cpu", **kwargs).fit(scaled).transform(scaled)


def test_features_are_the_same_for_the_same_seed_and_differ_for_another(windows):
    first, again, other = features(windows, 1), features(windows, 1), features(windows, 2)
    assert first.shape == (200, 64)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_8_bit_and_16_bit_versions_of_an_image_give_the_same_features(windows):
    # The same scene stored at another radiometric scale (x 1/64, as in an 8-bit export) and offset.
    rescaled = windows / 64.0 + 3.0
    np.testing.assert_allclose(features(windows, 5), features(rescaled, 5), rtol=1e-3, atol=1e-4)


def test_features_match_the_definition_computed_by_hand(windows):
    """z_{2k-1} = mean ReLU(<f_k, W(x - m)>), z_{2k} = mean ReLU(-<f_k, W(x - m)>), with f_k = W(p_k - m)/||.||."""
    scaled = BandScaler().fit(windows).transform(windows)
    model = RandomConvFeatures(n_filters=4, filter_size=3, seed=3, device="cpu").fit(scaled)
    out = model.transform(scaled[:2])
    # Rebuild the filters independently from the same random draws.
    rng = np.random.default_rng(3)
    n, bands, h, w = scaled.shape
    n_samples = max(10 * 4, 5000)
    idx, rows, cols = rng.integers(0, n, n_samples), rng.integers(0, h - 2, n_samples), rng.integers(0, w - 2, n_samples)
    sampled = np.stack([scaled[i, :, r:r + 3, c:c + 3].ravel() for i, r, c in zip(idx, rows, cols)]).astype(float)
    mean = sampled.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov((sampled - mean).T, bias=True))
    zca = eigvec @ np.diag(1 / np.sqrt(eigval + 1e-2)) @ eigvec.T
    filters = (sampled[:4] - mean) @ zca
    filters /= np.linalg.norm(filters, axis=1, keepdims=True)
    image = scaled[1]
    responses = np.array([[filters @ (zca @ (image[:, r:r + 3, c:c + 3].ravel() - mean))
                           for c in range(w - 2)] for r in range(h - 2)])  # (h-2, w-2, 4)
    expected = np.concatenate([np.maximum(responses, 0).mean(axis=(0, 1)), np.maximum(-responses, 0).mean(axis=(0, 1))])
    np.testing.assert_allclose(out[1], expected, rtol=1e-3, atol=1e-4)


def test_nonzero_bias_takes_the_general_path_and_shrinks_features(windows):
    scaled = BandScaler().fit(windows).transform(windows)
    plain = RandomConvFeatures(n_filters=8, seed=4, device="cpu").fit(scaled).transform(scaled)
    biased = RandomConvFeatures(n_filters=8, seed=4, bias=0.5, device="cpu").fit(scaled).transform(scaled)
    assert np.all(biased <= plain + 1e-6) and biased.mean() < plain.mean()


def test_band_scaler_is_robust_to_outliers():
    rng = np.random.default_rng(0)
    image = rng.normal(1000, 50, (10, 2, 8, 8))
    image[0, 0, 0, 0] = 1e9
    scaled = BandScaler().fit(image).transform(image)
    assert scaled.max() <= 5.0
    assert abs(np.median(scaled)) < 0.05


def test_cuda_asked_for_without_a_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
        return
    with pytest.raises(GeoCateError, match="CUDA was asked for"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"

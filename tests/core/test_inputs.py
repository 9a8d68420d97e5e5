"""What the models see (core.inputs): the design matrix's scaling."""

import numpy as np

from geocate.core.inputs import SCALE_COLUMNS, design_matrix


def test_design_matrix_scales_in_column_blocks_to_the_same_numbers_as_the_whole_matrix():
    """Issue 26: the design matrix is scaled SCALE_COLUMNS columns at a time (no temporary copy of the matrix at a
    million units); the numbers are those of the whole matrix's mean and sd, bit for bit, from float32 features as
    from float64 ones; a constant column stays 0; covariates come after the image columns."""
    rng = np.random.default_rng(3)
    for n_columns in (1, 2, SCALE_COLUMNS + 1, 2 * SCALE_COLUMNS - 1, 2 * SCALE_COLUMNS + 1, 513):  # 1 column alone
        features = np.exp(rng.standard_normal((3000, n_columns)))
        np.testing.assert_array_equal(design_matrix(features)[0],
                                      (features - features.mean(axis=0)) / features.std(axis=0))
    features = np.exp(rng.standard_normal((3000, 2 * SCALE_COLUMNS + 7)))
    features[:, 5] = 2.5
    covariates = rng.standard_normal((3000, 2))
    matrix, n_image = design_matrix(features, covariates)
    whole = np.hstack([features, covariates])
    sd = whole.std(axis=0)
    expected = (whole - whole.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    assert n_image == features.shape[1] and matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix, expected)
    assert not matrix[:, 5].any()
    single = features.astype(np.float32)
    whole = np.hstack([single.astype(np.float64), covariates])
    sd = whole.std(axis=0)
    np.testing.assert_array_equal(design_matrix(single, covariates)[0],
                                  (whole - whole.mean(axis=0)) / np.where(sd > 0, sd, 1.0))

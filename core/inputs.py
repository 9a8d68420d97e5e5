"""What the models see (issue 20: one home): the causal forest's effect modifiers (design_matrix), the outcome
models' inputs (outcome_inputs: the image features' leading principal components and the covariates) and the
propensity model's (propensity_inputs: every standardised feature and covariate)."""

import numpy as np

from .errors import GeoCateError

#: Columns of the design matrix scaled at a time (design_matrix).
SCALE_COLUMNS = 32


def design_matrix(features, covariates=None):
    """Image features (n, d) and covariates (n, p) -> the forest's effect modifiers (n, d + p).

    The image features are the feature pipeline's output (core.represent: log1p of
    MOSAIKS responses, or an encoder's embeddings); every column is standardised;
    covariates are appended after the d image columns. Returns (matrix, d).
    """
    has_image = features is not None and np.asarray(features).size
    has_covariates = covariates is not None and np.asarray(covariates).size
    if not has_image and not has_covariates:
        raise GeoCateError("There is nothing to learn effects from.", "Give imagery or covariates.")
    n = len(features) if has_image else len(covariates)
    n_image = np.asarray(features).shape[1] if has_image else 0
    n_covariates = np.asarray(covariates).reshape(n, -1).shape[1] if has_covariates else 0
    # Filled and scaled in place: at 100,000 units each copy of this matrix is 400 MB.
    matrix = np.empty((n, n_image + n_covariates))
    if has_image:
        matrix[:, :n_image] = features
    if has_covariates:
        matrix[:, n_image:] = np.asarray(covariates, dtype=float).reshape(n, -1)
    # Scaled a block of columns at a time: std's temporary is then one block, not another copy of the matrix
    # (4.1 GB at a million units); the numbers are those of the whole matrix's mean and std, bit for bit. (numpy
    # sums a single strided column pairwise, not row after row: a last block of one column joins the one before.)
    edges = list(range(0, matrix.shape[1], SCALE_COLUMNS)) + [matrix.shape[1]]
    if len(edges) > 2 and edges[-1] - edges[-2] == 1:
        del edges[-2]
    for start, end in zip(edges[:-1], edges[1:]):
        block = matrix[:, start:end]
        mean, sd = block.mean(axis=0), block.std(axis=0)
        block -= mean
        block /= np.where(sd > 0, sd, 1.0)
    return matrix, n_image


def outcome_inputs(features, covariates, seed=42, n_components=20, design=None):
    """The outcome models' input: leading principal components of the scaled image features, plus covariates.

    PCA is unsupervised (it never sees an outcome), so fitting it once on all
    units keeps the cross-fitting honest. features None: covariates only.
    design: the forest's design_matrix(features, covariates) when already made
    (its image columns are the scaled features; saves a copy at 100,000 units).
    """
    from sklearn.decomposition import PCA

    parts = []
    if features is not None and np.asarray(features).size:
        n_image = np.asarray(features).shape[1]
        scaled = design[:, :n_image] if design is not None else design_matrix(features, None)[0]
        k = max(min(n_components, scaled.shape[1], len(scaled) // 10), 1)
        parts.append(PCA(n_components=k, random_state=seed).fit_transform(scaled))
    if covariates is not None and np.asarray(covariates).size:
        parts.append(np.asarray(covariates, float).reshape(-1, np.asarray(covariates).shape[-1]))
    return np.column_stack(parts) if parts else None


def propensity_inputs(features, covariates=None):
    """The propensity model's inputs: every standardised image feature and covariate
    (design_matrix), so the regularised classifier, not a fixed number of principal components,
    decides what the image says about who was treated. Tried and not kept: choosing per fold between these and
    the outcome models' leading components by cross-validated log-loss (bench_observational, causalimages'
    simulation: AIPW coverage 0.80 over 40 repetitions)."""
    return design_matrix(features, covariates)[0]

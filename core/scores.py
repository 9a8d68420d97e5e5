"""One doubly robust score, one ATE and one cluster-robust standard error for every algorithm.

ARCHITECTURE.md's ``core.scores``: the AIPW score of a randomized trial (known
propensity), the cross-fitted arm-wise outcome models it uses, and the mean of
scores with a standard error over clusters. ``estimatecate``, ``imageclusters``
and ``comparesources`` report the ATE as :func:`doubly_robust_ate` of these
scores, so one study gives one ATE whichever algorithm reports it; ``evaluate``
judges priorities with the same scores.
"""

import functools
from dataclasses import dataclass

import numpy as np

from .errors import GeoCateError

#: The standard normal's 97.5 % quantile: every 95 % interval of GeoCATE is estimate +- Z95 x SE.
Z95 = 1.959964

#: Estimates and standard errors below this (in absolute value) are numerical noise: zero (as in grf).
NUMERICAL_ZERO = 1e-15


def zero_noise(value):
    """``value`` (a number or an array), with entries below NUMERICAL_ZERO in absolute value set to 0."""
    if np.ndim(value) == 0:
        return 0.0 if abs(float(value)) < NUMERICAL_ZERO else float(value)
    value = np.array(value, dtype=float)
    value[np.abs(value) < NUMERICAL_ZERO] = 0.0
    return value


def aipw_scores(outcome, treated, mu0, mu1, propensity):
    """Doubly robust (AIPW) scores:

        Gamma_i = mu1(x_i) - mu0(x_i) + W_i (Y_i - mu1(x_i)) / e - (1 - W_i) (Y_i - mu0(x_i)) / (1 - e)

    with e the propensity (a number, or one per unit). E[Gamma_i | X_i] = tau(X_i)
    when either the outcome models or the propensity are right; in a trial the
    propensity is known. grf's causal-forest score
    tau + (W - e) / (e (1 - e)) (Y - m - (W - e) tau) is this score with
    mu1 = m + (1 - e) tau and mu0 = m - e tau.
    """
    Y, W = np.asarray(outcome, float), np.asarray(treated, float)
    e = np.asarray(propensity, float)
    return mu1 - mu0 + W * (Y - mu1) / e - (1 - W) * (Y - mu0) / (1 - e)


#: Folds of the penalty's cross-validation when the training units come in groups (outcome_model).
PENALTY_FOLDS = 5


def outcome_model(groups=None):
    """The outcome model of every DR score and forest residual: an additive cubic spline of each input
    (5 knots) under ridge, its penalty chosen by efficient leave-one-out (RidgeCV).

    groups: the training units' groups (clusters or spatial blocks, the groups the folds keep whole), or None.
    When there are at least two groups and some group holds several units (penalty_rule), the penalty is chosen
    instead by cross-validation that keeps the groups whole (up to PENALTY_FOLDS folds of groups, scikit-learn's
    GroupKFold; squared error): leaving one unit out while its village stays in rewards a fit that learns each
    village's shock through inputs that identify the village, so leave-one-out often chose the grid's smallest
    penalty (245 of 600 fits), and the splines' predictions for other villages swung widely (bench_observational's
    clustered design with whole villages treated: AIPW's sd about 0.7 against 0.55, coverage 0.90 against 0.925;
    docs/benchmarks.md). estimateate passes its fold groups; the other algorithms' scores keep leave-one-out.

    Why not a random forest: MOSAIKS features are made for linear models, the
    splines catch non-linear covariates, and on the simulated trials its
    residuals were as small as a 100-tree forest's (measured once when it was
    chosen, see docs/benchmarks.md) at a tenth of the time, which matters at a dozen cross-fitted fits per run
    and 100,000 units. It is deterministic (closed form).
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import SplineTransformer

    alphas = np.logspace(-2, 4, 13)
    ridge = _ridge_cv()(alphas=alphas)
    if penalty_rule(groups) != "leave-one-out":     # some group holds several units: folds of whole groups
        from sklearn.model_selection import GroupKFold

        groups = np.asarray(groups).ravel()
        splits = GroupKFold(min(PENALTY_FOLDS, len(np.unique(groups)))).split(np.zeros((len(groups), 1)), groups=groups)
        ridge = _ridge_cv()(alphas=alphas, cv=list(splits), scoring="neg_mean_squared_error")
    return make_pipeline(SplineTransformer(n_knots=5, degree=3, extrapolation="linear"), ridge)


def penalty_rule(groups):
    """How outcome_model chooses its penalty for units in ``groups`` (None: independent units), as the run record
    says it: "leave-one-out", or cross-validation over whole groups when some group holds several units (and
    there are at least two)."""
    if groups is None:
        return "leave-one-out"
    groups = np.asarray(groups).ravel()
    distinct = len(np.unique(groups))
    return f"cross-validation over whole groups ({min(PENALTY_FOLDS, distinct)} folds)" \
        if 2 <= distinct < len(groups) else "leave-one-out"


@functools.cache
def _ridge_cv():
    """RidgeCV that falls back from LAPACK's SVD, which can fail to converge on ill-conditioned spline bases
    (seen with 16-pixel image features), to the eigen decomposition of the same leave-one-out problem (leave-one-out
    only: with cross-validation splits, scikit-learn fits Ridge on each)."""
    from numpy.linalg import LinAlgError
    from sklearn.linear_model import RidgeCV

    class SafeRidgeCV(RidgeCV):
        def fit(self, X, y, **kwargs):
            try:
                return super().fit(X, y, **kwargs)
            except LinAlgError:
                self.gcv_mode = "eigen"
                return super().fit(X, y, **kwargs)

    return SafeRidgeCV


def arm_outcome_models(outcome, treated, inputs, folds, is_cancelled=None):
    """Cross-fitted mu_w(x) = E[Y | X = x, W = w]: for each fold and arm, :func:`outcome_model` fit on
    the other folds' units of that arm.

    inputs: (n, p) outcome-model inputs, or None (then mu_w is the arm mean of
    the other folds). Returns (mu0, mu1), each (n,) and out-of-fold.
    """
    mu = arm_models(outcome, np.asarray(treated, int), 2, inputs, folds, ("control", "treated"), is_cancelled)
    return mu[:, 0], mu[:, 1]


#: Fewer training units of an arm than this: its outcome model is the arm mean (a spline fit needs some data).
MIN_UNITS_FOR_MODEL = 10


def arm_models(outcome, arm_index, n_arms, inputs, folds, labels=None, is_cancelled=None, groups=None):
    """(n, A) cross-fitted E[Y | X, arm a] for every unit and arm a = 0..A-1 (``arm_index``): :func:`outcome_model`
    on each arm's units of the other folds; the arm mean when ``inputs`` is None or the arm has fewer than
    MIN_UNITS_FOR_MODEL units there. labels: how messages name the arms; is_cancelled: polled between folds;
    groups: the units' groups (clusters, spatial blocks; None: none), whose penalty cross-validation keeps them
    whole (outcome_model)."""
    Y = np.asarray(outcome, float)
    n = len(Y)
    X = None if inputs is None or np.asarray(inputs).size == 0 else np.asarray(inputs, float).reshape(n, -1)
    groups = None if groups is None else np.asarray(groups).ravel()
    from .crossfit import crossfit

    def fit_predict(train, test):
        mu = np.empty((int(test.sum()), n_arms))
        for a in range(n_arms):
            rows = train & (arm_index == a)
            if rows.sum() < 2:
                name = labels[a] if labels else f"arm {a}"
                raise GeoCateError(f"A cross-fitting fold leaves too few {name} units to learn from.",
                                   "Use more units, or fewer or smaller spatial blocks.")
            mu[:, a] = Y[rows].mean() if X is None or rows.sum() < MIN_UNITS_FOR_MODEL else \
                outcome_model(None if groups is None else groups[rows]).fit(X[rows], Y[rows]).predict(X[test])
        return mu

    return crossfit(fit_predict, folds, is_cancelled)


def cross_fitted_scores(outcome, treated, inputs=None, folds=None, n_folds=5, seed=42, design=None,
                        is_cancelled=None):
    """AIPW scores whose outcome models did not see the unit (arm_outcome_models on ``folds``).

    The propensity is the treated share (known in a trial), or with an
    observational core.design.StudyDesign each unit's cross-fitted propensity
    from ``inputs`` on the same folds. is_cancelled: polled between folds. Returns (scores, mu0, mu1, e).
    """
    from .crossfit import location_folds

    Y, W = np.asarray(outcome, float), np.asarray(treated, int)
    folds = location_folds(np.arange(len(Y)), n_folds, seed) if folds is None else np.asarray(folds)
    mu0, mu1 = arm_outcome_models(Y, W, inputs, folds, is_cancelled)
    if design is not None and design.kind != "randomized":
        from .design import CLIP

        e = np.clip(design.propensities(W, inputs, folds, is_cancelled)[0][:, 1], CLIP, 1 - CLIP)
    else:
        e = float(W.mean())
    return aipw_scores(Y, W, mu0, mu1, e), mu0, mu1, e


def mean_and_se(values, clusters=None):
    """Mean of ``values`` and its standard error, robust to correlation within ``clusters``.

    SE^2 = C / (C - 1) * sum_c (sum_{i in c} (v_i - mean))^2 / n^2, the CR1
    sandwich of a mean (grf's ``average_treatment_effect`` with ``clusters``,
    each unit weighted equally). With every unit its own cluster it is exactly
    sd(values) / sqrt(n).
    """
    values = np.asarray(values, float)
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return mean, float("nan")
    clusters = np.arange(n) if clusters is None else np.asarray(clusters)
    ids = np.unique(clusters, return_inverse=True)[1].ravel()
    n_clusters = int(ids.max()) + 1
    if n_clusters < 2:
        return mean, float("nan")
    sums = np.bincount(ids, weights=values - mean)
    se = float(np.sqrt(n_clusters / (n_clusters - 1) * np.sum(sums ** 2)) / n)
    return zero_noise(mean), zero_noise(se)


def small_sample_se(std_err, n_clusters):
    """A cluster-robust standard error over ``n_clusters`` clusters scaled by t_{G-1, 0.975} / z_{0.975}: the normal
    interval +/- 1.96 SE becomes the t interval with G - 1 degrees of freedom, as Cameron & Miller (2015) advise
    with few clusters (and as Stata's ``regress`` with ``vce(cluster)`` reads it)."""
    from scipy.stats import t as student

    if not np.isfinite(std_err) or n_clusters < 2:
        return std_err
    return float(std_err * student.ppf(0.975, n_clusters - 1) / Z95)


def grouped_clusters(clusters, n):
    """The number of ``clusters`` G when the ``n`` units come in groups (fewer groups than units), else None: where
    :func:`small_sample_se` applies to an estimate clustered over them."""
    if clusters is None:
        return None
    n_clusters = len(np.unique(np.asarray(clusters)))
    return n_clusters if n_clusters < n else None


@dataclass(frozen=True)
class AverageEffect:
    """The doubly robust ATE: mean of AIPW scores, with a cluster-robust SE over ``n_clusters`` clusters."""

    estimate: float
    std_err: float
    n_clusters: int

    def interval(self, alpha=0.05):
        return normal_interval(self.estimate, self.std_err, alpha)


def normal_interval(estimate, std_err, alpha=0.05):
    """The normal-approximation (1 - alpha) interval of an estimate with standard error ``std_err``."""
    from scipy.stats import norm

    z = norm.ppf(1 - alpha / 2)
    return estimate - z * std_err, estimate + z * std_err


@dataclass(frozen=True)
class LinearScore:
    """theta solving mean(psi_a theta + psi_b) = 0, its cluster-robust SE and each unit's influence."""

    estimate: float
    std_err: float
    influence: np.ndarray


def linear_score(psi_a, psi_b, clusters=None):
    """The one linear score of GeoCATE's estimators (DoubleML's linear score form, issue 20): psi = psi_a theta +
    psi_b, theta = -mean(psi_b) / mean(psi_a), influence -psi / mean(psi_a), and the cluster-robust (CR1) SE of
    theta as :func:`mean_and_se` of the influence. A mean of scores (AIPW, IPW, the prediction-powered ATE) has
    psi_a = -1; a ratio - an arm's Hajek mean (psi_a = -D_a / e_a, psi_b = D_a Y / e_a), the ATT (psi_a = -D_a),
    the panel's partialling-out (psi_a = -rd^2, psi_b = ry rd) - its own psi_a. A contrast of two thetas on the
    same units: the difference of their estimates, with :func:`mean_and_se` of the difference of influences."""
    psi_b = np.asarray(psi_b, float)
    psi_a = np.broadcast_to(np.asarray(psi_a, float), psi_b.shape)
    jacobian = float(psi_a.mean())
    if jacobian == 0:
        raise GeoCateError("The score's derivative is zero: the effect is not identified.",
                           "Check that the treatment varies (some units in each arm, residual variation left).")
    theta = -float(psi_b.mean()) / jacobian
    influence = -(psi_a * theta + psi_b) / jacobian
    return LinearScore(zero_noise(theta), mean_and_se(influence, clusters)[1], influence)


def doubly_robust_ate(scores, clusters=None):
    """AverageEffect of DR ``scores``; ``clusters`` (the groups the folds keep whole) set the SE."""
    mean = linear_score(-1.0, scores, clusters)
    estimate, se = mean.estimate, mean.std_err
    n_clusters = len(scores) if clusters is None else len(np.unique(np.asarray(clusters)))
    return AverageEffect(estimate=estimate, std_err=se, n_clusters=int(n_clusters))



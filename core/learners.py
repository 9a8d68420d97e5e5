"""CATE learners: a cross-fitted causal forest on a reduced image representation, and the DR ATE."""

import math
import time

import numpy as np

from .errors import Cancelled, GeoCateError, require


def run_cancellable(work, is_cancelled=None, poll_seconds=0.25):
    """Run ``work()`` in a worker thread, polling ``is_cancelled`` every ``poll_seconds``.

    econml's forests offer no callback, so a fold cannot be interrupted from
    inside; instead the caller stops waiting at once on cancel (raising
    Cancelled) and the abandoned fold finishes in the background, its result
    discarded.
    """
    if is_cancelled is None:
        return work()
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(max_workers=1)
    future = executor.submit(work)
    try:
        while True:
            try:
                return future.result(timeout=poll_seconds)
            except TimeoutError:
                if is_cancelled():
                    raise Cancelled() from None
    finally:
        executor.shutdown(wait=False)


def location_folds(locations, n_folds, seed):
    """Assign each unit a fold 0..n_folds-1 so that units sharing a location share a fold.

    locations: (n,) hashable location ids (e.g. from :func:`location_ids`).
    Locations are shuffled with ``seed`` and dealt to folds in turn, which keeps
    fold sizes within one location of each other.
    """
    unique, inverse = np.unique(np.asarray(locations), return_inverse=True)
    if len(unique) < n_folds:
        raise GeoCateError(
            f"Only {len(unique)} distinct unit locations: too few for {n_folds}-fold cross-fitting.",
            "Units at the same place are kept in one fold; use more locations.",
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of_location = np.empty(len(unique), dtype=int)
    fold_of_location[order] = np.arange(len(unique)) % n_folds
    return fold_of_location[inverse]


def location_ids(coords, precision=1e-6):
    """(n, 2) coordinates -> (n,) int ids; units with the same coordinates share an id."""
    rounded = np.round(np.asarray(coords, dtype=float) / precision).astype(np.int64)
    return np.unique(rounded, axis=0, return_inverse=True)[1].ravel()


def design_matrix(features, covariates=None):
    """Image features (n, d) and covariates (n, p) -> the forest's effect modifiers (n, d + p).

    log1p of the (non-negative) pooled features, then every column standardised;
    covariates are appended after the d image columns. Returns (matrix, d).
    """
    parts = []
    n_image = 0
    if features is not None and np.asarray(features).size:
        parts.append(np.log1p(np.maximum(np.asarray(features, dtype=float), 0)))
        n_image = parts[0].shape[1]
    if covariates is not None and np.asarray(covariates).size:
        parts.append(np.asarray(covariates, dtype=float).reshape(len(covariates), -1))
    if not parts:
        raise GeoCateError("There is nothing to learn effects from.", "Give imagery or covariates.")
    matrix = np.column_stack(parts)
    sd = matrix.std(axis=0)
    return (matrix - matrix.mean(axis=0)) / np.where(sd > 0, sd, 1.0), n_image


def reduced_outcome_model(n_image, n_columns, n_components=20, n_units=None, seed=42):
    """Outcome model m(x) = E[Y | x] for a design_matrix: PCA of the image columns, covariates as they are, then a random forest.

    The causal forest splits on the image features themselves (its trees draw
    grf's max_features of them at each split), but the outcome regression only
    needs their leading principal components, fit inside each training fold.
    """
    compose = require("sklearn.compose", "scikit-learn")
    PCA = require("sklearn.decomposition", "scikit-learn").PCA
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.pipeline import make_pipeline

    k = min(n_components, n_image, max((n_units or 10 * n_components) // 10, 1))
    steps = [("image_pca", PCA(n_components=k, random_state=seed), list(range(n_image)))]
    if n_columns > n_image:
        steps.append(("covariates", "passthrough", list(range(n_image, n_columns))))
    # One thread: a threaded forest sums its trees in a varying order, and those last-bit
    # differences in the residuals flip the causal forest's splits, so a seed would not fix the result.
    forest = RandomForestRegressor(n_estimators=100, min_samples_leaf=5, max_features=0.33, n_jobs=1,
                                   random_state=seed)
    return make_pipeline(compose.ColumnTransformer(steps), forest)


def grf_max_features(p):
    """grf's default mtry: min(ceil(sqrt(p) + 20), p)."""
    return int(min(math.ceil(math.sqrt(p) + 20), p))


def effect_groups(cate, n_groups=3):
    """1-based effect group of each unit by quantile of ``cate`` (1 = smallest effects).

    Ranks are used, so groups have equal sizes (to within one unit) even with ties.
    """
    cate = np.asarray(cate, dtype=float)
    order = np.argsort(cate, kind="stable")
    ranks = np.empty(len(cate), dtype=int)
    ranks[order] = np.arange(len(cate))
    return (ranks * n_groups) // max(len(cate), 1) + 1


class CrossFittedCausalForest:
    """Out-of-fold CATE from econml's ``CausalForestDML``, and the doubly robust ATE.

    Units are split into ``n_folds`` folds (units sharing a location share a
    fold). For each fold k, a CausalForestDML (Athey, Tibshirani & Wager 2019,
    "Generalized random forests") is fit on the other folds, with

    * outcome model m(x) = E[Y | X = x]: ``model_y``, by default a random
      forest (the pipeline uses :func:`reduced_outcome_model`),
    * treatment model e(x): the known propensity of a randomized trial, the
      treated share of the training units (``DummyClassifier('prior')``),
    * grf's ``max_features`` = min(ceil(sqrt(p) + 20), p), honest trees,

    and gives, for the units of fold k only, tau^(-k)(x_i), its 95 % interval
    and standard error. So every unit's estimate comes from a forest that did
    not see it. The doubly robust score of unit i (grf's ``get_scores`` for a
    causal forest) is

        Gamma_i = tau^(-k)(x_i) + (W_i - e) / (e (1 - e))
                  * (Y_i - m^(-k)(x_i) - (W_i - e) tau^(-k)(x_i)),

    with m^(-k) the fold's outcome models and e the treated share; the ATE is
    mean(Gamma) with standard error sd(Gamma) / sqrt(n).

    Learned: ``cate_``, ``cate_lo_``, ``cate_hi_``, ``cate_se_``, ``fold_``,
    ``outcome_hat_``, ``dr_scores_``, ``propensity_``, ``ate_``, ``ate_se_``,
    ``forests_`` and ``fold_seconds_`` (one per fold).
    """

    def __init__(self, n_folds=5, n_estimators=200, min_samples_leaf=5, max_features="grf",
                 model_y=None, inner_cv=2, seed=42, n_jobs=-1):
        self.n_folds = n_folds
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.model_y = model_y
        self.inner_cv = inner_cv
        self.seed = seed
        self.n_jobs = n_jobs

    def _outcome_model(self, p):
        if self.model_y is not None:
            from sklearn.base import clone

            return clone(self.model_y)
        from sklearn.ensemble import RandomForestRegressor

        # One thread, for determinism (see reduced_outcome_model).
        return RandomForestRegressor(n_estimators=100, min_samples_leaf=5, max_features=0.33,
                                     n_jobs=1, random_state=self.seed)

    def _forest(self, p):
        dml = require("econml.dml", "econml==0.16.0")
        from sklearn.dummy import DummyClassifier

        max_features = grf_max_features(p) if self.max_features == "grf" else self.max_features
        return dml.CausalForestDML(
            model_y=self._outcome_model(p), model_t=DummyClassifier(strategy="prior"),
            discrete_treatment=True, n_estimators=self.n_estimators,
            min_samples_leaf=self.min_samples_leaf, max_features=max_features, honest=True,
            inference=True, cv=self.inner_cv, random_state=self.seed, n_jobs=self.n_jobs,
        )

    def fit(self, Y, T, X, locations=None, progress=None, is_cancelled=None):
        """Y: (n,) outcomes; T: (n,) 0/1 treatment; X: (n, p) effect modifiers;
        locations: (n,) location ids (units sharing one never split across folds)."""
        import warnings

        Y = np.asarray(Y, dtype=float)
        T = np.asarray(T, dtype=int)
        X = np.asarray(X, dtype=float)
        n, p = X.shape
        locations = np.arange(n) if locations is None else np.asarray(locations)
        self.fold_ = location_folds(locations, self.n_folds, self.seed)
        self.propensity_ = float(T.mean())
        self.cate_, self.cate_lo_, self.cate_hi_, self.cate_se_, self.outcome_hat_ = (
            np.full(n, np.nan) for _ in range(5))
        self.forests_, self.fold_seconds_ = [], []
        started = time.monotonic()
        for k in range(self.n_folds):
            if is_cancelled is not None and is_cancelled():
                raise Cancelled()
            if progress is not None:
                progress(k / self.n_folds, f"Causal forest: fold {k + 1} of {self.n_folds}")
            fold_started = time.monotonic()
            train, test = self.fold_ != k, self.fold_ == k
            forest = self._forest(p)

            def fit_fold(forest=forest, train=train, test=test):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    forest.fit(Y[train], T[train], X=X[train], groups=locations[train])
                    return forest.effect_inference(X[test])

            inference = run_cancellable(fit_fold, is_cancelled)
            self.cate_[test] = inference.point_estimate.ravel()
            lo, hi = inference.conf_int(alpha=0.05)
            self.cate_lo_[test], self.cate_hi_[test] = np.ravel(lo), np.ravel(hi)
            self.cate_se_[test] = np.ravel(inference.stderr)
            self.outcome_hat_[test] = np.mean([m.predict(X[test]) for m in forest.models_y[0]], axis=0)
            self.forests_.append(forest)
            self.fold_seconds_.append(time.monotonic() - fold_started)
        e = self.propensity_
        self.dr_scores_ = self.cate_ + (T - e) / (e * (1 - e)) * (
            Y - self.outcome_hat_ - (T - e) * self.cate_)
        self.ate_ = float(self.dr_scores_.mean())
        self.ate_se_ = float(self.dr_scores_.std(ddof=1) / np.sqrt(n))
        self.fit_seconds_ = time.monotonic() - started
        if progress is not None:
            progress(1.0, "Causal forest done")
        return self

    def ate_interval(self, alpha=0.05):
        """Normal-approximation (1 - alpha) interval for the DR ATE."""
        from scipy.stats import norm

        z = norm.ppf(1 - alpha / 2)
        return self.ate_ - z * self.ate_se_, self.ate_ + z * self.ate_se_

    def effect(self, X):
        """CATE at new points: the mean of the fold forests' predictions (for units not in the trial)."""
        X = np.asarray(X, dtype=float)
        return np.mean([forest.effect(X) for forest in self.forests_], axis=0)


def default_learner(features, covariates=None, n_components=20, n_folds=5, n_estimators=200, seed=42):
    """The learner of geocate:estimatecate, unfitted, with its input: (design, CrossFittedCausalForest).

    The causal forest's effect modifiers are the scaled image features and
    covariates (design_matrix); its outcome model works on their principal
    components (reduced_outcome_model).
    """
    design, n_image = design_matrix(features, covariates)
    outcome_model = (reduced_outcome_model(n_image, design.shape[1], n_components, len(design), seed)
                     if n_image else None)
    learner = CrossFittedCausalForest(n_folds=n_folds, n_estimators=n_estimators, model_y=outcome_model,
                                      seed=seed)
    return design, learner

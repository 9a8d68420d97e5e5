"""CATE learners: a cross-fitted causal forest on a reduced image representation, and the DR ATE."""

import math
import time

import numpy as np

from .crossfit import Folds, crossfit, location_folds
from .errors import GeoCateError, require
from .estimate import Estimator
from .progress import map_cancellable, run_cancellable
from .scores import Z95


def forest_max_features(p):
    """Features tried at each split: min(p, max(ceil(sqrt(p)), 20)).

    grf's default is min(p, ceil(sqrt(p) + 20)): the same up to 20 features,
    but 43 instead of 23 for 512 image features + 2 covariates. On the 3000-unit
    image trial the smaller number grows the forest 1.6x faster at the same
    RMSE and Spearman (bench/bench_estimate.py), so it is the default.
    """
    return int(min(p, max(math.ceil(math.sqrt(p)), 20)))


class EffectCalibration:
    """A monotone map from a forest's CATE prediction to E[DR score | prediction]: the forest's shrinkage undone.

    Forests shrink extreme effects toward the mean (a unit among small effects
    shares leaves with units of larger ones). Within a fold's training units
    alone, the fold forest's out-of-bag predictions (econml's ``oob_predict``:
    only trees that did not draw the unit) are regressed on the units' DR
    scores (outcome models cross-fitted within those units; at most MAX_UNITS
    of them, out_of_bag), with GeoCATE's outcome model (a cubic spline under
    ridge, core.scores.outcome_model), projected onto non-decreasing functions (isotonic regression on a grid of
    the predictions' quantiles), so ranks are kept. It generalises the BLP's
    calibration slope to a curve, as causal isotonic calibration (van der Laan,
    Ulloa-Perez, Carone & Luedtke 2023) does with a step function; the spline
    is smoother (the step function raised the RMSE on bench_validity's trial).
    No outcome of the fold it is applied to reaches it. Outside the 1st to 99th
    percentiles of the predictions the end values hold (a spline's ends swing
    on few units). ``identity()`` leaves predictions as they are.
    """

    #: Training units beyond this are subsampled (seeded) for the out-of-bag predictions: enough for a curve.
    MAX_UNITS = 5000
    #: Fewer training units than this: no calibration (the curve would be noise).
    MIN_UNITS = 100

    def __init__(self, grid=None, values=None, variances=None):
        self.grid, self.values, self.variances = grid, values, variances

    @classmethod
    def identity(cls):
        return cls()

    @classmethod
    def fit(cls, predictions, scores, groups=None):
        """The curve of ``scores`` on ``predictions``; ``groups``: the units' clusters, for the curve's variance
        (None: every unit its own)."""
        from sklearn.isotonic import IsotonicRegression

        from .scores import outcome_model

        x, y = np.asarray(predictions, float).ravel(), np.asarray(scores, float).ravel()
        finite = np.isfinite(x) & np.isfinite(y)      # a unit every tree drew has no out-of-bag prediction
        x, y = x[finite], y[finite]
        groups = np.arange(len(x)) if groups is None else np.asarray(groups).ravel()[finite]
        if len(x) < cls.MIN_UNITS or np.ptp(x) <= 0:
            return cls.identity()
        curve = outcome_model().fit(x[:, None], y)
        grid = np.unique(np.quantile(x, np.linspace(0.01, 0.99, 99)))   # a spline's ends swing on few units
        values = IsotonicRegression().fit_transform(grid, curve.predict(grid[:, None]))
        return cls(grid, values, _curve_variance(curve, x, y, grid, groups))

    def __call__(self, predictions):
        predictions = np.asarray(predictions, float)
        if self.grid is None:
            return predictions
        return np.interp(predictions, self.grid, self.values)

    def variance(self, predictions):
        """The curve's own sampling variance at ``predictions`` (0 for the identity): the noise of a curve fitted on
        noisy DR scores, which a forest's variance does not hold and more trees do not shrink. Not in it: the
        forest's variance carried through the curve's slope (the delta method; with the slope's noise at the ends
        it lowered coverage, docs/benchmarks.md), nor any dependence between the curve's noise and the forest's."""
        predictions = np.asarray(predictions, float)
        if self.grid is None or self.variances is None:
            return np.zeros(predictions.shape)
        return np.interp(predictions, self.grid, self.variances)


def _curve_variance(curve, x, y, grid, groups):
    """Cluster-robust (CR1 by ``groups``) variance of the fitted spline ridge ``curve`` (core.scores.outcome_model,
    fitted on x, y) at the ``grid`` points: the sandwich of its intercept and centred spline basis, with the ridge
    penalty it chose on the basis alone (the penalty taken as fixed; sklearn's intercept is that unpenalised
    column). DR scores of one cluster share its shock: with every unit its own group the meat is HC0's times
    n / (n - 1). The isotonic projection is not in it (it only moves values where the spline decreases)."""
    spline, ridge = curve.steps[0][1], curve.steps[-1][1]
    basis = spline.transform(x[:, None])
    centre = basis.mean(axis=0)
    design = np.column_stack([np.ones(len(x)), basis - centre])
    residual = y - curve.predict(x[:, None])
    penalty = float(ridge.alpha_) * np.eye(design.shape[1])
    penalty[0, 0] = 0.0
    bread = np.linalg.pinv(design.T @ design + penalty)
    ids, index = np.unique(groups, return_inverse=True)
    parts = design * residual[:, None]
    sums = np.column_stack([np.bincount(index.ravel(), weights=parts[:, c], minlength=len(ids))
                            for c in range(parts.shape[1])])
    meat = sums.T @ sums * (len(ids) / max(len(ids) - 1, 1))
    cov = bread @ meat @ bread
    at = np.column_stack([np.ones(len(grid)), spline.transform(grid[:, None]) - centre])
    return np.einsum("ij,jk,ik->i", at, cov, at)


def out_of_bag(forest, X_rows, rows, n_train):
    """(len(rows),) out-of-bag CATE of some of a forest's training units: ``rows``, their indices among the
    ``n_train`` units the forest was grown on, and ``X_rows``, their features. econml's ``oob_predict``
    restricted to some units (econml predicts every training unit, which at 80,000 units per fold costs more
    than the calibration needs). The same arithmetic: each tree that did not draw a unit adds its leaf's
    moments (alpha, Jacobian); their means are solved. NaN where every tree drew the unit."""
    rows = np.asarray(rows)
    k = forest.n_outputs_
    alpha, jac = np.zeros((len(rows), k)), np.zeros((len(rows), k * k))
    counts = np.zeros(len(rows))
    position = np.full(n_train, -1)
    position[rows] = np.arange(len(rows))
    for tree, drawn in zip(forest.estimators_, forest.get_subsample_inds()):
        out = np.ones(len(rows), bool)
        hit = position[drawn]
        out[hit[hit >= 0]] = False
        if out.any():
            a, j = tree.predict_alpha_and_jac(X_rows[out])
            alpha[out] += a
            jac[out] += j
            counts[out] += 1
    seen = counts > 0
    alpha[seen] /= counts[seen, None]
    jac[seen] /= counts[seen, None]
    estimate = np.einsum("ijk,ik->ij", np.linalg.pinv(jac.reshape(-1, k, k)), alpha)[:, 0]
    estimate[~seen] = np.nan
    return estimate


class FoldForests:
    """The fitted fold forests of a CrossFittedCausalForest, each with its calibration: the model of the effect
    at new points (map cells, targeting's candidates; picklable, for Dask's workers)."""

    def __init__(self, forests, calibrations):
        self.forests, self.calibrations = list(forests), list(calibrations)

    def effect_and_se(self, X):
        """(effect, standard error) at the rows of ``X``: each fold forest's point calibrated as its units' were,
        averaged; the forests' variances averaged. One pass over the trees for both."""
        both = [(calibration, forest.predict_and_var(np.asarray(X, dtype=float)))
                for forest, calibration in zip(self.forests, self.calibrations)]
        point = np.mean([calibration(np.ravel(p)) for calibration, (p, _) in both], axis=0)
        return point, np.sqrt(np.maximum(np.mean([np.ravel(v) for _, (_, v) in both], axis=0), 0))


class CrossFittedCausalForest(Estimator):
    """Out-of-fold CATE from a generalized random forest, and the doubly robust ATE, on honest folds.

    Units are split into ``n_folds`` folds that keep each group (units sharing
    a location, a user's cluster, a spatial block) whole. Nuisances are
    cross-fitted once on those folds (:func:`core.scores.arm_outcome_models`):
    mu_w(x) = E[Y | X = x, W = w], so m(x) = e mu1(x) + (1 - e) mu0(x), with
    e the known propensity of the trial (the treated share). Then, for each
    fold k, one causal forest (econml's ``grf.CausalForest``: Athey, Tibshirani
    & Wager 2019, honest trees, ``max_features`` from forest_max_features)
    is grown on the other folds' residuals Y - m(x) and W - e (m cross-fitted
    within those folds, so fold k's outcomes reach neither), and gives the
    fold's units tau^(-k)(x_i) with its variance (bootstrap of little bags).
    So every unit's estimate comes from a forest that saw neither it nor its
    group. The forest's prediction is then calibrated (EffectCalibration,
    fitted on fold k's training units alone: the forest's shrinkage of extreme
    effects undone, ranks kept; ``calibrate=False`` keeps the raw prediction,
    also kept as ``cate_raw_``). The per-unit interval is that estimate plus or
    minus 1.96 times the forest's standard error: it covers the forest's
    sampling noise assuming independent units, not the smoothing bias that the
    calibration leaves, nor the calibration's own noise; statements about
    groups of units should use the GATEs.

    Why folds rather than one forest's out-of-bag predictions (as grf does):
    econml draws each tree's subsample unit by unit, so with units that share
    a village or a block every tree would have seen a unit's neighbours; grf
    can subsample clusters, econml 0.16 cannot. ``bench/bench_estimate.py``
    measures both.

    The DR scores are AIPW scores of those outcome models (core.scores); the
    ATE is their mean with a standard error robust to the groups.

    Learned: ``cate_``, ``cate_raw_``, ``cate_lo_``, ``cate_hi_``, ``cate_se_``,
    ``fold_``, ``mu0_``, ``mu1_``, ``outcome_hat_``, ``dr_scores_``,
    ``propensity_``, ``ate_``, ``ate_se_``, ``forests_``, ``calibrations_`` and
    ``fold_seconds_`` (one per fold).
    """

    name = "cross-fitted causal forest"
    #: Units a ranking forest of the heterogeneity test grows on at most (None: every earlier fold's; see
    #: GroupBaggedCausalForest).
    rank_units = None

    def __init__(self, n_folds=5, n_estimators=100, min_samples_leaf=3, max_features="auto", seed=42, n_jobs=-1,
                 calibrate=True):
        self.calibrate = calibrate
        self.n_folds = n_folds
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.seed = seed
        self.n_jobs = n_jobs

    def _forest(self, p, inference=True, n_estimators=None):
        grf = require("econml.grf", "econml==0.16.0")
        max_features = forest_max_features(p) if self.max_features == "auto" else self.max_features
        n_estimators = n_estimators or self.n_estimators
        if inference:  # trees come in little bags of 4 (econml's subforest_size)
            n_estimators = max(4, 4 * round(n_estimators / 4))
        return grf.CausalForest(n_estimators=n_estimators, min_samples_leaf=self.min_samples_leaf,
                                max_features=max_features, honest=True, inference=inference, max_samples=0.5,
                                n_jobs=self.n_jobs, random_state=self.seed)

    @staticmethod
    def _grow(forest, X, T_res, Y_res):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return forest.fit(X, T_res, Y_res)

    def fit(self, Y, T, X, groups=None, outcome_inputs=None, folds=None, progress=None, is_cancelled=None,
            propensity=None):
        """Y: (n,) outcomes; T: (n,) 0/1 treatment; X: (n, p) effect modifiers; groups: (n,) ids of the
        groups folds keep whole (default: each unit its own); outcome_inputs: (n, q) inputs of the outcome
        models (default X); folds: (n,) fold ids, to share folds with another learner (default from groups);
        propensity: (n,) P(treated | x), cross-fitted (an observational core.design.StudyDesign), used by the
        DR scores and the forests' treatment residuals (default: the treated share, known in a trial)."""
        started = time.monotonic()
        Y, T, X = self._nuisances(Y, T, X, groups, outcome_inputs, folds, progress, is_cancelled, propensity)
        self.timings_ = {"outcome_models_s": time.monotonic() - started}

        def fit_fold(train, test):
            fold_started = time.monotonic()

            def work():
                forest, scores = self._fold_forest(train, inference=True, with_scores=True)
                point, var = forest.predict_and_var(X[test])
                return forest, self._calibration(forest, train, scores), np.ravel(point), np.ravel(var)

            forest, calibration, point, var = run_cancellable(work, is_cancelled)
            self.forests_.append(forest)
            self.calibrations_.append(calibration)
            self.fold_seconds_.append(time.monotonic() - fold_started)
            return point, calibration(point), np.sqrt(np.maximum(var, 0))

        self.cate_raw_, self.cate_, self.cate_se_ = crossfit(
            fit_fold, self.fold_, is_cancelled,
            None if progress is None else
            lambda j, k: progress(0.2 + 0.8 * j / k, f"Causal forest: fold {j + 1} of {k}"))
        self.cate_lo_, self.cate_hi_ = self.cate_ - Z95 * self.cate_se_, self.cate_ + Z95 * self.cate_se_
        self.fit_seconds_ = time.monotonic() - started
        self.timings_["fold_forests_s"] = self.fit_seconds_ - self.timings_["outcome_models_s"]
        if progress is not None:
            progress(1.0, "Causal forest done")
        return self

    def _nuisances(self, Y, T, X, groups, outcome_inputs, folds, progress, is_cancelled, propensity):
        """The stage before the forest, shared by both forests: folds from the groups, the outcome models
        cross-fitted on them, the propensity, the DR scores and the ATE. Returns (Y, T, X) as arrays."""
        from .scores import aipw_scores, arm_outcome_models, doubly_robust_ate

        Y, T, X = np.asarray(Y, dtype=float), np.asarray(T, dtype=int), np.asarray(X, dtype=float)
        n = len(X)
        self.groups_ = np.arange(n) if groups is None else np.asarray(groups)
        self.fold_ = location_folds(self.groups_, self.n_folds, self.seed) if folds is None else np.asarray(folds)
        inputs = X if outcome_inputs is None else outcome_inputs
        if progress is not None:
            progress(0.0, "Outcome models (cross-fitted)")
        self.mu0_, self.mu1_ = run_cancellable(
            lambda: arm_outcome_models(Y, T, inputs, self.fold_), is_cancelled)
        if propensity is None:
            e = self.propensity_ = float(T.mean())
        else:
            from .design import CLIP

            e = self.propensity_ = np.clip(np.asarray(propensity, float), CLIP, 1 - CLIP)
        self.outcome_hat_ = e * self.mu1_ + (1 - e) * self.mu0_  # the DR scores' m(x); each forest has its own
        self.dr_scores_ = aipw_scores(Y, T, self.mu0_, self.mu1_, e)
        ate = doubly_robust_ate(self.dr_scores_, self.groups_)
        self.ate_, self.ate_se_ = ate.estimate, ate.std_err
        self.forests_, self.calibrations_, self.fold_seconds_ = [], [], []
        self._data = (Y, T, X, inputs)
        return Y, T, X

    def _calibration(self, forest, train, scores):
        """The fold forest's EffectCalibration, from its out-of-bag predictions on (at most MAX_UNITS of) its
        ``train`` units and their within-``train`` DR ``scores`` (None: identity)."""
        if not self.calibrate or scores is None:
            return EffectCalibration.identity()
        rows = np.flatnonzero(train)
        chosen = np.arange(len(rows))
        if len(rows) > EffectCalibration.MAX_UNITS:
            chosen = np.sort(np.random.default_rng(self.seed).choice(len(rows), EffectCalibration.MAX_UNITS,
                                                                     replace=False))
        # Only the chosen rows are copied (all training rows would be 330 MB at 100,000 units).
        return EffectCalibration.fit(out_of_bag(forest, self._data[2][rows[chosen]], chosen, len(rows)),
                                     scores[chosen])

    def _fold_forest(self, train, inference=True, n_estimators=None, with_scores=False):
        """A causal forest grown on the ``train`` units alone, its nuisances cross-fitted within ``train``.

        The outcome models of the residuals Y - m(x) are fit on two folds of the
        training units (groups kept whole), so no outcome outside ``train``
        reaches the forest: a unit outside it is predicted by a model that never
        saw its outcome, nor its group's. with_scores: also return the training
        units' DR scores from those outcome models (None when too few units to
        cross-fit), for the calibration.
        """
        from .scores import aipw_scores, arm_outcome_models

        Y, T, X, inputs = self._data
        # A trial's propensity is its training units' treated share; an observational one, each unit's own.
        e = float(T[train].mean()) if np.ndim(self.propensity_) == 0 else self.propensity_[train]
        try:
            inner = Folds(self.fold_).inner(train, self.groups_, 2, self.seed).fold
            mu0, mu1 = arm_outcome_models(Y[train], T[train], inputs[train], inner)
            m = e * mu1 + (1 - e) * mu0
            scores = aipw_scores(Y[train], T[train], mu0, mu1, e)
        except GeoCateError:  # too few training units to cross-fit (the first folds of a tiny study): arm means
            share = float(T[train].mean())
            m = e * Y[train][T[train] == 1].mean() + (1 - e) * Y[train][T[train] == 0].mean() if 0 < share < 1 \
                else np.full(int(np.sum(train)), Y[train].mean())
            scores = None
        forest = self._forest(X.shape[1], inference=inference, n_estimators=n_estimators)
        forest = self._grow(forest, X[train], T[train] - e, Y[train] - m)
        return (forest, scores) if with_scores else forest

    def priority_for(self, train, test, n_estimators=None):
        """CATE predictions for the ``test`` units from a forest built on the ``train`` units alone
        (see _fold_forest): the priority a formal heterogeneity test may rank by
        (core.evaluate.sequential_rate_test). Needs a fitted learner (its data).

        When ``train`` is every fold but one, the fold forest fit() grew on exactly
        those units is reused (the last step of the sequential test). Otherwise a
        forest of ``n_estimators`` trees (default: half the fold forests', at least
        50) is grown: it only ranks, and needs no variance.
        """
        X = self._data[2]
        train, test = np.asarray(train, bool), np.asarray(test, bool)
        for forest, k in zip(self.forests_, Folds(self.fold_).ids):
            if np.array_equal(train, self.fold_ != k):
                return np.ravel(forest.predict(X[test]))
        n_estimators = n_estimators or max(self.n_estimators // 2, 50)
        forest = self._fold_forest(self._ranking_units(train), inference=False, n_estimators=n_estimators)
        return np.ravel(forest.predict(X[test]))

    def _ranking_units(self, train):
        """The ``train`` units a ranking forest grows on: all of them, or (``rank_units`` set and exceeded) whole
        groups of them drawn in random order, each taken while it still fits, up to ``rank_units`` units (one group
        alone when every group is larger) - a subset of the same units, so the ranking still never sees the units
        it ranks."""
        limit = self.rank_units
        if limit is None or int(np.sum(train)) <= limit:
            return train
        ids, index, sizes = np.unique(self.groups_[train], return_inverse=True, return_counts=True)
        order = np.random.default_rng(self.seed).permutation(len(ids))
        keep, room = np.zeros(len(ids), bool), limit
        for g in order:                 # groups in random order, each taken when it still fits (a large one is
            if sizes[g] <= room:        # skipped, not allowed to end the draw)
                keep[g], room = True, room - sizes[g]
                if room == 0:
                    break
        if not keep.any():              # every group is larger than the limit: the smallest, whole
            keep[np.argmin(sizes)] = True
        subset = np.zeros_like(train)
        subset[np.flatnonzero(train)[keep[np.ravel(index)]]] = True
        return subset

    def rerandomization(self, assignment=None, strata=None, known=None):
        """A core.evaluate.Rerandomization of this fitted learner's trial: its outcomes, treatment, outcome models
        and propensity, the null's one effect its DR ATE; ``assignment``, ``strata``, ``known`` as the design
        assigned treatment (see there)."""
        from .evaluate import Rerandomization

        Y, T = self._data[0], self._data[1]
        return Rerandomization(outcome=Y, treated=T, mu0=self.mu0_, mu1=self.mu1_, propensity=self.propensity_,
                               tau=float(self.ate_), assignment=assignment, strata=strata, known=known)

    def heterogeneity_test(self, target="AUTOC", n_draws=200, names=("cate",), progress=None, is_cancelled=None,
                           rerandomization=None):
        """The sequential cross-fold test of this learner's CATE (core.evaluate.sequential_rate_test).

        Fold k is ranked by a forest grown on folds 1..k-1 (priority_for) and
        scored with the cross-fitted DR scores (their outcome models did not see
        fold k); the bootstrap and the standard errors are clustered by the
        groups the folds keep whole. Scores whose outcome models saw no earlier
        fold were tried and over-rejected (docs/benchmarks.md, "validity"). rerandomization (a randomized trial,
        see rerandomization()): each fold's SE is also taken from redrawn assignments, the larger one used.
        """
        from .evaluate import sequential_rate_test

        return sequential_rate_test(self.dr_scores_, self.fold_, self.priority_for, target, clusters=self.groups_,
                                    names=list(names), n_draws=n_draws, seed=self.seed, progress=progress,
                                    is_cancelled=is_cancelled, rerandomization=rerandomization)[0]

    # -- core.estimate's interface -------------------------------------------------------------------------
    def effect_model(self, n_jobs=None):
        """The fold forests with their calibrations (FoldForests): the effect at new points. ``n_jobs``: the
        forests' threads when they predict (map tiles run one thread each)."""
        if n_jobs is not None:
            for forest in self.forests_:
                forest.n_jobs = n_jobs
        return FoldForests(self.forests_, self.calibrations_)

    def effect(self, X=None):
        """Each unit's CATE: out of fold for the fitted units (X None), else at new points (FoldForests)."""
        return self.cate_ if X is None else self.effect_model().effect_and_se(X)[0]

    def effect_se(self, X=None):
        """The forest's standard error of each effect (its sampling noise; see the class docstring)."""
        return self.cate_se_ if X is None else self.effect_model().effect_and_se(X)[1]

    def effect_interval(self, X=None, alpha=0.05):
        """Each effect's (1 - alpha) interval; at new points, one pass over the trees gives point and SE."""
        if X is None:
            return super().effect_interval(None, alpha)
        from .estimate import z_value

        point, se = self.effect_model().effect_and_se(X)
        z = z_value(alpha)
        return point - z * se, point + z * se

    def ate(self):
        """The doubly robust ATE (the mean of the DR scores)."""
        return self.ate_

    def ate_se(self):
        """Its standard error, robust to the fold groups (locations, clusters, spatial blocks)."""
        return self.ate_se_


#: Rows predicted at once by a bagged forest's trees (a copy of that many rows of X is made per bag).
PREDICT_CHUNK = 20000


def little_bag_variance(moment_sum, moment_sq_sum, tree_sq_sum, counts, jac, trees_per_bag, monte_carlo=False,
                        parts=False):
    """The variance of a forest's estimate theta(x) from its little bags (Athey, Tibshirani & Wager 2019, section
    4; econml's ``_predict_point_and_var`` with its objective-Bayes debiasing), for units whose estimate averages
    a different number of bags each (out-of-bag predictions).

    Per unit, over the ``counts`` bags that predict it: ``moment_sum`` (n, k) the sum of the bags' mean moments
    M_b = J_b theta - alpha_b at the unit's theta, ``moment_sq_sum`` (n, k, k) the sum of M_b M_b', ``tree_sq_sum``
    (n, k, k) the sum over bags of the mean over the bag's trees of the tree moments' M_t M_t'; ``jac`` (n, k, k)
    the forest's mean Jacobian. Returns (n,) the variance of the first coordinate of theta. ``monte_carlo``: plus
    the finite forest's own Monte Carlo variance about the forest of infinitely many bags on the same data, the
    bags' between-bag variance over their number (each bag a draw of the same random construction), which
    vanishes as bags are added. ``parts``: (variance, {"unbiased": the between-bag less the within-bag part before
    its debiasing, unbiased but often negative for one unit, "debiased": after it, "monte_carlo": the Monte Carlo
    variance, returned whether or not ``monte_carlo`` adds it}) - bench_forest's decomposition of the interval."""
    from scipy.special import erfc

    c = np.maximum(counts, 1).astype(float)
    mean = moment_sum / c[:, None]
    sq_between = moment_sq_sum / c[:, None, None]
    var_between = sq_between - mean[:, :, None] * mean[:, None, :]
    correction = (tree_sq_sum / c[:, None, None] - sq_between) / (trees_per_bag - 1)
    inverse = np.linalg.pinv(jac)
    first = inverse[:, 0, :]
    pred_var = np.einsum("ij,ijk,ik->i", first, var_between, first)
    pred_correction = np.einsum("ij,ijk,ik->i", first, correction, first)
    naive = pred_var - pred_correction
    spread = np.maximum(pred_var, pred_correction) * np.sqrt(2.0 / c)
    z = naive / np.clip(spread, 1e-10, np.inf)
    debiased = naive + spread * (np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)) / (0.5 * erfc(-z / np.sqrt(2)))
    carlo = np.maximum(pred_var, 0) / c
    variance = debiased + carlo if monte_carlo else debiased
    return (variance, {"unbiased": naive, "debiased": debiased, "monte_carlo": carlo}) if parts else variance


class BaggedForest:
    """A causal forest grown as grf grows one: little bags of trees, each bag on half of the groups (locations,
    clusters, spatial blocks), its trees honest. Predicts at new points with every bag, and each training unit
    out of bag with the bags that did not draw its group. Picklable (the maps' workers)."""

    def __init__(self, bags, drawn, trees_per_bag, calibration=None, n_jobs=-1):
        self.bags = bags                  # list of econml forests, one per bag
        self.drawn = drawn                # (n_bags, n_groups) bool: the groups each bag was grown on
        self.trees_per_bag = trees_per_bag
        self.calibration = calibration or EffectCalibration.identity()
        self.n_jobs = n_jobs              # threads that predict (the maps' tiles set 1)

    def _passes(self, X, rows_of_bag, with_parts=False):
        """theta (n,) and its little-bag variance (n,) at the rows of X, each from the bags rows_of_bag(b) names
        (an index array into X). Bags predict in threads (map_cancellable); their sums are added in bag order,
        so the numbers do not depend on the threads. ``with_parts``: and the variance's parts (little_bag_variance;
        NaN, as the variance, where no bag predicts)."""
        n, k = len(X), self.bags[0].n_outputs_
        threads = _threads(self.n_jobs)

        def in_bag_order(predict, add):   # bags predict in threads; their parts are added in bag order, then let go
            map_cancellable(predict, range(len(self.bags)), threads,
                            each=lambda b, parts: [add(*part) for part in parts], keep=False)

        def chunks(b):
            rows = rows_of_bag(b)
            return [rows[start:start + PREDICT_CHUNK] for start in range(0, len(rows), PREDICT_CHUNK)]

        def first_pass(b):
            parts = []
            for chunk in chunks(b):
                part = X[chunk]
                bag_alpha, bag_jac = np.zeros((len(chunk), k)), np.zeros((len(chunk), k * k))
                for tree in self.bags[b].estimators_:
                    a, j = tree.predict_alpha_and_jac(part, check_input=False)   # X checked once: _checked
                    bag_alpha += a / self.trees_per_bag
                    bag_jac += j / self.trees_per_bag
                parts.append((chunk, bag_alpha, bag_jac))
            return parts

        alpha, jac, counts = np.zeros((n, k)), np.zeros((n, k * k)), np.zeros(n)

        def add_first(chunk, bag_alpha, bag_jac):
            alpha[chunk] += bag_alpha
            jac[chunk] += bag_jac
            counts[chunk] += 1

        in_bag_order(first_pass, add_first)
        seen = counts > 0
        jac_mean = (jac / np.maximum(counts, 1)[:, None]).reshape(n, k, k)
        theta = np.einsum("ijk,ik->ij", np.linalg.pinv(jac_mean), alpha / np.maximum(counts, 1)[:, None])

        def second_pass(b):
            parts = []
            for chunk in chunks(b):
                part, parameter = X[chunk], theta[chunk]
                bag_moment, bag_tree_sq = np.zeros((len(chunk), k)), np.zeros((len(chunk), k, k))
                for tree in self.bags[b].estimators_:
                    moment = _tree_moment(tree, part, parameter)
                    bag_moment += moment / self.trees_per_bag
                    bag_tree_sq += moment[:, :, None] * moment[:, None, :] / self.trees_per_bag
                parts.append((chunk, bag_moment, bag_tree_sq))
            return parts

        moment_sum, moment_sq, tree_sq = np.zeros((n, k)), np.zeros((n, k, k)), np.zeros((n, k, k))

        def add_second(chunk, bag_moment, bag_tree_sq):
            tree_sq[chunk] += bag_tree_sq
            moment_sum[chunk] += bag_moment
            moment_sq[chunk] += bag_moment[:, :, None] * bag_moment[:, None, :]

        in_bag_order(second_pass, add_second)
        var, var_parts = little_bag_variance(moment_sum, moment_sq, tree_sq, counts, jac_mean, self.trees_per_bag,
                                             monte_carlo=True, parts=True)
        point = theta[:, 0]
        point[~seen], var[~seen] = np.nan, np.nan
        for part in var_parts.values():
            part[~seen] = np.nan
        return (point, var, var_parts) if with_parts else (point, var)

    def out_of_bag(self, X, group_index, parts=False):
        """(raw theta, variance) of the training units (rows of X, groups ``group_index`` into drawn's columns),
        each from the bags that did not draw its group; ``parts``: and the variance's parts."""
        X = _checked(X)
        return self._passes(X, lambda b: np.flatnonzero(~self.drawn[b][group_index]), with_parts=parts)

    def effect_and_se(self, X):
        """(calibrated effect, standard error) at new points: every bag (core.estimate's effect model)."""
        X = _checked(X)
        everyone = np.arange(len(X))
        point, var = self._passes(X, lambda b: everyone)
        return self.calibration(point), np.sqrt(np.maximum(var, 0) + self.calibration.variance(point))


def _checked(X):
    """X as every tree's prediction wants it (float64, finite: what econml's check_input checks), checked once for
    all trees: econml checks the whole chunk again at each tree's prediction, a quarter of the passes' time at
    100,000 units (py-spy)."""
    from sklearn.utils import check_array

    return check_array(X, dtype=np.float64, accept_sparse=False, ensure_min_features=0)


def _tree_moment(tree, X, parameter):
    """econml's GRFTree.predict_moment (E[J | x] theta(x) - E[A | x], its arithmetic) without its check of X."""
    alpha, jac = tree.predict_alpha_and_jac(X, check_input=False)
    k = tree.n_outputs_
    return alpha - np.einsum("ijk,ik->ij", jac.reshape((-1, k, k)), parameter)


def _threads(n_jobs):
    import os

    return max(1, os.cpu_count() or 1) if n_jobs is None or n_jobs < 0 else max(1, int(n_jobs))


def fit_on_rows(forest, X, T, y, rows):
    """econml's ``BaseGRF.fit`` for a forest of ``forest``'s settings (econml 0.16, no inference, no warm start, no
    weights) on the units ``rows`` of (X, T, y), without copying those rows of X: each tree gets X[rows[s]] for its
    subsample s, which is econml's X[rows][s]. Same random draws in the same order as econml's, so the same trees,
    bit for bit (tests/core/test_bagged_forest.py). Written here because econml's fit takes only the rows to grow
    on, and a bag's copy of its half of the design matrix is 200 MB per thread at 100,000 units, 2 GB at a
    million (issue 26); econml copies each tree's subsample anyway."""
    from econml._ensemble import _get_n_samples_subsample
    from econml.grf._base_grf import MAX_INT
    from sklearn.utils import check_random_state

    if forest.inference or forest.warm_start or forest.min_var_fraction_leaf is not None:
        raise ValueError("fit_on_rows grows forests without inference, warm start or min_var_fraction_leaf")
    rows = np.asarray(rows)
    T = np.asarray(T, dtype=np.float64)[rows].reshape(-1, 1)
    y = np.asarray(y, dtype=np.float64)[rows].reshape(-1, 1)
    n_samples = len(rows)
    forest.n_features_, forest.n_y_ = X.shape[1], 1
    alpha, pointJ = forest._get_alpha_and_pointJ(None, T, y)
    forest.n_outputs_, forest.n_relevant_outputs_ = forest._get_n_outputs_decomposition(None, T, y)
    yaug = np.ascontiguousarray(np.hstack([y, alpha, pointJ]), dtype=np.float64)
    n_subsample = _get_n_samples_subsample(n_samples=n_samples, max_samples=forest.max_samples)
    forest.min_var_leaf = None
    forest._validate_estimator()
    random_state = check_random_state(forest.random_state)
    forest.subsample_random_seed_ = random_state.randint(MAX_INT)
    subsample_random_state = check_random_state(forest.subsample_random_seed_)
    forest.inference_, forest.warm_start_ = False, False
    trees = [forest._make_estimator(append=False, random_state=random_state).init()
             for _ in range(forest.n_estimators)]
    draws = [subsample_random_state.choice(n_samples, n_subsample, replace=False) for _ in trees]
    X = np.asarray(X, dtype=np.float64)
    forest.estimators_ = [tree.fit(X[rows[s]], yaug[s], forest.n_y_, forest.n_outputs_, forest.n_relevant_outputs_,
                                   sample_weight=None, check_input=False) for tree, s in zip(trees, draws)]
    forest.slices_, forest.slices_n_samples_, forest.slices_n_samples_subsample_ = [], [], []
    forest.n_samples_ = [n_samples] * len(trees)
    forest.n_samples_subsample_ = [n_subsample] * len(trees)
    return forest


#: Units a tree of the out-of-bag forest grows on at most (issue 26). Each tree takes half of its bag's units, a
#: quarter of the study's, up to this: studies under about 400,000 units are not cut; at a million units the trees
#: grow on 100,000 units instead of 250,000 (subsamples that grow more slowly than the study, as the theory of
#: random forests asks; grf's sample.fraction is the same knob): the forest's growth took 9.5 minutes on 2 cores
#: at a million units (about 22 estimated without the cap; bench_scaling.py, docs/benchmarks.md).
TREE_UNITS = 100000


def grow_bagged_forest(X, T_res, Y_res, group_index, n_estimators=200, trees_per_bag=2, bag_sample=0.5,
                       min_samples_leaf=3, max_features=20, seed=42, n_jobs=-1, progress=None, is_cancelled=None,
                       tree_units=None):
    """A BaggedForest on residuals: ``n_estimators`` trees in bags of ``trees_per_bag``, each bag an econml
    CausalForest of honest trees grown on the units of a random half of the groups (``group_index``: each unit's
    group, 0..G-1), each tree on ``bag_sample`` of its bag's units, at most ``tree_units`` (None: TREE_UNITS, read
    when called). econml draws each tree's units one by one and cannot keep a group whole, so the halves are drawn
    here. progress(fraction, message) from 0.2 to 0.8."""
    grf = require("econml.grf", "econml==0.16.0")

    if trees_per_bag < 2:
        raise GeoCateError("A little bag needs at least 2 trees (its variance compares trees within a bag).",
                           "Set trees_per_bag to 2 or more.")
    group_index = np.asarray(group_index)
    n_groups = int(group_index.max()) + 1
    if n_groups < 4:
        raise GeoCateError(f"An out-of-bag forest needs at least 4 groups; the study has {n_groups}.",
                           "Use the fold forests (FOREST), or smaller spatial blocks.")
    n_bags = max(2, int(round(n_estimators / trees_per_bag)))
    rng = np.random.default_rng(seed)
    drawn = np.zeros((n_bags, n_groups), bool)
    for b in range(n_bags):
        drawn[b, rng.choice(n_groups, n_groups // 2, replace=False)] = True
    for g in np.flatnonzero(drawn.all(axis=0)):   # every group is left out of some bag: each unit gets a prediction
        drawn[rng.integers(n_bags), g] = False
    states = rng.integers(2 ** 31 - 1, size=n_bags)
    X = np.asarray(X, dtype=np.float64)          # once: each bag's trees take their rows from this matrix
    tree_units = TREE_UNITS if tree_units is None else tree_units

    def grow(b):
        rows = np.flatnonzero(drawn[b][group_index])
        # Each tree on bag_sample of its bag's units, or on tree_units of them when that is fewer (a million units).
        max_samples = bag_sample if int(np.floor(len(rows) * bag_sample)) <= tree_units else int(tree_units)
        forest = grf.CausalForest(n_estimators=trees_per_bag, min_samples_leaf=min_samples_leaf,
                                  max_features=max_features, honest=True, inference=False, max_samples=max_samples,
                                  n_jobs=1, random_state=int(states[b]))
        return fit_on_rows(forest, X, T_res, Y_res, rows)

    # Bags are grown side by side, one thread each (econml's tree building releases the GIL), each thread taking
    # the next bag when it is free: each bag's draw and seed were fixed above, so the forest is the same whatever
    # the number of threads.
    def grown(b, bag):
        if progress is not None:
            progress(0.2 + 0.6 * (b + 1) / n_bags, f"Causal forest: bag {b + 1} of {n_bags}")

    bags = map_cancellable(grow, range(n_bags), _threads(n_jobs), is_cancelled, grown)
    return BaggedForest(bags, drawn, trees_per_bag, n_jobs=n_jobs)


#: Units a ranking forest of the out-of-bag learner's heterogeneity test grows on at most (whole groups drawn from
#: the earlier folds; issue 26). At 100,000 units its four ranking forests on 20,000 to 80,000 units took as long
#: as the forest itself; a ranking needs far fewer units than an estimate, and no study under about 25,000 units
#: (with equal folds) is cut.
RANK_UNITS = 20000


class GroupBaggedCausalForest(CrossFittedCausalForest):
    """One causal forest for the per-unit effects, grown as grf grows one (issue 26): out-of-bag predictions
    instead of five fold forests.

    The nuisances are cross-fitted on the study's folds as in CrossFittedCausalForest (so each unit's residuals
    Y - m(x), W - e come from models that did not see its fold). The forest is ``n_estimators`` trees in little
    bags of ``trees_per_bag``: each bag is grown on the units of a random half of the **groups** (locations,
    clusters, spatial blocks; econml draws units, so the bags are drawn here and each is an econml forest of
    ``trees_per_bag`` honest trees on its half, each tree on at most ``tree_units`` units, None: TREE_UNITS), and
    each unit is predicted by the bags that did not draw its group - no tree that saw a unit's group predicts for
    it. The variance is the little bags' (between-bag variance of the bags' moments less the within-bag part,
    debiased as econml does: little_bag_variance), over the unit's own out-of-bag bags, plus two parts that
    variance leaves out: the finite forest's Monte Carlo noise (the bags' spread over their number; it vanishes as
    trees are added) and the calibration curve's own noise (EffectCalibration.variance; more trees do not shrink
    it). The calibration (EffectCalibration) is cross-fitted on the study's folds: fold
    k's units get a curve fitted on the other folds' out-of-bag predictions and DR scores. Unlike a fold forest's,
    those predictions come from bags that may have grown on fold k's outcomes (and the scores' outcome models saw
    fold k): a weak path (one unit among thousands behind a one-dimensional monotone curve), documented rather
    than closed. Effects at new points use every bag and a calibration fitted on all units.

    The heterogeneity test is CrossFittedCausalForest's (fold k ranked by a forest grown on the earlier folds
    alone): the out-of-bag forest saw every fold's outcomes, so its ranking never enters the test. Each ranking
    forest grows on at most ``rank_units`` of those units (whole groups in random order, one that does not fit
    skipped; None: all of them).
    """

    name = "causal forest, out-of-bag by groups"

    def __init__(self, n_folds=5, n_estimators=200, trees_per_bag=2, bag_sample=0.5, min_samples_leaf=3,
                 max_features="auto", seed=42, n_jobs=-1, calibrate=True, rank_units=RANK_UNITS,
                 tree_units=None):
        super().__init__(n_folds=n_folds, n_estimators=n_estimators, min_samples_leaf=min_samples_leaf,
                         max_features=max_features, seed=seed, n_jobs=n_jobs, calibrate=calibrate)
        self.trees_per_bag = trees_per_bag
        self.bag_sample = bag_sample
        self.rank_units = rank_units
        self.tree_units = tree_units

    def fit(self, Y, T, X, groups=None, outcome_inputs=None, folds=None, progress=None, is_cancelled=None,
            propensity=None):
        """As CrossFittedCausalForest.fit; the forest stage is one out-of-bag forest (see the class docstring)."""
        started = time.monotonic()
        Y, T, X = self._nuisances(Y, T, X, groups, outcome_inputs, folds, progress, is_cancelled, propensity)
        e, p = self.propensity_, X.shape[1]
        self.timings_ = {"outcome_models_s": time.monotonic() - started}

        group_index = np.unique(self.groups_, return_inverse=True)[1]
        max_features = forest_max_features(p) if self.max_features == "auto" else self.max_features
        model = grow_bagged_forest(X, T - e, Y - self.outcome_hat_, group_index, self.n_estimators,
                                   self.trees_per_bag, self.bag_sample, self.min_samples_leaf, max_features,
                                   self.seed, self.n_jobs, progress, is_cancelled, self.tree_units)
        self.timings_["forest_growth_s"] = time.monotonic() - started - self.timings_["outcome_models_s"]
        if progress is not None:
            progress(0.8, "Causal forest: out-of-bag predictions")
        grown = time.monotonic()
        raw, var, parts = run_cancellable(lambda: model.out_of_bag(X, group_index, parts=True), is_cancelled)
        self.timings_["out_of_bag_s"] = time.monotonic() - grown
        self.cate_raw_, var = raw, np.maximum(var, 0)
        self.cate_ = raw.copy()
        # The interval's parts, for bench_forest: the little bags' unbiased part (before its debiasing), the debiased
        # one, the Monte Carlo part and the calibration curve's.
        self.variance_parts_ = dict(parts, calibration=np.zeros(len(raw)))
        if self.calibrate:
            for k in Folds(self.fold_).ids:
                held = self.fold_ == k
                calibration = EffectCalibration.fit(raw[~held], self.dr_scores_[~held], self.groups_[~held])
                self.cate_[held] = calibration(raw[held])
                self.variance_parts_["calibration"][held] = calibration.variance(raw[held])
                var[held] += self.variance_parts_["calibration"][held]
            model.calibration = EffectCalibration.fit(raw, self.dr_scores_, self.groups_)
        self.cate_se_ = np.sqrt(var)
        self.model_ = model
        self.cate_lo_, self.cate_hi_ = self.cate_ - Z95 * self.cate_se_, self.cate_ + Z95 * self.cate_se_
        self.fit_seconds_ = time.monotonic() - started
        if progress is not None:
            progress(1.0, "Causal forest done")
        return self

    def priority_for(self, train, test, n_estimators=None):
        """The heterogeneity test's ranking of the ``test`` units by a forest grown on the ``train`` units alone
        (CrossFittedCausalForest.priority_for): the out-of-bag forest saw every fold, so it never ranks. Its
        forests have a quarter of this forest's trees (at least 50), as many as the fold forests' test grows
        for its earlier folds."""
        return super().priority_for(train, test, n_estimators or max(self.n_estimators // 4, 50))

    def effect_model(self, n_jobs=None):
        """The bagged forest with its calibration (BaggedForest): the effect at new points. ``n_jobs``: its
        threads when it predicts (map tiles run one thread each)."""
        if n_jobs is not None:
            self.model_.n_jobs = n_jobs
        return self.model_


#: The forests geocate:estimatecate can grow (FOREST): five fold forests, or one out-of-bag forest (issue 26).
FORESTS = ("folds", "out-of-bag")


def default_learner(features, covariates=None, n_components=20, n_folds=5, n_estimators=100, seed=42,
                    forest="folds"):
    """The learner of geocate:estimatecate, unfitted, with its inputs: (design, outcome inputs, learner).

    The causal forest's effect modifiers are the scaled image features and
    covariates (design_matrix); the outcome models work on the features'
    leading principal components and the covariates (core.inputs.outcome_inputs).
    forest "folds": CrossFittedCausalForest with ``n_estimators`` trees per fold forest; "out-of-bag":
    GroupBaggedCausalForest, one forest of 2 ``n_estimators`` trees in bags of 2 (grf's ci.group.size).
    """
    if forest not in FORESTS:
        raise GeoCateError(f"Unknown forest '{forest}'.", f"Choose one of {', '.join(FORESTS)}.")
    from .inputs import design_matrix, outcome_inputs

    design, _ = design_matrix(features, covariates)
    inputs = outcome_inputs(features, covariates, seed, n_components, design=design)
    learner = (CrossFittedCausalForest(n_folds=n_folds, n_estimators=n_estimators, seed=seed) if forest == "folds"
               else GroupBaggedCausalForest(n_folds=n_folds, n_estimators=2 * n_estimators, seed=seed))
    return design, inputs, learner

"""The study design: how treatment was assigned, as one object every estimator receives.

ARCHITECTURE.md's "study design object". A **randomized** design knows its
propensity (the treated share of each arm); an **observational** one
estimates it, cross-fitted, from the image representation and the covariates
(a well-regularised multinomial logistic regression from scikit-learn), and
may trim units whose propensity leaves no overlap (fixed bounds, or Crump,
Hotz, Imbens & Mitnik's 2009 rule). The estimators of core.observational
take the propensities this object gives and never test a flag themselves.
"""

from dataclasses import dataclass

import numpy as np

from .errors import GeoCateError

RANDOMIZED, OBSERVATIONAL = "randomized", "observational"
#: Propensities are clipped to [CLIP, 1 - CLIP] before any weight is formed.
CLIP = 0.01
#: The inverse L2 penalties the propensity model chooses from by cross-validated log-loss.
PENALTIES = np.logspace(-4, 1, 11)


@dataclass(frozen=True)
class StudyDesign:
    """kind: "randomized" or "observational"; trim: None, "crump", or (low, high) propensity bounds (binary
    treatment); n_folds, seed: the propensity model's cross-fitting."""

    kind: str = RANDOMIZED
    trim: object = None
    n_folds: int = 5
    seed: int = 42

    def __post_init__(self):
        if self.kind not in (RANDOMIZED, OBSERVATIONAL):
            raise GeoCateError(f"Unknown study design '{self.kind}'.", "Choose 'randomized' or 'observational'.")
        if isinstance(self.trim, (tuple, list)):
            low, high = self.trim
            if not 0 <= low < high <= 1:
                raise GeoCateError(f"Trimming bounds ({low}, {high}) are not 0 <= low < high <= 1.",
                                   "Give bounds such as 0.05 and 0.95.")

    def propensities(self, arms, inputs=None, folds=None, is_cancelled=None):
        """(n, A) probabilities of each arm (columns in the order of ``np.unique(arms)``) and a fit report.

        Randomized: each arm's share, the same for every unit. Observational:
        out-of-fold predictions of a multinomial logistic regression (L2
        penalty chosen by cross-validated log-loss) on the standardised
        ``inputs``, so no unit's propensity comes from a model that saw it.
        ``inputs`` should be the whole representation (every standardised image
        feature and covariate: propensity_inputs), not the outcome models'
        leading components: on bench_observational's scene the 20 components
        left AIPW 11 % off the effect, every feature 7 %. The penalty grid
        stops at C = 10 (standardised inputs): weaker penalties with hundreds
        of features only separate the arms and do not converge.
        """
        arms = np.asarray(arms)
        levels, index = np.unique(arms, return_inverse=True)
        n, k = len(arms), len(levels)
        if self.kind == RANDOMIZED or inputs is None or np.asarray(inputs).size == 0:
            shares = np.bincount(index, minlength=k) / n
            return np.tile(shares, (n, 1)), {"model": "arm shares (known in a randomized design)"}
        from .crossfit import crossfit, location_folds

        X = np.asarray(inputs, float).reshape(n, -1)
        folds = location_folds(np.arange(n), self.n_folds, self.seed) if folds is None else np.asarray(folds)

        def fit_predict(train, test):
            if len(np.unique(index[train])) < k:
                raise GeoCateError("A cross-fitting fold holds no unit of some treatment arm.",
                                   "Use more units, or fewer arms.")
            return penalised_logistic().fit(X[train], index[train]).predict_proba(X[test])

        probabilities = crossfit(fit_predict, folds, is_cancelled)
        return probabilities, {"model": "multinomial logistic regression (L2, penalty by cross-validated "
                                        "log-loss), cross-fitted", **calibration(index, probabilities)}

    def keep(self, propensity):
        """Units kept after trimming (binary treatment: ``propensity`` is P(treated)), and the rule's bounds."""
        e = np.asarray(propensity, float)
        if self.trim is None:
            return np.ones(len(e), bool), None
        low, high = crump_bounds(e) if self.trim == "crump" else self.trim
        return (e >= low) & (e <= high), (float(low), float(high))


def penalised_logistic():
    """The observational propensity model: a multinomial logistic regression on standardised inputs, its L2
    penalty chosen from PENALTIES by 3-fold cross-validated log-loss (scikit-learn)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=PENALTIES, cv=3, scoring="neg_log_loss",
                                                                max_iter=1000))


def crump_bounds(propensity):
    """Crump et al. (2009): keep alpha <= e <= 1 - alpha, with alpha the smallest value for which
    1 / (alpha (1 - alpha)) <= 2 E[1 / (e (1 - e)) | alpha <= e <= 1 - alpha]; alpha = 0 when no trimming helps."""
    e = np.clip(np.asarray(propensity, float), 1e-6, 1 - 1e-6)
    g = 1.0 / (e * (1 - e))
    if g.max() <= 2 * g.mean():
        return 0.0, 1.0
    # Candidates alpha = each unit's min(e, 1 - e), ascending; the units kept at alpha are those from it on.
    order = np.argsort(np.minimum(e, 1 - e))
    alphas, kept_g = np.minimum(e, 1 - e)[order], g[order]
    suffix_mean = np.cumsum(kept_g[::-1])[::-1] / np.arange(len(e), 0, -1)
    ok = 1.0 / (alphas * (1 - alphas)) <= 2 * suffix_mean
    if not ok.any():
        return 0.1, 0.9
    alpha = float(alphas[np.argmax(ok)])
    return alpha, 1 - alpha


def calibration(index, probabilities):
    """How well the propensity model predicts the arm: Brier score, log-loss, and (binary) the calibration
    slope of the observed arm on the logit of the predicted propensity (1 = calibrated)."""
    n, k = probabilities.shape
    onehot = np.eye(k)[index]
    p = np.clip(probabilities, 1e-12, 1)
    report = {"brier": float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1))),
              "log_loss": float(-np.mean(np.log(p[np.arange(n), index])))}
    if k == 2:
        import statsmodels.api as sm

        logit = np.log(np.clip(probabilities[:, 1], 1e-6, 1 - 1e-6) / np.clip(probabilities[:, 0], 1e-6, 1))
        try:
            fit = sm.Logit(index, sm.add_constant(logit)).fit(disp=0)
            report["calibration_slope"] = float(fit.params[1])
        except Exception:  # noqa: BLE001 - perfect separation: no slope to report
            report["calibration_slope"] = float("nan")
    return report


def overlap_summary(propensity, treated, bounds=(0.05, 0.95), kept=None):
    """The share of units whose propensity lies outside ``bounds``, by arm and overall, the quantiles of the
    propensity in each arm (binary treatment), and the share of the inverse-propensity weights the estimate uses
    (the ``kept`` units, propensities clipped to [CLIP, 1 - CLIP]; 1/e treated, 1/(1-e) control, each arm's
    weights over its own total) carried by the 1 % of units with the largest weights in their arm
    ("top_1pct_weight_share": its largest value over the arms; "top_1pct_equal_share": the same share were all
    weights equal, ceil(n / 100) / n): a few units carrying much of the adjustment make the estimate rest on them."""
    e, W = np.asarray(propensity, float), np.asarray(treated, int)
    outside = (e < bounds[0]) | (e > bounds[1])
    kept = np.ones(len(e), bool) if kept is None else np.asarray(kept, bool)
    clipped = np.clip(e, CLIP, 1 - CLIP)
    shares, equal = [], []
    for arm, weight in ((1, 1 / clipped), (0, 1 / (1 - clipped))):
        w = np.sort(weight[kept & (W == arm)])[::-1]
        if len(w):
            top = max(int(np.ceil(0.01 * len(w))), 1)
            shares.append(float(w[:top].sum() / w.sum()))
            equal.append(top / len(w))
    return {"bounds": list(bounds), "share_outside": float(outside.mean()),
            "top_1pct_weight_share": max(shares) if shares else float("nan"),
            "top_1pct_equal_share": equal[int(np.argmax(shares))] if shares else float("nan"),
            "share_outside_treated": float(outside[W == 1].mean()),
            "share_outside_control": float(outside[W == 0].mean()),
            "quantiles_treated": np.quantile(e[W == 1], [0, 0.05, 0.5, 0.95, 1]).tolist(),
            "quantiles_control": np.quantile(e[W == 0], [0, 0.05, 0.5, 0.95, 1]).tolist()}


def randomization_check(treated, inputs, folds, groups=None, strata=None, n_permutations=199, seed=42, alpha=0.01,
                        max_units=5000):
    """Is treatment predictable from what was known before it (covariates, the image's leading components, the
    location)? In a trial randomized as declared it is not. A dict: the cross-fitted AUC of a penalised logistic
    regression of treatment on ``inputs`` (folds: ``folds``), its permutation p-value (treatment permuted as the
    design assigns it: whole ``groups`` - clusters - together when treatment is constant within each (a
    cluster-randomized trial), units otherwise, within ``strata``), whether it warns (p < alpha),
    and the standardised differences of the inputs' columns between the arms.

    The permutations stop early once the p-value is clearly above ``alpha`` (a sequential Monte Carlo test:
    after at least 19 draws, when 5 permuted AUCs reached the observed one), so a trial that passes costs little;
    beyond ``max_units`` units, a random subset of whole clusters of about that size is checked.
    """
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from .crossfit import Folds, crossfit

    W = np.asarray(treated, int)
    X = StandardScaler().fit_transform(np.asarray(inputs, float))
    folds = np.asarray(folds)
    rng = np.random.default_rng(seed)
    if len(W) > max_units:   # large studies: a random subset of whole clusters keeps the check to seconds
        ids = np.arange(len(W)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
        chosen = rng.permutation(ids.max() + 1)
        sizes = np.bincount(ids)
        keep_groups = chosen[:max(np.searchsorted(np.cumsum(sizes[chosen]), max_units), 2)]
        keep = np.isin(ids, keep_groups)
        W, X, folds = W[keep], X[keep], folds[keep]
        groups = None if groups is None else np.asarray(groups)[keep]
        strata = None if strata is None else np.asarray(strata)[keep]

    walk = Folds(folds)   # made once: the permutations below reuse it

    def cross_fitted_auc(w):
        if any(len(np.unique(w[train])) < 2 for _, train, _ in walk.split()):
            return 0.5

        def fit_predict(train, test):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return LogisticRegression(C=0.1, max_iter=200).fit(X[train], w[train]).decision_function(X[test])

        prediction = crossfit(fit_predict, walk)
        return float(roc_auc_score(w, prediction)) if len(np.unique(w)) == 2 else 0.5

    groups = np.arange(len(W)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    if np.any(np.bincount(groups, W) % np.bincount(groups)):   # treatment varies within some cluster: it was
        groups = np.arange(len(W))                               # not assigned by cluster, permute units
    strata = np.zeros(len(W), int) if strata is None else np.asarray(strata)
    group_w = np.zeros(groups.max() + 1)
    group_w[groups] = W                                  # a cluster's assignment (its units share it)
    group_stratum = np.zeros(groups.max() + 1, int)
    group_stratum[groups] = strata

    def permuted():
        shuffled = group_w.copy()
        for s in np.unique(group_stratum):
            members = np.flatnonzero(group_stratum == s)
            shuffled[members] = rng.permutation(group_w[members])
        return shuffled[groups].astype(int)

    observed = cross_fitted_auc(W)
    exceed, done = 0, 0
    for _ in range(n_permutations):
        done += 1
        exceed += cross_fitted_auc(permuted()) >= observed
        if done >= 19 and exceed >= 5:
            break
    p_value = (1 + exceed) / (1 + done)
    treated_mean, control_mean = X[W == 1].mean(axis=0), X[W == 0].mean(axis=0)
    pooled = np.sqrt((X[W == 1].var(axis=0) + X[W == 0].var(axis=0)) / 2)
    differences = np.where(pooled > 0, (treated_mean - control_mean) / np.where(pooled > 0, pooled, 1), 0.0)
    return {"auc": observed, "p_value": float(p_value), "permutations": done, "warns": bool(p_value < alpha),
            "standardized_differences": differences.tolist()}

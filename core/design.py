"""The study design: how treatment was assigned, as one object every estimator receives.

ARCHITECTURE.md's "study design object". A **randomized** design knows its
propensity (the treated share of each arm); an **observational** one
estimates it, cross-fitted, from the image representation and the covariates
(a well-regularised multinomial logistic regression from scikit-learn), and
may trim units whose propensity leaves no overlap (fixed bounds, or Crump,
Hotz, Imbens & Mitnik's 2009 rule), and may calibrate the estimated
propensities so that their weights balance the outcome models' inputs exactly
(``calibrate``: balancing_propensities). The estimators of core.observational
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
    treatment); n_folds, seed: the propensity model's cross-fitting; calibrate: an observational design's
    propensities are calibrated to balance the outcome models' inputs (calibrated, balancing_propensities)."""

    kind: str = RANDOMIZED
    trim: object = None
    n_folds: int = 5
    seed: int = 42
    calibrate: bool = False

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

    def calibrated(self, arms, propensities, inputs, kept=None):
        """The propensities the estimators use, and a record (None when nothing was done): an observational
        design with ``calibrate`` gives balancing_propensities on the outcome models' ``inputs`` over the
        ``kept`` units (after trimming, which the model's own propensities decide); otherwise ``propensities``
        as they are."""
        if not self.calibrate or self.kind == RANDOMIZED or inputs is None or np.asarray(inputs).size == 0:
            return propensities, None
        return balancing_propensities(arms, propensities, inputs, kept)

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


def balancing_propensities(arms, propensities, inputs, kept=None):
    """Propensities calibrated so that each arm's inverse-propensity weights balance ``inputs`` exactly.

    Within each arm a, the weights are w_i proportional to exp(lambda_a' z_i) / e_a(x_i) and sum to 1, with
    lambda_a chosen so that the arm's weighted mean of every input equals the mean over all ``kept`` units (the
    ATE's target): entropy balancing (Hainmueller 2012) with the fitted propensity's weights as base weights,
    the calibration estimators of Chan, Yam & Zhang (2016) and Tan (2020). The unit's calibrated propensity of
    its own arm is then 1 / (n w_i) (n kept units), and its other arms' shrink in proportion so each row sums
    to 1. Only the weights that units of an arm carry for that arm change: the outcome models and their inputs
    do not. The AIPW estimate stays doubly robust, and its bias is no longer the product of the two models'
    errors along the inputs balanced. On bench_observational's image-confounding designs it lowered AIPW's
    bias and brought its coverage to nominal (docs/benchmarks.md). The inputs never see an outcome, so fitting
    lambda on every unit keeps the estimate honest. The dual is solved here by Newton's method (entropy_balance):
    the package index offers no entropy balancing with base weights (Meta's ``balance`` rakes, or fits CBPS).

    arms: (n,); propensities: (n, A) the model's, clipped to [CLIP, 1 - CLIP]; inputs: (n, p) the outcome
    models' inputs; kept: (n,) bool (None: all). Returns ((n, A) propensities: the kept rows calibrated,
    the others as given, and a record: the method, the number of inputs, "balance" and the largest standardized
    difference the weights leave). The calibrated propensities stay within [CLIP, 1 - CLIP], as every estimator
    clips them, so the balance holds for the weights the estimators form (bounded_balance): "exact"; "close"
    where some units of an arm would need less weight than a propensity of 1 - CLIP gives (the arm is
    over-represented there), their weights then held at the bound; "not reached" where no weights balance the
    inputs at all, with a "warning", every row then the model's."""
    levels, index = np.unique(np.asarray(arms), return_inverse=True)
    n_all, k = len(index), len(levels)
    e = np.clip(np.asarray(propensities, float).reshape(n_all, k), CLIP, 1 - CLIP)
    kept = np.ones(n_all, bool) if kept is None else np.asarray(kept, bool)
    rows = np.flatnonzero(kept)
    Z = np.asarray(inputs, float).reshape(n_all, -1)[rows]
    spread = Z.std(axis=0)
    Z = (Z - Z.mean(axis=0)) / np.where(spread > 0, spread, 1)      # standardized, centred on the target
    u, s, _ = np.linalg.svd(Z, full_matrices=False)                 # the same constraints, well conditioned
    directions = u[:, s > 1e-8 * max(s.max(initial=0), 1e-300)] * np.sqrt(len(rows))
    if not directions.shape[1]:                                     # every input constant: nothing to balance
        return e, {"method": "none: every input is constant over the units", "inputs": int(Z.shape[1]),
                   "balance": "exact", "largest_standardized_difference": 0.0}
    calibrated, gap, states = e.copy(), 0.0, set()
    for a in range(k):
        in_arm = index[rows] == a
        members = rows[in_arm]
        weights, state = bounded_balance(directions[in_arm], 1 / e[members, a], len(rows))
        states.add(state)
        gap = max(gap, float(np.abs(weights @ Z[in_arm] / weights.sum()).max(initial=0)))
        own = np.clip(1 / (len(rows) * weights), CLIP, 1 - CLIP)     # within the bounds already: rounding only
        others = [b for b in range(k) if b != a]
        rest = e[members][:, others]
        calibrated[members[:, None], others] = rest * ((1 - own) / rest.sum(axis=1))[:, None]
        calibrated[members, a] = own
    balance = "not reached" if "failed" in states else "close" if "close" in states else "exact"
    record = {"method": "propensities calibrated to balance the outcome models' inputs (entropy balancing on "
                        "the inverse-propensity weights; Chan, Yam & Zhang 2016)",
              "inputs": int(Z.shape[1]), "balance": balance, "largest_standardized_difference": gap}
    if balance != "not reached":
        return calibrated, record
    record["largest_standardized_difference"] = None
    record["warning"] = (f"The propensities could not be calibrated to balance the outcome models' {Z.shape[1]} "
                         "inputs: an arm has too few units for them, or they do not overlap. The model's "
                         "propensities are used. Trim units without overlap, or give fewer covariates.")
    return e, record


def bounded_balance(Z, base, n):
    """Weights w (summing to 1) with sum_i w_i z_i = 0 (Z is centred on the target), each within
    [1 / ((1 - CLIP) n), 1 / (CLIP n)] - the weights a propensity in [CLIP, 1 - CLIP] gives among n units - and
    closest to ``base`` in relative entropy, and whether they balance exactly.

    Within the bounds when they allow it: Newton's method on the dual of the bounded problem, whose weights are
    base_i exp(theta' (1, z_i)) clipped to the bounds (its objective is convex and smooth). Where no weights within
    the bounds balance (some units would need less weight than any propensity gives: the arm is over-represented
    there), the closer to balance of entropy_balance's unbounded weights and the dual's last iterate, each brought
    within the bounds and to a sum of 1 (within_bounds), which leaves the balance close rather than exact (the
    caller measures it). Returns (weights, "exact" | "close" | "failed": no weights balance, bounded or not)."""
    low, high = 1 / ((1 - CLIP) * n), 1 / (CLIP * n)
    free = entropy_balance(Z, base)
    if np.abs(free @ Z).max(initial=0) > 1e-8:
        return free, "failed"
    if free.min() >= low and free.max() <= high:
        return free, "exact"
    X = np.column_stack([np.ones(len(Z)), Z])
    target = np.zeros(X.shape[1])
    target[0] = 1
    log_base, log_low, log_high = np.log(base), np.log(low), np.log(high)

    def dual(theta):   # value, gradient and Hessian of the bounded problem's dual (convex, smooth)
        s = log_base + X @ theta
        w = np.exp(np.clip(s, log_low, log_high))
        value = np.where(s < log_low, low * (s - log_low + 1), np.where(s > log_high, high * (s - log_high + 1), w))
        inside = (s > log_low) & (s < log_high)
        return value.sum() - theta @ target, w @ X - target, (X[inside] * w[inside, None]).T @ X[inside]

    start = np.zeros(X.shape[1])
    start[0] = -np.log(base.sum())
    theta, converged = newton_minimize(dual, start, max_iter=200)
    s = log_base + X @ theta
    if converged:
        return np.exp(np.clip(s, log_low, log_high)), "exact"
    # No weights within the bounds balance: the closer to balance of the unbounded weights and the dual's last
    # iterate, each brought within the bounds and to a sum of 1.
    candidates = [within_bounds(free, low, high), within_bounds(np.exp(np.clip(s, log_low, log_high)), low, high)]
    return min(candidates, key=lambda w: np.abs(w @ Z / w.sum()).max(initial=0)), "close"


def within_bounds(weights, low, high):
    """``weights`` scaled by the one factor c for which clip(c w, low, high) sums to 1 (bisection on log c; the sum
    grows with c), then clipped: the closest weights of the same shape within the bounds. Where the bounds do not
    allow a sum of 1 (an arm of over 99 % or under 1 % of the units), the nearest they allow."""
    w = np.asarray(weights, float)
    lo, hi = np.log(low / w.max()), np.log(high / w.min())   # at c = e^lo the sum is at most len(w) low, ...
    for _ in range(200):
        middle = (lo + hi) / 2
        if np.clip(np.exp(middle) * w, low, high).sum() < 1:
            lo = middle
        else:
            hi = middle
    return np.clip(np.exp((lo + hi) / 2) * w, low, high)


def entropy_balance(Z, base, max_iter=100):
    """Weights w (summing to 1) proportional to base_i exp(lambda' z_i) with sum_i w_i z_i = 0, by Newton's
    method on the convex dual log sum_i base_i exp(lambda' z_i). Where no such weights exist (0 outside the
    inputs' hull), the closest the iterations reach (the caller checks)."""
    log_base = np.log(base)

    def softmax(lam):
        a = log_base + Z @ lam
        w = np.exp(a - a.max())
        return w / w.sum(), a

    def dual(lam):
        w, a = softmax(lam)
        gradient = w @ Z
        return a.max() + np.log(np.exp(a - a.max()).sum()), gradient, (Z * w[:, None]).T @ Z - np.outer(gradient,
                                                                                                        gradient)

    return softmax(newton_minimize(dual, np.zeros(Z.shape[1]), max_iter)[0])[0]


def newton_minimize(objective, start, max_iter=100, tolerance=1e-10):
    """Minimise a smooth convex function by Newton's method with a backtracking (Armijo) line search, the dual
    solver of balancing_propensities. objective(x) gives (value, gradient, Hessian); a singular Hessian takes its
    least-squares step, one that does not descend a gradient step. Returns (x, whether the gradient reached
    ``tolerance``)."""
    x = np.asarray(start, float)
    value, gradient, hessian = objective(x)
    for _ in range(max_iter):
        if np.abs(gradient).max(initial=0) < tolerance:
            return x, True
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        slope = float(gradient @ step)
        if slope <= 0:
            step, slope = gradient, float(gradient @ gradient)
        t = 1.0
        while t > 1e-14:
            candidate = objective(x - t * step)
            if candidate[0] <= value - 1e-4 * t * slope:
                break
            t /= 2
        else:
            return x, False
        x = x - t * step
        value, gradient, hessian = candidate
    return x, bool(np.abs(gradient).max(initial=0) < tolerance)


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


def overlap_summary(propensity, treated, bounds=(0.05, 0.95), kept=None, weights_from=None):
    """The share of units whose propensity lies outside ``bounds``, by arm and overall, the quantiles of the
    propensity in each arm (binary treatment), and the share of the inverse-propensity weights the estimate uses
    (the ``kept`` units, propensities clipped to [CLIP, 1 - CLIP]; 1/e treated, 1/(1-e) control, each arm's
    weights over its own total) carried by the 1 % of units with the largest weights in their arm
    ("top_1pct_weight_share": its largest value over the arms; "top_1pct_equal_share": the same share were all
    weights equal, ceil(n / 100) / n): a few units carrying much of the adjustment make the estimate rest on them.
    weights_from: the P(treated) the weights are formed from when it is not ``propensity`` (calibrated ones)."""
    e, W = np.asarray(propensity, float), np.asarray(treated, int)
    outside = (e < bounds[0]) | (e > bounds[1])
    kept = np.ones(len(e), bool) if kept is None else np.asarray(kept, bool)
    clipped = np.clip(e if weights_from is None else np.asarray(weights_from, float), CLIP, 1 - CLIP)
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

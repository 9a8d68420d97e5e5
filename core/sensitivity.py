"""Sensitivity of a doubly robust effect to a confounder nobody measured (issue 23, point 2).

Chernozhukov, Cinelli, Newey, Sharma & Syrgkanis (2022), "Long story short: omitted variable bias in causal
machine learning": a confounder the adjustment missed biases the AIPW estimate theta by at most

    |bias| <= |rho| * sqrt(CF_Y * CF_D / (1 - CF_D)) * sqrt(sigma2 * nu2),

where sigma2 = E[(Y - g(D, X))^2] is the outcome models' residual variance, nu2 = E[alpha(D, X)^2] the Riesz
representer's second moment (alpha = D_a / e_a - D_b / e_b for the contrast of arms a and b), CF_Y the share of
the outcome's residual variation the confounder would explain, CF_D its relative gain in the Riesz representer's
variation, and RHO the correlation of the two confounding parts (1: the worst case). The three elements are
estimated from the same cross-fitted nuisance predictions as the AIPW estimate (orthogonal scores: nu2's is
2 (1 / e_a + 1 / e_b) - alpha^2), their joint covariance is cluster-robust over the groups the folds keep whole
(estimateate's: when the units come in G groups, scaled by (t_{G-1} / z)^2, so that the interval at zero
strength is the estimate's own t interval), and the bounds on the estimate and its confidence interval, and the
robustness values RV (the equal strength CF_Y = CF_D that brings the estimate to 0) and RV_a (its interval), are
econml's own arithmetic
(econml.validate.sensitivity_analysis: sensitivity_interval, RV), called here, not copied; the elements equal
econml's dr_sensitivity_values on the same nuisance predictions when every unit is its own cluster (tested).

Benchmarks (gain statistics, as DoubleML's ``sensitivity_benchmark``): a group of observed inputs - a covariate,
or everything the imagery shows - is left out, the nuisance models are refit without it, and its strengths are
CF_Y = (R2_long - R2_short) / (1 - R2_long), CF_D = (1 - nu2_short / nu2_long) / (nu2_short / nu2_long) (both
clipped to [0, 1]) and rho = |delta theta| / sqrt((sigma2_short - sigma2_long)(nu2_long - nu2_short)), signed.
"A confounder as strong as X" then means one that adds to the adjusted model what X added.
"""

from dataclasses import dataclass, field

import numpy as np

from .errors import GeoCateError
from .scores import grouped_clusters, small_sample_se


@dataclass(frozen=True)
class SensitivityElements:
    """theta (the AIPW estimate), sigma2, nu2 and their (3, 3) cluster-robust covariance, for one contrast."""

    contrast: str
    theta: float
    sigma2: float
    nu2: float
    cov: np.ndarray = field(repr=False)
    var_y: float = float("nan")   # the outcome's variance among the contrast's units (benchmarks' R2)
    nu2_plugin: float = float("nan")   # mean(1 / e_a + 1 / e_b): what the propensities imply for nu2


@dataclass(frozen=True)
class Benchmark:
    """The strength of an observed group of inputs, were it the confounder left out (gain statistics)."""

    name: str
    cf_y: float
    cf_d: float
    rho: float
    delta_theta: float    # the estimate without the group minus with it


def contrast_elements(outcome, index, mu, e, a, b, clusters=None, contrast="", estimand="ATE", small_sample=False):
    """SensitivityElements of the AIPW contrast of arm ``a`` against arm ``b``.

    outcome: (n,); index: (n,) each unit's arm (0..A-1); mu: (n, A) cross-fitted E[Y | X, arm]; e: (n, A)
    propensities (clipped as the estimate's); clusters: (n,) the groups the folds keep whole (None: units).
    Units of other arms count in theta's and nu2's means (their alpha is 0) and add 0 to sigma2's, as in
    econml's dr_sensitivity_values.

    estimand "ATT" (the effect on arm a's units, core.observational's doubly robust ATT): theta =
    E[omega (g_a - g_b)] with omega = D_a / p_a and its mean given X, omega_bar = e_a / p_a; the Riesz representer
    alpha = omega_bar (D_a / e_a - D_b / e_b) = D_a / p_a - D_b e_a / (e_b p_a), nu2's score
    2 omega omega_bar (1 / e_a + 1 / e_b) - alpha^2 (DoubleML's IRM with the ATTE score, binary case), and theta's
    influence psi - D_a theta / p_a (the share p_a estimated).

    small_sample: when ``clusters`` group the units (G of them, fewer than the units), scale the covariance by
    (t_{G-1} / z)^2, as core.observational.adjusted_effects scales estimateate's standard errors, so the interval at
    zero strength is the estimate's own (estimateate passes True; estimatecate's ATE is read on the normal)."""
    Y = np.asarray(outcome, float)
    index = np.asarray(index)
    mu = np.asarray(mu, float)
    e = np.asarray(e, float)
    n = len(Y)
    D = np.eye(mu.shape[1])[index]
    in_pair = (index == a) | (index == b)
    sigma_score = np.where(in_pair, (Y - mu[np.arange(n), index]) ** 2, 0.0)
    if estimand == "ATT":
        share = D[:, a].mean()
        omega, omega_bar = D[:, a] / share, e[:, a] / share
        alpha = omega_bar * (D[:, a] / e[:, a] - D[:, b] / e[:, b])
        psi = alpha * (Y - mu[:, b])   # = (D_a (Y - g_b) - D_b e_a / e_b (Y - g_b)) / p_a
        theta = psi.mean()
        theta_score = psi - D[:, a] * theta / share + theta   # mean theta; centred, its influence
        nu_score = 2 * omega * omega_bar * (1 / e[:, a] + 1 / e[:, b]) - alpha ** 2
        nu2_plugin = float(np.mean(omega_bar ** 2 * (1 / e[:, a] + 1 / e[:, b])))
    elif estimand == "ATE":
        theta_score = (mu[:, a] - mu[:, b] + D[:, a] * (Y - mu[:, a]) / e[:, a]
                       - D[:, b] * (Y - mu[:, b]) / e[:, b])
        alpha = D[:, a] / e[:, a] - D[:, b] / e[:, b]
        nu_score = 2 * (1 / e[:, a] + 1 / e[:, b]) - alpha ** 2
        nu2_plugin = float(np.mean(1 / e[:, a] + 1 / e[:, b]))
    else:
        raise ValueError(f"estimand {estimand!r}: 'ATE' or 'ATT'")
    scores = np.column_stack([theta_score, sigma_score, nu_score])
    means = scores.mean(axis=0)
    centred = scores - means
    if clusters is not None:   # cluster sums of the centred scores: the covariance is cluster-robust (CR0)
        _, groups = np.unique(np.asarray(clusters), return_inverse=True)
        centred = np.stack([np.bincount(groups.ravel(), weights=centred[:, j]) for j in range(3)], axis=1)
    cov = centred.T @ centred / n / n
    if clusters is not None and len(centred) > 1:   # CR1, as the estimate's own SE (core.scores.mean_and_se)
        cov = cov * len(centred) / (len(centred) - 1)
    if small_sample and grouped_clusters(clusters, n) is not None:   # on t with G - 1 degrees of freedom, as the
        cov = cov * small_sample_se(1.0, len(centred)) ** 2          # estimate's (core.observational)
    return SensitivityElements(contrast=contrast, theta=float(means[0]), sigma2=float(means[1]),
                               nu2=float(means[2]), cov=cov, var_y=float(np.var(Y[in_pair])),
                               nu2_plugin=nu2_plugin)


def unstable_riesz(elements):
    """A warning when nu2's orthogonal estimate is far below what the propensities imply (under half): a few
    units with extreme weights dominate it (on the demo's confounded design without trimming: 2.6 against about
    5 with Crump's trimming), and the bounds and benchmarks' CF_D are then unreliable; None otherwise."""
    if elements.nu2 > 0.5 * elements.nu2_plugin:
        return None
    return (f"Sensitivity ({elements.contrast}): the Riesz representer's variance is poorly estimated (nu2 = "
            f"{elements.nu2:.3g}, while the propensities imply about {elements.nu2_plugin:.3g}): a few units with "
            "extreme weights dominate it, so the bounds and the benchmarks' CF_D are unreliable. Trim units "
            "without overlap (geocate:estimateate, TRIM: Crump et al.) and run the analysis there.")


#: A benchmark's strength is capped here in the table (econml's bounds need strengths below 1; DoubleML's gain
#: statistics reach 1 when the left-out group explains all the rest).
MAX_STRENGTH = 0.999


def _econml():
    from econml.validate import sensitivity_analysis

    return sensitivity_analysis


def analyse_or_warn(warnings, *args, **kwargs):
    """``analyse``, or None with a warning appended when the nuisance models leave it undefined (nu2 <= 0: a few
    extreme weights): the analysis never fails the run it describes."""
    try:
        return analyse(*args, **kwargs)
    except GeoCateError as error:
        if "CF_Y" in str(error) or "CF_D" in str(error) or "RHO" in str(error):
            raise   # the user's strengths: refused with the fix
        warnings.append(f"No sensitivity analysis: {error}")
        return None


def check_strengths(cf_y, cf_d, rho):
    """A refusal naming the parameter when a strength is outside its range."""
    for name, value in (("CF_Y", cf_y), ("CF_D", cf_d)):
        if not (0 <= value < 1):
            raise GeoCateError(f"{name} is {value:g}: a confounder's strength is a share of variation, in [0, 1).",
                               f"Give {name} between 0 (no confounding) and 0.99.")
    if not (-1 <= rho <= 1):
        raise GeoCateError(f"RHO is {rho:g}: it is a correlation, in [-1, 1].", "Give RHO in [-1, 1] (1: worst case).")


def bounds(elements, cf_y, cf_d, rho=1.0, alpha=0.05):
    """(estimate low, estimate high, interval low, interval high) under a confounder of strengths CF_Y, CF_D, RHO."""
    check_strengths(cf_y, cf_d, rho)
    analysis = _econml()
    if elements.sigma2 < 0 or elements.nu2 <= 0:
        raise GeoCateError("The sensitivity analysis needs positive residual and Riesz variances; the nuisance "
                           f"models gave sigma2 = {elements.sigma2:.3g}, nu2 = {elements.nu2:.3g}.",
                           "Check the propensities' overlap (trim), or use more units.")
    args = (elements.theta, elements.sigma2, elements.nu2, elements.cov, alpha, cf_y, cf_d, rho)
    low, high = analysis.sensitivity_interval(*args, interval_type="theta")
    ci_low, ci_high = analysis.sensitivity_interval(*args, interval_type="ci")
    return float(low), float(high), float(ci_low), float(ci_high)


def robustness_values(elements, alpha=0.05, null=0.0):
    """(RV, RV_a): the equal strength CF_Y = CF_D (rho = 1) at which the estimate, or its (1 - alpha) interval,
    reaches ``null``; RV_a is 0 when the interval already contains it."""
    analysis = _econml()
    args = (elements.theta, elements.sigma2, elements.nu2, elements.cov, alpha)
    return (float(analysis.RV(*args, null_hypothesis=null, interval_type="theta")),
            float(analysis.RV(*args, null_hypothesis=null, interval_type="ci")))


def benchmark(name, long, short):
    """The gain statistics of a group of inputs (DoubleML's gain_statistics, one repetition): ``long`` the
    elements with it, ``short`` refit without it."""
    r2_long = 1 - long.sigma2 / long.var_y
    r2_short = 1 - short.sigma2 / long.var_y
    r2_riesz = short.nu2 / long.nu2
    cf_y = float(np.clip((r2_long - r2_short) / (1 - r2_long), 0, 1))
    cf_d = float(np.clip((1 - r2_riesz) / r2_riesz, 0, 1))
    delta = short.theta - long.theta
    var_g, var_riesz = short.sigma2 - long.sigma2, long.nu2 - short.nu2
    denominator = np.sqrt(var_g * var_riesz) if var_g > 0 and var_riesz > 0 else 0.0
    rho = float(np.sign(delta) * np.clip(abs(delta) / denominator, 0, 1)) if denominator > 0 else float(np.sign(delta))
    return Benchmark(name=name, cf_y=cf_y, cf_d=cf_d, rho=rho, delta_theta=float(delta))


def bound_grid(elements, cf_values, rho=1.0, side=None):
    """(len(cf_values), len(cf_values)) bound of the estimate over CF_Y (rows) x CF_D (columns): the lower bound
    when the estimate is positive (the side that moves towards 0), the upper otherwise (``side``: 'low', 'high')."""
    side = side or ("low" if elements.theta >= 0 else "high")
    grid = np.empty((len(cf_values), len(cf_values)))
    for i, cf_y in enumerate(cf_values):
        for j, cf_d in enumerate(cf_values):
            low, high, _, _ = bounds(elements, cf_y, cf_d, rho)
            grid[i, j] = low if side == "low" else high
    return grid


def sensitivity_table(elements, cf_y, cf_d, rho=1.0, alpha=0.05, benchmarks=()):
    """The rows the report and the run record show: the chosen strength, then each benchmark's (at the chosen RHO,
    1 by default: the worst case, as sensemakr's bounds; the benchmark's own rho is reported beside it)."""
    rows = []
    for name, y, d, r in [("chosen (CF_Y, CF_D, RHO)", cf_y, cf_d, rho)] + \
            [(f"as strong as {b.name}", min(b.cf_y, MAX_STRENGTH), min(b.cf_d, MAX_STRENGTH), rho)
             for b in benchmarks]:
        low, high, ci_low, ci_high = bounds(elements, y, d, r, alpha)
        rows.append({"confounder": name, "cf_y": float(y), "cf_d": float(d), "rho": float(r), "low": low,
                     "high": high, "ci_low": ci_low, "ci_high": ci_high})
    return rows


#: Covariates benchmarked one by one at most (each refits the propensity and outcome models once).
MAX_BENCHMARKS = 10


@dataclass
class Sensitivity:
    """The analysis of every contrast of an estimateate run: ``elements`` (SensitivityElements per contrast), the
    chosen strengths, ``rows`` (sensitivity_table per contrast), ``rv`` ((RV, RV_a) per contrast), ``benchmarks``
    (Benchmark per contrast), ``grid`` (CF values) and ``contour`` (bound_grid of the first contrast)."""

    cf_y: float
    cf_d: float
    rho: float
    elements: list
    rows: dict
    rv: dict
    benchmarks: dict
    grid: np.ndarray
    contour: np.ndarray
    warnings: list = field(default_factory=list)

    def record(self):
        """What the run record keeps (JSON-ready)."""
        return {"method": "Chernozhukov, Cinelli, Newey, Sharma & Syrgkanis (2022); econml's sensitivity_interval "
                          "and RV", "cf_y": self.cf_y, "cf_d": self.cf_d, "rho": self.rho,
                "contrasts": {el.contrast: {"theta": el.theta, "sigma2": el.sigma2, "nu2": el.nu2,
                                            "rv": self.rv[el.contrast][0], "rv_a": self.rv[el.contrast][1],
                                            "bounds": self.rows[el.contrast],
                                            "benchmarks": [vars(b) for b in self.benchmarks[el.contrast]]}
                              for el in self.elements}, "warnings": self.warnings}


def analyse(outcome, arms, design, features, covariates, covariate_names, folds, clusters, seed, cf_y=0.03,
            cf_d=0.03, rho=1.0, kept=None, tick=None, is_cancelled=None, n_components=20, estimands=("ATE",),
            penalty_groups=None, small_sample=False):
    """The sensitivity analysis of every AIPW contrast of an arm against the reference (arm levels sorted, the
    first the reference), for each of ``estimands`` ("ATE", "ATT": the effect on the arm's units; the ATE's
    contrasts first, named "1 vs 0", the ATT's "1 vs 0 (ATT)"), with benchmarks: everything the imagery shows, and
    each covariate (the first MAX_BENCHMARKS), each refit without it on the same folds. The nuisance models are
    estimateate's own (core.inputs.propensity_inputs for the propensity, core.inputs.outcome_inputs with
    ``n_components`` for the outcome models), refit here on the same folds, the propensities calibrated to
    balance each refit's outcome inputs when ``design`` calibrates (core.design.StudyDesign.calibrated), so
    theta is its AIPW estimate of the ATE or the ATT (tested). A benchmark's refit balances a subset of the full
    fit's inputs (the same components, fewer columns); whether some weights balance them depends on the inputs
    alone (not on the propensity they start from), so its calibration is reached whenever the full fit's is.
    penalty_groups: the groups the outcome models' penalty cross-validation keeps whole (core.scores.arm_models;
    None: leave-one-out), those of the estimate the analysis describes: estimateate's fold groups, none for
    estimatecate's forest. small_sample: the elements' covariance read on t with G - 1 degrees of freedom over the
    ``clusters`` (contrast_elements), as estimateate's own standard errors are (it passes True)."""
    from .design import CLIP
    from .inputs import outcome_inputs, propensity_inputs
    from .scores import arm_models

    check_strengths(cf_y, cf_d, rho)
    Y = np.asarray(outcome, float)
    kept = np.ones(len(Y), bool) if kept is None else np.asarray(kept, bool)
    penalty_groups = None if penalty_groups is None else np.asarray(penalty_groups).ravel()
    levels, index = np.unique(np.asarray(arms), return_inverse=True)
    k = len(levels)
    names = [f"{levels[a]:g} vs {levels[0]:g}" if np.issubdtype(levels.dtype, np.number) else
             f"{levels[a]} vs {levels[0]}" for a in range(1, k)]

    def elements_with(image, covs):
        covs = covs if covs is not None and covs.size and covs.shape[1] else None
        e, _ = design.propensities(arms, propensity_inputs(image, covs) if image is not None or covs is not None
                                   else None, folds, is_cancelled)
        inputs = outcome_inputs(image, covs, seed, n_components) if image is not None or covs is not None else None
        e, _ = design.calibrated(arms, e, inputs, kept)    # as estimateate's, when its design calibrates
        mu = arm_models(Y[kept], index[kept], k, None if inputs is None else inputs[kept], folds[kept],
                        is_cancelled=is_cancelled, groups=None if penalty_groups is None else penalty_groups[kept])
        e = np.clip(e[kept], CLIP, 1 - CLIP)
        return [contrast_elements(Y[kept], index[kept], mu, e, a, 0, None if clusters is None else clusters[kept],
                                  names[a - 1] + ("" if estimand == "ATE" else f" ({estimand})"), estimand,
                                  small_sample)
                for estimand in estimands for a in range(1, k)]

    long, dropped = [], []
    for el in elements_with(features, covariates):   # a contrast the weights leave undefined is left out, alone
        (long if el.nu2 > 0 and el.sigma2 >= 0 else dropped).append(el)
    if not long:
        bounds(dropped[0], cf_y, cf_d, rho)   # raises, naming the problem and the fix
    warnings = [f"No sensitivity analysis of {el.contrast}: the Riesz representer's variance is not positive "
                f"(nu2 = {el.nu2:.3g}): a few units with extreme weights dominate it. Trim units without overlap "
                "(geocate:estimateate, TRIM: Crump et al.) and run the analysis there." for el in dropped]
    kept_contrasts = {el.contrast for el in long}
    groups = [("everything the imagery shows", None, covariates)]
    if covariates is not None and covariates.size:
        for j, name in enumerate(list(covariate_names)[:MAX_BENCHMARKS]):
            groups.append((f"covariate {name}", features, np.delete(covariates, j, axis=1)))
    benchmarks = {el.contrast: [] for el in long}
    for step, (name, image, covs) in enumerate(groups):
        if is_cancelled is not None and is_cancelled():
            from .errors import Cancelled

            raise Cancelled()
        if tick is not None:
            tick(step / len(groups), f"Sensitivity: benchmark {step + 1} of {len(groups)} ({name})")
        for el, short in zip(long, [e for e in elements_with(image, covs) if e.contrast in kept_contrasts]):
            benchmarks[el.contrast].append(benchmark(name, el, short))
    grid = np.round(np.linspace(0, 0.3, 16), 3)
    return Sensitivity(cf_y=cf_y, cf_d=cf_d, rho=rho, elements=long,
                       rows={el.contrast: sensitivity_table(el, cf_y, cf_d, rho, benchmarks=benchmarks[el.contrast])
                             for el in long},
                       rv={el.contrast: robustness_values(el) for el in long},
                       benchmarks=benchmarks, grid=grid, contour=bound_grid(long[0], grid, rho),
                       warnings=warnings + [w for w in map(unstable_riesz, long) if w])

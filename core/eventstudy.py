"""Staggered adoption: Callaway & Sant'Anna (2021) group-time effects ATT(g,t), doubly robust and cross-fitted.

Units adopt a binary, absorbing treatment at different periods (a cohort g is
the units first treated in period g); some may never adopt. For every cohort g
and period t,

    ATT(g,t) = E[Y_t(g) - Y_t(never) | G = g],

identified under parallel trends conditional on baseline covariates X by the
panel doubly robust DiD of Sant'Anna & Zhao (2020) in its DML form (Chang
2020; DoubleML's DoubleMLDIDMulti with in-sample normalisation):

    ATT(g,t) = E_n[D (R)] / E_n[D] - E_n[w (R)] / E_n[w],   R = (Y_t - Y_b) - m0(X),   w = (1 - D) p(X) / (1 - p(X)),

on the units of cohort g (D = 1) and of the comparison group (D = 0), with
m0(X) = E[Y_t - Y_b | X, comparison] (the outcome regression) and
p(X) = P(G = g | X, G = g or comparison) (the propensity), both cross-fitted
with folds that keep each unit whole (core.crossfit.location_folds).

Choices, each as in CS's ``did`` (R) and DoubleML 0.11's DoubleMLDIDMulti
(``gt_combinations="standard"``) unless said:

* Base period b: 'varying' before adoption (b = t - 1: the placebo effects are
  period-to-period changes) and universal after it (b = g - 1 - anticipation).
  With anticipation > 0, DoubleML 0.11 takes b = t - 1 - anticipation before
  adoption; here b = t - 1, as ``did`` does. Event time e = t - g counts periods.
* Comparison group: "never" (never-treated units) or "not_yet": never-treated
  units and units first treated after t + anticipation (other than cohort g),
  as in ``did`` and DoubleML 0.11 (DoubleML's development version uses
  max(t, g) + anticipation before adoption).
* Covariates: each unit's values in its first period (baseline, before any
  kept unit's treatment), so the model is conditional parallel trends given
  pre-treatment X; a covariate that changes over time is noted (DoubleML and
  ``did`` take each cell's base period: the same for time-invariant
  covariates).
* Propensities: one multinomial logistic regression of the cohort (classes:
  every cohort and never-treated) on the standardised covariates, L2 penalty by
  cross-validated log-loss (core.design's model), cross-fitted; a cell's
  P(G = g | X, G in {g} or comparison) is P_g / (P_g + sum of the comparison
  classes' P), which is again a logistic model, and is clipped to [0.01, 0.99].
  DoubleML fits a binary classifier per cell instead: both are correct when the
  multinomial model is.
* Outcome regression ("spline ridge", the default): least squares, then the
  project's spline ridge (core.scores.outcome_model) on its residuals
  (_LinearThenSplines says why); one model per (base, t, comparison group),
  shared by the cohorts that use it. "linear" (least squares) matches
  DoubleML's LinearRegression for the cross-check; "boosting" is core.panel's.
* No covariates: m0 = 0 and p constant, so ATT(g,t) is exactly the 2x2 DiD of
  means and its influence function the usual one; nothing is learnt.
* Panels: balanced. A unit missing a period is dropped (and counted), as
  ``did`` does for panel data; units treated in the first period (no
  pre-treatment period; with anticipation, in the first 1 + anticipation
  periods) are dropped and counted; a unit whose treatment switches off is
  refused (absorbing treatment).

Standard errors come from each unit's influence function (so clustered by
unit: a unit is one row of the panel's wide form). A cell's influence
function is the linearisation of its two normalised (Hajek) means (the
nuisances' estimation is first-order negligible: the score is Neyman
orthogonal and cross-fitted). Every aggregation (event time, cohort, calendar
period, the overall "simple" ATT) is a weighted sum of ATT(g,t) whose
influence function is the weighted sum of the cells' plus, where weights are
cohort shares, the influence of estimating those shares (CS 2021, ``did``'s
``wif``); DoubleML 0.11 treats those weights as fixed. Simultaneous (sup-t)
bands come from a multiplier bootstrap (Rademacher weights) of the aggregated
influence functions, studentised by their analytic SEs; the pre-trend test is
a Wald test of the placebo event-time effects (e < -anticipation) with the
covariance of their influence functions.
"""

import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import GeoCateError
from .scores import linear_score

CONTROLS = ("never", "not_yet")
LEARNERS = ("spline ridge", "boosting", "linear")
#: Cell propensities are clipped to [CLIP, 1 - CLIP] (as core.design and DoubleML's default).
CLIP = 0.01
#: A (g, t) cell needs this many comparison units to be estimated.
MIN_CONTROLS = 2


@dataclass(frozen=True)
class GroupTimeEffect:
    """ATT(g,t) of cohort g (first treated in period g) in period t, against base period ``base_period``.

    event_time: t - g in periods; post: t >= g; share_clipped: share of the cell's units whose propensity was
    clipped to [0.01, 0.99] (0 without covariates)."""

    g: float
    t: float
    event_time: int
    base_period: float
    post: bool
    att: float
    std_err: float
    n_treated: int
    n_control: int
    share_clipped: float = 0.0

    def interval(self, alpha=0.05):
        from .scores import normal_interval

        return normal_interval(self.att, self.std_err, alpha)


@dataclass(frozen=True)
class AggregateEffect:
    """An aggregation of ATT(g,t): ``key`` is the event time e, the cohort g, the calendar period t, or "simple"
    (the overall ATT). ci_*: pointwise normal interval; band_*: simultaneous sup-t band over the aggregation's
    rows (nan where not computed); n_units: treated units whose cells enter it."""

    key: object
    att: float
    std_err: float
    ci_low: float
    ci_high: float
    band_low: float
    band_high: float
    n_units: int


@dataclass(frozen=True)
class PreTrendTest:
    """Joint Wald test that the placebo event-time effects (``event_times``, before adoption and anticipation)
    are all zero: statistic ~ chi-square(df) under parallel pre-trends."""

    statistic: float
    df: int
    p_value: float
    event_times: tuple


@dataclass(frozen=True)
class EventStudy:
    """What event_study returns. overlap (with covariates): the propensity model and its fit (Brier score,
    log-loss), ``share_clipped`` (of all unit-cell pairs) and ``cells_over_5_percent_clipped`` [(g, t, share)];
    notes: caveats (e.g. time-varying covariates); influence: each kept unit's influence function of each
    ATT(g,t) (their SE is sqrt(sum influence^2) / n_units), for further aggregations."""

    group_time: list          # [GroupTimeEffect], estimable cells, by cohort then period
    event_time: list          # [AggregateEffect] keyed by e, with the sup-t band
    cohort: list              # [AggregateEffect] keyed by g: mean of its post-adoption ATT(g,t)
    calendar: list            # [AggregateEffect] keyed by t: post-adoption ATT(g,t) weighted by cohort size
    overall: AggregateEffect  # "simple": post ATT(g,t) weighted by cohort size (the mean over treated unit-periods)
    pre_trend: PreTrendTest
    not_estimable: list       # [(g, t, reason)]
    dropped: dict             # reason -> count (rows for nulls, units otherwise)
    cohorts: dict             # g -> number of units
    n_units: int              # units kept (treated and never treated)
    n_periods: int
    control: str
    anticipation: int
    learner: str              # "none (difference of means)" without covariates
    overlap: dict
    critical_value: float     # the event-time band's sup-t critical value
    notes: tuple = ()
    influence: np.ndarray = field(default=None, repr=False, compare=False)   # (n_units, len(group_time))

    def event(self, e):
        """The event-time row for e (None if absent)."""
        return next((row for row in self.event_time if row.key == e), None)

    def cell(self, g, t):
        """The ATT(g,t) row (None if absent or not estimable)."""
        return next((row for row in self.group_time if row.g == g and row.t == t), None)


def _unit_labels(unit, time, treatment, outcome, covariates):
    """The labels make_panel's unit codes index (the complete rows' units, as strings, sorted)."""
    unit = np.asarray(unit, dtype=object)
    n = len(unit)
    X = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, float).reshape(n, -1)
    complete = ~(np.array([u is None for u in unit], bool) | np.isnan(np.asarray(time, float))
                 | np.isnan(np.asarray(treatment, float)) | np.isnan(np.asarray(outcome, float))
                 | np.isnan(X).any(axis=1))
    return np.unique(np.array([str(u) for u in unit[complete]]))


class _LinearThenSplines:
    """The spline ridge of the outcome regression: least squares on the covariates, then core.scores.outcome_model
    (additive cubic splines under ridge) on its residuals, so the ridge shrinks departures from a linear trend and
    not the trend itself.

    Why: covariates that drive both adoption and trends put the treated units where the comparison units are few
    (the tails), and the plain spline ridge, shrinking the trend, was off there: on this module's bench design
    (N = 1500) it added 0.020 to the standard deviation of the overall ATT around the estimate with the true
    nuisances (whose SD is 0.026), and its interval covered 0.90 over 100 repetitions; least squares first: 0.002
    added, like least squares alone (tests/core/test_eventstudy.py's simulate_staggered, seeds 100-199)."""

    def fit(self, X, y):
        from sklearn.linear_model import LinearRegression

        from .scores import outcome_model

        self.linear = LinearRegression().fit(X, y) if len(y) > 10 * (X.shape[1] + 1) else None
        residual = y if self.linear is None else y - self.linear.predict(X)
        self.splines = outcome_model().fit(X, residual)
        return self

    def predict(self, X):
        return self.splines.predict(X) + (0.0 if self.linear is None else self.linear.predict(X))


def _outcome_learner(learner, seed):
    if learner == "linear":
        from sklearn.linear_model import LinearRegression

        return LinearRegression()
    if learner == "boosting":
        from .panel import _learner

        return _learner("boosting", seed)
    return _LinearThenSplines()


def _outcome_predictions(target, X, controls, folds, learner, seed):
    """(n,) out-of-fold E[target | X, comparison]: fit on the comparison units of the other folds, predicted for
    every unit of the fold; the training units' mean where they are fewer than MIN_UNITS_FOR_MODEL."""
    from .crossfit import crossfit
    from .scores import MIN_UNITS_FOR_MODEL

    def fit_predict(train, test):
        train = controls & train
        if not train.any():                          # every comparison unit in this fold: no out-of-fold model
            train = controls
        if train.sum() < MIN_UNITS_FOR_MODEL:
            return np.full(int(test.sum()), target[train].mean())
        return _outcome_learner(learner, seed).fit(X[train], target[train]).predict(X[test])

    return crossfit(fit_predict, folds)


def _propensities(cohort, X, folds):
    """(n, K) cross-fitted P(cohort class k | X), K = number of classes (cohort codes 0..K-1), and a fit report.

    core.design's model (standardised inputs, multinomial logistic regression, L2 penalty chosen from
    core.design.PENALTIES by 3-fold cross-validated log-loss; C = 1 in a fold where a cohort has fewer than 6
    training units). A class absent from a fold's training units gets probability 0 there (its cells' propensities
    are then clipped)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .crossfit import crossfit
    from .design import calibration, penalised_logistic

    k = int(cohort.max()) + 1

    def fit_predict(train, test):
        probabilities = np.zeros((int(test.sum()), k))
        present = np.unique(cohort[train])
        if len(present) < 2:
            probabilities[:, present] = 1.0
            return probabilities
        if np.bincount(cohort[train])[present].min() >= 6:
            model = penalised_logistic()
        else:   # a cohort too small for 3 inner folds (one would miss it): scikit-learn's default penalty
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # small classes: fewer members than the 3 inner folds
            model.fit(X[train], cohort[train])
        probabilities[:, model.classes_] = model.predict_proba(X[test])
        return probabilities

    probabilities = crossfit(fit_predict, folds)
    report = calibration(cohort, probabilities)
    return probabilities, {"model": "multinomial logistic regression of the cohort (L2, penalty by "
                                    "cross-validated log-loss), cross-fitted", **report}


def _cell_estimate(dY, treated, controls, m0=None, p=None):
    """ATT, per-unit influence function (length n, zero outside the cell) and the number of clipped propensities
    of one cell: the normalised DR-DiD (m0 = 0 and p constant without covariates: the difference of means)."""
    n = len(dY)
    R = dY if m0 is None else dY - m0
    if p is None:
        w = np.ones(controls.sum())
        clipped = 0
    else:
        pc = p[controls]
        clipped = int(np.sum((p[treated | controls] < CLIP) | (p[treated | controls] > 1 - CLIP)))
        pc = np.clip(pc, CLIP, 1 - CLIP)
        w = pc / (1 - pc)
    # Two linear scores (core.scores.linear_score): the treated mean of R, and the controls' mean weighted by
    # p / (1 - p); the influence is theirs, n times the mean's scale (did's convention).
    weight = np.zeros(n)
    weight[controls] = w
    treated_mean = linear_score(-treated.astype(float), np.where(treated, R, 0.0))
    control_mean = linear_score(-weight, np.where(controls, weight * np.where(controls, R, 0.0), 0.0))
    return (float(treated_mean.estimate - control_mean.estimate), treated_mean.influence - control_mean.influence,
            clipped)


def _aggregate(att, influence, keepers, weights, share_influence=None):
    """Estimate and influence function of sum_k weights_k ATT_k over ``keepers``; share_influence: (n, k) influence
    of estimating the weights (added as wif @ att, CS's ``get_agg_inf_func``)."""
    estimate = float(np.dot(weights, att[keepers]))
    inf = influence[:, keepers] @ weights
    if share_influence is not None:
        inf = inf + share_influence @ att[keepers]
    return estimate, inf


def _share_weights(keepers, cell_cohort, cohort_of_unit, share):
    """Cohort-size weights pg_k / sum pg over the ``keepers`` cells and the influence of estimating them (``did``'s
    ``wif``: numerator and denominator of P(G = g) / sum P(G = g'))."""
    pg = share[cell_cohort[keepers]]
    total = pg.sum()
    indicator = (cohort_of_unit[:, None] == cell_cohort[keepers][None, :]) - pg[None, :]
    wif = indicator / total - indicator.sum(axis=1, keepdims=True) * pg[None, :] / total ** 2
    return pg / total, wif


def _sup_t(influences, std_errs, n, n_boot, alpha, rng):
    """The (1 - alpha) quantile of max_j |bootstrap t_j| over the columns of ``influences`` (n, J): Rademacher
    multipliers on each unit's influence function."""
    ok = np.isfinite(std_errs) & (std_errs > 0)
    if n_boot < 1 or not ok.any():
        return float("nan")
    scaled = influences[:, ok] / (n * std_errs[ok])
    maxima = np.empty(n_boot)
    for start in range(0, n_boot, 200):
        b = min(200, n_boot - start)
        V = rng.integers(0, 2, size=(b, n)) * 2.0 - 1.0
        maxima[start:start + b] = np.abs(V @ scaled).max(axis=1)
    return float(np.quantile(maxima, 1 - alpha))


def _rows(keys, estimates, std_errs, n_units, crit, alpha):
    from .scores import normal_interval, zero_noise

    rows = []
    for key, est, se, m in zip(keys, estimates, std_errs, n_units):
        low, high = normal_interval(est, se, alpha)
        band = (est - crit * se, est + crit * se) if np.isfinite(crit) else (float("nan"), float("nan"))
        rows.append(AggregateEffect(key=key, att=zero_noise(est), std_err=zero_noise(se), ci_low=float(low),
                                    ci_high=float(high), band_low=float(band[0]), band_high=float(band[1]),
                                    n_units=int(m)))
    return rows


def event_study(unit, time, treatment, outcome, covariates=None, covariate_names=(), control="never",
                anticipation=0, n_folds=5, seed=42, n_boot=999, learner="spline ridge", progress=None,
                is_cancelled=None, alpha=0.05, unit_name="unit", time_name="time", treatment_name="treatment",
                outcome_name="outcome"):
    """Group-time ATT(g,t) of a staggered, absorbing binary treatment and their aggregations, an EventStudy.

    Long format: one row per unit and period; treatment 0 before a unit's first treated period and 1 from it on.
    covariates: (n, p) baseline covariates (each unit's first-period values are used). control: "never" (never
    treated units) or "not_yet" (also units not yet treated by t + anticipation). anticipation: periods before
    adoption in which units may already react. learner: the outcome regression ("spline ridge", "boosting",
    "linear"); unused without covariates. progress(fraction, message), is_cancelled(): callbacks; a cancel
    raises core.errors.Cancelled.
    """
    from .crossfit import location_folds
    from .panel import make_panel
    from .progress import Throttle
    from .scores import zero_noise

    if control not in CONTROLS:
        raise GeoCateError(f"Unknown comparison group '{control}'.",
                           "Choose 'never' (never-treated units) or 'not_yet' (not-yet-treated units too).")
    if learner not in LEARNERS:
        raise GeoCateError(f"Unknown learner '{learner}'.", f"Choose one of {', '.join(LEARNERS)}.")
    if int(anticipation) != anticipation or anticipation < 0:
        raise GeoCateError(f"Anticipation must be a whole number of periods, 0 or more (got {anticipation}).",
                           "Give 0 unless units react before they are treated.")
    anticipation = int(anticipation)
    throttle = Throttle(progress, is_cancelled, interval=0.0)
    throttle.tick(0.0, "Checking the panel")

    panel = make_panel(unit, time, treatment, outcome, covariates, covariate_names, unit_name=unit_name,
                       time_name=time_name, treatment_name=treatment_name, outcome_name=outcome_name)
    codes, T_all, D, Y, X = panel.unit, panel.time, panel.treatment, panel.outcome, panel.covariates
    values = np.unique(D)
    if not np.all(np.isin(values, (0.0, 1.0))):
        other = values[~np.isin(values, (0.0, 1.0))][0]
        raise GeoCateError(f"The treatment '{treatment_name}' takes values other than 0 and 1 (e.g. {other:g}): an "
                           "event study needs a binary treatment.",
                           f"Code '{treatment_name}' 1 from the period a {unit_name} is first treated on and 0 "
                           "before (e.g. \"year\" >= \"first_year\" in the Field Calculator).")
    same_unit = codes[1:] == codes[:-1]
    switch_off = same_unit & (D[1:] < D[:-1])
    if switch_off.any():
        labels = _unit_labels(unit, time, treatment, outcome, covariates)
        first = int(np.flatnonzero(switch_off)[0])
        n_off = len(np.unique(codes[1:][switch_off]))
        raise GeoCateError(f"The treatment of {unit_name} '{labels[codes[first]]}' switches off ({time_name} "
                           f"{T_all[first]:g}: 1, {T_all[first + 1]:g}: 0; {n_off} {unit_name}(s) in all): the event "
                           "study assumes a unit stays treated once treated (staggered, absorbing adoption).",
                           f"Check the treatment field; if treatment does stop, code it 1 from the first treated "
                           f"period on (an intention-to-treat event study), or drop the {unit_name}s that stop.")
    dropped = {"a value is null (rows)": panel.dropped["a value is null"]}

    # Balanced panel: a unit missing a period is dropped (the DR-DiD needs Y in both periods of every cell).
    periods = np.unique(T_all)
    n_periods = len(periods)
    counts = np.bincount(codes)
    complete = counts == n_periods
    dropped["observed in only some periods (units)"] = int((~complete).sum())
    if not complete.any():
        raise GeoCateError(f"No {unit_name} is observed in all {n_periods} periods of '{time_name}': the event study "
                           "needs a balanced panel.",
                           f"Keep the periods most {unit_name}s share (e.g. filter '{time_name}'), or fill the "
                           "missing rows.")
    keep_rows = complete[codes]
    N0 = int(complete.sum())
    Yw = Y[keep_rows].reshape(N0, n_periods)
    Dw = D[keep_rows].reshape(N0, n_periods)
    Xw = X[keep_rows].reshape(N0, n_periods, -1)
    notes = []
    if Xw.shape[2] and np.ptp(Xw, axis=1).max() > 0:
        notes.append("Some covariates change over time: each unit's first-period values are used (baseline).")
    Xu = Xw[:, 0, :]
    first_treated = np.where(Dw.any(axis=1), Dw.argmax(axis=1), n_periods)   # period index; n_periods: never
    too_early = first_treated <= anticipation
    dropped["treated from the first period, no pre-treatment period (units)"] = int(too_early.sum())
    kept = ~too_early
    Yw, Xu, first_treated = Yw[kept], Xu[kept], first_treated[kept]
    N = len(first_treated)
    cohorts = np.unique(first_treated[first_treated < n_periods])
    never = first_treated == n_periods
    if not len(cohorts):
        raise GeoCateError(f"No {unit_name} is first treated after the first period"
                           f"{' (and the anticipation periods)' if anticipation else ''}: there is no "
                           "pre-treatment period to compare with.",
                           "An event study needs units that adopt treatment during the panel.")
    if control == "never" and not never.any():
        raise GeoCateError(f"No {unit_name} is never treated, so the never-treated comparison group is empty.",
                           "Use the not-yet-treated comparison group (control='not_yet').")
    if control == "not_yet" and not never.any() and len(cohorts) == 1:
        raise GeoCateError(f"Every treated {unit_name} adopts in the same period ({periods[cohorts[0]]:g}) and none "
                           "is left untreated: there is no comparison group.",
                           f"Add {unit_name}s that are never treated or that adopt later.")
    if N < n_folds:
        raise GeoCateError(f"Only {N} {unit_name}s are left: too few for {n_folds}-fold cross-fitting by unit.",
                           f"Use more {unit_name}s or fewer folds.")
    throttle.tick(0.05, "Fitting the propensity model")

    # Cells: (g, t) for every cohort and period after the first; base t - 1 before adoption, g - 1 - anticipation after.
    cells, not_estimable = [], []
    never_code = (n_periods,) if never.any() else ()
    for g in cohorts:
        for t in range(1, n_periods):
            post = t >= g
            base = g - 1 - anticipation if post else t - 1
            if control == "never":
                comparison = never_code
            else:
                comparison = never_code + tuple(int(c) for c in cohorts if c > t + anticipation and c != g)
            n_control = int(np.isin(first_treated, comparison).sum())
            if n_control < MIN_CONTROLS:
                reason = ("no not-yet-treated or never-treated unit is left" if n_control == 0 else
                          f"only {n_control} comparison unit(s)")
                not_estimable.append((float(periods[g]), float(periods[t]), reason))
                continue
            cells.append((int(g), int(t), int(base), bool(post), comparison))
    if not cells:
        raise GeoCateError("No cohort and period has comparison units: no ATT(g,t) can be estimated.",
                           f"Add {unit_name}s that are never treated or that adopt later.")

    folds = location_folds(np.arange(N), n_folds, seed)
    has_x = Xu.shape[1] > 0
    overlap = {"clip": [CLIP, 1 - CLIP]}
    if has_x:
        classes = np.unique(first_treated)
        class_of = np.searchsorted(classes, first_treated)
        P, report = _propensities(class_of, Xu, folds)
        overlap.update(report)
    throttle.tick(0.1, "Estimating ATT(g,t)")

    K = len(cells)
    att = np.empty(K)
    influence = np.empty((N, K))
    group_time, clipped_total, pairs_total, flagged = [], 0, 0, []
    outcome_cache = {}
    for k, (g, t, base, post, comparison) in enumerate(cells):
        throttle.tick(0.1 + 0.8 * k / K, f"ATT(g={periods[g]:g}, t={periods[t]:g})")
        treated = first_treated == g
        controls = np.isin(first_treated, comparison)
        dY = Yw[:, t] - Yw[:, base]
        if has_x:
            key = (base, t, comparison)
            if key not in outcome_cache:
                outcome_cache[key] = _outcome_predictions(dY, Xu, controls, folds, learner, seed)
            Pg = P[:, np.searchsorted(classes, g)]
            Pc = P[:, np.searchsorted(classes, comparison)].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                p = np.where(Pg + Pc > 0, Pg / (Pg + Pc), 0.5)
            att[k], influence[:, k], clipped = _cell_estimate(dY, treated, controls, outcome_cache[key], p)
        else:
            att[k], influence[:, k], clipped = _cell_estimate(dY, treated, controls)
        n_t, n_c = int(treated.sum()), int(controls.sum())
        clipped_share = clipped / (n_t + n_c)
        clipped_total += clipped
        pairs_total += n_t + n_c
        if clipped_share > 0.05:
            flagged.append((float(periods[g]), float(periods[t]), round(clipped_share, 3)))
        se = float(np.sqrt(np.sum(influence[:, k] ** 2)) / N)
        group_time.append(GroupTimeEffect(g=float(periods[g]), t=float(periods[t]), event_time=int(t - g),
                                          base_period=float(periods[base]), post=post, att=zero_noise(att[k]),
                                          std_err=zero_noise(se), n_treated=n_t, n_control=n_c,
                                          share_clipped=float(clipped_share)))
    overlap["share_clipped"] = float(clipped_total / pairs_total) if has_x else 0.0
    overlap["cells_over_5_percent_clipped"] = flagged
    throttle.tick(0.9, "Aggregating")

    # Aggregations. Cohort shares P(G = g) over all kept units (never-treated included), as in ``did``.
    cell_g = np.array([c[0] for c in cells])
    cell_t = np.array([c[1] for c in cells])
    cell_e = cell_t - cell_g
    cell_post = np.array([c[3] for c in cells])
    share = np.bincount(first_treated, minlength=n_periods + 1) / N
    size = np.bincount(first_treated, minlength=n_periods + 1)

    def weighted(keepers):
        w, wif = _share_weights(keepers, cell_g, first_treated, share)
        return _aggregate(att, influence, keepers, w, wif)

    families = {}
    event_keys = np.unique(cell_e)
    families["event"] = [(int(e), *weighted(np.flatnonzero(cell_e == e)),
                          int(size[np.unique(cell_g[cell_e == e])].sum())) for e in event_keys]
    cohort_rows = []
    for g in np.unique(cell_g[cell_post]):
        keepers = np.flatnonzero(cell_post & (cell_g == g))
        estimate, inf = _aggregate(att, influence, keepers, np.full(len(keepers), 1 / len(keepers)))
        cohort_rows.append((float(periods[g]), estimate, inf, int(size[g])))
    families["cohort"] = cohort_rows
    families["calendar"] = [(float(periods[t]), *weighted(np.flatnonzero(cell_post & (cell_t == t))),
                             int(size[np.unique(cell_g[cell_post & (cell_t == t)])].sum()))
                            for t in np.unique(cell_t[cell_post])]
    rng = np.random.default_rng(seed)
    results, critical = {}, {}
    for name, rows in families.items():
        if not rows:
            results[name] = []
            continue
        inf = np.column_stack([r[2] for r in rows])
        se = np.sqrt(np.sum(inf ** 2, axis=0)) / N
        critical[name] = _sup_t(inf, se, N, n_boot, alpha, rng)
        results[name] = _rows([r[0] for r in rows], [r[1] for r in rows], se, [r[3] for r in rows],
                              critical[name], alpha)
        if name == "event":
            event_inf, event_se = inf, se
    post_cells = np.flatnonzero(cell_post)
    if len(post_cells):
        estimate, inf = weighted(post_cells)
        se = float(np.sqrt(np.sum(inf ** 2)) / N)
        overall = _rows(["simple"], [estimate], [se], [int(size[np.unique(cell_g[post_cells])].sum())],
                        float("nan"), alpha)[0]
    else:
        overall = _rows(["simple"], [float("nan")], [float("nan")], [0], float("nan"), alpha)[0]

    # Joint pre-trend test of the placebo event-time effects (before adoption and the anticipation window).
    placebo = np.flatnonzero((event_keys < -anticipation) & np.isfinite(event_se) & (event_se > 0))
    if len(placebo):
        from scipy.stats import chi2

        theta = np.array([families["event"][j][1] for j in placebo])
        cov = event_inf[:, placebo].T @ event_inf[:, placebo] / N ** 2
        rank = int(np.linalg.matrix_rank(cov))
        statistic = float(theta @ np.linalg.pinv(cov) @ theta)
        pre_trend = PreTrendTest(statistic=statistic, df=rank, p_value=float(chi2.sf(statistic, rank)),
                                 event_times=tuple(int(e) for e in event_keys[placebo]))
    else:
        pre_trend = PreTrendTest(statistic=float("nan"), df=0, p_value=float("nan"), event_times=())
    throttle.tick(1.0, "Done")
    return EventStudy(group_time=group_time, event_time=results["event"], cohort=results["cohort"],
                      calendar=results["calendar"], overall=overall, pre_trend=pre_trend,
                      not_estimable=not_estimable, dropped=dropped,
                      cohorts={float(periods[g]): int(size[g]) for g in cohorts}, n_units=N, n_periods=n_periods,
                      control=control, anticipation=anticipation,
                      learner=learner if has_x else "none (difference of means)", overlap=overlap,
                      critical_value=critical.get("event", float("nan")), notes=tuple(notes), influence=influence)

"""Panels: double machine learning for units observed over time, with unit fixed effects.

The partially linear panel model of Clarke & Polselli (Econometrics Journal
2026; also Fuhr & Papies on DML with panel data):

    Y_it = theta D_it + g(X_it) + alpha_i + U_it,    D_it = m(X_it) + gamma_i + V_it,

with alpha_i and gamma_i unobserved and correlated with X. Three ways to
remove them, each followed by DML partialling-out (theta from the residuals
of Y and D on the nuisance inputs, cross-fitted with folds that keep each
unit's periods together, a standard error clustered by unit):

* ``mundlak`` (correlated random effects): the nuisance models also see the
  unit means of X and of D;
* ``within`` (the within-group approximation): Y, D and X demeaned by unit;
  exact for linear g and m only;
* ``first_difference``: Delta Y and Delta D learnt from X_it and X_i,t-1,
  additively across the two periods (the model implies it; boosting is
  constrained so: 0.057 off theta on the discontinuous design over 14
  repetitions, docs/benchmarks.md).

``pooled`` ignores alpha_i (a plain cross-sectional DML): the pitfall, kept
for comparison. Written here on GeoCATE's cross-fitting rather than taken
from DoubleML 0.11 (``DoubleMLPLPR``), which requires numpy 2, which QGIS's
GDAL bindings on Debian 12 cannot load; it could replace this once they can.
"""

from dataclasses import dataclass

import numpy as np

from .errors import GeoCateError
from .estimate import Estimator
from .scores import linear_score, normal_interval

APPROACHES = ("mundlak", "within", "first_difference")
LEARNERS = ("spline ridge", "boosting")


@dataclass(frozen=True)
class PanelEstimate:
    approach: str
    theta: float
    std_err: float
    n_units: int
    n_obs: int
    by_period: list   # [(period, theta_t, std_err_t, n_t)]
    units_observed_once: int = 0   # dropped by within and first_difference
    not_estimable: list = ()   # [(period, reason)]: periods without treated and untreated rows
    time_effects: bool = True

    def interval(self, alpha=0.05):
        return normal_interval(self.theta, self.std_err, alpha)


@dataclass(frozen=True)
class Panel:
    """A checked long-format panel, sorted by unit then time."""

    unit: np.ndarray      # (n,) int codes
    time: np.ndarray      # (n,) float
    treatment: np.ndarray
    outcome: np.ndarray
    covariates: np.ndarray   # (n, p)
    covariate_names: tuple
    dropped: dict


def check_panel_variation(codes, D, Y, unit_name, treatment_name, outcome_name, n_null, n_rows):
    """Refuse a panel from which no effect with unit fixed effects can be learnt, naming the reason and the fix."""
    if not len(D):
        raise GeoCateError(f"Every one of the {n_rows} rows has a null in the unit, time, treatment, outcome or a "
                           "covariate: nothing is left to estimate from.",
                           "Check the fields chosen (a field that is null throughout, e.g. an empty column).")
    if np.ptp(D) == 0:
        raise GeoCateError(f"The treatment '{treatment_name}' has the same value in every row: no effect can be "
                           "estimated.", "Check the treatment field.")
    if np.ptp(Y) == 0:
        raise GeoCateError(f"The outcome '{outcome_name}' has the same value in every row: there is nothing to "
                           "explain.", "Check the outcome field.")
    if np.array_equal(D, Y) or abs(np.corrcoef(D, Y)[0, 1]) > 1 - 1e-12:
        raise GeoCateError(f"The outcome '{outcome_name}' is the treatment '{treatment_name}' (or an exact linear "
                           "function of it): the 'effect' would only restate that.",
                           "Choose the outcome field and the treatment field separately.")
    counts = np.bincount(codes)
    if counts.max() < 2:
        raise GeoCateError(f"Every {unit_name} is observed in one period only: with unit fixed effects, a unit seen "
                           "once carries no change over time.",
                           f"Check the unit field ('{unit_name}' must repeat across periods, e.g. a village id), "
                           "or use estimatecate for a cross-section.")
    centred = D - (np.bincount(codes, D) / counts)[codes]
    if np.abs(centred).max() < 1e-12:
        raise GeoCateError(f"The treatment '{treatment_name}' never changes within a {unit_name}: unit fixed effects "
                           "absorb it and no effect can be estimated from within-unit variation.",
                           "Panels estimate effects of treatments that change over time; for a treatment fixed per "
                           "unit, use estimatecate (or estimateate) on one period.")


def make_panel(unit, time, treatment, outcome, covariates=None, covariate_names=(), unit_name="unit",
               time_name="time", treatment_name="treatment", outcome_name="outcome"):
    """Check and sort a long-format panel. Refused with the fix: a duplicated (unit, time), a time that is not a
    number, a treatment that never varies. Rows with a null are dropped and counted."""
    unit = np.asarray(unit, dtype=object)
    n = len(unit)
    try:
        time = np.asarray(time, dtype=float)
    except (TypeError, ValueError):
        raise GeoCateError(f"The time field '{time_name}' is not a number or a date.",
                           "Choose a numeric year or a date field (e.g. to_int(\"year\") in the Field Calculator)."
                           ) from None
    D, Y = np.asarray(treatment, float), np.asarray(outcome, float)
    X = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, float).reshape(n, -1)
    null_unit = np.array([u is None for u in unit], bool)
    complete = ~(null_unit | np.isnan(time) | np.isnan(D) | np.isnan(Y) | np.isnan(X).any(axis=1))
    dropped = {"a value is null": int((~complete).sum())}
    unit, time, D, Y, X = unit[complete], time[complete], D[complete], Y[complete], X[complete]
    codes = np.unique(np.array([str(u) for u in unit]), return_inverse=True)[1].ravel()
    order = np.lexsort((time, codes))
    codes, time, D, Y, X = codes[order], time[order], D[order], Y[order], X[order]
    same = (np.diff(codes) == 0) & (np.diff(time) == 0)
    if same.any():
        first = int(np.flatnonzero(same)[0])
        label = np.unique(np.array([str(u) for u in unit]))[codes[first]]
        raise GeoCateError(f"Unit '{label}' has two rows for {time_name} = {time[first]:g} (and {int(same.sum())} "
                           "such duplicate(s) in all).",
                           f"Keep one row per {unit_name} and {time_name} (aggregate or remove the duplicates).")
    check_panel_variation(codes, D, Y, unit_name, treatment_name, outcome_name, dropped["a value is null"], n)
    return Panel(unit=codes, time=time, treatment=D, outcome=Y, covariates=X,
                 covariate_names=tuple(covariate_names), dropped=dropped)


def _learner(kind, seed, periods=None):
    """A nuisance learner. periods: for first differences, the input columns of each period ([X_it columns],
    [X_i,t-1 columns]); the model implies E[Delta Y | X_it, X_i,t-1] = f(X_it) - f(X_i,t-1) (and so for
    Delta D), additive across the two periods, so boosting is kept from interacting columns of different
    periods (the spline ridge is additive in every column already)."""
    if kind == "boosting":
        from sklearn.ensemble import HistGradientBoostingRegressor

        # Deep enough for interactions and jumps (Clarke-Polselli's discontinuous design), stopped early on a
        # held-out tenth: with 31 leaves and no early stop first differences stayed 0.07 off theta; without
        # the constraint across periods, 0.063 off (docs/benchmarks.md).
        return HistGradientBoostingRegressor(max_iter=2000, learning_rate=0.1, max_leaf_nodes=63,
                                             min_samples_leaf=20, early_stopping=True, n_iter_no_change=30,
                                             interaction_cst=periods, random_state=seed)
    from .scores import outcome_model

    return outcome_model()


class PeriodEffects:
    """A nuisance learner with additive period effects: E[y | x, t] = f(x) + delta_t, fitted by backfitting
    (delta_t the period mean of y - f(x), f refitted on y - delta_t), so any learner (the spline ridge, which is
    additive in its columns, or boosting) absorbs year shocks without learning them from the covariates."""

    def __init__(self, make, max_iterations=30, tolerance=1e-3):
        self.make, self.max_iterations, self.tolerance = make, max_iterations, tolerance

    def fit(self, inputs, y, period):
        """Backfitting until the period effects move by less than ``tolerance`` of y's standard deviation (slow
        when the covariates trend with time: a covariate correlated 0.95 with the period needs about 30 rounds;
        4 fixed rounds left a linear effect at a third of its value)."""
        self.periods_ = np.unique(period)
        index = np.searchsorted(self.periods_, period)
        counts = np.bincount(index, None, len(self.periods_))
        delta = np.bincount(index, y, len(self.periods_)) / np.maximum(counts, 1)
        delta -= delta.mean()
        scale = self.tolerance * (float(np.std(y)) or 1.0)
        self.n_iterations_ = 0
        for _ in range(self.max_iterations):
            self.model_ = self.make().fit(inputs, y - delta[index])
            rest = y - self.model_.predict(inputs)
            updated = np.bincount(index, rest, len(self.periods_)) / np.maximum(counts, 1)
            moved = float(np.max(np.abs(updated - delta)))
            delta = updated
            self.n_iterations_ += 1
            if moved < scale:
                break
        self.delta_ = delta
        return self

    def predict(self, inputs, period):
        index = np.clip(np.searchsorted(self.periods_, period), 0, len(self.periods_) - 1)
        known = self.periods_[index] == period
        return self.model_.predict(inputs) + np.where(known, self.delta_[index], 0.0)


def _two_way_demean(values, unit, period, n_iterations=50, tolerance=1e-10):
    """values less their unit and period means (alternating projections: exact in one pass for a balanced
    panel, converging for an unbalanced one)."""
    out = np.asarray(values, float).copy()
    period_codes = np.unique(period, return_inverse=True)[1].ravel()
    for _ in range(n_iterations):
        before = out.copy()
        out -= _unit_means(out, unit)
        out -= _unit_means(out, period_codes)
        if np.max(np.abs(out - before)) < tolerance * (1 + np.max(np.abs(out))):
            break
    return out


def _unit_means(values, unit):
    sums = np.zeros((unit.max() + 1,) + values.shape[1:])
    np.add.at(sums, unit, values)
    counts = np.bincount(unit, minlength=unit.max() + 1).reshape((-1,) + (1,) * (values.ndim - 1))
    return (sums / counts)[unit]


def _partial_out(y, d, inputs, unit, folds, learner, seed, periods=None, period=None):
    """theta and its unit-clustered SE from cross-fitted residuals (DML partialling-out), and the residuals.
    period: (n,) the period of each row, whose effects the nuisance models absorb (PeriodEffects), or None."""
    from .crossfit import crossfit

    def residuals(train, test):
        out = []
        for target in (y, d):
            if period is None:
                fitted = _learner(learner, seed, periods).fit(inputs[train], target[train])
                out.append(target[test] - fitted.predict(inputs[test]))
            else:
                fitted = PeriodEffects(lambda: _learner(learner, seed, periods)).fit(
                    inputs[train], target[train], period[train])
                out.append(target[test] - fitted.predict(inputs[test], period[test]))
        return tuple(out)

    ry, rd = crossfit(residuals, folds)
    theta, se = _theta(ry, rd, unit)
    return theta, se, ry, rd


def _theta(ry, rd, unit):
    denominator = float(np.sum(rd * rd))
    if denominator <= 0:
        raise GeoCateError("The treatment has no variation left once the fixed effects and covariates are removed.",
                           "theta is not identified: the treatment must vary within units over time.")
    partialling_out = linear_score(-rd * rd, ry * rd, unit)   # core.scores' linear score, clustered by unit
    return float(partialling_out.estimate), float(partialling_out.std_err)


class PanelDML(Estimator):
    """A panel's theta by one ``approach`` (panel_effect) as core.estimate's object: ``fit(panel)``, then
    ``ate()`` / ``ate_se()`` / ``ate_interval()`` (theta, its unit-clustered SE), ``estimate_`` the whole
    PanelEstimate (per period, units observed once, periods not estimable). theta is one effect for every unit:
    no per-unit effect is claimed."""

    name = "panel double machine learning"

    def __init__(self, approach="mundlak", learner="spline ridge", n_folds=5, seed=42, time_effects=True):
        self.approach, self.learner, self.n_folds = approach, learner, n_folds
        self.seed, self.time_effects = seed, time_effects

    def fit(self, panel):
        self.estimate_ = panel_effect(panel, self.approach, self.learner, self.n_folds, self.seed, self.time_effects)
        return self

    def ate(self):
        return self.estimate_.theta

    def ate_se(self):
        return self.estimate_.std_err


def panel_effect(panel, approach="mundlak", learner="spline ridge", n_folds=5, seed=42, time_effects=True):
    """theta by ``approach`` (mundlak, within, first_difference, or pooled), a PanelEstimate.

    time_effects (default): the nuisance models absorb period effects (year shocks common to every unit):
    additive period effects in the learners of Mundlak and pooled (PeriodEffects), two-way demeaning (unit and
    period) for within, period intercepts in first differences. Without them, shocks that move the treatment
    and the outcome together bias theta (0.91 for 0.5 on the bench's design)."""
    from .crossfit import location_folds

    if approach not in APPROACHES + ("pooled",):
        raise GeoCateError(f"Unknown approach '{approach}'.", f"Choose one of {', '.join(APPROACHES)}.")
    unit, time, D, Y, X = panel.unit, panel.time, panel.treatment, panel.outcome, panel.covariates
    counts = np.bincount(unit)
    once = int((counts == 1).sum()) if approach in ("within", "first_difference") else 0
    if approach in ("within", "first_difference"):
        keep = counts[unit] >= 2
        unit, time, D, Y, X = unit[keep], time[keep], D[keep], Y[keep], X[keep]
        within_d = D - _unit_means(D, unit)
        if not np.any(np.abs(within_d) > 1e-12):
            raise GeoCateError("The treatment never varies within any unit over time: the within-group and "
                               "first-difference approaches cannot identify its effect.",
                               "Use the Mundlak approach, or a treatment that changes over time.")
    periods = None
    period = time if time_effects else None
    if approach == "mundlak":
        inputs = np.column_stack([X, _unit_means(X, unit), _unit_means(D, unit)])
        y, d = Y, D
    elif approach == "within":
        if time_effects:   # two-way demeaning: the period effects go with the unit effects
            inputs = _two_way_demean(X, unit, time) if X.shape[1] else np.zeros((len(Y), 1))
            y, d = _two_way_demean(Y, unit, time), _two_way_demean(D, unit, time)
            period = None
        else:
            inputs = X - _unit_means(X, unit) if X.shape[1] else np.zeros((len(Y), 1))
            y, d = Y - _unit_means(Y, unit), D - _unit_means(D, unit)
    elif approach == "first_difference":
        nxt = np.flatnonzero(unit[1:] == unit[:-1]) + 1       # rows with a previous period of the same unit
        inputs = np.column_stack([X[nxt], X[nxt - 1]])
        p = X.shape[1]
        periods = [list(range(p)), list(range(p, 2 * p))] if p else None
        y, d = Y[nxt] - Y[nxt - 1], D[nxt] - D[nxt - 1]
        D_level = D[nxt]
        unit, time = unit[nxt], time[nxt]
        period = time if time_effects else None   # the change of a period effect: an intercept per period
    else:
        inputs, y, d = X, Y, D
    if inputs.shape[1] == 0:
        inputs = np.zeros((len(y), 1))
    units = np.unique(unit)
    if len(units) < n_folds:
        raise GeoCateError(f"Only {len(units)} units: too few for {n_folds}-fold cross-fitting by unit.",
                           "Use more units.")
    folds = location_folds(unit, n_folds, seed)
    theta, se, ry, rd = _partial_out(y, d, inputs, unit, folds, learner, seed, periods, period)
    levels = D_level if approach == "first_difference" else D   # the treatment's level in each row used
    by_period, not_estimable = [], []
    binary = np.isin(levels, (0.0, 1.0)).all()
    for t in np.unique(time):
        rows = time == t
        reason = None
        if binary and not (levels[rows] == 1).any():
            reason = "no unit is treated in this period"
        elif binary and not (levels[rows] == 0).any():
            reason = "every unit is treated in this period: no untreated comparison"
        elif not binary and np.ptp(levels[rows]) == 0:
            reason = "the treatment takes one value in this period"
        elif rows.sum() < 10 or np.sum(rd[rows] ** 2) <= 1e-12 * max(np.sum(rd ** 2), 1e-300):
            reason = "too few rows, or no treatment variation left once the fixed effects are removed"
        if reason:
            not_estimable.append((float(t), reason))
            continue
        theta_t, se_t = _theta(ry[rows], rd[rows], unit[rows])
        by_period.append((float(t), theta_t, se_t, int(rows.sum())))
    return PanelEstimate(approach=approach, theta=theta, std_err=se, n_units=int(len(units)), n_obs=int(len(y)),
                         by_period=by_period, units_observed_once=once, not_estimable=not_estimable,
                         time_effects=bool(time_effects))

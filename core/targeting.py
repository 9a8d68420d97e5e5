"""Budgeted targeting: where the programme should go next, by a rule learnt from the trial, and what it gains.

The rule ranks units by estimated CATE (or by CATE per unit of cost when
costs are given) and the budget takes the first ones (:func:`budget_rule`).
For the trial's own units the ranking comes from a model that did not see the
unit's fold (GeoCATE's cross-fitted forest: ``cate_`` of
core.learners.CrossFittedCausalForest), so every decision is out-of-fold; its
value is estimated from the DR (AIPW) scores of the same units
(``dr_scores_``, outcome models cross-fitted on the same folds):

* :func:`policy_value`: the rule's value against treating nobody, its GAIN
  (mean score of the treated minus mean score of all: grf's TOC at the
  budget), and its advantage over a random set of the same size (or cost) and
  over treating everyone, each with a cluster-robust standard error from one
  influence function per unit, summed by cluster;
* :func:`sequential_gain`: the GAIN judged fold by fold, fold k ranked by a model of folds 1..k-1 only,
  whose SE stays right when the ranking is noise (no heterogeneity), where the pooled one is too narrow;
* :func:`cost_curve`: with costs, maq's budget-constrained Qini curve (Sverdrup,
  Wu, Athey & Wager, "Qini curves for multi-armed treatment rules"), exact:
  greedy by CATE / cost, the last unit fractional; :func:`lp_gain` is its
  brute-force check (the LP relaxation of the knapsack, scipy's HiGHS);
* :func:`compare_rules`: several priorities at the same budget, on the same
  scores, with paired differences (same influence functions);
* :func:`policy_tree`: an interpretable rule, a shallow tree on covariates and
  named image summaries, learnt from the DR scores by exhaustive search, as
  policytree does (Athey & Wager, "Policy learning with observational data",
  Econometrica 2021; Sverdrup, Kanodia, Zhou, Athey & Wager, "policytree",
  JOSS 2020). scikit-learn has no policy tree and econml's ``PolicyTree`` /
  ``DRPolicyTree`` grow greedily (best first split, then best splits below
  it), which misses interactions a greedy first split cannot see; so the
  exhaustive search at depth 1 and 2 is written here (see the function for
  depth 3). econml's tree is a cross-check in the tests and the bench.
* :func:`targeting_message`: the plain sentence when the trial detected no
  heterogeneity: targeting cannot be shown to beat random allocation there.

What the standard errors mean (``estimand``): "sample" (default) is the
effect of the rule's choice on these units, the decisions held fixed (they
are cross-fitted, so they are fixed given the other folds): the influence
functions are centred within the treated and the untreated units. This is
the quantity the bench checks against the known truth. "population" is the
value of the same fixed rule on new units drawn like these: the influence
functions are centred at the overall means and carry the treated share's own
variation (wider intervals).

Two ways the decisions are not quite fixed, and what to do about them:

1. Across folds, each fold's ranking comes from a different model. With the
   budget taken over all units at once, the models' levels decide which folds
   get the budget, and a fold whose scores were high by chance raised the
   other folds' models, not its own: under no heterogeneity the pooled GAIN is
   biased down (bench/bench_targeting.py, 20 image trials with GeoCATE's forest:
   interval coverage of 0 was 80 %, mean t -1.37). For the trial's own units,
   give ``budget_rule`` the learner's folds (the budget is then taken within
   each fold: coverage of 0 100 %, mean t -0.16; with heterogeneity the two
   choose nearly the same units and both covered the true gain in 20 of 20).
2. Each fold's scores shape the other folds' models. When the ranking carries
   signal this fades as the rule converges; when it is mostly noise, the folds'
   gains can be positively correlated and the interval too narrow (a ridge of
   the DR scores on five covariates under the null: t-statistics with SD 1.3
   to 1.5 even within folds; GeoCATE's forest within folds: SD 0.8).
   :func:`sequential_gain` (fold k ranked by a model of folds 1..k-1 alone) is
   honest whatever the ranking, at the price of judging rules learnt on fewer
   units; it is the figure to quote when no heterogeneity was detected.

A budget rule's threshold also depends on every unit's rank; that dependence
is weak (one unit moves it by one rank) and is in neither SE.
"""

from dataclasses import dataclass, field

import numpy as np

from .crossfit import Folds, crossfit
from .errors import GeoCateError
from .scores import mean_and_se, normal_interval, zero_noise

ESTIMANDS = ("sample", "population")
#: A policy tree searches every pair of columns at depth 2: more columns than this are refused (raw features).
MAX_TREE_COLUMNS = 40
#: Split candidates per column of a policy tree (quantiles; every distinct value when fewer).
TREE_CANDIDATES = 64
#: Root split candidates per column at depth 3 (each child is then an exact depth-2 search).
DEPTH3_ROOT_CANDIDATES = 16


# --------------------------------------------------------------------------------------------------------------
# Estimates and influence functions
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error; ``ci`` the 95 % normal interval."""

    estimate: float
    std_err: float

    def interval(self, alpha=0.05):
        return tuple(float(v) for v in normal_interval(self.estimate, self.std_err, alpha))

    @property
    def ci(self):
        return self.interval(0.05)

    @property
    def p_value(self):
        """Two-sided p-value of H0: the quantity is 0."""
        from scipy.stats import norm

        if not np.isfinite(self.estimate) or not np.isfinite(self.std_err):
            return float("nan")
        if self.std_err == 0:
            return 1.0 if self.estimate == 0 else 0.0
        return float(2 * norm.sf(abs(self.estimate) / self.std_err))

    def covers(self, value, alpha=0.05):
        low, high = self.interval(alpha)
        return bool(low <= value <= high)

    def scaled(self, factor):
        return Estimate(float(self.estimate * factor), float(self.std_err * abs(factor)))


def _estimate(point, influence, clusters):
    """Estimate whose SE is the CR1 sandwich of ``influence`` (one value per unit, summed by cluster):
    SE^2 = C / (C - 1) sum_c (sum_{i in c} IF_i)^2 / n^2 (core.scores.mean_and_se of the centred IF)."""
    if not np.isfinite(point):
        return Estimate(float("nan"), float("nan"))
    return Estimate(zero_noise(float(point)), float(mean_and_se(influence, clusters)[1]))


def _check_scores(scores, name="DR scores"):
    scores = np.asarray(scores, float).ravel()
    if len(scores) == 0:
        raise GeoCateError("There are no units to target.", "Give a trial with units.")
    missing = int((~np.isfinite(scores)).sum())
    if missing:
        raise GeoCateError(f"{missing} unit(s) have missing {name}.", "Drop or fill those units first.")
    return scores


def _check_clusters(clusters, n):
    if clusters is None:
        return np.arange(n)
    clusters = np.asarray(clusters)
    if len(clusters) != n:
        raise GeoCateError(f"{len(clusters)} cluster ids were given for {n} units.", "Give one cluster id per unit.")
    return clusters


def _check_estimand(estimand):
    if estimand not in ESTIMANDS:
        raise GeoCateError(f"Unknown estimand '{estimand}'.", "Use 'sample' or 'population'.")


def _group_residuals(scores, groups):
    """scores less the mean of their group (groups: a boolean or small-int array)."""
    groups = np.asarray(groups)
    residual = np.empty(len(scores))
    for value in np.unique(groups):
        inside = groups == value
        residual[inside] = scores[inside] - scores[inside].mean()
    return residual


# --------------------------------------------------------------------------------------------------------------
# policy_value
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyValue:
    """What treating the units ``treat`` is worth, from DR scores Gamma_i (per unit of the trial, n units).

    value:       mean(T_i Gamma_i), the average gain per unit against treating nobody;
    gain:        GAIN = mean(Gamma | treated) - mean(Gamma), how much more the treated gain than the
                 average unit (grf's TOC at the treated share p);
    vs_random:   value - p mean(Gamma) = p GAIN, the advantage per unit over treating a random p of the units;
    vs_everyone: value - mean(Gamma) = -mean((1 - T) Gamma), against treating every unit;
    vs_random_cost: with costs, value - rho mean(Gamma), rho = spend / total cost, against a random set of
                 the same expected cost (None without costs);
    ate:         mean(Gamma).
    Totals over the trial's units are n times the per-unit figures (``total``).
    Every SE comes from one influence function per unit, summed by cluster (CR1); ``estimand`` says which
    (see the module docstring); ``influence`` keeps them for paired comparisons.
    """

    n_units: int
    n_treated: int
    treated_share: float
    value: Estimate
    gain: Estimate
    vs_random: Estimate
    vs_everyone: Estimate
    ate: Estimate
    vs_random_cost: Estimate = None
    spend: float = None
    n_clusters: int = 0
    estimand: str = "sample"
    influence: dict = field(default=None, repr=False, compare=False)

    def total(self, name="vs_random"):
        """The total over the trial's units of the per-unit figure ``name`` (an Estimate)."""
        return getattr(self, name).scaled(self.n_units)

    def describe(self):
        def line(label, est):
            low, high = est.ci
            return f"{label}: {est.estimate:.4g} (SE {est.std_err:.3g}; 95 % CI {low:.4g} to {high:.4g})"

        lines = [f"treats {self.n_treated} of {self.n_units} units ({self.treated_share:.1%})",
                 line("GAIN, mean effect of the treated minus that of all units", self.gain),
                 line("per unit, against treating nobody", self.value),
                 line("per unit, against a random set of the same size", self.vs_random),
                 line("per unit, against treating everyone", self.vs_everyone)]
        if self.vs_random_cost is not None:
            lines.append(line("per unit, against a random set of the same cost", self.vs_random_cost))
        return "\n".join(lines)


def policy_value(scores, treat, clusters=None, cost=None, estimand="sample"):
    """The value of treating the units where ``treat`` is true (see :class:`PolicyValue`).

    scores: (n,) DR scores Gamma_i (e.g. CrossFittedCausalForest.dr_scores_); treat: (n,) bool or 0/1,
    decisions made without the unit's outcome (cross-fitted); clusters: (n,) the groups the folds keep
    whole (default: each unit its own); cost: (n,) positive costs, for the comparison with a random set
    of the same cost.

    Influence functions (value V = mean(T Gamma), ATE A = mean(Gamma), share p = mean(T)):
    "sample": IF_V = T r, IF_A = r, IF_p = 0 with r_i = Gamma_i less its group's (treated or untreated)
    mean; "population": IF_V = T Gamma - V, IF_A = Gamma - A, IF_p = T - p. Then by the chain rule
    IF_GAIN = IF_V / p - V IF_p / p^2 - IF_A, IF_vs_random = IF_V - p IF_A - A IF_p,
    IF_vs_everyone = IF_V - IF_A. In the sample case GAIN = (1 - p)(mean_treated - mean_untreated) and
    its SE is the two-sample one, (1 - p) sqrt(v_1 / n_1 + v_0 / n_0) (variances with divisor n_g, times
    n / (n - 1) as CR1 does), which the tests check.
    """
    _check_estimand(estimand)
    gamma = _check_scores(scores)
    n = len(gamma)
    T = np.asarray(treat)
    if T.shape != (n,):
        raise GeoCateError(f"{T.size} decisions were given for {n} units.", "Give one treat / don't per unit.")
    T = T.astype(float)
    if not np.all((T == 0) | (T == 1)):
        raise GeoCateError("Decisions must be 0 (don't treat) or 1 (treat).", "Use budget_rule to make them.")
    clusters = _check_clusters(clusters, n)
    p = float(T.mean())
    value, ate = float(np.mean(T * gamma)), float(gamma.mean())
    if estimand == "sample":
        r = _group_residuals(gamma, T)
        if_value, if_ate, if_p = T * r, r, np.zeros(n)
    else:
        if_value, if_ate, if_p = T * gamma - value, gamma - ate, T - p
    influence = {"value": if_value, "ate": if_ate,
                 "vs_random": if_value - p * if_ate - ate * if_p,
                 "vs_everyone": if_value - if_ate}
    if p > 0:
        influence["gain"] = if_value / p - value * if_p / p ** 2 - if_ate
        gain = value / p - ate
    else:  # treats nobody: no mean among the treated
        influence["gain"], gain = np.zeros(n), float("nan")
    vs_random_cost, spend = None, None
    if cost is not None:
        c = _check_costs(cost, n)
        spend = float(np.sum(c * T))
        rho = spend / float(c.sum())
        if_rho = np.zeros(n) if estimand == "sample" else \
            (c * T - np.mean(c * T)) / c.mean() - rho * (c - c.mean()) / c.mean()
        influence["vs_random_cost"] = if_value - rho * if_ate - ate * if_rho
        vs_random_cost = _estimate(value - rho * ate, influence["vs_random_cost"], clusters)
    return PolicyValue(
        n_units=n, n_treated=int(T.sum()), treated_share=p,
        value=_estimate(value, if_value, clusters), gain=_estimate(gain, influence["gain"], clusters),
        vs_random=_estimate(value - p * ate, influence["vs_random"], clusters),
        vs_everyone=_estimate(value - ate, influence["vs_everyone"], clusters),
        ate=_estimate(ate, if_ate, clusters), vs_random_cost=vs_random_cost, spend=spend,
        n_clusters=int(len(np.unique(clusters))), estimand=estimand, influence=influence)


# --------------------------------------------------------------------------------------------------------------
# budget_rule
# --------------------------------------------------------------------------------------------------------------


def _check_costs(cost, n):
    cost = np.asarray(cost, float).ravel()
    if len(cost) != n:
        raise GeoCateError(f"{len(cost)} costs were given for {n} units.", "Give one cost per unit.")
    missing = int((~np.isfinite(cost)).sum())
    if missing:
        raise GeoCateError(f"{missing} unit(s) have a missing cost.", "Give every unit a cost, or drop those units.")
    bad = int((cost <= 0).sum())
    if bad:
        raise GeoCateError(f"{bad} unit(s) have a cost of 0 or less: costs must be positive.",
                           "Fix the cost field (a unit that costs nothing can be treated outside the budget).")
    return cost


def _check_priority(priority):
    priority = np.asarray(priority, float).ravel()
    missing = int((~np.isfinite(priority)).sum())
    if missing:
        raise GeoCateError(f"{missing} unit(s) have a missing priority.", "Drop or fill those units first.")
    if len(priority) == 0:
        raise GeoCateError("There are no units to target.", "Give a trial with units.")
    return priority


def _ratio_order(priority, cost):
    """Units with a positive priority, by priority / cost, highest first; ties by unit order (maq's order)."""
    eligible = np.flatnonzero(priority > 0)
    ratio = priority[eligible] / cost[eligible]
    return eligible[np.argsort(-ratio, kind="stable")]


def budget_rule(priority, budget_share=None, cost=None, budget_total=None, folds=None):
    """The units to treat: (n,) bool.

    Without costs: the first floor(budget_share x n) units by decreasing ``priority`` (ties: the earlier
    unit first), whatever the sign of their priority (grf's TOC at q = budget_share).
    With costs (``cost`` and ``budget_total``, or ``budget_share`` of the total cost): maq's order, the
    units with a positive priority by decreasing priority / cost (ties: the earlier unit first), taken
    while the running cost stays within the budget; the first unit that does not fit ends the rule (no
    fractional unit, and no later cheaper unit slips in), so the rule is the prefix of the budget curve
    (:func:`cost_curve`, whose last unit is fractional) at or below the budget. Units expected to lose are
    never bought, so some budget may be left.

    folds: (n,) fold ids; the budget is then applied within each fold (its share of the units, or a share
    of the total budget proportional to its units): each fold's choice then depends only on the
    fold-out model's ranks of that fold, with no level shift between the fold models changing which
    folds get the budget. Give them when judging the rule on the trial's own units (the module
    docstring says why: without them, no heterogeneity reads as a negative GAIN).

    Refused: a budget of 0 or less, a share above 1 or a total above the cost of every unit, a budget that
    buys no unit, missing or non-positive costs, missing priorities, and (with costs) no unit with a
    positive priority.
    """
    priority = _check_priority(priority)
    n = len(priority)
    if (budget_share is None) == (budget_total is None):
        raise GeoCateError("Give the budget either as a share of the units (or of the total cost) or as a total "
                           "cost, not both or neither.", "Set one budget.")
    if budget_total is not None and cost is None:
        raise GeoCateError("A total budget needs the units' costs.", "Give a cost field, or a share of the units.")
    if budget_share is not None:
        share = float(budget_share)
        if not np.isfinite(share) or share <= 0:
            raise GeoCateError(f"A budget of {share:g} treats no unit.", "Give a share above 0, e.g. 0.3.")
        if share > 1:
            raise GeoCateError(f"A budget share of {share:g} is above the total (1 = every unit).",
                               "Give a share between 0 and 1.")
    c = _check_costs(cost, n) if cost is not None else None
    if c is not None:
        total = float(c.sum()) * share if budget_total is None else float(budget_total)
        if not np.isfinite(total) or total <= 0:
            raise GeoCateError(f"A budget of {total:g} treats no unit.", "Give a positive budget.")
        if total > c.sum() * (1 + 1e-12):
            raise GeoCateError(f"The budget ({total:,.6g}) is above the total cost of every unit ({c.sum():,.6g}).",
                               f"Give at most {c.sum():,.6g}: a budget that treats everyone needs no targeting.")
        if not np.any(priority > 0):
            raise GeoCateError("No unit has a positive priority: with costs, only units expected to gain are bought.",
                               "Check the priority; targeting cannot help where no unit is expected to gain.")
    folds = np.zeros(n, int) if folds is None else np.asarray(folds)
    if len(folds) != n:
        raise GeoCateError(f"{len(folds)} fold ids were given for {n} units.", "Give one fold id per unit.")
    treat = np.zeros(n, bool)
    for _, _, held_out in Folds(folds).split():
        rows = np.flatnonzero(held_out)
        if c is None:
            k = int(np.floor(share * len(rows) + 1e-9))
            treat[rows[np.argsort(-priority[rows], kind="stable")[:k]]] = True
        else:
            budget = total * len(rows) / n
            order = _ratio_order(priority[rows], c[rows])
            k = int(np.searchsorted(np.cumsum(c[rows][order]), budget * (1 + 1e-12), side="right"))
            treat[rows[order[:k]]] = True
    if not treat.any():
        if c is None:
            raise GeoCateError(f"A budget share of {share:g} of {n} units buys no unit.",
                               f"Give a share of at least {1 / n:.3g}.")
        raise GeoCateError(f"The budget ({total:,.6g}) buys no unit: the first unit in line costs more.",
                           "Raise the budget.")
    return treat


# --------------------------------------------------------------------------------------------------------------
# sequential_gain: the GAIN that stays honest when the rule is noise
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequentialGain:
    """The budget rule's GAIN judged fold by fold, each fold ranked by a model of the earlier folds only.

    gain: mean over the held-out folds k = 2..K of GAIN_k (mean score of fold k's treated units less
    fold k's mean score), SE sqrt(sum SE_k^2) / (K - 1); vs_random: the same for p_k GAIN_k; t_stat,
    p_value: one-sided (H1: the rule's units gain more than average), as core.evaluate's sequential test;
    folds: the per-fold PolicyValues; treat: (n,) the sequential decisions (fold 1: none); evaluated: (n,)
    the units of folds 2..K.
    """

    gain: Estimate
    vs_random: Estimate
    t_stat: float
    p_value: float
    folds: tuple
    treat: np.ndarray = field(repr=False)
    evaluated: np.ndarray = field(repr=False)


def sequential_gain(scores, folds, priority_for, budget_share=None, cost=None, budget_total=None, clusters=None,
                    is_cancelled=None):
    """The GAIN of the budget rule with a standard error that holds even when there is no heterogeneity.

    Why: :func:`policy_value` of the pooled out-of-fold ranking (each fold ranked by a model of the other
    folds) treats the decisions as fixed. When the ranking carries signal it converges and that is right;
    when it is noise (no heterogeneity) each fold's scores shape the other folds' rankings, the folds'
    gains are positively correlated, and the interval is too narrow (bench/bench_targeting.py measures
    it). Here, as in core.evaluate.sequential_rate_test (Wager's rate_cv), fold k (k = 2..K, sorted) is
    ranked by ``priority_for(train, test)``, a model of folds 1..k-1 alone (e.g.
    CrossFittedCausalForest.priority_for), the budget (:func:`budget_rule`: the share of the fold, or the
    fold's share of ``budget_total`` in proportion to its units) picks fold k's units, and fold k's DR
    scores judge them (:func:`policy_value` within the fold). Given the earlier folds each fold's GAIN
    is an honest estimate, so the folds' estimates are uncorrelated and their mean has the SE
    sqrt(sum SE_k^2) / (K - 1). It judges rules learnt on fewer units than the final one (fold 2's on one
    fold), so it understates what the pooled rule gains; it is the figure to quote when no heterogeneity
    was detected.
    """
    from scipy.stats import norm

    from .errors import Cancelled
    from .progress import run_cancellable

    gamma = _check_scores(scores)
    n = len(gamma)
    folds = np.asarray(folds)
    clusters = _check_clusters(clusters, n)
    c = None if cost is None else _check_costs(cost, n)
    per_fold, treat, evaluated = [], np.zeros(n, bool), np.zeros(n, bool)
    for _, train, test in Folds(folds).require(2, "The sequential gain").sequential():
        if is_cancelled is not None and is_cancelled():
            raise Cancelled()
        priority = np.asarray(run_cancellable(lambda train=train, test=test: priority_for(train, test), is_cancelled),
                              float).ravel()
        fold_total = None if budget_total is None else float(budget_total) * int(test.sum()) / n
        chosen = budget_rule(priority, budget_share, None if c is None else c[test], fold_total)
        per_fold.append(policy_value(gamma[test], chosen, clusters[test], None if c is None else c[test]))
        treat[np.flatnonzero(test)[chosen]] = True
        evaluated |= test
    m = len(per_fold)

    def combine(name):
        estimates = [getattr(v, name) for v in per_fold]
        return Estimate(zero_noise(float(np.mean([e.estimate for e in estimates]))),
                        zero_noise(float(np.sqrt(np.sum([e.std_err ** 2 for e in estimates])) / m)))

    gain = combine("gain")
    t_stat = gain.estimate / gain.std_err if gain.std_err > 0 else 0.0
    return SequentialGain(gain=gain, vs_random=combine("vs_random"), t_stat=float(t_stat),
                          p_value=float(norm.sf(t_stat)), folds=tuple(per_fold), treat=treat, evaluated=evaluated)


# --------------------------------------------------------------------------------------------------------------
# cost_curve and its brute-force check
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostCurve:
    """maq's budget-constrained Qini curve for one treatment: gain as the budget grows.

    Units with a positive priority are bought by decreasing priority / cost; at a budget B (per unit of
    the trial: total spend / n, as maq counts it) the curve treats the first units whose costs fit and a
    fraction of the next, so it is piecewise linear, exact between the breakpoints ``spend``.
    spend: (m + 1,) per-unit spend at each breakpoint (0, then after each bought unit); gain: (m + 1,)
    the per-unit gain against treating nobody, mean(x_i Gamma_i); gain_se: its SE at each breakpoint
    (the sample estimand of :func:`policy_value`: at a breakpoint it equals policy_value's ``value``
    SE for that set); order: (m,) the units in buying order; n_units; mean_cost (per unit of the trial);
    ate; budget: the marked budget per unit (None if none). Beyond the last breakpoint (every unit
    with a positive priority bought) the curve is flat. ``at`` and ``vs_random_at`` evaluate any budget.
    """

    spend: np.ndarray
    gain: np.ndarray
    gain_se: np.ndarray
    order: np.ndarray
    n_units: int
    mean_cost: float
    ate: Estimate
    budget: float = None
    _scores: np.ndarray = field(default=None, repr=False, compare=False)
    _cost: np.ndarray = field(default=None, repr=False, compare=False)
    _clusters: np.ndarray = field(default=None, repr=False, compare=False)

    @property
    def total_spend(self):
        return self.spend * self.n_units

    def allocation(self, budget):
        """(n,) x_i in [0, 1] at per-unit budget ``budget``: the curve's LP solution (last unit fractional)."""
        x = np.zeros(self.n_units)
        available = float(budget) * self.n_units
        spent = self.spend[1:] * self.n_units
        k = int(np.searchsorted(spent, available * (1 + 1e-12), side="right"))
        x[self.order[:k]] = 1.0
        if k < len(self.order):
            before = spent[k - 1] if k else 0.0
            x[self.order[k]] = max(available - before, 0.0) / self._cost[self.order[k]]
        return x

    def _influence(self, x):
        gamma = self._scores
        bought = x > 0
        centre = np.sum(x * gamma) / np.sum(x) if bought.any() else 0.0
        return x * (gamma - centre) * bought, _group_residuals(gamma, bought)

    def at(self, budget):
        """The gain (per unit, against treating nobody) at per-unit budget ``budget``, with its SE."""
        x = self.allocation(budget)
        influence = self._influence(x)[0]
        return _estimate(float(np.mean(x * self._scores)), influence, self._clusters)

    def random_gain(self, budget):
        """A random allocation of the same spend: the share min(budget / mean cost, 1) of the units, times the ATE."""
        return np.minimum(np.asarray(budget, float) / self.mean_cost, 1.0) * self.ate.estimate

    def vs_random_at(self, budget):
        """The curve's gain less a random allocation's of the same spend, with its SE (paired)."""
        x = self.allocation(budget)
        if_value, residual = self._influence(x)
        rho = min(float(budget) / self.mean_cost, 1.0)
        return _estimate(float(np.mean(x * self._scores)) - rho * self.ate.estimate, if_value - rho * residual,
                         self._clusters)

    @property
    def at_budget(self):
        """The gain at the marked budget (None if none was given)."""
        return None if self.budget is None else self.at(self.budget)


def _within_cluster_before(values, ids):
    """For each position, the sum of ``values`` at earlier positions of the same cluster ``ids``."""
    order = np.argsort(ids, kind="stable")
    sorted_ids, sorted_values = ids[order], values[order]
    running = np.cumsum(sorted_values)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_ids)) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
    before_sorted = running - sorted_values - np.where(first > 0, running[first - 1], 0.0)
    before = np.empty(len(values))
    before[order] = before_sorted
    return before


def cost_curve(scores, priority, cost=None, clusters=None, budget_total=None):
    """maq's budget-constrained Qini curve (see :class:`CostCurve`), computed exactly.

    scores: (n,) DR scores; priority: (n,) estimated CATE (out-of-fold); cost: (n,) positive costs
    (default 1 each: the curve is then the Qini curve of the units with a positive priority, spend = the
    treated share); clusters: for the SEs; budget_total: the budget to mark (total cost).

    The SE at every breakpoint is computed in one pass: with A_c, B_c the sum of scores and the number of
    bought units of cluster c, the sample influence function's cluster sums give
    sum_c (A_c - m B_c)^2 = sum A_c^2 - 2 m sum A_c B_c + m^2 sum B_c^2 (m the mean score of the bought
    units), each sum updated as one unit is bought.
    """
    gamma = _check_scores(scores)
    n = len(gamma)
    priority = _check_priority(priority)
    if len(priority) != n:
        raise GeoCateError(f"{len(priority)} priorities were given for {n} units.", "Give one priority per unit.")
    c = np.ones(n) if cost is None else _check_costs(cost, n)
    clusters = _check_clusters(clusters, n)
    ids = np.unique(clusters, return_inverse=True)[1].ravel()
    n_clusters = int(ids.max()) + 1
    order = _ratio_order(priority, c)
    g, k_ids = gamma[order], ids[order]
    a_before = _within_cluster_before(g, k_ids)
    b_before = _within_cluster_before(np.ones(len(g)), k_ids)
    sum_a2 = np.cumsum(2 * a_before * g + g ** 2)
    sum_ab = np.cumsum(a_before + g * b_before + g)
    sum_b2 = np.cumsum(2 * b_before + 1)
    m = np.cumsum(g) / np.arange(1, len(g) + 1)
    meat = sum_a2 - 2 * m * sum_ab + m ** 2 * sum_b2
    meat[meat <= 1e-12 * (sum_a2 + m ** 2 * sum_b2)] = 0.0   # cancellation noise (e.g. one unit bought: exactly 0)
    se = np.sqrt(n_clusters / (n_clusters - 1) * meat) / n if n_clusters > 1 else np.full(len(g), np.nan)
    ate = _estimate(float(gamma.mean()), gamma - gamma.mean(), clusters)
    budget = None
    if budget_total is not None:
        budget = float(budget_total) / n
        if not np.isfinite(budget) or budget <= 0:
            raise GeoCateError(f"A budget of {float(budget_total):g} treats no unit.", "Give a positive budget.")
        if budget_total > c.sum() * (1 + 1e-12):
            raise GeoCateError(f"The budget ({budget_total:,.6g}) is above the total cost of every unit "
                               f"({c.sum():,.6g}).", f"Give at most {c.sum():,.6g}.")
    return CostCurve(spend=np.r_[0.0, np.cumsum(c[order])] / n, gain=np.r_[0.0, np.cumsum(g)] / n,
                     gain_se=zero_noise(np.r_[0.0, se]), order=order, n_units=n, mean_cost=float(c.mean()), ate=ate,
                     budget=budget, _scores=gamma, _cost=c, _clusters=clusters)


def lp_gain(scores, priority, cost, budget_total):
    """Brute force for :func:`cost_curve` on small cases: the LP relaxation of the knapsack,
    max sum_i priority_i x_i subject to sum_i cost_i x_i <= budget_total, 0 <= x_i <= 1 (scipy's HiGHS dual
    simplex, a vertex solution), valued with the scores: (sum_i Gamma_i x_i / n, x). Greedy by
    priority / cost with the last unit fractional solves this LP (Dantzig), which is what the curve is."""
    from scipy.optimize import linprog

    gamma = np.asarray(scores, float)
    priority, cost = np.asarray(priority, float), np.asarray(cost, float)
    solution = linprog(-priority, A_ub=cost[None, :], b_ub=[float(budget_total)], bounds=(0, 1), method="highs-ds")
    if not solution.success:  # pragma: no cover - a feasible bounded LP
        raise GeoCateError(f"The LP failed: {solution.message}", "")
    x = solution.x
    return float(np.sum(gamma * x) / len(gamma)), x


# --------------------------------------------------------------------------------------------------------------
# compare_rules
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleDifference:
    """Rule ``first`` less rule ``second`` at the same budget: GAIN and per-unit value (against treating nobody),
    paired (the difference of the two rules' influence functions)."""

    first: str
    second: str
    gain: Estimate
    value: Estimate


@dataclass(frozen=True)
class RuleComparison:
    """Several priorities at one budget on the same scores: ``values`` {name: PolicyValue}, ``treat``
    {name: (n,) bool}, ``differences`` [RuleDifference for every pair, in the order given]."""

    values: dict
    treat: dict
    differences: list

    def table(self):
        """Rows (name, n treated, GAIN, SE, 95 % low, high, value per unit, SE)."""
        return [(name, v.n_treated, v.gain.estimate, v.gain.std_err, *v.gain.ci, v.value.estimate, v.value.std_err)
                for name, v in self.values.items()]


def compare_rules(scores, rules, budget_share=None, cost=None, budget_total=None, clusters=None, folds=None,
                  estimand="sample"):
    """GAIN (and value) of each rule at the same budget on the same DR scores, and every pairwise difference.

    rules: {name: (n,) priority} (imagery CATE, covariates-only CATE, a priority field...); each rule treats
    :func:`budget_rule`(priority, budget_share, cost, budget_total, folds). The differences use the same
    units and scores, so their SEs come from the difference of the influence functions (summed by cluster).
    """
    if not rules:
        raise GeoCateError("There is no rule to compare.", "Give at least one priority.")
    gamma = _check_scores(scores)
    clusters = _check_clusters(clusters, len(gamma))
    values, treat = {}, {}
    for name, priority in rules.items():
        if len(np.ravel(priority)) != len(gamma):
            raise GeoCateError(f"Rule '{name}' gives {len(np.ravel(priority))} priorities for {len(gamma)} units.",
                               "Give one priority per unit.")
        treat[name] = budget_rule(priority, budget_share, cost, budget_total, folds)
        values[name] = policy_value(gamma, treat[name], clusters, cost, estimand)
    names = list(rules)
    differences = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = values[first], values[second]
            differences.append(RuleDifference(
                first=first, second=second,
                gain=_estimate(a.gain.estimate - b.gain.estimate, a.influence["gain"] - b.influence["gain"], clusters),
                value=_estimate(a.value.estimate - b.value.estimate, a.influence["value"] - b.influence["value"],
                                clusters)))
    return RuleComparison(values=values, treat=treat, differences=differences)


# --------------------------------------------------------------------------------------------------------------
# policy_tree
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyNode:
    """A node of a policy tree: a leaf (feature -1) treats when its units' summed DR scores are positive;
    a split sends x[feature] <= threshold left. n: units; reward: sum of their DR scores."""

    n: int
    reward: float
    feature: int = -1
    threshold: float = float("nan")
    left: "PolicyNode" = None
    right: "PolicyNode" = None

    @property
    def is_leaf(self):
        return self.feature < 0

    @property
    def action(self):
        """1 (treat) when the leaf's summed scores are positive, else 0."""
        return int(self.reward > 0)


@dataclass(frozen=True)
class PolicyTree:
    """A shallow treat / don't-treat tree (see :func:`policy_tree`).

    root: PolicyNode; names: the column names; depth: the search depth; min_leaf; n_units;
    search: how it was found; value: in-sample mean of T_i Gamma_i (optimistic on the units it was learnt
    from: judge it out-of-fold, :func:`cross_fitted_policy`).
    """

    root: PolicyNode
    names: tuple
    depth: int
    min_leaf: int
    n_units: int
    search: str

    @property
    def value(self):
        return sum(leaf.reward for leaf in self.leaves() if leaf.action) / self.n_units

    def leaves(self):
        stack, out = [self.root], []
        while stack:
            node = stack.pop()
            if node.is_leaf:
                out.append(node)
            else:
                stack.extend((node.right, node.left))
        return out

    def predict(self, X):
        """(m,) 0/1 decisions for the rows of X (same columns as the training X)."""
        X = np.asarray(X, float)
        if X.ndim == 1:
            X = X[:, None]
        out = np.zeros(len(X), int)

        def walk(node, rows):
            if node.is_leaf:
                out[rows] = node.action
                return
            left = X[rows, node.feature] <= node.threshold
            walk(node.left, rows[left])
            walk(node.right, rows[~left])

        walk(self.root, np.arange(len(X)))
        return out

    def describe(self):
        """The rule as indented text, e.g. 'if assets <= 0.3:' / '    treat (812 units)'."""
        lines = []

        def leaf_text(node):
            return f"{'treat' if node.action else 'do not treat'} ({node.n} units, mean score {node.reward / node.n:+.3g})"

        def walk(node, indent):
            pad = "    " * indent
            if node.is_leaf:
                lines.append(pad + leaf_text(node))
                return
            name = self.names[node.feature]
            lines.append(f"{pad}if {name} <= {node.threshold:.4g}:")
            walk(node.left, indent + 1)
            lines.append(f"{pad}else ({name} > {node.threshold:.4g}):")
            walk(node.right, indent + 1)

        walk(self.root, 0)
        return "\n".join(lines)


def _candidates(x, max_candidates):
    """Split points of one column: every distinct value but the largest when there are at most
    max_candidates + 1 of them, else up to max_candidates observed quantiles (left: x <= point)."""
    values = np.unique(x)
    if len(values) <= 1:
        return values[:0]
    if len(values) - 1 <= max_candidates:
        return values[:-1]
    points = np.unique(np.quantile(x, np.arange(1, max_candidates + 1) / (max_candidates + 1), method="inverted_cdf"))
    return points[points < values[-1]]


def _tolerance(g):
    return 1e-10 * (float(np.abs(g).sum()) + 1.0)


def _best_depth1(B, g, n_bins, min_leaf):
    """(value, (j, s) or None): the best single split (or a leaf) of the units with bins B (n, p) and scores g.
    value = max(L, 0) + max(R, 0), the leaves' summed scores where treated."""
    n, p = B.shape
    K = int(n_bins.max())
    total = float(g.sum())
    leaf = max(total, 0.0)
    if n < 2 * min_leaf:
        return leaf, None
    idx = (B + np.arange(p) * K).ravel()
    G = np.cumsum(np.bincount(idx, weights=np.repeat(g, p), minlength=p * K).reshape(p, K), axis=1)
    N = np.cumsum(np.bincount(idx, minlength=p * K).reshape(p, K), axis=1)
    values = np.maximum(G, 0) + np.maximum(total - G, 0)
    values[(N < min_leaf) | (n - N < min_leaf)] = -np.inf
    best = int(np.argmax(values))
    if values.flat[best] > leaf + _tolerance(g):
        return float(values.flat[best]), divmod(best, K)
    return leaf, None


def _child_best(G, N, min_leaf):
    """For histograms G, N (m, p, K) of m candidate subsets by (column, bin): the best depth-1 value of each."""
    Gc, Nc = np.cumsum(G, axis=2), np.cumsum(N, axis=2)
    total, count = Gc[:, :1, -1:], Nc[:, :1, -1:]
    values = np.maximum(Gc, 0) + np.maximum(total - Gc, 0)
    values[(Nc < min_leaf) | (count - Nc < min_leaf)] = -np.inf
    return np.maximum(values.reshape(len(G), -1).max(axis=1), np.maximum(total[:, 0, 0], 0))


def _best_depth2(B, g, n_bins, min_leaf):
    """(value, (j, s) or None): the best depth-2 tree's root split, by exhaustive search.

    For each root column j, the 3-d histogram of the scores by (bin of j, column j', bin of j') is built
    in one bincount; its cumulative sums over j's bins give, for every root split s at once, each child's
    histogram, whose cumulative sums over j''s bins give every child split. Cost per node:
    O(p (n p + m p K)) for p columns of at most K bins."""
    n, p = B.shape
    K = int(n_bins.max())
    best, where = max(float(g.sum()), 0.0), None   # the depth-1 trees are among those searched (leaf children)
    if n < 2 * min_leaf:
        return best, where
    tolerance = _tolerance(g)
    offsets = np.arange(p) * K
    weights = np.repeat(g, p)
    for j in range(p):
        m = int(n_bins[j])
        if m < 2:
            continue
        idx = ((B[:, j] * (p * K))[:, None] + offsets + B).ravel()
        G = np.cumsum(np.bincount(idx, weights=weights, minlength=m * p * K).reshape(m, p, K), axis=0)
        N = np.cumsum(np.bincount(idx, minlength=m * p * K).reshape(m, p, K), axis=0)
        left_count = N[:, 0, :].sum(axis=1)
        values = _child_best(G, N, min_leaf) + _child_best(G[-1] - G, N[-1] - N, min_leaf)
        values[(left_count < min_leaf) | (n - left_count < min_leaf)] = -np.inf
        s = int(np.argmax(values))
        if values[s] > best + tolerance:
            best, where = float(values[s]), (j, s)
    return best, where


def _grow(B, g, n_bins, cuts, depth, min_leaf):
    """The tree of the given depth on units (B, g), rebuilt from the searches' root splits."""
    total = float(g.sum())
    if depth == 0:
        return PolicyNode(n=len(g), reward=total), max(total, 0.0)
    if depth == 1:
        value, where = _best_depth1(B, g, n_bins, min_leaf)
    elif depth == 2:
        value, where = _best_depth2(B, g, n_bins, min_leaf)
    else:
        value, where = _best_depth3(B, g, n_bins, cuts, min_leaf)
    if where is None:
        return PolicyNode(n=len(g), reward=total), max(total, 0.0)
    j, s = where
    left = B[:, j] <= s
    left_node, left_value = _grow(B[left], g[left], n_bins, cuts, depth - 1, min_leaf)
    right_node, right_value = _grow(B[~left], g[~left], n_bins, cuts, depth - 1, min_leaf)
    node = PolicyNode(n=len(g), reward=total, feature=int(j), threshold=float(cuts[j][s]), left=left_node,
                      right=right_node)
    return node, left_value + right_value


def _best_depth3(B, g, n_bins, cuts, min_leaf):
    """(value, (j, s) or None): root split over at most DEPTH3_ROOT_CANDIDATES evenly spaced candidates per
    column (and the best depth-2 tree's root), each side an exact depth-2 search (so exhaustive below the root,
    on a coarser grid at the root)."""
    n, p = B.shape
    best, where = max(float(g.sum()), 0.0), None
    # The best depth-2 tree's root is tried too, so the depth-3 tree is never worse than the depth-2 one.
    root2 = _best_depth2(B, g, n_bins, min_leaf)[1]
    tolerance = _tolerance(g)
    for j in range(p):
        m = int(n_bins[j])
        if m < 2:
            continue
        splits = np.round(np.linspace(0, m - 2, min(DEPTH3_ROOT_CANDIDATES, m - 1))).astype(int)
        if root2 is not None and root2[0] == j:
            splits = np.r_[splits, root2[1]]
        splits = np.unique(splits)
        for s in splits:
            left = B[:, j] <= s
            n_left = int(left.sum())
            if n_left < min_leaf or n - n_left < min_leaf:
                continue
            value = (_best_depth2(B[left], g[left], n_bins, min_leaf)[0]
                     + _best_depth2(B[~left], g[~left], n_bins, min_leaf)[0])
            if value > best + tolerance:
                best, where = value, (j, int(s))
    return best, where


def _prune(node):
    """Merge sibling leaves that take the same action (the value is unchanged)."""
    if node.is_leaf:
        return node
    left, right = _prune(node.left), _prune(node.right)
    if left.is_leaf and right.is_leaf and left.action == right.action:
        return PolicyNode(n=node.n, reward=node.reward)
    return PolicyNode(n=node.n, reward=node.reward, feature=node.feature, threshold=node.threshold, left=left,
                      right=right)


def policy_tree(X, scores, depth=2, names=(), min_leaf=None, max_candidates=TREE_CANDIDATES):
    """A shallow policy tree: the treat / don't rule on the columns of X that maximises the summed DR scores
    of the treated units (reward Gamma_i to treat, 0 not to), as policytree's ``policy_tree`` does.

    X: (n, p) covariates and named image summaries (at most MAX_TREE_COLUMNS; not raw image features);
    scores: (n,) DR scores; names: p column names (default x1..xp); min_leaf: fewest units in a leaf
    (default max(10, n // 50)); max_candidates: split points per column (every distinct value when a column
    has at most that many + 1, else that many observed quantiles).

    Search, written here (scikit-learn has none; econml's trees are greedy):
    depth 1 and 2: exhaustive over the candidate splits, like policytree's exact search (which tries every
    distinct value; here quantiles, so exact for columns of up to max_candidates + 1 values); a child may
    stay a leaf. Depth 3: the root split over at most DEPTH3_ROOT_CANDIDATES candidates per column, each
    side an exact depth-2 search (exhaustive below the root). Leaves treat when their summed scores are
    positive; ties between equally good trees go to the simpler tree, then to the first column and split;
    sibling leaves with the same action are merged. The in-sample value is optimistic: judge the rule on
    units it was not learnt from (:func:`cross_fitted_policy`).
    """
    X = np.asarray(X, float)
    if X.ndim == 1:
        X = X[:, None]
    gamma = _check_scores(scores)
    n, p = X.shape
    if n != len(gamma):
        raise GeoCateError(f"{n} rows of inputs were given for {len(gamma)} scores.", "Give one row per unit.")
    missing = int((~np.isfinite(X)).any(axis=1).sum())
    if missing:
        raise GeoCateError(f"{missing} unit(s) have a missing input of the policy tree.", "Drop or fill them first.")
    if depth not in (1, 2, 3):
        raise GeoCateError(f"A policy tree of depth {depth} is not offered.", "Use depth 1, 2 or 3.")
    if p > MAX_TREE_COLUMNS:
        raise GeoCateError(f"A policy tree on {p} columns: the exhaustive search tries every pair of columns, and a "
                           "rule on raw image features is not interpretable.",
                           f"Give at most {MAX_TREE_COLUMNS} named columns (covariates, image summaries).")
    names = tuple(names) or tuple(f"x{j + 1}" for j in range(p))
    if len(names) != p:
        raise GeoCateError(f"{len(names)} names were given for {p} columns.", "Give one name per column.")
    min_leaf = max(10, n // 50) if min_leaf is None else int(min_leaf)
    if min_leaf < 1:
        raise GeoCateError("A policy tree's leaves need at least 1 unit.", "Set min_leaf to 1 or more.")
    cuts = [_candidates(X[:, j], int(max_candidates)) for j in range(p)]
    B = np.column_stack([np.searchsorted(cuts[j], X[:, j], side="left") for j in range(p)]).astype(np.int64)
    n_bins = np.array([len(c) + 1 for c in cuts])
    root, _ = _grow(B, gamma, n_bins, cuts, depth, min_leaf)
    search = "exhaustive" if depth < 3 else f"depth-2 exhaustive below a root on {DEPTH3_ROOT_CANDIDATES} candidates"
    return PolicyTree(root=_prune(root), names=names, depth=depth, min_leaf=min_leaf, n_units=n,
                      search=f"{search}, up to {max_candidates} split points per column")


def cross_fitted_policy(X, scores, folds, **tree_options):
    """Out-of-fold decisions of a policy tree: each fold's units decided by a tree learnt on the other folds.
    Returns ((n,) 0/1 decisions, [tree per fold]); judge them with :func:`policy_value` on the same scores."""
    X = np.asarray(X, float)
    if X.ndim == 1:
        X = X[:, None]
    gamma = _check_scores(scores)
    trees = []

    def fit_predict(train, test):
        trees.append(policy_tree(X[train], gamma[train], **tree_options))
        return np.asarray(trees[-1].predict(X[test]), int)

    decisions = crossfit(fit_predict, Folds(folds).require(2, "A policy tree judged out of fold"))
    return decisions, trees


# --------------------------------------------------------------------------------------------------------------
# targeting_message
# --------------------------------------------------------------------------------------------------------------


def targeting_message(test_p_value, gain, alpha=0.05):
    """The plain sentence on what targeting achieves, given the trial's heterogeneity test.

    test_p_value: the one-sided p-value of the sequential cross-fold test (HeterogeneityTest.p_value);
    gain: the rule's PolicyValue, SequentialGain (the figure to give without heterogeneity) or GAIN Estimate.
    With no heterogeneity detected (p >= alpha, or no
    test) the sentence says that targeting cannot be shown to beat random allocation here, and still
    gives the GAIN and its interval; otherwise it gives the GAIN and says whether its interval excludes 0.
    """
    estimate = gain if isinstance(gain, Estimate) else gain.gain    # a PolicyValue or a SequentialGain
    low, high = estimate.ci
    chosen = f"the {gain.treated_share:.0%} of units the rule chooses" if isinstance(gain, PolicyValue) else \
        "the units the rule chooses"
    figure = (f"{chosen} are estimated to gain {estimate.estimate:+.3g} more than the average unit "
              f"(GAIN, 95 % CI {low:.3g} to {high:.3g})")
    p = float("nan") if test_p_value is None else float(test_p_value)
    if not (np.isfinite(p) and p < alpha):
        tested = f"(p = {p:.2g})" if np.isfinite(p) else "(no test was run)"
        return (f"No heterogeneity was detected in this trial {tested}: targeting cannot be shown to beat random "
                f"allocation here. For the record, {figure}; a random set of the same size is expected to do as well.")
    verdict = "so targeting beats random allocation at this budget" if low > 0 else \
        "but at this budget the gain cannot be told apart from 0"
    return f"Heterogeneity was detected (p = {p:.2g}): {figure}, {verdict}."

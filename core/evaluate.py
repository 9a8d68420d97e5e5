"""Judging heterogeneity without ground truth: DR scores, TOC / RATE (AUTOC, Qini), BLP calibration, GATEs, spatial folds.

The rank-weighted average treatment effect follows grf's
``rank_average_treatment_effect`` (Yadlowsky, Fleming, Shah, Brunskill &
Wager, "Evaluating treatment prioritization rules via rank-weighted average
treatment effects", JASA 2024); the calibration test is the best linear
predictor of Chernozhukov, Demirer, Duflo & Fernandez-Val ("Generic machine
learning inference on heterogeneous treatment effects in randomized
experiments").
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .crossfit import Folds, location_folds, location_ids
from .errors import GeoCateError, require
from .progress import run_cancellable
from .scores import Z95, aipw_scores, cross_fitted_scores, mean_and_se, small_sample_se, zero_noise

DEFAULT_Q = np.round(np.arange(1, 11) / 10, 10)


def _tie_ranks(priority):
    """Integer ranks 0..K-1 of the distinct priority values (ties share a rank)."""
    return np.unique(np.asarray(priority, float), return_inverse=True)[1].ravel()


def toc_and_rate(scores, priority, q=DEFAULT_Q, target="AUTOC"):
    """Point estimates of the TOC curve on ``q`` and of the RATE, as grf defines them.

    Units are sorted by decreasing priority; tied units all take their tie
    group's mean score. With the sorted scores s_(1..n) and ATE = mean(s):

        TOC(k/n)  = (1/k) sum_{i<=k} s_(i) - ATE,                 k = 1..n
        AUTOC     = (1/n) sum_{k=1}^n TOC(k/n)
        QINI      = (1/n) sum_{k=1}^n (k/n) TOC(k/n)
        TOC(q)    = (sum_{i<=floor(qn)} s_(i) + (qn - floor(qn)) s_(floor(qn)+1)) / (qn) - ATE

    (a fractional unit fills the grid point q, so TOC(1) = 0). Returns (rate, toc on q).
    """
    scores = np.asarray(scores, float)
    n = len(scores)
    q = check_q(q)
    ranks = _tie_ranks(priority)
    if n and ranks.max() == 0:  # one tie group: no ranking at all, so no gain anywhere (exactly, not 1e-15)
        if target not in ("AUTOC", "QINI"):
            raise GeoCateError(f"Unknown RATE target '{target}'.", "Use 'AUTOC' or 'QINI'.")
        return 0.0, np.zeros(len(q))
    order = np.argsort(-ranks, kind="stable")
    sorted_ranks = ranks[order]
    sorted_scores = scores[order]
    if len(np.unique(sorted_ranks)) < n:
        sums = np.bincount(sorted_ranks, weights=sorted_scores)
        counts = np.bincount(sorted_ranks)
        sorted_scores = (sums / np.maximum(counts, 1))[sorted_ranks]
    ate = sorted_scores.mean()
    cumulative = np.cumsum(sorted_scores)
    k = np.arange(1, n + 1)
    toc = cumulative / k - ate
    if target == "AUTOC":
        rate = toc.mean()
    elif target == "QINI":
        rate = np.mean(k / n * toc)
    else:
        raise GeoCateError(f"Unknown RATE target '{target}'.", "Use 'AUTOC' or 'QINI'.")
    qn = np.asarray(q, float) * n
    whole = np.floor(qn + 1e-9).astype(int)
    fraction = np.clip(qn - whole, 0, None)
    head = np.where(whole > 0, cumulative[np.maximum(whole, 1) - 1], 0.0)
    nxt = sorted_scores[np.minimum(whole, n - 1)]
    toc_q = (head + fraction * nxt) / qn - ate
    return float(rate), toc_q


def check_q(q):
    """The grid of treated fractions, validated as grf does: sorted, in (0, 1], ending at 1."""
    q = np.asarray(q, float).ravel()
    if (len(q) == 0 or not np.all(np.isfinite(q)) or q.min() <= 0 or q.max() > 1 or np.any(np.diff(q) <= 0)
            or abs(q[-1] - 1) > 1e-12):
        raise GeoCateError("The q grid of treated fractions must be increasing, within (0, 1], and contain 1.",
                           "Use for example 0.1, 0.2, ..., 1.0.")
    return q



def effect_groups(cate, n_groups=3):
    """1-based effect group of each unit by quantile of ``cate`` (1 = smallest effects).

    Ranks are used, so groups have equal sizes (to within one unit) even with ties.
    """
    cate = np.asarray(cate, dtype=float)
    order = np.argsort(cate, kind="stable")
    ranks = np.empty(len(cate), dtype=int)
    ranks[order] = np.arange(len(cate))
    return (ranks * n_groups) // max(len(cate), 1) + 1


@dataclass(frozen=True)
class RateResult:
    """A RATE estimate with its half-sample bootstrap inference, and the TOC curve.

    estimate, std_err, ci (95 %), p_value (two-sided, H0: RATE = 0);
    toc: (len(q),) estimates, toc_se their standard errors, q the grid;
    priority: a name; draws: (R,) bootstrap estimates.
    """

    target: str
    priority: str
    estimate: float
    std_err: float
    ci: tuple
    p_value: float
    q: np.ndarray
    toc: np.ndarray
    toc_se: np.ndarray
    draws: np.ndarray = field(repr=False)

    @property
    def ratio(self):
        """estimate / std_err, the t-statistic the issue of RATE tests reads."""
        return self.estimate / self.std_err if self.std_err > 0 else float("nan")


def _inference(name, target, estimate, toc, draws, toc_draws, q):
    from scipy.stats import norm

    estimate = zero_noise(estimate)
    se = zero_noise(float(np.std(draws, ddof=1))) if len(draws) > 1 else 0.0
    p = float(2 * norm.sf(abs(estimate) / se)) if se > 0 else (1.0 if estimate == 0 else float("nan"))
    toc = zero_noise(toc)
    return RateResult(target=target, priority=name, estimate=float(estimate), std_err=se,
                      ci=(float(estimate - Z95 * se), float(estimate + Z95 * se)), p_value=p,
                      q=np.asarray(q), toc=np.asarray(toc),
                      toc_se=zero_noise(np.std(toc_draws, axis=0, ddof=1)) if len(draws) > 1 else np.zeros(len(q)),
                      draws=np.asarray(draws))


def half_samples(clusters, n_draws, seed):
    """Index arrays of ``n_draws`` half-samples: floor(C/2) of the C clusters, drawn without replacement."""
    clusters = np.asarray(clusters)
    ids, inverse = np.unique(clusters, return_inverse=True)
    if len(ids) < 4:
        raise GeoCateError(
            f"Only {len(ids)} distinct clusters: the half-sample bootstrap needs at least 4.",
            "Use more units or locations.")
    order = np.argsort(inverse, kind="stable")          # units cluster by cluster, in their order
    sizes = np.bincount(inverse)
    starts = np.cumsum(sizes) - sizes
    rng = np.random.default_rng(seed)
    half = len(ids) // 2
    for _ in range(n_draws):
        chosen = rng.choice(len(ids), half, replace=False)
        # The chosen clusters' members, cluster after cluster (vectorised: at 100,000 clusters a list of arrays
        # took most of the bootstrap's time).
        counts = sizes[chosen]
        ends = np.cumsum(counts)
        yield order[np.repeat(starts[chosen] - (ends - counts), counts) + np.arange(ends[-1] if len(ends) else 0)]


def rank_average_treatment_effect(scores, priorities, target="AUTOC", q=DEFAULT_Q, n_draws=200,
                                  clusters=None, names=None, seed=42, is_cancelled=None):
    """RATE of one or two prioritisation rules (grf's ``rank_average_treatment_effect``).

    scores: (n,) DR scores Gamma_i; priorities: (n,) or (n, 2), higher = treat
    first; clusters: (n,) cluster (location) ids, the bootstrap's sampling
    unit (default: each unit its own). Inference is the half-sample bootstrap:
    each draw takes floor(C/2) of the C clusters without replacement and
    recomputes the estimate; SE = standard deviation of the draws. With two
    rules the draws are paired and the difference (rule 1 - rule 2) is
    returned too. Returns a list of RateResult: [rule 1] or [rule 1, rule 2, difference].
    """
    scores = np.asarray(scores, float)
    priorities = np.asarray(priorities, float)
    priorities = priorities.reshape(len(scores), -1)
    if np.isnan(priorities).any() or np.isnan(scores).any():
        raise GeoCateError("Priorities or scores contain missing values.", "Drop or fill those units first.")
    names = list(names or [f"priority {j + 1}" for j in range(priorities.shape[1])])
    clusters = np.arange(len(scores)) if clusters is None else np.asarray(clusters)
    point = [toc_and_rate(scores, priorities[:, j], q, target) for j in range(priorities.shape[1])]
    draws = [[] for _ in point]
    toc_draws = [[] for _ in point]
    for idx in half_samples(clusters, n_draws, seed):
        if is_cancelled is not None and is_cancelled():  # a draw takes milliseconds: polled at each
            from .errors import Cancelled

            raise Cancelled()
        for j in range(len(point)):
            rate, toc = toc_and_rate(scores[idx], priorities[idx, j], q, target)
            draws[j].append(rate)
            toc_draws[j].append(toc)
    results = [_inference(names[j], target, point[j][0], point[j][1], np.array(draws[j]), np.array(toc_draws[j]), q)
               for j in range(len(point))]
    if len(point) == 2:
        results.append(_inference(f"{names[0]} - {names[1]}", target, point[0][0] - point[1][0],
                                  point[0][1] - point[1][1], np.array(draws[0]) - np.array(draws[1]),
                                  np.array(toc_draws[0]) - np.array(toc_draws[1]), q))
    return results


@dataclass(frozen=True)
class HeterogeneityTest:
    """The sequential cross-fold test of heterogeneity (grf's ``rate_cv`` vignette; Wager 2024).

    For k = 2..K, a priority learnt on folds 1..k-1 alone ranks the units of
    fold k, whose DR scores judge it (RATE with a half-sample bootstrap over
    the fold's clusters, or from re-randomized assignments when larger): t_k = RATE_k / SE_k, read as the
    normal quantile of its Student-t tail with C_k - 1 degrees of freedom (C_k clusters in the fold; no
    change with many). Under no heterogeneity the t_k are independent and about standard normal, so
    T = sum t_k / sqrt(K - 1) is too. The test is one-sided: H0 "the ranking finds no heterogeneity"
    (RATE <= 0) against "units ranked first gain more than average"
    (p = 1 - Phi(T)). With two rules, the difference (rule 1 - rule 2) is
    tested the same way on paired draws (H1: rule 1 ranks better).

    estimate: mean of the fold RATEs; std_err: its SE, sqrt(sum SE_k^2) / (K - 1);
    t_stat: T; p_value: one-sided; folds: the per-fold RateResults.
    """

    target: str
    priority: str
    estimate: float
    std_err: float
    t_stat: float
    p_value: float
    folds: tuple

    @property
    def detected(self):
        """Heterogeneity detected at the 5 % level (one-sided)."""
        return bool(self.p_value < 0.05)

    def describe(self):
        verdict = "heterogeneity detected" if self.detected else "no heterogeneity detected"
        return (f"{verdict} (sequential cross-fold test of the {self.target}, one-sided: "
                f"t = {self.t_stat:.2f}, p = {self.p_value:.3g}, {len(self.folds)} held-out folds)")


@dataclass(frozen=True)
class Rerandomization:
    """How a trial assigned treatment, to assign it again: the randomization inference of the heterogeneity test.

    Under the null the test is about (no heterogeneity: one effect ``tau`` for every unit), each unit's untreated
    outcome is known, Y(0) = Y - tau W, and so is every outcome under another assignment W*: Y* = Y(0) + tau W*.
    ``draws`` redraws the assignment of a fold's units as the design did: whole clusters permuted when treatment
    was assigned by cluster (``assignment``: the units of assignment, e.g. villages), units permuted otherwise,
    within ``strata`` when the trial was blocked, or each unit (cluster) drawn with its ``known`` probability;
    ``scores`` gives the DR scores of those outcomes with the same outcome models (mu0, mu1: fit on other folds)
    and propensity. tau is estimated (the DR ATE): the plug-in randomization test of Ding, Feller & Miratrix
    (2016, "Randomization inference for treatment effect variation", JRSS-B), approximately valid. The spread of
    the RATE over the redraws is the assignment's own variability, which the half-sample bootstrap over a handful
    of clusters per fold underestimates (a cluster-randomized trial of 60 villages, 12 per fold: fold t-statistics
    with SD 1.28 instead of 1, bench/bench_clustered.py)."""

    outcome: np.ndarray
    treated: np.ndarray
    mu0: np.ndarray
    mu1: np.ndarray
    propensity: object
    tau: float
    assignment: np.ndarray = None
    strata: np.ndarray = None
    known: np.ndarray = None

    #: Redraws computed at a time: memory stays at CHUNK rows of scores whatever the number of draws.
    CHUNK = 20

    def draws(self, test, rng, n_draws):
        """(n_draws, m) redrawn 0/1 assignments of the ``test`` units: the whole trial is assigned again (so a fold
        holding one cluster of each small stratum still varies) and the ``test`` units' columns are returned."""
        n = len(self.treated)
        if self.assignment is None:
            units, first = np.arange(n), np.arange(n)
        else:   # each unit of assignment (e.g. village): its id per row, and its first row
            _, first, units = np.unique(np.asarray(self.assignment), return_index=True, return_inverse=True)
            units = units.ravel()
        n_units = len(first)
        observed = np.asarray(self.treated, float)[first]
        columns = np.flatnonzero(test)
        out = np.empty((n_draws, len(columns)))
        if self.known is not None:
            e = np.asarray(self.known, float)[first]
            for b in range(n_draws):
                out[b] = (rng.random(n_units) < e)[units][columns]
            return out
        blocks = np.zeros(n_units, int) if self.strata is None else \
            np.unique(np.asarray(self.strata)[first], return_inverse=True)[1].ravel()
        members = [np.flatnonzero(blocks == g) for g in np.unique(blocks)]
        for b in range(n_draws):
            assigned = np.empty(n_units)
            for m in members:
                assigned[m] = observed[m][rng.permutation(len(m))]
            out[b] = assigned[units][columns]
        return out

    def scores(self, test, rng, n_draws):
        """(n_draws, m) DR scores of the ``test`` units under redrawn assignments (the null of one effect)."""
        return np.concatenate(list(self.score_chunks(test, rng, n_draws))) if n_draws else np.empty((0, int(
            np.sum(test))))

    def score_chunks(self, test, rng, n_draws):
        """The same scores, CHUNK redraws at a time."""
        from .scores import aipw_scores

        rows = np.flatnonzero(test)
        W = np.asarray(self.treated, float)[rows]
        untreated = np.asarray(self.outcome, float)[rows] - self.tau * W
        e = self.propensity if np.isscalar(self.propensity) else np.asarray(self.propensity, float)[rows]
        mu0, mu1 = np.asarray(self.mu0, float)[rows], np.asarray(self.mu1, float)[rows]
        for start in range(0, n_draws, self.CHUNK):
            yield np.array([aipw_scores(untreated + self.tau * w, w.astype(int), mu0, mu1, e)
                            for w in self.draws(test, rng, min(self.CHUNK, n_draws - start))])


#: Redraws behind the ATE's re-randomization SE: one number for every algorithm, so one study has one ATE and SE.
ATE_REDRAWS = 200


def rerandomized_ate(ate, rerandomization, n_draws=ATE_REDRAWS, seed=42):
    """The DR ``ate`` (a core.scores.AverageEffect) with its standard error the larger of the cluster-robust one and
    the spread of the mean DR score over treatment assigned again as the design did (Rerandomization): with few
    clusters the CR1 standard error is too small (40 villages, village effects with sd 0.7: the interval covered
    the ATE in 179 of 200 draws, bench/bench_clustered.py). When treatment was assigned by cluster the CR1 error
    is also read on Student's t with G - 1 degrees of freedom (G: its ``n_clusters``), as Cameron & Miller (2015)
    advise with few clusters: it is scaled by t_{G-1} / z, so that the reported interval +/- 1.96 SE is the t
    interval (60 villages in about 26 fold groups: coverage 0.88 before, bench/bench_clustered.py)."""
    std_err = ate.std_err
    if rerandomization.assignment is not None:
        std_err = small_sample_se(std_err, ate.n_clusters)
    everyone = np.ones(len(rerandomization.outcome), bool)
    means = np.concatenate([chunk.mean(axis=1) for chunk in
                            rerandomization.score_chunks(everyone, np.random.default_rng(seed), n_draws)])
    spread = zero_noise(float(np.std(means, ddof=1))) if len(means) > 1 else 0.0
    return dataclasses.replace(ate, std_err=max(spread, std_err))


def rerandomized_values(rerandomization, test, rng, n_draws, priorities, target, q):
    """(n_draws, k) the RATE of each of the k rules (``priorities``: (m,) or (m, k)) of the ``test`` units over
    redrawn assignments, streamed CHUNK redraws at a time; each rule's units sorted once (rate_order)."""
    priorities = np.asarray(priorities, float).reshape(int(np.sum(test)), -1)
    orders = [rate_order(priorities[:, j]) for j in range(priorities.shape[1])]
    values = [np.column_stack([rates_of_rows(chunk, priorities[:, j], q, target, orders[j])
                               for j in range(priorities.shape[1])])
              for chunk in rerandomization.score_chunks(test, rng, n_draws)]
    return np.concatenate(values) if values else np.empty((0, priorities.shape[1]))


def rate_order(priority):
    """The order rates_of_rows sorts units in (toc_and_rate's: decreasing priority, stable), or None when the
    priority has ties (or ranks nothing): those rows go through toc_and_rate, which averages tie groups."""
    ranks = _tie_ranks(priority)
    if len(ranks) == 0 or ranks.max() == 0 or ranks.max() + 1 < len(ranks):
        return None
    return np.argsort(-ranks, kind="stable")


def rates_of_rows(score_rows, priority, q=DEFAULT_Q, target="AUTOC", order=False):
    """(d,) toc_and_rate's RATE of each row of ``score_rows`` (d, n) under one ``priority`` (n,): the units sorted
    once for all rows (the redrawn assignments of one ranking; ``order``: rate_order(priority) when known). The
    same arithmetic as toc_and_rate, row by row (equal to rounding, tested); a priority with ties goes through
    toc_and_rate itself, row by row."""
    check_q(q)
    score_rows = np.atleast_2d(np.asarray(score_rows, float))
    if order is False:
        order = rate_order(priority)
    if order is None:
        return np.array([toc_and_rate(row, priority, q, target)[0] for row in score_rows])
    if target not in ("AUTOC", "QINI"):
        raise GeoCateError(f"Unknown RATE target '{target}'.", "Use 'AUTOC' or 'QINI'.")
    n = score_rows.shape[1]
    ordered = score_rows[:, order]
    k = np.arange(1, n + 1)
    toc = np.cumsum(ordered, axis=1) / k - ordered.mean(axis=1)[:, None]
    return toc.mean(axis=1) if target == "AUTOC" else np.mean(k / n * toc, axis=1)


def _with_std_err(rate, se):
    from scipy.stats import norm

    if not se > rate.std_err:
        return rate
    p = float(2 * norm.sf(abs(rate.estimate) / se)) if se > 0 else rate.p_value
    return dataclasses.replace(rate, std_err=se, ci=(rate.estimate - Z95 * se, rate.estimate + Z95 * se),
                               p_value=p)


def rerandomized_rates(rates, values):
    """The RateResults of rank_average_treatment_effect ([rule 1] or [rule 1, rule 2, rule 1 - rule 2]), each
    with the larger of its half-sample bootstrap SE and its spread over redrawn assignments (``values``:
    rerandomized_values of the same rules; the difference's spread from the paired redraws)."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return list(rates)
    spreads = [float(np.std(values[:, j], ddof=1)) for j in range(values.shape[1])]
    if len(rates) == 3:
        spreads.append(float(np.std(values[:, 0] - values[:, 1], ddof=1)))
    return [_with_std_err(rate, zero_noise(spread)) for rate, spread in zip(rates, spreads)]


def cluster_assignment(clusters, treated):
    """The units of assignment: the ``clusters`` (any labels; None: no clusters) when treatment is constant within
    each (a cluster-randomized trial), else None (units were assigned one by one)."""
    if clusters is None:
        return None
    ids = np.unique(np.asarray(clusters), return_inverse=True)[1].ravel()
    treated = np.asarray(treated, float)
    lowest = np.full(ids.max() + 1, np.inf)
    highest = np.full(ids.max() + 1, -np.inf)
    np.minimum.at(lowest, ids, treated)
    np.maximum.at(highest, ids, treated)
    return ids if np.array_equal(lowest, highest) else None


def small_sample_z(t_stat, n_clusters):
    """A t-statistic over ``n_clusters`` clusters as the standard normal quantile of its Student-t tail
    (n_clusters - 1 degrees of freedom): the same p-value, on the scale the folds are combined on."""
    from scipy.stats import norm
    from scipy.stats import t as student

    if not np.isfinite(t_stat) or n_clusters < 2:
        return t_stat
    tail = student.sf(abs(t_stat), n_clusters - 1)
    return float(np.sign(t_stat) * norm.isf(tail)) if tail > 0 else t_stat


def _t_stat(rate):
    if rate.std_err > 0:
        return rate.estimate / rate.std_err
    return 0.0 if rate.estimate == 0 else float(np.sign(rate.estimate)) * float("inf")


def sequential_rate_test(scores, folds, priority_for, target="AUTOC", clusters=None, names=None, q=DEFAULT_Q,
                         n_draws=200, seed=42, progress=None, is_cancelled=None, rerandomization=None):
    """The sequential cross-fold heterogeneity test (see :class:`HeterogeneityTest`).

    scores: (n,) DR scores whose outcome models did not see the unit's fold
    (core.scores.cross_fitted_scores: regularised models on a few inputs; an
    outcome model that overfits many raw inputs carries the earlier folds'
    noise into fold k's scores and makes the test over-reject);
    folds: (n,) fold ids, taken in sorted order;
    priority_for(train, test): priorities (m,) or (m, 2) for the ``test`` units
    from a model built on the ``train`` units only (boolean masks);
    clusters: (n,) bootstrap clusters; rerandomization: a :class:`Rerandomization` of a randomized trial, whose
    redrawn assignments give each fold's RATE a second standard error (the larger is used: with few clusters per
    fold the bootstrap's is too small). Returns [test of rule 1] or [rule 1, rule 2, rule 1 - rule 2].
    """
    from scipy.stats import norm

    from .errors import Cancelled

    scores = np.asarray(scores, float)
    folds = np.asarray(folds)
    clusters = np.arange(len(scores)) if clusters is None else np.asarray(clusters)
    walk = Folds(folds).require(2, "The sequential test")
    per_fold, counts = [], []
    for j, (_, train, test) in enumerate(walk.sequential()):
        if is_cancelled is not None and is_cancelled():
            raise Cancelled()
        if progress is not None:
            progress(j / (len(walk) - 1), f"Heterogeneity test: fold {j + 2} of {len(walk)}")
        # A forest has no callback: it runs in a worker thread, and a cancel stops the wait (see run_cancellable).
        priorities = run_cancellable(lambda train=train, test=test: priority_for(train, test), is_cancelled)
        priorities = np.asarray(priorities, float).reshape(int(test.sum()), -1)
        rates = rank_average_treatment_effect(scores[test], priorities, target, q, n_draws, clusters[test],
                                              names, seed + j)
        if rerandomization is not None:
            rates = rerandomized_rates(rates, rerandomized_values(
                rerandomization, test, np.random.default_rng(seed + 1000 + j), n_draws, priorities, target, q))
        per_fold.append(rates)
        counts.append(len(np.unique(clusters[test])))
    results = []
    # Few clusters in a fold: its t-statistic has about C_k - 1 degrees of freedom, not a normal law; it is
    # mapped to the normal quantile of the same tail before the folds are combined (no change with many).
    for r in range(len(per_fold[0])):
        rates = tuple(fold[r] for fold in per_fold)
        t_stat = float(np.sum([small_sample_z(_t_stat(rate), count) for rate, count in zip(rates, counts)])
                       / np.sqrt(len(rates)))
        estimate = zero_noise(float(np.mean([rate.estimate for rate in rates])))
        std_err = zero_noise(float(np.sqrt(np.sum([rate.std_err ** 2 for rate in rates])) / len(rates)))
        results.append(HeterogeneityTest(target=target, priority=rates[0].priority, estimate=estimate,
                                         std_err=std_err, t_stat=t_stat, p_value=float(norm.sf(t_stat)),
                                         folds=rates))
    if progress is not None:
        progress(1.0, "Heterogeneity test done")
    return results


@dataclass(frozen=True)
class Calibration:
    """Best linear predictor: Gamma_i = b1 + b2 (tau_i - mean tau) + e_i, OLS with cluster-robust standard errors.

    b1 (``mean_forest``) estimates the ATE; b2 (``differential``) is 1 when the
    CATE predictions are well calibrated and 0 when they carry no heterogeneity;
    p-values are one-sided for b2 > 0 (heterogeneity detected), two-sided for b1.
    Like the RATE, b2's p-value is only a valid test when the CATE was built
    without the evaluated units' outcomes.
    """

    mean_forest: float
    mean_forest_se: float
    mean_forest_p: float
    differential: float
    differential_se: float
    differential_p: float


def best_linear_predictor(scores, cate, clusters=None):
    """The BLP calibration test (see :class:`Calibration`): HC3 standard errors, or CR1 over ``clusters``."""
    sm = require("statsmodels.api", "statsmodels")
    from scipy.stats import norm

    cate = np.asarray(cate, float)
    if np.ptp(cate) == 0:  # a constant priority predicts no differences: b2 is 0, never "detected"
        mean, se = mean_and_se(scores, clusters)
        return Calibration(mean_forest=mean, mean_forest_se=se,
                           mean_forest_p=float(2 * norm.sf(abs(mean / se))) if se > 0 else 1.0,
                           differential=0.0, differential_se=0.0, differential_p=1.0)
    design = np.column_stack([np.ones(len(cate)), cate - cate.mean()])
    model = sm.OLS(np.asarray(scores, float), design)
    if clusters is None:
        fit = model.fit(cov_type="HC3")
    else:
        fit = model.fit(cov_type="cluster", cov_kwds={"groups": np.unique(np.asarray(clusters), return_inverse=True)[1]})
    b, se = zero_noise(fit.params), zero_noise(fit.bse)

    def p_value(estimate, std_err, tail):
        if std_err == 0:
            return 1.0 if estimate == 0 else 0.0
        return float(tail(estimate / std_err))

    return Calibration(
        mean_forest=float(b[0]), mean_forest_se=float(se[0]),
        mean_forest_p=p_value(b[0], se[0], lambda z: 2 * norm.sf(abs(z))),
        differential=float(b[1]), differential_se=float(se[1]), differential_p=p_value(b[1], se[1], norm.sf),
    )


def group_average_effects(scores, cate, n_groups=5, clusters=None):
    """GATEs by CATE quantile group: (group 1..G, n, mean score, SE, 95 % interval low, high) rows.

    Group 1 holds the smallest predicted effects. GATE_g = mean of Gamma_i in
    group g; its SE is robust to ``clusters`` (core.scores.mean_and_se;
    sd / sqrt(n_g) when every unit is its own cluster).
    """

    scores = np.asarray(scores, float)
    groups = effect_groups(cate, n_groups)
    clusters = np.arange(len(scores)) if clusters is None else np.asarray(clusters)
    rows = []
    for g in range(1, n_groups + 1):
        inside = groups == g
        mean, se = mean_and_se(scores[inside], clusters[inside])
        rows.append((g, int(inside.sum()), float(mean), float(se), float(mean - Z95 * se),
                     float(mean + Z95 * se)))
    return rows


def spatial_blocks(coords, block_size):
    """Block id of each unit on a square grid of side ``block_size`` (CRS units, metres for projected CRSs)."""
    if not block_size or block_size <= 0:
        raise GeoCateError("The spatial block size must be positive.", "Give a size in metres, e.g. 5000.")
    cells = np.floor(np.asarray(coords, float) / block_size).astype(np.int64)
    return location_ids(cells, precision=1)


def correlation_range(coords, values, max_units=2000, n_bins=20, threshold=0.1, seed=0):
    """Distance beyond which ``values`` of two units are no longer correlated (an empirical correlogram).

    Pairs of (at most ``max_units``) units are binned by distance; the range is
    the upper edge of the first bin whose mean product of standardised values
    falls below ``threshold``. Used to choose spatial blocks from the data.
    """
    coords = np.asarray(coords, float)
    values = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    if len(values) > max_units:
        pick = rng.choice(len(values), max_units, replace=False)
        coords, values = coords[pick], values[pick]
    z = (values - values.mean()) / (values.std() or 1.0)
    i, j = np.triu_indices(len(z), k=1)
    distance = np.hypot(*(coords[i] - coords[j]).T)
    products = z[i] * z[j]
    edges = np.quantile(distance, np.linspace(0, 0.5, n_bins + 1))
    which = np.digitize(distance, edges[1:-1])
    for b in range(n_bins):
        inside = which == b
        if inside.any() and products[inside].mean() < threshold:
            return float(edges[b + 1])
    return float(edges[-1])


def block_size_from_data(coords, outcome, treated, at_least=0.0):
    """A spatial block size chosen from the data: the correlation range of the outcome less its arm
    mean (correlation_range), or ``at_least`` (e.g. the window's footprint) if larger. coords in metres."""
    outcome, treated = np.asarray(outcome, float), np.asarray(treated)
    residual = outcome - np.where(treated == 1, outcome[treated == 1].mean(), outcome[treated == 0].mean())
    return float(max(correlation_range(coords, residual), at_least))


#: Groups each held-out fold should hold (the half-sample bootstrap and the sequential test work over them).
MIN_GROUPS_PER_FOLD = 4
TARGET_GROUPS_PER_FOLD = 10


def auto_block_size(coords, outcome, treated, locations=None, footprint=0.0, n_folds=5):
    """Spatial blocks chosen from the data, never so large that too few remain: (size in metres, note or None).

    Starts from block_size_from_data (the outcome's correlation range, at least the window's ``footprint``), then
    shrinks the blocks (by a fifth at a time, not below the footprint) until each of the ``n_folds`` folds holds
    TARGET_GROUPS_PER_FOLD groups. If blocks as large as the footprint leave fewer than MIN_GROUPS_PER_FOLD per
    fold, they shrink below it until that many are reached, and the note says that some neighbours' windows may
    then fall in different folds. The groups can never outnumber the locations and clusters themselves (blocks
    only merge them): when those are too few, the blocks are not shrunk for nothing, and the note says that the
    clusters are what is missing. Folds deal groups in turn (location_folds), so a fold holds groups // n_folds of
    them. Every loop is bounded."""
    coords = np.asarray(coords, float)

    def groups_at(size):
        return len(np.unique(honest_fold_groups(coords, size, locations)))

    most = groups_at(None)   # no blocks: the locations (and clusters) alone
    size = block_size_from_data(coords, outcome, treated, at_least=footprint)
    target = min(TARGET_GROUPS_PER_FOLD * n_folds, most)
    floor = MIN_GROUPS_PER_FOLD * n_folds
    for _ in range(200):
        if size <= footprint or groups_at(size) >= target:
            break
        size = max(float(footprint), size * 0.8)
    note = None
    if most < floor:
        note = (f"Only {most} groups of units can be kept apart (units at one location or in one cluster stay "
                f"together): fewer than {MIN_GROUPS_PER_FOLD} per fold of {n_folds}, whatever the spatial blocks. "
                "Standard errors and the heterogeneity test are unreliable with so few: add clusters or units.")
    elif groups_at(size) < floor:
        smallest = size / 1000.0
        for _ in range(200):
            if size <= smallest or groups_at(size) >= floor:
                break
            size *= 0.8
        note = (f"Spatial blocks as large as the image windows ({footprint:,.0f} m) left fewer than "
                f"{MIN_GROUPS_PER_FOLD} groups per fold; blocks of {size:,.0f} m are used, so some neighbours whose "
                "windows overlap may fall in different folds. Add units, or give a cluster field.")
    return float(size), note


def honest_fold_groups(coords, block_size=None, locations=None):
    """Group ids that cross-fitting folds must keep whole: units sharing a location, or a spatial block.

    coords in metres (see metric_coords); locations: (n,) ids such as a village
    field (default: identical coordinates); block_size None or 0: locations only.
    A location that straddles a block border joins both blocks in one group.
    """
    groups = location_ids(coords) if locations is None else np.unique(np.asarray(locations), return_inverse=True)[1]
    if block_size:
        groups = merge_groups(groups, spatial_blocks(coords, block_size))
    return groups


def honest_folds(coords, n_folds=5, block_size=None, locations=None, seed=42):
    """Cross-fitting folds (0..n_folds-1) that keep each group of honest_fold_groups together."""
    return location_folds(honest_fold_groups(coords, block_size, locations), n_folds, seed)


def metric_coords(coords, crs_wkt):
    """Coordinates in metres: projected CRSs scaled by their linear unit; geographic ones by an
    equirectangular approximation about the units' mean latitude (ample for blocks of kilometres)."""
    from osgeo import osr

    coords = np.asarray(coords, float)
    srs = osr.SpatialReference()
    srs.ImportFromWkt(crs_wkt)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    if srs.IsGeographic():
        latitude = np.radians(np.nanmean(coords[:, 1]))
        return np.column_stack([coords[:, 0] * 111320.0 * np.cos(latitude), coords[:, 1] * 110540.0])
    return coords * srs.GetLinearUnits()


def merge_groups(locations, blocks):
    """Group ids such that units sharing a location or a block share a group (connected components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(locations)
    loc = np.unique(locations, return_inverse=True)[1]
    blk = np.unique(blocks, return_inverse=True)[1] + loc.max() + 1
    size = blk.max() + 1
    graph = coo_matrix((np.ones(2 * n), (np.r_[loc, blk], np.r_[blk, loc])), shape=(size, size))
    return connected_components(graph, directed=False)[1][loc]


@dataclass(frozen=True)
class Evaluation:
    """What geocate:evaluate reports for one or two priority rules.

    rates: {"AUTOC": [RateResult...], "QINI": [...]} (rule 1, rule 2, difference);
    calibration: [Calibration per rule]; gates: [rows of group_average_effects per rule];
    scores: (n_used,) DR scores; used: (n,) bool; dropped: counts by reason;
    block_size: metres or None; n_clusters: bootstrap clusters; groups: (n_used,) the cluster of each used unit
    (the groups folds keep whole); folds: (n_used,) the folds the scores were cross-fitted on.
    """

    names: list
    rates: dict
    calibration: list
    gates: list
    scores: np.ndarray
    used: np.ndarray
    dropped: dict
    block_size: object
    n_clusters: int
    groups: np.ndarray = None
    folds: np.ndarray = None     # (n_used,) the cross-fitting folds of the scores


def evaluate_priorities(outcome, treated, priorities, names=None, covariates=None, coords=None,
                        locations=None, spatial_block=0, n_groups=5, n_draws=200, n_folds=5, seed=42,
                        treatment_name="treatment", progress=None, is_cancelled=None, design=None, strata=None,
                        known=None):
    """Evaluate priority rules on a trial: DR scores, AUTOC and Qini, BLP calibration, GATEs.

    strata: (n,) labels of the blocks a randomized trial was randomized within (each stratum's treated share is
    its units' propensity, strata join the outcome models, folds spread each stratum); known: (n,) known
    assignment probabilities. Both also shape the re-randomization that gives the RATEs their second SE.

    design: a core.design.StudyDesign; observational: the DR scores use each
    unit's propensity, cross-fitted from the covariates (default: randomized).

    priorities: (n,) or (n, 2); covariates: (n, p) for the outcome models (none:
    arm means); coords: (n, 2) in metres, needed for spatial blocks; locations:
    (n,) cluster ids (a village field). Units with a null anywhere are dropped
    and counted. The DR scores' outcome models are cross-fitted on honest folds
    (locations and blocks kept whole), and the bootstrap draws the same groups.
    ``is_cancelled()`` is polled at every bootstrap draw (raises Cancelled).
    """
    from .study import MIN_UNITS_PER_ARM, check_estimable, check_treatment, describe_dropped

    Y, W = np.asarray(outcome, float), np.asarray(treated, float)
    n = len(Y)
    if n == 0:
        raise GeoCateError("The layer holds no units.", "Choose a layer with units (or uncheck 'selected features only').")
    P = np.asarray(priorities, float).reshape(n, -1)
    names = list(names or [f"priority {j + 1}" for j in range(P.shape[1])])
    X = None if covariates is None or np.asarray(covariates).size == 0 else np.asarray(covariates, float).reshape(n, -1)
    check_treatment(W, treatment_name)
    dropped = {"treatment is null": int(np.isnan(W).sum())}
    bad = np.isnan(W)
    for label, missing in (("outcome is null", np.isnan(Y)), ("priority is null", np.isnan(P).any(axis=1)),
                           ("a covariate is null", np.isnan(X).any(axis=1) if X is not None else np.zeros(n, bool))):
        dropped[label] = int((missing & ~bad).sum())
        bad |= missing
    if coords is not None:
        missing = ~np.isfinite(np.asarray(coords, float)).all(axis=1)
        dropped["no geometry"] = int((missing & ~bad).sum())
        bad |= missing
    if locations is not None:
        missing = np.array([c is None for c in locations], bool)
        dropped["cluster is null"] = int((missing & ~bad).sum())
        bad |= missing
    if strata is not None and known is not None:
        raise GeoCateError("Both strata and known assignment probabilities were given.",
                           "Give one: with strata, each stratum's treated share is the probability.")
    if strata is not None:
        missing = np.array([c is None for c in strata], bool)
        dropped["stratum is null"] = int((missing & ~bad).sum())
        bad |= missing
    if known is not None:
        known = np.asarray(known, float)
        missing = np.isnan(known)
        dropped["assignment probability is null"] = int((missing & ~bad).sum())
        bad |= missing
        outside = int(np.sum((known[~bad] <= 0) | (known[~bad] >= 1)))
        if outside:
            raise GeoCateError(f"{outside} unit(s) have an assignment probability outside (0, 1).",
                               "Give probabilities strictly between 0 and 1.")
    used = ~bad
    for arm, label in ((1, "treated"), (0, "control")):
        count = int((used & (W == arm)).sum())
        if count < MIN_UNITS_PER_ARM:
            raise GeoCateError(
                f"Only {count} {label} unit(s) remain after dropping units with nulls ({describe_dropped(dropped)}); "
                f"at least {MIN_UNITS_PER_ARM} per arm are needed.", "Add units or fix the nulls.")
    check_estimable(W[used], Y[used], np.zeros((int(used.sum()), 0)))
    if spatial_block and coords is None:
        raise GeoCateError("Spatial blocks need the units' coordinates.", "Use a layer with geometries, or no blocks.")
    coords_used = np.asarray(coords, float)[used] if coords is not None else np.zeros((int(used.sum()), 2))
    loc_used = None if locations is None else np.asarray([str(c) for c in locations])[used]
    if loc_used is None and coords is None:
        loc_used = np.arange(int(used.sum()))
    block_size = None
    if spatial_block:
        block_size = float(spatial_block) if spatial_block > 0 else \
            auto_block_size(coords_used, Y[used], W[used], loc_used, n_folds=n_folds)[0]
    groups = honest_fold_groups(coords_used, block_size, loc_used)
    randomized = design is None or design.kind == "randomized"
    codes, e_design, inputs = None, None, None if X is None else X[used]
    if strata is not None and randomized:   # block randomization: each stratum's treated share, strata as inputs
        labels, codes = np.unique(np.asarray([str(c) for c in np.asarray(strata, object)[used]]), return_inverse=True)
        codes = codes.ravel()
        share = np.bincount(codes, W[used], minlength=len(labels)) / np.bincount(codes, minlength=len(labels))
        for j in np.flatnonzero((share == 0) | (share == 1)):
            raise GeoCateError(f"Stratum '{labels[j]}' has no {'control' if share[j] == 1 else 'treated'} unit: its "
                               "units' effects cannot be estimated.",
                               "Merge it with a neighbouring stratum, or drop its units.")
        e_design = share[codes]
        indicators = np.eye(len(labels))[codes]
        inputs = indicators if inputs is None else np.column_stack([inputs, indicators])
    elif known is not None and randomized:
        e_design = known[used]
    folds = Folds.of_groups(groups, n_folds, seed, codes).fold
    if progress:
        progress(0.1, "Doubly robust scores")
    scores, mu0, mu1, e = cross_fitted_scores(Y[used], W[used].astype(int), inputs, folds, seed=seed, design=design)
    if e_design is not None:
        scores, e = aipw_scores(Y[used], W[used].astype(int), mu0, mu1, e_design), e_design
    rerandomization = None
    if randomized:   # the design's own variability: treatment assigned again
        rerandomization = Rerandomization(outcome=Y[used], treated=W[used], mu0=mu0, mu1=mu1, propensity=e,
                                          tau=float(scores.mean()),
                                          assignment=cluster_assignment(loc_used, W[used]), strata=codes,
                                          known=None if known is None or codes is not None else known[used])
    rates = {}
    for step, target in enumerate(("AUTOC", "QINI")):
        if progress:
            progress(0.3 + 0.3 * step, f"{target} with {n_draws} half-sample bootstrap draws")
        rates[target] = rank_average_treatment_effect(scores, P[used], target, n_draws=n_draws, clusters=groups,
                                                      names=names, seed=seed, is_cancelled=is_cancelled)
        if rerandomization is not None:
            rates[target] = rerandomized_rates(rates[target], rerandomized_values(
                rerandomization, np.ones(int(used.sum()), bool), np.random.default_rng(seed + 1000), n_draws,
                P[used], target, rates[target][0].q))
    calibration = [best_linear_predictor(scores, P[used, j], groups) for j in range(P.shape[1])]
    gates = [group_average_effects(scores, P[used, j], n_groups, groups) for j in range(P.shape[1])]
    if progress:
        progress(1.0, "Done")
    return Evaluation(names=names, rates=rates, calibration=calibration, gates=gates, scores=scores, used=used,
                      dropped=dropped, block_size=block_size, n_clusters=int(len(np.unique(groups))), groups=groups, folds=folds)

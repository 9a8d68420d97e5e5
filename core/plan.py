"""Where the programme should go next: budgeted targeting from a trial's imagery, end to end (geocate:targeting).

One run (:func:`plan_targeting`):

1. estimate_cate's fit (core.pipeline: the same windows, features, folds, design, strata and outcome corrections):
   every trial unit's CATE from a forest that did not see its fold, the DR scores of the same folds, the
   heterogeneity test. With candidates or a map the forest's effect modifiers are the image features alone
   (covariates are not measured there; they still enter the outcome models), so trial units, candidates and
   cells are ranked by one model.
2. The rule (core.targeting.budget_rule): rank by CATE, or by CATE per unit of cost with costs; the budget
   takes the first units, within each cross-fitting fold (the module docstring of core.targeting says why).
3. Its value on the trial's units: GAIN, and the advantage over a random set of the same size (or cost) and
   over treating everyone (policy_value, SEs robust to the fold groups); the sequential GAIN (fold k ranked by
   a forest of folds 1..k-1 only), the figure to quote when no heterogeneity was detected; with costs, the
   budget curve (cost_curve, exact).
4. Alternatives on the same scores and budget: the imagery CATE, a covariates-only CATE (a forest on the
   covariates alone, same folds), and any priority field (higher values first); paired differences.
5. An optional shallow policy tree (depth 1-3) on the covariates and the image features' leading principal
   components, judged out-of-fold (cross_fitted_policy) and described as learnt on every unit.
6. New units: candidates (points not in the trial) get the model's CATE (the mean of the fold forests, as a
   map cell) and are treated when their ranking score reaches the trial rule's cut-off (the ranking score
   of the last trial unit the budget buys when taken over all units at once), inside the trial's support unless
   allowed; a map over an extent
   gets a "treat" band: the same share of places by CATE (cells have no cost).
"""

import dataclasses
import functools

import numpy as np

from .errors import GeoCateError
from .pipeline import estimate_cate
from .progress import stage
from .scores import Z95
from .study import spread_over
from .targeting import (
    budget_rule,
    compare_rules,
    cost_curve,
    cross_fitted_policy,
    policy_tree,
    policy_value,
    sequential_gain,
    targeting_message,
)

#: Candidates' windows read and predicted this many at a time (a map tile's cells): memory stays bounded.
CANDIDATE_CHUNK = 1024
#: Leading principal components of the image features offered to the policy tree ("image PC1", ...).
TREE_IMAGE_COMPONENTS = 3


@dataclasses.dataclass(frozen=True)
class Budget:
    """The budget: ``share`` of the units (0-1], or with costs ``total`` cost (in the cost field's units)."""

    share: float = None
    total: float = None

    def describe(self, cost_name=None):
        if self.total is not None:
            return f"a total cost of {self.total:,.6g}" + (f" ('{cost_name}')" if cost_name else "")
        return f"{self.share:.0%} of the units"


@dataclasses.dataclass
class Candidates:
    """Units not in the trial to rank: ``xy`` in ``crs_wkt``, optional ``cost`` (n,), a ``name`` for messages."""

    xy: np.ndarray
    crs_wkt: str
    cost: object = None
    name: str = "candidates"


@dataclasses.dataclass
class MapRequest:
    """A map of cells to treat: written to ``path`` over ``extent`` (raster CRS) / ``mask`` (WKT polygons),
    every ``stride`` pixels, on ``scheduler`` (core.maps.run_map)."""

    path: str
    extent: object = None
    mask: object = None
    stride: object = None
    scheduler: object = None


@dataclasses.dataclass
class TargetingPlan:
    """What plan_targeting found; arrays over every input unit (not used: treat False, priority 0, nan).

    treat: the rule's decisions (what GAIN judges); priority: 1 = first by the ranking score over all used
    units; ranking: CATE or CATE per cost; support: each unit's distance to the nearest other trial unit in
    the image features' leading components, over the map's reference (<= 1 inside); value: PolicyValue of
    treat; sequential: SequentialGain; curve: CostCurve with the budget marked; comparison: RuleComparison
    or None; tree / tree_value / tree_treat: the policy tree learnt on every unit, the value of its
    out-of-fold decisions, those decisions (-1 where not used); cut: the ranking score of the last unit the
    budget buys when taken over all units at once (the rule for new places), cate_cut the CATE above which the
    same share of places is taken by CATE alone (the map's: cells have no cost); candidates: dict or None;
    map_summary: run_map's summary or None; message: the plain sentence; metadata: the run record's part.
    """

    treat: np.ndarray
    priority: np.ndarray
    ranking: np.ndarray
    support: np.ndarray
    value: object
    sequential: object
    curve: object
    comparison: object
    tree: object
    tree_value: object
    tree_treat: np.ndarray
    cut: float
    cate_cut: float
    candidates: object
    map_summary: object
    message: str
    metadata: dict


def check_costs(cost, cost_name="cost", units="unit(s)"):
    """Refuse missing or non-positive costs, counted and named; returns them as floats."""
    c = np.asarray(cost, float)
    missing = int(np.sum(~np.isfinite(c)))
    if missing:
        raise GeoCateError(f"{missing} {units} have no value in the cost field '{cost_name}'.",
                           "Give every unit a cost (or drop those units first).")
    bad = int(np.sum(c <= 0))
    if bad:
        raise GeoCateError(f"{bad} {units} have a cost of 0 or less in '{cost_name}': costs must be positive.",
                           "Fix the cost field (a unit that costs nothing can be treated outside the budget).")
    return c


def check_budget(budget, cost=None, cost_name="cost"):
    """Refuse, before any fitting, a budget of 0, a share above 1, a total without costs or above the total
    cost, and missing or non-positive costs (``cost`` over every unit of the layer)."""
    if (budget.share is None) == (budget.total is None):
        raise GeoCateError("Give the budget either as a share of the units or, with a cost field, as a total cost.",
                           "Set BUDGET.")
    if cost is not None:
        c = check_costs(cost, cost_name)
        if budget.total is not None:
            if not np.isfinite(budget.total) or budget.total <= 0:
                raise GeoCateError(f"A budget of {budget.total:g} buys no unit.",
                                   "Give a positive total cost as BUDGET.")
            if budget.total > c.sum() * (1 + 1e-12):
                raise GeoCateError(f"The budget ({budget.total:,.6g}) is above the total cost of every unit "
                                   f"({c.sum():,.6g}).",
                                   f"Give at most {c.sum():,.6g}: a budget that treats everyone needs no targeting.")
    elif budget.total is not None:
        raise GeoCateError("A total budget needs the units' costs.", "Choose a cost field, or give BUDGET as a "
                           "share of the units (0-1).")
    if budget.share is not None:
        share = float(budget.share)
        if not np.isfinite(share) or share <= 0:
            raise GeoCateError(f"A budget of {share:g} treats no unit.", "Give a share above 0, e.g. 0.3.")
        if share > 1:
            raise GeoCateError(f"A budget share of {share:g} is above the total (1 = every unit).",
                               "Give a share between 0 and 1, or choose a cost field to give a total cost.")


#: The budget is taken within each of the cross-fitting folds (core.targeting.budget_rule).
N_FOLDS = 5


def check_fold_budget(budget, cost, n_units, n_folds=N_FOLDS):
    """Before the fit: a budget that, shared over the folds, buys nothing in a fold is refused (it failed only
    after the whole fit). With costs each fold gets about 1 / n_folds of the total."""
    if budget.total is not None and cost is not None:
        cheapest = float(np.nanmin(np.asarray(cost, float)))
        if budget.total / n_folds < cheapest:
            raise GeoCateError(
                f"A budget of {budget.total:,.6g} is taken within each of the {n_folds} cross-fitting folds (about "
                f"{budget.total / n_folds:,.6g} each), which cannot buy even the cheapest unit ({cheapest:,.6g}).",
                f"With a cost field, BUDGET is a total cost: give at least {n_folds * cheapest:,.6g}.")
    if budget.share is not None and budget.share * n_units / n_folds < 1:
        raise GeoCateError(f"A budget of {budget.share:g} of {n_units} units treats less than one unit in each of the "
                           f"{n_folds} cross-fitting folds.", f"Give a share of at least {n_folds / n_units:.2g}.")


def ranking_order(cate, cost=None):
    """Units in priority order: by CATE (ties: the earlier unit), or with costs by CATE per cost among the
    units expected to gain (core.targeting's order), then the others by CATE."""
    cate = np.asarray(cate, float)
    if cost is None:
        return np.argsort(-cate, kind="stable"), cate
    ratio = np.where(cate > 0, cate / np.asarray(cost, float), -np.inf)
    return np.lexsort((np.arange(len(cate)), -cate, -ratio)), ratio


def unit_support(features):
    """Each trial unit's support score (core.maps.SupportScore on the standardised image features) against the
    other units: its own distance, 0, left out. <= 1 inside the support, as a map cell's."""
    from .clusters import feature_scaling
    from .maps import SupportScore

    mean, sd = feature_scaling(features)
    support = SupportScore().fit((np.asarray(features, float) - mean) / sd)
    distances = support.tree_.query(support.tree_.data, k=2)[0][:, 1]
    return distances / support.reference_


def check_candidates(candidates, raster_path, bands, window_size_px, nodata):
    """Before the fit: refuse candidates none of which has a usable window (outside the raster, or nodata)."""
    from .represent import WindowSource

    ok = np.concatenate([   # read CANDIDATE_CHUNK windows at a time: memory stays bounded
        WindowSource([raster_path], candidates.xy[start:start + CANDIDATE_CHUNK], candidates.crs_wkt, bands,
                     window_size_px, None, nodata).read()[2]
        for start in range(0, len(candidates.xy), CANDIDATE_CHUNK)])
    if not np.any(ok):
        raise GeoCateError(f"None of the {len(candidates.xy)} {candidates.name} has a usable image window: they lie "
                           "outside the raster, too near its edge, or on nodata.",
                           "Give candidates over the imagery (check the layers' CRS), or leave CANDIDATES empty.")
    return int(np.sum(ok))


def _image_components(fitted, k=TREE_IMAGE_COMPONENTS):
    """The image features' leading principal components (unsupervised), named for the policy tree."""
    from sklearn.decomposition import PCA

    image = fitted.design[:, :fitted.features.shape[1]]
    k = int(min(k, image.shape[1], len(image) - 1))
    return PCA(n_components=k, random_state=0).fit_transform(image), [f"image PC{j + 1}" for j in range(k)]


def check_priorities(priorities):
    """Refuse a priority field with missing values (before any fitting)."""
    for name, values in (priorities or {}).items():
        missing = int(np.sum(~np.isfinite(np.asarray(values, float))))
        if missing:
            raise GeoCateError(f"The priority field '{name}' has no value for {missing} unit(s).",
                               "Fill it (e.g. with the field's lowest value, to rank them last) or leave "
                               "PRIORITY_FIELD empty.")


def plan_targeting(units, raster_path, budget, bands=None, window_size_px=33, nodata=None, seed=42, cost=None,
                   cost_name="cost", priorities=None, tree_depth=0, candidates=None, map_request=None,
                   outside_support=False, spatial_block=0, study_design=None, imagery=None, outcome_correction=None,
                   correction="linear", progress=None, is_cancelled=None):
    """The targeting plan of a trial (see the module docstring). Returns (study, result, plan).

    units: a core.study.UnitTable; budget: a :class:`Budget`; cost: (n,) costs over every unit (or None);
    priorities: {name: (n,) values, higher first} to compare; tree_depth: 0 (none) to 3; candidates: a
    :class:`Candidates`; map_request: a :class:`MapRequest`; outside_support: candidates and cells outside
    the trial's support may be chosen. Every bad input is refused before the fit.
    """
    from .inputs import design_matrix
    from .learners import CrossFittedCausalForest

    check_budget(budget, cost, cost_name)
    check_fold_budget(budget, cost, len(units.outcome))
    check_priorities(priorities)
    if tree_depth not in (0, 1, 2, 3):
        raise GeoCateError(f"A policy tree of depth {tree_depth} is not offered.", "Use 0 (none), 1, 2 or 3.")
    if candidates is not None:
        if cost is not None:
            if candidates.cost is None:
                raise GeoCateError(f"The {candidates.name} have no cost field '{cost_name}', but the budget is in "
                                   "costs.", f"Add the field '{cost_name}' to the candidates layer.")
            check_costs(candidates.cost, cost_name, f"of the {candidates.name}")
        if len(candidates.xy) == 0:
            raise GeoCateError(f"The {candidates.name} layer has no features.", "Give a layer with units to rank.")
        check_candidates(candidates, raster_path, bands, window_size_px, nodata)
    new_places = candidates is not None or map_request is not None
    grid, cells = None, None
    from .maps import forest_spec, map_grid, mask_cells, run_map

    if new_places:   # the grid (and its errors: a rotated raster, an extent off the raster) before the fit
        grid = map_grid(raster_path, window_size_px, None if map_request is None else map_request.stride,
                        None if map_request is None else map_request.extent)
        if map_request is not None and map_request.mask:
            cells = mask_cells(grid, map_request.mask)

    study, result = estimate_cate(units, raster_path, bands, window_size_px, nodata, seed, spatial_block=spatial_block,
                                  progress=stage(progress, 0.0, 0.6), is_cancelled=is_cancelled,
                                  outcome_correction=outcome_correction, correction=correction,
                                  study_design=study_design, imagery=imagery, covariates_modify=not new_places,
                                  keep_fit=True)
    fitted, used = result.fitted, study.used
    learner = fitted.learner
    n_all, n = len(used), int(used.sum())
    scores, cate, folds, groups = learner.dr_scores_, learner.cate_, learner.fold_, fitted.groups
    c = None if cost is None else np.asarray(cost, float)[used]
    budget_total = budget.total
    if c is not None and budget.share is not None:
        budget_total = float(budget.share) * float(c.sum())
    if c is not None and budget_total > c.sum() * (1 + 1e-12):
        raise GeoCateError(f"The budget ({budget_total:,.6g}) is above the total cost of the {n} units used "
                           f"({c.sum():,.6g}; {study.n_dropped} unit(s) were dropped).",
                           f"Give at most {c.sum():,.6g}.")
    share = None if c is not None else budget.share
    treat = budget_rule(cate, share, c, budget_total if c is not None else None, folds=folds)
    value = policy_value(scores, treat, groups, c)

    order, ranking = ranking_order(cate, c)
    priority = np.empty(n, int)
    priority[order] = np.arange(1, n + 1)
    k = int(treat.sum())
    # The rule for new places (candidates, cells) is the budget taken over all the trial's units at once: its last
    # unit's ranking score is the cut-off; cells, which have no cost, take the same share of places by CATE.
    pooled = budget_rule(cate, share, c, budget_total if c is not None else None)
    cut = float(ranking[pooled].min())
    cate_cut = float(np.sort(cate)[::-1][int(pooled.sum()) - 1])

    report_progress = stage(progress, 0.6, 0.75)
    if report_progress:
        report_progress(0.0, "Targeting: the sequential gain (each fold ranked by earlier folds)")
    sequential = sequential_gain(scores, folds, learner.priority_for, share, c,
                                 budget_total if c is not None else None, groups, is_cancelled)
    curve = cost_curve(scores, cate, c, groups, budget_total=budget_total if c is not None else float(k))

    rules = {"imagery CATE": cate}
    covariates = study.covariates[used]
    if covariates.shape[1]:
        propensity = getattr(learner, "propensity_", None)
        other = CrossFittedCausalForest(n_folds=learner.n_folds, n_estimators=learner.n_estimators, seed=seed).fit(
            study.outcome[used], study.treated[used].astype(int), design_matrix(None, covariates)[0], groups=groups,
            outcome_inputs=fitted.inputs, folds=folds, progress=stage(progress, 0.75, 0.85),
            is_cancelled=is_cancelled, propensity=None if np.isscalar(propensity) else propensity)
        rules["covariates-only CATE"] = other.cate_
    for name, values in (priorities or {}).items():
        rules[f"field '{name}'"] = np.asarray(values, float)[used]
    comparison = compare_rules(scores, rules, share, c, budget_total if c is not None else None, groups,
                               folds) if len(rules) > 1 else None

    tree = tree_value = None
    tree_treat = np.full(n_all, -1)
    tree_columns = []
    if tree_depth:
        components, component_names = _image_components(fitted)
        X = np.column_stack([covariates, components])
        tree_columns = list(study.covariate_names) + component_names
        decisions, _ = cross_fitted_policy(X, scores, folds, depth=tree_depth, names=tuple(tree_columns))
        tree_value = policy_value(scores, decisions, groups, c)
        tree = policy_tree(X, scores, depth=tree_depth, names=tuple(tree_columns))
        tree_treat[used] = decisions

    spread = functools.partial(spread_over, used)

    support = np.full(n_all, np.nan)
    support[used] = unit_support(fitted.features)
    ranked_candidates = map_summary = None
    if new_places:
        spec = forest_spec(grid, study, fitted.features, fitted.pipeline, learner, nodata, cells,
                           treat_cut=cate_cut if map_request is not None else None,
                           treat_outside_support=outside_support)
        if candidates is not None:
            if is_cancelled is not None and is_cancelled():
                from .errors import Cancelled

                raise Cancelled()
            if progress is not None:
                progress(0.86, f"Targeting: ranking {len(candidates.xy)} {candidates.name}")
            ranked_candidates = rank_candidates(spec, candidates, cut, outside_support, c is not None)
        if map_request is not None:
            map_summary = run_map(spec, map_request.path, map_request.scheduler, stage(progress, 0.88, 1.0),
                                  is_cancelled)
    if progress is not None:
        progress(1.0, "Done")

    test = result.heterogeneity
    message = targeting_message(test.p_value, value if test.p_value < 0.05 else sequential)
    metadata = {
        "budget": {"share": budget.share, "total": budget.total, "cost_field": cost_name if cost is not None else None,
                   "described": budget.describe(cost_name if cost is not None else None)},
        "rule": "CATE per unit of cost (units expected to gain), budget taken within each cross-fitting fold"
                if c is not None else "CATE, budget taken within each cross-fitting fold",
        "effect_modifiers": result.metadata["effect_modifiers"],
        "n_treat": k, "treated_share": float(value.treated_share), "n_units": n,
        "totals": {name: _estimate_record(value.total(name)) for name in ("vs_random", "vs_everyone", "value")}
        | ({"vs_random_cost": _estimate_record(value.total("vs_random_cost"))} if c is not None else {}),
        "budget_used": float(value.spend) if c is not None else float(value.treated_share),
        "cut": cut, "cate_cut": cate_cut,
        "gain": _estimate_record(value.gain), "vs_random": _estimate_record(value.vs_random),
        "vs_everyone": _estimate_record(value.vs_everyone), "value": _estimate_record(value.value),
        "vs_random_cost": _estimate_record(value.vs_random_cost) if value.vs_random_cost is not None else None,
        "sequential_gain": dict(_estimate_record(sequential.gain), p_value=sequential.p_value,
                                t_stat=sequential.t_stat),
        "heterogeneity_p": test.p_value,
        "message": message,
        "comparison": None if comparison is None else {
            "rules": [dict(zip(("rule", "n_treat", "gain", "std_err", "ci_low", "ci_high", "value", "value_se"), row))
                      for row in comparison.table()],
            "differences": [{"first": d.first, "second": d.second, **_estimate_record(d.gain),
                             "p_value": d.gain.p_value} for d in comparison.differences]},
        "curve": {"spend": curve.spend.tolist(), "gain": curve.gain.tolist(), "gain_se": curve.gain_se.tolist(),
                  "budget": curve.budget, "mean_cost": curve.mean_cost, "ate": curve.ate.estimate,
                  "costs": c is not None},
        "tree": None if tree is None else {
            "depth": tree_depth, "columns": tree_columns, "rule": tree.describe(),
            "out_of_fold": {"n_treat": tree_value.n_treated, **_estimate_record(tree_value.vs_random),
                            "gain": _estimate_record(tree_value.gain)}},
        "candidates": None if ranked_candidates is None else ranked_candidates["summary"],
        "map": None if map_summary is None else dict(map_summary),
        "outside_support_allowed": bool(outside_support),
    }
    result.metadata["targeting"] = metadata
    plan = TargetingPlan(
        treat=spread(treat, False, bool), priority=spread(priority, 0, int), ranking=spread(ranking),
        support=support, value=value, sequential=sequential, curve=curve, comparison=comparison, tree=tree,
        tree_value=tree_value, tree_treat=tree_treat, cut=cut, cate_cut=cate_cut, candidates=ranked_candidates,
        map_summary=map_summary, message=message, metadata=metadata)
    return study, result, plan


def _estimate_record(estimate):
    low, high = estimate.ci
    return {"estimate": estimate.estimate, "std_err": estimate.std_err, "ci_low": low, "ci_high": high}


def rank_candidates(spec, candidates, cut, outside_support=False, with_costs=False):
    """The candidates' CATE, its SE and support from the map model ``spec`` (core.maps.predict_at), their ranking
    score (CATE, or CATE per cost), priority (1 = first among candidates with a usable window; 0 without) and
    treat (the ranking score reaches the trial rule's ``cut``, inside the support unless ``outside_support``).
    Returns a dict of (m,) arrays and a ``summary``."""
    from .maps import NODATA, SUPPORT_THRESHOLD, predict_at

    out = np.concatenate([predict_at(spec, candidates.xy[start:start + CANDIDATE_CHUNK], candidates.crs_wkt)
                          for start in range(0, len(candidates.xy), CANDIDATE_CHUNK)], axis=1)
    ok = out[0] != NODATA
    cate = np.where(ok, out[0], np.nan).astype(float)
    cate_se = np.where(ok, out[1], np.nan).astype(float)
    support = np.where(ok, out[2], np.nan).astype(float)
    m = len(cate)
    cost = None if not with_costs else np.asarray(candidates.cost, float)
    ranking = np.full(m, np.nan)
    priority = np.zeros(m, int)
    if ok.any():
        rows = np.flatnonzero(ok)
        order, score = ranking_order(cate[rows], None if cost is None else cost[rows])
        ranking[rows] = score
        priority[rows[order]] = np.arange(1, len(rows) + 1)
    inside = support <= SUPPORT_THRESHOLD
    reaches = ok & (np.nan_to_num(ranking, nan=-np.inf) >= cut)
    treat = reaches & (inside | outside_support)
    summary = {"n": m, "usable": int(ok.sum()), "no_window": int((~ok).sum()), "treat": int(treat.sum()),
               "outside_support": int((ok & ~inside).sum()),
               "excluded_outside_support": int((reaches & ~inside).sum()) if not outside_support else 0,
               "cost_of_treated": float(cost[treat].sum()) if cost is not None else None}
    return {"cate": cate, "cate_lo": cate - Z95 * cate_se, "cate_hi": cate + Z95 * cate_se, "cate_se": cate_se,
            "support": support, "ranking": ranking, "priority": priority, "treat": treat, "ok": ok,
            "summary": summary}

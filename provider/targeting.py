"""geocate:targeting - where the programme should go next: a budgeted rule learnt from the trial's imagery and what
it gains (core.plan)."""

import os

import numpy as np
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
)
from qgis.PyQt.QtCore import QVariant

from .base import GeoCateAlgorithm, add_report_parameter, progress_to
from .convert import as_number, check_numeric_field, unit_point
from .predicted import add_outcome_correction_parameters, read_outcome_correction
from .study_parameters import (
    add_design_parameters,
    add_imagery_parameters,
    add_study_parameters,
    read_study_parameters,
)
from .styles import TREAT_STYLE

BUDGET, COST, PRIORITY_FIELD, TREE_DEPTH = "BUDGET", "COST", "PRIORITY_FIELD", "TREE_DEPTH"
CANDIDATES, EXTENT, STRIDE, OUTSIDE_SUPPORT = "CANDIDATES", "EXTENT", "STRIDE", "OUTSIDE_SUPPORT"
OUTPUT, OUTPUT_CANDIDATES, OUTPUT_MAP, OUTPUT_REPORT = "OUTPUT", "OUTPUT_CANDIDATES", "OUTPUT_MAP", "OUTPUT_REPORT"

UNIT_FIELDS = (("priority", QVariant.Int), ("treat", QVariant.Int), ("cate", QVariant.Double),
               ("cate_lo", QVariant.Double), ("cate_hi", QVariant.Double), ("support", QVariant.Double))
TREE_FIELD = (("tree_treat", QVariant.Int),)


def read_candidates(source, cost_field):
    """(features, core.plan.Candidates) of the CANDIDATES layer; its cost from the same field as the trial's."""
    from ..core.plan import Candidates

    costs = None
    if cost_field:
        if source.fields().lookupField(cost_field) >= 0:
            check_numeric_field(source.fields(), cost_field, "cost")
            costs = []
    crs = source.sourceCrs()
    features, xy = [], []
    for feature in source.getFeatures():
        features.append(feature)
        xy.append(unit_point(feature.geometry()))
        if costs is not None:
            costs.append(as_number(feature[cost_field]))
    crs_wkt = crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED) if crs.isValid() else ""
    return features, Candidates(np.asarray(xy, float).reshape(-1, 2), crs_wkt,
                                None if costs is None else np.asarray(costs, float),
                                f"candidates ('{source.sourceName()}')")


def field_values(features, name):
    return np.array([as_number(f[name]) for f in features], float)



def log_plan(feedback, n_features, result, plan, depth):
    """The run's log: warnings, units, the rule and its budget, the GAIN (pooled, in total, fold by fold), the rules
    compared, the policy tree, and the plain sentence (a warning without detected heterogeneity)."""
    record = plan.metadata
    for warning in result.metadata.get("warnings", []):
        feedback.pushWarning(warning)
    feedback.pushInfo(f"Units: {n_features} in the layer, {result.n_used} used, {result.n_dropped} dropped.")
    feedback.pushInfo(f"Rule: {record['rule']}; budget {record['budget']['described']}: {record['n_treat']} "
                      f"units treated ({record['treated_share']:.0%}).")
    feedback.pushInfo(plan.value.describe())
    total = record["totals"]["vs_random"]
    feedback.pushInfo(f"In total over the {record['n_units']} units: {total['estimate']:.4g} more than a random set "
                      f"of the same size (SE {total['std_err']:.3g}; the outcome's units).")
    sequential = record["sequential_gain"]
    feedback.pushInfo(f"GAIN judged fold by fold: {sequential['estimate']:.4g} (SE {sequential['std_err']:.3g}; "
                      f"one-sided p {sequential['p_value']:.3g}).")
    if plan.comparison is not None:
        for row in record["comparison"]["rules"]:
            feedback.pushInfo(f"Rule '{row['rule']}': GAIN {row['gain']:.4g} (SE {row['std_err']:.3g}), "
                              f"{row['n_treat']} treated.")
        for d in record["comparison"]["differences"]:
            feedback.pushInfo(f"{d['first']} - {d['second']}: GAIN {d['estimate']:+.4g} (SE {d['std_err']:.3g}, "
                              f"p {d['p_value']:.3g}).")
    if plan.tree is not None:
        feedback.pushInfo(f"Policy tree (depth {depth}), learnt on every unit:\n{plan.tree.describe()}")
    (feedback.pushInfo if result.heterogeneity.p_value < 0.05 else feedback.pushWarning)(plan.message)

class TargetingAlgorithm(GeoCateAlgorithm):
    result_style = TREAT_STYLE
    short_description = ("Where the programme should go next: ranks units (and new candidates, and map cells) by "
                         "their effect from the imagery, picks them within a budget, and estimates honestly what "
                         "that targeting gains over random allocation.")
    extra_tags = ("targeting", "policy learning", "policy tree", "budget", "Qini", "TOC", "maq", "policytree")

    def name(self):
        return "targeting"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Plan targeting within a budget"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "Turns a trial's effects into a targeting decision with an honest estimate of what it gains.\n\n"
            "The rule ranks units by their CATE from the imagery (the model of 'Estimate treatment effects from "
            "imagery': same windows, design, clusters and corrections), or by CATE per unit of cost with a cost "
            "field; the budget takes the first units. BUDGET is a share of the units (0-1), or with a cost field "
            "a total cost. Each trial unit is ranked by a model that did not see its fold, and the budget is taken "
            "within each fold.\n\n"
            "GAIN: the mean effect of the units the rule treats minus that of all units, from the doubly robust "
            "scores of the held-out folds, with a cluster-robust SE; also per unit against a random set of the "
            "same size (or cost) and against treating everyone, the GAIN judged fold by fold (honest when no "
            "heterogeneity was detected), and with costs the budget curve. The imagery CATE is compared, on the "
            "same folds and scores, with a covariates-only CATE and an optional priority field (higher first).\n\n"
            "TREE_DEPTH 1-3 adds a shallow policy tree on the covariates and the image's leading components "
            "(exhaustive search), judged out-of-fold.\n\n"
            "CANDIDATES (units not in the trial) and EXTENT (map cells) are ranked by the same model with the image "
            "features alone as effect modifiers, and chosen when they reach the rule's cut-off (the last trial "
            "unit the budget buys over all units at once; cells: the same share by CATE), inside the trial's support unless OUTSIDE_SUPPORT.\n\n"
            "Outputs: the units (and candidates) with priority (1 = first), treat (1 within the budget), cate, "
            "cate_lo, cate_hi, support (<= 1: imagery like the trial's); a map with bands cate, cate_se, support, "
            "treat; GAIN, GAIN_SE, N_TREAT, BUDGET_USED; a report with the budget curve and the rules compared.")

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        add_study_parameters(self)
        add_imagery_parameters(self)
        self.addParameter(QgsProcessingParameterNumber(
            BUDGET, "Budget: share of the units (0-1), or with a cost field a total cost",
            QgsProcessingParameterNumber.Double, defaultValue=0.3, minValue=0.0))
        self.addParameter(QgsProcessingParameterField(
            COST, "Cost of treating each unit (optional; the budget is then a total cost)",
            parentLayerParameterName="INPUT", type=QgsProcessingParameterField.Numeric, optional=True))
        self.addParameter(QgsProcessingParameterField(
            PRIORITY_FIELD, "A priority field to compare with (e.g. a poverty score; higher first)",
            parentLayerParameterName="INPUT", type=QgsProcessingParameterField.Numeric, optional=True))
        depth = QgsProcessingParameterNumber(TREE_DEPTH, "Policy tree depth (0 = none; a rule to read)",
                                             QgsProcessingParameterNumber.Integer, defaultValue=0, minValue=0,
                                             maxValue=3)
        self.addParameter(depth)
        add_design_parameters(self)
        add_outcome_correction_parameters(self)
        self.addParameter(QgsProcessingParameterFeatureSource(
            CANDIDATES, "Candidate units not in the trial (e.g. next round's villages)",
            [QgsProcessing.TypeVectorPoint, QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterExtent(EXTENT, "Map the cells to treat over this extent",
                                                       optional=True))
        stride = QgsProcessingParameterNumber(STRIDE, "Map stride: pixels between cells (default: the window size)",
                                              QgsProcessingParameterNumber.Integer, optional=True, minValue=0)
        stride.setFlags(stride.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(stride)
        outside = QgsProcessingParameterBoolean(OUTSIDE_SUPPORT, "Candidates and cells outside the trial's support "
                                                "may be chosen", defaultValue=False)
        outside.setFlags(outside.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(outside)
        self.addParameter(QgsProcessingParameterFeatureSink(OUTPUT, "Targeting of the trial's units"))
        self.addParameter(QgsProcessingParameterFeatureSink(OUTPUT_CANDIDATES, "Targeting of the candidates",
                                                            optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterRasterDestination(OUTPUT_MAP, "Map of cells to treat", optional=True,
                                                                  createByDefault=False))
        add_report_parameter(self)
        for name, label in (("GAIN", "GAIN: mean effect of the treated minus that of all units"),
                            ("GAIN_SE", "Standard error of the GAIN"),
                            ("GAIN_SEQUENTIAL", "GAIN judged fold by fold (each fold ranked by earlier folds)"),
                            ("GAIN_SEQUENTIAL_SE", "Standard error of the fold-by-fold GAIN"),
                            ("VS_RANDOM", "Gain per unit against a random set of the same size"),
                            ("VS_RANDOM_SE", "Standard error of the gain against a random set"),
                            ("VS_EVERYONE", "Gain per unit against treating everyone"),
                            ("N_TREAT", "Trial units treated"),
                            ("BUDGET_USED", "Budget used (share of units, or total cost)"),
                            ("HETEROGENEITY_P", "p-value of the trial's heterogeneity test"),
                            ("N_CANDIDATES_TREAT", "Candidates chosen"), ("CELLS_TREAT", "Map cells chosen")):
            self.addOutput(QgsProcessingOutputNumber(name, label))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.plan import Budget, plan_targeting

        chosen = read_study_parameters(self, parameters, context)
        budget_value = self.parameterAsDouble(parameters, BUDGET, context)
        cost_field = self.parameterAsString(parameters, COST, context) or None
        priority_field = self.parameterAsString(parameters, PRIORITY_FIELD, context) or None
        depth = self.parameterAsInt(parameters, TREE_DEPTH, context)
        outside = self.parameterAsBool(parameters, OUTSIDE_SUPPORT, context)
        features, units = chosen.read_units(feedback)
        correction, method, _ = read_outcome_correction(self, parameters, context, chosen.source, features)
        cost, priorities = self._unit_fields(chosen.source, features, cost_field, priority_field)
        candidate_source, candidate_features, candidates = self._candidates(parameters, context, cost_field)
        map_request, map_final = self._map_request(parameters, context)
        arguments = chosen.imagery_arguments()
        study_out, result, plan = plan_targeting(
            units, arguments.pop("raster_path"), Budget(total=budget_value) if cost_field else Budget(share=budget_value),
            **arguments, cost=cost, cost_name=cost_field or "cost", priorities=priorities, tree_depth=depth,
            candidates=candidates, map_request=map_request, outside_support=outside,
            study_design=chosen.study_design(), outcome_correction=correction, correction=method,
            progress=progress_to(feedback, 5, 95), is_cancelled=feedback.isCanceled)
        log_plan(feedback, len(features), result, plan, depth)
        dest_id = self._write_units(parameters, context, chosen.source, features, study_out, result, plan, depth)
        results = self._outputs(parameters, context, feedback, dest_id, chosen, result, plan, candidate_source,
                                candidate_features, map_final, outside)
        metadata = self.record(**{**result.metadata, "n_units": len(features), "n_used": result.n_used,
                                  "n_dropped": result.n_dropped})
        results = self.keep_result(context, dest_id, results, metadata, feedback)
        return self.write_report(parameters, context, results, feedback, lambda report: self._report(
            report, metadata, map_request), name=OUTPUT_REPORT)

    @staticmethod
    def _report(report, metadata, map_request):
        import tempfile

        from ..core.report import targeting_report

        with tempfile.TemporaryDirectory(prefix="geocate-") as folder:
            targeting_report(metadata, report, folder, map_request.path if map_request else None)

    def _unit_fields(self, source, features, cost_field, priority_field):
        """(the units' costs or None, {PRIORITY_FIELD: its values}), each field checked to be numeric."""
        cost, priorities = None, {}
        if cost_field:
            check_numeric_field(source.fields(), cost_field, "cost")
            cost = field_values(features, cost_field)
        if priority_field:
            check_numeric_field(source.fields(), priority_field, "priority")
            priorities[priority_field] = field_values(features, priority_field)
        return cost, priorities

    def _candidates(self, parameters, context, cost_field):
        """(CANDIDATES' source or None, its features, core.plan candidates or None); an output for candidates
        without a CANDIDATES layer is refused."""
        source = self.parameterAsSource(parameters, CANDIDATES, context) if parameters.get(CANDIDATES) else None
        if source is None:
            if parameters.get(OUTPUT_CANDIDATES):
                raise QgsProcessingException("An output for the candidates was asked for, but no CANDIDATES layer "
                                             "was given. Give the layer of units to rank, or leave that output "
                                             "empty.")
            return None, [], None
        features, candidates = read_candidates(source, cost_field)
        return source, features, candidates

    def _map_request(self, parameters, context):
        """(core.plan.MapRequest or None, the map output's final path or None); a map output without EXTENT is
        refused."""
        from ..core.plan import MapRequest

        if parameters.get(EXTENT) in (None, ""):
            if parameters.get(OUTPUT_MAP):
                raise QgsProcessingException("A map of cells to treat needs an extent to map (EXTENT). Give one, "
                                             "or leave the map output empty.")
            return None, None
        from .mapeffects import read_map_parameters

        raster_layer = self.parameterAsRasterLayer(parameters, "RASTER", context)
        extent, _, stride, _ = read_map_parameters(self, parameters, context, raster_layer)
        map_final = None
        if parameters.get(OUTPUT_MAP):
            map_final = self.parameterAsOutputLayer(parameters, OUTPUT_MAP, context)
            map_path = self._files.partial(map_final)
        else:   # for the report alone: a scratch folder, removed when the run ends, failed or not
            map_path = os.path.join(self.scratch_folder(), "targeting_map.tif")
        return MapRequest(map_path, extent=extent, stride=stride), map_final

    def _write_units(self, parameters, context, source, features, study_out, result, plan, depth):
        """The units with priority, treat, cate and its interval, support (and tree_treat): the sink; its id."""
        columns = {"priority": np.where(plan.priority > 0, plan.priority, np.nan),
                   "treat": np.where(study_out.used, plan.treat.astype(float), np.nan),
                   "cate": result.cate, "cate_lo": result.cate_lo, "cate_hi": result.cate_hi,
                   "support": plan.support,
                   "tree_treat": np.where(plan.tree_treat >= 0, plan.tree_treat, np.nan)}
        return self.write_units(parameters, context, OUTPUT, source, features,
                                UNIT_FIELDS + (TREE_FIELD if depth else ()), columns)

    def _outputs(self, parameters, context, feedback, dest_id, chosen, result, plan, candidate_source,
                 candidate_features, map_final, outside):
        """The output numbers, the candidates layer and the map (logged): the results dict."""
        record, sequential = plan.metadata, plan.metadata["sequential_gain"]
        results = {OUTPUT: dest_id, "GAIN": plan.value.gain.estimate, "GAIN_SE": plan.value.gain.std_err,
                   "GAIN_SEQUENTIAL": sequential["estimate"], "GAIN_SEQUENTIAL_SE": sequential["std_err"],
                   "VS_RANDOM": plan.value.vs_random.estimate, "VS_RANDOM_SE": plan.value.vs_random.std_err,
                   "VS_EVERYONE": plan.value.vs_everyone.estimate, "N_TREAT": record["n_treat"],
                   "BUDGET_USED": record["budget_used"], "HETEROGENEITY_P": result.heterogeneity.p_value,
                   "N_CANDIDATES_TREAT": None, "CELLS_TREAT": None}
        if plan.candidates is not None:
            summary = plan.candidates["summary"]
            results["N_CANDIDATES_TREAT"] = summary["treat"]
            feedback.pushInfo(f"Candidates: {summary['usable']} of {summary['n']} with a usable window; "
                              f"{summary['treat']} chosen; {summary['outside_support']} outside the trial's support"
                              + (f" ({summary['excluded_outside_support']} of them reach the cut-off but are not "
                                 "chosen)" if summary["excluded_outside_support"] else "") + ".")
            if summary["no_window"]:
                feedback.pushWarning(f"{summary['no_window']} candidate(s) have no usable image window (outside the "
                                     "raster, at its edge or on nodata): they keep their row with nulls.")
            if parameters.get(OUTPUT_CANDIDATES):
                self._write_candidates(parameters, context, candidate_source, candidate_features, plan.candidates)
                results[OUTPUT_CANDIDATES] = self._candidates_dest
        if plan.map_summary is not None:
            m = plan.map_summary
            results["CELLS_TREAT"] = m.get("treat", 0)
            feedback.pushInfo(f"Map: {m['usable']} cells with a usable window, {m.get('treat', 0)} chosen (CATE at "
                              f"least {plan.cate_cut:.3g}); {m.get('treat_outside_support', 0)} more reach it outside "
                              "the trial's support" + (" and are chosen." if outside else " and are not chosen."))
            if parameters.get(OUTPUT_MAP):
                from .mapeffects import style_map_on_load

                results[OUTPUT_MAP] = map_final
                style_map_on_load(self, map_final, dict(m, window_size_px=chosen.window),
                                  f"Cells to treat ({chosen.outcome})", chosen.raster)
        return results

    def _write_candidates(self, parameters, context, source, features, ranked):
        """The candidates layer with priority, treat, cate, cate_lo, cate_hi, support (nulls without a window)."""
        ok = ranked["ok"]
        columns = {"priority": np.where(ranked["priority"] > 0, ranked["priority"], np.nan),
                   "treat": np.where(ok, ranked["treat"].astype(float), np.nan), "cate": ranked["cate"],
                   "cate_lo": ranked["cate_lo"], "cate_hi": ranked["cate_hi"], "support": ranked["support"]}
        dest_id = self._candidates_dest = self.write_units(parameters, context, OUTPUT_CANDIDATES, source, features,
                                                           UNIT_FIELDS, columns)
        self.keep_layer(context, dest_id, self.result_style)


"""geocate:evaluate - is the heterogeneity a priority (e.g. a CATE) claims real? RATE, TOC, calibration."""

import os

import numpy as np
from qgis.core import (
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsWkbTypes,
)

from .base import GeoCateAlgorithm, add_report_parameter, progress_to
from .convert import as_label, as_number, check_numeric_field, unit_point, write_table
from .predicted import add_outcome_correction_parameters, read_outcome_correction, report_predicted_outcome
from .study_parameters import add_design_parameters, read_design_parameters
from .widgets import field_role


def read_rows(source, rules, treatment, outcome, covariates, spatial, cluster, strata, known, feedback):
    """One row per feature: (priorities, treatment, outcome, covariates, point, cluster, stratum, probability)."""
    rows = []
    for feature in source.getFeatures():
        if feedback.isCanceled():
            raise QgsProcessingException("The run was cancelled. Nothing was written.")
        rows.append(([as_number(feature[r]) for r in rules], as_number(feature[treatment]),
                     as_number(feature[outcome]), [as_number(feature[c]) for c in covariates],
                     unit_point(feature.geometry()) if spatial else (np.nan, np.nan),
                     as_label(feature[cluster]) if cluster else None,
                     as_label(feature[strata]) if strata else None,
                     as_number(feature[known]) if known else np.nan))
    return rows


def log_evaluation(feedback, n, evaluation, design_kind):
    """The run's log: units, bootstrap clusters and blocks, the few-clusters warning, every RATE."""
    from ..core.study import describe_dropped

    feedback.pushInfo(f"Units: {n} in the layer, {int(evaluation.used.sum())} used "
                      f"({describe_dropped(evaluation.dropped)}); {evaluation.n_clusters} bootstrap clusters"
                      + (f", spatial blocks of {evaluation.block_size:.0f} m" if evaluation.block_size else "") + ".")
    if evaluation.n_clusters < 40 and design_kind == "randomized":
        feedback.pushWarning(f"Only {evaluation.n_clusters} clusters: the half-sample bootstrap understates the "
                             "uncertainty with so few, so each standard error is also taken from assigning "
                             "treatment again as the design did (whole clusters when clusters were assigned "
                             "whole), and the larger is used.")
    for rate in evaluation.rates["AUTOC"] + evaluation.rates["QINI"]:
        feedback.pushInfo(f"{rate.target} {rate.priority}: {rate.estimate:.4f} (SE {rate.std_err:.4f}, "
                          f"95 % [{rate.ci[0]:.4f}, {rate.ci[1]:.4f}], p = {rate.p_value:.3g})")


class EvaluateAlgorithm(GeoCateAlgorithm):
    INPUT, PRIORITY, PRIORITY_2, TREATMENT, OUTCOME = "INPUT", "PRIORITY", "PRIORITY_2", "TREATMENT", "OUTCOME"
    COVARIATES, CLUSTER, SPATIAL_BLOCK, GROUPS = "COVARIATES", "CLUSTER", "SPATIAL_BLOCK", "GROUPS"
    BOOTSTRAP, SEED = "BOOTSTRAP", "SEED"
    OUTPUT, OUTPUT_PLOT, OUTPUT_REPORT = "OUTPUT", "OUTPUT_PLOT", "OUTPUT_REPORT"

    short_description = ("Is the heterogeneity a priority claims real? RATE (AUTOC, Qini), TOC curve, calibration and "
                         "group effects of a priority built without these units' outcomes.")
    extra_tags = ("RATE", "AUTOC", "Qini", "TOC", "calibration")

    def name(self):
        return "evaluate"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Evaluate heterogeneity (RATE, TOC, calibration)"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "Tests whether ranking units by a priority (a field you bring, e.g. a targeting score or the "
            "predictions of a model fit on another study) finds units that gain more than average, without "
            "ground truth.\n\n"
            "The priority must have been built without the evaluated units' outcomes (grf's warning): a model fit "
            "on these units ranks them by noise it learnt from them, and the test then rejects too often. "
            "GeoCATE's own 'cate' field does not qualify for a formal test: it is cross-fitted on the same units "
            "(each unit's CATE comes from a model that saw the other evaluated units). For the CATE of 'Estimate "
            "treatment effects from imagery', use the sequential cross-fold test that algorithm reports "
            "(AUTOC_P); here its AUTOC is a descriptive figure.\n\n"
            "Doubly robust scores with cross-fitted outcome models; the TOC curve, AUTOC and Qini exactly as "
            "grf's rank_average_treatment_effect defines them (ties share their group's mean score), with a "
            "half-sample bootstrap over clusters (locations, a CLUSTER field, or spatial blocks); the best linear "
            "predictor calibration test and group average effects (GATEs), with standard errors robust to the "
            "same clusters. With PRIORITY_2, both rules are compared with a paired bootstrap. p-values of the "
            "AUTOC and Qini are two-sided (H0: RATE = 0); the BLP differential's is one-sided."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.INPUT, "Trial units", [QgsProcessing.TypeVector]))
        numeric = QgsProcessingParameterField.Numeric
        # No default: a result's own 'cate' was built from these units' outcomes and is not valid for the test.
        self.addParameter(field_role(QgsProcessingParameterField(
            self.PRIORITY, "Priority (higher = treat first), built without these units' outcomes",
            parentLayerParameterName=self.INPUT, type=numeric), "priority"))
        self.addParameter(field_role(QgsProcessingParameterField(
            self.TREATMENT, "Treatment field (0 = control, 1 = treated)", parentLayerParameterName=self.INPUT,
            type=numeric), "treatment"))
        self.addParameter(field_role(QgsProcessingParameterField(
            self.OUTCOME, "Outcome field", parentLayerParameterName=self.INPUT, type=numeric), "outcome"))
        self.addParameter(QgsProcessingParameterField(
            self.PRIORITY_2, "Second priority to compare with", parentLayerParameterName=self.INPUT,
            type=numeric, optional=True))
        self.addParameter(QgsProcessingParameterField(
            self.COVARIATES, "Covariates for the outcome models", parentLayerParameterName=self.INPUT,
            type=numeric, allowMultiple=True, optional=True))
        add_design_parameters(self, design=False)   # CLUSTER, STRATA, PROPENSITY, SPATIAL_BLOCK; DESIGN below
        for name, label, default, low, high in ((self.GROUPS, "Number of GATE groups", 5, 2, 20),
                                                (self.BOOTSTRAP, "Bootstrap draws", 200, 20, 10000),
                                                (self.SEED, "Random seed", 42, 0, 2 ** 31 - 1)):
            parameter = QgsProcessingParameterNumber(name, label, QgsProcessingParameterNumber.Integer,
                                                     defaultValue=default, minValue=low, maxValue=high)
            if name != self.SEED:
                parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(parameter)
        self.addParameter(QgsProcessingParameterFeatureSink(
            self.OUTPUT, "Evaluation table", QgsProcessing.TypeVector))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_PLOT, "TOC curve (PNG)", "PNG files (*.png)", optional=True, createByDefault=False))
        add_report_parameter(self)
        self.addParameter(QgsProcessingParameterEnum(
            "DESIGN", "Study design (observational: the DR scores use a propensity estimated from the covariates)",
            ["randomized", "observational"], defaultValue=0))
        add_outcome_correction_parameters(self)
        for name, label in (("AUTOC", "AUTOC of the priority"), ("AUTOC_SE", "Standard error of the AUTOC"),
                            ("AUTOC_P", "p-value of the AUTOC"), ("QINI", "Qini of the priority"),
                            ("QINI_SE", "Standard error of the Qini"), ("N_USED", "Units used")):
            self.addOutput(QgsProcessingOutputNumber(name, label))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.evaluate import evaluate_priorities
        from ..core.report import rate_rows

        source, arguments, raw = self._read(parameters, context, feedback)
        seed, n_draws = arguments["seed"], self.parameterAsInt(parameters, self.BOOTSTRAP, context)
        design_kind = arguments["design"].kind
        evaluation = evaluate_priorities(**arguments, n_groups=self.parameterAsInt(parameters, self.GROUPS, context),
                                         n_draws=n_draws, progress=progress_to(feedback),
                                         is_cancelled=feedback.isCanceled)
        autoc, qini = evaluation.rates["AUTOC"][0], evaluation.rates["QINI"][0]
        predicted = None
        if raw["correction"] is not None:   # the ATE under every correction, on the evaluation's own folds
            from ..core.corrections import correction_record

            used = evaluation.used
            covariates = arguments["covariates"]
            predicted = correction_record(
                raw["correction"], raw["method"], raw["outcome"][used], arguments["treated"][used].astype(int),
                covariates[used] if covariates is not None else None, evaluation.folds, evaluation.groups, seed)
            report_predicted_outcome(predicted, feedback)
        log_evaluation(feedback, len(arguments["treated"]), evaluation, design_kind)
        metadata = self.record(
            used={self.SPATIAL_BLOCK: arguments["spatial_block"]}, n_units=len(arguments["treated"]), n_used=int(evaluation.used.sum()), dropped=evaluation.dropped,
            bootstrap_clusters=evaluation.n_clusters, spatial_block_m=evaluation.block_size,
            predicted_outcome=predicted,
            rates=[{"target": r.target, "priority": r.priority, "estimate": r.estimate, "std_err": r.std_err,
                    "ci": list(r.ci), "p_value": r.p_value}
                   for r in evaluation.rates["AUTOC"] + evaluation.rates["QINI"]])
        # All numbers are in hand: only now are the outputs created (under partial names until all succeeded).
        dest_id = write_table(self, parameters, context, rate_rows(evaluation))
        plot_path, report_path = self._figures(parameters, context, feedback, evaluation, metadata, source)
        self.write_run_metadata(dest_id, metadata, feedback)
        return {self.OUTPUT: dest_id, self.OUTPUT_PLOT: plot_path or None, self.OUTPUT_REPORT: report_path or None,
                "AUTOC": autoc.estimate, "AUTOC_SE": autoc.std_err, "AUTOC_P": autoc.p_value,
                "QINI": qini.estimate, "QINI_SE": qini.std_err, "N_USED": int(evaluation.used.sum())}

    def _read(self, parameters, context, feedback):
        """(source, evaluate_priorities' arguments, {outcome (as measured), correction, method}): the fields
        checked, every unit read, the outcome corrected where it comes from a map."""
        from ..core.design import StudyDesign
        from ..core.evaluate import metric_coords

        source = self.parameterAsSource(parameters, self.INPUT, context)
        if source is None:
            raise QgsProcessingException("The units layer could not be read. Choose a layer in INPUT.")
        priority_2 = self.parameterAsString(parameters, self.PRIORITY_2, context)
        rules = [self.parameterAsString(parameters, self.PRIORITY, context)] + ([priority_2] if priority_2 else [])
        treatment = self.parameterAsString(parameters, self.TREATMENT, context)
        outcome = self.parameterAsString(parameters, self.OUTCOME, context)
        covariates = self.parameterAsFields(parameters, self.COVARIATES, context)
        cluster, strata, known, _ = read_design_parameters(self, parameters, context)
        spatial_block = self.parameterAsDouble(parameters, self.SPATIAL_BLOCK, context)
        seed = self.parameterAsInt(parameters, self.SEED, context)
        self._check_fields(source.fields(), rules, treatment, outcome, covariates, cluster, strata, known, feedback)
        spatial = source.wkbType() != QgsWkbTypes.NoGeometry
        if spatial_block < 0 and not spatial:   # auto, on a table: no geometry to make blocks of
            feedback.pushInfo("The layer has no geometries: no spatial blocks (folds keep clusters and units whole).")
            spatial_block = 0
        if spatial_block and not spatial:
            raise QgsProcessingException("Spatial blocks need geometries, and this layer has none. Set 'Spatial blocks' to 0.")
        rows = read_rows(source, rules, treatment, outcome, covariates, spatial, cluster, strata, known, feedback)
        n = len(rows)
        for j, rule in enumerate(rules):
            ranks = np.array([r[0][j] for r in rows], float)
            if np.unique(ranks[np.isfinite(ranks)]).size < 2:
                raise QgsProcessingException(
                    f"The priority '{rule}' takes a single value on every unit: it ranks nobody before anybody, so "
                    "there is nothing to evaluate. Choose a field that orders the units.")
        design_kind = ("randomized", "observational")[self.parameterAsEnum(parameters, "DESIGN", context)]
        if design_kind == "observational" and not covariates:
            raise QgsProcessingException("An observational design estimates the propensity from the covariates, and "
                                         "none were given. Choose the covariates that decided treatment.")
        correction, method, _ = read_outcome_correction(self, parameters, context, source, [])
        measured = np.array([r[2] for r in rows], float)
        outcomes = measured
        if correction is not None:
            correction.check_compatible(outcome)
            outcomes = correction.apply(measured, method)[0]
        coords = None
        if spatial:
            crs = source.sourceCrs()
            if not crs.isValid():
                raise QgsProcessingException("The layer has no CRS. Set it (Layer Properties > Source) first.")
            coords = metric_coords(np.array([r[4] for r in rows], float).reshape(n, 2), crs.toWkt())
        arguments = dict(
            outcome=outcomes, treated=np.array([r[1] for r in rows], float),
            priorities=np.array([r[0] for r in rows], float).reshape(n, len(rules)), names=rules,
            covariates=np.array([r[3] for r in rows], float).reshape(n, len(covariates)) if covariates else None,
            coords=coords, locations=[r[5] for r in rows] if cluster else None, spatial_block=spatial_block,
            seed=seed, treatment_name=treatment, design=StudyDesign(design_kind, seed=seed),
            strata=[r[6] for r in rows] if strata else None,
            known=np.array([r[7] for r in rows], float) if known else None)
        return source, arguments, {"outcome": measured, "correction": correction, "method": method}

    def _figures(self, parameters, context, feedback, evaluation, metadata, source):
        """The TOC plot and the report, where asked for: (plot path or None, report path or None)."""
        import tempfile

        from ..core.report import evaluation_report, plot_toc
        from ..core.study import describe_dropped

        plot_path = self.output_file(parameters, self.OUTPUT_PLOT, context)
        report_path = self.output_file(parameters, self.OUTPUT_REPORT, context)
        if report_path:
            chosen = metadata["parameters"]
            inputs = {"layer": source.sourceName(), "priority": chosen["PRIORITY"],
                      "second priority": chosen["PRIORITY_2"] or "-", "treatment": chosen["TREATMENT"],
                      "outcome": chosen["OUTCOME"], "covariates": ", ".join(chosen["COVARIATES"]) or "-",
                      "cluster": chosen["CLUSTER"] or "-", "units used": int(evaluation.used.sum()),
                      "units dropped": describe_dropped(evaluation.dropped), "bootstrap draws": chosen["BOOTSTRAP"],
                      "bootstrap clusters": evaluation.n_clusters,
                      "spatial block (m)": evaluation.block_size or "-", "seed": chosen["SEED"]}
            with tempfile.TemporaryDirectory(prefix="geocate-") as folder:  # the report embeds the TOC plot
                evaluation_report(evaluation, report_path, plot_path or os.path.join(folder, "toc.png"), inputs,
                                  metadata)
            feedback.pushInfo(f"Report: {self.final_path(report_path)}.")
        elif plot_path:
            plot_toc([r for r in evaluation.rates["AUTOC"] if " - " not in r.priority], plot_path)
        if plot_path:
            feedback.pushInfo(f"TOC plot: {self.final_path(plot_path)}.")
        return plot_path, report_path

    def _check_fields(self, fields, rules, treatment, outcome, covariates, cluster, strata, known, feedback):
        """Refuse fields that are missing, not numeric, or a priority that is the outcome or the treatment; warn
        that GeoCATE's own cate is no valid test here."""
        if "cate" in rules and fields.lookupField("cate_se") >= 0:   # GeoCATE's own cross-fitted CATE
            feedback.pushWarning(
                "The priority 'cate' is GeoCATE's own estimate, cross-fitted on these same units: its AUTOC here "
                "describes the ranking but is not a valid test. The test of heterogeneity for it is the "
                "sequential cross-fold test that 'Estimate treatment effects from imagery' reports (AUTOC_P).")
        for name, role in [(treatment, "treatment"), (outcome, "outcome")] + [(r, "priority") for r in rules] + [
                (c, "covariate") for c in covariates]:
            check_numeric_field(fields, name, role)
        for rule in rules:
            if rule in (outcome, treatment):
                raise QgsProcessingException(
                    f"The priority '{rule}' is the {'outcome' if rule == outcome else 'treatment'} being evaluated: "
                    "a priority must be built without these units' outcomes (e.g. a CATE from a model that did not "
                    "see them, or a poverty score). Choose another priority field.")
        if cluster and fields.lookupField(cluster) < 0:
            raise QgsProcessingException(f"The cluster field '{cluster}' does not exist. Choose one of the layer's fields.")
        if strata and fields.lookupField(strata) < 0:
            raise QgsProcessingException(f"The strata field '{strata}' does not exist. Choose one of the layer's fields.")
        if known:
            check_numeric_field(fields, known, "assignment probability")

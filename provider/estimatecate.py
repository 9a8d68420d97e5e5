"""geocate:estimatecate - per-unit treatment effects of a trial from the imagery around each unit."""

import os

from qgis.core import (
    QgsProcessingOutputNumber,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterNumber,
)

from ..core.learners import FORESTS
from .base import GeoCateAlgorithm, add_report_parameter, progress_to
from .convert import unit_columns
from .predicted import (
    add_outcome_correction_parameters,
    ppi_outputs,
    read_outcome_correction,
    report_predicted_outcome,
)
from .study_parameters import (
    DESIGNS,
    add_design_parameters,
    add_imagery_parameters,
    add_sensitivity_parameters,
    add_study_parameters,
    read_study_parameters,
    report_sensitivity,
)

#: FOREST's choices, in the order of core.learners.FORESTS.
FOREST_CHOICES = ["Five fold forests (each unit predicted by the forest grown without its fold)",
                  "One forest, out of bag by groups (grf's construction; faster)"]


def log_estimate(feedback, n_features, study, result):
    """The run's log: warnings, units, the ATE, the heterogeneity test and the pooled AUTOC, the clusters of the
    standard errors, an outcome from a map, the design's propensity."""
    from ..core.scores import Z95
    from ..core.study import describe_dropped

    for warning in result.metadata.get("warnings", []):
        feedback.pushWarning(warning)
    not_ok = int((~study.patch_ok).sum())
    feedback.pushInfo(f"Units: {n_features} in the layer, {result.n_used} used, {result.n_dropped} dropped"
                      f" ({describe_dropped(study.dropped)}).")
    if not_ok:
        feedback.pushWarning(f"{not_ok} unit(s) have no usable image window; they keep their row "
                             "with null effects and patch_ok = 0.")
    low, high = result.ate - Z95 * result.ate_se, result.ate + Z95 * result.ate_se
    feedback.pushInfo(f"ATE (doubly robust) = {result.ate:.4f}, SE {result.ate_se:.4f}, "
                      f"95 % interval [{low:.4f}, {high:.4f}].")
    autoc, test = result.autoc, result.heterogeneity
    feedback.pushInfo(f"Heterogeneity: {test.describe()}; held-out AUTOC {test.estimate:.4f}, SE {test.std_err:.4f}.")
    feedback.pushInfo(f"AUTOC of the pooled out-of-fold CATE (descriptive, not a test) = {autoc.estimate:.4f}.")
    feedback.pushInfo(f"Standard errors are robust to {result.metadata['fold_groups']} clusters "
                      f"({result.metadata['clustered_by']}"
                      + (", spatial blocks" if result.metadata["spatial_block_m"] else "") + ").")
    if result.metadata["spatial_block_m"]:
        feedback.pushInfo(f"Folds and bootstrap clusters: spatial blocks of {result.metadata['spatial_block_m']:.0f} m "
                          f"({result.metadata['fold_groups']} groups).")
    report_predicted_outcome(result.metadata["predicted_outcome"], feedback)
    if result.metadata.get("propensity_model") and result.metadata["study_design"] == "randomized":
        feedback.pushInfo(f"Randomized design: the propensity of each unit is "
                          f"{result.metadata['propensity_model']['model']}"
                          + (f" ({result.metadata['strata']} strata; they also join the outcome models, and the "
                             "folds spread each stratum over every fold)." if result.metadata.get("strata")
                             else "."))
    elif result.metadata.get("propensity_model"):
        fit = result.metadata["propensity_model"]
        feedback.pushInfo(f"Observational design: propensity from {fit['model']}; calibration slope "
                          f"{fit.get('calibration_slope', float('nan')):.2f} (1 = calibrated).")


class EstimateCateAlgorithm(GeoCateAlgorithm):
    GROUPS, CLUSTER, OUTPUT, OUTPUT_REPORT = "GROUPS", "CLUSTER", "OUTPUT", "OUTPUT_REPORT"
    FOREST = "FOREST"
    OUTCOME_CORRECTION, CORRECTION, OUTCOME_TRUTH = "OUTCOME_CORRECTION", "CORRECTION", "OUTCOME_TRUTH"
    DESIGN, STRATA, PROPENSITY = "DESIGN", "STRATA", "PROPENSITY"
    DESIGNS = DESIGNS

    short_description = ("Each trial unit's treatment effect (CATE) from the imagery around it, with intervals, effect "
                         "groups, the doubly robust ATE and a valid test of heterogeneity.")
    extra_tags = ("causal forest", "MOSAIKS")

    def name(self):
        return "estimatecate"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Estimate treatment effects from imagery"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "Estimates each trial unit's conditional average treatment effect (CATE) from the "
            "imagery around it (and optional covariates).\n\n"
            "Each unit's square window ('Window size' pixels per side) is summarised by random "
            "convolutional features (as in MOSAIKS); with the covariates, they describe for whom the effect "
            "differs, and a causal forest (generalized random forests) learns the effect from them, with an "
            "outcome model on their principal components and the trial's known assignment probability. "
            "Cross-fitting: each unit's CATE and 95 % interval come from a forest that did not see it, nor "
            "its cluster, calibrated on that forest's own training units so that extreme effects are less "
            "shrunk toward the mean. The interval covers the forest's sampling noise, assuming independent "
            "units, not the smoothing bias that remains: for statements about groups of units, use the "
            "group effects (GATEs) in the report.\n\n"
            "Heterogeneity test (AUTOC, AUTOC_SE, AUTOC_T, AUTOC_P): the sequential cross-fold test grf "
            "recommends. Each fold is ranked by a forest built on the earlier folds only and judged by its "
            "doubly robust scores; the fold t-statistics are combined. It is one-sided: a small AUTOC_P says "
            "the units the CATE ranks first gain more than average. AUTOC_POOLED, the AUTOC of the pooled "
            "out-of-fold CATE, is descriptive only (its units were ranked by models that saw the others).\n\n"
            "Cluster field (optional, e.g. village): units of one cluster stay in one fold, and the ATE, group "
            "effects and test have standard errors robust to correlation within clusters (as do units at one "
            "location, and spatial blocks).\n\n"
            "Output: the units with cate, cate_lo, cate_hi, cate_se, group (1 = smallest effects) "
            "and patch_ok (0 where the window is outside the raster, crosses its edge or holds "
            "nodata; those units keep their row with nulls). Also the doubly robust ATE and its "
            "standard error. Polygons use their centroid."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        add_study_parameters(self)
        add_imagery_parameters(self)
        groups = QgsProcessingParameterNumber(
            self.GROUPS, "Number of effect groups", QgsProcessingParameterNumber.Integer,
            defaultValue=3, minValue=2, maxValue=10)
        groups.setFlags(groups.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(groups)
        forest = QgsProcessingParameterEnum(self.FOREST, "Causal forest", FOREST_CHOICES, defaultValue=0)
        forest.setFlags(forest.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(forest)
        add_design_parameters(self)
        add_sensitivity_parameters(self)
        add_outcome_correction_parameters(self, truth=True)
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Treatment effects (CATE)"))
        add_report_parameter(self)
        self.addOutput(QgsProcessingOutputNumber("ATE", "Average treatment effect (doubly robust)"))
        self.addOutput(QgsProcessingOutputNumber("ATE_SE", "Standard error of the ATE"))
        self.addOutput(QgsProcessingOutputNumber("N_USED", "Units used"))
        self.addOutput(QgsProcessingOutputNumber("N_DROPPED", "Units dropped"))
        self.addOutput(QgsProcessingOutputNumber("AUTOC", "AUTOC of the CATE on held-out folds (sequential test)"))
        self.addOutput(QgsProcessingOutputNumber("AUTOC_SE", "Standard error of the held-out AUTOC"))
        self.addOutput(QgsProcessingOutputNumber("AUTOC_T", "Combined t-statistic of the sequential test"))
        self.addOutput(QgsProcessingOutputNumber(
            "AUTOC_P", "One-sided p-value of the sequential test (H0: the CATE ranking finds no heterogeneity)"))
        self.addOutput(QgsProcessingOutputNumber("AUTOC_POOLED", "AUTOC of the pooled out-of-fold CATE (descriptive)"))
        self.addOutput(QgsProcessingOutputNumber("ATE_PPI", "Prediction-powered ATE (with OUTCOME_TRUTH)"))
        self.addOutput(QgsProcessingOutputNumber("ATE_PPI_SE", "Standard error of the prediction-powered ATE"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.pipeline import estimate_cate

        chosen = read_study_parameters(self, parameters, context)
        features, units = chosen.read_units(feedback)
        correction, method, truth = read_outcome_correction(self, parameters, context, chosen.source, features)
        study, result = estimate_cate(
            units, **chosen.imagery_arguments(), n_groups=self.parameterAsInt(parameters, self.GROUPS, context),
            progress=progress_to(feedback, 5, 95), is_cancelled=feedback.isCanceled, outcome_correction=correction,
            correction=method, outcome_truth=truth, study_design=chosen.study_design(),
            sensitivity=chosen.sensitivity, forest=FORESTS[self.parameterAsEnum(parameters, self.FOREST, context)])

        log_estimate(feedback, len(features), study, result)
        autoc, test = result.autoc, result.heterogeneity
        sensitivity_outputs = report_sensitivity(result.sensitivity, chosen.sensitivity, feedback)
        feedback.pushInfo(f"Device: {result.metadata['device']}; timings: {result.metadata['timings']}.")
        # Only now, with every number in hand, is the output created: a failed run writes nothing.
        dest_id = self.write_units(parameters, context, self.OUTPUT, chosen.source, features, None,
                                   unit_columns(study, result))
        metadata = self.record(**{**result.metadata, "n_units": len(features), "n_used": result.n_used,
                                  "n_dropped": result.n_dropped, "ate": result.ate, "ate_se": result.ate_se})
        results = self.keep_result(context, dest_id, {
            self.OUTPUT: dest_id, "ATE": result.ate, "ATE_SE": result.ate_se, "N_USED": result.n_used,
            "N_DROPPED": result.n_dropped, "AUTOC": test.estimate, "AUTOC_SE": test.std_err, "AUTOC_T": test.t_stat,
            "AUTOC_P": test.p_value, "AUTOC_POOLED": autoc.estimate,
            **ppi_outputs(result.metadata["predicted_outcome"]), **sensitivity_outputs}, metadata, feedback)
        return self.write_report(parameters, context, results, feedback, lambda report: self._report(
            report, metadata, chosen, study, result))

    @staticmethod
    def _report(report, metadata, chosen, study, result):
        import tempfile

        from ..core.report import estimate_report, plot_effect_map

        with tempfile.TemporaryDirectory(prefix="geocate-") as folder:  # the report embeds its figures
            map_png = plot_effect_map(chosen.raster, study.coords, result.cate, os.path.join(folder, "map.png"),
                                      bands=chosen.bands)
            estimate_report(metadata, report, map_png, figures=folder, sensitivity=result.sensitivity)

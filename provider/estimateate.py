"""geocate:estimateate - average effects with a confounding adjustment from the imagery (observational studies)."""

from qgis.core import (
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterField,
    QgsProcessingParameterNumber,
)
from qgis.PyQt.QtCore import QVariant

from .base import GeoCateAlgorithm, add_report_parameter, progress_to
from .convert import write_table
from .predicted import add_outcome_correction_parameters, read_outcome_correction, report_predicted_outcome
from .study_parameters import (
    add_imagery_parameters,
    add_sensitivity_parameters,
    add_spatial_block_parameter,
    add_study_parameters,
    read_study_parameters,
    report_sensitivity,
)

DESIGNS = ("observational", "randomized")
TRIMS = ("none", "Crump et al. (2009)", "bounds below")
EFFECT_COLUMNS = (("estimator", QVariant.String), ("estimand", QVariant.String), ("contrast", QVariant.String),
                  ("estimate", QVariant.Double), ("std_err", QVariant.Double), ("ci_low", QVariant.Double),
                  ("ci_high", QVariant.Double), ("n", QVariant.Int))


class EstimateAteAlgorithm(GeoCateAlgorithm):
    DESIGN, TRIM, TRIM_LOW, TRIM_HIGH, CLUSTER = "DESIGN", "TRIM", "TRIM_LOW", "TRIM_HIGH", "CLUSTER"
    NUISANCE, CALIBRATE = "NUISANCE", "CALIBRATE"
    OUTPUT, OUTPUT_REPORT = "OUTPUT", "OUTPUT_REPORT"

    short_description = ("The average effect of a programme that was not randomized, adjusted for what the imagery "
                         "shows about where it went: IPW, Hajek and AIPW, with overlap and balance diagnostics.")
    extra_tags = ("observational", "propensity score", "IPW", "AIPW", "confounding", "ATT", "balance")

    def name(self):
        return "estimateate"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Average effect with confounding adjustment from imagery"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "For programmes that were not randomized: the imagery around each unit stands in for the confounders "
            "that decided where the programme went. A propensity model (a regularised logistic regression on "
            "every image feature and covariate, cross-fitted: no unit's propensity comes "
            "from a model that saw it) and outcome models give three estimates of the average effect: IPW "
            "(Horvitz-Thompson), Hajek (normalised IPW) and AIPW (doubly robust: right if either model is), and "
            "the ATT (the effect on the treated units) by AIPW; each with a standard error robust to clusters. "
            "The treatment may have several arms (0 = the reference, e.g. no project; 1, 2 = two donors): each "
            "arm is compared with the reference and with the others.\n\n"
            "Overlap: the propensities by arm, the share of units outside [0.05, 0.95] (a warning when above "
            "10 %), and trimming by Crump et al.'s rule or your bounds (the estimate then describes the units "
            "kept). Balance: standardized differences of each covariate and image component before and after "
            "weighting (0.1 marked). Randomized design: the known propensity, and covariates that look affected "
            "by treatment are named.\n\n"
            "Stacked models (NUISANCE, advanced): each of the propensity and outcome models becomes a super "
            "learner over the penalised models, gradient boosting and, if asked, a small network on the windows, "
            "its weights chosen by cross-validated loss within each training fold; the log and the run record "
            "give each fold's weights. Slower (with 5 folds each learner is fitted 15 times instead of 5); with the "
            "network it lowered the bias on one of the project's two designs (docs/benchmarks.md).\n\n"
            "Calibrated propensities (CALIBRATE, advanced; on by default): after trimming, the propensities are "
            "calibrated so that each arm's weights balance the outcome models' inputs (the image's leading "
            "components and the covariates) exactly - entropy balancing with the model's weights as the base "
            "(Chan, Yam & Zhang 2016). On the project's image-confounding designs this lowered the AIPW bias and "
            "brought its interval's coverage to about 95 % (docs/benchmarks.md). The log says whether balance is "
            "exact or close (propensities stay within [0.01, 0.99]); where no weights balance, it warns and the "
            "model's propensities are used.\n\n"
            "Sensitivity (observational design): how strong a confounder that the imagery and covariates miss "
            "would have to be to change the conclusion (Chernozhukov et al. 2022): the AIPW estimate's bounds and "
            "interval for a confounder of strengths CF_Y (outcome), CF_D (treatment) and RHO, the robustness values "
            "RV and RV_a, and benchmarks - a confounder as strong as everything the imagery shows, or as each "
            "covariate - with a contour plot in the report.\n\n"
            "The estimate is only as good as the assumption that the imagery and covariates capture everything "
            "that decided treatment and also drives the outcome."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        add_study_parameters(self)
        add_imagery_parameters(self)
        self.parameterDefinition("TREATMENT").setDescription("Treatment field (0 = reference; 1, 2, ... = arms)")
        self.addParameter(QgsProcessingParameterEnum(self.DESIGN, "Study design", list(DESIGNS), defaultValue=0))
        self.addParameter(QgsProcessingParameterEnum(self.TRIM, "Trim units without overlap", list(TRIMS),
                                                     defaultValue=0))
        for name, label, value in ((self.TRIM_LOW, "Lower propensity bound", 0.05),
                                   (self.TRIM_HIGH, "Upper propensity bound", 0.95)):
            bound = QgsProcessingParameterNumber(name, label, QgsProcessingParameterNumber.Double, defaultValue=value,
                                                 minValue=0, maxValue=1)
            bound.setFlags(bound.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(bound)
        nuisance = QgsProcessingParameterEnum(
            self.NUISANCE, "Propensity and outcome models (observational design)",
            ["penalised logistic regression and splines", "stacked: + gradient boosting",
             "stacked: + gradient boosting + a network on the windows"], defaultValue=0)
        nuisance.setFlags(nuisance.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(nuisance)
        calibrate = QgsProcessingParameterBoolean(
            self.CALIBRATE, "Calibrate the propensities to balance the outcome models' inputs (observational design)",
            defaultValue=True)
        calibrate.setFlags(calibrate.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(calibrate)
        self.addParameter(QgsProcessingParameterField(
            self.CLUSTER, "Cluster field (e.g. village): folds and standard errors keep clusters together",
            parentLayerParameterName="INPUT", optional=True))
        add_spatial_block_parameter(self)
        add_sensitivity_parameters(self)
        add_outcome_correction_parameters(self)
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Average effects"))
        add_report_parameter(self)
        for name, label in (("ATE", "AIPW estimate of the ATE (first arm against the reference)"),
                            ("ATE_SE", "Its standard error"), ("ATT", "AIPW estimate of the ATT"),
                            ("SHARE_OUTSIDE", "Share of units with propensity outside [0.05, 0.95]"),
                            ("N_TRIMMED", "Units trimmed"), ("N_USED", "Units used")):
            self.addOutput(QgsProcessingOutputNumber(name, label))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.pipeline import estimate_ate
        from ..core.report import observational_report
        from ..core.stacking import NUISANCE_CHOICES

        chosen = read_study_parameters(self, parameters, context)
        trim = (None, "crump", (self.parameterAsDouble(parameters, self.TRIM_LOW, context),
                                self.parameterAsDouble(parameters, self.TRIM_HIGH, context))
                )[self.parameterAsEnum(parameters, self.TRIM, context)]
        features, units = chosen.read_units(feedback)
        correction, method, _ = read_outcome_correction(self, parameters, context, chosen.source, features)
        arguments = chosen.imagery_arguments()
        study, out = estimate_ate(
            units, arguments.pop("raster_path"),
            chosen.study_design(trim=trim, calibrate=self.parameterAsBool(parameters, self.CALIBRATE, context)),
            **arguments,
            progress=progress_to(feedback), is_cancelled=feedback.isCanceled, outcome_correction=correction,
            correction=method, sensitivity=chosen.sensitivity,
            nuisance=NUISANCE_CHOICES[self.parameterAsEnum(parameters, self.NUISANCE, context)])
        log_ate(feedback, chosen.design, out)
        sensitivity_outputs = report_sensitivity(out["sensitivity"], chosen.sensitivity, feedback)
        dest_id = write_table(self, parameters, context, effect_rows(out["effects"]), columns=EFFECT_COLUMNS)
        metadata = self.record(**{**out["metadata"], "balance": out["balance"]})
        self.write_run_metadata(dest_id, metadata, feedback)
        first = {(e.estimator, e.estimand): e for e in out["effects"] if e.contrast == out["effects"][0].contrast}
        return self.write_report(parameters, context, {
            self.OUTPUT: dest_id, self.OUTPUT_REPORT: None, "ATE": first[("AIPW", "ATE")].estimate,
            "ATE_SE": first[("AIPW", "ATE")].std_err, "ATT": first[("AIPW", "ATT")].estimate,
            "SHARE_OUTSIDE": out["overlap"]["share_outside"] if out["overlap"] else None,
            "N_TRIMMED": metadata["n_trimmed"], "N_USED": metadata["n_used"], **sensitivity_outputs}, feedback,
            lambda report: observational_report(metadata, out, report))


def effect_rows(effects):
    """The effects table's rows: (estimator, estimand, contrast, estimate, std_err, ci_low, ci_high, n)."""
    return [(e.estimator, e.estimand, e.contrast, e.estimate, e.std_err, *e.interval(), e.n) for e in effects]


def log_ate(feedback, design, out):
    """The run's log: the design and propensity model, overlap, trimming, warnings, an outcome from a map, every
    effect, the balance after weighting."""
    from ..core.report import calibration_sentence

    metadata = out["metadata"]
    feedback.pushInfo(f"Design: {design}; propensity: {metadata['propensity_model']['model']}.")
    if "window networks" in metadata.get("ran_on", {}):
        feedback.pushInfo(f"The networks on the windows trained on {metadata['ran_on']['window networks']} (a GPU "
                          "when torch sees one).")
    for name, fit in (("Propensity", metadata["propensity_model"]), ("Outcome models", metadata["outcome_models"])):
        for row in fit.get("stack", []):
            weights = row.get("weights") or row.get("weights_by_arm")
            feedback.pushInfo(f"{name}, fold {row['fold']}: weights {weights}"
                              + (f"; largest: {row['winner']}" if "winner" in row else ""))
    calibration = calibration_sentence(metadata.get("calibration"))
    if calibration:   # when not reached, the run's warnings say so
        feedback.pushInfo(calibration)
    if out["overlap"]:
        feedback.pushInfo(f"Overlap: {out['overlap']['share_outside']:.1%} of the units have a propensity outside "
                          f"[0.05, 0.95]; the 1 % largest weights carry {out['overlap']['top_1pct_weight_share']:.1%} "
                          f"of their arm's weight ({out['overlap']['top_1pct_equal_share']:.1%} if all were "
                          "equal).")
    if metadata["n_trimmed"]:
        low, high = metadata["trim_bounds"]
        feedback.pushWarning(f"{metadata['n_trimmed']} unit(s) trimmed (propensity outside [{low:.3f}, "
                             f"{high:.3f}]): the estimates describe the units kept, not the whole study.")
    for warning in out["warnings"]:
        feedback.pushWarning(warning)
    report_predicted_outcome(metadata["predicted_outcome"], feedback)
    for effect in out["effects"]:
        low, high = effect.interval()
        feedback.pushInfo(f"{effect.estimator} {effect.estimand} {effect.contrast}: {effect.estimate:.4f} "
                          f"(SE {effect.std_err:.4f}, 95 % [{low:.4f}, {high:.4f}])")
    if out["balance"]:
        worst = max(out["balance"], key=lambda row: abs(row[2]))
        feedback.pushInfo(f"Balance after weighting: largest |standardized difference| {abs(worst[2]):.3f} "
                          f"({worst[0]}).")

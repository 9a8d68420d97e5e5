"""geocate:comparesources - what the imagery adds: RATE of CATEs from imagery, covariates and both, on the same folds."""

import os

from qgis.core import (
    QgsProcessing,
    QgsProcessingOutputNumber,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
)

from .base import GeoCateAlgorithm, add_report_parameter, progress_to
from .convert import write_table
from .study_parameters import (
    add_design_parameters,
    add_imagery_parameters,
    add_study_parameters,
    read_study_parameters,
)


class CompareSourcesAlgorithm(GeoCateAlgorithm):
    BOOTSTRAP, OUTPUT, OUTPUT_PLOT, OUTPUT_REPORT = "BOOTSTRAP", "OUTPUT", "OUTPUT_PLOT", "OUTPUT_REPORT"

    short_description = ("What the imagery adds over survey covariates: the CATE learner with imagery, covariates and "
                         "both, tested on the same held-out folds.")
    extra_tags = ("RATE", "AUTOC", "covariates")

    def name(self):
        return "comparesources"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Compare imagery, covariates and both"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "Runs the CATE learner of 'Estimate treatment effects from imagery' three times on the same honest "
            "folds: with imagery only, covariates only, and both. Each source is tested with the sequential "
            "cross-fold test (each fold ranked by a learner built on the earlier folds only), on the same doubly "
            "robust scores and bootstrap half-samples, so the paired differences show what the imagery adds "
            "(one-sided p-values). The AUTOC and Qini of the pooled out-of-fold CATEs are given as descriptive "
            "figures. Writes a table, a TOC plot and an HTML report.\n\n"
            "Compare: 'sources' (above), or the representation: 'scales' (the window with the wider SCALES "
            "against the window alone), 'dates' (the sequence RASTER + RASTERS_TIME against the last date alone), "
            "'encoder' (the ONNX ENCODER against random convolutions); each with the covariates, on the same "
            "units, folds and scores. P_RICHER_BETTER is the one-sided p-value that the richer representation "
            "ranks better."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        add_study_parameters(self)
        add_imagery_parameters(self)
        self.addParameter(QgsProcessingParameterEnum(
            "COMPARE", "Compare", ["sources: imagery, covariates, both", "scales: with SCALES vs the window alone",
                                   "dates: the sequence vs the last date", "encoder: ENCODER vs random convolutions"],
            defaultValue=0))
        add_design_parameters(self)
        draws = QgsProcessingParameterNumber(self.BOOTSTRAP, "Bootstrap draws", QgsProcessingParameterNumber.Integer,
                                             defaultValue=200, minValue=20, maxValue=10000)
        draws.setFlags(draws.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(draws)
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Comparison table", QgsProcessing.TypeVector))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT_PLOT, "TOC curves (PNG)",
                                                                "PNG files (*.png)", optional=True,
                                                                createByDefault=True))
        add_report_parameter(self)
        for name, label in (("AUTOC_IMAGERY", "Held-out AUTOC, imagery only"),
                            ("AUTOC_COVARIATES", "Held-out AUTOC, covariates only"),
                            ("AUTOC_BOTH", "Held-out AUTOC, imagery and covariates"),
                            ("P_IMAGERY_ADDS", "One-sided p: imagery and covariates rank better than covariates"),
                            ("P_RICHER_BETTER", "One-sided p: the richer representation ranks better (COMPARE)"),
                            ("N_USED", "Units used")):
            self.addOutput(QgsProcessingOutputNumber(name, label))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.pipeline import COMPARE_MODES, compare_sources
        from ..core.report import comparison_rows

        chosen = read_study_parameters(self, parameters, context)
        compare = COMPARE_MODES[self.parameterAsEnum(parameters, "COMPARE", context)]
        features, units = chosen.read_units(feedback)
        study, comparison = compare_sources(
            units, **chosen.imagery_arguments(), n_draws=self.parameterAsInt(parameters, self.BOOTSTRAP, context),
            progress=progress_to(feedback), is_cancelled=feedback.isCanceled, study_design=chosen.study_design(),
            compare=compare)
        rows = comparison_rows(comparison)
        log_comparison(feedback, chosen, len(features), study, comparison, rows)
        metadata = self.record(**comparison_figures(comparison), n_units=len(features), n_used=study.n_used,
                               dropped=study.dropped)
        # Every number is in hand: the outputs are written only now, under partial names until all succeeded.
        dest_id = write_table(self, parameters, context, rows)
        plot_path = self.output_file(parameters, self.OUTPUT_PLOT, context)
        report_path = self.output_file(parameters, self.OUTPUT_REPORT, context)
        self._write_figures(plot_path, report_path, comparison, metadata, chosen, study)
        self.write_run_metadata(dest_id, metadata, feedback)
        autoc = {test.priority: test.estimate for test in comparison["tests"]["AUTOC"]}
        adds = [t.p_value for t in comparison["test_differences"]["AUTOC"]
                if t.priority == "imagery + covariates - covariates"]
        richer = [t.p_value for t in comparison["test_differences"]["AUTOC"] if compare != "sources"]
        return {"P_IMAGERY_ADDS": adds[0] if adds else None, "P_RICHER_BETTER": richer[0] if richer else None,
                self.OUTPUT: dest_id, self.OUTPUT_PLOT: plot_path, self.OUTPUT_REPORT: report_path,
                "AUTOC_IMAGERY": autoc.get("imagery"), "AUTOC_COVARIATES": autoc.get("covariates"),
                "AUTOC_BOTH": autoc.get("imagery + covariates"), "N_USED": study.n_used}

    @staticmethod
    def _write_figures(plot_path, report_path, comparison, metadata, chosen, study):
        """The TOC plot and the report, where asked for."""
        import tempfile

        from ..core.report import comparison_report, plot_toc

        if not (report_path or plot_path):
            return
        inputs = {"layer": chosen.source.sourceName(), "treatment": chosen.treatment, "outcome": chosen.outcome,
                  "covariates": ", ".join(chosen.covariates) or "-", "raster": chosen.raster,
                  "window (pixels)": chosen.window, "units used": study.n_used,
                  "bootstrap draws": metadata["parameters"][CompareSourcesAlgorithm.BOOTSTRAP],
                  "spatial block (m)": comparison["block_size"] or "-", "seed": chosen.seed}
        with tempfile.TemporaryDirectory(prefix="geocate-") as folder:
            png = plot_path or os.path.join(folder, "toc.png")
            if report_path:
                comparison_report(comparison, report_path, png, inputs, metadata)
            else:
                plot_toc(comparison["rates"]["AUTOC"], png, "TOC by source of the pooled out-of-fold CATE (descriptive)")


def log_comparison(feedback, chosen, n_features, study, comparison, rows):
    """The run's log: warnings, units and fold groups, every RATE."""
    from ..core.study import describe_dropped

    for warning in comparison.get("warnings", []):
        feedback.pushWarning(warning)
    if not chosen.covariates:
        feedback.pushWarning("No covariates were given: only the imagery can be judged, nothing compared.")
    feedback.pushInfo(f"Units: {n_features}, {study.n_used} used ({describe_dropped(study.dropped)}); "
                      f"{comparison['n_clusters']} fold groups.")
    for row in rows:
        feedback.pushInfo(f"{row[0]} {row[1]}: {row[2]:.4f} (SE {row[3]:.4f}, 95 % [{row[4]:.4f}, {row[5]:.4f}])")


def comparison_figures(comparison):
    """What the run record keeps of a comparison (core.pipeline.compare_sources)."""
    return dict(feature_pipeline=comparison["feature_pipeline"], study_design=comparison["study_design"],
                propensity=comparison["propensity"], strata=comparison["strata"],
                randomization_check=comparison["randomization_check"], fold_groups=comparison["n_clusters"],
                spatial_block_m=comparison["block_size"], ate=comparison["ate"].estimate,
                ate_se=comparison["ate"].std_err,
                tests=[{"target": t.target, "rule": t.priority, "estimate": t.estimate, "std_err": t.std_err,
                        "t_stat": t.t_stat, "p_value": t.p_value}
                       for target in ("AUTOC", "QINI")
                       for t in comparison["tests"][target] + comparison["test_differences"][target]])

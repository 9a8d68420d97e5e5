"""geocate:eventstudy - effects of a programme rolled out in waves (staggered adoption), by periods since adoption."""

from qgis.core import (
    QgsProcessing,
    QgsProcessingOutputNumber,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
)
from qgis.PyQt.QtCore import QVariant

from .base import GeoCateAlgorithm, add_report_parameter, progress_to
from .convert import write_table
from .paneleffects import add_panel_parameters, read_panel_parameters, read_panel_rows

CONTROLS = (("never treated", "never"), ("not yet treated", "not_yet"))
EVENT_COLUMNS = (("aggregation", QVariant.String), ("event_time", QVariant.Int), ("cohort", QVariant.Double),
                 ("period", QVariant.Double), ("att", QVariant.Double), ("std_err", QVariant.Double),
                 ("ci_low", QVariant.Double), ("ci_high", QVariant.Double), ("band_low", QVariant.Double),
                 ("band_high", QVariant.Double), ("n_units", QVariant.Int))


def table_rows(study):
    """The output table: one row per event time first (the event-study curve), then the overall ATT, the
    cohorts, the calendar periods and every group-time ATT(g, t)."""
    nan = float("nan")
    rows = [("event time", int(r.key), nan, nan, r.att, r.std_err, r.ci_low, r.ci_high, r.band_low, r.band_high,
             r.n_units) for r in sorted(study.event_time, key=lambda r: r.key)]
    o = study.overall
    rows.append(("overall", None, nan, nan, o.att, o.std_err, o.ci_low, o.ci_high, nan, nan, o.n_units))
    rows += [("cohort", None, float(r.key), nan, r.att, r.std_err, r.ci_low, r.ci_high, r.band_low, r.band_high,
              r.n_units) for r in study.cohort]
    rows += [("period", None, nan, float(r.key), r.att, r.std_err, r.ci_low, r.ci_high, r.band_low, r.band_high,
              r.n_units) for r in study.calendar]
    for cell in study.group_time:
        low, high = cell.interval()
        rows.append(("group-time", int(cell.event_time), float(cell.g), float(cell.t), cell.att, cell.std_err, low,
                     high, nan, nan, cell.n_treated))
    return rows


class EventStudyAlgorithm(GeoCateAlgorithm):
    CONTROL_GROUP, ANTICIPATION, SEED = "CONTROL_GROUP", "ANTICIPATION", "SEED"
    OUTPUT, OUTPUT_PLOT = "OUTPUT", "OUTPUT_PLOT"
    short_description = ("Effects of a programme rolled out in waves: group-time effects on the treated, by periods "
                         "since adoption, with placebo checks before it.")
    extra_tags = ("event study", "staggered adoption", "difference in differences", "DiD", "Callaway Sant'Anna",
                  "panel")

    def name(self):
        return "eventstudy"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Event study of a staggered roll-out"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "For a programme that reached units in waves (cohorts adopting in different years) and stays on once "
            "started: the average effect on the treated of each cohort g in each year t, ATT(g, t), by doubly "
            "robust difference-in-differences against units never treated (or, optionally, not yet treated), "
            "with the covariates (and, with one raster per year, each unit's image features of the first year) "
            "adjusting for trends that differ with them (Callaway & Sant'Anna 2021). The comparison models are "
            "cross-fitted with folds that keep each unit's years together; standard errors are clustered by unit.\n\n"
            "Aggregations: by periods since adoption (0, 1, 2 ... after it, and placebo effects before it, with a "
            "simultaneous band), by cohort, by calendar year, and the overall effect on the treated (the mean over "
            "treated unit-years). PRETREND_P tests jointly that the placebo effects are zero: a small value says "
            "treated and comparison units were already drifting apart.\n\n"
            "Unlike a two-way fixed-effects regression, later adopters are never compared with units already "
            "treated, so effects that grow over time do not bias the estimate. Units treated from the first year "
            "(no year before adoption) and units missing some years are dropped, with counts; a treatment that "
            "switches off is refused.")

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        add_panel_parameters(self, treatment_label="Treatment field (0 before a unit's first treated year, 1 from it)")
        self.addParameter(QgsProcessingParameterEnum(
            self.CONTROL_GROUP, "Comparison group", [label for label, _ in CONTROLS], defaultValue=0))
        anticipation = QgsProcessingParameterNumber(
            self.ANTICIPATION, "Anticipation: periods before adoption in which units may already react",
            QgsProcessingParameterNumber.Integer, defaultValue=0, minValue=0, maxValue=20)
        seed = QgsProcessingParameterNumber(self.SEED, "Random seed", QgsProcessingParameterNumber.Integer,
                                            defaultValue=42, minValue=0, maxValue=2 ** 31 - 1)
        for parameter in (anticipation, seed):
            parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(parameter)
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Event-study effects", QgsProcessing.TypeVector))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_PLOT, "Event-study plot (PNG)", "PNG files (*.png)", optional=True, createByDefault=True))
        add_report_parameter(self)
        for name, label in (("ATT", "Overall effect on the treated"), ("ATT_SE", "Its standard error"),
                            ("PRETREND_P", "p-value of the joint test of the placebo effects before adoption"),
                            ("N_UNITS", "Units used")):
            self.addOutput(QgsProcessingOutputNumber(name, label))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.eventstudy import event_study

        source, values = read_panel_parameters(self, parameters, context)
        seed = self.parameterAsInt(parameters, self.SEED, context)
        rows, X, names = read_panel_rows(source, values, seed, feedback, progress_share=30)
        study = event_study(
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], X, names,
            control=CONTROLS[self.parameterAsEnum(parameters, self.CONTROL_GROUP, context)][1],
            anticipation=self.parameterAsInt(parameters, self.ANTICIPATION, context), seed=seed,
            progress=progress_to(feedback, 30, 70), is_cancelled=feedback.isCanceled, unit_name=values["unit"],
            time_name=values["time"], treatment_name=values["treatment"], outcome_name=values["outcome"])
        self.log(study, feedback)
        table = table_rows(study)
        dest_id = write_table(self, parameters, context, table, columns=EVENT_COLUMNS)
        metadata = self.record(
            overall=study.overall.__dict__, pre_trend=study.pre_trend.__dict__, control=study.control,
            n_units=study.n_units, n_treated_units=int(sum(study.cohorts.values())),
            cohorts={f"{g:g}": n for g, n in study.cohorts.items()}, dropped=study.dropped,
            not_estimable=[list(x) for x in study.not_estimable], learner=study.learner, overlap=study.overlap,
            critical_value=study.critical_value, covariates_used=names, warnings=list(study.notes))
        self.write_run_metadata(dest_id, metadata, feedback)
        plot = self.output_file(parameters, self.OUTPUT_PLOT, context)
        report = self.output_file(parameters, "OUTPUT_REPORT", context)
        self._figures(study, metadata, table, plot, report)
        return {self.OUTPUT: dest_id, self.OUTPUT_PLOT: plot or None, "OUTPUT_REPORT": report or None,
                "ATT": study.overall.att, "ATT_SE": study.overall.std_err, "PRETREND_P": study.pre_trend.p_value,
                "N_UNITS": study.n_units}

    @staticmethod
    def _figures(study, metadata, table, plot, report):
        """The event-study plot and the report, where asked for."""
        import os
        import tempfile

        from ..core.report import event_study_report, plot_event_study

        if plot or report:
            with tempfile.TemporaryDirectory(prefix="geocate-") as folder:
                png = plot_event_study(study, plot or os.path.join(folder, "event_study.png"))
                if report:
                    event_study_report(metadata, table, report, png)

    @staticmethod
    def log(study, feedback):
        o, pre = study.overall, study.pre_trend
        feedback.pushInfo(f"Units: {study.n_units} used ({sum(study.cohorts.values())} treated in "
                          f"{len(study.cohorts)} cohort(s)), comparison group: {study.control}; "
                          f"dropped: {', '.join(f'{n} {k}' for k, n in study.dropped.items() if n) or 'none'}.")
        feedback.pushInfo(f"Overall effect on the treated: {o.att:.4f} (SE {o.std_err:.4f}, 95 % "
                          f"[{o.ci_low:.4f}, {o.ci_high:.4f}]).")
        for row in sorted(study.event_time, key=lambda r: r.key):
            kind = "placebo" if row.key < -study.anticipation else "effect"
            feedback.pushInfo(f"event time {int(row.key):+d} ({kind}): {row.att:.4f} (SE {row.std_err:.4f}), "
                              f"simultaneous band [{row.band_low:.4f}, {row.band_high:.4f}].")
        if pre.df:
            message = (f"Pre-trends: joint test of {pre.df} placebo effect(s), chi-square {pre.statistic:.2f}, "
                       f"p = {pre.p_value:.3g}.")
            (feedback.pushWarning if pre.p_value < 0.05 else feedback.pushInfo)(
                message + (" Treated and comparison units were already drifting apart before adoption: parallel "
                           "trends are doubtful." if pre.p_value < 0.05 else ""))
        for g, t, reason in study.not_estimable:
            feedback.pushInfo(f"ATT(cohort {g:g}, period {t:g}) not estimable: {reason}.")
        for note in study.notes:
            feedback.pushWarning(note)

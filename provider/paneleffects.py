"""geocate:paneleffects - the effect of a treatment on units observed over years, with unit fixed effects."""

import numpy as np
from qgis.core import (
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QDate, QDateTime, QVariant

from ..core.scores import Z95
from .base import GeoCateAlgorithm, add_report_parameter
from .convert import as_label, as_number, check_numeric_field, unit_point, write_table
from .widgets import field_role

APPROACH_CHOICES = ("mundlak", "within", "first_difference", "all three")
PANEL_COLUMNS = (("approach", QVariant.String), ("period", QVariant.String), ("theta", QVariant.Double),
                 ("std_err", QVariant.Double), ("ci_low", QVariant.Double), ("ci_high", QVariant.Double),
                 ("n_units", QVariant.Int), ("n_obs", QVariant.Int))


def as_time(value):
    """A time attribute as a number: numbers as they are, dates as a decimal year (2021-07-02 -> 2021.5)."""
    if isinstance(value, QDateTime):
        value = value.date()
    if isinstance(value, QDate):
        if not value.isValid():
            return np.nan
        return value.year() + (value.dayOfYear() - 1) / value.daysInYear()
    return as_number(value)


def add_panel_parameters(algorithm, treatment_label="Treatment field (binary or continuous)"):
    """INPUT, UNIT_ID, TIME, TREATMENT, OUTCOME, COVARIATES, RASTERS_BY_TIME, PATCH_SIZE: a long-format panel."""
    numeric = QgsProcessingParameterField.Numeric
    algorithm.addParameter(QgsProcessingParameterFeatureSource(
        "INPUT", "Panel (one row per unit and year)", [QgsProcessing.TypeVector]))
    algorithm.addParameter(field_role(QgsProcessingParameterField(
        "UNIT_ID", "Unit id field", parentLayerParameterName="INPUT"), "unit"))
    algorithm.addParameter(field_role(QgsProcessingParameterField(
        "TIME", "Time field (year or date)", parentLayerParameterName="INPUT"), "time"))
    algorithm.addParameter(field_role(QgsProcessingParameterField(
        "TREATMENT", treatment_label, parentLayerParameterName="INPUT",
        type=numeric), "treatment"))
    algorithm.addParameter(field_role(QgsProcessingParameterField(
        "OUTCOME", "Outcome field", parentLayerParameterName="INPUT", type=numeric), "outcome"))
    algorithm.addParameter(QgsProcessingParameterField("COVARIATES", "Covariate fields", parentLayerParameterName="INPUT",
                                                       type=numeric, allowMultiple=True, optional=True))
    algorithm.addParameter(QgsProcessingParameterMultipleLayers(
        "RASTERS_BY_TIME", "Imagery, one raster per year (earliest first)", QgsProcessing.TypeRaster,
        optional=True))
    algorithm.addParameter(QgsProcessingParameterNumber("PATCH_SIZE", "Window size (pixels per side)",
                                                        QgsProcessingParameterNumber.Integer, defaultValue=33,
                                                        minValue=3, maxValue=1025))


def read_panel_parameters(algorithm, parameters, context):
    """(source, plain values) of the panel parameters, the fields checked."""
    source = algorithm.parameterAsSource(parameters, "INPUT", context)
    if source is None:
        raise QgsProcessingException("The panel could not be read. Choose a layer or table in INPUT.")
    values = {"unit": algorithm.parameterAsString(parameters, "UNIT_ID", context),
              "time": algorithm.parameterAsString(parameters, "TIME", context),
              "treatment": algorithm.parameterAsString(parameters, "TREATMENT", context),
              "outcome": algorithm.parameterAsString(parameters, "OUTCOME", context),
              "covariates": algorithm.parameterAsFields(parameters, "COVARIATES", context),
              "rasters": algorithm.parameterAsLayerList(parameters, "RASTERS_BY_TIME", context) or [],
              "window": algorithm.parameterAsInt(parameters, "PATCH_SIZE", context)}
    fields = source.fields()
    for name, role in [(values["treatment"], "treatment"), (values["outcome"], "outcome")] + [
            (c, "covariate") for c in values["covariates"]]:
        check_numeric_field(fields, name, role)
    time_field = values["time"]
    time_index = fields.lookupField(time_field)
    if time_index < 0:
        raise QgsProcessingException(f"The time field '{time_field}' does not exist.")
    kind = fields.at(time_index).type()
    if not (fields.at(time_index).isNumeric() or kind in (QVariant.Date, QVariant.DateTime)):
        raise QgsProcessingException(
            f"The time field '{time_field}' is of type {fields.at(time_index).typeName()}, not a number or a date. "
            f"Choose a year or date field, or convert it (Field Calculator: to_int(\"{time_field}\")).")
    return source, values


def read_panel_rows(source, values, seed, feedback, progress_share=40):
    """(rows, covariate matrix, covariate names): every row's unit, time, treatment, outcome, covariates and
    point, with each year's image features joining the covariates where one raster per year is given."""
    covariates, rasters = values["covariates"], values["rasters"]
    rows = []
    for feature in source.getFeatures():
        if feedback.isCanceled():
            raise QgsProcessingException("The run was cancelled. Nothing was written.")
        rows.append((as_label(feature[values["unit"]]), as_time(feature[values["time"]]),
                     as_number(feature[values["treatment"]]), as_number(feature[values["outcome"]]),
                     [as_number(feature[c]) for c in covariates], unit_point(feature.geometry())))
    if not rows:
        raise QgsProcessingException("The panel has no rows.")
    n = len(rows)
    X = np.array([r[4] for r in rows], float).reshape(n, len(covariates))
    names = list(covariates)
    if rasters:
        from qgis.core import QgsCoordinateReferenceSystem

        from ..core.errors import GeoCateError
        from ..core.pipeline import panel_image_features

        if source.wkbType() == QgsWkbTypes.NoGeometry or not source.sourceCrs().isValid():
            raise GeoCateError("Imagery per year needs the units' locations: the panel has no geometry "
                               "(or no CRS).", "Give the panel points (or polygons) with a CRS.")
        image = panel_image_features(
            [r.source() for r in rasters], np.array([r[5] for r in rows], float),
            source.sourceCrs().toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED),
            np.array([r[1] for r in rows], float), values["window"], seed,
            progress=lambda f, m: feedback.setProgress(progress_share * f), is_cancelled=feedback.isCanceled)
        X = np.column_stack([X, image])
        names += [f"image_{j + 1}" for j in range(image.shape[1])]
    return rows, X, names


class PanelEffectsAlgorithm(GeoCateAlgorithm):
    TIME_EFFECTS = "TIME_EFFECTS"
    INPUT, UNIT_ID, TIME, TREATMENT, OUTCOME = "INPUT", "UNIT_ID", "TIME", "TREATMENT", "OUTCOME"
    COVARIATES, RASTERS_BY_TIME, PATCH_SIZE = "COVARIATES", "RASTERS_BY_TIME", "PATCH_SIZE"
    APPROACH, LEARNER, SEED, OUTPUT = "APPROACH", "LEARNER", "SEED", "OUTPUT"

    short_description = ("The effect of a treatment on units observed over years (a panel), removing each unit's "
                         "unobserved, time-invariant differences with double machine learning.")
    extra_tags = ("panel", "fixed effects", "double machine learning", "DML", "Mundlak", "first differences")

    def name(self):
        return "paneleffects"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Panel effects with fixed effects (double machine learning)"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "Units (villages, districts) observed every year, treated from some year on, with an outcome each year "
            "(long format: one row per unit and year). The model is Y_it = theta D_it + g(X_it) + alpha_i + U_it "
            "with unit effects alpha_i that may be correlated with the covariates (Clarke & Polselli 2026). "
            "Approaches: Mundlak (correlated random effects: the nuisance models also see each unit's means of the "
            "covariates and treatment; default), within (everything demeaned by unit; exact only for linear "
            "nuisances), first differences (changes learnt from this and last year's covariates). The nuisance "
            "models are cross-fitted with folds that keep each unit's years together, and the standard error is "
            "clustered by unit. Year effects (on by default) absorb shocks common to every unit in a period. "
            "A table gives theta per approach and per year; a year without treated and untreated rows is listed "
            "as not estimable (nulls), with the reason in the log.\n\n"
            "With one raster per year, each unit's image features of that year (one feature pipeline for all years) "
            "join the covariates. Refused: duplicated unit-year rows, a time that is not a number or a date, a "
            "treatment that never varies within a unit (for within and first differences). Units observed once are "
            "dropped by within and first differences, with a count."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        add_panel_parameters(self)
        self.addParameter(QgsProcessingParameterEnum(self.APPROACH, "Approach", list(APPROACH_CHOICES), defaultValue=0))
        self.addParameter(QgsProcessingParameterBoolean(
            self.TIME_EFFECTS, "Year effects: absorb shocks common to every unit in a period (droughts, booms)",
            defaultValue=True))
        learner = QgsProcessingParameterEnum(self.LEARNER, "Nuisance learner", ["spline ridge", "boosting"],
                                             defaultValue=0)
        seed = QgsProcessingParameterNumber(self.SEED, "Random seed", QgsProcessingParameterNumber.Integer,
                                            defaultValue=42, minValue=0, maxValue=2**31 - 1)
        for parameter in (learner, seed):
            parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(parameter)
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, "Panel effects", QgsProcessing.TypeVector))
        add_report_parameter(self)
        for name, label in (("THETA", "Effect of the treatment (first approach)"), ("THETA_SE", "Its standard error"),
                            ("N_UNITS", "Units used"), ("N_OBS", "Rows used")):
            self.addOutput(QgsProcessingOutputNumber(name, label))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.panel import PanelDML, make_panel
        from ..core.report import panel_report

        source, values = read_panel_parameters(self, parameters, context)
        choice = APPROACH_CHOICES[self.parameterAsEnum(parameters, self.APPROACH, context)]
        learner = ("spline ridge", "boosting")[self.parameterAsEnum(parameters, self.LEARNER, context)]
        seed = self.parameterAsInt(parameters, self.SEED, context)
        time_effects = self.parameterAsBoolean(parameters, self.TIME_EFFECTS, context)
        rows, X, names = read_panel_rows(source, values, seed, feedback)
        panel = make_panel([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                           [r[3] for r in rows], X, names, values["unit"], values["time"], values["treatment"],
                           values["outcome"])
        approaches = ("mundlak", "within", "first_difference") if choice == "all three" else (choice,)
        estimates = []
        for k, approach in enumerate(approaches):
            if feedback.isCanceled():
                raise QgsProcessingException("The run was cancelled. Nothing was written.")
            feedback.setProgressText(f"{approach}: cross-fitted nuisance models")
            feedback.setProgress(40 + 60 * k / len(approaches))
            estimates.append(PanelDML(approach, learner, seed=seed, time_effects=time_effects).fit(panel).estimate_)
        table = log_panel(feedback, panel, estimates, time_effects)
        dest_id = write_table(self, parameters, context, table, columns=PANEL_COLUMNS)
        metadata = self.record(
            estimates=[{"approach": e.approach, "theta": e.theta, "std_err": e.std_err, "n_units": e.n_units,
                        "n_obs": e.n_obs, "units_observed_once": e.units_observed_once, "by_period": e.by_period,
                        "not_estimable": [list(x) for x in e.not_estimable], "time_effects": e.time_effects}
                       for e in estimates], covariates_used=names, dropped=panel.dropped)
        self.write_run_metadata(dest_id, metadata, feedback)
        first = estimates[0]
        return self.write_report(parameters, context, {
            self.OUTPUT: dest_id, "OUTPUT_REPORT": None, "THETA": first.theta, "THETA_SE": first.std_err,
            "N_UNITS": first.n_units, "N_OBS": first.n_obs}, feedback,
            lambda report: panel_report(metadata, table, report))


def log_panel(feedback, panel, estimates, time_effects):
    """The run's log (year effects, each approach's theta, units observed once, periods not estimable, rows
    with a null) and the table's rows: one per approach, then one per approach and period."""
    if time_effects:
        feedback.pushInfo(f"Year effects: shocks common to every unit in a period ({len(np.unique(panel.time))} "
                          "periods) are absorbed (period effects in Mundlak's nuisance models, two-way demeaning "
                          "for within, a period intercept in first differences).")
    else:
        feedback.pushWarning("Year effects are ignored (TIME_EFFECTS off): a shock common to every unit in a year "
                             "that moves treatment and outcome together biases theta.")
    table = []
    for estimate in estimates:
        low, high = estimate.interval()
        table.append((estimate.approach, "all", estimate.theta, estimate.std_err, low, high, estimate.n_units,
                      estimate.n_obs))
        feedback.pushInfo(f"{estimate.approach}: theta {estimate.theta:.4f} (SE {estimate.std_err:.4f}, 95 % "
                          f"[{low:.4f}, {high:.4f}]), {estimate.n_units} units, {estimate.n_obs} rows.")
        if estimate.units_observed_once:
            feedback.pushWarning(f"{estimate.approach}: {estimate.units_observed_once} unit(s) observed once "
                                 "were dropped (they carry no change over time).")
        for period, theta_t, se_t, n_t in estimate.by_period:
            table.append((estimate.approach, f"{period:g}", theta_t, se_t, theta_t - Z95 * se_t,
                          theta_t + Z95 * se_t, float("nan"), n_t))
        for period, reason in estimate.not_estimable:   # listed with nulls, not a number that cannot exist
            table.append((estimate.approach, f"{period:g}", float("nan"), float("nan"), float("nan"),
                          float("nan"), float("nan"), 0))
            feedback.pushInfo(f"{estimate.approach}, {period:g}: not estimable ({reason}).")
    if panel.dropped["a value is null"]:
        feedback.pushInfo(f"{panel.dropped['a value is null']} row(s) with a null were dropped.")
    return table

"""Parameters shared by algorithms whose outcome may be a map's prediction: the correction file, its method, and
the true outcome of a random subset of units (prediction-powered inference). See core.corrections."""

import numpy as np
from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
)

from .convert import as_number, check_numeric_field

OUTCOME_CORRECTION, CORRECTION, OUTCOME_TRUTH = "OUTCOME_CORRECTION", "CORRECTION", "OUTCOME_TRUTH"
METHODS = ("none", "linear", "tweedie")


def add_outcome_correction_parameters(algorithm, truth=False):
    correction = QgsProcessingParameterFile(
        OUTCOME_CORRECTION, "Outcome is a map's prediction: its correction file (from 'Calibrate a predicted-outcome "
        "map')", extension="json", optional=True)
    correction.setFlags(correction.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    algorithm.addParameter(correction)
    method = QgsProcessingParameterEnum(CORRECTION, "Correction of the predicted outcome", list(METHODS),
                                        defaultValue=1)
    method.setFlags(method.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    algorithm.addParameter(method)
    if truth:
        measured = QgsProcessingParameterField(
            OUTCOME_TRUTH, "True outcome where measured (a random subset; prediction-powered ATE)",
            parentLayerParameterName="INPUT", type=QgsProcessingParameterField.Numeric, optional=True)
        measured.setFlags(measured.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        algorithm.addParameter(measured)


def read_outcome_correction(algorithm, parameters, context, source, features):
    """(OutcomeCorrection or None, method, truth array or None) from the parameters."""
    from ..core.corrections import OutcomeCorrection
    from ..core.errors import GeoCateError

    path = algorithm.parameterAsFile(parameters, OUTCOME_CORRECTION, context)
    method = METHODS[algorithm.parameterAsEnum(parameters, CORRECTION, context)]
    correction = None
    if path:
        try:
            correction = OutcomeCorrection.load(path)
        except GeoCateError as error:
            raise QgsProcessingException(str(error)) from error
    truth = None
    field = algorithm.parameterAsString(parameters, OUTCOME_TRUTH, context) if \
        algorithm.parameterDefinition(OUTCOME_TRUTH) is not None else ""
    if field:
        check_numeric_field(source.fields(), field, "true outcome")
        truth = np.array([as_number(feature[field]) for feature in features], float)
    return correction, method, truth


def report_predicted_outcome(record, feedback):
    """The log lines of an outcome taken from a map: the correction, the ATE under each, the PPI ATE."""
    if not record:
        return
    if "ate_by_correction" in record:
        feedback.pushInfo(f"The outcome is the map's prediction of '{record['outcome']}', corrected: "
                          f"{record['correction']}.")
        for method, ate in record["ate_by_correction"].items():
            feedback.pushInfo(f"  ATE with correction {method}: {ate['estimate']:.4f} (SE {ate['std_err']:.4f})")
        if record["outside_range"]:
            feedback.pushWarning(f"{record['outside_range']} unit(s) have map values outside the range the "
                                 f"correction was fit on ({record['validation_range'][0]:.3f} to "
                                 f"{record['validation_range'][1]:.3f}): their correction extrapolates.")
    if "prediction_powered_ate" in record:
        ppi = record["prediction_powered_ate"]
        feedback.pushInfo(f"Prediction-powered ATE (true outcome on {ppi['n_labelled']} units): "
                          f"{ppi['estimate']:.4f} (SE {ppi['std_err']:.4f}).")


def ppi_outputs(record):
    ppi = (record or {}).get("prediction_powered_ate")
    return {"ATE_PPI": ppi["estimate"] if ppi else None, "ATE_PPI_SE": ppi["std_err"] if ppi else None}

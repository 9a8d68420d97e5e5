"""geocate:calibratemap - the correction of a predicted-outcome map, from its makers' validation units."""

import os

import numpy as np
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBand,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from .base import GeoCateAlgorithm, add_report_parameter
from .convert import as_number, check_numeric_field, unit_point
from .widgets import field_role


class CalibrateMapAlgorithm(GeoCateAlgorithm):
    INPUT, TRUTH, PREDICTION = "INPUT", "TRUTH", "PREDICTION"
    PREDICTION_RASTER, PREDICTION_BAND, OUTCOME_NAME = "PREDICTION_RASTER", "PREDICTION_BAND", "OUTCOME_NAME"
    OUTPUT, OUTPUT_REPORT = "OUTPUT", "OUTPUT_REPORT"

    short_description = ("The correction of an outcome map predicted from imagery (a wealth or yield map), fit once "
                         "from its validation units and reused by any trial that takes its outcome from the map.")
    extra_tags = ("prediction", "debiasing", "calibration", "Tweedie", "poverty map", "measurement error")

    def name(self):
        return "calibratemap"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Calibrate a predicted-outcome map"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "A map predicted from imagery is shrunk toward the mean, so a treatment effect measured on it is too "
            "small. From the map makers' validation units (the true value and the map's prediction at the same "
            "places), this writes a correction file (JSON) that 'Estimate treatment effects from imagery' and "
            "'Evaluate heterogeneity' apply to an outcome taken from the map (\"One Map, Many Trials\"): no trial "
            "needs new ground truth.\n\n"
            "Linear: regress the prediction on the truth (prediction = a + b truth) and use (prediction - a) / b. "
            "Tweedie: prediction - sigma^2 s(prediction), with sigma^2 the variance of prediction - truth and s the "
            "slope of the log density of the predictions (a kernel density estimate).\n\n"
            "The prediction is a field of the validation layer, or the value of a band of the map raster at each "
            "unit. The file records the outcome's name and the map (its name and band count): a trial whose outcome "
            "has another name is refused. Predictions outside the range seen here are flagged when the file is used."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        numeric = QgsProcessingParameterField.Numeric
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.INPUT, "Validation units (the map makers' ground truth)", [QgsProcessing.TypeVector]))
        self.addParameter(field_role(QgsProcessingParameterField(
            self.TRUTH, "True outcome field", parentLayerParameterName=self.INPUT, type=numeric), "outcome"))
        self.addParameter(QgsProcessingParameterField(
            self.PREDICTION, "Predicted outcome field (or the map raster below)", parentLayerParameterName=self.INPUT,
            type=numeric, optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.PREDICTION_RASTER, "Map raster (the prediction at each unit)", optional=True))
        self.addParameter(QgsProcessingParameterBand(
            self.PREDICTION_BAND, "Band of the map raster", defaultValue=1, parentLayerParameterName=self.PREDICTION_RASTER,
            optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.OUTCOME_NAME, "What the map predicts, as trials name their outcome field (default: the truth "
            "field's name)", optional=True))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT, "Correction file", "GeoCATE correction (*.json)"))
        add_report_parameter(self)
        for name, label in (("SLOPE", "Slope of the prediction on the truth (1 = no shrinkage)"),
                            ("SIGMA", "Standard deviation of prediction - truth"),
                            ("N_VALIDATION", "Validation units used")):
            self.addOutput(QgsProcessingOutputNumber(name, label))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.corrections import fit_correction
        from ..core.report import correction_report

        source = self.parameterAsSource(parameters, self.INPUT, context)
        if source is None:
            raise QgsProcessingException("The validation layer could not be read. Choose a layer in INPUT.")
        truth_field = self.parameterAsString(parameters, self.TRUTH, context)
        prediction_field = self.parameterAsString(parameters, self.PREDICTION, context)
        raster = self.parameterAsRasterLayer(parameters, self.PREDICTION_RASTER, context)
        band = self.parameterAsInt(parameters, self.PREDICTION_BAND, context) or 1
        outcome = self.parameterAsString(parameters, self.OUTCOME_NAME, context).strip() or truth_field
        truth, prediction, map_info = self._read(source, truth_field, prediction_field, raster, band, feedback)
        correction = fit_correction(truth, prediction, outcome, map_info)
        v = correction.validation
        feedback.pushInfo(f"{correction.n_validation} validation units. Slope of the prediction on the truth "
                          f"{v['slope']:.3f} (1 = no shrinkage), sigma {v['sigma']:.3f}.")
        for method in ("none", "linear", "tweedie"):
            feedback.pushInfo(f"{method}: slope on the truth {v[method]['slope_on_truth']:.3f}, RMSE "
                              f"{v[method]['rmse']:.3f}, sd ratio {v[method]['sd_ratio']:.3f}")
        path = self.output_file(parameters, self.OUTPUT, context)
        correction.save(path)
        self.write_run_metadata_beside(path, self.record(validation=correction.validation), feedback)
        return self.write_report(parameters, context, {
            self.OUTPUT: path, self.OUTPUT_REPORT: None, "SLOPE": v["slope"], "SIGMA": v["sigma"],
            "N_VALIDATION": correction.n_validation}, feedback, lambda report: correction_report(
                correction, report, np.asarray(truth, float), np.asarray(prediction, float)))

    def _read(self, source, truth_field, prediction_field, raster, band, feedback):
        """(truth, prediction, the map's description) at every validation unit: the prediction from its field,
        or sampled from the map raster."""
        if bool(prediction_field) == (raster is not None):
            raise QgsProcessingException("Give the prediction either as a field of the validation layer or as the map "
                                         "raster, not both and not neither.")
        check_numeric_field(source.fields(), truth_field, "truth")
        if prediction_field:
            check_numeric_field(source.fields(), prediction_field, "prediction")
        truth, prediction, xy = [], [], []
        for feature in source.getFeatures():
            if feedback.isCanceled():
                raise QgsProcessingException("The run was cancelled. Nothing was written.")
            truth.append(as_number(feature[truth_field]))
            prediction.append(as_number(feature[prediction_field]) if prediction_field else np.nan)
            xy.append(unit_point(feature.geometry()))
        map_info = {"name": source.sourceName(), "bands": None, "band": None, "field": prediction_field}
        if raster is not None:
            prediction = self._sample(raster, band, np.asarray(xy, float).reshape(-1, 2), source.sourceCrs())
            map_info = {"name": os.path.basename(raster.source()), "bands": raster.bandCount(), "band": band}
        return truth, prediction, map_info

    @staticmethod
    def _sample(raster, band, xy, crs):
        """The map's value at each unit (NaN outside it or on nodata): a 1-pixel window (core.patches)."""
        from ..core.patches import extract_patches

        wkt = crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED) if crs.isValid() else ""
        found = extract_patches(raster.source(), xy, wkt, [band], window_size_px=1)
        return np.where(found.ok, found.patches[:, 0, 0, 0], np.nan)

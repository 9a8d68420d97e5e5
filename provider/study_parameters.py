"""The parameters every algorithm that reads a trial and its imagery shares (names fixed by ARCHITECTURE.md)."""

from dataclasses import dataclass
from typing import Any, Optional

from qgis.core import (
    QgsApplication,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingParameterBand,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsWkbTypes,
)

from .widgets import field_role

INPUT, TREATMENT, OUTCOME, COVARIATES = "INPUT", "TREATMENT", "OUTCOME", "COVARIATES"
RASTER, BANDS, PATCH_SIZE, NODATA, SEED, SPATIAL_BLOCK = "RASTER", "BANDS", "PATCH_SIZE", "NODATA", "SEED", "SPATIAL_BLOCK"
SCALES, RASTERS_TIME, TIME_POOLING, ENCODER, FEATURE_CACHE = (
    "SCALES", "RASTERS_TIME", "TIME_POOLING", "ENCODER", "FEATURE_CACHE")
CLUSTER, STRATA, PROPENSITY, DESIGN = "CLUSTER", "STRATA", "PROPENSITY", "DESIGN"
DESIGNS = ("randomized", "observational")


def add_study_parameters(algorithm):
    """INPUT, TREATMENT, OUTCOME, COVARIATES, RASTER, BANDS, PATCH_SIZE, NODATA, SEED."""
    numeric = QgsProcessingParameterField.Numeric
    algorithm.addParameter(QgsProcessingParameterFeatureSource(
        INPUT, "Trial units (points or polygons)", [QgsProcessing.TypeVectorPoint, QgsProcessing.TypeVectorPolygon]))
    algorithm.addParameter(field_role(QgsProcessingParameterField(
        TREATMENT, "Treatment field (0 = control, 1 = treated)", parentLayerParameterName=INPUT, type=numeric),
        "treatment"))
    algorithm.addParameter(field_role(QgsProcessingParameterField(
        OUTCOME, "Outcome field", parentLayerParameterName=INPUT, type=numeric), "outcome"))
    algorithm.addParameter(QgsProcessingParameterField(
        COVARIATES, "Covariate fields", parentLayerParameterName=INPUT, type=numeric, allowMultiple=True,
        optional=True))
    algorithm.addParameter(QgsProcessingParameterRasterLayer(RASTER, "Imagery"))
    algorithm.addParameter(QgsProcessingParameterBand(
        BANDS, "Bands (default: all)", parentLayerParameterName=RASTER, optional=True, allowMultiple=True))
    algorithm.addParameter(QgsProcessingParameterNumber(
        PATCH_SIZE, "Window size (pixels per side)", QgsProcessingParameterNumber.Integer,
        defaultValue=33, minValue=3, maxValue=1025))
    nodata = QgsProcessingParameterNumber(
        NODATA, "Extra nodata value (besides the raster's own)", QgsProcessingParameterNumber.Double, optional=True)
    seed = QgsProcessingParameterNumber(
        SEED, "Random seed", QgsProcessingParameterNumber.Integer, defaultValue=42, minValue=0,
        maxValue=2**31 - 1)  # QGIS's integers are 32-bit: a larger seed would silently become 0
    for parameter in (nodata, seed):  # rarely changed: under Advanced, as spatial blocks and the device are
        parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        algorithm.addParameter(parameter)


def add_spatial_block_parameter(algorithm, advanced=True):
    block = QgsProcessingParameterNumber(
        SPATIAL_BLOCK, "Spatial blocks for cross-fitting, metres (-1 = auto: chosen from the data; 0 = none)",
        QgsProcessingParameterNumber.Double, defaultValue=-1, minValue=-1)
    if advanced:
        block.setFlags(block.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    algorithm.addParameter(block)


@dataclass(frozen=True)
class StudyParameters:
    """The parameters of a study, read once (read_study_parameters) and typed: the units' layer and fields, the
    imagery and its windows, the seed; how the trial was run (CLUSTER, STRATA, PROPENSITY, DESIGN) and how the
    imagery is seen (the imagery parameters) where the algorithm has them; the sensitivity strengths (CF_Y,
    CF_D, RHO) where it has them. The run record's parameters are read from the definitions
    (provider.base.parameter_record), not from this object."""

    source: Any                                 # the units' QgsProcessingFeatureSource
    treatment: str
    outcome: str
    covariates: list[str]
    raster: str
    bands: Optional[list[int]]
    window: int
    nodata: Optional[float]
    seed: int
    spatial_block: float = 0.0
    cluster: Optional[str] = None
    strata: Optional[str] = None
    known: Optional[str] = None
    design: str = "randomized"
    imagery: Any = None                         # core.represent.ImageryOptions, or None (the default imagery)
    sensitivity: Optional[tuple[float, float, float]] = None

    def study_design(self, **options):
        """The core's StudyDesign of this study (``options``: e.g. trim)."""
        from ..core.design import StudyDesign

        return StudyDesign(self.design, seed=self.seed, **options)

    def imagery_arguments(self):
        """The keyword arguments every core entry point takes for the units' imagery: raster_path, bands,
        window_size_px, nodata, seed, spatial_block, imagery."""
        return dict(raster_path=self.raster, bands=self.bands, window_size_px=self.window, nodata=self.nodata,
                    seed=self.seed, spatial_block=self.spatial_block, imagery=self.imagery)

    def read_units(self, feedback):
        """(features, core.study.UnitTable) of the units layer (provider.convert.read_units)."""
        from .convert import read_units

        return read_units(self.source, self.treatment, self.outcome, self.covariates, feedback, self.cluster,
                          self.strata, self.known)


def read_study_parameters(algorithm, parameters, context):
    """The StudyParameters of a run: the shared parameters, checked; the design, imagery and sensitivity
    parameters where the algorithm declares them."""
    source = algorithm.parameterAsSource(parameters, INPUT, context)
    if source is None:
        raise QgsProcessingException("The units layer could not be read. Choose a point or polygon layer in INPUT.")
    geometry = QgsWkbTypes.geometryType(source.wkbType())
    if geometry not in (QgsWkbTypes.PointGeometry, QgsWkbTypes.PolygonGeometry):
        kind = {QgsWkbTypes.LineGeometry: "lines", QgsWkbTypes.NullGeometry: "no geometries"}.get(geometry, "no points")
        raise QgsProcessingException(
            f"The units layer '{source.sourceName()}' holds {kind}: each unit needs a point or a polygon, around "
            "which its image window is read. Use a point or polygon layer (e.g. Vector > Geometry Tools > "
            "Centroids for lines, or Create points layer from table for a table with coordinates).")
    bands = algorithm.parameterAsInts(parameters, BANDS, context) if parameters.get(BANDS) else None
    if bands and len(set(bands)) != len(bands):
        raise QgsProcessingException(
            f"BANDS lists a band twice ({', '.join(map(str, bands))}): each band is one input of the image "
            "model. List each band once.")
    values = dict(
        source=source, treatment=algorithm.parameterAsString(parameters, TREATMENT, context),
        outcome=algorithm.parameterAsString(parameters, OUTCOME, context),
        covariates=algorithm.parameterAsFields(parameters, COVARIATES, context),
        raster=raster_path(algorithm.parameterAsRasterLayer(parameters, RASTER, context),
                           algorithm.parameterAsString(parameters, RASTER, context)),
        bands=bands, window=algorithm.parameterAsInt(parameters, PATCH_SIZE, context),
        nodata=(algorithm.parameterAsDouble(parameters, NODATA, context)
                if parameters.get(NODATA) not in (None, "") else None),
        seed=algorithm.parameterAsInt(parameters, SEED, context))
    if algorithm.parameterDefinition(SPATIAL_BLOCK) is not None:
        block = algorithm.parameterAsDouble(parameters, SPATIAL_BLOCK, context)
        values["spatial_block"] = -1.0 if -1 < block < 0 else block
    if algorithm.parameterDefinition(CLUSTER) is not None:
        values.update(zip(("cluster", "strata", "known", "design"),
                          read_design_parameters(algorithm, parameters, context)))
    if algorithm.parameterDefinition(SCALES) is not None:
        values["imagery"] = read_imagery_parameters(algorithm, parameters, context)
    if algorithm.parameterDefinition(SENSITIVITY_PARAMETERS[0][0]) is not None:
        values["sensitivity"] = read_sensitivity_parameters(algorithm, parameters, context)
    return StudyParameters(**values)


def raster_path(layer, given=None):
    """The file behind a raster layer, or a clear error if it is not a GDAL raster (``given``: what the user
    gave, to tell a file that cannot be read from no raster at all)."""
    import os

    if layer is None or not layer.isValid():
        path = (given or "").split("|")[0]
        if path and os.path.exists(path):
            raise QgsProcessingException(
                f"The raster '{path}' exists but cannot be read as a raster (a damaged or truncated file, or a "
                "format GDAL does not know). Check that it opens in QGIS, or export it again.")
        if path:
            raise QgsProcessingException(f"The raster '{path}' was not found. Check the path, or choose a layer.")
        raise QgsProcessingException("No raster layer was given. Choose the imagery layer in RASTER.")
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            f"The raster '{layer.name()}' comes from the '{layer.providerType()}' provider; GeoCATE reads "
            "image windows from files GDAL can open. Save it as a GeoTIFF first (Export > Save As).")
    return layer.source().split("|")[0]


def add_imagery_parameters(algorithm):
    """SCALES, RASTERS_TIME, TIME_POOLING, ENCODER, FEATURE_CACHE: how the units' imagery is seen (core.represent)."""
    from ..core.represent import POOLINGS

    algorithm.addParameter(QgsProcessingParameterString(
        SCALES, "Wider context: window sizes in pixels, e.g. 33,161 (each averaged down to the window; "
        "default: the window only)", optional=True))
    algorithm.addParameter(QgsProcessingParameterMultipleLayers(
        RASTERS_TIME, "Imagery of later dates, in time order (any grid or CRS; optional)", QgsProcessing.TypeRaster,
        optional=True))
    pooling = QgsProcessingParameterEnum(TIME_POOLING, "Pooling over dates", list(POOLINGS), defaultValue=0)
    encoder = QgsProcessingParameterFile(
        ENCODER, "Image encoder (ONNX file; default: random convolutions)", extension="onnx", optional=True)
    cache = QgsProcessingParameterBoolean(
        FEATURE_CACHE, "Reuse image features of an identical earlier run (cache in the QGIS profile)",
        defaultValue=True)
    scales, later = algorithm.parameterDefinition(SCALES), algorithm.parameterDefinition(RASTERS_TIME)
    for parameter in (scales, later):   # a first run needs neither: under Advanced, as in every dialog
        parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    for parameter in (pooling, encoder, cache):
        parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        algorithm.addParameter(parameter)


def feature_cache_folder():
    """Where image features are cached: the QGIS profile's cache folder."""
    import os

    return os.path.join(QgsApplication.qgisSettingsDirPath(), "cache", "geocate-features")


def read_imagery_parameters(algorithm, parameters, context):
    """The core.represent.ImageryOptions of the imagery parameters."""
    from ..core.represent import POOLINGS, FeatureCache, ImageryOptions

    scales = algorithm.parameterAsString(parameters, SCALES, context).strip() or None
    layers = algorithm.parameterAsLayerList(parameters, RASTERS_TIME, context) or []
    later = [raster_path(layer) for layer in layers]
    pooling = POOLINGS[algorithm.parameterAsEnum(parameters, TIME_POOLING, context)]
    encoder = algorithm.parameterAsFile(parameters, ENCODER, context) or None
    use_cache = algorithm.parameterAsBoolean(parameters, FEATURE_CACHE, context)
    return ImageryOptions(scales=scales, rasters_time=tuple(later), time_pooling=pooling, encoder=encoder,
                          cache=FeatureCache(feature_cache_folder()) if use_cache else None)


def add_design_parameters(algorithm, design=True, spatial_block=True):
    """How the trial was run: CLUSTER (folds and SEs keep clusters together), STRATA (block randomization),
    PROPENSITY (known unit-level probabilities), SPATIAL_BLOCK, DESIGN (randomized / observational). One
    declaration for every algorithm that estimates from a trial (estimatecate, targeting, comparesources,
    mapeffects, imageclusters without DESIGN: its cluster model assumes a randomized trial)."""
    algorithm.addParameter(QgsProcessingParameterField(
        CLUSTER, "Cluster field (e.g. village): folds and standard errors keep clusters together",
        parentLayerParameterName=INPUT, optional=True))
    algorithm.addParameter(QgsProcessingParameterField(
        STRATA, "Strata the trial was randomized within (e.g. district): each stratum's treated share is "
        "its assignment probability", parentLayerParameterName=INPUT, optional=True))
    known = QgsProcessingParameterField(
        PROPENSITY, "Known assignment probability of each unit (0 < p < 1; designs with unit-level "
        "probabilities)", parentLayerParameterName=INPUT, type=QgsProcessingParameterField.Numeric,
        optional=True)
    known.setFlags(known.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    algorithm.addParameter(known)
    if spatial_block:
        add_spatial_block_parameter(algorithm)
    if design:
        algorithm.addParameter(QgsProcessingParameterEnum(
            DESIGN, "Study design (observational: the propensity is estimated from the imagery and covariates)",
            list(DESIGNS), defaultValue=0))


def read_design_parameters(algorithm, parameters, context):
    """(cluster field or None, strata field or None, propensity field or None, design kind), checked together."""
    cluster = algorithm.parameterAsString(parameters, CLUSTER, context) or None
    strata = algorithm.parameterAsString(parameters, STRATA, context) or None
    known = algorithm.parameterAsString(parameters, PROPENSITY, context) or None
    if strata and known:
        raise QgsProcessingException("Give the strata or the known assignment probabilities, not both: with "
                                     "strata, each stratum's treated share is the probability.")
    definition = algorithm.parameterDefinition(DESIGN)   # its options name the designs, in its own order
    design_kind = definition.options()[algorithm.parameterAsEnum(parameters, DESIGN, context)] \
        if definition is not None else "randomized"
    if design_kind != "randomized" and (strata or known):
        raise QgsProcessingException(
            "STRATA and PROPENSITY describe how a randomized trial assigned treatment; the observational design "
            "estimates the propensity from the imagery and covariates instead. Choose the randomized design, or "
            "leave STRATA and PROPENSITY empty.")
    return cluster, strata, known, design_kind


SENSITIVITY_PARAMETERS = (
    ("CF_Y", "Sensitivity: confounder's share of the outcome's remaining variation (CF_Y)", 0.03, 0.0, 0.99),
    ("CF_D", "Sensitivity: its gain in the weights' variation (CF_D)", 0.03, 0.0, 0.99),
    ("RHO", "Sensitivity: correlation of the two confounding parts (RHO; 1 = worst case)", 1.0, -1.0, 1.0))


def add_sensitivity_parameters(algorithm):
    """CF_Y, CF_D, RHO (advanced) and the outputs RV, RV_A: the omitted-variable analysis of the AIPW ATE in an
    observational design (core.sensitivity), in estimateate and estimatecate."""
    from qgis.core import QgsProcessingOutputNumber

    for name, label, value, low, high in SENSITIVITY_PARAMETERS:
        strength = QgsProcessingParameterNumber(name, label, QgsProcessingParameterNumber.Double, defaultValue=value,
                                                minValue=low, maxValue=high)
        strength.setFlags(strength.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        algorithm.addParameter(strength)
    algorithm.addOutput(QgsProcessingOutputNumber(
        "RV", "Robustness value: the confounder strength that brings the AIPW ATE to 0"))
    algorithm.addOutput(QgsProcessingOutputNumber("RV_A", "Robustness value of its 95 % interval"))


def read_sensitivity_parameters(algorithm, parameters, context):
    """(CF_Y, CF_D, RHO)."""
    return tuple(algorithm.parameterAsDouble(parameters, name, context) for name, *_ in SENSITIVITY_PARAMETERS)


def report_sensitivity(analysis, strengths, feedback):
    """The log lines of a sensitivity analysis, and the outputs {RV, RV_A} of its first contrast (None: none)."""
    if analysis is None:
        return {"RV": None, "RV_A": None}
    from ..core.report import sensitivity_sentence

    for el in analysis.elements:
        chosen = analysis.rows[el.contrast][0]
        rv, rv_a = analysis.rv[el.contrast]
        feedback.pushInfo(
            f"Sensitivity ({el.contrast}): a confounder with CF_Y = {strengths[0]:g}, CF_D = {strengths[1]:g}, "
            f"RHO = {strengths[2]:g} would move the AIPW estimate to [{chosen['low']:.4f}, {chosen['high']:.4f}] "
            f"(95 % [{chosen['ci_low']:.4f}, {chosen['ci_high']:.4f}]); RV = {rv:.3f}, RV_a = {rv_a:.3f}.")
    feedback.pushInfo(sensitivity_sentence(analysis))
    first = analysis.rv[analysis.elements[0].contrast]
    return {"RV": first[0], "RV_A": first[1]}

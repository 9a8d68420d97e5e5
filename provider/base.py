"""What every GeoCATE Processing algorithm shares: group, icon, copying, and finishing a per-unit result layer."""

import json
import os

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingUtils,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QIcon

from ..plugin import ICON
from .styles import CATE_STYLE, apply_result_styles, save_styles_to_geopackage


class StyleOnLoad(QgsProcessingLayerPostProcessorInterface):
    """Styles a result layer when Processing loads it into the project."""

    alive = []  # Processing keeps only a pointer: hold the Python objects

    def __init__(self, current):
        super().__init__()
        self.current = current

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - QGIS's name
        if layer is not None and layer.fields().lookupField("group") >= 0:
            apply_result_styles(layer, current=self.current)

    @classmethod
    def create(cls, current):
        instance = cls(current)
        cls.alive.append(instance)
        return instance


def sidecar_path(destination):
    """Where a file output's run metadata goes: result.gpkg -> result.run.json (None for memory layers)."""
    path = destination.split("|")[0]
    if not path or "://" in path or not os.path.isfile(path):   # memory layers have ids, not files
        return None
    return os.path.splitext(os.path.abspath(path))[0] + ".run.json"


def json_safe(value):
    """``value`` with every float that is not finite (nan, inf) as None: strict JSON has no NaN."""
    import math

    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy scalars and arrays
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomically(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(json_safe(payload), handle, indent=2, default=str, allow_nan=False)
    os.replace(tmp, path)


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TAGS = ["causal", "causal inference", "CATE", "RCT", "randomized trial", "treatment effect", "heterogeneity",
        "impact evaluation", "satellite imagery", "remote sensing", "econml", "grf"]


def check_destinations(algorithm, parameters, context):
    """Before any work: every file destination's folder exists and is writable, and no output overwrites the
    input it is computed from (found only after the whole computation before)."""
    from qgis.core import QgsProcessingException, QgsProcessingParameterFolderDestination

    inputs = set()
    if algorithm.parameterDefinition("INPUT") is not None and parameters.get("INPUT") is not None:
        layer = algorithm.parameterAsVectorLayer(parameters, "INPUT", context)
        if layer is not None:
            inputs.add(os.path.abspath(layer.source().split("|")[0]))
    for definition in algorithm.destinationParameterDefinitions():
        name = definition.name()
        if parameters.get(name) in (None, ""):
            continue
        if isinstance(definition, QgsProcessingParameterFolderDestination):
            path = algorithm.parameterAsString(parameters, name, context)
            folder = os.path.dirname(os.path.abspath(path)) if path else ""
        elif definition.type() in ("sink", "vectorDestination", "rasterDestination"):
            path = algorithm.parameterAsOutputLayer(parameters, name, context) or ""
            folder = os.path.dirname(os.path.abspath(path.split("|")[0])) if path and "memory:" not in path else ""
        else:
            path = algorithm.parameterAsFileOutput(parameters, name, context)
            folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if not folder:
            continue
        if not os.path.isdir(folder):
            raise QgsProcessingException(
                f"The folder of {definition.description()} ({name}) does not exist: {folder}. "
                "Create it, or choose another destination. Nothing was computed.")
        if not os.access(folder, os.W_OK):
            raise QgsProcessingException(
                f"The folder of {definition.description()} ({name}) is not writable: {folder}. "
                "Choose a folder you can write to. Nothing was computed.")
        if os.path.abspath(path.split("|")[0]) in inputs:
            raise QgsProcessingException(
                f"{definition.description()} ({name}) is the input layer itself: writing it would destroy the "
                "units being read. Choose another file. Nothing was computed.")


PIP_NAMES = {"sklearn": "scikit-learn", "osgeo": "GDAL", "econml": "econml==0.16.0"}


def explain_missing_packages(process):
    """Wrap a processAlgorithm: a package missing on any import path (scikit-learn, scipy, matplotlib, ...)
    becomes the same 'install X' message as torch's, not a raw ImportError traceback."""
    import functools

    @functools.wraps(process)
    def wrapped(self, parameters, context, feedback):
        from qgis.core import QgsProcessingException

        from ..core.errors import MissingDependency

        check_destinations(self, parameters, context)
        try:
            return process(self, parameters, context, feedback)
        except ImportError as error:
            package = (error.name or "").split(".")[0] or str(error)
            raise QgsProcessingException(str(MissingDependency(package, PIP_NAMES.get(package)))) from error

    return wrapped


class GeoCateAlgorithm(QgsProcessingAlgorithm):
    result_style = CATE_STYLE  # the style a per-unit result layer opens with

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "processAlgorithm" in cls.__dict__:
            cls.processAlgorithm = explain_missing_packages(cls.__dict__["processAlgorithm"])
    short_description = ""     # one sentence, shown in the Toolbox's tooltip
    extra_tags = ()

    def tags(self):
        """Search words of the Processing Toolbox: searching 'causal' or 'RCT' finds GeoCATE."""
        return TAGS + list(self.extra_tags)

    def shortDescription(self):  # noqa: N802 - QGIS's name
        return self.short_description

    def helpUrl(self):  # noqa: N802 - QGIS's name
        """The README, where every algorithm and parameter is described."""
        from qgis.PyQt.QtCore import QUrl

        return QUrl.fromLocalFile(README).toString()

    def group(self):
        return "Treatment effects"

    def groupId(self):  # noqa: N802 - QGIS's name
        return "effects"

    def icon(self):
        return QIcon(ICON)

    def createInstance(self):  # noqa: N802 - QGIS's name
        return type(self)()

    def keep_result(self, context, dest_id, results, metadata):
        """Remember what postProcessAlgorithm finishes: the result layer, the results, the run metadata."""
        self._dest_id, self._results, self._metadata = dest_id, results, metadata
        if context.willLoadLayerOnCompletion(dest_id):
            context.layerToLoadOnCompletionDetails(dest_id).setPostProcessor(StyleOnLoad.create(self.result_style))
        return results

    def finish_result(self, context, feedback):
        """Style the result layer (and store its styles in a GeoPackage), write the run metadata beside it."""
        layer = QgsProcessingUtils.mapLayerFromString(self._dest_id, context)
        if layer is not None:
            apply_result_styles(layer, current=self.result_style)
            if layer.providerType() == "ogr":
                # Styles go into the file through a layer of their own: writing them through the
                # context's layer left that layer reading no features in the next step of a model.
                writer = QgsVectorLayer(layer.source(), layer.name(), "ogr")
                save_styles_to_geopackage(apply_result_styles(writer, current=self.result_style))
                del writer
        sidecar = sidecar_path(self._dest_id)
        if sidecar:
            write_json_atomically(sidecar, self._metadata)
            feedback.pushInfo(f"Run metadata written to {sidecar}.")
        return layer

    def postProcessAlgorithm(self, context, feedback):  # noqa: N802 - QGIS's name
        if getattr(self, "_dest_id", None) is None:
            return {}
        self.finish_result(context, feedback)
        # A non-empty answer replaces processAlgorithm's results, so give them all again.
        return self._results

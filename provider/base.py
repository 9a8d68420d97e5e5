"""What every GeoCATE Processing algorithm shares: group, icon, copying, and finishing a per-unit result layer."""

import json
import os

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingLayerPostProcessorInterface,
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
    from .outputs import is_plain_file

    path = destination.split("|")[0]
    if not is_plain_file(path):   # memory layers have ids, not files
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


def run_metadata(algorithm, parameters, started, **figures):
    """The run metadata every algorithm writes: algorithm, parameters, package versions, timings, figures."""
    import time

    from ..core.pipeline import package_versions

    return dict(figures, algorithm=algorithm, parameters=parameters, versions=package_versions(),
                timings={"total_s": round(time.monotonic() - started, 3)})


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TAGS = ["causal", "causal inference", "CATE", "RCT", "randomized trial", "treatment effect", "heterogeneity",
        "impact evaluation", "satellite imagery", "remote sensing", "econml", "grf"]


def requested_destination(value):
    """What the user asked for a destination parameter: a path, 'TEMPORARY_OUTPUT', or None."""
    from qgis.core import QgsProcessingOutputLayerDefinition

    if isinstance(value, QgsProcessingOutputLayerDefinition):
        value = value.sink.staticValue()
    return None if value in (None, "") else str(value)


def destination_of(algorithm, parameters, name, context):
    """Where layer destination ``name`` goes (a path, an ``ogr:`` URI or ``memory:...``), without side effects.

    ``parameterAsOutputLayer`` also registers the destination as a layer to load when the run ends (when the
    parameter names a project, as the dialog and ``runAndLoadResults`` do). Called on a sink that the run then
    creates under another name, it left a second entry that Processing could not load ("The following layers
    were not correctly generated: memory:Treatment effects (CATE)"). The question is asked here of a copy of
    the definition that names no project."""
    from qgis.core import QgsProcessingOutputLayerDefinition

    value = parameters.get(name)
    if isinstance(value, QgsProcessingOutputLayerDefinition):
        value = QgsProcessingOutputLayerDefinition(value)
        value.destinationProject = None
    return algorithm.parameterAsOutputLayer(dict(parameters, **{name: value}), name, context) or ""


def check_destinations(algorithm, parameters, context, files=None):
    """Before any work: every file destination's folder exists and is writable, no output overwrites the
    input it is computed from (found only after the whole computation before), and no other live run is
    writing it (``files``: the run's RunFiles, which takes each destination's lock)."""
    from qgis.core import QgsProcessingException, QgsProcessingParameterFolderDestination

    from .outputs import DestinationBusy

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
            path = destination_of(algorithm, parameters, name, context)
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
        if files is not None and requested_destination(parameters.get(name)) != "TEMPORARY_OUTPUT" \
                and not isinstance(definition, QgsProcessingParameterFolderDestination) and "|" not in path \
                and not path.startswith("ogr:"):
            try:
                files.lock(path)
            except DestinationBusy as error:
                files.release()
                raise QgsProcessingException(str(error)) from None


class quiet_libraries:  # noqa: N801 - used as a context manager
    """GDAL's error printing and numpy/torch/sklearn warnings off while an algorithm runs: they printed before the
    real message (which GeoCATE gives itself, naming the problem and the fix)."""

    def __enter__(self):
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        for category in (RuntimeWarning, UserWarning, FutureWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category)
        try:
            from osgeo import gdal

            gdal.PushErrorHandler("CPLQuietErrorHandler")
            self._gdal = gdal
        except ImportError:
            self._gdal = None
        return self

    def __exit__(self, *exc):
        if self._gdal is not None:
            self._gdal.PopErrorHandler()
        self._warnings.__exit__(*exc)
        return False


PIP_NAMES = {"sklearn": "scikit-learn", "osgeo": "GDAL", "econml": "econml==0.16.0"}


def guarded(process):
    """Wrap a processAlgorithm: destinations are checked and locked before any work (RunFiles); a package
    missing on any import path (scikit-learn, scipy, matplotlib, ...) becomes the same 'install X' message as
    torch's, not a raw ImportError traceback; a failure removes every partial output, and when all succeeded
    the outputs are moved into place."""
    import functools

    @functools.wraps(process)
    def wrapped(self, parameters, context, feedback):
        from qgis.core import QgsProcessingException

        from ..core.errors import MissingDependency
        from .outputs import RunFiles

        self._files, self._dest_id, self._on_load = RunFiles(), None, []
        check_destinations(self, parameters, context, self._files)
        try:
            with quiet_libraries():
                results = process(self, parameters, context, feedback)
            # Everything is written: move it into place here, where a failure still fails the run (QGIS
            # reports a failing postProcessAlgorithm but exits 0).
            results = self.commit_outputs(context, results)
            if self._dest_id is not None:
                self._results = results
            return results
        except ImportError as error:
            self._files.abort()
            package = (error.name or "").split(".")[0] or str(error)
            raise QgsProcessingException(str(MissingDependency(package, PIP_NAMES.get(package)))) from error
        except OSError as error:  # a file that could not be written: say so, and keep the earlier files
            self._files.abort()
            raise QgsProcessingException(
                f"Writing the outputs failed ({error.__class__.__name__}: {error}). Nothing was written: files from "
                "an earlier run are unchanged.") from error
        except BaseException:
            self._files.abort()
            raise

    return wrapped


class GeoCateAlgorithm(QgsProcessingAlgorithm):
    result_style = CATE_STYLE  # the style a per-unit result layer opens with

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "processAlgorithm" in cls.__dict__:
            cls.processAlgorithm = guarded(cls.__dict__["processAlgorithm"])
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

    # -- outputs: written under partial names (provider.outputs), moved into place when all succeeded ----------
    def create_sink(self, parameters, name, context, fields, geometry_type, crs):
        """parameterAsSink, writing a file destination under its partial name. Returns (sink, dest_id)."""
        from qgis.core import QgsProcessingException, QgsProcessingOutputLayerDefinition, QgsProperty

        from .outputs import is_plain_file

        final = destination_of(self, parameters, name, context)
        if is_plain_file(final):
            tmp = self._files.partial(final)
            value = parameters.get(name)
            definition = QgsProcessingOutputLayerDefinition(value) \
                if isinstance(value, QgsProcessingOutputLayerDefinition) else QgsProcessingOutputLayerDefinition(final)
            stem, ext = os.path.splitext(os.path.basename(final))
            # A GeoPackage's layer is named after the file: name it after the destination, not the partial file.
            target = f"ogr:dbname='{tmp}' table=\"{stem}\" (geom)" if ext.lower() == ".gpkg" else tmp
            definition.sink = QgsProperty.fromValue(target)
            parameters = dict(parameters, **{name: definition})
        sink, dest_id = self.parameterAsSink(parameters, name, context, fields, geometry_type, crs)
        if sink is None:
            raise QgsProcessingException(f"The output {name} could not be created. Check its path and that it is "
                                         "writable. Nothing was written.")
        return sink, dest_id

    def verify_written(self, dest_id, n_features):
        """After the sink is closed: the file holds every feature (a full disk leaves a GeoPackage without its
        layer while the writer reported success)."""
        from qgis.core import QgsProcessingException

        path = self._written_file(dest_id)
        if path is None:
            return
        layer = QgsVectorLayer(path, "check", "ogr")
        count = layer.featureCount() if layer.isValid() else -1
        del layer
        if count != n_features:
            raise QgsProcessingException(
                f"The output was not written completely ({max(count, 0)} of {n_features} rows): is the disk full "
                "or the folder removable? Free some space or choose another folder. Nothing was written.")

    def _written_file(self, dest_id):
        """The OGR source of a sink this run writes under a partial name, or None (memory layers, databases)."""
        path = self._ogr_path(dest_id[len("ogr:"):]) if dest_id.startswith("ogr:") else dest_id
        file = os.path.abspath(path.split("|")[0])
        return path if any(file == tmp for tmp, _ in self._files.pending) else None

    def output_file(self, parameters, name, context):
        """Where to write file destination ``name`` for now (its partial name), or None when not asked for."""
        final = self.parameterAsFileOutput(parameters, name, context) if parameters.get(name) else ""
        return self._files.partial(final) if final else None

    def final_path(self, path):
        """The destination a partial path will be moved to."""
        return self._files.final_of(path) if path else path

    def write_run_metadata(self, dest_id, metadata, feedback):
        """The run metadata beside a file result: result.gpkg -> result.run.json (strict JSON)."""
        written = self._written_file(dest_id)
        sidecar = sidecar_path(self.final_path(written.split("|")[0])) if written else None
        if sidecar:
            write_json_atomically(self._files.partial(sidecar), metadata)
            feedback.pushInfo(f"Run metadata: {sidecar}.")

    def write_run_metadata_beside(self, partial_path, metadata, feedback):
        """The run metadata beside a file output (a .json, a report): x.json -> x.run.json."""
        sidecar = os.path.splitext(self.final_path(partial_path))[0] + ".run.json"
        write_json_atomically(self._files.partial(sidecar), metadata)
        feedback.pushInfo(f"Run metadata: {sidecar}.")

    def commit_outputs(self, context, results):
        """Move every partial output into place; results and the layers QGIS loads name the destinations."""
        pending = list(self._files.pending)
        self._files.commit()

        def final(value):
            if isinstance(value, str):
                for tmp, path in pending:
                    stem = os.path.splitext(os.path.basename(path))[0]
                    value = value.replace(f"{tmp}|layername={stem}", path).replace(tmp, path)
            return value

        layers = context.layersToLoadOnCompletion()
        if any(final(key) != key for key in layers):
            # Safe only while no post-processor is attached: QGIS deletes the post-processor of every key that
            # leaves the map, and the renamed entry kept a pointer to it (the segmentation fault in Processing's
            # handleAlgorithmResults after a run with a file output). Post-processors are attached below.
            context.setLayersToLoadOnCompletion({final(key): details for key, details in layers.items()})
        for key, make in getattr(self, "_on_load", []):
            if context.willLoadLayerOnCompletion(final(key)):
                context.layerToLoadOnCompletionDetails(final(key)).setPostProcessor(make())
        self._on_load = []
        return {key: final(value) for key, value in (results or {}).items()}

    def style_on_load(self, key, make):
        """Style layer ``key`` when Processing loads it: ``make()`` gives the post-processor. It is attached after
        the outputs were moved into place and the layers to load renamed (commit_outputs), never before."""
        self._on_load.append((key, make))

    def keep_result(self, context, dest_id, results, metadata, feedback):
        """Finish a per-unit result layer while still in processAlgorithm (a failure there fails the run): its
        styles into its GeoPackage, the run metadata beside it; a layer QGIS loads is styled when loaded."""
        self._dest_id, self._results, self._metadata = dest_id, results, metadata
        self._memory_result = self._written_file(dest_id) is None
        self.style_on_load(dest_id, lambda: StyleOnLoad.create(self.result_style))
        written = self._written_file(dest_id)
        if written:
            # Styles go into the file through a layer of their own (the context's layer left a model's next step
            # reading no features), closed before the file is moved into place.
            writer = QgsVectorLayer(written, "result", "ogr")
            if writer.isValid():
                save_styles_to_geopackage(apply_result_styles(writer, current=self.result_style))
            del writer
        self.write_run_metadata(dest_id, metadata, feedback)
        return results

    def postProcessAlgorithm(self, context, feedback):  # noqa: N802 - QGIS's name
        """A memory result layer is styled here, in the main thread (file results were styled and moved)."""
        from qgis.core import QgsProcessingUtils

        if getattr(self, "_dest_id", None) is None:
            return {}
        if self._memory_result:
            layer = QgsProcessingUtils.mapLayerFromString(self._dest_id, context)
            if layer is not None:
                apply_result_styles(layer, current=self.result_style)
        # A non-empty answer replaces processAlgorithm's results, so give them all again.
        return self._results

    @staticmethod
    def _ogr_path(uri):
        """dbname='x.gpkg' table="t" (geom) -> x.gpkg|layername=t"""
        import re

        match = re.match(r"dbname='([^']*)'\s+table=\"([^\"]*)\"", uri)
        return f"{match.group(1)}|layername={match.group(2)}" if match else uri

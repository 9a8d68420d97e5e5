"""What every GeoCATE Processing algorithm shares: group, icon, copying, and finishing a per-unit result layer."""

import json
import os

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingLayerPostProcessorInterface,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QIcon

from ..paths import HELP_DIR, ICON, README
from .styles import CATE_STYLE, apply_result_styles, save_styles_to_geopackage


class StyleOnLoad(QgsProcessingLayerPostProcessorInterface):
    """Styles a result layer when Processing loads it into the project."""

    alive = []  # Processing keeps only a pointer: hold the Python objects

    def __init__(self, current, raster=None, window=None):
        super().__init__()
        self.current, self.raster, self.window = current, raster, window

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - QGIS's name
        if layer is not None and any(layer.fields().lookupField(f) >= 0 for f in ("group", "treat")):
            apply_result_styles(layer, current=self.current)
        if layer is not None and self.raster:   # for the map tool: the window each unit's estimate came from
            layer.setCustomProperty("geocate/raster", self.raster)
            layer.setCustomProperty("geocate/window", self.window)

    @classmethod
    def create(cls, current, raster=None, window=None):
        instance = cls(current, raster, window)
        cls.alive.append(instance)
        return instance


def add_report_parameter(algorithm, name="OUTPUT_REPORT"):
    """The HTML report: optional, and proposed by every dialog (a temporary file unless another is chosen), so
    every run from a dialog arrives with its report; ``processing.run`` and ``qgis_process`` write it when asked."""
    from qgis.core import QgsProcessingParameterFileDestination

    algorithm.addParameter(QgsProcessingParameterFileDestination(
        name, "Report (HTML)", "HTML files (*.html)", optional=True, createByDefault=True))


def progress_to(feedback, start=0.0, span=100.0):
    """The core's progress(fraction, message) onto a Processing feedback: its bar from ``start`` over ``span``
    percent, and its text: the step, and once enough is done, the time left (core.progress.ProgressClock; an
    empty message keeps the step's)."""
    from ..core.progress import ProgressClock

    clock = ProgressClock()

    def progress(fraction, message=""):
        feedback.setProgress(start + span * fraction)
        text = clock.report(fraction, message)
        if text:
            feedback.setProgressText(text)

    return progress


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


def parameter_value(algorithm, definition, parameters, context):
    """The plain value of input parameter ``definition`` as the run record keeps it: a layer by its name (a
    raster by its file), a field or a list of fields by name, an enum by its option, an extent as QGIS writes it
    ("xmin,xmax,ymin,ymax [CRS]"), a number, a flag, a path or a text; None when an optional one was not given."""
    name, kind = definition.name(), definition.type()
    if parameters.get(name) in (None, "", []) and definition.defaultValue() in (None, "", []) \
            and kind not in ("boolean", "enum", "number"):   # not given, and no default the run falls back on
        return [] if kind == "multilayer" or (kind == "field" and definition.allowMultiple()) else None
    if kind in ("source", "vector"):
        source = algorithm.parameterAsSource(parameters, name, context)
        return source.sourceName() if source is not None else None
    if kind == "raster":
        layer = algorithm.parameterAsRasterLayer(parameters, name, context)
        return layer.source().split("|")[0] if layer is not None else None
    if kind == "multilayer":
        return [layer.source().split("|")[0] for layer in algorithm.parameterAsLayerList(parameters, name, context)]
    if kind == "field":
        fields = algorithm.parameterAsFields(parameters, name, context)
        return list(fields) if definition.allowMultiple() else (fields[0] if fields else None)
    if kind == "band":
        return algorithm.parameterAsInts(parameters, name, context) if definition.allowMultiple() \
            else algorithm.parameterAsInt(parameters, name, context)
    if kind == "enum":
        return definition.options()[algorithm.parameterAsEnum(parameters, name, context)]
    if kind == "boolean":
        return algorithm.parameterAsBoolean(parameters, name, context)
    if kind == "number":
        if parameters.get(name) in (None, "") and definition.defaultValue() is None:
            return None
        from qgis.core import QgsProcessingParameterNumber

        if definition.dataType() == QgsProcessingParameterNumber.Integer:
            return algorithm.parameterAsInt(parameters, name, context)
        value = algorithm.parameterAsDouble(parameters, name, context)
        return -1.0 if name == "SPATIAL_BLOCK" and -1 < value < 0 else value   # as the run reads it: auto
    if kind == "extent":
        rectangle = algorithm.parameterAsExtent(parameters, name, context)
        if rectangle.isNull():
            return None
        # A CRS only where the value names one: without, QGIS's answer is the project's, which the run did not use.
        given = parameters.get(name)
        named = "[" in given if isinstance(given, str) else type(given).__name__ == "QgsReferencedRectangle"
        crs = algorithm.parameterAsExtentCrs(parameters, name, context) if named else None
        return (f"{rectangle.xMinimum()!r},{rectangle.xMaximum()!r},{rectangle.yMinimum()!r},"
                f"{rectangle.yMaximum()!r}" + (f" [{crs.authid()}]" if crs and crs.isValid() and crs.authid() else ""))
    if kind == "file":
        return algorithm.parameterAsFile(parameters, name, context) or None
    return algorithm.parameterAsString(parameters, name, context).strip() or None


def parameter_record(algorithm, parameters, context):
    """Every input parameter of ``algorithm`` by its Processing name (parameter_value), in the order the
    algorithm declares them: the run record's parameters come from the definitions, not from a dict each
    algorithm types again."""
    from qgis.core import QgsProcessingDestinationParameter

    return {definition.name(): parameter_value(algorithm, definition, parameters, context)
            for definition in algorithm.parameterDefinitions()
            if not isinstance(definition, QgsProcessingDestinationParameter)}


#: The Processing Toolbox's groups: (id, name) by algorithm.
GROUPS = {
    "trials": "Randomized trials",
    "observational": "Observational studies and panels",
    "maps": "Maps",
    "evaluation": "Evaluation",
    "utilities": "Utilities",
}
ALGORITHM_GROUPS = {
    "estimatecate": "trials", "imageclusters": "trials", "targeting": "trials",
    "estimateate": "observational", "paneleffects": "observational", "eventstudy": "observational",
    "mapeffects": "maps", "applyclusters": "maps",
    "evaluate": "evaluation", "comparesources": "evaluation",
    "calibratemap": "utilities",
}
TAGS = ["causal", "causal inference", "CATE", "RCT", "randomized trial", "treatment effect", "heterogeneity",
        "impact evaluation", "satellite imagery", "remote sensing", "econml", "grf"]


def requested_destination(value):
    """What the user asked for a destination parameter: a path, 'TEMPORARY_OUTPUT', or None."""
    from qgis.core import QgsProcessingOutputLayerDefinition

    if isinstance(value, QgsProcessingOutputLayerDefinition):
        value = value.sink.staticValue()
    return None if value in (None, "") else str(value)


def ogr_uri(path, table):
    """The ``ogr:`` destination of table ``table`` in GeoPackage ``path`` (quotes in the path escaped)."""
    from qgis.core import QgsDataSourceUri

    uri = QgsDataSourceUri()
    uri.setDatabase(path)
    uri.setDataSource("", table, "geom")
    return "ogr:" + uri.uri()


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


def input_files(algorithm, parameters, context):
    """The files every input parameter reads (units layer, rasters, models, encoders, correction files)."""
    from qgis.core import QgsProcessingDestinationParameter

    files = set()

    def add(source):
        path = (source or "").split("|")[0]
        if path and os.path.exists(path):
            files.add(os.path.realpath(path))

    for definition in algorithm.parameterDefinitions():
        name = definition.name()
        if isinstance(definition, QgsProcessingDestinationParameter) or parameters.get(name) in (None, "", []):
            continue
        kind = definition.type()
        try:
            if kind in ("source", "vector", "raster", "layer", "mesh"):
                layer = algorithm.parameterAsLayer(parameters, name, context)
                add(layer.source() if layer is not None else algorithm.parameterAsString(parameters, name, context))
            elif kind == "multilayer":
                for layer in algorithm.parameterAsLayerList(parameters, name, context) or []:
                    add(layer.source())
            elif kind == "file":
                add(algorithm.parameterAsFile(parameters, name, context))
        except Exception:  # noqa: BLE001 - an unreadable input is the algorithm's own refusal, with its message
            continue
    return files


def allowed_extensions(algorithm, definition):
    """The file extensions a destination may have (lower case, no dot), or None where any is fine."""
    import re

    kind = definition.type()
    if kind in ("sink", "vectorDestination"):
        return set(definition.supportedOutputVectorLayerExtensions())
    if kind == "rasterDestination":   # GeoCATE writes its maps as (Cloud-Optimized) GeoTIFF
        return {"tif", "tiff"}
    if kind == "fileDestination":
        found = set(re.findall(r"\*\.([A-Za-z0-9]+)", definition.fileFilter()))
        return {ext.lower() for ext in found} or None
    return None


def check_destinations(algorithm, parameters, context, files=None):
    """Before any work: every file destination's folder exists and is writable, has an extension GeoCATE can
    write, is not one of the run's inputs (found only after the whole computation before), and no other live
    run is writing it (``files``: the run's RunFiles, which takes each destination's lock). Every check is made
    before the first lock is taken, and a refusal releases what was taken: a refused run leaves nothing."""
    from qgis.core import QgsProcessingException, QgsProcessingParameterFolderDestination

    from .outputs import DestinationBusy

    inputs = input_files(algorithm, parameters, context)
    to_lock = []
    for definition in algorithm.destinationParameterDefinitions():
        name = definition.name()
        if parameters.get(name) in (None, ""):
            continue
        label = f"{definition.description()} ({name})"
        if isinstance(definition, QgsProcessingParameterFolderDestination):
            path = algorithm.parameterAsString(parameters, name, context)
        elif definition.type() in ("sink", "vectorDestination", "rasterDestination"):
            path = destination_of(algorithm, parameters, name, context)
            if path.startswith("memory:") or requested_destination(parameters.get(name)) == "TEMPORARY_OUTPUT":
                continue
            if path.startswith("ogr:"):   # a table in a database file ("Save to GeoPackage"): checked by OGR
                continue
            if "|" in path:
                raise QgsProcessingException(
                    f"{label}: '{path}' names a layer inside a file ('|'). GeoCATE writes its result as a file of "
                    "its own: give a plain file name (e.g. result.gpkg), or use the dialog's 'Save to "
                    "GeoPackage...' to add a table to an existing GeoPackage. Nothing was computed.")
        else:
            path = algorithm.parameterAsFileOutput(parameters, name, context)
        if not path or "://" in path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise QgsProcessingException(
                f"The folder of {label} does not exist: {folder}. Create it, or choose another destination. "
                "Nothing was computed.")
        if not os.access(folder, os.W_OK):
            raise QgsProcessingException(
                f"The folder of {label} is not writable: {folder}. Choose a folder you can write to. Nothing was "
                "computed.")
        extensions = allowed_extensions(algorithm, definition)
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if extensions is not None and not isinstance(definition, QgsProcessingParameterFolderDestination) \
                and ext and ext not in extensions:   # no extension: QGIS adds the default one
            shown = ", ".join(f".{e}" for e in sorted(extensions)[:8]) + (" ..." if len(extensions) > 8 else "")
            raise QgsProcessingException(
                f"{label}: GeoCATE cannot write a '.{ext}' file here ({os.path.basename(path)}). Use one of "
                f"{shown}. Nothing was computed.")
        if os.path.realpath(path) in inputs:
            raise QgsProcessingException(
                f"{label} is one of the run's inputs ({path}): writing it would destroy what is being read. Choose "
                "another file. Nothing was computed.")
        if not isinstance(definition, QgsProcessingParameterFolderDestination):
            to_lock.append(path)
    if files is None:
        return
    try:
        for path in to_lock:
            files.lock(path)
    except DestinationBusy as error:
        files.release()
        raise QgsProcessingException(str(error)) from None
    except BaseException:
        files.release()
        raise


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
    """Wrap a processAlgorithm: destinations are checked and locked before any work (RunFiles); the core's
    GeoCateError becomes the QgsProcessingException Processing shows (one place, not one per algorithm); a package
    missing on any import path (scikit-learn, scipy, matplotlib, ...) becomes the same 'install X' message as
    torch's, not a raw ImportError traceback; a failure removes every partial output, and when all succeeded
    the outputs are moved into place."""
    import functools

    @functools.wraps(process)
    def wrapped(self, parameters, context, feedback):
        from .collector import held_off_main_thread

        with held_off_main_thread():   # no cycle collection in a task's thread: it deleted main-thread Qt objects
            return run_guarded(self, process, parameters, context, feedback)

    return wrapped


def run_guarded(algorithm, process, parameters, context, feedback):
    """``process`` run as ``guarded`` describes."""
    import time

    from qgis.core import QgsProcessingException

    from ..core.errors import GeoCateError, MissingDependency
    from .outputs import RunFiles

    algorithm._files, algorithm._dest_id, algorithm._on_load, algorithm._scratch = RunFiles(), None, [], []
    algorithm._run = (parameters, context, time.monotonic())   # for GeoCateAlgorithm.record
    check_destinations(algorithm, parameters, context, algorithm._files)
    try:
        with quiet_libraries():
            results = process(algorithm, parameters, context, feedback)
        # Everything is written: move it into place here, where a failure still fails the run (QGIS
        # reports a failing postProcessAlgorithm but exits 0).
        results = algorithm.commit_outputs(context, results)
        if algorithm._dest_id is not None:
            algorithm._results = results
        return results
    except GeoCateError as error:   # the core's message, naming the problem and its fix: Processing shows it
        algorithm._files.abort()
        raise QgsProcessingException(str(error)) from error
    except ImportError as error:
        algorithm._files.abort()
        package = (error.name or "").split(".")[0] or str(error)
        raise QgsProcessingException(str(MissingDependency(package, PIP_NAMES.get(package)))) from error
    except OSError as error:  # a file that could not be written: say so, and keep the earlier files
        algorithm._files.abort()
        raise QgsProcessingException(
            f"Writing the outputs failed ({error.__class__.__name__}: {error}). Nothing was written: files from "
            "an earlier run are unchanged.") from error
    except BaseException:
        algorithm._files.abort()
        raise
    finally:   # scratch folders (scratch_folder) go whatever happened
        import shutil

        for folder in algorithm._scratch:
            shutil.rmtree(folder, ignore_errors=True)
        algorithm._scratch = []


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
        """The algorithm's own help page shipped with the plugin (help/<name>.html); the README otherwise."""
        from qgis.PyQt.QtCore import QUrl

        page = os.path.join(HELP_DIR, f"{self.name()}.html")
        return QUrl.fromLocalFile(page if os.path.exists(page) else README).toString()

    def group(self):
        return GROUPS[self.groupId()]

    def groupId(self):  # noqa: N802 - QGIS's name
        return ALGORITHM_GROUPS.get(self.name(), "utilities")

    def icon(self):
        return QIcon(ICON)

    def checkParameterValues(self, parameters, context):  # noqa: N802 - QGIS's name
        """QGIS's check, with a number out of range named with its range ("Incorrect parameter value for SEED"
        said neither)."""
        ok, message = super().checkParameterValues(parameters, context)
        if ok:
            return ok, message
        from qgis.core import QgsProcessingParameterNumber

        for definition in self.parameterDefinitions():
            value = parameters.get(definition.name())
            import re

            if definition.type() in ("raster", "source", "vector", "layer") and isinstance(value, str) \
                    and os.path.isfile(value.split("|")[0]) and re.search(rf"\b{definition.name()}\b", message):
                kind = "a raster" if definition.type() == "raster" else "a layer"
                return False, (f"{definition.description()} ({definition.name()}): the file '{value}' exists but "
                               f"cannot be read as {kind} (a damaged or truncated file, or a format GDAL does not "
                               "know). Check that it opens in QGIS, or export it again.")
            if not isinstance(definition, QgsProcessingParameterNumber) or value in (None, ""):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                return False, f"{definition.description()} ({definition.name()}) must be a number, not '{value}'."
            low, high = definition.minimum(), definition.maximum()
            if number < low or number > high or (
                    definition.dataType() == QgsProcessingParameterNumber.Integer and number != int(number)):
                kind = "a whole number" if definition.dataType() == QgsProcessingParameterNumber.Integer \
                    else "a number"
                shown = (lambda v: f"{int(v)}") if definition.dataType() == QgsProcessingParameterNumber.Integer \
                    else (lambda v: f"{v:g}")
                bounds = f"from {shown(low)} to {shown(high)}" if high < 1e300 else f"at least {shown(low)}"
                return False, (f"{definition.description()} ({definition.name()}) must be {kind} {bounds}; "
                               f"{value} was given.")
        return ok, message

    def createInstance(self):  # noqa: N802 - QGIS's name
        return type(self)()

    def record(self, timings=None, versions=None, used=None, **figures):
        """This run's record (core.record.RunRecord): every input parameter read from the algorithm's own
        definitions (parameter_record; ``used``: values the run used instead of the one given, e.g. no spatial
        blocks on a table without geometries), the packages' versions (the core's ``versions`` are the same), the
        run's time (with the core's ``timings`` by step) and the ``figures`` it found."""
        import time

        from ..core.pipeline import package_versions
        from ..core.record import RunRecord

        parameters, context, started = self._run
        recorded = parameter_record(self, parameters, context)
        if "CORRECTION" in recorded and not recorded.get("OUTCOME_CORRECTION"):
            recorded["CORRECTION"] = None   # a correction method applies only with a correction file
        recorded.update(used or {})
        return RunRecord(algorithm=self.id() if self.provider() else f"geocate:{self.name()}",
                         parameters=recorded, figures=figures,
                         versions=package_versions(),
                         timings={**(timings or {}), "total_s": round(time.monotonic() - started, 3)})

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
            target = ogr_uri(tmp, stem) if ext.lower() == ".gpkg" else tmp
            definition.sink = QgsProperty.fromValue(target)
            parameters = dict(parameters, **{name: definition})
        sink, dest_id = self.parameterAsSink(parameters, name, context, fields, geometry_type, crs)
        if sink is None:
            raise QgsProcessingException(f"The output {name} could not be created. Check its path and that it is "
                                         "writable. Nothing was written.")
        return sink, dest_id

    def write_units(self, parameters, context, name, source, features, extra_fields, columns):
        """The input's features with the run's columns added, into the sink ``name`` (created now, with every
        number in hand), closed and checked; its id. extra_fields: (name, QVariant type) pairs (None: the
        CATE's); columns: {field: values per feature}."""
        from qgis.core import QgsFeatureSink, QgsProcessingException

        from .convert import output_fields, result_features

        fields, kept = output_fields(source.fields(), *(() if extra_fields is None else (extra_fields,)))
        sink, dest_id = self.create_sink(parameters, name, context, fields, source.wkbType(), source.sourceCrs())
        if not sink.addFeatures(result_features(features, kept, fields, columns), QgsFeatureSink.FastInsert):
            raise QgsProcessingException(f"Writing the output failed: {sink.lastError()}. Nothing was written.")
        del sink   # closes the file, so it can be checked and styled
        self.verify_written(dest_id, len(features))
        return dest_id

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

    def scratch_folder(self):
        """A temporary folder for this run's intermediate files, removed when the run ends, failed or not."""
        import tempfile

        folder = tempfile.mkdtemp(prefix="geocate-")
        self._scratch.append(folder)
        return folder

    def output_file(self, parameters, name, context):
        """Where to write file destination ``name`` for now (its partial name), or None when not asked for."""
        final = self.parameterAsFileOutput(parameters, name, context) if parameters.get(name) else ""
        return self._files.partial(final) if final else None

    def write_report(self, parameters, context, results, feedback, write, name="OUTPUT_REPORT"):
        """``results`` with the report, when one was asked for: ``write(path)`` writes it (under its partial
        name), and the log says where it goes."""
        report = self.output_file(parameters, name, context)
        if report:
            write(report)
            results[name] = report
            feedback.pushInfo(f"Report: {self.final_path(report)}.")
        return results

    def final_path(self, path):
        """The destination a partial path will be moved to."""
        return self._files.final_of(path) if path else path

    def write_run_metadata(self, dest_id, metadata, feedback):
        """The run metadata beside a file result: result.gpkg -> result.run.json (strict JSON)."""
        written = self._written_file(dest_id)
        sidecar = sidecar_path(self.final_path(written.split("|")[0])) if written else None
        if sidecar:
            write_json_atomically(self._files.partial(sidecar), metadata.to_json())
            feedback.pushInfo(f"Run metadata: {sidecar}.")

    def write_run_metadata_beside(self, partial_path, metadata, feedback):
        """The run metadata beside a file output (a .json, a report): x.json -> x.run.json."""
        sidecar = os.path.splitext(self.final_path(partial_path))[0] + ".run.json"
        write_json_atomically(self._files.partial(sidecar), metadata.to_json())
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
        used = metadata.get("parameters", {})
        self.style_on_load(dest_id, lambda: StyleOnLoad.create(self.result_style, used.get("RASTER"),
                                                               used.get("PATCH_SIZE")))
        written = self._written_file(dest_id)
        if written:
            # Styles go into the file through a layer of their own (the context's layer left a model's next step
            # reading no features), closed before the file is moved into place.
            writer = QgsVectorLayer(written, "result", "ogr")
            if writer.isValid():
                save_styles_to_geopackage(writer, current=self.result_style)
            del writer
        self.write_run_metadata(dest_id, metadata, feedback)
        return results

    def keep_layer(self, context, dest_id, style):
        """A second result layer of the run (e.g. targeting's candidates): its styles into its GeoPackage, and
        styled when Processing loads it."""
        self.style_on_load(dest_id, lambda: StyleOnLoad.create(style))
        written = self._written_file(dest_id)
        if written:
            writer = QgsVectorLayer(written, "result", "ogr")
            if writer.isValid():
                save_styles_to_geopackage(writer, current=style)
            del writer

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
        """dbname='x.gpkg' table="t" (geom) -> x.gpkg|layername=t (quotes in the path escaped as OGR URIs do)"""
        from qgis.core import QgsDataSourceUri

        parsed = QgsDataSourceUri(uri)
        return f"{parsed.database()}|layername={parsed.table()}" if parsed.database() else uri

"""geocate:mapeffects and geocate:applyclusters - effects and clusters mapped over whole rasters (core.maps)."""

import os

from qgis.core import (
    QgsCoordinateTransform,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputNumber,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProject,
    QgsRasterLayer,
    QgsWkbTypes,
)

from .base import GeoCateAlgorithm, add_report_parameter, progress_to
from .study_parameters import (
    add_design_parameters,
    add_imagery_parameters,
    add_study_parameters,
    raster_path,
    read_study_parameters,
)

EXTENT, MASK, STRIDE, METHOD, DASK_SCHEDULER, OUTPUT = "EXTENT", "MASK", "STRIDE", "METHOD", "DASK_SCHEDULER", "OUTPUT"
OUTPUT_REPORT = "OUTPUT_REPORT"


def write_map_report(algorithm, parameters, context, metadata, map_path, results, feedback):
    """The optional HTML report, written under its partial name like every output."""
    import tempfile

    from ..core.report import map_report

    def write(report):
        with tempfile.TemporaryDirectory(prefix="geocate-") as folder:
            map_report(metadata, report, map_path, folder)

    return algorithm.write_report(parameters, context, results, feedback, write, name=OUTPUT_REPORT)
METHODS = (("causal forest", "forest"), ("cluster model", "clusters"))


def below_vector_layers(layer, veil, project):
    """Move a loaded map (and its veil, right above it) below every vector layer of its group: a map loaded on
    top hid the units it was made from."""
    from qgis.core import QgsLayerTreeLayer, QgsVectorLayer

    root = project.layerTreeRoot()
    node = root.findLayer(layer.id())
    parent = node.parent() if node is not None else root
    vectors = [i for i, child in enumerate(parent.children())
               if isinstance(child, QgsLayerTreeLayer) and isinstance(child.layer(), QgsVectorLayer)]
    index = vectors[-1] + 1 if vectors else 0
    if node is not None:
        clone = node.clone()   # inserted before the old node goes, so the layer never leaves the tree
        parent.insertChildNode(index, clone)
        parent.removeChildNode(node)
        index = parent.children().index(clone)
    if veil is not None:
        parent.insertLayer(index, veil)


class StyleMapOnLoad(QgsProcessingLayerPostProcessorInterface):
    """Styles a map when Processing loads it, and lays the support veil over it (the same file, its support band)."""

    alive = []

    def __init__(self, band_names, threshold, name, clusters=None, raster=None, window=None):
        super().__init__()
        self.band_names, self.threshold, self.name, self.clusters = band_names, threshold, name, clusters
        self.raster, self.window = raster, window

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - QGIS's name
        from .styles import effect_map_style, support_veil_style

        if not isinstance(layer, QgsRasterLayer):
            return
        layer.setName(self.name)
        layer.setCustomProperty("geocate/raster", self.raster)   # the map tool reads a cell's window from it
        layer.setCustomProperty("geocate/window", self.window)
        effect_map_style(layer, self.band_names, self.clusters)
        project = context.project() or QgsProject.instance()
        veil = None
        if "support" in self.band_names:
            veil = QgsRasterLayer(layer.source(), f"{self.name}: outside the trial's support")
            if veil.isValid():
                support_veil_style(veil, self.band_names, self.threshold)
                project.addMapLayer(veil, False)
            else:
                veil = None
        below_vector_layers(layer, veil, project)
        node = project.layerTreeRoot().findLayer(layer.id())
        if node is not None and "cluster" not in self.band_names:   # "CATE", not "Band 1: cate (Gray)"
            from qgis.core import QgsMapLayerLegendUtils

            QgsMapLayerLegendUtils.setLegendNodeUserLabel(node, 0, "CATE")

    @classmethod
    def create(cls, *args):
        instance = cls(*args)
        cls.alive.append(instance)
        return instance


def add_map_parameters(algorithm):
    """EXTENT, MASK, STRIDE, DASK_SCHEDULER: where and how densely to map, and on which machines."""
    algorithm.addParameter(QgsProcessingParameterExtent(EXTENT, "Extent to map (default: the raster's)",
                                                        optional=True))
    algorithm.addParameter(QgsProcessingParameterFeatureSource(
        MASK, "Map only inside these polygons (any CRS)", [QgsProcessing.TypeVectorPolygon], optional=True))
    algorithm.addParameter(QgsProcessingParameterNumber(
        STRIDE, "Stride: pixels between map cells (default: the window size)", QgsProcessingParameterNumber.Integer,
        optional=True, minValue=0))
    scheduler = QgsProcessingParameterString(
        DASK_SCHEDULER, "Dask scheduler address for maps beyond one machine (e.g. tcp://10.0.0.5:8786; default: "
        "this machine)", optional=True)
    scheduler.setFlags(scheduler.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    algorithm.addParameter(scheduler)


def read_map_parameters(algorithm, parameters, context, raster_layer):
    """(extent in the raster's CRS or None, mask polygons as WKT in the raster's CRS or None, stride or None,
    scheduler or None)."""
    extent = None
    if parameters.get(EXTENT) not in (None, ""):
        rectangle = algorithm.parameterAsExtent(parameters, EXTENT, context, raster_layer.crs())
        if not rectangle.isNull() and not rectangle.isEmpty():
            extent = (rectangle.xMinimum(), rectangle.yMinimum(), rectangle.xMaximum(), rectangle.yMaximum())
    mask = None
    source = algorithm.parameterAsSource(parameters, MASK, context) if parameters.get(MASK) else None
    if source is not None:
        if QgsWkbTypes.geometryType(source.wkbType()) != QgsWkbTypes.PolygonGeometry:
            raise QgsProcessingException(f"The mask '{source.sourceName()}' holds no polygons. Give a polygon layer.")
        transform = QgsCoordinateTransform(source.sourceCrs(), raster_layer.crs(), context.transformContext())
        mask = []
        for feature in source.getFeatures():
            geometry = feature.geometry()
            if geometry is None or geometry.isEmpty():
                continue
            geometry.transform(transform)   # reprojected to the raster's CRS, not refused
            mask.append(geometry.asWkt())
        if not mask:
            raise QgsProcessingException(f"The mask '{source.sourceName()}' has no polygon with a geometry.")
    stride = algorithm.parameterAsInt(parameters, STRIDE, context) if parameters.get(STRIDE) not in (None, "") \
        else None
    scheduler = algorithm.parameterAsString(parameters, DASK_SCHEDULER, context).strip() or None
    if scheduler:   # before any fitting: an address that is not a scheduler hung after the whole fit
        from ..core.errors import GeoCateError
        from ..core.maps import check_dask_scheduler

        try:
            check_dask_scheduler(scheduler)
        except GeoCateError as error:
            raise QgsProcessingException(str(error)) from None
    return extent, mask, stride, scheduler


def summary_line(summary):
    line = (f"Map: {summary['n_cols']} x {summary['n_rows']} cells of {summary['stride']} pixels, "
            f"{summary['usable']} with a usable window, in {summary['tiles']} tiles.")
    if "share_outside_support" in summary and summary.get("method") != "saved cluster model":
        line += (f" {summary['share_outside_support']:.0%} of the mapped area lies outside the trial's support "
                 "(imagery unlike any trial unit's): effects there are extrapolated.")
    return line


class MapEffectsAlgorithm(GeoCateAlgorithm):
    short_description = ("Fits on the trial units and maps predicted treatment effects (or effect clusters) over the "
                         "imagery, with a flag where the map extrapolates.")
    extra_tags = ("map", "wall-to-wall", "prediction", "extrapolation", "Dask")

    def name(self):
        return "mapeffects"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Map treatment effects over the imagery"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "Fits the model of 'Estimate treatment effects from imagery' (causal forest; the image features are "
            "the effect modifiers, since no covariates exist where no trial ran) or of 'Find effect clusters in "
            "imagery' (cluster model, at average covariates) on the trial units, then predicts for every map "
            "cell of the raster: a cell is STRIDE x STRIDE pixels and sees the window around its centre, as a "
            "unit does, so a cell on a trial unit gives that unit's prediction.\n\n"
            "Output: one Cloud-Optimized GeoTIFF with overviews, bands cate, cate_se, support (forest) or "
            "p_1..p_K, cluster, cate, support (clusters). support compares each cell's imagery with the trial "
            "units': its distance to the nearest trial unit in the features' leading components, over the 95th "
            "percentile of the trial units' distances to each other; above 1 the cell is outside the trial's "
            "support and its effect an extrapolation. The map loads diverging about zero (or one colour per "
            "cluster) with a grey veil over cells outside the support; the log gives the share of such cells.\n\n"
            "Tiles are read, embedded and predicted in a stream, so memory stays bounded whatever the raster's "
            "size; with DASK_SCHEDULER the same per-tile function runs on a Dask cluster."
        )

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        add_study_parameters(self)
        add_imagery_parameters(self)
        add_design_parameters(self)
        self.addParameter(QgsProcessingParameterEnum(METHOD, "Model", [label for label, _ in METHODS],
                                                     defaultValue=0))
        add_map_parameters(self)
        for name, label, default in (("CLUSTERS", "Clusters (cluster model; 0 = choose)", 0),
                                     ("MAX_CLUSTERS", "Largest K to try (cluster model)", 4),
                                     ("EPOCHS", "Training steps (cluster model)", 300)):
            parameter = QgsProcessingParameterNumber(name, label, QgsProcessingParameterNumber.Integer,
                                                     defaultValue=default, minValue=0)
            parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(parameter)
        self.addParameter(QgsProcessingParameterRasterDestination(OUTPUT, "Map of effects"))
        add_report_parameter(self)
        self.addOutput(QgsProcessingOutputNumber("SHARE_OUTSIDE_SUPPORT", "Share of mapped cells outside the "
                                                                          "trial's support"))
        self.addOutput(QgsProcessingOutputNumber("CELLS", "Map cells with a usable window"))
        self.addOutput(QgsProcessingOutputNumber("N_USED", "Trial units used"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.maps import map_effects

        chosen = read_study_parameters(self, parameters, context)
        raster_layer = self.parameterAsRasterLayer(parameters, "RASTER", context)
        extent, mask, stride, scheduler = read_map_parameters(self, parameters, context, raster_layer)
        method = METHODS[self.parameterAsEnum(parameters, METHOD, context)][1]
        if method == "clusters" and chosen.design != "randomized":
            raise QgsProcessingException("The cluster model assumes a randomized trial. Choose the causal forest for "
                                         "an observational study, or the randomized design.")
        final = self.parameterAsOutputLayer(parameters, OUTPUT, context)
        features, units = chosen.read_units(feedback)
        path = self._files.partial(final)
        study_out, summary, _, _ = map_effects(
            units, path=path, **chosen.imagery_arguments(), method=method, stride=stride, extent=extent, mask=mask,
            scheduler=scheduler, n_clusters=self.parameterAsInt(parameters, "CLUSTERS", context),
            max_clusters=self.parameterAsInt(parameters, "MAX_CLUSTERS", context),
            epochs=self.parameterAsInt(parameters, "EPOCHS", context), progress=progress_to(feedback),
            is_cancelled=feedback.isCanceled, study_design=chosen.study_design())
        feedback.pushInfo(f"Trial units used: {study_out.n_used}; device {summary['device']}.")
        feedback.pushInfo(summary_line(summary))
        if summary["share_outside_support"] > 0.25:
            feedback.pushWarning(f"{summary['share_outside_support']:.0%} of the mapped area lies outside the trial's "
                                 "support: read effects there as extrapolations, not estimates.")
        metadata = self.record(**{k: v for k, v in summary.items() if k != "unit_support"},
                               extent_in_raster_crs=extent)
        self.write_run_metadata_beside(path, metadata, feedback)
        style_map_on_load(self, final, summary, f"Effects map ({chosen.outcome})", chosen.raster)
        return write_map_report(self, parameters, context, metadata, path, {
            OUTPUT: final, "SHARE_OUTSIDE_SUPPORT": summary["share_outside_support"], "CELLS": summary["usable"],
            "N_USED": study_out.n_used}, feedback)


def style_map_on_load(algorithm, final, summary, name, raster):
    """Style map ``final`` when Processing loads it (StyleMapOnLoad), for mapeffects and applyclusters alike."""
    from ..core.maps import SUPPORT_THRESHOLD

    algorithm.style_on_load(final, lambda: StyleMapOnLoad.create(summary["bands"], SUPPORT_THRESHOLD, name,
                                                                 summary.get("clusters"), raster,
                                                                 summary.get("window_size_px")))


class ApplyClustersAlgorithm(GeoCateAlgorithm):
    short_description = "Maps the clusters of a saved cluster model over any raster, without refitting."
    extra_tags = ("map", "ONNX", "clusters", "Dask")

    def name(self):
        return "applyclusters"

    def displayName(self):  # noqa: N802 - QGIS's name
        return "Map effect clusters with a saved model"

    def shortHelpString(self):  # noqa: N802 - QGIS's name
        return (
            "Applies a cluster model saved by 'Find effect clusters in imagery' (its .onnx file with the .onnx.json "
            "beside it) to a raster - another district, another year - without refitting: every map cell (STRIDE x "
            "STRIDE pixels) gets the cluster probabilities p_1..p_K of the window around its centre, its most "
            "likely cluster and the expected effect sum_k p_k tau_k, at the trial's mean covariates. The raster "
            "must have the bands the model was made from; the model's window size is used. onnxruntime runs it "
            "with the CUDA provider first. Output: a Cloud-Optimized GeoTIFF, paletted by cluster.")

    def initAlgorithm(self, config=None):  # noqa: N802 - QGIS's name
        self.addParameter(QgsProcessingParameterFile("MODEL", "Saved cluster model (.onnx)", extension="onnx"))
        self.addParameter(QgsProcessingParameterRasterLayer("RASTER", "Imagery"))
        add_map_parameters(self)
        self.addParameter(QgsProcessingParameterRasterDestination(OUTPUT, "Map of clusters"))
        add_report_parameter(self)
        self.addOutput(QgsProcessingOutputNumber("CELLS", "Map cells with a usable window"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 - QGIS's name
        from ..core.maps import apply_cluster_model

        model = self.parameterAsFile(parameters, "MODEL", context)
        raster_layer = self.parameterAsRasterLayer(parameters, "RASTER", context)
        raster = raster_path(raster_layer)
        extent, mask, stride, scheduler = read_map_parameters(self, parameters, context, raster_layer)
        final = self.parameterAsOutputLayer(parameters, OUTPUT, context)
        path = self._files.partial(final)
        summary = apply_cluster_model(model, raster, path, extent, mask, stride, scheduler,
                                      progress=progress_to(feedback),
                                      is_cancelled=feedback.isCanceled)
        feedback.pushInfo(f"Model run with {summary['provider']}.")
        feedback.pushInfo(summary_line(summary))
        for row in summary.get("clusters") or []:   # as the map's legend labels them, from the trial's table
            share = f", {float(row[4]):.0%}" if len(row) > 4 else ""
            feedback.pushInfo(f"cluster {int(row[0])}: {float(row[1]):+.2f}{share} of the trial's units")
        metadata = self.record(**summary, extent_in_raster_crs=extent)
        self.write_run_metadata_beside(path, metadata, feedback)
        style_map_on_load(self, final, summary,
                                           f"Clusters map ({os.path.splitext(os.path.basename(model))[0]})", raster)
        return write_map_report(self, parameters, context, metadata, path, {OUTPUT: final, "CELLS": summary["usable"]},
                                feedback)

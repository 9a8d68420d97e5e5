"""The map tool "What did GeoCATE find here?": click a unit of a result layer, or a cell of an effects map, and a
popup shows its image window(s), its CATE with the 95 % interval, its effect group or cluster, and whether it
lies within the trial's support (patch_ok for a unit, the support band for a map cell)."""

import os

import numpy as np
from qgis.core import (
    QgsCoordinateTransform,
    QgsProject,
    QgsRaster,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsMapTool
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QImage, QPixmap
from qgis.PyQt.QtWidgets import QDialog, QHBoxLayout, QLabel, QVBoxLayout

from ..core.errors import GeoCateError
from ..core.record import RunRecord
from ..core.scores import Z95

#: Layer properties GeoCATE sets when it loads a result: the imagery and window the run used.
RASTER_PROPERTY, WINDOW_PROPERTY = "geocate/raster", "geocate/window"


def run_inputs(layer):
    """(imagery path, window in pixels) a result layer came from: its properties, else its .run.json."""
    raster, window = layer.customProperty(RASTER_PROPERTY), layer.customProperty(WINDOW_PROPERTY)
    if raster and window:
        return str(raster), int(window)
    path = layer.source().split("|")[0]
    sidecar = os.path.splitext(path)[0] + ".run.json"
    if os.path.exists(sidecar):
        try:
            parameters = RunRecord.read(sidecar).parameters
            if parameters.get("RASTER") and parameters.get("PATCH_SIZE"):
                return str(parameters["RASTER"]), int(parameters["PATCH_SIZE"])
        except (OSError, ValueError, TypeError, GeoCateError):
            pass
    return None, None


def _number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def unit_at(layer, point, tolerance):
    """The attributes of the result unit of ``layer`` nearest ``point`` (map CRS) within ``tolerance``, or None."""
    transform = QgsCoordinateTransform(QgsProject.instance().crs(), layer.crs(), QgsProject.instance())
    here = transform.transform(point)
    box = transform.transformBoundingBox(QgsRectangle(point.x() - tolerance, point.y() - tolerance,
                                                      point.x() + tolerance, point.y() + tolerance))
    best, best_distance = None, None
    for feature in layer.getFeatures(box):
        distance = feature.geometry().centroid().asPoint().distance(here)
        if best is None or distance < best_distance:
            best, best_distance = feature, distance
    if best is None:
        return None
    centre = best.geometry().centroid().asPoint()
    info = {"kind": "unit", "layer": layer.name(), "x": centre.x(), "y": centre.y(), "crs": layer.crs().toWkt()}
    for name in ("cate", "cate_lo", "cate_hi", "cate_se", "group", "patch_ok"):
        if layer.fields().lookupField(name) >= 0:
            info[name] = _number(best[name])
    probabilities = [n for n in layer.fields().names() if n.startswith("p_")]
    if probabilities:
        info["probabilities"] = {n: _number(best[n]) for n in probabilities}
    return info


def cell_at(layer, point):
    """The band values of effects map ``layer`` at ``point`` (map CRS), or None outside it or on nodata."""
    transform = QgsCoordinateTransform(QgsProject.instance().crs(), layer.crs(), QgsProject.instance())
    here = transform.transform(point)
    from osgeo import gdal

    result = layer.dataProvider().identify(here, QgsRaster.IdentifyFormatValue)
    if not result.isValid():
        return None
    values = result.results()
    dataset = gdal.Open(layer.source().split("|")[0])   # the map's band names (cate, support, p_1, cluster ...)
    names = [dataset.GetRasterBand(b).GetDescription() or f"band {b}" for b in range(1, dataset.RasterCount + 1)]
    dataset = None
    bands = {name: _number(values.get(b + 1)) for b, name in enumerate(names)}
    if all(v is None for v in bands.values()):
        return None
    info = {"kind": "cell", "layer": layer.name(), "x": here.x(), "y": here.y(), "crs": layer.crs().toWkt()}
    info.update({k: v for k, v in bands.items() if k in ("cate", "cate_se", "cluster", "support")})
    probabilities = {k: v for k, v in bands.items() if k.startswith("p_")}
    if probabilities:
        info["probabilities"] = probabilities
    return info


def describe(info, support_threshold=None):
    """The popup's text (HTML) for a unit or a cell (support_threshold: core.maps.SUPPORT_THRESHOLD by default)."""
    if support_threshold is None:
        from ..core.maps import SUPPORT_THRESHOLD as support_threshold
    lines = [f"<b>{'Unit' if info['kind'] == 'unit' else 'Map cell'}</b> of <i>{info['layer']}</i>"]
    cate = info.get("cate")
    if cate is not None:
        low, high = info.get("cate_lo"), info.get("cate_hi")
        if (low is None or high is None) and info.get("cate_se") is not None:
            low, high = cate - Z95 * info["cate_se"], cate + Z95 * info["cate_se"]
        interval = f" (95 % interval {low:+.3f} to {high:+.3f})" if low is not None and high is not None else ""
        lines.append(f"<b>CATE</b> {cate:+.3f}{interval}")
    elif info["kind"] == "unit":
        lines.append("<b>CATE</b> none: this unit was not used (no usable window or a null value)")
    if info.get("group") is not None:
        lines.append(f"<b>Group / cluster</b> {int(info['group'])}")
    if info.get("cluster") is not None:
        lines.append(f"<b>Cluster</b> {int(info['cluster'])}")
    if info.get("probabilities"):
        lines.append("<b>Cluster probabilities</b> " + ", ".join(
            f"{k} {v:.2f}" for k, v in info["probabilities"].items() if v is not None))
    if info.get("patch_ok") is not None:
        lines.append("<b>Image window</b> " + ("usable" if info["patch_ok"] else "not usable (outside the raster, "
                                                                                  "at its edge or with nodata)"))
    if info.get("support") is not None:
        inside = info["support"] <= support_threshold
        lines.append("<b>Support</b> " + ("within the trial's support" if inside else
                                          "outside the trial's support: an extrapolation") +
                     f" (score {info['support']:.2f})")
    return "<br>".join(lines)


def window_image(raster, x, y, crs_wkt, window):
    """The image window around (x, y) as a QImage (true colour, stretched), or None where none can be read."""
    from ..core.patches import extract_patches
    from ..core.report import _display_rgb

    try:
        patches = extract_patches(raster, np.array([[x, y]]), crs_wkt, window_size_px=window)
    except Exception:  # noqa: BLE001 - no window is shown, the numbers still are
        return None
    if not patches.ok[0]:
        return None
    rgb = np.ascontiguousarray((_display_rgb(patches.patches[0]) * 255).astype(np.uint8))
    height, width = rgb.shape[:2]
    return QImage(rgb.data, width, height, 3 * width, QImage.Format_RGB888).copy()


class EffectPopup(QDialog):
    def __init__(self, info, image=None, parent=None):
        super().__init__(parent)
        self.setWindowTitle("GeoCATE: what was found here")
        layout = QHBoxLayout(self)
        if image is not None:
            picture = QLabel()
            picture.setPixmap(QPixmap.fromImage(image).scaled(200, 200, Qt.KeepAspectRatio, Qt.FastTransformation))
            picture.setToolTip("The image window the estimate comes from (true colour, stretched)")
            layout.addWidget(picture)
        column = QVBoxLayout()
        self.text = QLabel(describe(info))
        self.text.setTextFormat(Qt.RichText)
        self.text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        column.addWidget(self.text)
        layout.addLayout(column)
        self.info, self.has_image = info, image is not None


class EffectIdentifyTool(QgsMapTool):
    """Click a unit or an effects-map cell to see what GeoCATE found there."""

    def __init__(self, canvas, message_bar=None):
        super().__init__(canvas)
        self.message_bar = message_bar
        self.popup = None

    def canvasReleaseEvent(self, event):  # noqa: N802 - QGIS's name
        self.show_at(self.toMapCoordinates(event.pos()))

    def find(self, point):
        """(info, the layer it came from) for the topmost GeoCATE result under ``point``."""
        tolerance = self.canvas().mapUnitsPerPixel() * 6
        for layer in self.canvas().layers():
            if isinstance(layer, QgsVectorLayer) and layer.fields().lookupField("cate") >= 0 and layer.isSpatial():
                info = unit_at(layer, point, tolerance)
            elif isinstance(layer, QgsRasterLayer) and layer.customProperty(RASTER_PROPERTY):
                info = cell_at(layer, point)
            else:
                continue
            if info is not None:
                return info, layer
        return None, None

    def show_at(self, point):
        info, layer = self.find(point)
        if info is None:
            if self.message_bar is not None:
                from qgis.core import Qgis

                self.message_bar.pushMessage("GeoCATE", "No GeoCATE result here: click a unit of a result layer or "
                                                        "a cell of an effects map.", Qgis.Info, 5)
            return None
        raster, window = run_inputs(layer)
        image = window_image(raster, info["x"], info["y"], info["crs"], window) if raster else None
        if self.popup is not None:
            self.popup.close()
        self.popup = EffectPopup(info, image, self.canvas())
        self.popup.show()
        return self.popup

"""Styles of result layers: a diverging CATE renderer centred on zero and a categorized group renderer.

The renderers are built from the data (class breaks symmetric about zero, one
category per group present), so they are made here rather than shipped as
fixed .qml files; they are stored with the layer (as named styles, and in a
GeoPackage's layer_styles table) so the layer loads styled anywhere.
"""

import numpy as np
from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsGradientColorRamp,
    QgsGraduatedSymbolRenderer,
    QgsMapLayerStyle,
    QgsRendererCategory,
    QgsRendererRange,
    QgsStyle,
    QgsSymbol,
)
from qgis.PyQt.QtGui import QColor

from .convert import as_number

CATE_STYLE = "CATE (diverging, centred on 0)"
GROUP_STYLE = "Effect groups"


def _symbol(layer):
    symbol = QgsSymbol.defaultSymbol(layer.geometryType())
    if symbol.type() == QgsSymbol.Marker:
        symbol.setSize(2.4)
    symbol.symbolLayer(0).setStrokeColor(QColor(60, 60, 60))
    return symbol


def _ramp(name, fallback):
    ramp = QgsStyle.defaultStyle().colorRamp(name)
    return ramp if ramp is not None else QgsGradientColorRamp(*fallback)


def cate_renderer(layer, field="cate", n_classes=7):
    """Graduated renderer for ``field``, classes symmetric about 0, red (harm) to blue (gain)."""
    values = np.array([as_number(f[field]) for f in layer.getFeatures()], dtype=float)
    values = values[np.isfinite(values)]
    bound = float(np.quantile(np.abs(values), 0.98)) if len(values) else 1.0
    bound = bound if bound > 0 else 1.0
    edges = np.linspace(-bound, bound, n_classes + 1)
    low = min(float(values.min()) if len(values) else -bound, -bound)
    high = max(float(values.max()) if len(values) else bound, bound)
    edges[0], edges[-1] = low, high
    ramp = _ramp("RdBu", (QColor(178, 24, 43), QColor(33, 102, 172)))
    ranges = []
    for k in range(n_classes):
        symbol = _symbol(layer)
        symbol.setColor(ramp.color(k / (n_classes - 1)))
        label = f"{edges[k]:.2f} to {edges[k + 1]:.2f}"
        ranges.append(QgsRendererRange(float(edges[k]), float(edges[k + 1]), symbol, label))
    renderer = QgsGraduatedSymbolRenderer(field, ranges)
    renderer.setSourceColorRamp(ramp.clone())
    return renderer


def group_renderer(layer, field="group"):
    """Categorized renderer with one class per group present (1 = smallest effects)."""
    groups = sorted({int(v) for v in (as_number(f[field]) for f in layer.getFeatures()) if np.isfinite(v)})
    ramp = _ramp("Spectral", (QColor(215, 25, 28), QColor(43, 131, 186)))
    categories = []
    for k, group in enumerate(groups):
        symbol = _symbol(layer)
        symbol.setColor(ramp.color(k / max(len(groups) - 1, 1)))
        categories.append(QgsRendererCategory(group, symbol, f"group {group}"))
    return QgsCategorizedSymbolRenderer(field, categories)


def apply_result_styles(layer, current=CATE_STYLE):
    """Give ``layer`` both named styles, ``current`` (CATE_STYLE or GROUP_STYLE) in use; returns the layer."""
    manager = layer.styleManager()
    layer.setRenderer(group_renderer(layer))
    group_style = QgsMapLayerStyle()
    group_style.readFromLayer(layer)
    layer.setRenderer(cate_renderer(layer))
    manager.renameStyle(manager.currentStyle(), CATE_STYLE)
    manager.addStyle(GROUP_STYLE, group_style)
    manager.setCurrentStyle(current)
    layer.triggerRepaint()
    return layer


def save_styles_to_geopackage(layer):
    """Store the CATE style (default) and the group style in a GeoPackage's layer_styles table."""
    if layer.providerType() != "ogr" or ".gpkg" not in layer.source().lower():
        return False
    manager = layer.styleManager()
    current = manager.currentStyle()
    messages = []
    for name, description in ((GROUP_STYLE, "Effect groups, categorized"), (CATE_STYLE, "CATE, diverging about zero")):
        manager.setCurrentStyle(name)
        messages.append(layer.saveStyleToDatabase(name, description, name == current, ""))
    manager.setCurrentStyle(current)
    return not any(messages)

"""Styles of result layers: a diverging CATE renderer centred on zero, a categorized group renderer and the
targeting decision.

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
TREAT_STYLE = "Units to treat (the budget's choice)"


def _symbol(layer):
    symbol = QgsSymbol.defaultSymbol(layer.geometryType())
    if symbol.type() == QgsSymbol.Marker:
        symbol.setSize(2.4)
    symbol.symbolLayer(0).setStrokeColor(QColor(60, 60, 60))
    return symbol


def _ramp(name, fallback):
    ramp = QgsStyle.defaultStyle().colorRamp(name)
    return ramp if ramp is not None else QgsGradientColorRamp(*fallback)


def _values(layer, field):
    return np.array([as_number(f[field]) for f in layer.getFeatures()], dtype=float)


def _diverging_colour(ramp, value, bound):
    """The ramp's colour of ``value`` on a scale symmetric about 0: red for harm, white at 0, blue for gain."""
    return ramp.color(float(np.clip(0.5 + 0.5 * value / bound, 0.0, 1.0)))


def cate_breaks(values, n_half=3):
    """Class edges for CATE values: zero is an edge, steps of bound / n_half (bound: the 98th percentile of
    |value|), and classes only as far as the data reach (no negative classes when every effect is positive)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return np.array([-1.0, 0.0, 1.0]), 1.0
    bound = float(np.quantile(np.abs(values), 0.98)) or float(np.max(np.abs(values))) or 1.0
    step = bound / n_half
    low = max(np.floor(values.min() / step), -n_half)
    high = max(min(np.ceil(values.max() / step), n_half), low + 1)
    edges = np.arange(low, high + 1) * step
    edges[0], edges[-1] = min(edges[0], float(values.min())), max(edges[-1], float(values.max()))
    return edges, bound


def cate_renderer(layer, field="cate"):
    """Graduated renderer for ``field``: classes from the data about 0, red (harm) to blue (gain)."""
    edges, bound = cate_breaks(_values(layer, field))
    ramp = _ramp("RdBu", (QColor(178, 24, 43), QColor(33, 102, 172)))
    ranges = []
    for low, high in zip(edges[:-1], edges[1:]):
        symbol = _symbol(layer)
        symbol.setColor(_diverging_colour(ramp, (low + high) / 2, bound))
        ranges.append(QgsRendererRange(float(low), float(high), symbol, f"{low:+.2f} to {high:+.2f}"))
    renderer = QgsGraduatedSymbolRenderer(field, ranges)
    renderer.setSourceColorRamp(ramp.clone())
    return renderer


def group_renderer(layer, field="group"):
    """Categorized renderer, one class per group (or cluster) present, labelled with its mean estimated effect
    and its share of units ("group 1: +0.16, 33 %"), coloured by that effect on the CATE style's scale."""
    groups, cate = _values(layer, field), _values(layer, "cate")
    present = sorted({int(v) for v in groups if np.isfinite(v)})
    kind = "cluster" if layer.fields().lookupField("p_1") >= 0 else "group"
    bound = cate_breaks(cate)[1]
    ramp = _ramp("RdBu", (QColor(178, 24, 43), QColor(33, 102, 172)))
    total = max(int(np.isfinite(groups).sum()), 1)
    categories = []
    for group in present:
        members = groups == group
        effect = float(np.nanmean(cate[members])) if np.isfinite(cate[members]).any() else 0.0
        symbol = _symbol(layer)
        symbol.setColor(_diverging_colour(ramp, effect, bound))
        categories.append(QgsRendererCategory(group, symbol,
                                              f"{kind} {group}: {effect:+.2f}, {members.sum() / total:.0%}"))
    return QgsCategorizedSymbolRenderer(field, categories)


def treat_renderer(layer, field="treat"):
    """Categorized renderer of a targeting decision: units to treat in blue, the others light grey, with counts."""
    values = _values(layer, field)
    total = max(int(np.isfinite(values).sum()), 1)
    categories = []
    for value, colour, label in ((1, QColor(33, 102, 172), "treat"), (0, QColor(200, 200, 200), "do not treat")):
        symbol = _symbol(layer)
        symbol.setColor(colour)
        count = int(np.sum(values == value))
        categories.append(QgsRendererCategory(value, symbol, f"{label}: {count} ({count / total:.0%})"))
    missing = int(np.sum(~np.isfinite(values)))
    if missing:   # dropped units (no window, a null): drawn hollow, not hidden
        symbol = _symbol(layer)
        symbol.setColor(QColor(255, 255, 255, 0))
        categories.append(QgsRendererCategory("", symbol, f"no estimate: {missing}"))
    return QgsCategorizedSymbolRenderer(field, categories)


#: The named styles a result layer gets when it has their field: (name, field, renderer, description).
RESULT_STYLES = ((CATE_STYLE, "cate", cate_renderer, "CATE, diverging about zero"),
                 (GROUP_STYLE, "group", group_renderer, "Effect groups, categorized"),
                 (TREAT_STYLE, "treat", treat_renderer, "Units to treat within the budget"))


def result_styles_of(layer):
    """The RESULT_STYLES ``layer`` has the fields for."""
    return [style for style in RESULT_STYLES if layer.fields().lookupField(style[1]) >= 0]


def style_in_use(names, current):
    """The style a result layer shows: ``current`` where it is among ``names``, else the first (None: no names)."""
    return current if current in names else (names[0] if names else None)


def apply_result_styles(layer, current=CATE_STYLE):
    """Give ``layer`` every named style it has the fields for (CATE_STYLE, GROUP_STYLE, TREAT_STYLE), ``current``
    in use (CATE_STYLE where it has no such field); returns the layer. A table without geometry (a .csv output)
    has nothing to draw and is left as it is."""
    if not layer.isSpatial():
        return layer
    styles = result_styles_of(layer)
    if not styles:
        return layer
    manager = layer.styleManager()
    names = [name for name, *_ in styles]
    for name in names:   # styled before (a memory result is styled when run and when loaded)
        if name in manager.styles() and name != manager.currentStyle():
            manager.removeStyle(name)
    saved = []
    for name, field, renderer, _ in styles[1:]:
        layer.setRenderer(renderer(layer, field))
        style = QgsMapLayerStyle()
        style.readFromLayer(layer)
        saved.append((name, style))
    name, field, renderer, _ = styles[0]
    layer.setRenderer(renderer(layer, field))
    manager.renameStyle(manager.currentStyle(), name)
    for name, style in saved:
        manager.addStyle(name, style)
    manager.setCurrentStyle(style_in_use(names, current))
    layer.triggerRepaint()
    return layer


def save_styles_to_geopackage(layer, current=CATE_STYLE):
    """Store every named result style ``layer`` has the fields for in its GeoPackage's layer_styles table,
    ``current`` as the default (the first such style where it has no such field); False when there was nothing to
    save or a save failed.
    Each style is the layer's renderer set in turn and saved, without the layer's style manager: a result file is
    styled in the Processing task's thread, where the manager's wrapper was once found deleted between two of its
    calls (the targeting dialog, on a loaded machine), which failed the run after the algorithm had finished."""
    if layer.providerType() != "ogr" or ".gpkg" not in layer.source().lower() or not layer.isSpatial():
        return False
    styles = result_styles_of(layer)
    default = style_in_use([name for name, *_ in styles], current)
    messages = []
    for name, field, renderer, description in styles:
        layer.setRenderer(renderer(layer, field))
        messages.append(layer.saveStyleToDatabase(name, description, name == default, ""))
    return bool(styles) and not any(messages)


def round_up(value):
    """``value`` rounded up to 1, 1.5, 2, 3 or 5 times a power of ten (0.37 -> 0.5, 1.48 -> 1.5, 2.6 -> 3)."""
    import math

    if not value > 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 1.5, 2, 3, 5, 10) if m * power >= value * (1 - 1e-9))


def effect_map_style(layer, band_names, clusters=None):
    """A map of effects (geocate:mapeffects, geocate:applyclusters) styled from its data: the cate band diverging
    about zero (the same colours as the unit layers), or the cluster band paletted, one colour per cluster by the
    sign of its effect. Cells without a usable window are transparent (nodata)."""
    from qgis.core import (
        QgsColorRampShader,
        QgsPalettedRasterRenderer,
        QgsRasterShader,
        QgsSingleBandPseudoColorRenderer,
    )

    provider = layer.dataProvider()
    if "cluster" in band_names:
        band = band_names.index("cluster") + 1
        k = band_names.index("cluster")
        # Coloured by each cluster's effect on the diverging CATE scale (red only for harm), labelled with the
        # effect and share of the trial's units that the log and the report give (clusters: the cluster table).
        rows = list(clusters or [])
        effects = [float(row[1]) for row in rows] if len(rows) == k else [0.0] * k
        bound = max([abs(e) for e in effects] + [1e-9])
        ramp = _ramp("RdBu", (QColor(202, 0, 32), QColor(5, 113, 176)))
        classes = []
        for j in range(k):
            label = f"cluster {j + 1}"
            if len(rows) == k:
                label += f": {effects[j]:+.2f}" + (f", {float(rows[j][4]):.0%}" if len(rows[j]) > 4 else "")
            classes.append(QgsPalettedRasterRenderer.Class(j + 1, _diverging_colour(ramp, effects[j], bound), label))
        layer.setRenderer(QgsPalettedRasterRenderer(provider, band, classes))
    else:
        band = band_names.index("cate") + 1
        block = provider.block(band, provider.extent(), min(provider.xSize(), 512), min(provider.ySize(), 512))
        values = np.array([block.value(r, c) for r in range(block.height()) for c in range(block.width())
                           if not block.isNoData(r, c)], float)
        bound = float(np.quantile(np.abs(values), 0.98)) if len(values) else 1.0
        bound = bound or 1.0
        ramp = _ramp("RdBu", (QColor(202, 0, 32), QColor(5, 113, 176)))
        bound = round_up(bound)   # class limits a reader can quote: -1.5, -1, -0.5, 0, ... not -1.4837
        shader_function = QgsColorRampShader(-bound, bound)
        shader_function.setColorRampType(QgsColorRampShader.Interpolated)
        steps = np.linspace(-bound, bound, 5)   # half-bound steps: 1.5 -> -1.5, -0.75, 0, 0.75, 1.5
        shader_function.setColorRampItemList([
            QgsColorRampShader.ColorRampItem(float(v), _diverging_colour(ramp, v, bound), f"{v:+.3g}") for v in steps])
        shader = QgsRasterShader()
        shader.setRasterShaderFunction(shader_function)
        renderer = QgsSingleBandPseudoColorRenderer(provider, band, shader)
        renderer.setClassificationMin(-bound)
        renderer.setClassificationMax(bound)
        layer.setRenderer(renderer)
    layer.triggerRepaint()
    return layer


def support_veil_style(layer, band_names, threshold):
    """The same map's support band as a grey veil over cells beyond ``threshold`` (outside the trial's support),
    transparent inside it: laid over the effects, extrapolated areas read as greyed out."""
    from qgis.core import QgsColorRampShader, QgsRasterShader, QgsSingleBandPseudoColorRenderer

    band = band_names.index("support") + 1
    shader_function = QgsColorRampShader(0, threshold * 10)
    shader_function.setColorRampType(QgsColorRampShader.Discrete)
    shader_function.setColorRampItemList([
        QgsColorRampShader.ColorRampItem(float(threshold), QColor(0, 0, 0, 0), "inside the trial's support"),
        QgsColorRampShader.ColorRampItem(float("inf"), QColor(90, 90, 90, 128), "outside: extrapolated")])
    shader = QgsRasterShader()
    shader.setRasterShaderFunction(shader_function)
    layer.setRenderer(QgsSingleBandPseudoColorRenderer(layer.dataProvider(), band, shader))
    layer.triggerRepaint()
    return layer

"""How imagery is shown with results in QGIS (the demo project, the dock)."""

from qgis.core import QgsContrastEnhancement, QgsRasterMinMaxOrigin


def true_color(layer, bands=None):
    """Show a raster in natural colour (bands from its colour interpretation, see core.patches.rgb_bands) with a
    2-98 % stretch; rasters with fewer than three bands keep QGIS's default."""
    from ..core.patches import rgb_bands

    renderer = layer.renderer()
    rgb = rgb_bands(layer.source(), bands) if layer.bandCount() >= 3 else None
    if rgb and hasattr(renderer, "setRedBand"):
        renderer.setRedBand(rgb[0])
        renderer.setGreenBand(rgb[1])
        renderer.setBlueBand(rgb[2])
    layer.setContrastEnhancement(QgsContrastEnhancement.StretchToMinimumMaximum,
                                 QgsRasterMinMaxOrigin.CumulativeCut)
    return layer


def set_view_extent(project, layer, margin=1.1):
    """Make ``project`` open on ``layer`` (with a margin), not on a blank map: its default view extent, which QGIS
    uses when a project saved without a map canvas (by a script, qgis_process) is opened."""
    from qgis.core import QgsCoordinateTransform, QgsReferencedRectangle

    transform = QgsCoordinateTransform(layer.crs(), project.crs(), project)
    extent = transform.transformBoundingBox(layer.extent())
    extent.scale(margin)
    project.viewSettings().setDefaultViewExtent(QgsReferencedRectangle(extent, project.crs()))
    return extent

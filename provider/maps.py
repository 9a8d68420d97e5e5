"""How imagery is shown with results in QGIS (the demo project, the dock)."""

from qgis.core import QgsContrastEnhancement, QgsRasterMinMaxOrigin


def true_color(layer):
    """Show a 3-band (B, G, R) raster as natural colour with a 2-98 % stretch; other rasters keep QGIS's default."""
    renderer = layer.renderer()
    if layer.bandCount() >= 3 and hasattr(renderer, "setRedBand"):
        renderer.setRedBand(3)
        renderer.setGreenBand(2)
        renderer.setBlueBand(1)
    layer.setContrastEnhancement(QgsContrastEnhancement.StretchToMinimumMaximum,
                                 QgsRasterMinMaxOrigin.CumulativeCut)
    return layer

"""GeoCATE QGIS plugin: treatment effect heterogeneity of trials from satellite imagery."""


def classFactory(iface):  # noqa: N802 - QGIS's name
    """Called by QGIS (and by qgis_process with iface None); imports nothing heavy."""
    from .plugin import GeoCatePlugin

    return GeoCatePlugin(iface)

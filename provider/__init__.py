"""QGIS glue: the Processing provider, one module per algorithm, and layer <-> array conversion."""

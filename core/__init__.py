"""GeoCATE's estimation core: plain numpy in, plain numpy out; never imports qgis or PyQt5."""

from .errors import GeoCateError, Cancelled  # noqa: F401
from .study import Study, Result  # noqa: F401

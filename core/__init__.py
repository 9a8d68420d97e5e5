"""GeoCATE's estimation core: plain numpy in, plain numpy out; never imports qgis or PyQt5."""

from .errors import Cancelled, GeoCateError
from .study import Result, Study

__all__ = ["Cancelled", "GeoCateError", "Result", "Study"]

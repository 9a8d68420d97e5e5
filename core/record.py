"""The run record: what one run of an algorithm did and found, as ``<output>.run.json`` keeps it.

One typed object, written once per run (provider.base) and read by the dock, the map tool and the report. Its
fixed fields are attributes; the algorithm's figures (the ATE, the tests, the clusters, ...) are read as a mapping,
``record["ate"]``, so that a reader of a file written by a later GeoCATE still finds what it knows. On disk the
layout is flat, ``schema_version`` first::

    {"schema_version": 1, "algorithm": "geocate:estimatecate", "parameters": {...}, "ate": ..., ...,
     "versions": {...}, "timings": {"total_s": ...}}
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

#: The version of the layout: raised when a key changes meaning or goes away, so that a reader (the dock, a
#: script, a later GeoCATE) can tell what a file holds.
SCHEMA_VERSION = 2
#: What each layout changed (the readers of GeoCATE read every layout up to SCHEMA_VERSION).
LAYOUTS = {
    1: "the first layout: each algorithm's parameters as it typed them",
    2: "every input parameter read from the algorithm's definitions: enums by their option's label (METHOD "
       "'causal forest', COMPARE, CONTROL_GROUP as the dialog shows them), layers by name (MASK, CANDIDATES), "
       "an extent as QGIS writes it (mapeffects' extent in the raster's CRS is the figure extent_in_raster_crs); "
       "the figure 'estimator' describes the estimator",
}
FIXED = ("schema_version", "algorithm", "parameters", "versions", "timings")


@dataclass(frozen=True, eq=False)   # compared as a mapping: a record equals its dict
class RunRecord(Mapping):
    """``algorithm``: its Processing id; ``parameters``: every input parameter's value by its Processing name (read
    from the algorithm's own definitions, provider.base.GeoCateAlgorithm.record); ``figures``: what the run found;
    ``versions``: the packages that computed it; ``timings``: seconds by step."""

    algorithm: str
    parameters: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        clash = sorted(set(self.figures) & set(FIXED))
        if clash:
            raise ValueError(f"The run's figures may not be named {', '.join(clash)}: those are the record's own "
                             "fields.")

    # -- read as a mapping: the fixed fields, then the figures -------------------------------------------------
    def __getitem__(self, key):
        if key in FIXED:
            return getattr(self, key)
        return self.figures[key]

    def __iter__(self):
        yield from ("schema_version", "algorithm", "parameters")
        yield from self.figures
        yield from ("versions", "timings")

    def __len__(self):
        return len(FIXED) + len(self.figures)

    def with_figures(self, **figures):
        """A copy with more (or replaced) figures."""
        return replace(self, figures={**self.figures, **figures})

    # -- on disk ----------------------------------------------------------------------------------------------
    def to_json(self):
        """The flat layout written to ``.run.json`` (a plain dict, ``schema_version`` first)."""
        return dict(self.items())

    @classmethod
    def from_json(cls, payload):
        """A record from the flat layout; a file of a later layout is refused with the reason, one without
        ``schema_version`` (written before it existed) read as version 1."""
        from .errors import GeoCateError

        if not isinstance(payload, Mapping) or "algorithm" not in payload:
            raise GeoCateError("This file is not a GeoCATE run record (no 'algorithm'). Choose the .run.json "
                               "written beside a result.")
        version = int(payload.get("schema_version", 1))
        if version > SCHEMA_VERSION:
            raise GeoCateError(f"This run record has layout {version}; this GeoCATE reads up to {SCHEMA_VERSION}. "
                               "Update GeoCATE to read it.")
        figures = {key: value for key, value in payload.items() if key not in FIXED}
        return cls(algorithm=payload["algorithm"], parameters=dict(payload.get("parameters") or {}), figures=figures,
                   versions=dict(payload.get("versions") or {}), timings=dict(payload.get("timings") or {}),
                   schema_version=version)

    @classmethod
    def read(cls, path):
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(json.load(handle))

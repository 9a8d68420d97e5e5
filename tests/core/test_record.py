"""core.record.RunRecord: the run record, typed, written once, read by the dock, the map tool and the report."""

import json

import pytest

from geocate.core.errors import GeoCateError
from geocate.core.record import SCHEMA_VERSION, RunRecord


def a_record():
    return RunRecord(algorithm="geocate:estimatecate", parameters={"SEED": 7, "COVARIATES": ["age"]},
                     figures={"ate": 1.25, "warnings": ["few clusters"]}, versions={"numpy": "1.26"},
                     timings={"total_s": 3.5})


def test_the_layout_on_disk_is_flat_with_the_schema_version_first_and_reads_back_equal(tmp_path):
    record = a_record()
    payload = record.to_json()
    assert list(payload) == ["schema_version", "algorithm", "parameters", "ate", "warnings", "versions", "timings"]
    assert payload["schema_version"] == SCHEMA_VERSION == 2 and payload["ate"] == 1.25
    path = tmp_path / "result.run.json"
    path.write_text(json.dumps(payload))
    assert RunRecord.read(path) == record == payload   # a record equals its own layout, read as a mapping


def test_a_reader_finds_the_fixed_fields_as_attributes_and_the_figures_by_name():
    record = a_record()
    assert record.parameters["SEED"] == 7 and record["parameters"] is record.parameters
    assert record["ate"] == 1.25 and record.get("missing", "none") == "none" and "warnings" in record
    assert dict(record)["timings"] == {"total_s": 3.5} and len(record) == 7
    with pytest.raises(KeyError):
        record["not a figure"]
    assert record.with_figures(ate=2.0)["ate"] == 2.0 and record["ate"] == 1.25   # a copy: frozen


def test_a_record_written_before_the_version_reads_as_version_1_and_a_later_layout_is_refused():
    old = {"algorithm": "geocate:evaluate", "parameters": {"SEED": 1}, "n_used": 10}
    assert RunRecord.from_json(old).schema_version == 1 and RunRecord.from_json(old)["n_used"] == 10
    with pytest.raises(GeoCateError, match="layout 3.*Update GeoCATE"):
        RunRecord.from_json(dict(old, schema_version=3))
    with pytest.raises(GeoCateError, match="not a GeoCATE run record"):
        RunRecord.from_json({"ate": 1.0})


def test_a_figure_may_not_take_the_name_of_a_fixed_field():
    with pytest.raises(ValueError, match="parameters"):
        RunRecord(algorithm="geocate:evaluate", figures={"parameters": {}})


def test_a_reports_run_metadata_block_is_the_record_as_json(tmp_path):
    """The report folds the run record away as JSON (core.report.write_html), the same layout as the file."""
    import html
    import re

    from geocate.core.report import write_html

    record = a_record()
    write_html(str(tmp_path / "report.html"), "A report", [("Settings", "<p>none</p>")], record)
    block = re.search(r"<pre>(.*)</pre>", (tmp_path / "report.html").read_text(encoding="utf-8"), re.S).group(1)
    assert json.loads(html.unescape(block)) == record.to_json()

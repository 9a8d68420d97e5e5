"""The Processing dialogs in QGIS desktop, under Xvfb: Run pressed with file and temporary outputs, a two-step
model from its dialog, the batch dialog with two rows; field widgets that choose by name; a screenshot of every
dialog (outputs/screenshots/)."""

import json
import os
import shutil
import site
import subprocess

import pytest
from conftest import PLUGINS, ROOT

pytestmark = [pytest.mark.qgis, pytest.mark.desktop]
SCRIPT = ROOT / "tests" / "qgis" / "desktop" / "dialogs.py"
SHOTS = ROOT / "outputs" / "screenshots"
ALGORITHMS = ("estimatecate", "imageclusters", "evaluate", "comparesources", "estimateate", "calibratemap",
              "paneleffects", "eventstudy", "mapeffects", "applyclusters", "targeting")


@pytest.fixture(scope="module")
def desktop(demo_units_gpkg, demo_raster, tmp_path_factory):
    if shutil.which("xvfb-run") is None or shutil.which("qgis") is None:
        pytest.skip("needs Debian's xvfb and qgis (make test installs them)")
    from test_dialog_paths import hours_worked_gpkg, panel_gpkg, staggered_gpkg, validation_gpkg

    out = tmp_path_factory.mktemp("dialogs")
    inputs = tmp_path_factory.mktemp("dialog inputs")
    data = {"panel": panel_gpkg(demo_units_gpkg, inputs / "panel.gpkg"),
            "rollout": staggered_gpkg(inputs / "rollout.gpkg"), "validation": validation_gpkg(inputs / "v.gpkg"),
            "hours": hours_worked_gpkg(inputs / "hours.gpkg")}
    env = dict(os.environ, QGIS_CUSTOM_CONFIG_PATH=str(ROOT / ".qgis-profile"),
               PYTHONPATH=os.pathsep.join([str(PLUGINS)] + site.getsitepackages()),
               GEOCATE_UNITS=demo_units_gpkg, GEOCATE_RASTER=demo_raster, GEOCATE_OUT=str(out),
               GEOCATE_DATA=json.dumps(data))
    env.pop("QT_QPA_PLATFORM", None)   # a real (virtual) screen
    subprocess.run(["qgis_process.bin", "plugins", "enable", "geocate"], env=env, capture_output=True, timeout=120)
    done = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--nologo",
                           "--noversioncheck", "--code", str(SCRIPT)],
                          env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name in [f"dialog_{a}.png" for a in ALGORITHMS] + ["map_tool_popup.png", "help_estimatecate.png"]:
        if (out / name).exists():
            shutil.copy(out / name, SHOTS / name)
    return done, summary, out


def step(summary, name):
    found = [s for s in summary.get("steps", []) if s["name"] == name]
    assert found, f"{name} was not reached: {summary.get('error')}"
    return found[0]


def test_qgis_survives_every_dialog_run(desktop):
    done, summary, _ = desktop
    assert "error" not in summary, summary.get("error")
    assert summary.get("alive") is True, (done.returncode, done.stderr[-3000:])


def test_field_widgets_choose_the_field_by_its_name_and_never_fid(desktop):
    _, summary, _ = desktop
    choices = summary["field_choices"]
    assert choices["geocate:estimatecate"] == {"TREATMENT": "treated", "OUTCOME": "outcome"}
    # evaluate's priority has no name to go by: nothing is chosen (its own CATE would not be a valid test)
    assert choices["geocate:evaluate"] == {"PRIORITY": None, "TREATMENT": "treated", "OUTCOME": "outcome"}


def test_every_dialog_has_a_screenshot(desktop):
    _, summary, _ = desktop
    assert sorted(summary["screenshots"]) == sorted(ALGORITHMS)
    for name in ALGORITHMS:
        png = (SHOTS / f"dialog_{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.parametrize("name, loaded", [
    ("estimatecate_gpkg", [("Treatment effects (CATE)", "graduatedSymbol")]),
    ("estimatecate_temporary", [("Treatment effects (CATE)", "graduatedSymbol")]),
    ("mapeffects_tif", [("Effects map (outcome)", "singlebandpseudocolor"),
                        ("Effects map (outcome): outside the trial's support", None)]),
])
def test_run_pressed_loads_each_output_once_styled_with_no_false_error(desktop, name, loaded):
    _, summary, _ = desktop
    result = step(summary, name)
    assert result["done"] and result["finished_ok"] and not result["failed"], result["log_tail"]
    assert not result["not_correctly_generated"], result["log_tail"]
    assert sorted(x["name"] for x in result["layers"]) == sorted(n for n, _ in loaded)
    for layer in result["layers"]:
        expected = dict(loaded)[layer["name"]]
        assert expected is None or layer["renderer"] == expected, layer
    if name.startswith("mapeffects"):   # a map lies below the unit layers, its veil right above it
        units = min(x["index"] for x in summary["project_before"] if x["kind"] == "vector")
        indices = {x["name"]: x["index"] for x in result["layers"]}
        assert units < indices["Effects map (outcome): outside the trial's support"] < indices["Effects map (outcome)"]


@pytest.mark.parametrize("name, loaded", [
    ("imageclusters_gpkg", {"Effect clusters": "categorizedSymbol"}),
    ("applyclusters_tif", {"Clusters map (clusters)": "paletted"}),
    ("evaluate_csv", None), ("comparesources_csv", None), ("estimateate_gpkg", None), ("paneleffects_gpkg", None),
    ("eventstudy_csv", None), ("calibratemap_json", {}),
    ("targeting_gpkg", {"Targeting of the trial's units": "categorizedSymbol",
                        "Targeting of the candidates": "categorizedSymbol"}),
])
def test_run_pressed_in_every_other_dialog(desktop, name, loaded):
    """Every algorithm's own dialog with a file output: it finishes, nothing is reported missing, and each output
    layer is loaded once (named and styled where GeoCATE styles it)."""
    _, summary, _ = desktop
    result = step(summary, name)
    assert result["done"] and result["finished_ok"] and not result["failed"], result["log_tail"]
    assert not result["not_correctly_generated"], result["log_tail"]
    names = [x["name"] for x in result["layers"]]
    assert len(names) == len(set(names))
    if loaded is not None:
        for layer_name, renderer in loaded.items():
            assert [x["renderer"] for x in result["layers"] if x["name"] == layer_name] == [renderer], names
        if loaded == {}:
            assert names == []
    else:
        assert len(names) == 1   # the table


def test_the_observational_dialog_calibrates_its_propensities_by_default(desktop):
    """Issue 23, point 1 from the Processing dialog: Run pressed with estimateate's defaults calibrates the
    propensities (CALIBRATE, advanced, on), and the run record says the balance reached and that it was asked."""
    _, summary, out = desktop
    assert step(summary, "estimateate_gpkg")["finished_ok"]
    record = json.loads((out / "ate.run.json").read_text())
    assert record["parameters"]["CALIBRATE"] is True and record["calibration"]["inputs"] == 22
    assert record["calibration"]["balance"] == "exact" and record["calibration"]["largest_standardized_difference"] < 1e-8
    assert max(abs(row[2]) for row in record["balance"]) < 1e-6


def test_run_pressed_with_an_outcome_like_hours_worked_names_its_point_masses(desktop):
    """Issue 24 from the Processing dialog: an outcome that is zero for 60 % of controls and 30 % of treated units,
    large enough for the cluster model's hurdle part. The run finishes, the clusters load styled, the log and the
    report name the point mass and say which effects to quote, and every cluster's effects are finite."""
    import csv
    import math
    import re

    _, summary, out = desktop
    result = step(summary, "imageclusters_hours")
    assert result["done"] and result["finished_ok"] and not result["failed"], result["log_tail"]
    assert not result["not_correctly_generated"], result["log_tail"]
    assert [x["renderer"] for x in result["layers"] if x["name"] == "Effect clusters"] == ["categorizedSymbol"]
    noise, masses = result["lines"]
    assert "a hurdle part for the point masses" in noise, noise
    assert masses.startswith("Point masses 0 (controls ") and masses.endswith(
        "quote each cluster's held-out effect (dr_effect)."), masses
    with open(out / "hours_clusters.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:
        for name in ("effect", "ci_low", "ci_high", "dr_effect", "dr_se"):
            assert math.isfinite(float(row[name])), (name, row)
    report = (out / "hours_clusters.html").read_text(encoding="utf-8")
    assert "<b>Point masses:</b> 0 (controls " in report and "quote each cluster's held-out effect (DR)" in report
    assert not re.search(r"\bnan\b", re.sub(r"base64,[^\"]*", "", report.split("Run metadata")[0]))


def test_a_two_step_model_runs_from_its_dialog(desktop):
    _, summary, out = desktop
    result = step(summary, "model")
    assert result["done"] and result["finished_ok"] and not result["failed"], result["log_tail"]
    assert not result["not_correctly_generated"], result["log_tail"]
    assert (out / "model_effects.gpkg").exists() and (out / "model_evaluation.csv").exists()
    assert (out / "model_map.tif").exists() and (out / "model_targeting.gpkg").exists()
    assert sorted(x["name"] for x in result["layers"]) == [
        "Effects map (outcome)", "Effects map (outcome): outside the trial's support", "effects", "evaluation",
        "targeting"]


def test_the_map_tool_popup_and_a_help_page_are_shown(desktop):
    _, summary, _ = desktop
    popup = summary["popup"]
    assert popup is not None and popup["has_image"] and "<b>CATE</b>" in popup["text"]
    assert summary["help_page"]["url"].endswith("/help/estimatecate.html")
    for name in ("map_tool_popup.png", "help_estimatecate.png"):
        png = (SHOTS / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_the_batch_dialog_runs_two_rows(desktop):
    _, summary, _ = desktop
    result = step(summary, "batch")
    assert not result["failed"] and not result["not_correctly_generated"], result["log_tail"]
    assert {"batch_1.gpkg", "batch_2.gpkg", "batch_1.run.json", "batch_2.run.json"} <= set(result["files"])
    assert [x["name"] for x in result["layers"]] == ["Treatment effects (CATE)"] * 2

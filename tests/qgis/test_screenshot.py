"""QGIS desktop itself, under Xvfb: the dock before, during and after a run, and after another project is started,
captured to outputs/screenshots/."""

import json
import os
import shutil
import site
import subprocess

import pytest
from conftest import PLUGINS, ROOT

SCRIPT = ROOT / "tests" / "qgis" / "desktop" / "screenshot_dock.py"


@pytest.mark.skipif(shutil.which("xvfb-run") is None or shutil.which("qgis") is None,
                    reason="needs Debian's xvfb and qgis (make test installs them)")
def test_screenshot_of_qgis_with_the_dock_after_a_run(demo_units_gpkg, demo_raster):
    out = ROOT / "outputs" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    shots = ("dock_before.png", "dock_during.png", "dock.png", "dock_other_project.png")
    for name in shots + ("summary.json",):
        (out / name).unlink(missing_ok=True)
    env = dict(os.environ, QGIS_CUSTOM_CONFIG_PATH=str(ROOT / ".qgis-profile"),
               PYTHONPATH=os.pathsep.join([str(PLUGINS)] + site.getsitepackages()),
               GEOCATE_SHOT_UNITS=demo_units_gpkg, GEOCATE_SHOT_RASTER=demo_raster, GEOCATE_SHOT_OUT=str(out))
    env.pop("QT_QPA_PLATFORM", None)   # a real (virtual) screen this time
    subprocess.run(["qgis_process.bin", "plugins", "enable", "geocate"], env=env, capture_output=True, timeout=120)
    done = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--nologo",
                           "--noversioncheck", "--code", str(SCRIPT)],
                          env=env, capture_output=True, text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert "error" not in summary, summary.get("error")
    assert summary["ok"] is True, summary.get("message")
    assert "ATE" in summary["summary"] and "AUTOC" in summary["summary"]
    for name in shots:
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000, (name, done.stderr[-2000:])
    # The run's group is named by time and outcome, open in the Layers panel, its layer named as everywhere.
    assert summary["group_expanded"] is True and summary["layers"] == ["Treatment effects (CATE)"]
    assert summary["group"].startswith("GeoCATE ") and summary["group"].endswith(" - outcome")
    # After another project is started the dock holds nothing of the last run.
    assert summary["other_summary"] == "" and summary["other_message"] == ""
    assert summary["other_zoom_enabled"] is False

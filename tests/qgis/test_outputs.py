"""Outputs appear whole or not at all: partial names, locks, and what a failed, refused or killed run leaves."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from qgis.core import QgsProcessingException, QgsVectorLayer
from test_estimatecate_in_qgis import base_parameters, plugin, qgis_process_env, run  # noqa: F401 - fixtures


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if "geocate-partial" in name or name.endswith(".geocate-lock"))


@pytest.fixture
def first_result(plugin, demo_units_gpkg, demo_raster, tmp_path):
    out = tmp_path / "effects.gpkg"
    run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(out), COVARIATES=[],
                        OUTPUT_REPORT=str(tmp_path / "effects.html")))
    files = ("effects.gpkg", "effects.run.json", "effects.html")
    return out, {name: digest(tmp_path / name) for name in files}


def test_a_run_that_fails_while_writing_keeps_the_previous_result(first_result, demo_units_gpkg, demo_raster,
                                                                   tmp_path, monkeypatch):
    out, before = first_result
    import geocate.core.report

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(geocate.core.report, "estimate_report", fail)
    with pytest.raises(QgsProcessingException, match="Writing the outputs failed.*No space left.*unchanged"):
        run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(out), COVARIATES=["assets"], SEED=5,
                            OUTPUT_REPORT=str(tmp_path / "effects.html")))
    assert {name: digest(tmp_path / name) for name in before} == before
    assert leftovers(tmp_path) == []


def test_a_second_run_on_a_busy_output_is_refused_and_a_dead_runs_leftovers_are_swept(
        first_result, demo_units_gpkg, demo_raster, tmp_path):
    out, before = first_result
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "effects.gpkg.geocate-lock").write_text(str(holder.pid))
        with pytest.raises(QgsProcessingException, match=f"Another GeoCATE run \\(process {holder.pid}\\) is "
                                                         "writing .*effects.gpkg"):
            run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(out), COVARIATES=[]))
        assert digest(out) == before["effects.gpkg"]
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock and a partial file it left are swept by the next run, which succeeds.
    (tmp_path / f"effects_geocate-partial-{holder.pid}.gpkg").write_bytes(b"")
    results = run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(out), COVARIATES=[], SEED=9))
    assert results["OUTPUT"] == str(out)
    assert leftovers(tmp_path) == []
    layer = QgsVectorLayer(str(out), "effects", "ogr")
    named = QgsVectorLayer(f"{out}|layername=effects", "named", "ogr")   # the layer is named after the file
    found = (layer.isValid(), layer.featureCount(), named.isValid())
    del layer, named   # closed before QGIS exits (a GeoPackage held open to the end crashed its teardown)
    assert found == (True, 312, True)


def test_kill_9_while_the_output_is_written_leaves_the_previous_result(first_result, demo_units_gpkg, demo_raster,
                                                                        tmp_path):
    out, before = first_result
    rerun = subprocess.Popen(
        ["qgis_process.bin", "run", "geocate:estimatecate", "--", f"INPUT={demo_units_gpkg}", "TREATMENT=treated",
         "OUTCOME=outcome", f"RASTER={demo_raster}", "SEED=3", f"OUTPUT={out}",
         f"OUTPUT_REPORT={tmp_path / 'effects.html'}"],
        env=qgis_process_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = False
    try:
        while rerun.poll() is None:   # killed the moment its first output exists under its partial name
            if any("geocate-partial" in name for name in os.listdir(tmp_path)):
                os.kill(rerun.pid, signal.SIGKILL)
                seen = True
                break
            time.sleep(0.005)
    finally:
        rerun.kill()
        rerun.wait()
    assert seen, "the rerun finished before its outputs were seen being written"
    assert {name: digest(tmp_path / name) for name in before} == before
    layer = QgsVectorLayer(str(out), "effects", "ogr")
    found = (layer.isValid(), layer.featureCount())
    del layer
    assert found == (True, 312)
    # What the killed run left is swept by the next run that writes there.
    from geocate.provider.outputs import RunFiles

    files = RunFiles()
    for name in ("effects.gpkg", "effects.html", "effects.run.json"):
        files.lock(str(tmp_path / name))
    files.release()
    assert leftovers(tmp_path) == []

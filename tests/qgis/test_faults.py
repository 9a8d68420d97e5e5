"""Hostile and careless input, as the fault probe found it: each case gets a clear refusal that leaves nothing
behind (no partial file, no lock), or a correct result. One test per defect of the probe (issue 19, part 2)."""

import json
import os
import socket
import threading

import numpy as np
import pytest
from conftest import write_raster
from qgis.core import QgsProcessingException, QgsVectorLayer
from test_estimatecate_in_qgis import base_parameters, plugin, run, units_layer  # noqa: F401 - fixtures

pytestmark = pytest.mark.qgis


def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if "geocate-partial" in n or n.endswith(".geocate-lock"))


def processing_run(algorithm, parameters):
    import processing

    return processing.run(algorithm, parameters)


def test_a_refusal_up_front_leaves_no_lock_and_the_next_run_writes(plugin, demo_units_gpkg, demo_raster, tmp_path):
    out = tmp_path / "effects.gpkg"
    with pytest.raises(QgsProcessingException, match="folder of Report .* does not exist"):
        run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(out), COVARIATES=[],
                            OUTPUT_REPORT=str(tmp_path / "missing" / "report.html")))
    assert leftovers(tmp_path) == [] and not out.exists()
    # A lock this process left earlier (a run that ended without releasing it) is stale, not "another run".
    (tmp_path / "effects.gpkg.geocate-lock").write_text(str(os.getpid()))
    results = run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(out), COVARIATES=[]))
    assert results["OUTPUT"] == str(out) and leftovers(tmp_path) == []


@pytest.mark.parametrize("algorithm", ["geocate:mapeffects"])
def test_an_output_that_is_an_input_is_refused_before_any_work(plugin, demo_units_gpkg, demo_raster, tmp_path,
                                                               algorithm):
    import shutil

    raster = str(tmp_path / "imagery.tif")
    shutil.copy(demo_raster, raster)
    before = os.path.getsize(raster)
    with pytest.raises(QgsProcessingException, match="is one of the run's inputs"):
        processing_run(algorithm, dict(base_parameters(demo_units_gpkg, raster), OUTPUT=raster))
    later = str(tmp_path / "later.tif")
    shutil.copy(demo_raster, later)
    with pytest.raises(QgsProcessingException, match="is one of the run's inputs"):
        processing_run(algorithm, dict(base_parameters(demo_units_gpkg, raster), RASTERS_TIME=[later], OUTPUT=later))
    assert os.path.getsize(raster) == before and leftovers(tmp_path) == []


def test_geopackage_paths_with_quotes_work_and_layer_names_in_paths_are_refused(plugin, demo_units_gpkg,
                                                                                 demo_raster, tmp_path):
    folder = tmp_path / "it's dir"
    folder.mkdir()
    results = run(base_parameters(demo_units_gpkg, demo_raster, COVARIATES=[], OUTPUT=str(folder / "x.gpkg")))
    layer = QgsVectorLayer(results["OUTPUT"], "x", "ogr")
    count = layer.featureCount()
    del layer
    assert count == 312 and (folder / "x.run.json").exists() and leftovers(folder) == []
    with pytest.raises(QgsProcessingException, match=r"names a layer inside a file \('\|'\)"):
        run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=f"{folder / 'y.gpkg'}|layername=evil"))
    assert not (folder / "y.gpkg").exists()


def test_an_unknown_extension_is_refused_before_any_work(plugin, demo_units_gpkg, demo_raster, tmp_path):
    with pytest.raises(QgsProcessingException, match=r"cannot write a '\.foo' file"):
        run(base_parameters(demo_units_gpkg, demo_raster, OUTPUT=str(tmp_path / "x.foo")))
    for name in ("map.png", "map.gpkg"):   # a map is a GeoTIFF: never written into another format's name
        with pytest.raises(QgsProcessingException, match=r"Use one of \.tif, \.tiff"):
            processing_run("geocate:mapeffects", dict(base_parameters(demo_units_gpkg, demo_raster),
                                                      OUTPUT=str(tmp_path / name)))
    assert os.listdir(tmp_path) == []


def test_outcome_equal_to_treatment_is_refused(plugin, demo_units_gpkg, demo_raster):
    with pytest.raises(QgsProcessingException, match="is the treatment"):
        processing_run("geocate:estimateate", {"INPUT": demo_units_gpkg, "TREATMENT": "treated",
                                               "OUTCOME": "treated", "RASTER": demo_raster, "OUTPUT": "memory:"})


class Listener:
    """A local TCP server that is not a Dask scheduler: silent, or talking like a web server."""

    def __init__(self, greeting=b""):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.greeting = greeting
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.greeting:
                conn.sendall(self.greeting)


@pytest.mark.parametrize("greeting", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_an_address_that_is_not_a_dask_scheduler_is_refused_before_the_fit(plugin, demo_units_gpkg, demo_raster,
                                                                          tmp_path, greeting):
    import time

    listener = Listener(greeting)
    started = time.monotonic()
    with pytest.raises(QgsProcessingException, match="not a Dask scheduler|not as a Dask scheduler"):
        processing_run("geocate:mapeffects", dict(base_parameters(demo_units_gpkg, demo_raster),
                                                  DASK_SCHEDULER=listener.address, OUTPUT=str(tmp_path / "m.tif")))
    refused_after = time.monotonic() - started
    listener.sock.close()
    assert refused_after < 20   # the probe's 5 s, not the fit and Dask's 30 s (no timing is tested beyond that)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nobody = f"tcp://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()   # nothing listens there now
    with pytest.raises(QgsProcessingException, match="cannot be reached"):
        processing_run("geocate:mapeffects", dict(base_parameters(demo_units_gpkg, demo_raster),
                                                  DASK_SCHEDULER=nobody, OUTPUT=str(tmp_path / "m.tif")))
    assert leftovers(tmp_path) == [] and not (tmp_path / "m.tif").exists()


def test_an_empty_layer_gets_a_message(plugin, demo_raster):
    empty = units_layer([1, 0], n=0)
    for algorithm in ("geocate:estimatecate", "geocate:estimateate", "geocate:mapeffects"):
        with pytest.raises(QgsProcessingException, match="has no features"):
            processing_run(algorithm, {"INPUT": empty, "TREATMENT": "treated", "OUTCOME": "outcome",
                                       "RASTER": demo_raster, "OUTPUT": "memory:" if "map" not in algorithm
                                       else "TEMPORARY_OUTPUT"})


@pytest.mark.parametrize("edit, message", [
    ({"slope": 0}, "slope must be positive"), ({"slope": -0.5}, "slope must be positive"),
    ({"slope": "text"}, "not a finite number"), ({"sigma2": None}, "not a finite number"),
    ({"score": ["a", "b"]}, "score grid"),
])
def test_a_damaged_correction_file_is_refused_when_loaded(tmp_path, edit, message):
    from geocate.core.corrections import OutcomeCorrection, fit_correction
    from geocate.core.errors import GeoCateError

    rng = np.random.default_rng(0)
    truth = rng.standard_normal(300)
    path = str(tmp_path / "c.json")
    fit_correction(truth, 0.5 * truth + 0.2 * rng.standard_normal(300), "wealth").save(path)
    data = json.loads(open(path).read())
    data.update(edit)
    with open(path, "w") as handle:
        handle.write(json.dumps(data).replace("NaN", "null"))
    with pytest.raises(GeoCateError, match=message):
        OutcomeCorrection.load(path)


def test_evaluate_refuses_a_constant_priority_and_the_outcome_as_priority(plugin, demo_units_gpkg, tmp_path):
    import processing

    constant = processing.run("native:fieldcalculator", {
        "INPUT": demo_units_gpkg, "FIELD_NAME": "flat", "FIELD_TYPE": 0, "FORMULA": "1",
        "OUTPUT": str(tmp_path / "flat.gpkg")})["OUTPUT"]
    common = {"INPUT": constant, "TREATMENT": "treated", "OUTCOME": "outcome", "OUTPUT": "memory:"}
    with pytest.raises(QgsProcessingException, match="single value on every unit"):
        processing_run("geocate:evaluate", dict(common, PRIORITY="flat"))
    with pytest.raises(QgsProcessingException, match="is the outcome being evaluated"):
        processing_run("geocate:evaluate", dict(common, PRIORITY="outcome"))


def test_repeated_bands_and_a_seed_out_of_range_are_named(plugin, demo_units_gpkg, demo_raster):
    with pytest.raises(QgsProcessingException, match="lists a band twice"):
        run(base_parameters(demo_units_gpkg, demo_raster, BANDS=[1, 1, 2]))
    with pytest.raises(QgsProcessingException, match=r"SEED\) must be a whole number from 0 to 2147483647"):
        run(base_parameters(demo_units_gpkg, demo_raster, SEED=2 ** 40))


def test_a_truncated_raster_is_called_unreadable_not_missing(plugin, demo_units_gpkg, demo_raster, tmp_path):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(open(demo_raster, "rb").read()[:4000])
    with pytest.raises(QgsProcessingException, match="exists but cannot be read as a raster"):
        run(base_parameters(demo_units_gpkg, str(broken)))


def test_windows_too_large_for_memory_are_refused_before_reading(monkeypatch):
    import psutil

    from geocate.core.errors import GeoCateError
    from geocate.core.represent import WindowSource
    from geocate.core.study import check_window_memory

    class Memory:
        available = 8 * 2 ** 30

    class Disk:
        free = 8 * 2 ** 30

    import shutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Disk())
    source = WindowSource.__new__(WindowSource)
    source.bands, source.window_size_px, source.scales, source.raster_paths = (1, 2, 3), 999, (999,), ("a.tif",)
    source.memory_mb = 64 * 1024          # a budget this large keeps the windows in memory: memory is the limit
    with pytest.raises(GeoCateError, match=r"would need 13\.4 GB of memory .*at most about \d+ pixels"):
        check_window_memory(source, 1200)
    source.memory_mb = None               # the default budget (1 GB): beyond it the windows go to a file on disk
    with pytest.raises(GeoCateError, match=r"windows and their features would need 13\.4 GB of disk space in .*free "
                                           r"disk space there"):
        check_window_memory(source, 1200)
    # The features of windows held on disk are counted too: 500,000 units' windows (6.1 GB) fit in 60 % of 11 GB
    # free, with their features (1.0 GB more) they do not; with 12 GB free they do.
    source.window_size_px, source.scales = 33, (33,)
    Disk.free = 11 * 2 ** 30
    with pytest.raises(GeoCateError, match=r"windows and their features would need 7\.0 GB of disk space") as refused:
        check_window_memory(source, 500_000)
    import re

    suggested = int(re.search(r"at most about (\d+) pixels", str(refused.value)).group(1))
    assert suggested < 33
    source.window_size_px = suggested
    check_window_memory(source, 500_000)       # the window size the message suggests fits
    source.window_size_px = 33
    Disk.free = 12 * 2 ** 30
    check_window_memory(source, 500_000)
    check_window_memory(source, 1200)   # 15 MB: fine


def test_applyclusters_refuses_another_resolution_and_an_all_nodata_raster(plugin, demo_units_gpkg, demo_raster,
                                                                          tmp_path):
    from osgeo import gdal
    from test_estimatecate_in_qgis import run_clusters

    fitted = run_clusters(demo_units_gpkg, demo_raster, tmp_path, CLUSTERS=2, EPOCHS=20)
    finer = str(tmp_path / "finer.tif")
    gdal.Translate(finer, demo_raster, xRes=10, yRes=10, srcWin=[0, 0, 200, 200])
    with pytest.raises(QgsProcessingException, match="made from imagery of 30 m pixels.*10 m pixels"):
        processing_run("geocate:applyclusters", {"MODEL": fitted["OUTPUT_MODEL"], "RASTER": finer,
                                                 "OUTPUT": str(tmp_path / "map.tif")})
    nodata = write_raster(tmp_path / "nodata.tif", np.zeros((3, 120, 120)), nodata=0)
    with pytest.raises(QgsProcessingException, match="No map cell .* has a usable image window"):
        processing_run("geocate:applyclusters", {"MODEL": fitted["OUTPUT_MODEL"], "RASTER": nodata,
                                                 "OUTPUT": str(tmp_path / "map.tif")})
    assert not (tmp_path / "map.tif").exists() and leftovers(tmp_path) == []
    # A hand-edited description: a clear refusal, not onnxruntime's InvalidArgument or a KeyError.
    description = fitted["OUTPUT_MODEL"] + ".json"
    data = json.loads(open(description).read())
    data["bands"] = 4
    with open(description, "w") as handle:
        json.dump(data, handle)
    with pytest.raises(QgsProcessingException, match="gives bands = 4, but the model itself takes 3"):
        processing_run("geocate:applyclusters", {"MODEL": fitted["OUTPUT_MODEL"], "RASTER": demo_raster,
                                                 "OUTPUT": str(tmp_path / "map.tif")})


def test_a_full_disk_while_writing_a_map_is_said_plainly_and_leaves_nothing(plugin, demo_units_gpkg, demo_raster,
                                                                            tmp_path, monkeypatch):
    from osgeo import gdal

    def full(*args, **kwargs):
        raise RuntimeError("TIFFAppendToStrip:Write error at scanline 0: No space left on device")

    monkeypatch.setattr(gdal, "Translate", full)
    with pytest.raises(QgsProcessingException, match="Writing the map failed .*No space left.*Is the disk full"):
        processing_run("geocate:mapeffects", dict(base_parameters(demo_units_gpkg, demo_raster), STRIDE=99,
                                                  OUTPUT=str(tmp_path / "map.tif")))
    assert os.listdir(tmp_path) == []

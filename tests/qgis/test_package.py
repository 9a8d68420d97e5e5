"""The release ZIP (`make package`): what it holds, and the plugin installed from it into a fresh profile, as a
user installs it (Plugins > Manage and Install Plugins > Install from ZIP), running the demo through qgis_process."""

import configparser
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import DEMO_RASTER, ROOT
from qgis.core import QgsApplication, QgsVectorLayer
from qgis.PyQt.QtCore import QUrl

RESULT_FIELDS = ["cate", "cate_lo", "cate_hi", "cate_se", "group", "patch_ok"]
#: What plugins.qgis.org requires in metadata.txt (qgis/QGIS-Django, plugins/validator.py).
REQUIRED_METADATA = ["name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                     "repository", "tracker"]
#: The Python QGIS runs (the venv's base interpreter: Debian's python3, which the qgis bindings are built for).
QGIS_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")
#: The dock installer's packages, kept between runs (installing them takes minutes and about 1.7 GB).
INSTALLER_CACHE = ROOT / "outputs" / "test-installed-packages"


def load_package_script():
    spec = importlib.util.spec_from_file_location("geocate_package_script", ROOT / "scripts" / "package.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def release_zip(tmp_path_factory):
    out = tmp_path_factory.mktemp("package") / "geocate.zip"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "package.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def install_from_zip(zip_path, profile):
    """What Install from ZIP does (pyplugin_installer.installer.installFromZipFile): the plugin's folder is the
    one holding the shortest metadata.txt, it is extracted with the installer's own unzip into the profile's
    plugin folder, then enabled (here by qgis_process, in the fresh profile)."""
    sys.path.insert(0, os.path.join(QgsApplication.pkgDataPath(), "python"))
    try:
        from pyplugin_installer.unzip import unzip
    finally:
        sys.path.pop(0)
    with zipfile.ZipFile(zip_path) as archive:
        name = os.path.split(sorted(n for n in archive.namelist() if n.endswith("metadata.txt"))[0])[0]
    plugins = profile / "profiles" / "default" / "python" / "plugins"
    plugins.mkdir(parents=True)
    unzip(str(zip_path), str(plugins))
    env = fresh_env(profile)
    done = subprocess.run(["qgis_process.bin", "plugins", "enable", name], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "Enabled geocate" in done.stdout, done.stdout + done.stderr
    return plugins / name


def fresh_env(profile, pythonpath=None):
    """qgis_process's environment: the fresh profile, and nothing of this checkout on the Python path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "QGIS_PLUGINPATH")}
    env.update(QGIS_CUSTOM_CONFIG_PATH=str(profile), QT_QPA_PLATFORM="offscreen", PYTHONDONTWRITEBYTECODE="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return env


def run_demo(installed, env, out):
    """geocate:estimatecate on the demo study (the conftest's 312 units) and the installed copy's demo imagery."""
    raster = installed / "resources" / "demo" / DEMO_RASTER.name
    done = subprocess.run(
        ["qgis_process.bin", "--json", "run", "geocate:estimatecate", "--", f"INPUT={out.parent / 'units.gpkg'}",
         "TREATMENT=treated", "OUTCOME=outcome", "COVARIATES=assets", "COVARIATES=distance", f"RASTER={raster}",
         "PATCH_SIZE=33", "SEED=42", f"OUTPUT={out}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(out.parent))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run = json.loads(done.stdout)
    # The algorithm came from the installed copy: its help page (README or help/) is the installed folder's.
    help_page = QUrl(run["algorithm_details"]["help_url"]).toLocalFile()
    assert help_page.startswith(f"{installed}/") and os.path.isfile(help_page), run["algorithm_details"]
    results = run["results"]
    assert results["N_USED"] == 294 and results["N_DROPPED"] == 18
    assert math.isfinite(results["ATE"]) and results["ATE_SE"] > 0
    layer = QgsVectorLayer(str(out), "installed", "ogr")
    assert layer.isValid() and layer.featureCount() == 312
    assert [f.name() for f in layer.fields()][-6:] == RESULT_FIELDS
    return json.loads(Path(str(out)[:-len(".gpkg")] + ".run.json").read_text())


def study_folder(tmp_path, demo_units_gpkg):
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(demo_units_gpkg, folder / "units.gpkg")
    return folder


def test_the_zip_holds_the_plugin_only_in_a_geocate_folder_with_the_repositorys_metadata(release_zip):
    with zipfile.ZipFile(release_zip) as archive:
        names = archive.namelist()
        metadata_text = archive.read("geocate/metadata.txt").decode("utf-8")
        assert archive.testzip() is None
    assert {n.split("/")[0] for n in names} == {"geocate"}
    files = {n[len("geocate/"):] for n in names if not n.endswith("/")}
    for needed in ("__init__.py", "plugin.py", "metadata.txt", "LICENSE", "README.md", "requirements.txt",
                   "resources/icon.png", f"resources/demo/{DEMO_RASTER.name}", "ui/install.py",
                   "provider/provider.py", "core/pipeline.py"):
        assert needed in files, needed
    for package in ("core", "provider", "ui"):  # every module of the work tree, none forgotten
        assert {f"{package}/{p.name}" for p in (ROOT / package).glob("*.py")} <= files, package
    assert [n for n in names if n.endswith("metadata.txt")] == ["geocate/metadata.txt"]  # the installer's anchor
    for path in files:
        parts = path.split("/")
        assert parts[0] not in ("tests", "bench", "docs", "outputs", ".venv", ".qgis-profile", ".ci"), path
        assert "__pycache__" not in parts and not any(p.startswith(".") for p in parts), path
        assert not path.endswith((".pyc", ".aux.xml")) and path not in ("Makefile", "geocate", "pytest.ini"), path
    assert set(files) - {"scripts/export_encoder.py"} == {f for f in files if not f.startswith("scripts/")}
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(metadata_text)
    general = dict(parser.items("general"))
    assert [key for key in REQUIRED_METADATA if not general.get(key, "").strip()] == []
    assert general["icon"] in files and general["qgisMinimumVersion"] == "3.22"
    assert os.path.getsize(release_zip) < 25_000_000  # the plugin repository's upload limit


def test_a_missing_required_field_stops_the_build_naming_it():
    script = load_package_script()
    general = dict(name="GeoCATE", qgisMinimumVersion="3.22", description="d", about="a", version="0.2.0",
                   author="GeoCATE developers", email="a@b.org", repository="https://github.com/x/y",
                   tracker="https://github.com/x/y/issues", icon="resources/icon.png")
    files = ["__init__.py", "LICENSE", "metadata.txt", "resources/icon.png"]
    script.check_metadata(general, files)
    with pytest.raises(script.PackageError, match="lacks required field.*email, tracker"):
        script.check_metadata({k: v for k, v in general.items() if k not in ("email", "tracker")}, files)
    with pytest.raises(script.PackageError, match="repository='http://repo' is not a web address"):
        script.check_metadata(dict(general, repository="http://repo"), files)
    with pytest.raises(script.PackageError, match="LICENSE is missing"):
        script.check_metadata(general, [f for f in files if f != "LICENSE"])


def test_the_plugin_installed_from_the_zip_runs_the_demo_in_a_fresh_profile(release_zip, demo_units_gpkg,
                                                                            tmp_path):
    profile = tmp_path / "fresh profile"          # a space, as in many users' home folders
    installed = install_from_zip(release_zip, profile)
    assert installed == profile / "profiles" / "default" / "python" / "plugins" / "geocate"
    assert not installed.is_symlink() and (installed / "metadata.txt").is_file()
    # The estimation packages: this checkout's venv, alone on the path (the profile that links the checkout is not).
    site_packages = [p for p in sys.path if p.startswith(str(ROOT / ".venv")) and p.endswith("site-packages")]
    env = fresh_env(profile, site_packages)
    assert str(ROOT / ".qgis-profile") not in env["PYTHONPATH"] and len(site_packages) == 1
    listed = subprocess.run(["qgis_process.bin", "--json", "plugins"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert json.loads(listed.stdout)["plugins"]["geocate"]["loaded"] is True, listed.stdout + listed.stderr
    metadata = run_demo(installed, env, study_folder(tmp_path, demo_units_gpkg) / "result.gpkg")
    assert metadata["n_used"] == 294


#: Runs in the Python that runs QGIS, in the fresh profile: what the dock does when packages are missing.
DOCK_INSTALLER = """
import importlib, json, sys
from qgis.core import QgsApplication
app = QgsApplication([], False)
app.initQgis()
sys.path.insert(0, sys.argv[1])          # the profile's plugin folder, as QGIS puts it on the path
import numpy
from geocate.ui import dependencies
from geocate.ui.install import InstallTask
folder = dependencies.add_packages_dir_to_path()
missing = dependencies.missing_packages()
report = {"folder": folder, "numpy": numpy.__version__, "missing_before": missing, "ok": True, "error": "",
          "commands": dependencies.install_commands(missing) if missing else []}
if missing:
    task = InstallTask(missing)          # the dock's Install button runs this task in the background
    report["ok"], report["error"] = task.run(), task.error
importlib.invalidate_caches()
report["missing_after"] = dependencies.missing_packages()
print("REPORT " + json.dumps(report))
"""


@pytest.mark.slow
def test_the_docks_installer_gives_the_zip_installed_plugin_its_packages(release_zip, demo_units_gpkg, tmp_path):
    """No PYTHONPATH at all: the packages come from the folder the dock's installer fills inside the profile.

    The installer's folder is kept under outputs/ between runs (keyed by ui/dependencies.py), as a user's profile
    keeps it; the first run installs it with pip (a few minutes, about 1.7 GB, from the package index)."""
    profile = tmp_path / "fresh profile"
    installed = install_from_zip(release_zip, profile)
    key = hashlib.sha1((installed / "ui" / "dependencies.py").read_bytes() + QGIS_PYTHON.encode()).hexdigest()[:12]
    cache = INSTALLER_CACHE / key
    if not (cache / ".complete").exists():
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
    managed = profile / "profiles" / "default" / "python" / "geocate-packages"
    managed.symlink_to(cache, target_is_directory=True)
    env = fresh_env(profile)
    done = subprocess.run([QGIS_PYTHON, "-c", DOCK_INSTALLER, str(installed.parent)], env=env, capture_output=True,
                          text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["ok"], report["error"]
    assert report["folder"] == str(managed) and report["missing_after"] == [], report
    for command in report["commands"]:  # into the profile's folder, numpy pinned to the one QGIS runs
        assert command[command.index("--target") + 1] == str(managed) and f"numpy=={report['numpy']}" in command
    if report["commands"]:  # installed now: later runs reuse the folder
        (cache / ".complete").write_text(json.dumps(report["commands"]))
    metadata = run_demo(installed, env, study_folder(tmp_path, demo_units_gpkg) / "result.gpkg")
    assert metadata["versions"]["numpy"] == report["numpy"]  # QGIS's numpy stayed first on the path
    assert metadata["versions"]["econml"] == "0.16.0"

"""The estimation packages GeoCATE needs, where the plugin installs them, and the command that does it."""

import importlib.util
import os
import shutil
import sys

# import name -> what pip installs (the CPU build of torch; a CUDA build can replace it by hand).
REQUIRED = {
    "torch": "torch==2.13.0",
    "econml": "econml==0.16.0",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "statsmodels": "statsmodels",
    "matplotlib": "matplotlib",
    "onnx": "onnx==1.23.2",
    "onnxruntime": "onnxruntime==1.32.0",
}


def packages_dir():
    """The folder the plugin manages, inside the active QGIS profile."""
    from qgis.core import QgsApplication

    return os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "geocate-packages")


def add_packages_dir_to_path():
    """Append (not prepend) the managed folder to sys.path, so QGIS's own numpy and GDAL always win."""
    folder = packages_dir()
    if os.path.isdir(folder) and folder not in sys.path:
        sys.path.append(folder)
    return folder


def missing_packages(find_spec=importlib.util.find_spec):
    """Import names of the required packages Python cannot find."""
    return [name for name in REQUIRED if find_spec(name) is None]


def python_executable():
    """The Python interpreter behind QGIS (sys.executable is often the QGIS binary itself)."""
    candidates = [sys.executable, getattr(sys, "_base_executable", ""),
                  os.path.join(sys.exec_prefix, "python.exe"), os.path.join(sys.exec_prefix, "bin", "python3"),
                  shutil.which("python3") or "", shutil.which("python") or ""]
    for path in candidates:
        name = os.path.basename(path or "").lower()
        if path and os.path.isfile(path) and name.startswith("python"):
            return path
    return "python3"


def install_command(missing, target=None):
    """The pip command that installs ``missing`` into the managed folder.

    numpy is pinned to the version QGIS already uses (and below 2, which the
    GDAL bindings of most QGIS builds need), so nothing installed there can
    replace QGIS's own numpy.
    """
    import numpy

    target = target or packages_dir()
    pins = [f"numpy=={numpy.__version__}" if numpy.__version__.startswith("1.") else "numpy<2"]
    return ([python_executable(), "-m", "pip", "install", "--upgrade", "--target", target]
            + pins + [REQUIRED[name] for name in missing])


def missing_message(missing):
    """Plain words for the dock: what is missing and what the Install button will run."""
    command = " ".join(install_command(missing))
    return (f"GeoCATE needs Python packages that are not installed: {', '.join(missing)}. "
            f"Press 'Install' to install them into {packages_dir()} (a folder GeoCATE manages; QGIS's own "
            f"packages are not touched), or run yourself:\n{command}")

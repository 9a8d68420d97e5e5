"""The estimation packages GeoCATE needs, where the plugin installs them, and the command that does it."""

import importlib.util
import os
import shutil
import sys

# import name -> what pip installs (torch: from the CPU index unless a GPU is present, see install_commands).
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


#: onnxruntime with the CUDA execution provider, installed instead of onnxruntime where an NVIDIA GPU is present.
ONNXRUNTIME_GPU = REQUIRED["onnxruntime"].replace("onnxruntime", "onnxruntime-gpu")

#: Where the CPU-only builds of torch are (the plain PyPI wheel for Linux and Windows is the CUDA build, several GB).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def has_nvidia_gpu():
    """An NVIDIA GPU with its driver is present (then the CUDA build of torch is worth its size)."""
    import subprocess

    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def install_commands(missing, target=None, gpu=None):
    """The pip commands that install ``missing`` into the managed folder: torch first, on its own, from the CPU
    index unless an NVIDIA GPU is present (macOS wheels are CPU builds already), then the rest.

    numpy is pinned to the version QGIS already uses (and below 2, which the
    GDAL bindings of most QGIS builds need), so nothing installed there can
    replace QGIS's own numpy.
    """
    import numpy

    target = target or packages_dir()
    gpu = has_nvidia_gpu() if gpu is None else gpu
    pins = [f"numpy=={numpy.__version__}" if numpy.__version__.startswith("1.") else "numpy<2"]
    pip = [python_executable(), "-m", "pip", "install", "--upgrade", "--target", target]
    commands = []
    if "torch" in missing:
        index = [] if gpu or sys.platform == "darwin" else ["--extra-index-url", TORCH_CPU_INDEX]
        commands.append(pip + index + pins + [REQUIRED["torch"]])
    rest = [REQUIRED[name] for name in missing if name != "torch"]
    if gpu and "onnxruntime" in missing:  # the same release with the CUDA provider, for encoders and cluster models
        rest = [ONNXRUNTIME_GPU if r == REQUIRED["onnxruntime"] else r for r in rest]
    if rest:
        commands.append(pip + pins + rest)
    return commands


def missing_message(missing, gpu=None):
    """Plain words for the dock: what is missing and what the Install button will run."""
    commands = "\n".join(" ".join(command) for command in install_commands(missing, gpu=gpu))
    gpu = has_nvidia_gpu() if gpu is None else gpu
    build = ("the CUDA build of torch, for this machine's NVIDIA GPU" if gpu else
             "the CPU build of torch (no NVIDIA GPU found), a few hundred MB instead of several GB")
    return (f"GeoCATE needs Python packages that are not installed: {', '.join(missing)}. "
            f"Press 'Install' to install them into {packages_dir()} (a folder GeoCATE manages; QGIS's own "
            f"packages are not touched)" + (f", with {build}" if "torch" in missing else "")
            + f". Or run yourself:\n{commands}")

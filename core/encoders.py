"""Any image encoder as an ONNX file: the input contract, its metadata, and the representation that runs it.

Contract (README, "Bring your own encoder"):

- input ``(N, bands, H, W)`` float32, H = W = the metadata's input size;
- output ``(N, D)``, or ``(N, D, h, w)`` which is averaged over h and w;
- metadata in the ONNX file's own ``metadata_props`` (strings; lists as JSON):
  ``input_size`` (pixels), ``mean`` and ``std`` (one per band, applied after
  dividing raw pixel values by ``pixel_scale``, default 1), ``band_order``
  (names, one per band), ``resolution_m`` (ground size of a pixel it was
  trained at), ``name``, ``licence``. Deepness's keys are read where they mean
  the same: ``tiles_size`` for ``input_size``, ``standardization_mean`` /
  ``standardization_std`` for ``mean`` / ``std``, ``resolution`` (centimetres
  per pixel) for ``resolution_m``; a Deepness model scales 0-255 pixels to 0-1,
  so ``pixel_scale`` defaults to 255 there.

Windows are resized to the input size (core.patches.resize_matrix: area
averaging down, linear interpolation up). onnxruntime runs the model with the
CUDA provider first where it is installed (``onnxruntime-gpu``) and a GPU is
present; ``provider_`` says which ran.
"""

import json
import os

import numpy as np

from .errors import GeoCateError, require
from .patches import resize_matrix
from .progress import Throttle

#: Our key -> Deepness's key with the same meaning.
DEEPNESS_KEYS = {"input_size": "tiles_size", "mean": "standardization_mean", "std": "standardization_std"}


def file_digest(path):
    """SHA-256 of a file, in hex."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse(value):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def read_encoder_metadata(path):
    """The encoder's settings from its metadata_props (our keys, else Deepness's): dict with input_size, mean,
    std, pixel_scale, band_order, resolution_m, name, licence, and which convention was found. Raises
    GeoCateError for a missing, damaged or incompletely described file, naming what is missing."""
    onnx = require("onnx", "onnx==1.23.2")
    if not os.path.isfile(path):
        raise GeoCateError(f"The encoder '{path}' does not exist.", "Choose an .onnx file (scripts/export_encoder.py "
                                                                    "makes one from a torch model).")
    try:
        model = onnx.load(path, load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and checker errors alike mean a damaged file
        raise GeoCateError(f"The encoder '{path}' is damaged or not an ONNX model ({exc.__class__.__name__}).",
                           "Export it again (scripts/export_encoder.py) or download it again.") from exc
    props = {p.key: _parse(p.value) for p in model.metadata_props}
    deepness = "tiles_size" in props and "input_size" not in props

    def get(key):
        return props.get(key, props.get(DEEPNESS_KEYS.get(key, ""), None))

    missing = [key for key in ("input_size", "mean", "std") if get(key) is None]
    if missing:
        raise GeoCateError(
            f"The encoder '{path}' lacks the metadata GeoCATE needs: {', '.join(missing)} (or Deepness's "
            f"{', '.join(DEEPNESS_KEYS[k] for k in missing)}).",
            "Add them to the file's metadata_props (scripts/export_encoder.py writes them all): the input size in "
            "pixels and each band's mean and std after dividing pixels by pixel_scale.")
    mean, std = np.atleast_1d(np.asarray(get("mean"), float)), np.atleast_1d(np.asarray(get("std"), float))
    if len(mean) != len(std) or (std <= 0).any():
        raise GeoCateError(f"The encoder '{path}' has {len(mean)} band mean(s) and {len(std)} std(s), or a std <= 0.",
                           "Give one mean and one positive std per band in its metadata.")
    resolution = props.get("resolution_m")
    if resolution is None and props.get("resolution") is not None:
        resolution = float(props["resolution"]) / 100.0  # Deepness: centimetres per pixel
    graph_input = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim]
    description = {
        "input_size": int(get("input_size")), "mean": mean.tolist(), "std": std.tolist(),
        "pixel_scale": float(props.get("pixel_scale", 255.0 if deepness else 1.0)),
        "band_order": props.get("band_order"), "resolution_m": None if resolution is None else float(resolution),
        "name": str(props.get("name", os.path.basename(path))), "licence": props.get("licence", props.get("license")),
        "metadata": "Deepness" if deepness else "GeoCATE", "input_name": graph_input.name, "input_dims": dims}
    if len(dims) != 4:
        raise GeoCateError(f"The encoder '{path}' takes a {len(dims)}-D input; GeoCATE gives (windows, bands, "
                           "height, width).", "Export an image encoder with a 4-D input (N, bands, H, W).")
    if dims[1] is not None and dims[1] != len(mean):
        raise GeoCateError(f"The encoder '{path}' takes {dims[1]} band(s) but its metadata gives {len(mean)} band "
                           "mean(s).", "Correct the metadata: one mean and std per input band.")
    if any(d is not None and d != description["input_size"] for d in dims[2:]):
        raise GeoCateError(f"The encoder '{path}' takes {dims[2]} x {dims[3]} pixels but its metadata says "
                           f"{description['input_size']}.", "Correct input_size in its metadata.")
    return description


class OnnxEncoder:
    """A representation (core.represent) that runs an ONNX image encoder; nothing is learned in ``fit``."""

    kind = "onnx"

    def __init__(self, path, device="auto", batch_size=32):
        self.path = str(path)
        self.device = device
        self.batch_size = batch_size
        self.description = read_encoder_metadata(self.path)
        self.sha256 = file_digest(self.path)
        self._open()

    def _open(self):
        ort = require("onnxruntime", "onnxruntime==1.32.0")
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"] if self.device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if self.device == "cuda" and "CUDAExecutionProvider" not in available:
            raise GeoCateError("CUDA was asked for, but this onnxruntime has no CUDA provider.",
                               "Install onnxruntime-gpu (the dock's installer does where a GPU is present), or choose "
                               "DEVICE 'auto' or 'cpu'.")
        try:
            self.session = ort.InferenceSession(self.path, providers=[p for p in wanted if p in available])
        except Exception as exc:  # noqa: BLE001
            raise GeoCateError(f"onnxruntime cannot run the encoder '{self.path}' ({exc}).",
                               "Export it again with an opset onnxruntime supports (scripts/export_encoder.py "
                               "uses 17).") from exc
        self.provider_ = self.session.get_providers()[0]

    def __getstate__(self):  # a session cannot be pickled (feature cache): reopened on load
        state = dict(self.__dict__)
        state.pop("session", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if os.path.isfile(self.path) and file_digest(self.path) == self.sha256:
            self._open()

    @property
    def device_(self):
        return "cuda" if self.provider_ == "CUDAExecutionProvider" else "cpu"

    def params(self):
        return {"kind": self.kind, "sha256": self.sha256}

    def fit(self, windows):
        bands = np.shape(windows)[1]
        want = len(self.description["mean"])
        if bands != want:
            raise GeoCateError(
                f"The encoder '{self.description['name']}' takes {want} band(s)"
                + (f" ({', '.join(map(str, self.description['band_order']))})" if self.description["band_order"]
                   else "") + f", but {bands} band(s) of the raster were chosen.",
                f"Choose {want} bands in BANDS, in the encoder's order.")
        return self

    def transform(self, windows, rows=None, progress=None, is_cancelled=None):
        rows = np.arange(len(windows)) if rows is None else np.asarray(rows)
        size = self.description["input_size"]
        mean = np.asarray(self.description["mean"], np.float32)[None, :, None, None]
        std = np.asarray(self.description["std"], np.float32)[None, :, None, None]
        scale = self.description["pixel_scale"]
        resize = None
        out = None
        throttle = Throttle(progress, is_cancelled)
        for start in range(0, len(rows), self.batch_size):
            batch = np.asarray(windows[rows[start:start + self.batch_size]], dtype=np.float32)
            if batch.shape[-1] != size:
                resize = resize if resize is not None else resize_matrix(batch.shape[-1], size).astype(np.float32)
                batch = resize @ batch @ resize.T
            batch = ((batch / scale - mean) / std).astype(np.float32)
            embedded = self.session.run(None, {self.description["input_name"]: batch})[0]
            if embedded.ndim == 4:
                embedded = embedded.mean(axis=(2, 3))
            if embedded.ndim != 2:
                raise GeoCateError(f"The encoder '{self.description['name']}' returned an array of shape "
                                   f"{embedded.shape}; GeoCATE takes (N, D) or (N, D, h, w).",
                                   "Export the encoder without its classification head, ending in features.")
            if out is None:
                out = np.empty((len(rows), embedded.shape[1]), dtype=np.float64)
            out[start:start + len(batch)] = embedded
            throttle.tick(start / max(len(rows), 1), f"Encoder: {start} of {len(rows)} windows")
        return out if out is not None else np.empty((0, 0))

    def describe(self):
        d = self.description
        return {"kind": self.kind, "name": d["name"], "licence": d["licence"], "sha256": self.sha256,
                "input_size": d["input_size"], "bands": len(d["mean"]), "band_order": d["band_order"],
                "resolution_m": d["resolution_m"], "metadata": d["metadata"], "provider": self.provider_,
                "output": "the encoder's embedding (spatial outputs averaged)"}


def export_encoder(module, path, bands, input_size, mean, std, pixel_scale=1.0, band_order=None, resolution_m=None,
                   name=None, licence=None, opset=17):
    """Write a torch module (N, bands, H, W) -> (N, D) or (N, D, h, w) as an ONNX encoder with GeoCATE's metadata.

    Written to a temporary name and moved into place when complete."""
    torch = require("torch", "torch==2.13.0")
    onnx = require("onnx", "onnx==1.23.2")
    module = module.eval().cpu()
    example = torch.zeros(2, int(bands), int(input_size), int(input_size))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.onnx.export(module, (example,), tmp, input_names=["image"], output_names=["embedding"],
                          dynamic_axes={"image": {0: "n"}, "embedding": {0: "n"}}, opset_version=opset, dynamo=False)
        model = onnx.load(tmp)
        props = {"input_size": int(input_size), "mean": list(map(float, mean)), "std": list(map(float, std)),
                 "pixel_scale": float(pixel_scale), "band_order": list(band_order) if band_order else None,
                 "resolution_m": resolution_m, "name": name or os.path.splitext(os.path.basename(path))[0],
                 "licence": licence, "producer": "GeoCATE scripts/export_encoder.py"}
        for key, value in props.items():
            if value is not None:
                entry = model.metadata_props.add()
                entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

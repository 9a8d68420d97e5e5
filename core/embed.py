"""Image representations of unit windows: robust band scaling and random convolutional features.

The default representation follows MOSAIKS (Rolf et al., "A generalizable and
accessible approach to machine learning with global satellite imagery",
Nature Communications 12, 4392, 2021), itself after Coates & Ng (2011):

    filters  f_k = W (p_k - m) / ||W (p_k - m)||,   k = 1..K
    features z_{2k-1} = mean_{pixels} ReLU(<f_k, W (x_pixel - m)> - b)
             z_{2k}   = mean_{pixels} ReLU(-<f_k, W (x_pixel - m)> - b)

where p_k are s x s x bands patches sampled at random from the study's own
windows, m their mean, W the ZCA whitening matrix of the sampled patches and b
a bias (0 by default). No pretrained weights, nothing downloaded; the filters
depend only on the windows and the seed. torch runs the convolution, on CUDA
when torch sees it.
"""

import numpy as np

from .errors import GeoCateError, require
from .progress import Throttle


def resolve_device(device="auto"):
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error."""
    torch = require("torch", "torch==2.13.0")
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GeoCateError(
            "CUDA was asked for, but torch sees no GPU on this machine.",
            "Choose DEVICE 'auto' or 'cpu', or install a CUDA build of torch.",
        )
    if device not in ("cpu", "cuda"):
        raise GeoCateError(f"Unknown device '{device}'.", "Choose 'auto', 'cpu' or 'cuda'.")
    return device


class BandScaler:
    """Per-band robust scaling: (x - q50) / (q98 - q2), clipped to [-clip, clip].

    Quantiles are taken over the valid windows' pixels, so 8-bit, 16-bit and
    reflectance imagery all land on the same scale. Learned: ``low_``,
    ``median_``, ``high_`` (one value per band).
    """

    def __init__(self, clip=5.0, max_pixels=2_000_000, seed=0):
        self.clip = clip
        self.max_pixels = max_pixels
        self.seed = seed

    def fit(self, patches):
        """patches: (n, bands, h, w) of usable windows.

        With more than ``max_pixels`` pixels, whole windows are drawn first (so
        no copy of every pixel is made: 100,000 windows of 33 x 33 x 3 are 1.3 GB),
        then pixels from them."""
        patches = np.asarray(patches)
        rng = np.random.default_rng(self.seed)
        per_window = int(np.prod(patches.shape[2:])) or 1
        if len(patches) * per_window > 4 * self.max_pixels:
            keep = np.sort(rng.choice(len(patches), max(4 * self.max_pixels // per_window, 1), replace=False))
            patches = patches[keep]
        pixels = np.moveaxis(patches, 1, -1).reshape(-1, patches.shape[1])
        if len(pixels) > self.max_pixels:
            pixels = pixels[rng.choice(len(pixels), self.max_pixels, replace=False)]
        self.low_, self.median_, self.high_ = np.quantile(pixels, [0.02, 0.5, 0.98], axis=0)
        return self

    def transform(self, patches):
        spread = np.maximum(self.high_ - self.low_, 1e-12)
        scaled = (np.asarray(patches, dtype=np.float32) - self.median_[None, :, None, None]) / spread[None, :, None, None]
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)

    def to_dict(self):
        return {"low": self.low_.tolist(), "median": self.median_.tolist(), "high": self.high_.tolist(), "clip": self.clip}


class RandomConvFeatures:
    """MOSAIKS random convolutional features (see the module docstring).

    n_filters: K, giving 2K features; filter_size: s (pixels); whiten: use ZCA;
    bias: b; seed: draws of the filter patches; device: 'auto', 'cpu' or 'cuda'.
    Learned: ``weight_`` (K, bands, s, s) effective filters applied to the
    scaled image, ``offset_`` (K,) so that response = conv(x, weight_) - offset_,
    ``device_`` the device used.
    """

    def __init__(self, n_filters=256, filter_size=3, whiten=True, bias=0.0,
                 zca_eps=1e-2, seed=42, device="auto", batch_size=None):
        self.n_filters = n_filters
        self.filter_size = filter_size
        self.whiten = whiten
        self.bias = bias
        self.zca_eps = zca_eps
        self.seed = seed
        self.device = device
        self.batch_size = batch_size

    def fit(self, patches):
        """patches: (n, bands, h, w) scaled windows, all usable."""
        patches = np.asarray(patches, dtype=np.float32)
        n, bands, h, w = patches.shape
        s = self.filter_size
        if n == 0 or h < s or w < s:
            raise GeoCateError(
                f"Windows of {h} x {w} pixels are too small for {s} x {s} filters.",
                f"Use a window size of at least {s} pixels.",
            )
        rng = np.random.default_rng(self.seed)
        n_samples = max(10 * self.n_filters, 5000)
        idx = rng.integers(0, n, n_samples)
        rows = rng.integers(0, h - s + 1, n_samples)
        cols = rng.integers(0, w - s + 1, n_samples)
        offsets = np.arange(s)
        sampled = patches[idx[:, None, None, None], np.arange(bands)[None, :, None, None],
                          (rows[:, None, None, None] + offsets[None, None, :, None]),
                          (cols[:, None, None, None] + offsets[None, None, None, :])]
        flat = sampled.reshape(n_samples, -1).astype(np.float64)
        mean = flat.mean(axis=0)
        centred = flat - mean
        if self.whiten:
            cov = centred.T @ centred / n_samples
            eigval, eigvec = np.linalg.eigh(cov)
            zca = eigvec @ np.diag(1.0 / np.sqrt(eigval + self.zca_eps)) @ eigvec.T
        else:
            zca = np.eye(flat.shape[1])
        chosen = centred[: self.n_filters] @ zca
        chosen /= np.maximum(np.linalg.norm(chosen, axis=1, keepdims=True), 1e-12)
        # <f, W (x - m)> = <W f, x> - <W f, m> since W is symmetric.
        effective = chosen @ zca
        self.weight_ = effective.reshape(self.n_filters, bands, s, s).astype(np.float32)
        self.offset_ = (effective @ mean).astype(np.float32)
        self.device_ = resolve_device(self.device)
        return self

    def transform(self, patches, progress=None, is_cancelled=None, prepare=None, rows=None, out=None):
        """(n, bands, h, w) scaled windows -> (n, 2 * n_filters) features, float32.

        prepare: applied to each batch of windows first (e.g. BandScaler.transform,
        so unscaled windows are scaled batch by batch, never all at once);
        rows: indices of the windows to use (default all), read batch by batch;
        out: a float32 (len(rows), 2 * n_filters) array to write into (e.g. a memory-mapped
        core.patches.float32_store), returned; default a new array."""
        torch = require("torch", "torch==2.13.0")
        if prepare is None and rows is None:
            patches = np.asarray(patches, dtype=np.float32)
        rows = np.arange(len(patches)) if rows is None else np.asarray(rows)
        device = torch.device(self.device_)
        weight = torch.from_numpy(self.weight_).to(device)
        offset = torch.from_numpy(self.offset_ + self.bias).to(device)[None, :, None, None]
        offset_neg = torch.from_numpy(-self.offset_ + self.bias).to(device)[None, :, None, None]
        if out is None:
            out = np.empty((len(rows), 2 * self.n_filters), dtype=np.float32)
        throttle = Throttle(progress, is_cancelled)
        # Small batches keep the response maps in cache on a CPU; a GPU wants large ones.
        batch_size = self.batch_size or (512 if device.type == "cuda" else 16)
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                windows = np.asarray(patches[rows[start:start + batch_size]], dtype=np.float32)
                batch = torch.from_numpy(prepare(windows) if prepare is not None else windows).to(device)
                response = torch.nn.functional.conv2d(batch, weight)
                if self.bias == 0:
                    # ReLU(r) = (|r| + r) / 2 and ReLU(-r) = (|r| - r) / 2: one pass, not two; in place, as the
                    # response maps are the largest arrays of the feature step (the same numbers as new arrays).
                    response.sub_(offset)
                    signed = response.mean(dim=(2, 3))
                    magnitude = response.abs_().mean(dim=(2, 3))
                    pos, neg = (magnitude + signed) / 2, (magnitude - signed) / 2
                else:
                    pos = torch.relu(response - offset).mean(dim=(2, 3))
                    neg = torch.relu(-response - offset_neg).mean(dim=(2, 3))
                out[start:start + len(batch)] = torch.cat([pos, neg], dim=1).cpu().numpy()
                throttle.tick(start / len(rows), f"Image features: {start} of {len(rows)} windows")
        return out

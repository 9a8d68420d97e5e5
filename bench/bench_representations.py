"""What the image can say: multi-scale context, image sequences, ONNX encoders, the feature cache and memory.

    .venv/bin/python bench/bench_representations.py all --json docs/bench_representations.json
    .venv/bin/python bench/bench_representations.py scales|time|onnx|cache|memory [--units N] [--seed S]

scales: a trial on the bundled Landsat scene (../shared/data) whose effect
  depends on the unit's own 33-px window (texture) and on its 161-px
  surroundings (brightness), core.simulate.simulate_context_trial; estimatecate
  with the window alone, the 161-px window alone, and both (SCALES 33,161):
  Spearman of the out-of-fold CATE with the truth.
time: a trial whose effect is 2 where the later date shows new content
  (core.simulate.simulate_change_trial); estimatecate with the later date alone
  and with both dates under each TIME_POOLING: R^2 of the CATE on the truth and
  the valid test's p-value.
onnx: a ResNet-18-sized encoder (torchvision's architecture, written here,
  random weights: torchvision is not installed) exported by
  core.encoders.export_encoder; largest |onnxruntime - torch| and windows per
  second of 224-px windows on this CPU (and CUDA when a GPU is present).
cache: the same featurisation twice through the cache: seconds and ratio.
memory: peak resident memory of featurising 500 units on the scene and on a
  VRT mosaic of the scene repeated 20 x 20 times (400 times the pixels).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))
SCENE = os.path.join(ROOT, "..", "shared", "data", "landsat8_224078_20200518_b234.tif")
if not os.path.exists(SCENE):
    SCENE = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")


def units_of(trial):
    from geocate.core.study import UnitTable

    return UnitTable(xy=trial.coords, crs_wkt=trial.crs_wkt, treated=trial.treated.astype(float),
                     outcome=trial.outcome, covariates=trial.covariates, covariate_names=trial.covariate_names)


def run(units, imagery, seed, raster=SCENE, window=33):
    from geocate.core.pipeline import estimate_cate

    return estimate_cate(units, raster, window_size_px=window, seed=seed, imagery=imagery, n_draws=100)[1]


def bench_scales(args):
    from scipy.stats import spearmanr

    from geocate.core.represent import ImageryOptions
    from geocate.core.simulate import simulate_context_trial

    out = {}
    for rep in range(args.reps):
        trial = simulate_context_trial(SCENE, args.units, seed=args.seed + rep)
        units = units_of(trial)
        figures = {"window 33 px": run(units, None, args.seed + rep),
                   "window 161 px": run(units, None, args.seed + rep, window=161),
                   "33 + 161 px (SCALES)": run(units, ImageryOptions(scales="33,161"), args.seed + rep)}
        for name, result in figures.items():
            out.setdefault(name, []).append(float(spearmanr(result.cate, trial.true_cate).correlation))
    summary = {name: {"spearman_mean": float(np.mean(v)), "spearman": v} for name, v in out.items()}
    for name, row in summary.items():
        print(f"scales: {name}: Spearman with the true CATE {row['spearman_mean']:.3f} over {args.reps} trial(s)")
    return {"units": args.units, "reps": args.reps, "results": summary}


def bench_time(args):
    from geocate.core.represent import POOLINGS, ImageryOptions
    from geocate.core.simulate import simulate_change_trial

    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for rep in range(args.reps):
            later = os.path.join(folder, f"later{rep}.tif")
            trial = simulate_change_trial(SCENE, later, args.units, seed=args.seed + rep)
            units = units_of(trial)
            runs = {"later date alone": run(units, None, args.seed + rep, raster=later)}
            for pooling in POOLINGS:
                runs[f"both dates, {pooling}"] = run(
                    units, ImageryOptions(rasters_time=(later,), time_pooling=pooling), args.seed + rep)
            for name, result in runs.items():
                r2 = 1 - np.mean((result.cate - trial.true_cate) ** 2) / np.var(trial.true_cate)
                corr2 = float(np.corrcoef(result.cate, trial.true_cate)[0, 1] ** 2)
                row = out.setdefault(name, {"r2": [], "corr2": [], "p_value": []})
                row["r2"].append(float(r2))
                row["corr2"].append(corr2)
                row["p_value"].append(float(result.heterogeneity.p_value))
    for name, row in out.items():
        print(f"time: {name}: R^2 {np.mean(row['r2']):.3f} (squared correlation {np.mean(row['corr2']):.3f}), "
              f"test p {np.max(row['p_value']):.2g} (largest)")
    return {"units": args.units, "reps": args.reps, "results": out}


def resnet18(bands=3):
    """torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2]) without its head: (N, bands, H, W) -> (N, 512)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(bands, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers).eval()


def bench_onnx(args):
    import torch

    from geocate.core.encoders import OnnxEncoder, export_encoder

    torch.manual_seed(args.seed)
    model = resnet18()
    mean, std = [0.3, 0.3, 0.3], [0.2, 0.2, 0.2]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        path = export_encoder(model, os.path.join(folder, "resnet18.onnx"), 3, 224, mean, std, pixel_scale=10000,
                              name="resnet18 (random weights)")
        windows = np.random.default_rng(args.seed).uniform(5000, 15000, (64, 3, 224, 224)).astype(np.float32)
        for device in ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in __import__("onnxruntime")
                                 .get_available_providers() else []):
            encoder = OnnxEncoder(path, device=device)
            encoder.transform(windows[:8])  # warm-up
            started = time.perf_counter()
            features = encoder.transform(windows)
            seconds = time.perf_counter() - started
            scaled = (windows / 10000 - np.float32(0.3)) / np.float32(0.2)
            with torch.no_grad():
                reference = model(torch.from_numpy(scaled)).numpy()
            results[device] = {"provider": encoder.provider_, "windows_per_s": len(windows) / seconds,
                               "max_abs_diff_vs_torch": float(np.abs(features - reference).max())}
            torch_started = time.perf_counter()
            with torch.no_grad():
                for start in range(0, len(windows), 32):
                    model(torch.from_numpy(scaled[start:start + 32]))
            results[device]["torch_cpu_windows_per_s"] = len(windows) / (time.perf_counter() - torch_started)
            print(f"onnx: ResNet-18 on 224-px windows, {device} ({encoder.provider_}): "
                  f"{results[device]['windows_per_s']:.1f} windows/s (torch on CPU "
                  f"{results[device]['torch_cpu_windows_per_s']:.1f}); largest |onnxruntime - torch| "
                  f"{results[device]['max_abs_diff_vs_torch']:.2e}")
    return results


def featurise(units, raster, cache):
    from geocate.core.pipeline import image_features
    from geocate.core.represent import ImageryOptions
    from geocate.core.study import build_study

    imagery = ImageryOptions(cache=cache)
    started = time.perf_counter()
    study = build_study(units, raster, None, 33, None, **imagery.study_kwargs())
    features = image_features(study, 42, imagery=imagery)[0]
    return time.perf_counter() - started, features


def bench_cache(args):
    from geocate.core.represent import FeatureCache
    from geocate.core.simulate import simulate_trial

    units = units_of(simulate_trial(SCENE, args.units, seed=args.seed))
    with tempfile.TemporaryDirectory() as folder:
        cache = FeatureCache(folder)
        first, a = featurise(units, SCENE, cache)
        second, b = featurise(units, SCENE, cache)
    print(f"cache: {args.units} units: first featurisation {first:.2f} s, second {second:.3f} s "
          f"({first / second:.0f}x faster; identical: {np.array_equal(a, b)})")
    return {"units": args.units, "first_s": first, "second_s": second, "ratio": first / second,
            "identical": bool(np.array_equal(a, b))}


def bench_memory(args):
    """Each measurement in a fresh process: peak RSS featurising the same units on the scene and on a mosaic."""
    if args.child:
        from geocate.core.simulate import simulate_trial

        trial = simulate_trial(SCENE, args.units, seed=args.seed)
        units = units_of(trial)
        if args.child != SCENE:  # the units on the mosaic's last tile, far from its origin
            from osgeo import gdal

            info = gdal.Open(SCENE)
            gt = info.GetGeoTransform()
            offset = np.array([19 * info.RasterXSize * gt[1], 19 * info.RasterYSize * gt[5]])
            import dataclasses

            units = dataclasses.replace(units, xy=units.xy + offset)
        import tracemalloc

        tracemalloc.start()
        seconds, features = featurise(units, args.child, None)
        peak = tracemalloc.get_traced_memory()[1]
        # tracemalloc counts Python's and numpy's allocations (what grows with the data); ru_maxrss adds the
        # libraries' code and caches (and is inherited from a large parent process on Linux).
        print(json.dumps({"peak_traced_mb": peak / 1e6, "peak_rss_mb": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds, "n": len(features)}))
        return None
    from osgeo import gdal

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        from geocate.core.simulate import repeat_mosaic

        mosaic = repeat_mosaic(SCENE, folder)
        mosaic_ds = gdal.Open(mosaic)
        size = (mosaic_ds.RasterXSize, mosaic_ds.RasterYSize, mosaic_ds.RasterCount)
        whole_gb = size[0] * size[1] * size[2] * 2 / 1e9
        mosaic_ds = None
        for name, raster in (("scene", SCENE), ("mosaic 20 x 20", mosaic)):
            line = subprocess.run([sys.executable, __file__, "memory", "--child", raster, "--units", str(args.units),
                                   "--seed", str(args.seed)], capture_output=True, text=True, check=True).stdout
            results[name] = json.loads(line.strip().splitlines()[-1])
        results["mosaic_pixels"] = size
        results["mosaic_whole_gb"] = whole_gb
    print(f"memory: {args.units} units: peak allocations {results['scene']['peak_traced_mb']:.0f} MB on the scene, "
          f"{results['mosaic 20 x 20']['peak_traced_mb']:.0f} MB on the 20 x 20 mosaic ({size[0]} x {size[1]} "
          f"pixels, {whole_gb:.1f} GB if read whole); resident set {results['scene']['peak_rss_mb']:.0f} and "
          f"{results['mosaic 20 x 20']['peak_rss_mb']:.0f} MB")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["scales", "time", "onnx", "cache", "memory", "all"])
    parser.add_argument("--units", type=int, default=None)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    defaults = {"scales": 1000, "time": 1000, "onnx": 0, "cache": 1000, "memory": 500}
    out = {"machine": f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d")}
    for what in (defaults if args.what == "all" else [args.what]):
        local = argparse.Namespace(**vars(args))
        local.units = args.units or defaults[what]
        out[what] = globals()[f"bench_{what}"](local)
    if args.json and not args.child:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(out, handle, indent=2)


if __name__ == "__main__":
    main()

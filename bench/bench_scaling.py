"""Scaling of geocate:estimatecate's core: wall time and peak memory at 1k, 10k and 100k units.

Usage: python bench/bench_scaling.py [--sizes 1000 10000 100000] [--forest folds out-of-bag] [--raster demo|scene|PATH]
[--json out.json]

For each size, a trial is simulated on the demo imagery (--raster scene: the shared data's full Landsat scene, which
holds a million units; core/simulate.py,
effects 0, 1, 2.5 by image) and saved; then a fresh Python process runs
``core.pipeline.estimate_cate`` on it (windows read through GDAL, MOSAIKS
features, the cross-fitted forest, the sequential heterogeneity test, the
pooled AUTOC) and reports its wall time, its CPU time (user + system, to see
both cores at work) and its peak resident memory (VmHWM of that process
alone, imports of torch, econml and GDAL included; not ru_maxrss, which on
Linux keeps the parent's peak across fork and exec), and the peak of its anonymous memory (RssAnon sampled every
0.1 s: what the process itself holds, without file pages such as memory-mapped windows, which the kernel can write
back and drop). --forest: estimatecate's FOREST, each in its own process on
the same trial (issue 26: the five fold forests, or one forest out of bag by groups).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO_RASTER = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")
#: The full Landsat scene of the shared data (2041 x 1860 pixels): the demo crop (1024 x 1024) holds at most 984,064
#: units at distinct pixels, too few for a million.
SCENE = os.path.join(ROOT, "..", "shared", "data", "landsat8_224078_20200518_b234.tif")
PLUGINS = os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins")

CHILD = r"""
import json, sys, time
sys.path.insert(0, {plugins!r})


def peak_rss_mb():
    # VmHWM of this process's own memory map: ru_maxrss would also count the parent's memory at fork.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024


import threading


def status_mb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


PEAK_ANON = [0.0]


def sample_anonymous():
    # RssAnon: memory only this process holds (not file pages the kernel can drop, such as memory-mapped windows)
    while True:
        PEAK_ANON[0] = max(PEAK_ANON[0], status_mb("RssAnon"))
        time.sleep(0.1)


threading.Thread(target=sample_anonymous, daemon=True).start()

import numpy as np
from geocate.core.pipeline import estimate_cate
from geocate.core.study import UnitTable
data = np.load({path!r}, allow_pickle=False)
units = UnitTable(xy=data["xy"], crs_wkt=str(data["crs"]), treated=data["treated"].astype(float),
                  outcome=data["outcome"], covariates=data["covariates"], covariate_names=("assets", "distance"))
started, cpu = time.perf_counter(), time.process_time()
if {tree_units!r} is not None:
    import geocate.core.learners
    geocate.core.learners.TREE_UNITS = {tree_units!r}
study, result = estimate_cate(units, {raster!r}, seed=11, forest={forest!r})
wall = time.perf_counter() - started
cate = result.cate[study.used]
truth = data["true_cate"][study.used]
print(json.dumps({{"wall_s": wall, "cpu_s": time.process_time() - cpu,
                  "peak_rss_mb": peak_rss_mb(), "peak_anonymous_mb": PEAK_ANON[0],
                  "ran_on": result.metadata["ran_on"],
                  "timings": result.metadata["timings"], "n_used": int(study.n_used),
                  "rmse": float(np.sqrt(np.mean((cate - truth) ** 2))),
                  "test_t": result.heterogeneity.t_stat}}))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--forest", nargs="+", default=["folds"], choices=["folds", "out-of-bag"])
    parser.add_argument("--raster", default="demo",
                        help="'demo' (the demo crop), 'scene' (the shared data's full Landsat scene, for a million "
                             "units) or a raster's path")
    parser.add_argument("--tree-units", type=int, default=None,
                        help="the out-of-bag forest's largest tree (core.learners.TREE_UNITS), to see what the cap costs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    raster = {"demo": DEMO_RASTER, "scene": SCENE}.get(args.raster, args.raster)
    sys.path.insert(0, PLUGINS)
    from geocate.core.simulate import simulate_trial

    figures = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.sizes:
            started = time.perf_counter()
            trial = simulate_trial(raster, n_units=n, seed=11)
            path = os.path.join(folder, f"trial_{n}.npz")
            np.savez(path, xy=trial.coords, crs=trial.crs_wkt, treated=trial.treated, outcome=trial.outcome,
                     covariates=trial.covariates, true_cate=trial.true_cate)
            del trial
            simulated_s = time.perf_counter() - started
            for forest in args.forest:
                code = CHILD.format(plugins=PLUGINS, path=path, raster=raster, forest=forest, tree_units=args.tree_units)
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"estimate_cate failed at {n} units")
                row = dict(json.loads(done.stdout.strip().splitlines()[-1]), units=n, forest=forest,
                           raster=os.path.basename(raster), tree_units=args.tree_units,
                           simulate_s=round(simulated_s, 1))
                figures.append(row)
                print(json.dumps(row), flush=True)
    save_figures(args.json, figures)
    return figures


if __name__ == "__main__":
    main()

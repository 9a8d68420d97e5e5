"""Maps of effects over whole rasters (core.maps): throughput, memory, Dask, and effects where no trial ran.

    .venv/bin/python bench/bench_maps.py [--units 1000] [--seed 1] [--json docs/bench_maps.json]

On the bundled Landsat scene (../shared/data, 2041 x 1860 pixels), a
simulated trial (core.simulate.simulate_trial, 1000 units) placed in the
scene's western half only:

1. throughput: the whole map at stride = window = 33 px (the causal forest),
   in map cells and megapixels per second, against the bare featuriser (the
   same cells' windows read and embedded, nothing predicted or written), in
   one run;
2. effects where no trial ran: Spearman of the mapped CATE with the true
   effect of each cell (the trial's rule applied to the cell's window) over
   the eastern half, and the share of cells flagged outside the support there
   and in the west;
3. memory: peak allocations (tracemalloc) mapping the scene and a VRT mosaic
   of the scene repeated 20 x 20 times (9 GB if read whole) at a stride of
   330 px, in fresh processes;
4. Dask: the same map on a LocalCluster with 2 worker processes against the
   in-process map (largest absolute difference).
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
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))
sys.path.insert(0, HERE)
from bench_representations import SCENE, units_of  # noqa: E402


def west_trial(n_units, seed):
    """A trial on the scene's western half: units drawn over the scene, the first n_units in the west kept."""
    import dataclasses

    from osgeo import gdal

    from geocate.core.simulate import simulate_trial

    trial = simulate_trial(SCENE, 3 * n_units, seed=seed)
    gt = gdal.Open(SCENE).GetGeoTransform()
    middle = gt[0] + gdal.Open(SCENE).RasterXSize / 2 * gt[1]
    west = np.flatnonzero(trial.coords[:, 0] < middle)[:n_units]
    return dataclasses.replace(trial, coords=trial.coords[west], treated=trial.treated[west],
                               outcome=trial.outcome[west], covariates=trial.covariates[west],
                               true_cate=trial.true_cate[west], true_group=trial.true_group[west],
                               true_mu0=trial.true_mu0[west]), trial, middle


def cell_truth(spec, all_units_trial):
    """The true CATE of every map cell: simulate_trial's rule (quantile bins of z(brightness) + 0.5 z(texture),
    standardised and binned as over the trial's units) applied to the cell's window."""
    from geocate.core.patches import extract_patches
    from geocate.core.simulate import _window_statistics

    grid = spec.grid
    rows, cols = np.meshgrid(np.arange(grid.n_rows), np.arange(grid.n_cols), indexing="ij")
    cells = extract_patches(SCENE, grid.centres(rows.ravel(), cols.ravel()), grid.crs_wkt, None, grid.window)
    units = extract_patches(SCENE, all_units_trial.coords, grid.crs_wkt, None, grid.window)
    ub, ut = _window_statistics(units.patches)
    cb, ct = _window_statistics(cells.patches)
    score_units = (ub - ub.mean()) / ub.std() + 0.5 * (ut - ut.mean()) / ut.std()
    score_cells = (cb - ub.mean()) / ub.std() + 0.5 * (ct - ut.mean()) / ut.std()
    effects = np.array(sorted(set(all_units_trial.true_cate)))
    edges = np.quantile(score_units, np.linspace(0, 1, len(effects) + 1)[1:-1])
    truth = effects[np.searchsorted(edges, score_cells, side="right")]
    return truth.reshape(grid.n_rows, grid.n_cols), cells.ok.reshape(grid.n_rows, grid.n_cols)


def memory_child(raster, stride):
    import tracemalloc

    from geocate.core.maps import map_effects

    trial = west_trial(300, 3)[0]
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        summary = map_effects(units_of(trial), raster, os.path.join(folder, "m.tif"), seed=3, stride=stride,
                              n_estimators=40)[1]
        seconds = time.perf_counter() - started
    print(json.dumps({"peak_traced_mb": tracemalloc.get_traced_memory()[1] / 1e6, "cells": summary["cells"],
                      "seconds": seconds}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))
    from osgeo import gdal
    from scipy.stats import spearmanr

    from geocate.core.maps import SUPPORT_THRESHOLD, map_effects, run_map
    from geocate.core.represent import WindowSource

    out = {"machine": f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"), "units": args.units}
    trial, everyone, middle = west_trial(args.units, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "map.tif")
        started = time.perf_counter()
        study, summary, _, spec = map_effects(units_of(trial), SCENE, path, seed=args.seed)
        total = time.perf_counter() - started
        # The map alone (fitting excluded): run_map again with the fitted spec.
        started = time.perf_counter()
        run_map(spec, os.path.join(folder, "again.tif"))
        map_seconds = time.perf_counter() - started
        grid = spec.grid
        rows, cols = np.meshgrid(np.arange(grid.n_rows), np.arange(grid.n_cols), indexing="ij")
        centres = grid.centres(rows.ravel(), cols.ravel())
        started = time.perf_counter()
        for start in range(0, len(centres), 1024):   # the bare featuriser: read and embed, tile by tile
            views, _, ok, _ = WindowSource(SCENE, centres[start:start + 1024], grid.crs_wkt, None, 33).read()
            spec.pipeline.transform(views, np.flatnonzero(ok))
        bare_seconds = time.perf_counter() - started
        cells = grid.n_rows * grid.n_cols
        megapixels = cells * grid.stride ** 2 / 1e6
        out["throughput"] = {"cells": cells, "map_s": map_seconds, "bare_featuriser_s": bare_seconds,
                             "cells_per_s": cells / map_seconds, "megapixels_per_s": megapixels / map_seconds,
                             "bare_cells_per_s": cells / bare_seconds, "ratio_to_bare": bare_seconds / map_seconds,
                             "fit_and_map_s": total}
        print(f"throughput: {cells} cells ({megapixels:.1f} Mpx) mapped in {map_seconds:.1f} s: "
              f"{cells / map_seconds:.0f} cells/s, {megapixels / map_seconds:.2f} Mpx/s; the bare featuriser "
              f"{cells / bare_seconds:.0f} cells/s: the map runs at {bare_seconds / map_seconds:.0%} of it "
              f"(fit and map {total:.1f} s)")
        values = gdal.Open(path).ReadAsArray()
        truth, usable = cell_truth(spec, everyone)
        xs = grid.centres(rows.ravel(), cols.ravel())[:, 0].reshape(grid.n_rows, grid.n_cols)
        east, west = usable & (xs > middle) & (values[0] != -9999), usable & (xs < middle) & (values[0] != -9999)
        out["where_no_trial_ran"] = {
            "spearman_east": float(spearmanr(values[0][east], truth[east]).correlation),
            "spearman_west": float(spearmanr(values[0][west], truth[west]).correlation),
            "outside_support_east": float(np.mean(values[2][east] > SUPPORT_THRESHOLD)),
            "outside_support_west": float(np.mean(values[2][west] > SUPPORT_THRESHOLD)),
            "share_outside_support": summary["share_outside_support"]}
        row = out["where_no_trial_ran"]
        print(f"effects where no trial ran: Spearman with the true effect {row['spearman_east']:.3f} in the east "
              f"(no units), {row['spearman_west']:.3f} in the west (the trial's half); outside the support: "
              f"{row['outside_support_east']:.0%} of eastern cells, {row['outside_support_west']:.0%} of western")
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            started = time.perf_counter()
            run_map(spec, os.path.join(folder, "dask.tif"), scheduler=client, tile_cells=16)
            dask_seconds = time.perf_counter() - started
        difference = float(np.abs(gdal.Open(os.path.join(folder, "dask.tif")).ReadAsArray() - values).max())
        out["dask"] = {"workers": 2, "seconds": dask_seconds, "max_abs_difference": difference}
        print(f"dask: LocalCluster of 2 workers {dask_seconds:.1f} s; largest difference from in-process {difference}")
        from geocate.core.simulate import repeat_mosaic

        big = repeat_mosaic(SCENE, folder)
        memory = {}
        for name, raster in (("scene", SCENE), ("mosaic 20 x 20", big)):
            line = subprocess.run([sys.executable, __file__, "--memory-child", raster, "330"], capture_output=True,
                                  text=True, check=True).stdout
            memory[name] = json.loads(line.strip().splitlines()[-1])
        out["memory"] = memory
        print(f"memory: stride 330 px: peak allocations {memory['scene']['peak_traced_mb']:.0f} MB for the scene "
              f"({memory['scene']['cells']} cells), {memory['mosaic 20 x 20']['peak_traced_mb']:.0f} MB for the "
              f"20 x 20 mosaic ({memory['mosaic 20 x 20']['cells']} cells, "
              f"{memory['mosaic 20 x 20']['seconds']:.0f} s; 9 GB if read whole)")
    save_figures(args.json, out)


if __name__ == "__main__":
    main()

"""What the honest default (spatial blocks chosen from the data, -1) does to the figures, measured in one process.

Usage: python bench/bench_blocks.py [--json out.json]

On the demo study (1212 villages, 1176 used: windows of 98 % of them overlap a neighbour's) and on two simulated
trials of 3000 units on the demo imagery (seeds 11 and 12), estimatecate's core runs twice: with no blocks (the
previous default, 0) and with automatic blocks (-1: the outcome's correlation range, at least the window's
footprint, shrunk until each fold keeps 10 groups). Printed per design: block size and groups, ATE and its SE,
the held-out AUTOC of the sequential test with its SE and p-value, Spearman and RMSE against the true CATE. The
efficiency of the held-out AUTOC is (SE without blocks / SE with blocks)^2: the share of the information the
honest split keeps (the split without blocks partly learns a unit from its neighbours' outcomes, so its larger
AUTOC is not all real).
"""

import argparse
import os
import sys
import tempfile

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))
DEMO_RASTER = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")


def demo_units():
    from osgeo import ogr

    from geocate.core.demo import build
    from geocate.core.study import UnitTable

    path = os.path.join(tempfile.mkdtemp(prefix="geocate-bench-"), "units.gpkg")
    build(path)
    dataset = ogr.Open(path)
    layer = dataset.GetLayer()
    rows = [(f.GetGeometryRef().GetX(), f.GetGeometryRef().GetY(), f["treated"], f["outcome"], f["assets"],
             f["distance"], f["true_cate"]) for f in layer]
    wkt = layer.GetSpatialRef().ExportToWkt()
    a = np.array([[np.nan if v is None else v for v in r] for r in rows], float)
    return UnitTable(xy=a[:, :2], crs_wkt=wkt, treated=a[:, 2], outcome=a[:, 3], covariates=a[:, 4:6],
                     covariate_names=("assets", "distance")), a[:, 6]


def trial_units(seed, n_units=3000):
    from geocate.core.simulate import simulate_trial
    from geocate.core.study import UnitTable

    trial = simulate_trial(DEMO_RASTER, n_units=n_units, seed=seed)
    return UnitTable(xy=trial.coords, crs_wkt=trial.crs_wkt, treated=trial.treated, outcome=trial.outcome,
                     covariates=trial.covariates, covariate_names=("c1", "c2")), trial.true_cate


def measure(units, truth, block):
    from scipy.stats import spearmanr

    from geocate.core.pipeline import estimate_cate

    _, result = estimate_cate(units, DEMO_RASTER, window_size_px=33, seed=42, spatial_block=block)
    used = np.isfinite(result.cate) & np.isfinite(truth)
    test = result.heterogeneity
    return {"block_m": result.metadata["spatial_block_m"], "groups": result.metadata["fold_groups"],
            "ate": result.ate, "ate_se": result.ate_se, "autoc": test.estimate, "autoc_se": test.std_err,
            "p": test.p_value, "spearman": float(spearmanr(result.cate[used], truth[used]).correlation),
            "rmse": float(np.sqrt(np.mean((result.cate[used] - truth[used]) ** 2))),
            "warnings": result.metadata["warnings"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    designs = {"demo (1212 villages)": demo_units(), "trial 3000, seed 11": trial_units(11),
               "trial 3000, seed 12": trial_units(12)}
    out = {}
    print("| design | blocks | block (m) | groups | ATE (SE) | held-out AUTOC (SE), p | Spearman | RMSE |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (units, truth) in designs.items():
        rows = {label: measure(units, truth, block) for label, block in (("none (0)", 0), ("auto (-1)", -1))}
        for label, r in rows.items():
            print(f"| {name} | {label} | {r['block_m'] or 0:,.0f} | {r['groups']} | {r['ate']:.3f} ({r['ate_se']:.3f}) "
                  f"| {r['autoc']:.3f} ({r['autoc_se']:.3f}), {r['p']:.2g} | {r['spearman']:.3f} | {r['rmse']:.3f} |",
                  flush=True)
        efficiency = (rows["none (0)"]["autoc_se"] / rows["auto (-1)"]["autoc_se"]) ** 2
        print(f"|  | efficiency of the held-out AUTOC (SE ratio squared) | | | | {efficiency:.2f} | | |", flush=True)
        out[name] = dict(rows, efficiency=efficiency)
    save_figures(args.json, out)


if __name__ == "__main__":
    main()

"""Cluster-randomized null trials: does the heterogeneity test keep its level with few clusters per fold (issue 25)?

Usage: .venv/bin/python bench/bench_clustered.py [--villages 40,60,120] [--sds 0.3,0.7] [--draws 200]
       [--units 1000] [--spatial-block -1] [--json out.json]

Each draw: --units units placed on the demo raster (core.simulate.simulate_trial, one effect, 1.0, for every unit:
no heterogeneity), grouped into V villages (each unit to the nearest of V random unit places), half of the
villages treated (cluster randomization), outcome = the image-driven baseline + a village effect N(0, sd^2) + 1.0 W
+ N(0, 1) noise. estimate_cate with CLUSTER = village and the automatic spatial blocks (the dialog's default).
Reported per design: the share of draws where the heterogeneity test rejects at 5 % (goal <= 6.5 %), the ATE
interval's coverage of 1.0 (goal >= 0.93), clusters per held-out fold, and the test as it was before issue 25's
change (the half-sample bootstrap alone, the fold t-statistics taken as normal), recomputed from the same draws.
Seeded: draw d uses seed d. The full run (6 designs x 200 draws, 1000 units) takes about an hour on 2 cores.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from bench_common import save_figures

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEMO_RASTER = os.path.join(ROOT, "resources", "demo", "landsat8_demo_b234.tif")
sys.path.insert(0, os.path.join(ROOT, ".qgis-profile", "profiles", "default", "python", "plugins"))


def clustered_trial(n_units, n_villages, sd, seed):
    """A cluster-randomized null trial: (UnitTable, village of each unit)."""
    from geocate.core.simulate import simulate_trial
    from geocate.core.study import UnitTable

    rng = np.random.default_rng(seed)
    trial = simulate_trial(DEMO_RASTER, n_units=n_units, effects=(1.0,), seed=seed)
    centres = trial.coords[rng.choice(n_units, n_villages, replace=False)]
    village = np.argmin(((trial.coords[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    treated_village = rng.permutation(n_villages) < n_villages // 2
    W = treated_village[village].astype(float)
    Y = trial.true_mu0 + rng.normal(0, sd, n_villages)[village] + 1.0 * W + rng.standard_normal(n_units)
    units = UnitTable(trial.coords, trial.crs_wkt, W, Y, trial.covariates, tuple(trial.covariate_names),
                      clusters=np.array([f"village {v}" for v in village], dtype=object))
    return units, village, trial.window_size_px


def one_draw(n_units, n_villages, sd, seed, spatial_block):
    from scipy.stats import norm

    from geocate.core.pipeline import estimate_cate

    units, village, window = clustered_trial(n_units, n_villages, sd, seed)
    started = time.perf_counter()
    study, result = estimate_cate(units, DEMO_RASTER, window_size_px=window, seed=seed, spatial_block=spatial_block)
    test = result.heterogeneity
    folds = result.fold[study.used]
    villages = village[study.used]
    before = [rate.estimate / np.std(rate.draws, ddof=1) for rate in test.folds]   # the bootstrap's SE alone
    t_before = float(np.sum(before) / np.sqrt(len(before)))
    return {"seed": seed, "p": test.p_value, "t": test.t_stat, "p_before": float(norm.sf(t_before)),
            "t_before": t_before, "ate": result.ate, "ate_se": result.ate_se,
            "covers": bool(abs(result.ate - 1.0) <= 1.959964 * result.ate_se),
            "villages_per_fold": [int(len(np.unique(villages[folds == k]))) for k in np.unique(folds)],
            "fold_groups": result.metadata["fold_groups"],
            "warned": any("clusters" in w and "held-out fold" in w for w in result.metadata["warnings"]),
            "seconds": round(time.perf_counter() - started, 2)}


def rate(hits, reps):
    p = hits / reps if reps else float("nan")
    return {"rate": round(p, 4), "hits": int(hits), "reps": int(reps),
            "mc_se": round(float(np.sqrt(p * (1 - p) / reps)), 4) if reps else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--villages", default="40,60,120")
    parser.add_argument("--sds", default="0.3,0.7")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--units", type=int, default=1000)
    parser.add_argument("--spatial-block", type=float, default=-1)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = {"units": args.units, "draws": args.draws, "spatial_block": args.spatial_block, "designs": {}}
    for villages in (int(v) for v in args.villages.split(",")):
        for sd in (float(s) for s in args.sds.split(",")):
            rows = [one_draw(args.units, villages, sd, seed, args.spatial_block)
                    for seed in range(args.first_seed, args.first_seed + args.draws)]
            for row in rows[-3:]:
                print(json.dumps(row), flush=True)
            summary = {"rejects_at_5": rate(sum(r["p"] < 0.05 for r in rows), len(rows)),
                       "rejects_at_5_before": rate(sum(r["p_before"] < 0.05 for r in rows), len(rows)),
                       "ate_coverage": rate(sum(r["covers"] for r in rows), len(rows)),
                       "sd_of_t": float(np.std([r["t"] for r in rows], ddof=1)),
                       "sd_of_t_before": float(np.std([r["t_before"] for r in rows], ddof=1)),
                       "villages_per_fold_min": min(min(r["villages_per_fold"]) for r in rows),
                       "villages_per_fold_mean": float(np.mean([np.mean(r["villages_per_fold"]) for r in rows])),
                       "warned": rate(sum(r["warned"] for r in rows), len(rows)),
                       "seconds_per_draw": float(np.mean([r["seconds"] for r in rows])),
                       "draws": [{k: r[k] for k in ("seed", "p", "t", "ate", "ate_se", "covers")} for r in rows]}
            results["designs"][f"{villages} villages, sd {sd}"] = summary
            print(f"{villages} villages, sd {sd}: {json.dumps(summary)}", flush=True)
            save_figures(args.json, results, started)   # after each design: a long run leaves what it measured
    save_figures(args.json, results, started)
    print(f"total {results['seconds']} s", flush=True)


if __name__ == "__main__":
    main()

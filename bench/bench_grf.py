"""GeoCATE's out-of-bag forest beside grf (R) on the same features, at comparable wall time (issue 26).

Usage: python bench/bench_grf.py [--units 3000] [--trees 200 400 1000] [--grf-trees 500 2000] [--rlib /tmp/Rlib]
                                 [--json out.json]

Needs ``Rscript`` with the grf package (``--rlib``: a library folder to add to R's paths). R is not a GeoCATE
dependency: this bench is a cross-check only. CRAN is not reachable from the development machines, so grf is built
there from its GitHub source: grf 2.6.1 (tag v2.6.1), ``r-package/grf`` copied with its symbolic links resolved
(``cp -rL``), DiceKriging (used only by its parameter tuning, not used here) dropped from DESCRIPTION's Imports,
``CXX_STD = CXX17`` added to ``src/Makevars`` (R 4.2 compiles C++14 by default), then
``R CMD INSTALL --library=/tmp/Rlib`` with Debian's r-base-dev, r-cran-rcpp, r-cran-rcppeigen, r-cran-lmtest,
r-cran-sandwich and r-cran-matrix (3 minutes on one core).

The designs are bench_forest.py's (3000 units of the demo imagery, 512 image features + 2 covariates: three
trials, a smooth effect surface, one discontinuity). On each, with the same effect modifiers (the standardised
features and covariates):

* GeoCATE's out-of-bag forest (``GroupBaggedCausalForest``: its cross-fitted outcome models, then the forest,
  out-of-bag effects and their variance, calibration), with each number of trees in --trees;
* grf's ``causal_forest`` as its users run it (its own regression forests for Y.hat and W.hat), with each number
  of trees in --grf-trees;
* grf's ``causal_forest`` given GeoCATE's nuisances (Y.hat = GeoCATE's cross-fitted m(x), W.hat = the treated
  share, as in a trial), so that only the forests differ.

Wall time is the whole of each fit with its out-of-bag predictions and variances, 2 threads each (R's time is
measured inside R, so R's start and the data's transfer are not counted). Per-unit coverage of the 95 % interval,
its mean width, RMSE and Spearman against the true effects.
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
from bench_common import save_figures
from bench_forest import designs, measure

R_SCRIPT = r"""
args <- commandArgs(trailingOnly = TRUE)
folder <- args[1]
if (nchar(args[2]) > 0) .libPaths(c(args[2], .libPaths()))
suppressPackageStartupMessages(library(grf))
shape <- scan(file.path(folder, "shape.txt"), quiet = TRUE)
n <- shape[1]; p <- shape[2]
X <- matrix(readBin(file.path(folder, "X.bin"), "double", n * p), nrow = n, byrow = TRUE)
Y <- readBin(file.path(folder, "Y.bin"), "double", n)
W <- readBin(file.path(folder, "W.bin"), "double", n)
Yhat <- readBin(file.path(folder, "Yhat.bin"), "double", n)
What <- readBin(file.path(folder, "What.bin"), "double", n)
out <- list(version = as.character(packageVersion("grf")))
for (trees in as.integer(strsplit(args[3], ",")[[1]])) {
  for (nuisances in c("grf", "geocate")) {
    started <- proc.time()[["elapsed"]]
    if (nuisances == "grf") {
      forest <- causal_forest(X, Y, W, num.trees = trees, num.threads = 2, seed = 11)
    } else {
      forest <- causal_forest(X, Y, W, Y.hat = Yhat, W.hat = What, num.trees = trees, num.threads = 2, seed = 11)
    }
    predicted <- predict(forest, estimate.variance = TRUE, num.threads = 2)
    seconds <- proc.time()[["elapsed"]] - started
    out[[paste(nuisances, trees, sep = "_")]] <- list(
      seconds = seconds, tau = predicted$predictions, variance = predicted$variance.estimates)
  }
}
for (name in names(out)[-1]) {
  writeBin(as.double(c(out[[name]]$seconds, out[[name]]$tau, out[[name]]$variance)),
           file.path(folder, paste0(name, ".bin")))
}
writeLines(out$version, file.path(folder, "version.txt"))
"""


def run_grf(design, Y, W, y_hat, w_hat, trees, rlib):
    """{(nuisances, trees): (seconds, tau, variance)} from grf, and its version."""
    folder = tempfile.mkdtemp(prefix="bench_grf_")
    try:
        n, p = design.shape
        np.savetxt(os.path.join(folder, "shape.txt"), [n, p], fmt="%d")
        for name, values in (("X", design), ("Y", Y), ("W", W), ("Yhat", y_hat), ("What", w_hat)):
            np.ascontiguousarray(values, dtype="<f8").tofile(os.path.join(folder, f"{name}.bin"))
        script = os.path.join(folder, "run.R")
        with open(script, "w") as handle:
            handle.write(R_SCRIPT)
        done = subprocess.run(["Rscript", script, folder, rlib or "", ",".join(str(t) for t in trees)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"grf failed:\n{done.stderr[-3000:]}")
        results = {}
        for nuisances in ("grf", "geocate"):
            for t in trees:
                values = np.fromfile(os.path.join(folder, f"{nuisances}_{t}.bin"), dtype="<f8")
                results[(nuisances, t)] = (float(values[0]), values[1:n + 1], values[n + 1:])
        with open(os.path.join(folder, "version.txt")) as handle:
            version = handle.read().strip()
        return results, version
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def grf_measure(tau, variance, truth, seconds):
    from scipy.stats import spearmanr

    se = np.sqrt(np.maximum(variance, 0))
    covered = (tau - 1.959964 * se <= truth) & (truth <= tau + 1.959964 * se)
    return {"coverage": round(float(covered.mean()), 3), "mean_width": round(float(np.mean(2 * 1.959964 * se)), 3),
            "rmse": round(float(np.sqrt(np.mean((tau - truth) ** 2))), 4),
            "spearman": round(float(spearmanr(tau, truth).correlation), 4), "forest_seconds": round(seconds, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=3000)
    parser.add_argument("--trees", type=int, nargs="+", default=[200, 400, 1000])
    parser.add_argument("--grf-trees", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--rlib", default=None, help="an R library folder holding grf")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if shutil.which("Rscript") is None:
        raise SystemExit("Rscript was not found: install R and grf (see this script's docstring).")

    from geocate.core.learners import GroupBaggedCausalForest, default_learner

    figures = {}
    for name, features, covariates, W, Y, truth in designs(args.units):
        design, inputs, _ = default_learner(features, covariates, seed=11)
        rows = {}
        model = None
        for trees in args.trees:
            model = GroupBaggedCausalForest(n_estimators=trees, seed=11)
            started = time.perf_counter()
            model.fit(Y, W, design, outcome_inputs=inputs)
            rows[f"GeoCATE out-of-bag forest, {trees} trees"] = measure(model, truth, time.perf_counter() - started)
        grf, version = run_grf(design, Y, W, model.outcome_hat_, np.full(len(Y), float(np.mean(W))),
                               args.grf_trees, args.rlib)
        for (nuisances, trees), (seconds, tau, variance) in grf.items():
            label = (f"grf {version} causal_forest, {trees} trees, " +
                     ("its own nuisance forests" if nuisances == "grf" else "GeoCATE's nuisances"))
            rows[label] = grf_measure(tau, variance, truth, seconds)
        figures[name] = rows
        for label, row in rows.items():
            print(json.dumps({"design": name, "method": label, **row}), flush=True)
    save_figures(args.json, figures)
    return figures


if __name__ == "__main__":
    main()

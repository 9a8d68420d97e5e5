"""Issue 23, point 1 (an experiment, not GeoCATE's method): a propensity model fitted on the image windows.

Usage: python bench/bench_window_propensity.py [--reps 14] [--epochs 150] [--json out.json]

The scene design of bench_observational.py (600 units of the bundled scene; treatment and outcome both rise with
what the window shows; true ATE 1), each draw's propensity from: GeoCATE's model (cross-fitted penalised
logistic regression on every image feature and the covariates), a small convolutional network on the scaled
windows (two convolutions, mean and standard deviation pooling, cross-fitted on 5 folds; as causalimages fits its
image propensity), and the average of the two logits. The same outcome models for all (adjusted_effects). Prints
the running mean of AIPW's error, the correlation of each fitted logit with the true one, and the bias and
coverage of every estimator.
"""

import argparse
import json
import time

import numpy as np
from bench_common import save_figures
from bench_observational import DEMO_RASTER, record, summarise


def window_propensity(windows, treated, folds, seed, epochs):
    """P(treated | window) from a small CNN, cross-fitted over ``folds`` (held-out predictions), clipped."""
    import torch

    from geocate.core.crossfit import crossfit
    from geocate.core.design import CLIP

    images = torch.as_tensor(windows, dtype=torch.float32)

    def fit_predict(train, test):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(windows.shape[1], 8, 3), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU())
        head = torch.nn.Linear(32, 1)
        optimiser = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=1e-2, weight_decay=1e-3)

        def logit(x):
            h = net(x).flatten(2)
            return head(torch.cat([h.mean(2), h.std(2)], 1)).squeeze(1)

        target = torch.as_tensor(treated[train], dtype=torch.float32)
        for _ in range(epochs):
            optimiser.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(logit(images[train]), target).backward()
            optimiser.step()
        with torch.no_grad():
            return torch.sigmoid(logit(images[test])).numpy()

    return np.clip(crossfit(fit_predict, folds), CLIP, 1 - CLIP)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=14)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from geocate.core.crossfit import location_folds
    from geocate.core.design import CLIP, StudyDesign
    from geocate.core.embed import BandScaler, RandomConvFeatures
    from geocate.core.inputs import outcome_inputs, propensity_inputs
    from geocate.core.observational import adjusted_effects
    from geocate.core.patches import extract_patches
    from geocate.core.simulate import confound, simulate_trial

    started = time.perf_counter()
    trial = simulate_trial(DEMO_RASTER, n_units=600, seed=7)
    patches = extract_patches(DEMO_RASTER, trial.coords, trial.crs_wkt, window_size_px=33).patches
    scaled = BandScaler(seed=7).fit(patches).transform(patches)
    features = np.log1p(RandomConvFeatures(seed=7).fit(scaled).transform(scaled))
    inputs = outcome_inputs(features, trial.covariates, seed=7)
    every_feature = propensity_inputs(features, trial.covariates)

    def logit(p):
        p = np.clip(p, CLIP, 1 - CLIP)
        return np.log(p / (1 - p))

    models = ("logistic on the features", "CNN on the windows", "average of the two logits")
    errors, covered, correlation = {m: {} for m in models}, {m: {} for m in models}, {m: [] for m in models}
    for rep in range(args.reps):
        treated, outcome, truth = confound(trial, seed=rep)
        logistic = StudyDesign("observational", seed=rep).propensities(treated, every_feature)[0][:, 1]
        cnn = window_propensity(scaled, treated, location_folds(np.arange(len(treated)), 5, rep), rep, args.epochs)
        both = 1 / (1 + np.exp(-(logit(logistic) + logit(cnn)) / 2))
        for model, p in zip(models, (logistic, cnn, both)):
            record(adjusted_effects(outcome, treated, np.column_stack([1 - p, p]), inputs), 1.0, errors[model],
                   covered[model])
            correlation[model].append(float(np.corrcoef(logit(p), logit(truth))[0, 1]))
        print(rep, {m: round(float(np.mean(errors[m]["AIPW"])), 3) for m in models}, flush=True)
    figures = {m: dict(summarise(errors[m], covered[m]), logit_correlation=round(float(np.mean(correlation[m])), 3))
               for m in models}
    print(json.dumps(figures, indent=1))
    save_figures(args.json, figures, started)


if __name__ == "__main__":
    main()

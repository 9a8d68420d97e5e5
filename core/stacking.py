"""Stacked nuisance models for observational studies (issue 23, point 1): a super learner per training fold.

A super learner (van der Laan, Polley & Hubbard 2007) predicts with a combination of several learners whose
weights are chosen by cross-validated loss. Inside cross-fitting the weights must be chosen without the held-out
fold, so for each fold k they are chosen on **inner out-of-fold predictions of fold k's training units**: each
other fold j is predicted by a model fitted on the folds other than j and k (core.crossfit.nested_crossfit). The models on
every pair's complement are shared by the two folds of the pair, so F folds cost F (F - 1) / 2 inner fits and F
outer fits per learner, instead of F (F - 1) + F.

- **Propensity** (stacked_propensities): the learners' log-probabilities are combined with non-negative weights
  and one intercept per arm, then a softmax: for two arms, a logistic regression of the arm on the learners'
  logits with non-negative slopes, which calibrates the combination as Platt scaling would. The weights
  minimise the log-loss of the inner predictions (scipy's L-BFGS-B). scikit-learn's StackingClassifier does
  the same with an unconstrained meta-learner on the whole training set's inner predictions; here the
  slopes are kept non-negative (a learner is used or not, never reversed) and the inner predictions never
  include the held-out fold.
- **Outcome models** (stacked_arm_models): for each arm, non-negative least squares of the arm's outcomes on
  the learners' inner predictions, normalised to sum to 1 (SuperLearner's NNLS method).

Learners (nuisance_learners): the penalised logistic regression on every image feature and the spline ridge on
the components (GeoCATE's models, core.design and core.scores), gradient boosting on the components and
covariates (scikit-learn's HistGradientBoosting), and, when asked, a small convolutional network on the windows
themselves (as causalimages fits its image propensity model; torch), for the propensity and for each arm's outcome. The run record names
each fold's weights and the learner with the largest.
"""

import numpy as np

from .crossfit import Folds, nested_crossfit
from .errors import GeoCateError

#: The nuisance models an observational estimate can use: GeoCATE's single models, their stack with gradient
#: boosting, and that stack with a network on the windows (for the propensity and each arm's outcome).
NUISANCE_CHOICES = ("penalised", "stacked", "stacked with windows")
#: The network on the windows trains on all of a fold's windows at once: above this many units, refused.
WINDOW_NETWORK_UNITS = 20000
#: Its full-batch steps of Adam.
WINDOW_EPOCHS = 150


def fit_learners(learners, fold, is_cancelled=None, progress=None):
    """nested_crossfit of every learner ({name: fit_predict}): ({name: outer}, {name: inner}); ``progress(fraction,
    message)`` over all of them."""
    outer, inner = {}, {}
    for i, name in enumerate(learners):
        tick = None if progress is None else \
            (lambda d, t, i=i, name=name: progress((i + d / t) / len(learners), f"Stacked models: {name}"))
        outer[name], inner[name] = nested_crossfit(learners[name], fold, is_cancelled, tick)
    return outer, inner


def _log(p):
    return np.log(np.clip(p, 1e-6, 1.0))


def propensity_weights(predictions, index):
    """Non-negative weights w (one per learner) and intercepts b (one per arm, the first 0) minimising the
    log-loss of softmax(sum_l w_l log p_l + b) for arms ``index``; ``predictions`` a list of (n, A)
    probabilities. Returns (w, b)."""
    from scipy.optimize import minimize

    logs = np.stack([_log(p) for p in predictions])          # (L, n, A)
    L, A = logs.shape[0], logs.shape[2]
    onehot = np.eye(A)[index]
    start = np.concatenate([np.full(L, 1.0 / L), np.zeros(A - 1)])
    fit = minimize(stack_log_loss, start, args=(logs, onehot), jac=True, method="L-BFGS-B",
                   bounds=[(0, None)] * L + [(None, None)] * (A - 1))
    return fit.x[:L], np.concatenate([[0.0], fit.x[L:]])


def stack_log_loss(theta, logs, onehot):
    """The mean log-loss of softmax(sum_l w_l logs_l + b) against ``onehot`` (n, A) arms, and its gradient;
    theta = (w (L,), b_1..b_{A-1}), logs (L, n, A) the learners' log-probabilities."""
    L, n = logs.shape[:2]
    w, b = theta[:L], np.concatenate([[0.0], theta[L:]])
    z = np.tensordot(w, logs, axes=1) + b
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    grad_z = (np.exp(logp) - onehot) / n
    return -np.sum(onehot * logp) / n, np.concatenate([np.einsum("lna,na->l", logs, grad_z), grad_z.sum(axis=0)[1:]])


def combine_propensities(predictions, w, b):
    z = np.tensordot(w, np.stack([_log(p) for p in predictions]), axes=1) + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def outcome_weights(predictions, y):
    """Non-negative least squares weights of ``y`` on the learners' ``predictions`` (a list of (n,)), summing to 1
    (equal weights when every weight is 0)."""
    from scipy.optimize import nnls

    w = nnls(np.column_stack(predictions), np.asarray(y, float))[0]
    return w / w.sum() if w.sum() > 0 else np.full(len(predictions), 1.0 / len(predictions))


def _fold_id(k):
    """A fold id as the run record (JSON) holds it."""
    return int(k) if np.issubdtype(type(k), np.integer) else str(k)


def _fold_record(names, folds_ids, weights, extra=None):
    rows = []
    for j, k in enumerate(folds_ids):
        w = np.asarray(weights[j], float)
        share = w / w.sum() if w.sum() > 0 else w
        row = {"fold": _fold_id(k),
               "weights": {name: round(float(v), 4) for name, v in zip(names, share)},
               "winner": names[int(np.argmax(w))] if w.sum() > 0 else "none (every weight 0: the intercept alone)"}
        if extra is not None:
            row.update(extra[j])
        rows.append(row)
    return rows


def stacked_propensities(arms, learners, folds, is_cancelled=None, progress=None):
    """(n, A) cross-fitted propensities from the stack of ``learners`` ({name: fit_predict(train, test) -> (n_test,
    A) probabilities}), and a fit record: for each fold the learners' weights (shares of the slopes' sum; all 0
    when no learner beats the arms' shares, as in a randomized trial), the slopes' sum ("scale": 1 is the
    learners' own spread; below 1 shrinks it), and the learner with the largest weight. Every unit's propensity comes from learners and weights fitted without its fold."""
    from .design import calibration

    levels, index = np.unique(np.asarray(arms), return_inverse=True)
    names = list(learners)
    walk = Folds(folds)
    for _, train, _ in walk.split():
        if len(np.unique(index[train])) < len(levels):
            raise GeoCateError("A cross-fitting fold holds no unit of some treatment arm.",
                               "Use more units, or fewer arms.")
    outer, inner = fit_learners(learners, walk.fold, is_cancelled, progress)
    out = np.empty_like(outer[names[0]])
    weights, extra = [], []
    for k, train, test in walk.split():
        w, b = propensity_weights([inner[name][k][train] for name in names], index[train])
        out[test] = combine_propensities([outer[name][test] for name in names], w, b)
        weights.append(w)
        extra.append({"scale": round(float(w.sum()), 4)})
    record = {"model": "stacked: " + ", ".join(names) + " (weights by inner cross-validated log-loss in each "
                       "training fold, non-negative, with an intercept: calibrated)",
              "stack": _fold_record(names, walk.ids, weights, extra),
              "learners": {name: calibration(index, np.clip(outer[name], 1e-12, 1)) for name in names},
              **calibration(index, out)}
    return out, record


def stacked_arm_models(outcome, arm_index, n_arms, learners, folds, is_cancelled=None, progress=None):
    """(n, A) cross-fitted E[Y | X, arm a] from the stack of ``learners`` ({name: fit_predict(train, test) ->
    (n_test, A)}, each fitting every arm on the training units), weights per arm by non-negative least squares on
    the inner predictions of the arm's training units; and a record (each fold's weights per arm)."""
    Y = np.asarray(outcome, float)
    arm_index = np.asarray(arm_index)
    names = list(learners)
    walk = Folds(folds)
    outer, inner = fit_learners(learners, walk.fold, is_cancelled, progress)
    mu = np.empty((len(Y), n_arms))
    rows = []
    for k, train, test in walk.split():
        per_arm = {}
        for a in range(n_arms):
            own = train & (arm_index == a)
            w = outcome_weights([inner[name][k][own, a] for name in names], Y[own])
            mu[test, a] = sum(w_l * outer[name][test, a] for w_l, name in zip(w, names))
            per_arm[str(a)] = {name: round(float(v), 4) for name, v in zip(names, w)}
        rows.append({"fold": _fold_id(k), "weights_by_arm": per_arm})
    return mu, {"model": "stacked: " + ", ".join(names) + " (weights per arm by non-negative least squares on "
                                                          "inner cross-validated predictions in each training fold)",
                "stack": rows}


def boosting_classifier(seed):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20,
                                          l2_regularization=1.0, early_stopping=False, random_state=seed)


def boosting_regressor(seed):
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(max_iter=150, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20,
                                         l2_regularization=1.0, early_stopping=False, random_state=seed)


def _probabilities(model, X_test, k):
    """(n_test, k) probabilities, with columns for arms the training units lacked (as 0)."""
    p = model.predict_proba(X_test)
    out = np.zeros((len(X_test), k))
    out[:, np.asarray(model.classes_, int)] = p
    return out


def _window_network(images, outputs, seed, epochs, loss, train, extra=None):
    """A small convolutional network fitted on ``images[train]`` (a tensor, (n, bands, rows, columns), on the device
    the network is to run on): two 3 x 3 convolutions (8 and 16 channels, the second with stride 2), each channel's
    mean and standard deviation over the window, beside the units' ``extra`` inputs (a tensor (n, q) on the same
    device, e.g. covariates, or None), a linear layer to ``outputs``; ``epochs`` full-batch steps of Adam (learning
    rate 0.01, weight decay 1e-3) on ``loss(output, rows)``. The initial weights are drawn on the CPU from ``seed``
    and moved to the images' device, so a GPU starts from the same network. Returns the network as a function of
    unit indices (without gradients; its output on the CPU)."""
    import torch

    device = images.device
    with torch.random.fork_rng():          # the initial weights from ``seed``, torch's own stream left as it was
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(images.shape[1], 8, 3), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU())
        head = torch.nn.Linear(32 + (0 if extra is None else extra.shape[1]), outputs)
    net, head = net.to(device), head.to(device)
    optimiser = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=1e-2, weight_decay=1e-3)

    def forward(units):
        h = net(images[units]).flatten(2)
        return head(torch.cat([h.mean(2), h.std(2)] + ([] if extra is None else [extra[units]]), 1))

    rows = torch.as_tensor(np.flatnonzero(train), device=device)
    # On a GPU: deterministic convolutions without TF32, so that a seed gives the same network on the same device.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        try:
            for _ in range(epochs):
                optimiser.zero_grad()
                loss(forward(rows), rows).backward()
                optimiser.step()
        except torch.cuda.OutOfMemoryError:
            raise GeoCateError(f"The GPU ran out of memory training the network on {len(rows):,} windows "
                               "(NUISANCE = stacked with windows).",
                               "Use NUISANCE = stacked, fewer units or smaller windows, or run on the CPU "
                               "(start QGIS with CUDA_VISIBLE_DEVICES set to an empty value).") from None

    def predict(units):
        with torch.no_grad():
            return forward(torch.as_tensor(np.asarray(units, int).ravel(), device=device)).cpu()
    return predict


def _images(windows, device):
    """The windows as a float32 tensor on ``device``: an array is copied there once, a tensor already there is used
    as it is (nuisance_learners gives both networks one copy)."""
    import torch

    if not torch.is_tensor(windows):
        windows = torch.as_tensor(np.asarray(windows, np.float32))
    return windows.to(device=device, dtype=torch.float32)


def window_network_propensity(windows, index, k, seed, epochs=None, device="cpu"):
    """fit_predict for P(arm | window) from _window_network on the scaled ``windows`` (n, bands, rows, columns),
    trained by cross-entropy on ``device`` ("cpu" or "cuda", core.embed.resolve_device): as causalimages fits its
    image propensity model, small."""
    import torch

    images = _images(windows, device)
    target = torch.as_tensor(np.asarray(index, np.int64), device=device)
    epochs = epochs or WINDOW_EPOCHS

    def fit_predict(train, test):
        model = _window_network(images, k, seed, epochs,
                                lambda out, rows: torch.nn.functional.cross_entropy(out, target[rows]), train)
        return torch.softmax(model(np.flatnonzero(test)), 1).numpy().astype(float)

    return fit_predict


def window_network_outcome(windows, seed, extra=None, epochs=None, device="cpu"):
    """An outcome learner on the scaled ``windows`` and the units' standardised ``extra`` inputs (the covariates, or
    None): a class whose fit(X, y) trains _window_network on ``device`` by squared error on the standardised ``y``
    and predict(X) gives the outcome, X holding the units' indices (n, 1)."""
    import torch

    images = _images(windows, device)
    epochs = epochs or WINDOW_EPOCHS
    if extra is not None:
        extra = np.asarray(extra, float)
        extra = torch.as_tensor((extra - extra.mean(0)) / np.where(extra.std(0) > 0, extra.std(0), 1.0),
                                dtype=torch.float32, device=device)

    class WindowRegressor:
        def fit(self, X, y):
            rows = np.asarray(X, int).ravel()
            y = np.asarray(y, float)[np.argsort(rows)]   # the network's rows come in the units' order
            self.centre, self.scale = float(y.mean()), float(y.std()) or 1.0
            target = torch.as_tensor((y - self.centre) / self.scale, dtype=torch.float32, device=device)
            train = np.zeros(len(images), bool)
            train[rows] = True
            self.model = _window_network(images, 1, seed, epochs,
                                         lambda out, _: torch.mean((out[:, 0] - target) ** 2), train, extra)
            return self

        def predict(self, X):
            return self.model(X)[:, 0].numpy().astype(float) * self.scale + self.centre

    return WindowRegressor


def nuisance_learners(kind, index, k, propensity_inputs, outcome_inputs, outcome, windows=None, seed=42,
                      covariates=None, device="cpu", groups=None):
    """The propensity and outcome learners of ``kind`` (NUISANCE_CHOICES, not "penalised"): two dicts {name:
    fit_predict(train, test)}. ``index``: each unit's arm 0..k-1; ``propensity_inputs``: every standardised image
    feature and covariate (the penalised logistic model's); ``outcome_inputs``: the components and covariates
    (the spline ridge's and the boosting's); ``windows``: the scaled windows ("stacked with windows"), whose outcome
    network also reads the ``covariates`` (or None); ``device``: where the window networks train ("cpu" or
    "cuda": core.embed.resolve_device); ``groups``: the units' groups, kept whole by the spline ridge's penalty
    cross-validation (core.scores.outcome_model)."""
    from .design import penalised_logistic
    from .scores import MIN_UNITS_FOR_MODEL, outcome_model

    if kind not in NUISANCE_CHOICES[1:]:
        raise GeoCateError(f"Unknown stacked nuisance models '{kind}'.", f"Choose one of {NUISANCE_CHOICES}.")
    Xp = np.asarray(propensity_inputs, float)
    Xo = np.asarray(outcome_inputs, float)
    Y = np.asarray(outcome, float)
    index = np.asarray(index)
    groups = None if groups is None else np.asarray(groups).ravel()

    def of(rows):
        return None if groups is None else groups[rows]

    def logistic(train, test):
        return _probabilities(penalised_logistic().fit(Xp[train], index[train]), Xp[test], k)

    def boosted(train, test):
        return _probabilities(boosting_classifier(seed).fit(Xo[train], index[train]), Xo[test], k)

    units = np.arange(len(Y))[:, None]

    def per_arm(make, units_as_inputs=False):
        """fit_predict of ``make(groups)`` (the training units' groups) fitted on each arm's training units (the arm
        mean below MIN_UNITS_FOR_MODEL); its inputs the outcome inputs, or the units' indices (a learner that reads
        the windows itself)."""
        X = units if units_as_inputs else Xo

        def fit_predict(train, test):
            mu = np.empty((int(test.sum()), k))
            for a in range(k):
                rows = train & (index == a)
                if rows.sum() < 2:
                    raise GeoCateError("A cross-fitting fold of the stacked outcome models leaves too few units of "
                                       "an arm to learn from.", "Use more units, or the penalised models.")
                mu[:, a] = Y[rows].mean() if rows.sum() < MIN_UNITS_FOR_MODEL else \
                    make(of(rows)).fit(X[rows], Y[rows]).predict(X[test])
            return mu
        return fit_predict

    propensity = {"penalised logistic (image features)": logistic, "gradient boosting (components)": boosted}
    outcome_learners = {"spline ridge (components)": per_arm(outcome_model),
                        "gradient boosting (components)": per_arm(lambda _: boosting_regressor(seed))}
    if kind == "stacked with windows":
        if windows is None:
            raise GeoCateError("The stacked models with a window network need the image windows.",
                               "Use NUISANCE = stacked.")
        images = _images(windows, device)          # one copy on the device for both networks
        propensity["network on the windows"] = window_network_propensity(images, index, k, seed, device=device)
        regressor = window_network_outcome(images, seed, covariates, device=device)
        outcome_learners["network on the windows"] = per_arm(lambda _: regressor(), units_as_inputs=True)
    return propensity, outcome_learners

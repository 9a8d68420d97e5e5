"""Cross-fitting, in one place (issue 20): which fold holds each unit, and the one loop that fits on the other
folds and predicts the held-out one.

Folds keep groups whole - units at one location, of one cluster (CLUSTER), or in one spatial block - so that no
unit is predicted by a model that saw a unit it shares a place with (location_folds; stratified_folds also spreads
each stratum of a block-randomized trial over every fold). ``Folds`` walks them: ``split()`` for cross-fitting
(train on every other fold), ``sequential()`` for the heterogeneity test's expanding folds (train on the folds
before). ``crossfit`` is the loop (econml's ``_crossfit`` is the model): it polls for cancellation and reports
progress once, and assembles the held-out predictions; every fold loop of core/ is a call to it or a walk over
``Folds``. ``nested_crossfit`` adds the inner predictions a stacked model (core.stacking) chooses its weights on
within each fold's training units.
"""

import itertools

import numpy as np

from .errors import Cancelled, GeoCateError


def location_folds(locations, n_folds, seed):
    """Assign each unit a fold 0..n_folds-1 so that units sharing a location share a fold.

    locations: (n,) hashable location ids (e.g. from location_ids).
    Locations are shuffled with ``seed`` and dealt to folds in turn, which keeps
    fold sizes within one location of each other.
    """
    unique, inverse = np.unique(np.asarray(locations), return_inverse=True)
    if len(unique) < n_folds:
        raise GeoCateError(
            f"Only {len(unique)} group(s) of units can be kept apart: units that share a location, a cluster "
            f"(CLUSTER) or a spatial block stay together, and {n_folds}-fold cross-fitting needs at least "
            f"{n_folds} such groups.",
            "Use a cluster field with more clusters, smaller spatial blocks (or auto, -1), or more units at "
            "distinct places.",
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of_location = np.empty(len(unique), dtype=int)
    fold_of_location[order] = np.arange(len(unique)) % n_folds
    return fold_of_location[inverse]


def stratified_folds(groups, strata, n_folds, seed):
    """Folds that keep each group whole (location_folds) and, with ``strata``, deal each stratum's groups over
    the folds in turn, so every fold holds every stratum in its proportion."""
    if strata is None:
        return location_folds(groups, n_folds, seed)
    unique, inverse = np.unique(np.asarray(groups), return_inverse=True)
    stratum_of_group = np.zeros(len(unique), int)
    stratum_of_group[inverse] = strata            # a group spans one stratum (a unit's group; else its last)
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(stratum_of_group[order], kind="stable")]   # by stratum, shuffled within
    fold_of_group = np.empty(len(unique), int)
    fold_of_group[order] = np.arange(len(unique)) % n_folds
    folds = fold_of_group[inverse]
    if len(Folds(folds)) < n_folds:
        return location_folds(groups, n_folds, seed)   # its message names the problem
    return folds


def location_ids(coords, precision=1e-6):
    """(n, 2) coordinates -> (n,) int ids; units with the same coordinates share an id."""
    rounded = np.round(np.asarray(coords, dtype=float) / precision).astype(np.int64)
    return np.unique(rounded, axis=0, return_inverse=True)[1].ravel()


class Folds:
    """The held-out fold of each unit: ``fold`` (n,) ids, ``ids`` the folds in sorted order (the order every walk
    takes). Built from an array of fold ids (a study's folds are made once, by location_folds or
    stratified_folds, and shared by every model of the run)."""

    def __init__(self, fold):
        self.fold = np.asarray(fold).ravel()
        self.ids = np.unique(self.fold)

    @classmethod
    def of_groups(cls, groups, n_folds, seed, strata=None):
        """The folds of a study: ``groups`` (locations, clusters, spatial blocks) kept whole, dealt over
        ``n_folds`` with ``seed`` (location_folds); with ``strata``, each stratum spread over every fold
        (stratified_folds). Checked (check)."""
        fold = location_folds(groups, n_folds, seed) if strata is None else \
            stratified_folds(groups, strata, n_folds, seed)
        return cls(fold).check(groups)

    def inner(self, train, groups, n_folds, seed):
        """Folds within the training units ``train`` (a mask) that keep their ``groups`` whole: a model's own
        cross-fitting inside one fold's training set, so that no held-out unit reaches it."""
        return Folds.of_groups(np.asarray(groups)[np.asarray(train, bool)], n_folds, seed)

    def check(self, groups=None):
        """The folds as a cross-fitting needs them: every unit held out once (one fold id each, none missing) and,
        with ``groups``, no group split between folds (a unit's neighbours or cluster held out with it)."""
        if len(self.fold) == 0 or (self.fold.dtype.kind == "f" and np.isnan(self.fold).any()):
            raise GeoCateError("Some units have no cross-fitting fold.", "Assign every unit a fold.")
        if groups is not None:
            groups = np.asarray(groups).ravel()
            if len(groups) != len(self.fold):
                raise GeoCateError("The folds and the groups describe different units.",
                                   "Give one group id per unit.")
            pairs = np.unique(np.column_stack([np.unique(groups, return_inverse=True)[1].ravel(),
                                               np.unique(self.fold, return_inverse=True)[1].ravel()]), axis=0)
            if len(pairs) != len(np.unique(pairs[:, 0])):
                raise GeoCateError("A group of units (a location, cluster or spatial block) is split between "
                                   "cross-fitting folds: a model would see a held-out unit's neighbours.",
                                   "Make the folds from the groups (Folds.of_groups).")
        return self

    def __len__(self):
        return len(self.ids)

    def split(self):
        """(fold id, training mask, held-out mask) for each fold: train on every other fold."""
        for k in self.ids:
            test = self.fold == k
            yield k, ~test, test

    def sequential(self):
        """(fold id, training mask, held-out mask) for the second fold on: train on the folds before it (the
        sequential cross-fold test's expanding window), so that no held-out fold's outcomes shape its ranking."""
        for j, k in enumerate(self.ids[1:]):
            yield k, np.isin(self.fold, self.ids[:j + 1]), self.fold == k

    def require(self, minimum, what):
        """Refuse, naming ``what`` needs them, when there are fewer than ``minimum`` folds."""
        if len(self) < minimum:
            raise GeoCateError(f"{what} needs at least {minimum} folds.", f"Use {minimum} or more cross-fitting folds.")
        return self


def crossfit(fit_predict, folds, is_cancelled=None, progress=None):
    """Out-of-fold predictions. For each fold (``folds``: Folds or fold ids), in order, ``fit_predict(train,
    test)`` (boolean masks) fits on the training units and returns the held-out units' predictions: an array whose
    first axis is those units, or a tuple of such arrays. Returns the same structure over all n units, each unit's
    row from the model that did not see its fold (float arrays start as NaN). ``is_cancelled()`` is polled before
    each fold (raising Cancelled); ``progress(j, n_folds)`` is called before fold j (0-based). Fits a caller keeps
    (forests, trees) are appended by ``fit_predict`` itself."""
    folds = folds if isinstance(folds, Folds) else Folds(folds)
    n = len(folds.fold)
    out, single = None, True
    for j, (_, train, test) in enumerate(folds.split()):
        if is_cancelled is not None and is_cancelled():
            raise Cancelled()
        if progress is not None:
            progress(j, len(folds))
        value = fit_predict(train, test)
        single = not isinstance(value, tuple)
        values = [np.asarray(v) for v in ((value,) if single else value)]
        if out is None:
            out = [np.full((n,) + v.shape[1:], np.nan) if np.issubdtype(v.dtype, np.floating)
                   else np.zeros((n,) + v.shape[1:], v.dtype) for v in values]
        for target, v in zip(out, values):
            target[test] = v
    return out[0] if single else tuple(out)


def nested_crossfit(fit_predict, folds, is_cancelled=None, progress=None):
    """Outer and inner cross-fitted predictions.

    ``fit_predict(train, test)`` (boolean masks) fits on ``train`` and returns the ``test`` units' predictions (an
    array whose first axis is those units). Returns (outer, inner): ``outer`` (n, ...) every unit predicted by the
    model fitted on the other folds; ``inner`` {fold k: (n, ...)} fold k's training units (every other fold j)
    predicted by the model fitted on the folds other than j and k (NaN on fold k's rows). Needs at least 3 folds.
    ``is_cancelled()`` is polled before each fit; ``progress(done, total)`` is called after each."""
    walk = folds if isinstance(folds, Folds) else Folds(folds)
    fold, ids = walk.fold, walk.ids
    if len(ids) < 3:
        raise GeoCateError(f"Stacked nuisance models need at least 3 cross-fitting folds; this study has {len(ids)}.",
                           "Use 3 or more folds, or the penalised models (NUISANCE = penalised).")
    pairs = list(itertools.combinations(range(len(ids)), 2))
    total, done = len(ids) + len(pairs), 0
    outer, inner = None, {}

    def fit(train, test):
        nonlocal done
        if is_cancelled is not None and is_cancelled():
            raise Cancelled()
        value = np.asarray(fit_predict(train, test), float)
        done += 1
        if progress is not None:
            progress(done, total)
        return value

    for k, train, test in walk.split():
        value = fit(train, test)
        if outer is None:
            outer = np.full((len(fold),) + value.shape[1:], np.nan)
        outer[test] = value
        inner[k] = np.full_like(outer, np.nan)
    for j, k in pairs:
        left_out = np.isin(fold, [ids[j], ids[k]])
        value = np.full_like(outer, np.nan)
        value[left_out] = fit(~left_out, left_out)
        for held, other in ((ids[k], ids[j]), (ids[j], ids[k])):
            rows = np.isin(fold, [other])
            inner[held][rows] = value[rows]
    return outer, inner

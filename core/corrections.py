"""Outcomes that are a model's predictions: correcting their shrinkage once, for any number of trials.

A map of wealth, poverty or yield predicted from imagery is shrunk toward the
mean, so a treatment effect measured on it is attenuated. Following "One Map,
Many Trials" (Debiasing Machine Learning Predictions for Causal Inference
Without Additional Ground Truth Data; reference implementation ``unshrink``,
MIT, not on PyPI), the map makers' validation data (truth y and prediction
y_hat at the same units) give two corrections, fit once and stored in a small
JSON file (no pickles) that travels with the map:

* **linear** (Linear Calibration Correction): regress the prediction on the
  truth, y_hat = a + b y; the corrected value is (y_hat - a) / b.
* **tweedie**: y_hat - sigma^2 s(y_hat), with sigma^2 = Var(y_hat - y) on the
  validation units and s = d/dy_hat log p(y_hat) the score of the
  predictions' density (a Gaussian kernel density estimate of the validation
  predictions, stored as its values on a grid).

Both are written here because they are a few lines each. Where a trial has
ground truth for a random subset of its units, :func:`prediction_powered_ate`
gives the rectified (prediction-powered) ATE instead.
"""

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import GeoCateError
from .scores import aipw_scores, doubly_robust_ate

FORMAT = "geocate-outcome-correction"
VERSION = 1
METHODS = ("none", "linear", "tweedie")
#: Points of the stored score function s(y_hat) over the validation predictions' range.
GRID_POINTS = 512


@dataclass(frozen=True)
class OutcomeCorrection:
    """A fitted correction of a map's predictions (see the module's docstring)."""

    outcome: str                 # what the map predicts (e.g. "wealth_index")
    intercept: float             # a of y_hat = a + b y
    slope: float                 # b
    sigma2: float                # Var(y_hat - y) on the validation units
    grid: list                   # y_hat values of the stored score function
    score: list                  # s(y_hat) = d/dy_hat log p(y_hat) on the grid
    low: float                   # the range of validation predictions the correction holds over
    high: float
    n_validation: int
    map: dict = field(default_factory=dict)          # where the predictions came from: name, bands, band
    validation: dict = field(default_factory=dict)   # how well each corrected value tracks the truth

    # -- using it ---------------------------------------------------------------------------------------------
    def apply(self, prediction, method):
        """(corrected values, outside) for ``prediction``; ``outside`` flags values beyond the validation range
        (they are corrected with the score at the range's edge)."""
        if method not in METHODS:
            raise GeoCateError(f"Unknown outcome correction '{method}'.", f"Choose one of {', '.join(METHODS)}.")
        y_hat = np.asarray(prediction, float)
        outside = np.isfinite(y_hat) & ((y_hat < self.low) | (y_hat > self.high))
        if method == "none":
            return y_hat.copy(), outside
        if method == "linear":
            return (y_hat - self.intercept) / self.slope, outside
        return y_hat - self.sigma2 * np.interp(y_hat, self.grid, self.score), outside

    def check_compatible(self, outcome=None, map_bands=None):
        """Refuse a correction made for another map: another outcome name, or a map of another band count."""
        if outcome is not None and outcome.strip().lower() != self.outcome.strip().lower():
            raise GeoCateError(
                f"The correction file was made for the outcome '{self.outcome}'"
                + (f" of the map '{self.map.get('name')}'" if self.map.get("name") else "")
                + f", but the outcome here is '{outcome}'.",
                "Use the correction file that came with the map your outcome was taken from, or make one with "
                "'Calibrate a predicted-outcome map'.")
        if map_bands is not None and self.map.get("bands") is not None and int(map_bands) != int(self.map["bands"]):
            raise GeoCateError(
                f"The correction file was made for a map of {self.map['bands']} band(s) ('{self.map.get('name')}'), "
                f"but this map has {map_bands}.",
                "Use the correction file that came with this map.")

    # -- storing it ---------------------------------------------------------------------------------------------
    def to_dict(self):
        return dict(asdict(self), format=FORMAT, version=VERSION)

    def save(self, path):
        import os

        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, allow_nan=False)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as error:
            raise GeoCateError(f"The correction file '{path}' cannot be read ({error.__class__.__name__}).",
                               "Choose the .json file written by 'Calibrate a predicted-outcome map'.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise GeoCateError(f"'{path}' is not a GeoCATE outcome correction file.",
                               "Choose the .json file written by 'Calibrate a predicted-outcome map'.")
        if data.get("version") != VERSION:
            raise GeoCateError(f"The correction file '{path}' has version {data.get('version')}; this GeoCATE "
                               f"reads version {VERSION}.", "Make it again with this version of GeoCATE.")
        names = set(cls.__dataclass_fields__)
        missing = names - set(data) - {"map", "validation"}
        if missing:
            raise GeoCateError(f"The correction file '{path}' lacks {', '.join(sorted(missing))}.",
                               "Make it again with 'Calibrate a predicted-outcome map'.")
        correction = cls(**{key: value for key, value in data.items() if key in names})
        correction.validate(path)
        return correction

    def validate(self, path="the correction file"):
        """Refuse values no fitted correction has (a hand-edited or damaged file): a slope that is not a positive
        number (0 divides by zero; a negative one silently flipped the sign of the ATE), a variance, range or
        score grid that is not numeric and finite."""
        fix = "Make the file again with 'Calibrate a predicted-outcome map' (do not edit it by hand)."

        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise GeoCateError(f"In '{path}', {name} is {value!r}: not a finite number.", fix)
            return float(value)

        if number("slope", self.slope) <= 0:
            raise GeoCateError(f"In '{path}', the slope is {self.slope!r}: a map's predictions rise with the truth, "
                               "so the slope must be positive (0 cannot be undone; a negative one would flip the "
                               "sign of every effect).", fix)
        number("intercept", self.intercept)
        if number("sigma2", self.sigma2) < 0:
            raise GeoCateError(f"In '{path}', sigma2 is {self.sigma2!r}: a variance cannot be negative.", fix)
        if number("low", self.low) > number("high", self.high):
            raise GeoCateError(f"In '{path}', low ({self.low!r}) is above high ({self.high!r}).", fix)
        if not isinstance(self.outcome, str) or not self.outcome.strip():
            raise GeoCateError(f"In '{path}', the outcome's name is missing.", fix)
        try:
            grid, score = np.asarray(self.grid, float), np.asarray(self.score, float)
        except (TypeError, ValueError):
            raise GeoCateError(f"In '{path}', the score grid holds values that are not numbers.", fix) from None
        if grid.ndim != 1 or grid.shape != score.shape or len(grid) < 2 or not np.all(np.isfinite(grid)) \
                or not np.all(np.isfinite(score)) or np.any(np.diff(grid) <= 0):
            raise GeoCateError(f"In '{path}', the score grid is damaged (it must be two equally long lists of "
                               "finite numbers, the grid increasing).", fix)


def fit_correction(truth, prediction, outcome, map_info=None):
    """The correction of a map's predictions from its validation units (truth and prediction at the same units).

    Units with a null in either are left out. Refused: fewer than 20 units, a
    constant truth or prediction, or predictions that do not rise with the
    truth (slope <= 0: nothing to un-shrink).
    """
    from scipy.stats import gaussian_kde

    y, y_hat = np.asarray(truth, float), np.asarray(prediction, float)
    keep = np.isfinite(y) & np.isfinite(y_hat)
    y, y_hat = y[keep], y_hat[keep]
    if len(y) < 20:
        raise GeoCateError(f"Only {len(y)} validation units have both the truth and the prediction: at least 20 "
                           "are needed.", "Use the map makers' full validation set.")
    if np.ptp(y) == 0 or np.ptp(y_hat) == 0:
        raise GeoCateError("The truth or the prediction is constant on the validation units.",
                           "Check that the right fields were chosen.")
    slope, intercept = np.polyfit(y, y_hat, 1)
    if slope <= 0:
        raise GeoCateError(f"The predictions do not rise with the truth on the validation units (slope "
                           f"{slope:.3f}).", "Check that the truth and prediction fields belong together.")
    sigma2 = float(np.var(y_hat - y, ddof=1))
    kde = gaussian_kde(y_hat)
    grid = np.linspace(y_hat.min(), y_hat.max(), GRID_POINTS)
    log_density = np.log(np.maximum(kde(grid), 1e-300))
    score = np.gradient(log_density, grid)
    correction = OutcomeCorrection(
        outcome=str(outcome), intercept=float(intercept), slope=float(slope), sigma2=sigma2,
        grid=grid.tolist(), score=score.tolist(), low=float(y_hat.min()), high=float(y_hat.max()),
        n_validation=int(len(y)), map=dict(map_info or {}))
    validation = {"slope": float(slope), "intercept": float(intercept), "sigma": float(np.sqrt(sigma2))}
    for method in METHODS:
        corrected = correction.apply(y_hat, method)[0]
        validation[method] = {"slope_on_truth": float(np.polyfit(y, corrected, 1)[0]),
                              "rmse": float(np.sqrt(np.mean((corrected - y) ** 2))),
                              "sd_ratio": float(np.std(corrected) / np.std(y)),
                              "correlation": float(np.corrcoef(corrected, y)[0, 1])}
    return OutcomeCorrection(**{**asdict(correction), "validation": validation})


def corrected_outcomes(correction, prediction):
    """{method: (corrected values, outside flags)} for every method, to report them side by side."""
    return {method: correction.apply(prediction, method) for method in METHODS}


def corrected_units(units, correction, method):
    """(units with the outcome ``method`` corrects, every correction's (values, outside flags) or None): the one
    prologue of an algorithm whose outcome may be a map's prediction (``correction`` None: as they are)."""
    if correction is None:
        return units, None
    import dataclasses

    correction.check_compatible(units.outcome_name)
    versions = corrected_outcomes(correction, units.outcome)
    return dataclasses.replace(units, outcome=versions[method][0]), versions


def ate_by_correction(correction, prediction, treated, inputs=None, folds=None, clusters=None, seed=42):
    """{method: AverageEffect}: the doubly robust ATE of the outcome under each correction, side by side, with the
    same outcome-model inputs, folds and clusters (core.scores)."""
    from .scores import cross_fitted_scores, doubly_robust_ate

    return {method: doubly_robust_ate(cross_fitted_scores(values, treated, inputs, folds, seed=seed)[0], clusters)
            for method, (values, _) in corrected_outcomes(correction, prediction).items()}


def correction_record(correction, method, prediction, treated, inputs=None, folds=None, clusters=None, seed=42):
    """What the run record says of an outcome taken from a map (estimatecate, evaluate): the correction used
    (``method``), the map, the units outside the range the correction was fit on, and the DR ATE under every
    correction on the same inputs, folds and clusters (ate_by_correction). ``prediction``: the map's values."""
    ates = ate_by_correction(correction, prediction, treated, inputs, folds, clusters, seed)
    return {"correction": method, "outcome": correction.outcome, "map": correction.map,
            "outside_range": int(correction.apply(prediction, "none")[1].sum()),
            "validation_range": [correction.low, correction.high],
            "ate_by_correction": {m: {"estimate": a.estimate, "std_err": a.std_err} for m, a in ates.items()}}


def prediction_powered_ate(prediction, truth, treated, clusters=None, propensity=None):
    """The prediction-powered (rectified) ATE of a trial whose outcome is a model's prediction everywhere and
    the truth on a random subset of units (Angelopoulos et al. 2023, Science).

    Each unit's outcome is the rectified Y~ = f + (L / pi)(Y - f), with f the
    prediction, L = 1 where the truth is known and pi the labelled share in the
    unit's arm: unbiased for the truth when the labelled units are a random
    subset, whatever the predictions' bias. The ATE is the mean of the AIPW
    scores of Y~ with arm-mean outcome models (the difference in arm means of
    Y~), with a standard error robust to ``clusters`` (core.scores).

    Written here rather than taken from ``ppi_py`` (which installs with our
    numpy): its intervals assume independent units, and trials have villages.
    """
    f, y = np.asarray(prediction, float), np.asarray(truth, float)
    W = np.asarray(treated, int)
    labelled = np.isfinite(y)
    if not np.isfinite(f).all():
        raise GeoCateError("Some units have no predicted outcome.", "Drop them or fill them first.")
    rectified = f.copy()
    for arm in (0, 1):
        in_arm = W == arm
        n_labelled = int((labelled & in_arm).sum())
        if n_labelled < 2:
            raise GeoCateError(f"Only {n_labelled} {'treated' if arm else 'control'} unit(s) have the true outcome: "
                               "prediction-powered inference needs some in each arm.",
                               "Measure the outcome for a random subset of units in both arms.")
        pi = n_labelled / in_arm.sum()
        rows = labelled & in_arm
        rectified[rows] += (y[rows] - f[rows]) / pi
    e = float(W.mean()) if propensity is None else float(propensity)
    mu1, mu0 = rectified[W == 1].mean(), rectified[W == 0].mean()
    return doubly_robust_ate(aipw_scores(rectified, W, np.full(len(W), mu0), np.full(len(W), mu1), e), clusters)

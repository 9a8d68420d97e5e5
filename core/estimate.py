"""Estimators as objects with one interface (ARCHITECTURE's ``core.estimate``, issue 20 point 3).

Every estimator of GeoCATE answers the same questions once fitted:

- ``effect(X=None)``: per-unit effects; ``X`` None gives the fitted units' own (out of fold where the estimator
  cross-fits), an array gives the effects at new points (maps, targeting's candidates);
- ``effect_se(X=None)`` and ``effect_interval(X=None, alpha=0.05)``;
- ``ate()``, ``ate_se()`` and ``ate_interval(alpha=0.05)``: the average effect, with a standard error that respects
  the clusters the data has;
- ``describe()``: what the run record keeps of it (its name and settings, scikit-learn's ``get_params`` idea).

An estimator that has no per-unit effect (a panel's theta) says so with a GeoCateError naming what it does give,
never with a number it cannot stand behind. The estimators: ``core.learners.CrossFittedCausalForest`` (the CATE
of estimatecate, targeting and the maps), ``core.clusters.ClusterFit`` (the image cluster model: per-unit effects
from its clusters; the clusters' held-out DR effects are the pipeline's), ``core.panel.PanelDML`` (a panel's
theta) and ``core.observational.AdjustedContrasts`` (the IPW, Hajek and AIPW contrasts of an observational
study).
"""

import inspect

import numpy as np

from .errors import GeoCateError


def z_value(alpha):
    """The two-sided normal quantile of level ``alpha`` (the project's Z95 at 0.05, so that intervals are the ones
    every table and report shows)."""
    from scipy.stats import norm

    from .scores import Z95

    return Z95 if alpha == 0.05 else float(norm.ppf(1 - alpha / 2))


class Estimator:
    """The interface (see the module's docstring). Subclasses define what they estimate; intervals come from the
    estimates and standard errors here, the same way for all."""

    #: The estimator's name in the run record.
    name = "estimator"

    def effect(self, X=None):
        raise GeoCateError(f"The {self.name} gives no per-unit effect.",
                           "Read its average effect (ate, ate_interval) instead.")

    def effect_se(self, X=None):
        raise GeoCateError(f"The {self.name} gives no per-unit standard error.",
                           "Read its average effect (ate, ate_interval) instead.")

    def effect_interval(self, X=None, alpha=0.05):
        """(low, high) of each unit's (1 - alpha) interval: effect -/+ z * effect_se."""
        effect, se, z = np.asarray(self.effect(X), float), np.asarray(self.effect_se(X), float), z_value(alpha)
        return effect - z * se, effect + z * se

    def ate(self):
        raise GeoCateError(f"The {self.name} gives no average effect.", "Read its per-unit effects instead.")

    def ate_se(self):
        raise GeoCateError(f"The {self.name} gives no average effect.", "Read its per-unit effects instead.")

    def ate_interval(self, alpha=0.05):
        """(low, high) of the average effect's (1 - alpha) interval."""
        estimate, se, z = self.ate(), self.ate_se(), z_value(alpha)
        return estimate - z * se, estimate + z * se

    def get_params(self):
        """The constructor's arguments as the object holds them (scikit-learn's convention)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def describe(self):
        """The run record's description: the estimator's name and settings."""
        plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in self.get_params().items()}
        return {"estimator": self.name, **{k: v for k, v in plain.items()
                                           if isinstance(v, (int, float, str, bool, type(None)))}}

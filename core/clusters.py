"""Latent effect clusters learned from imagery (Jerzak, Johansson & Daoud, "Image-based Treatment Effect Heterogeneity", CLeaR 2023).

Each unit i has a latent cluster Z_i in 1..K. A network on the unit's image
window (and covariates X_i) gives the cluster probabilities pi_k(image, X)
and the expected control outcome mu0(image, X); cluster k has its own effect
tau_k. With Z marginalised exactly,

    p(Y_i | image_i, X_i, W_i) = sum_k pi_k(image_i, X_i) f_{W_i}(Y_i - mu0_i - W_i tau_k; s_i).

The noise (issue 24) is the same for every cluster and flexible, so that the
outcome's shape (a point mass of zeros, a long tail, noise that grows with the
image) is not taken for clusters: f_w is, per arm, a mixture of
``noise_components`` Gaussians with mean zero, scaled per unit by
s_{i,w} = exp(g_w(image_i, X_i)) from a third head of the network. More
clusters then raise the likelihood only where effects differ. With K > 1 the
model is trained twice, its noise started from each arm's own outcomes and
from the controls' alone (NOISE_STARTS), and the better fit to its training
units is kept. A point mass (an outcome value that many units share: the
zeros of hours worked) gets a hurdle part (PointMasses): per arm, each such
value has its own probability, shared by every cluster, and the mixture above
describes the other outcomes. A tie then says nothing about a unit's cluster:
a spike at one outcome value cannot be bought with a cluster whose effect
puts it under a narrow noise component. With point masses, a cluster's
reported effect is the model's effect on the outcome's mean (PointMasses.effect).
``noise_components=0`` is the model of the paper (and of GeoCATE before issue
24): one Gaussian noise scale sigma_{k,w} per cluster and arm, with a
Gaussian variational posterior on its log (prior N(0, 1)).

tau_k has a Gaussian variational posterior (prior N(0, 3^2) on the
standardised outcome scale); the network is trained by maximising the
evidence lower bound, with dropout kept on at prediction time for Monte Carlo
uncertainty. The image network is the MOSAIKS convolution of core.embed
(fixed, seeded random filters from the study's own windows) followed by a
learned two-layer head; training works on the pooled features, and
``image_model`` rebuilds the whole image -> pi network for salience and ONNX
export.

K is chosen by the cross-fitted held-out predictive log-likelihood over
K = 1..max_clusters (K = 1 is the model without heterogeneity), and K > 1 is
kept only when the held-out test of the clusters' effects rejects
(cluster_effect_test); neighbouring clusters whose held-out DR effects do not
differ are then merged (indistinct_neighbours, sequential as the test is).
"""

from dataclasses import dataclass

import numpy as np

from .encoders import file_digest
from .errors import GeoCateError, require
from .estimate import Estimator
from .scores import Z95

PRIOR_TAU_SD = 3.0
PRIOR_LOG_SIGMA_SD = 1.0
#: Gaussians in each arm's shared noise mixture (issue 24); 0 = a Gaussian noise per cluster and arm (the paper's).
NOISE_COMPONENTS = 3
#: The smallest sd of a noise component (standardised outcome): a point mass of ties cannot make the likelihood
#: unbounded, which would otherwise reward whichever model puts a component on it.
MIN_NOISE_SD = 0.05
#: The largest |log| of a unit's noise scale.
MAX_LOG_SCALE = 2.0
#: Where each arm's shared noise starts (issue 24), one training per start for K > 1, the one with the highest
#: likelihood on its own training units kept: "arm", a mixture fitted to the arm's own outcomes; "controls", the
#: controls' mixture for both arms. The treated arm's own outcomes hold the effects' differences, which its start
#: can take in as noise shape (the treated ties of a zero-inflated outcome sit at a different value in each
#: cluster); the controls' start has none of them. bench_clusters.py shapes: ARI of zero-inflated three-cluster
#: designs 0.47 -> 0.58 (K = 3 given, seeds 500-505), Gaussian ones unchanged.
NOISE_STARTS = ("arm", "controls")
#: The hurdle part (issue 24): an outcome value held by at least this share of either arm's units (and by
#: POINT_MASS_MIN_UNITS) is a point mass of both arms, modelled apart from the continuous noise.
POINT_MASS_SHARE = 0.05
POINT_MASS_MIN_UNITS = 5
#: The hurdle is used only where each arm keeps at least this share and CONTINUOUS_MIN_UNITS of its units (the
#: study's, in find_clusters) off the point masses; an outcome with less (a binary or few-valued outcome, or a
#: small study) keeps the mixture alone. With fewer, the continuous part's baseline and noise scales overfit: 60
#: such controls of a 600-unit trial gave held-out log-likelihoods of -200 for some units. 200 is about an arm's
#: training units in the smallest trials the model is validated on (600 units, bench_clusters.py shapes).
CONTINUOUS_MIN_SHARE = 0.1
CONTINUOUS_MIN_UNITS = 200
#: Expectation-maximisation steps of the clusters' centres in forest_informed_assignment.
ASSIGNMENT_STEPS = 50


def _torch():
    return require("torch", "torch==2.13.0")


def _network(d, p, k, hidden, dropout, noise_components=NOISE_COMPONENTS):
    torch = _torch()

    class ClusterNetwork(torch.nn.Module):
        """features (n, d), covariates (n, p) -> (log pi (n, k), mu0 (n,), log noise scale (n, 2)); plus the
        variational parameters of the effects and the noise's parameters (see the module docstring)."""

        def __init__(self):
            super().__init__()
            self.noise_components = noise_components
            self.trunk = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout))
            self.cluster_head = torch.nn.Linear(hidden + p, k)
            self.outcome_head = torch.nn.Linear(hidden + p, 1)
            self.tau_mean = torch.nn.Parameter(torch.zeros(k))
            self.tau_log_sd = torch.nn.Parameter(torch.full((k,), -2.0))
            if noise_components:   # one flexible noise per arm, shared by the clusters, scaled per unit
                m = noise_components
                self.scale_head = torch.nn.Linear(hidden + p, 2)
                torch.nn.init.zeros_(self.scale_head.weight)
                torch.nn.init.zeros_(self.scale_head.bias)
                self.noise_logit = torch.nn.Parameter(torch.zeros(2, m))
                self.noise_offset = torch.nn.Parameter(torch.linspace(-1.0, 1.0, m).repeat(2, 1) * (m > 1))
                self.noise_log_sd = torch.nn.Parameter(torch.full((2, m), np.log(0.7)))
            else:
                self.log_sigma_mean = torch.nn.Parameter(torch.zeros(k, 2))
                self.log_sigma_log_sd = torch.nn.Parameter(torch.full((k, 2), -2.0))

        def forward(self, features, covariates):
            hidden_units = torch.cat([self.trunk(features), covariates], dim=1)
            # Each unit's noise scale, bounded (a factor of e^-2 to e^2 either way) so that no unit's likelihood
            # can be bought by shrinking its own scale.
            log_scale = (MAX_LOG_SCALE * torch.tanh(self.scale_head(hidden_units) / MAX_LOG_SCALE)
                         if self.noise_components else torch.zeros(len(features), 2, device=features.device))
            return (torch.log_softmax(self.cluster_head(hidden_units), dim=1),
                    self.outcome_head(hidden_units).squeeze(1), log_scale)

        def noise(self):
            """Each arm's mixture: (log weights, mean-zero offsets, sds), each (2, M)."""
            log_weight = torch.log_softmax(self.noise_logit, dim=1)
            offset = self.noise_offset - (log_weight.exp() * self.noise_offset).sum(dim=1, keepdim=True)
            return log_weight, offset, MIN_NOISE_SD + self.noise_log_sd.exp()

    return ClusterNetwork()


def _kl_normal(mean, log_sd, prior_sd):
    """KL(N(mean, sd^2) || N(0, prior_sd^2)), summed."""
    var = (2 * log_sd).exp()
    return (0.5 * ((var + mean ** 2) / prior_sd ** 2 - 1) - log_sd + np.log(prior_sd)).sum()


def _mixture_log_likelihood(torch, network, outputs, treated, outcome, tau, log_sigma=None):
    """log p(y_i | image_i, x_i, w_i) of the module docstring, per unit: (n,). ``outputs`` = network(x, c);
    ``log_sigma`` (K, 2): the per-cluster noise of the paper's model (noise_components = 0)."""
    log_pi, mu0, log_scale = outputs
    arm = treated.long()
    residual = outcome[:, None] - mu0[:, None] - treated[:, None] * tau[None, :]       # (n, k)
    if not network.noise_components:
        sigma_log = log_sigma[:, arm].T                                                # (n, k)
        log_normal = -0.5 * (residual / sigma_log.exp()) ** 2 - sigma_log - 0.5 * np.log(2 * np.pi)
        return torch.logsumexp(log_pi + log_normal, dim=1)
    log_weight, offset, sd = network.noise()
    unit_log_scale = log_scale.gather(1, arm[:, None])                                 # (n, 1)
    scale = unit_log_scale.exp()[:, :, None]                                           # (n, 1, 1)
    z = (residual[:, :, None] - scale * offset[arm][:, None, :]) / (scale * sd[arm][:, None, :])   # (n, k, m)
    log_noise = torch.logsumexp(log_weight[arm][:, None, :] - 0.5 * z ** 2 - sd[arm].log()[:, None, :], dim=2)
    log_noise = log_noise - unit_log_scale - 0.5 * np.log(2 * np.pi)
    return torch.logsumexp(log_pi + log_noise, dim=1)


@dataclass
class PointMasses:
    """The hurdle part of the shared noise (issue 24): the outcome values that are point masses (``values``, the
    same for both arms) and each arm's probability of each (``shares``: (control shares, treated shares), shared by
    every cluster), on the outcome's own scale; ``baseline`` (K,), in the network's cluster order, is each
    cluster's mean untreated outcome of the continuous part (the network's mu0 weighted by the units' probability
    of the cluster, over the training units).

    Under the model E[Y | k, w] = Q_w v_w + (1 - Q_w) (mu0 + w tau_k), with Q_w the arm's share at the point masses
    and v_w their mean value, so cluster k's effect on the mean is
    Q_1 v_1 - Q_0 v_0 + (1 - Q_1) tau_k + (Q_0 - Q_1) E[mu0 | k] (``effect``)."""

    values: np.ndarray
    shares: tuple
    baseline: np.ndarray = None

    @classmethod
    def fitted(cls, values, outcome, treated):
        """Each arm's share of each point mass on these (training) units, smoothed by half a unit so that a value
        an arm never shows in training keeps a finite probability on held-out units."""
        outcome, arm = np.asarray(outcome, float), np.asarray(treated).astype(int)
        values = np.asarray(values, float)
        shares = []
        for w in (0, 1):
            held = outcome[arm == w]
            counts = (held[:, None] == values[None, :]).sum(axis=0)
            shares.append((counts + 0.5) / (len(held) + 0.5 * (len(values) + 1)))
        return cls(values=values, shares=tuple(shares))

    @property
    def total(self):
        return np.array([float(np.sum(share)) for share in self.shares])

    def tied(self, outcome):
        """(n,) bool: the units whose outcome is a point mass (the same values in both arms)."""
        return np.isin(np.asarray(outcome, float), self.values)

    def log_probability(self, outcome, treated):
        """(n,): log P(Y = y_i | arm) for tied units, and log(1 - Q_arm), the continuous part's weight, for the
        others."""
        outcome, arm = np.asarray(outcome, float), np.asarray(treated).astype(int)
        result = np.log1p(-self.total)[arm]
        for j, value in enumerate(self.values):
            result = np.where(outcome == value, np.log(np.where(arm == 1, self.shares[1][j], self.shares[0][j])),
                              result)
        return result

    def effect(self, tau_mean, tau_sd, baseline):
        """The clusters' effects on the outcome's mean (and their sds) from the continuous part's effects tau_k and
        the clusters' baselines (all in the same order). The sds carry tau's posterior alone: the shares' and the
        baselines' sampling error is not in them (the held-out effects' SEs are the ones to quote)."""
        q0, q1 = self.total
        v0, v1 = (float(np.dot(self.values, self.shares[w]) / self.total[w]) for w in (0, 1))
        return (q1 * v1 - q0 * v0 + (1 - q1) * np.asarray(tau_mean) + (q0 - q1) * np.asarray(baseline),
                (1 - q1) * np.asarray(tau_sd))

    def describe(self):
        """The point masses in words, for the run record."""
        return ", ".join(f"{value:g} (controls {c:.0%}, treated {t:.0%})"
                         for value, c, t in zip(self.values, *self.shares))


def point_mass_values(outcome, treated):
    """The study's point masses (issue 24's hurdle part): the outcome values held by at least POINT_MASS_SHARE of
    either arm's units and by POINT_MASS_MIN_UNITS units, as an array; None where there are none, or where an arm
    keeps fewer than CONTINUOUS_MIN_UNITS units (or CONTINUOUS_MIN_SHARE) off them (a binary or few-valued
    outcome, or a small study), which then keeps the mixture alone. Decided once per study, so that every model of
    a run (each K, fold and sequential step) has the same hurdle."""
    outcome, treated = np.asarray(outcome, float), np.asarray(treated).astype(int)
    finite = np.isfinite(outcome)
    values = []
    for w in (0, 1):
        arm = outcome[finite & (treated == w)]
        unique, counts = np.unique(arm, return_counts=True)
        values.extend(unique[counts >= max(POINT_MASS_SHARE * len(arm), POINT_MASS_MIN_UNITS)])
    values = np.unique(values)
    if not len(values):
        return None
    for w in (0, 1):
        arm = outcome[finite & (treated == w)]
        left = int((~np.isin(arm, values)).sum())
        if left < max(CONTINUOUS_MIN_SHARE * len(arm), CONTINUOUS_MIN_UNITS):
            return None
    return values


@dataclass
class ClusterFit(Estimator):
    """One trained model, with the scalings it needs (outcome and features standardised). As core.estimate's
    estimator: ``effect(features, covariates)``, each unit's effect from its cluster probabilities; the average
    effect is the pipeline's (the held-out DR effect of the units)."""

    name = "image cluster model"

    network: object
    n_clusters: int
    y_mean: float
    y_sd: float
    order: np.ndarray        # clusters sorted by effect: order[j] = network index of cluster j+1
    noise_start: str = "arm"   # where the kept training's noise started (fit_clusters' noise_starts)
    point_masses: object = None   # the hurdle part (PointMasses), or None

    def _inputs(self, features, covariates):
        torch = _torch()
        device = next(self.network.parameters()).device
        return (torch.as_tensor(features, dtype=torch.float32, device=device),
                torch.as_tensor(covariate_matrix(covariates, len(features)), dtype=torch.float32, device=device))

    def probabilities(self, features, covariates, samples=0, seed=0):
        """(n, K) cluster probabilities (sorted clusters); with samples > 0, (samples, n, K) MC-dropout draws."""
        torch = _torch()
        x, c = self._inputs(features, covariates)
        with torch.no_grad():
            if samples == 0:
                self.network.eval()
                return self.network(x, c)[0].exp().cpu().numpy()[:, self.order]
            torch.manual_seed(seed)
            self.network.train()
            draws = np.stack([self.network(x, c)[0].exp().cpu().numpy()[:, self.order] for _ in range(samples)])
            self.network.eval()
            return draws

    def effects(self):
        """Posterior mean and sd of each cluster's effect, on the outcome's scale: (K,), (K,)."""
        mean = self.network.tau_mean.detach().cpu().numpy()[self.order] * self.y_sd
        sd = self.network.tau_log_sd.detach().exp().cpu().numpy()[self.order] * self.y_sd
        if self.point_masses is not None:   # the continuous part's effects carried to the outcome's mean
            return self.point_masses.effect(mean, sd, self.point_masses.baseline[self.order])
        return mean, sd

    def effect_of(self, probabilities):
        """Each unit's effect under cluster ``probabilities`` (n, K): the clusters' effects weighted by them."""
        return probabilities @ self.effects()[0]

    def effect(self, X=None, covariates=None):
        """Each unit's effect from its image features ``X`` and ``covariates`` (None: none): its cluster
        probabilities times the clusters' effects (core.estimate's interface; the fitted units' out-of-fold
        effects and each cluster's held-out DR effect are the pipeline's)."""
        if X is None:
            raise GeoCateError("The cluster model's effects are read at given features.",
                               "Pass the units' image features (and covariates).")
        X = np.asarray(X, float)
        return self.effect_of(self.probabilities(X, np.zeros((len(X), 0)) if covariates is None else covariates))

    def describe(self):
        """The run record's description of the model."""
        return {"estimator": self.name, "n_clusters": int(self.n_clusters),
                "noise": self.noise_description(), "noise_start": self.noise_start,
                "point_masses": None if self.point_masses is None else self.point_masses.describe()}

    def sigmas(self, features, covariates):
        """Outcome noise sd by cluster and arm, on the outcome's scale: (K, 2). The paper's model: each cluster's
        posterior mean sigma. The shared flexible noise: the sd of the arm's mixture times each unit's scale,
        root-mean-squared over the units weighted by their probability of the cluster (clusters differ only where
        the noise's scale follows the image)."""
        network = self.network
        if not network.noise_components:
            return np.exp(network.log_sigma_mean.detach().cpu().numpy()[self.order]) * self.y_sd
        torch = _torch()
        network.eval()
        x, c = self._inputs(features, covariates)
        with torch.no_grad():
            log_pi, _, log_scale = network(x, c)
            log_weight, offset, sd = network.noise()
            mixture_var = (log_weight.exp() * (offset ** 2 + sd ** 2)).sum(dim=1)              # (2,)
            unit_var = (2 * log_scale).exp() * mixture_var[None, :]                           # (n, 2)
            pi = log_pi.exp()
            var = (pi.T @ unit_var) / pi.sum(dim=0)[:, None].clamp(min=1e-12)                # (k, 2)
        return np.sqrt(var.cpu().numpy()[self.order]) * self.y_sd

    def noise_description(self):
        """The noise model, in words, for the run record."""
        m = self.network.noise_components
        hurdle = ("" if self.point_masses is None else
                  f"; a hurdle part for the point masses, their probabilities per arm shared by all clusters: "
                  f"{self.point_masses.describe()}")
        return (f"per arm, a mixture of {m} mean-zero Gaussians shared by all clusters, scaled per unit by the image "
                f"and covariates{hurdle}" if m else "one Gaussian per cluster and arm (the paper's model)")

    def log_likelihood(self, features, covariates, treated, outcome):
        """Held-out predictive log-likelihood of each unit at the posterior means: (n,)."""
        torch = _torch()
        self.network.eval()
        x, c = self._inputs(features, covariates)
        device = x.device
        with torch.no_grad():
            ll = _mixture_log_likelihood(
                torch, self.network, self.network(x, c), torch.as_tensor(treated, dtype=torch.float32, device=device),
                torch.as_tensor((outcome - self.y_mean) / self.y_sd, dtype=torch.float32, device=device),
                self.network.tau_mean, getattr(self.network, "log_sigma_mean", None))
        density = ll.cpu().numpy() - np.log(self.y_sd)
        if self.point_masses is None:
            return density
        # The hurdle: a tie's probability mass, or the continuous part's weight times its density.
        hurdle = self.point_masses.log_probability(outcome, treated)
        return np.where(self.point_masses.tied(outcome), hurdle, hurdle + density)


def _noise_start(values, components, seed):
    """(weights, offsets about the mean, sds) of a ``components``-Gaussian mixture fitted to one arm's standardised
    outcomes (scikit-learn's GaussianMixture): where the training of the shared noise starts, so that a point mass
    or a long tail is in the noise from the first epoch rather than left for clusters to take."""
    from sklearn.mixture import GaussianMixture

    values = np.asarray(values, float).reshape(-1, 1)
    fitted = min(components, max(len(np.unique(values)), 1))
    mixture = GaussianMixture(fitted, reg_covar=MIN_NOISE_SD ** 2, random_state=seed).fit(values)
    weights = np.full(components, 1e-3)
    weights[:fitted] = mixture.weights_
    return (weights / weights.sum(), np.resize(mixture.means_.ravel() - values.mean(), components),
            np.resize(np.sqrt(mixture.covariances_.ravel()), components))


def fit_clusters(features, covariates, treated, outcome, n_clusters, epochs=300, hidden=32, dropout=0.2,
                 learning_rate=1e-2, seed=42, device="cpu", is_cancelled=None, noise_components=NOISE_COMPONENTS,
                 noise_starts=None, point_masses=None):
    """Train the model of the module docstring; returns a ClusterFit.

    features: (n, d) standardised image features; covariates: (n, p) standardised (p may be 0).
    noise_starts: where the shared noise starts (None: NOISE_STARTS for K > 1, "arm" for K = 1 or the paper's
    noise); each start is trained with the same seed and the fit with the highest log-likelihood on these units
    is kept (its start in ClusterFit.noise_start).
    is_cancelled() is polled every 10 epochs (milliseconds each on a CPU); cancelling raises Cancelled.
    point_masses: the hurdle part's values (point_mass_values of the whole study, so that every model of a run has
    the same); None: found on these units; False: no hurdle. Only with the shared noise (noise_components > 0).
    """
    if point_masses is None:
        point_masses = point_mass_values(outcome, treated)
    point_masses = None if point_masses is False or not noise_components else point_masses
    if noise_starts is None:
        noise_starts = NOISE_STARTS if n_clusters > 1 and noise_components else ("arm",)
    elif isinstance(noise_starts, str):
        noise_starts = (noise_starts,)
    unknown = set(noise_starts) - {"arm", "controls"}
    if unknown or not noise_starts:
        raise ValueError(f"noise_starts must be 'arm' and/or 'controls', not {sorted(unknown) or noise_starts}")
    covariates = np.zeros((len(outcome), 0)) if covariates is None else \
        np.asarray(covariates, float).reshape(len(outcome), -1)
    best = None
    for start in noise_starts:
        fit = _train_clusters(features, covariates, treated, outcome, n_clusters, epochs, hidden, dropout,
                              learning_rate, seed, device, is_cancelled, noise_components, start, point_masses)
        if len(noise_starts) == 1:
            return fit
        fitted = float(fit.log_likelihood(features, covariates, treated, outcome).sum())
        fitted = fitted if np.isfinite(fitted) else -np.inf    # a training that failed never wins
        if best is None or fitted > best[0]:
            best = (fitted, fit)
    return best[1]


def _train_clusters(features, covariates, treated, outcome, n_clusters, epochs, hidden, dropout, learning_rate, seed,
                    device, is_cancelled, noise_components, noise_start, point_masses=None):
    """One training of fit_clusters, its noise started from ``noise_start`` ("arm" or "controls"); ``point_masses``:
    the hurdle's values, or None."""
    torch = _torch()
    torch.manual_seed(seed)
    n, d = features.shape
    y_mean, y_sd = float(np.mean(outcome)), float(np.std(outcome) or 1.0)
    network = _network(d, covariates.shape[1], n_clusters, hidden, dropout, noise_components).to(device)
    # The hurdle part: ties at a point mass leave the continuous part (their probability is the same constant
    # whatever the parameters), which starts and learns from the other outcomes.
    masses = None if point_masses is None else PointMasses.fitted(point_masses, outcome, treated)
    continuous = np.ones(n, bool) if masses is None else ~masses.tied(outcome)
    # Start the effects spread around the difference in means, so that clusters can tell apart.
    difference = (np.mean(outcome[continuous & (treated == 1)]) - np.mean(outcome[continuous & (treated == 0)])) / y_sd
    with torch.no_grad():
        network.tau_mean.copy_(torch.as_tensor(difference + np.linspace(-1, 1, n_clusters) * (n_clusters > 1),
                                               dtype=torch.float32))
        if noise_components:   # each arm's noise starts as a mixture fitted to outcomes about their mean
            network.outcome_head.bias.fill_(float(np.mean(outcome[continuous & (treated == 0)]) - y_mean) / y_sd)
            for arm in (0, 1):
                source = arm if noise_start == "arm" else 0
                weights, offsets, sds = _noise_start((outcome[continuous & (treated == source)] - y_mean) / y_sd,
                                                     noise_components, seed)
                network.noise_logit[arm] = torch.as_tensor(np.log(weights), dtype=torch.float32)
                network.noise_offset[arm] = torch.as_tensor(offsets, dtype=torch.float32)
                network.noise_log_sd[arm] = torch.as_tensor(np.log(np.maximum(sds - MIN_NOISE_SD, 1e-3)),
                                                            dtype=torch.float32)
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    c = torch.as_tensor(covariates, dtype=torch.float32, device=device)
    w = torch.as_tensor(treated, dtype=torch.float32, device=device)
    y = torch.as_tensor((outcome - y_mean) / y_sd, dtype=torch.float32, device=device)
    kept = None if masses is None else torch.as_tensor(continuous, device=device)
    optimiser = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    network.train()
    for epoch in range(epochs):
        if is_cancelled is not None and epoch % 10 == 0 and is_cancelled():
            from .errors import Cancelled

            raise Cancelled()
        optimiser.zero_grad()
        tau = network.tau_mean + network.tau_log_sd.exp() * torch.randn(n_clusters, device=device)
        kl = _kl_normal(network.tau_mean, network.tau_log_sd, PRIOR_TAU_SD)
        log_sigma = None
        if not noise_components:
            log_sigma = network.log_sigma_mean + network.log_sigma_log_sd.exp() * torch.randn(n_clusters, 2,
                                                                                                device=device)
            kl = kl + _kl_normal(network.log_sigma_mean, network.log_sigma_log_sd, PRIOR_LOG_SIGMA_SD)
        log_likelihood = _mixture_log_likelihood(torch, network, network(x, c), w, y, tau, log_sigma)
        log_likelihood = (log_likelihood if kept is None else log_likelihood[kept]).sum()
        loss = -(log_likelihood - kl) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 10.0)
        optimiser.step()
    network.eval()
    order = np.argsort(network.tau_mean.detach().cpu().numpy(), kind="stable")
    if masses is not None:   # each cluster's mean untreated outcome of the continuous part, where its effect is read
        with torch.no_grad():
            log_pi, mu0, _ = network(x, c)
        pi, mu0 = log_pi.exp().cpu().numpy().astype(float), y_mean + y_sd * mu0.cpu().numpy().astype(float)
        masses.baseline = (pi * mu0[:, None]).sum(axis=0) / np.maximum(pi.sum(axis=0), 1e-12)
        tau = network.tau_mean.detach().cpu().numpy().astype(float) * y_sd
        # The clusters numbered by their effect on the mean (the order of tau where the baselines are equal).
        order = np.argsort(masses.effect(tau, np.zeros_like(tau), masses.baseline)[0], kind="stable")
    return ClusterFit(network=network, n_clusters=n_clusters, y_mean=y_mean, y_sd=y_sd, order=order,
                      noise_start=noise_start, point_masses=masses)


def choose_n_clusters(features, covariates, treated, outcome, folds, max_clusters=4, seed=42, tick=None,
                      **fit_options):
    """Held-out predictive log-likelihood of K = 1..max_clusters, cross-fitted on ``folds``.

    Returns (chosen K, table rows (K, mean held-out log-likelihood per unit, its SE)). The
    chosen K is the smallest whose log-likelihood is within one SE (of the difference
    with the best K) of the best: more clusters must earn their place.
    """
    from .crossfit import crossfit

    covariates = covariate_matrix(covariates, len(outcome))
    rows, per_unit = [], {}
    for k in range(1, max_clusters + 1):
        def held_out_likelihood(train, test, k=k):
            fit = fit_clusters(features[train], covariates[train], treated[train], outcome[train], k, seed=seed,
                               **fit_options)
            return fit.log_likelihood(features[test], covariates[test], treated[test], outcome[test])

        ll = per_unit[k] = crossfit(held_out_likelihood, folds, progress=None if tick is None else
                                    lambda j, n_folds, k=k: tick(f"Choosing K: K = {k}, fold {j + 1}"))
        rows.append((k, float(ll.mean()), float(ll.std(ddof=1) / np.sqrt(len(ll)))))
    best = max(per_unit, key=lambda k: per_unit[k].mean())
    for k in sorted(per_unit):
        gap = per_unit[best] - per_unit[k]
        if gap.mean() <= gap.std(ddof=1) / np.sqrt(len(gap)):
            return k, rows
    return best, rows


#: K > 1 is kept only when the held-out test of the clusters' effects rejects at this level (issue 24).
CLUSTER_TEST_ALPHA = 0.05


def sequential_cluster_fits(features, covariates, treated, outcome, n_clusters, folds, seed=42, tick=None,
                            **fit_options):
    """The sequential walk's models (issue 24): for each fold k >= 2 (core.crossfit.Folds.sequential, the order
    the sequential tests take), a K-cluster model fit on folds 1..k-1 alone. Returns [(test, probabilities,
    effects)]: fold k's mask, its units' cluster probabilities (m, K) and the model's effects tau_1..K. No model
    saw the fold it describes, nor any later fold: what cluster_effect_test and indistinct_neighbours need."""
    from .crossfit import Folds

    covariates = covariate_matrix(covariates, len(outcome))
    steps = []
    for _, train, test in Folds(folds).require(2, "The held-out test of the clusters").sequential():
        fit = fit_clusters(features[train], covariates[train], treated[train], outcome[train], n_clusters, seed=seed,
                           **fit_options)
        if tick is not None:
            tick(f"Testing K = {n_clusters} on held-out units")
        steps.append((test, fit.probabilities(features[test], covariates[test]), np.asarray(fit.effects()[0])))
    return steps


def cluster_effect_test(features, covariates, treated, outcome, n_clusters, scores, folds, groups, seed=42,
                        rerandomization=None, tick=None, n_draws=200, steps=None, **fit_options):
    """Do the effects of a K-cluster model differ in units it did not see? The sequential cross-fold AUTOC test
    (core.evaluate.sequential_rate_test, the valid test estimatecate uses) of the model's CATE: each fold k >= 2
    is ranked by a K-cluster model fit on folds 1..k-1 alone (sum_j pi_ij tau_j; ``steps``: those models'
    sequential_cluster_fits, fitted here when None) and scored with the cross-fitted DR ``scores``; the
    bootstrap and SEs are clustered by ``groups`` (and re-randomized as the design assigned treatment,
    ``rerandomization``). A mixture that fits the outcome's shape (a point mass of zeros, a long tail) ranks
    held-out units no better than chance, so the test does not reject (issue 24: a zero-inflated null trial
    gave K = 4 by likelihood alone). Returns the HeterogeneityTest."""
    from .evaluate import sequential_rate_test

    if steps is None:
        steps = sequential_cluster_fits(features, covariates, treated, outcome, n_clusters, folds, seed, tick,
                                        **fit_options)
    from .crossfit import Folds

    if len(steps) != len(Folds(folds)) - 1:
        raise ValueError(f"{len(steps)} sequential fits for {len(Folds(folds))} folds (sequential_cluster_fits)")
    walk = iter(steps)

    def priority_for(train, test):
        held, probabilities, effects = next(walk)
        if not np.array_equal(held, test):
            raise ValueError("The sequential fits do not follow the test's walk of the folds.")
        return probabilities @ effects

    return sequential_rate_test(scores, folds, priority_for, "AUTOC", clusters=groups, names=["cluster model"],
                                n_draws=n_draws, seed=seed, rerandomization=rerandomization)[0]


def held_out_cluster_effect(scores, assigned, cluster, groups):
    """(doubly robust effect, its cluster-robust SE, units) of the units assigned to ``cluster`` on held-out folds
    (``assigned``: each unit's most likely cluster from the model that did not see it): the effect the data
    support, which users should quote, next to the model's own tau_k."""
    from .scores import mean_and_se

    inside = np.asarray(assigned) == cluster
    if inside.sum() < 2:
        return (float("nan"), float("nan"), int(inside.sum()))
    estimate, std_err = mean_and_se(np.asarray(scores)[inside], np.asarray(groups)[inside])
    return (float(estimate), float(std_err), int(inside.sum()))


def forest_informed_assignment(probabilities, forest_cate, forest_se, folds, effects=None, steps=ASSIGNMENT_STEPS):
    """Each unit's cluster from both out-of-fold views of it (issue 24): the cluster model's probabilities from its
    image and covariates (``probabilities`` (n, K), pi_ik, the prior) and the causal forest's estimate of its effect
    (``forest_cate`` tau_hat_i with its SE s_i, a noisy measurement of its cluster's effect c_k):

        P(Z_i = k | image_i, tau_hat_i) proportional to pi_ik N(tau_hat_i; c_k, s_i^2 + omega^2),

    omega^2 the part of the forest's error its SE leaves out (its smoothing bias, its calibration's noise). The
    centres c_k and omega^2 are fitted by expectation-maximisation within each held-out fold, on that fold's units
    alone, starting from ``effects`` (n, K: the effects of the cluster model that gave each unit's probabilities;
    None: from the prior as the responsibilities). A fold's probabilities, effects and forest effects come from
    models that did not see the fold, so, given K, no unit's cluster depends on an outcome of its fold. Clusters
    keep the model's numbering (1 = the smallest effect in the model). An SE below half the fold's median is
    raised to it; a unit whose forest effect or SE is not finite keeps the model's probabilities. Both views read
    the same image features, so the posterior is an ensemble's assignment, not a probability to quote.
    Returns (posterior (n, K), group (n,) numbered 1..K, centres (folds, K), omega (folds,))."""
    from .crossfit import Folds, crossfit

    prior = np.clip(np.asarray(probabilities, float), 1e-12, None)
    prior = prior / prior.sum(axis=1, keepdims=True)
    cate, se = np.asarray(forest_cate, float), np.asarray(forest_se, float)
    usable = np.isfinite(cate) & np.isfinite(se) & (se >= 0) & np.isfinite(prior).all(axis=1)
    k = prior.shape[1]

    def assign(_, test):   # the held-out fold alone: its centres, omega and posterior
        held = np.flatnonzero(test & usable)
        posterior = prior[test].copy()
        if not len(held):
            return posterior, np.full((int(test.sum()), k), np.nan), np.full(int(test.sum()), np.nan)
        x, prior_held = cate[held], prior[held]
        floor = 0.5 * float(np.median(se[held]))
        noise = np.maximum(se[held], floor if floor > 0 else 1e-12) ** 2
        centre = np.full(k, x.mean()) if effects is None else np.asarray(effects, float)[held].mean(axis=0)
        extra, responsibility = 0.0, None
        for _ in range(steps):
            variance = (noise + extra)[:, None]
            if responsibility is not None:   # M step; a cluster without units in the fold keeps its centre
                weight = responsibility / variance
                total = weight.sum(axis=0)
                centre = np.where(total > 0, (weight * x[:, None]).sum(axis=0) / np.maximum(total, 1e-300), centre)
                # omega^2 by its moment: the spread about the centres beyond the forest's own variance
                extra = max(float(np.mean((responsibility * (x[:, None] - centre) ** 2).sum(axis=1) - noise)), 0.0)
                variance = (noise + extra)[:, None]
            log_post = np.log(prior_held) - 0.5 * (x[:, None] - centre) ** 2 / variance
            log_post -= log_post.max(axis=1, keepdims=True)
            responsibility = np.exp(log_post)
            responsibility /= responsibility.sum(axis=1, keepdims=True)
        posterior[np.searchsorted(np.flatnonzero(test), held)] = responsibility
        return posterior, np.tile(centre, (int(test.sum()), 1)), np.full(int(test.sum()), np.sqrt(extra))

    fold_ids = Folds(folds)
    posterior, centre_rows, omega_rows = crossfit(assign, fold_ids)
    first = np.unique(fold_ids.fold, return_index=True)[1]       # one row per fold, in the folds' order
    return posterior, posterior.argmax(axis=1) + 1, centre_rows[first], omega_rows[first]


def typical_units(probabilities, group, per_cluster=1):
    """For each cluster k (0-based column of ``probabilities``), the ``per_cluster`` units most typical of it: among
    the units whose ``group`` is k + 1, those with the highest probability of k (most first). A unit another cluster
    holds is never shown as this one's (the forest-informed assignment can give a unit a group other than its most
    probable cluster); a cluster that holds no unit gets none. Units whose probabilities or group are missing
    (NaN) are skipped. Returns a list of K integer arrays."""
    probabilities = np.asarray(probabilities, float)
    group = np.asarray(group, float)
    chosen = []
    for k in range(probabilities.shape[1]):
        inside = np.flatnonzero((group == k + 1) & np.isfinite(probabilities[:, k]))
        chosen.append(inside[np.argsort(-probabilities[inside, k], kind="stable")][:per_cluster])
    return chosen


def assigned_by_effect(probabilities, effects):
    """Each unit's most likely cluster, numbered 1..K in the order of the model's effects (1 = smallest)."""
    rank = np.empty(len(effects), int)
    rank[np.argsort(np.asarray(effects), kind="stable")] = np.arange(1, len(effects) + 1)
    return rank[np.argmax(np.asarray(probabilities), axis=1)]


def indistinct_neighbours(scores, steps, n_clusters, groups, alpha=None):
    """The first pair of neighbouring clusters (j, j + 1, in the order of their effects) whose held-out doubly
    robust effects are not shown to rise at level ``alpha`` (default CLUSTER_TEST_ALPHA): (j, j + 1, p-value), or
    None when every neighbour's does (issue 24, point 2).

    Sequential, as the heterogeneity test is: ``steps`` holds, for each fold k >= 2, (fold k's mask, its units'
    clusters 1..K by effect: assigned_by_effect) from a model fit on folds 1..k-1 alone
    (sequential_cluster_fits). In fold k alone, cluster j + 1's mean DR score (``scores``, cross-fitted) less
    cluster j's gets a cluster-robust SE (CR1 by ``groups``, core.scores.mean_and_se of its influence), its t
    read with C - 1 degrees of freedom, C the groups of the smaller side (core.evaluate.small_sample_z; the
    pooled count over-rejected when clusters are whole spatial blocks: 7-8 % at 5 %, about 2-4 % with the
    smaller side's); the folds' t are summed over sqrt(their number). Given the earlier folds, fold k's
    assignment does not depend on its own outcomes, so each fold's t is centred at 0 when the two clusters'
    effects are equal and the sum keeps its level approximately (which folds can be compared depends on the
    earlier folds, and the DR scores' outcome models saw later folds, as in the sequential AUTOC test); the test
    is one-sided, since the model claims j + 1 has the larger effect. A fold where either cluster holds
    fewer than 2 units or groups is left out; where neither has spread, their means alone decide (t = +-inf, or
    left out when equal); with no fold left, or spreadless folds that disagree, the p-value is NaN. The earlier
    version pooled every unit's out-of-fold assignment, from models that saw the other folds' outcomes: it kept
    equal clusters apart in 16.7 % of null trials at 5 % (bench_clusters.py merge-level)."""
    from scipy.stats import norm

    from .evaluate import small_sample_z
    from .scores import mean_and_se

    alpha = CLUSTER_TEST_ALPHA if alpha is None else alpha
    scores, groups = np.asarray(scores, float), np.asarray(groups)
    for j in range(1, int(n_clusters)):
        t_stats = []
        for test, assigned in steps:
            fold_scores, fold_groups = scores[test], groups[test]
            low, high = np.asarray(assigned) == j, np.asarray(assigned) == j + 1
            if min(len(np.unique(fold_groups[low])), len(np.unique(fold_groups[high])), low.sum(), high.sum()) < 2:
                continue
            both = low | high
            # Each unit's part of (mean of high) - (mean of low), times the units of both: mean_and_se's mean is
            # then 0 and its SE the difference's CR1 SE (groups that hold units of both clusters included).
            influence = np.where(high, (fold_scores - fold_scores[high].mean()) / high.sum(),
                                 -(fold_scores - fold_scores[low].mean()) / low.sum())[both] * both.sum()
            se = mean_and_se(influence, fold_groups[both])[1]
            difference = fold_scores[high].mean() - fold_scores[low].mean()
            if se > 0:   # degrees of freedom of the smaller side: its few groups set the variance's noise
                t_stats.append(small_sample_z(difference / se, min(len(np.unique(fold_groups[low])),
                                                                   len(np.unique(fold_groups[high])))))
            elif difference != 0:      # no spread in either cluster: the means alone say which is larger
                t_stats.append(np.copysign(np.inf, difference))
        total = np.sum(t_stats) / np.sqrt(len(t_stats)) if t_stats else float("nan")
        if np.isnan(total):            # no fold to compare in (or folds whose spreadless means disagree)
            return j, j + 1, float("nan")
        p_value = float(norm.sf(total))
        if p_value >= alpha:
            return j, j + 1, p_value
    return None


#: A cluster holding less than this share of the units (mean probability) is empty: it is dropped.
MIN_CLUSTER_SHARE = 0.01


def without_empty_clusters(fit_k, n_clusters, probabilities_of, min_share=MIN_CLUSTER_SHARE):
    """The final model with no empty cluster: (fit, K).

    fit_k(K) fits a K-cluster model; probabilities_of(fit) gives its (n, K)
    cluster probabilities. A model whose cluster holds under ``min_share`` of
    the units (it describes no one, yet would be reported with an effect and
    an interval) is refit with that many fewer clusters.
    """
    while True:
        fit = fit_k(n_clusters)
        empty = int((np.asarray(probabilities_of(fit)).mean(axis=0) < min_share).sum())
        if not empty or n_clusters == 1:
            return fit, n_clusters
        n_clusters = max(n_clusters - empty, 1)


def covariate_matrix(covariates, n):
    return np.zeros((n, 0)) if covariates is None else np.asarray(covariates, float).reshape(n, -1)


def cross_fitted_clusters(features, covariates, treated, outcome, n_clusters, folds, samples=50, seed=42,
                          tick=None, **fit_options):
    """Out-of-fold cluster probabilities and CATE with MC-dropout + posterior intervals.

    For each fold, a model fit on the other folds gives, for the fold's units,
    pi (posterior mean of S dropout draws) and draws of CATE_i = sum_k pi_ik tau_k
    with tau_k drawn from its posterior; the interval is the 2.5-97.5 % range
    of the draws and the SE their sd; ``effects`` holds the fold model's cluster effects for each of its units.
    Returns dict of (n,) / (n, K) arrays.
    """
    n = len(outcome)
    if n_clusters < 1:
        raise GeoCateError("The number of clusters must be at least 1.", "Set CLUSTERS to 0 (choose) or more.")
    from .crossfit import crossfit

    covariates = covariate_matrix(covariates, n)
    rng = np.random.default_rng(seed)

    def fit_predict(train, test):
        fit = fit_clusters(features[train], covariates[train], treated[train], outcome[train], n_clusters,
                           seed=seed, **fit_options)
        draws = fit.probabilities(features[test], covariates[test], samples=samples, seed=seed)   # (S, m, K)
        tau_mean, tau_sd = fit.effects()
        tau_draws = tau_mean + tau_sd * rng.standard_normal((samples, n_clusters))                # (S, K)
        cate_draws = np.einsum("smk,sk->sm", draws, tau_draws)
        low, high = np.percentile(cate_draws, [2.5, 97.5], axis=0)
        probabilities = draws.mean(axis=0).astype(float)   # the CATE in double precision, as before issue 20
        return (probabilities, probabilities @ tau_mean, low, high, cate_draws.std(axis=0, ddof=1),
                np.tile(tau_mean, (len(probabilities), 1)))

    probabilities, cate, low, high, se, effects = crossfit(
        fit_predict, folds, progress=None if tick is None else lambda j, n_folds: tick(f"Cluster model: fold {j + 1}"))
    return {"probabilities": probabilities, "cate": cate, "cate_lo": low, "cate_hi": high, "cate_se": se,
            "group": probabilities.argmax(axis=1) + 1, "effects": effects}


def feature_scaling(features):
    """(mean, sd) of the feature pipeline's output (log1p of MOSAIKS responses), the standardisation design_matrix
    applies to image features."""
    features = np.asarray(features, float)
    sd = features.std(axis=0)
    return features.mean(axis=0), np.where(sd > 0, sd, 1.0)


def cluster_table(fit, features, covariates):
    """Rows per cluster: (cluster, effect mean, 95 % low, high, share of units, sigma control, sigma treated).

    The share is the mean cluster probability over the units (features, covariates); sigmas: ClusterFit.sigmas.
    """
    mean, sd = fit.effects()
    sigmas = fit.sigmas(features, covariates)
    share = fit.probabilities(features, covariates).mean(axis=0)
    return [(k + 1, float(mean[k]), float(mean[k] - Z95 * sd[k]), float(mean[k] + Z95 * sd[k]),
             float(share[k]), float(sigmas[k, 0]), float(sigmas[k, 1])) for k in range(fit.n_clusters)]


def image_model(fit, scaler, embedder, feature_mean, feature_sd, covariate_mean=(), covariate_sd=()):
    """The whole network, raw image window (n, bands, h, w) and raw covariates (n, p) -> cluster probabilities (n, K).

    Band scaling (BandScaler), the MOSAIKS convolution and pooling (RandomConvFeatures,
    bias 0), the feature standardisation and the trained head, in one torch module:
    differentiable in the image (salience) and exportable to ONNX.
    """
    torch = _torch()
    if embedder.bias != 0:
        raise GeoCateError("The image model needs MOSAIKS features with bias 0.", "Use the default bias.")

    def buffer(values):
        return torch.as_tensor(np.asarray(values), dtype=torch.float32)

    network = fit.network.cpu().eval()

    class ImageToProbabilities(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("median", buffer(scaler.median_)[None, :, None, None])
            self.register_buffer("spread", buffer(np.maximum(scaler.high_ - scaler.low_, 1e-12))[None, :, None, None])
            self.register_buffer("weight", buffer(embedder.weight_))
            self.register_buffer("offset", buffer(embedder.offset_)[None, :, None, None])
            self.register_buffer("feature_mean", buffer(feature_mean)[None, :])
            self.register_buffer("feature_sd", buffer(feature_sd)[None, :])
            self.register_buffer("order", torch.as_tensor(fit.order, dtype=torch.long))
            self.register_buffer("covariate_mean", buffer(np.asarray(covariate_mean, float).reshape(1, -1)))
            self.register_buffer("covariate_sd", buffer(np.asarray(covariate_sd, float).reshape(1, -1)))
            self.clip = float(scaler.clip)
            self.trunk = network.trunk
            self.cluster_head = network.cluster_head

        def forward(self, image, covariates):
            scaled = torch.clamp((image - self.median) / self.spread, -self.clip, self.clip)
            response = torch.nn.functional.conv2d(scaled, self.weight) - self.offset
            magnitude, signed = response.abs().mean(dim=(2, 3)), response.mean(dim=(2, 3))
            pooled = torch.cat([(magnitude + signed) / 2, (magnitude - signed) / 2], dim=1)
            features = (torch.log1p(torch.clamp(pooled, min=0)) - self.feature_mean) / self.feature_sd
            covariates = (covariates - self.covariate_mean) / self.covariate_sd
            logits = self.cluster_head(torch.cat([self.trunk(features), covariates], dim=1))
            return torch.softmax(logits, dim=1)[:, self.order]

    return ImageToProbabilities().eval()


def export_onnx(model, path, bands, window_size_px, n_covariates, metadata):
    """Write the image model to ``path`` (ONNX) and what reusing it needs to ``path``.json (no pickles)."""
    import json

    torch = _torch()
    image = torch.zeros(2, bands, window_size_px, window_size_px)
    covariates = torch.zeros(2, n_covariates)
    tmp = path + ".tmp"
    torch.onnx.export(model, (image, covariates), tmp, input_names=["image", "covariates"],
                      output_names=["probabilities"], dynamic_axes={"image": {0: "n"}, "covariates": {0: "n"},
                                                                    "probabilities": {0: "n"}},
                      opset_version=17, dynamo=False)
    import os

    description = dict(metadata, bands=int(bands), window_size_px=int(window_size_px),
                       n_covariates=int(n_covariates), inputs=["image", "covariates"], outputs=["probabilities"],
                       image_layout="(n, bands, window, window), raw pixel values; band scaling is inside the model",
                       sha256=file_digest(tmp))
    with open(tmp + ".json", "w", encoding="utf-8") as handle:
        json.dump(description, handle, indent=2, default=str)
    os.replace(tmp + ".json", path + ".json")
    os.replace(tmp, path)
    return path


#: What a model's description must hold to be applied.
DESCRIPTION_KEYS = ("bands", "window_size_px", "n_covariates", "sha256")


def check_description(description, session, where):
    """A model's description agrees with itself and with the ONNX graph it describes (a hand-edited description
    otherwise surfaced as onnxruntime's InvalidArgument or a KeyError deep in a map run)."""
    fix = "Run 'Find effect clusters in imagery' again to write a new model (do not edit its .json by hand)."

    def count(name, minimum=0):
        value = description.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise GeoCateError(f"The model description '{where}' gives {name} = {value!r}: not a whole number of at "
                               f"least {minimum}.", fix)
        return value

    bands, window, n_cov = count("bands", 1), count("window_size_px", 3), count("n_covariates")
    shapes = {i.name: i.shape for i in session.get_inputs()}
    image, covariates = shapes.get("image"), shapes.get("covariates")   # an unused covariates input is dropped
    if image is None or len(image) != 4 or (covariates is not None and len(covariates) != 2):
        raise GeoCateError(f"The model '{where}' does not take the inputs a GeoCATE cluster model takes.", fix)
    checks = [("bands", bands, image[1]), ("window_size_px", window, image[2]), ("window_size_px", window, image[3])]
    if covariates is not None:
        checks.append(("n_covariates", n_cov, covariates[1]))
    for name, stated, actual in checks:
        if isinstance(actual, int) and actual != stated:
            raise GeoCateError(f"The model description '{where}' gives {name} = {stated}, but the model itself takes "
                               f"{actual}.", fix)
    used = description.get("bands_used")
    if used is not None and (not isinstance(used, list) or len(used) != bands
                             or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in used)):
        raise GeoCateError(f"The model description '{where}' lists bands_used = {used!r}: {bands} band number(s) "
                           "(1 = first) are needed.", fix)
    clusters = description.get("clusters")
    if clusters is not None:
        outputs = session.get_outputs()[0].shape
        k = outputs[1] if len(outputs) == 2 and isinstance(outputs[1], int) else None
        ok = isinstance(clusters, list) and all(
            isinstance(row, (list, tuple)) and len(row) > 1 and isinstance(row[1], (int, float))
            and not isinstance(row[1], bool) and np.isfinite(row[1]) for row in clusters)
        if not ok or (k is not None and len(clusters) != k):
            raise GeoCateError(f"The model description '{where}' has a damaged table of clusters (one row per "
                               "cluster, its effect a number" + (f"; the model has {k} clusters" if k else "") + ").",
                               fix)
    means = description.get("covariate_means")
    if means is not None and (not isinstance(means, list) or len(means) != n_cov or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) and np.isfinite(m) for m in means)):
        raise GeoCateError(f"The model description '{where}' has covariate_means that are not {n_cov} number(s).",
                           fix)
    pixel = description.get("pixel_size_m")
    if pixel is not None and (isinstance(pixel, bool) or not isinstance(pixel, (int, float)) or not pixel > 0):
        raise GeoCateError(f"The model description '{where}' gives pixel_size_m = {pixel!r}.", fix)


class OnnxClusterModel:
    """A saved cluster model, run with onnxruntime (CUDA provider first where present).

    Loading checks the file and its description; ``probabilities`` checks that the
    windows have the model's band count and window size.
    """

    def __init__(self, path):
        import json
        import os

        ort = require("onnxruntime", "onnxruntime==1.32.0")
        description = path + ".json"
        if not os.path.exists(path) or not os.path.exists(description):
            raise GeoCateError(f"The cluster model '{path}' (or its description '{description}') is missing.",
                               "Choose the .onnx file written by 'Find effect clusters in imagery', with its .json.")
        damaged = GeoCateError(f"The cluster model '{path}' is damaged or not a GeoCATE model (its description "
                               "is incomplete, or the file does not match the digest stored in it).",
                               "Run 'Find effect clusters in imagery' again to write a new one.")
        try:
            with open(description, encoding="utf-8") as handle:
                self.description = json.load(handle)
        except (OSError, ValueError) as exc:
            raise damaged from exc
        if not isinstance(self.description, dict) or any(key not in self.description for key in DESCRIPTION_KEYS) \
                or self.description["sha256"] != file_digest(path):
            raise damaged
        try:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as exc:  # noqa: BLE001 - any decoding error means a damaged file
            raise GeoCateError(f"The cluster model '{path}' cannot be read ({exc.__class__.__name__}).",
                               "The file is damaged or not a GeoCATE model: run 'Find effect clusters in imagery' "
                               "again to write a new one.") from exc
        self.provider = self.session.get_providers()[0]
        check_description(self.description, self.session, description)

    def probabilities(self, windows, covariates=None):
        windows = np.asarray(windows, dtype=np.float32)
        want_bands, want_size = self.description["bands"], self.description["window_size_px"]
        if windows.ndim != 4:
            raise GeoCateError(f"The model takes a stack of windows (units, bands, rows, columns), but got an array "
                               f"of shape {windows.shape}.",
                               f"Give windows of {want_bands} band(s) and {want_size} x {want_size} pixels.")
        if windows.shape[1] != want_bands or windows.shape[2:] != (want_size, want_size):
            raise GeoCateError(
                f"The model was trained on windows of {want_bands} band(s) and {want_size} x {want_size} pixels, "
                f"but got {windows.shape[1]} band(s) of {windows.shape[2]} x {windows.shape[3]}.",
                f"Use the same bands and a window size of {want_size} pixels, as when the model was made.")
        covariates = np.zeros((len(windows), self.description["n_covariates"]), np.float32) if covariates is None \
            else np.asarray(covariates, np.float32).reshape(len(windows), -1)
        names = {i.name for i in self.session.get_inputs()}   # a model without covariates may not take them
        feed = {"image": windows, "covariates": covariates}
        return self.session.run(None, {k: v for k, v in feed.items() if k in names})[0]


def salience(model, window, covariates, cluster):
    """|d pi_cluster / d image| summed over bands: (h, w), for one raw window (bands, h, w)."""
    torch = _torch()
    image = torch.as_tensor(np.asarray(window, np.float32)[None], dtype=torch.float32).requires_grad_(True)
    c = torch.as_tensor(covariate_matrix(covariates, 1), dtype=torch.float32).reshape(1, -1)
    model(image, c)[0, cluster].backward()
    return image.grad[0].abs().sum(dim=0).numpy()


def occlusion_sensitivity(model, window, covariates, cluster, grid=3, fill=None):
    """How much pi_cluster moves when each of grid x grid cells of the window is masked: (grid, grid).

    A masked cell takes ``fill`` per band (default the model's band median, i.e. a neutral value).
    """
    torch = _torch()
    window = np.asarray(window, np.float32)
    bands, h, w = window.shape
    fill = model.median.numpy().reshape(-1) if fill is None else np.asarray(fill, np.float32)
    c = torch.as_tensor(covariate_matrix(covariates, 1), dtype=torch.float32).reshape(1, -1)
    edges_r, edges_c = np.linspace(0, h, grid + 1).astype(int), np.linspace(0, w, grid + 1).astype(int)
    masked = []
    for i in range(grid):
        for j in range(grid):
            copy = window.copy()
            copy[:, edges_r[i]:edges_r[i + 1], edges_c[j]:edges_c[j + 1]] = fill[:, None, None]
            masked.append(copy)
    with torch.no_grad():
        base = model(torch.as_tensor(window[None]), c)[0, cluster].item()
        moved = model(torch.as_tensor(np.stack(masked)), c.repeat(len(masked), 1))[:, cluster].numpy()
    return (base - moved).reshape(grid, grid)


def write_salience(path, raster_path, coords, window_size_px, gradient, occlusion):
    """A 2-band GeoTIFF over the unit's window, aligned with the imagery: band 1 the gradient salience,
    band 2 the occlusion sensitivity of the grid cell each pixel belongs to."""
    from osgeo import gdal

    from .patches import raster_info, window_origin

    info = raster_info(raster_path)
    col, row = window_origin(np.asarray(coords, float).reshape(1, 2), info.geotransform, window_size_px)[0]
    gt = info.geotransform
    origin_x = gt[0] + col * gt[1] + row * gt[2]
    origin_y = gt[3] + col * gt[4] + row * gt[5]
    grid = occlusion.shape[0]
    edges = np.linspace(0, window_size_px, grid + 1).astype(int)
    cells = np.searchsorted(edges, np.arange(window_size_px), side="right") - 1
    occlusion_pixels = occlusion[cells[:, None], cells[None, :]]
    tmp = path + ".tmp.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(tmp, window_size_px, window_size_px, 2, gdal.GDT_Float32)
    dataset.SetGeoTransform((origin_x, gt[1], gt[2], origin_y, gt[4], gt[5]))
    dataset.SetProjection(info.crs_wkt)
    for band, (values, name) in enumerate(((gradient, "gradient salience"),
                                           (occlusion_pixels, "occlusion sensitivity")), start=1):
        dataset.GetRasterBand(band).WriteArray(values.astype(np.float32))
        dataset.GetRasterBand(band).SetDescription(name)
    dataset = None
    import os

    os.replace(tmp, path)
    return path

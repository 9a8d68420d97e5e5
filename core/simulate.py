"""Deterministic semi-synthetic trials on real imagery, with known treatment effects.

Units are placed at random on pixels whose whole window is usable; treatment
is assigned at random; the outcome's treatment effect depends on what each
unit's window shows, so the truth lives in the images:

    brightness_i = mean over the window's pixels and bands of log(DN)
    texture_i    = standard deviation over the window of the pixel brightness
    score_i      = z(brightness_i) + 0.5 z(texture_i)
    true_group_i = g if score_i lies in the g-th of len(effects) quantile bins
    true_cate_i  = effects[true_group_i - 1]
    Y_i = mu0_i + W_i true_cate_i + noise_sd * e_i,   e_i ~ N(0, 1)
    mu0_i = baseline_image * z(texture_i) + 0.5 X_i1 (X_i2 is irrelevant)

z() standardises over the placed units. Bright, textured windows (towns, bare
fields) gain most; dark, smooth ones (water, forest) least.
"""

from dataclasses import dataclass

import numpy as np

from .errors import GeoCateError
from .patches import extract_patches, raster_info


@dataclass(frozen=True)
class SimulatedTrial:
    """A simulated trial; coords in the raster's CRS (``crs_wkt``)."""

    coords: np.ndarray       # (n, 2)
    crs_wkt: str
    treated: np.ndarray      # (n,) 0/1 int
    outcome: np.ndarray      # (n,)
    covariates: np.ndarray   # (n, 2)
    covariate_names: tuple
    true_cate: np.ndarray    # (n,)
    true_group: np.ndarray   # (n,) 1-based
    true_mu0: np.ndarray     # (n,)
    window_size_px: int


#: Candidate windows a simulation reads at once.
SIMULATION_BATCH = 50000


def _window_statistics(patches):
    logs = np.log(np.maximum(patches.astype(np.float64), 1.0))
    pixel_brightness = logs.mean(axis=1)                       # (n, h, w)
    brightness = pixel_brightness.mean(axis=(1, 2))
    texture = pixel_brightness.std(axis=(1, 2))
    return brightness, texture


def _z(v):
    sd = v.std()
    return (v - v.mean()) / (sd if sd > 0 else 1.0)


def simulate_trial(raster_path, n_units=1000, window_size_px=33, effects=(0.0, 1.0, 2.5),
                   noise_sd=1.0, baseline_image=1.0, treated_share=0.5, seed=42,
                   bands=None, min_spacing_px=0):
    """Simulate a trial of ``n_units`` units on ``raster_path`` (see the module docstring).

    effects: the treatment effect of each image-defined group (a single value
    gives a study without heterogeneity). min_spacing_px: units are at least
    this many pixels apart (0 = no constraint).
    """
    rng = np.random.default_rng(seed)
    info = raster_info(raster_path)
    half = window_size_px // 2
    gt = info.geotransform
    spacing = max(min_spacing_px, 1)
    # Units stand at pixels half..size-half-1 of each axis, in cells (pixel // spacing): the distinct cells per axis.
    cells = int(np.prod([max((size - half - 1) // spacing - half // spacing + 1, 0) if size > 2 * half else 0
                         for size in (info.width, info.height)]))
    if n_units > cells:   # units need distinct cells: say so now, not after 50 rounds of reading
        raise GeoCateError(
            f"'{raster_path}' has room for at most {cells:,} units {window_size_px} pixels wide"
            f"{f' and {min_spacing_px} pixels apart' if min_spacing_px else ' at distinct pixels'}; "
            f"{n_units:,} were asked for.",
            "Use fewer units, a smaller window or spacing, or a larger raster.")
    chosen_xy, chosen_stats = [], []
    taken = set()
    attempts = 0
    while sum(len(c) for c in chosen_xy) < n_units:
        attempts += 1
        if attempts > 50:
            raise GeoCateError(
                f"Could not place {n_units} units with usable windows on '{raster_path}'.",
                "Use fewer units, a smaller window or a larger raster.",
            )
        m = 2 * n_units
        col = rng.integers(half, info.width - half, m)
        row = rng.integers(half, info.height - half, m)
        x = gt[0] + (col + 0.5) * gt[1] + (row + 0.5) * gt[2]
        y = gt[3] + (col + 0.5) * gt[4] + (row + 0.5) * gt[5]
        # Candidates are read a batch at a time and only their coordinates and window statistics kept: at 300,000
        # units all 600,000 candidate windows at once took 24 GB (bench_scaling.py).
        for start in range(0, m, SIMULATION_BATCH):
            part = slice(start, min(start + SIMULATION_BATCH, m))
            found = extract_patches(raster_path, np.column_stack([x[part], y[part]]), info.crs_wkt, bands,
                                    window_size_px)
            keep = []
            for i in np.flatnonzero(found.ok):
                cell = (int(col[part][i]) // max(min_spacing_px, 1), int(row[part][i]) // max(min_spacing_px, 1))
                if cell in taken:
                    continue
                taken.add(cell)
                keep.append(i)
            chosen_xy.append(found.coords[keep])
            chosen_stats.append(np.column_stack(_window_statistics(found.patches[keep])))
            del found
    coords = np.concatenate(chosen_xy)[:n_units]
    brightness, texture = np.concatenate(chosen_stats)[:n_units].T
    score = _z(brightness) + 0.5 * _z(texture)
    effects = np.atleast_1d(np.asarray(effects, dtype=float))
    edges = np.quantile(score, np.linspace(0, 1, len(effects) + 1)[1:-1])
    true_group = np.searchsorted(edges, score, side="right") + 1
    true_cate = effects[true_group - 1]

    covariates = rng.standard_normal((n_units, 2))
    treated = (rng.permutation(n_units) < round(treated_share * n_units)).astype(int)
    true_mu0 = baseline_image * _z(texture) + 0.5 * covariates[:, 0]
    outcome = true_mu0 + treated * true_cate + noise_sd * rng.standard_normal(n_units)
    return SimulatedTrial(
        coords=coords, crs_wkt=info.crs_wkt, treated=treated, outcome=outcome,
        covariates=covariates, covariate_names=("assets", "distance"),
        true_cate=true_cate, true_group=true_group, true_mu0=true_mu0,
        window_size_px=window_size_px,
    )


@dataclass(frozen=True)
class PredictedOutcomeWorld:
    """A world where the outcome is taken from a map predicted from imagery ("One Map, Many Trials").

    A unit's latent state s = 0.8 s0 + 0.6 z (z: a survey covariate) is its
    true outcome, y = s. Its image is seen through ``n_features`` noisy
    features x_j = s + nu_j (nu_j ~ N(0, feature_noise^2)), so the map (a
    ridge regression of y on x, fit on ``n_train`` units) predicts
    E[y | image]: shrunk toward the mean. ``validation`` holds the map makers'
    validation units (truth and prediction). A trial moves s by tau on its
    treated units: the truth gains tau, the map sees only part of it.
    """

    model: object
    feature_noise: float
    prediction_noise: float
    n_features: int
    validation_truth: np.ndarray
    validation_prediction: np.ndarray
    seed: int

    def draw(self, rng, n, tau=0.0, treated=None):
        """(truth, prediction, covariate) of n new units, treated ones moved by tau."""
        s0, z = rng.standard_normal(n), rng.standard_normal(n)
        s = 0.8 * s0 + 0.6 * z + (tau * np.asarray(treated, float) if treated is not None else 0.0)
        x = s[:, None] + self.feature_noise * rng.standard_normal((n, self.n_features))
        prediction = self.model.predict(x) + self.prediction_noise * rng.standard_normal(n)
        return s, prediction, z

    def trial(self, n_units, tau, seed):
        """A randomized trial on the map: (treated, truth, prediction, covariate)."""
        rng = np.random.default_rng(seed)
        treated = (rng.permutation(n_units) < n_units // 2).astype(int)
        truth, prediction, z = self.draw(rng, n_units, tau, treated)
        return treated, truth, prediction, z


def simulate_predicted_outcome_world(seed=0, n_features=20, feature_noise=4.0, prediction_noise=0.1,
                                     n_train=2000, n_validation=1000):
    """The map and its validation units (see PredictedOutcomeWorld)."""
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(seed)
    world = PredictedOutcomeWorld(model=None, feature_noise=feature_noise, prediction_noise=prediction_noise,
                                  n_features=n_features, validation_truth=np.empty(0),
                                  validation_prediction=np.empty(0), seed=seed)
    s0, z = rng.standard_normal(n_train), rng.standard_normal(n_train)
    s = 0.8 * s0 + 0.6 * z
    x = s[:, None] + feature_noise * rng.standard_normal((n_train, n_features))
    model = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x, s)
    import dataclasses

    world = dataclasses.replace(world, model=model)
    truth, prediction, _ = world.draw(rng, n_validation)
    return dataclasses.replace(world, validation_truth=truth, validation_prediction=prediction)


def confound(trial, seed=0, strength=1.2, effect=1.0, baseline=1.5, image=None):
    """A confounded study on the units of a simulated trial: treatment more likely where the image shows
    settlement (bright, textured windows: logit P(W = 1) = strength z(texture)), and the outcome also driven by
    the image: Y = baseline mu0 + effect W + noise, mu0 the trial's image-and-covariate baseline.
    image: (n,) another quantity the windows show, which then confounds in texture's place (z(image) in the
    propensity and in mu0 = z(image) + 0.5 X1; e.g. built_up_share). Returns (treated, outcome, propensity); the
    true ATE is ``effect``."""
    rng = np.random.default_rng(seed)
    image_part = image_confounder(trial, image)
    mu0 = trial.true_mu0 if image is None else image_part + 0.5 * trial.covariates[:, 0]
    propensity = 1 / (1 + np.exp(-strength * image_part))
    treated = (rng.random(len(propensity)) < propensity).astype(int)
    outcome = baseline * mu0 + effect * treated + rng.standard_normal(len(propensity))
    return treated, outcome, propensity


def image_confounder(trial, image=None):
    """(n,) what confounds in confound's study: z(texture), the part of the trial's baseline the window shows, or
    z(image) when ``image`` is given."""
    if image is None:
        return trial.true_mu0 - 0.5 * trial.covariates[:, 0]
    return _z(np.asarray(image, float))


def built_up_share(patches, quantile=0.9):
    """(n,) each window's share of pixels brighter than the ``quantile`` of all the windows' pixel brightness (the
    mean over bands): a stand-in for the share of roofs and bare ground, for a confounder (confound's ``image``)
    that neither the scene design's texture nor the windows' band statistics describe."""
    brightness = np.asarray(patches, np.float64).mean(axis=1)     # (n, h, w)
    return (brightness > np.quantile(brightness, quantile)).mean(axis=(1, 2))


def confounded_villages(seed=0, villages=80, size=8, assignment="village"):
    """An observational study of units in villages: ``villages`` villages of ``size`` units; a village trait V
    (observed, e.g. market access) confounds treatment and outcome; a unit covariate X; outcome
    Y = (1 + V / 2) W + V + V^2 / 2 + X + u + noise, u a village shock, u and noise N(0, 1). ``assignment``
    "village": the programme reaches whole villages, logit P(W) = V; "unit": units within villages,
    logit P(W) = V + X / 2. Returns (outcome, treated, inputs (V, X), village, true ATE = 1)."""
    if assignment not in ("village", "unit"):
        raise GeoCateError(f"Unknown assignment '{assignment}'.", "Use village or unit.")
    rng = np.random.default_rng(seed)
    village = np.repeat(np.arange(villages), size)
    V = rng.standard_normal(villages)[village]
    X = rng.standard_normal(len(village))
    if assignment == "village":
        W = (rng.random(villages) < 1 / (1 + np.exp(-V[::size]))).astype(int)[village]
    else:
        W = (rng.random(len(village)) < 1 / (1 + np.exp(-(V + X / 2)))).astype(int)
    u = rng.standard_normal(villages)[village]
    Y = (1 + V / 2) * W + V + V ** 2 / 2 + X + u + rng.standard_normal(len(village))
    return Y, W, np.column_stack([V, X]), village, 1.0


def simulate_panel(n_units=500, n_periods=10, n_covariates=30, theta=0.5, design="linear", seed=0,
                   year_shocks=0.0):
    """The partially linear panel designs of Clarke & Polselli (2025), written from their description:

        Y_it = theta D_it + l(X_it) + alpha_i + U_it,   D_it = m(X_it) + c_i + V_it,
        alpha_i = 0.25 (mean_t D_it - mean D) + 0.25 mean_t (X_it1 + X_it3) + a_i,

    X_itp ~ N(0, 5), a_i ~ N(0, 0.95), c_i, U, V ~ N(0, 1); only X1 and X3
    matter. year_shocks > 0 adds period effects as applied panels have them (droughts, booms): uneven shocks
    s_t that trend upward, s_t = year_shocks (2 t / T + N(0, 0.5^2)), entering the treatment (D + s_t: the
    programme grows in good years) and the outcome (Y + 2 s_t), so that ignoring them biases theta.
    design "linear": l = m = 0.25 X1 + X3; "smooth": l = expit(X1) +
    0.25 cos(X3), m = cos(X1) + 0.25 expit(X3); "discontinuous": l = 0.5 X1 X3 +
    0.25 X3 1{X3 > 0}, m = 0.25 X1 1{X1 > 0} + 0.5 X1 X3. Returns (unit, time,
    D, Y, X) in long format, sorted by unit then time.
    """
    rng = np.random.default_rng(seed)
    n = n_units * n_periods
    unit, time = np.repeat(np.arange(n_units), n_periods), np.tile(np.arange(1, n_periods + 1), n_units)
    a_i = np.repeat(rng.normal(0, np.sqrt(0.95), n_units), n_periods)
    c_i = np.repeat(rng.standard_normal(n_units), n_periods)
    X = rng.normal(0, np.sqrt(5), (n, n_covariates))
    x1, x3 = X[:, 0], X[:, 2]
    expit = 1 / (1 + np.exp(-x1)), 1 / (1 + np.exp(-x3))
    if design == "linear":
        l0 = m0 = 0.25 * x1 + x3
    elif design == "smooth":
        l0, m0 = expit[0] + 0.25 * np.cos(x3), np.cos(x1) + 0.25 * expit[1]
    elif design == "discontinuous":
        l0 = 0.5 * x1 * x3 + 0.25 * x3 * (x3 > 0)
        m0 = 0.25 * x1 * (x1 > 0) + 0.5 * x1 * x3
    else:
        raise GeoCateError(f"Unknown panel design '{design}'.", "Use linear, smooth or discontinuous.")
    D = m0 + c_i + rng.standard_normal(n)
    shocks = np.zeros(n)
    if year_shocks:
        per_period = year_shocks * (2 * np.arange(1, n_periods + 1) / n_periods + rng.normal(0, 0.5, n_periods))
        shocks = per_period[time - 1]
        D = D + shocks
    unit_mean_d = np.repeat(D.reshape(n_units, n_periods).mean(axis=1), n_periods)
    unit_mean_x = np.repeat((x1 + x3).reshape(n_units, n_periods).mean(axis=1), n_periods)
    alpha = 0.25 * (unit_mean_d - D.mean()) + 0.25 * unit_mean_x + a_i
    Y = theta * D + l0 + alpha + 2 * shocks + rng.standard_normal(n)
    return unit, time, D, Y, X


def simulate_context_trial(raster_path, n_units=1000, window_size_px=33, context_px=161, noise_sd=1.0, seed=42,
                           effect_sd=1.0):
    """A trial whose effect depends on the unit's own window and on its wider surroundings (the multi-scale design).

        true_cate_i = 1 + effect_sd (z(texture of the own window) + z(surroundings_i)) / sqrt(2)
        Y_i = 0.5 X_i1 + z(brightness of the own window) + W_i true_cate_i + noise_sd e_i

    texture and brightness as in simulate_trial; surroundings_i is the mean
    brightness of the ring between the own window and the ``context_px`` window
    around it, less its linear prediction from the own window's brightness: what
    the surroundings say that the unit's own window does not (e.g. a settlement
    or water share within a few kilometres). Units are placed where the context
    window is whole. Returns a SimulatedTrial (window_size_px: the own window;
    true_group 1/2: effect below/above the median)."""
    placed = simulate_trial(raster_path, n_units, context_px, seed=seed)
    info = raster_info(raster_path)
    own = extract_patches(raster_path, placed.coords, info.crs_wkt, None, window_size_px).patches
    context = extract_patches(raster_path, placed.coords, info.crs_wkt, None, context_px).patches
    own_brightness, own_texture = _window_statistics(own)
    n_own, n_context = window_size_px ** 2, context_px ** 2
    ring = (_window_statistics(context)[0] * n_context - own_brightness * n_own) / (n_context - n_own)
    slope, intercept = np.polyfit(own_brightness, ring, 1)
    surroundings = ring - (slope * own_brightness + intercept)
    rng = np.random.default_rng(seed + 1)
    true_cate = 1 + effect_sd * (_z(own_texture) + _z(surroundings)) / np.sqrt(2)
    covariates = rng.standard_normal((n_units, 2))
    treated = (rng.permutation(n_units) < n_units // 2).astype(int)
    true_mu0 = 0.5 * covariates[:, 0] + _z(own_brightness)
    outcome = true_mu0 + treated * true_cate + noise_sd * rng.standard_normal(n_units)
    return SimulatedTrial(coords=placed.coords, crs_wkt=info.crs_wkt, treated=treated, outcome=outcome,
                          covariates=covariates, covariate_names=("assets", "distance"), true_cate=true_cate,
                          true_group=1 + (true_cate > np.median(true_cate)), true_mu0=true_mu0,
                          window_size_px=window_size_px)


def simulate_change_trial(raster_path, later_path, n_units=1000, window_size_px=33, block_px=48, changed_share=0.4,
                          shift_px=(301, 157), effect=2.0, noise_sd=1.0, seed=42):
    """A trial whose effect depends on change between two dates (the image-sequence design).

    The later date (written to ``later_path``, a GeoTIFF on the same grid) is
    the scene with a random ``changed_share`` of square blocks of ``block_px``
    pixels replaced by the content of the scene ``shift_px`` away (new
    settlement, cleared land: ordinary scene content, so the later image alone
    cannot tell changed from unchanged places). One unit per block, at its
    centre: true_cate = ``effect`` where its block changed, else 0;
    Y = 0.5 X_1 + z(brightness at the later date) + W true_cate + noise_sd e.
    Returns a SimulatedTrial."""
    from osgeo import gdal

    rng = np.random.default_rng(seed)
    source = gdal.Open(str(raster_path))
    image = source.ReadAsArray()
    bands, height, width = image.shape
    later = image.copy()
    dr, dc = shift_px
    shifted = np.roll(np.roll(image, -dr, axis=1), -dc, axis=2)
    n_rows, n_cols = height // block_px, width // block_px
    blocks = [(r, c) for r in range(n_rows) for c in range(n_cols)]
    changed = rng.random(len(blocks)) < changed_share
    for (r, c), flag in zip(blocks, changed):
        if flag:
            rows, cols = slice(r * block_px, (r + 1) * block_px), slice(c * block_px, (c + 1) * block_px)
            later[:, rows, cols] = shifted[:, rows, cols]
    driver = gdal.GetDriverByName("GTiff")
    out = driver.CreateCopy(str(later_path), source)
    for b in range(bands):
        out.GetRasterBand(b + 1).WriteArray(later[b])
    out = None
    info = raster_info(raster_path)
    gt = info.geotransform
    centre = np.array([(r * block_px + block_px // 2, c * block_px + block_px // 2) for r, c in blocks])
    x = gt[0] + (centre[:, 1] + 0.5) * gt[1]
    y = gt[3] + (centre[:, 0] + 0.5) * gt[5]
    found_early = extract_patches(raster_path, np.column_stack([x, y]), info.crs_wkt, None, window_size_px)
    found_late = extract_patches(str(later_path), np.column_stack([x, y]), info.crs_wkt, None, window_size_px)
    usable = np.flatnonzero(found_early.ok & found_late.ok)
    if len(usable) < n_units:
        raise GeoCateError(f"Only {len(usable)} blocks of {block_px} px have usable windows for {n_units} units.",
                           "Use fewer units or smaller blocks.")
    chosen = np.sort(rng.choice(usable, n_units, replace=False))
    true_cate = effect * changed[chosen].astype(float)
    covariates = rng.standard_normal((n_units, 2))
    treated = (rng.permutation(n_units) < n_units // 2).astype(int)
    true_mu0 = 0.5 * covariates[:, 0] + _z(_window_statistics(found_late.patches[chosen])[0])
    outcome = true_mu0 + treated * true_cate + noise_sd * rng.standard_normal(n_units)
    return SimulatedTrial(coords=found_early.coords[chosen], crs_wkt=info.crs_wkt, treated=treated, outcome=outcome,
                          covariates=covariates, covariate_names=("assets", "distance"), true_cate=true_cate,
                          true_group=1 + changed[chosen].astype(int), true_mu0=true_mu0,
                          window_size_px=window_size_px)


def repeat_mosaic(raster_path, folder, times=20):
    """A VRT mosaic of ``raster_path`` repeated times x times (east and south of the original), written in
    ``folder``: a raster far larger than memory for tests and benchmarks (the demo scene 20 x 20: 2.5 GB if read
    whole) that costs a few kilobytes of disk. Returns its path."""
    import os

    from osgeo import gdal

    scene = gdal.Open(str(raster_path))
    gt, width, height = scene.GetGeoTransform(), scene.RasterXSize, scene.RasterYSize
    tiles = []
    for r in range(times):
        for c in range(times):
            tile = os.path.join(str(folder), f"repeat_{r}_{c}.vrt")
            gdal.Translate(tile, str(raster_path), format="VRT")
            dataset = gdal.Open(tile, gdal.GA_Update)
            dataset.SetGeoTransform((gt[0] + c * width * gt[1], gt[1], 0, gt[3] + r * height * gt[5], 0, gt[5]))
            dataset = None
            tiles.append(tile)
    path = os.path.join(str(folder), "mosaic.vrt")
    gdal.BuildVRT(path, tiles)
    return path

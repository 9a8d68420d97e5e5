"""The main job on simulated studies: recovery of image-driven effects, and every bad input."""

import numpy as np
import pytest
from conftest import unit_table
from scipy.stats import spearmanr

from geocate.core.errors import Cancelled, GeoCateError
from geocate.core.pipeline import estimate_cate
from geocate.core.study import UnitTable


@pytest.fixture(scope="module")
def estimated(small_trial, demo_raster):
    return estimate_cate(unit_table(small_trial), demo_raster, seed=3)


def test_learner_recovers_the_image_driven_effect(small_trial, estimated):
    study, result = estimated
    truth = small_trial.true_cate
    assert result.n_used == 600 and result.n_dropped == 0
    assert spearmanr(result.cate, truth).correlation > 0.75
    assert np.sqrt(np.mean((result.cate - truth) ** 2)) < 0.75  # sd of the truth is 1.04
    # Effect groups follow the true groups: the top estimated group is mostly the true top group.
    assert np.mean(small_trial.true_group[result.group == 3] == 3) > 0.6
    assert np.mean(small_trial.true_group[result.group == 1] == 3) < 0.1


def test_ate_interval_covers_the_true_average_effect(small_trial, estimated):
    study, result = estimated
    assert abs(result.ate - small_trial.true_cate.mean()) < 2.6 * result.ate_se
    assert 0.04 < result.ate_se < 0.2


def test_run_metadata_records_what_reproduces_the_run(estimated):
    study, result = estimated
    meta = result.metadata
    assert meta["seed"] == 3 and meta["device"] == "cpu" and meta["window_size_m"] == pytest.approx(990.0)
    assert {"numpy", "econml", "torch", "sklearn", "gdal"} <= set(meta["versions"])
    assert set(meta["timings"]) == {"read_windows_s", "image_features_s", "causal_forest_s", "outcome_models_s",
                                   "fold_forests_s", "heterogeneity_test_s", "autoc_s", "total_s"}
    assert meta["timings"]["outcome_models_s"] + meta["timings"]["fold_forests_s"] <= meta["timings"]["causal_forest_s"]


def test_autoc_of_the_out_of_fold_cate_is_reported_and_clearly_positive(estimated):
    study, result = estimated
    assert result.autoc.estimate > 0.4 and result.autoc.ci[0] > 0 and result.autoc.p_value < 1e-3
    assert result.metadata["autoc"]["estimate"] == result.autoc.estimate


def test_spatial_blocks_keep_neighbours_in_one_fold(small_trial, demo_raster):
    from geocate.core.evaluate import spatial_blocks

    study, result = estimate_cate(unit_table(small_trial), demo_raster, spatial_block=5000, n_folds=3,
                                  n_estimators=40, n_draws=50)
    blocks = spatial_blocks(study.coords, 5000)
    assert all(len(set(result.fold[blocks == b])) == 1 for b in np.unique(blocks))
    assert result.metadata["spatial_block_m"] == 5000 and result.metadata["fold_groups"] == len(np.unique(blocks))
    chosen = estimate_cate(unit_table(small_trial), demo_raster, spatial_block=-1, n_folds=3, n_estimators=40,
                           n_draws=50)[1]
    assert chosen.metadata["spatial_block_m"] >= 990.0


def test_same_seed_gives_the_same_numbers(small_trial, demo_raster, estimated):
    again = estimate_cate(unit_table(small_trial), demo_raster, seed=3)[1]
    np.testing.assert_allclose(again.cate, estimated[1].cate, rtol=0, atol=1e-9)


def test_non_binary_treatment_is_refused_naming_the_values(small_trial, demo_raster):
    treated = small_trial.treated.astype(float)
    treated[:3] = [2, 3, 2]
    with pytest.raises(GeoCateError, match=r"only 0 \(control\) and 1 \(treated\).*also holds 2, 3"):
        estimate_cate(unit_table(small_trial, treated=treated), demo_raster)


def test_null_treatment_and_outcome_are_dropped_and_counted(small_trial, demo_raster):
    treated = small_trial.treated.astype(float)
    outcome = small_trial.outcome.copy()
    treated[:4] = np.nan
    outcome[2:10] = np.nan
    from geocate.core.study import build_study

    study = build_study(unit_table(small_trial, treated=treated, outcome=outcome), demo_raster)
    assert study.dropped["treatment is null"] == 4
    assert study.dropped["outcome is null"] == 6
    assert study.n_used == 590 and study.n_dropped == 10


def test_fewer_than_20_units_in_an_arm_is_refused(small_trial, demo_raster):
    treated = np.zeros(600)
    treated[:19] = 1
    with pytest.raises(GeoCateError, match="Only 19 treated unit"):
        estimate_cate(unit_table(small_trial, treated=treated), demo_raster)
    control_missing = small_trial.outcome.copy()
    control_missing[small_trial.treated == 0] = np.nan
    with pytest.raises(GeoCateError, match="Only 0 control unit.*outcome is null"):
        estimate_cate(unit_table(small_trial, outcome=control_missing), demo_raster)


def test_no_unit_inside_the_raster_is_refused(small_trial, demo_raster):
    far = UnitTable(xy=small_trial.coords + 1e6, crs_wkt=small_trial.crs_wkt,
                    treated=small_trial.treated.astype(float), outcome=small_trial.outcome,
                    covariates=small_trial.covariates)
    with pytest.raises(GeoCateError, match="None of the 600 units lies inside the raster"):
        estimate_cate(far, demo_raster)


def test_units_with_unusable_windows_keep_their_rows_with_patch_ok_0(small_trial, demo_raster):
    coords = small_trial.coords.copy()
    coords[:5] = coords[:5] + 1e6           # outside
    from geocate.core.patches import raster_info

    gt = raster_info(demo_raster).geotransform
    coords[5] = (gt[0] + 2.5 * gt[1], coords[5, 1])  # 2 pixels from the left edge: the window crosses it
    units = UnitTable(xy=coords, crs_wkt=small_trial.crs_wkt, treated=small_trial.treated.astype(float),
                      outcome=small_trial.outcome, covariates=small_trial.covariates)
    study, result = estimate_cate(units, demo_raster, n_folds=3, n_estimators=40)
    assert study.patch_ok[:6].tolist() == [False] * 6 and study.patch_ok[6:].all()
    assert np.isnan(result.cate[:6]).all() and np.isnan(result.cate_lo[:6]).all()
    assert (result.group[:6] == 0).all() and np.isfinite(result.cate[6:]).all()
    assert study.dropped["outside the raster"] == 5 and study.dropped["window crosses the raster edge"] == 1


def test_cancelling_stops_the_run(small_trial, demo_raster):
    calls = []

    def is_cancelled():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        estimate_cate(unit_table(small_trial), demo_raster, is_cancelled=is_cancelled)


def test_progress_is_reported_and_reaches_the_end(small_trial, demo_raster):
    seen = []
    estimate_cate(unit_table(small_trial), demo_raster, n_folds=3, n_estimators=40,
                  progress=lambda fraction, message: seen.append(fraction))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) >= 4


def test_the_smallest_accepted_study_runs(small_trial, demo_raster):
    """20 units per arm is the documented minimum: it must give estimates, not a crash."""
    keep = np.r_[np.flatnonzero(small_trial.treated == 1)[:20], np.flatnonzero(small_trial.treated == 0)[:20]]
    units = UnitTable(xy=small_trial.coords[keep], crs_wkt=small_trial.crs_wkt,
                      treated=small_trial.treated[keep].astype(float), outcome=small_trial.outcome[keep],
                      covariates=small_trial.covariates[keep])
    study, result = estimate_cate(units, demo_raster, n_estimators=40)
    assert result.n_used == 40 and np.isfinite(result.cate).all() and np.isfinite(result.ate_se)
    # ... and estimates that mean something: the ATE within 3 SEs of these 40 units' true mean effect, an SE of
    # the size 40 units give (outcome sd about 2: near 2 * 2 / sqrt(40)), intervals around every unit's CATE.
    truth = small_trial.true_cate[keep].mean()
    assert abs(result.ate - truth) < 3 * result.ate_se and 0.3 < result.ate_se < 1.5
    assert np.all(result.cate_lo <= result.cate) and np.all(result.cate <= result.cate_hi)


def test_overlapping_windows_without_blocks_are_warned_about(small_trial, demo_raster, estimated):
    import dataclasses

    from geocate.core.pipeline import overlap_warning

    study, result = estimated
    # 600 units in about 30 x 30 km with windows of 990 m: many windows overlap a neighbour's.
    assert len(result.metadata["warnings"]) == 1
    assert "overlapping a neighbour's (windows of 990 m)" in result.metadata["warnings"][0]
    assert "-1" in result.metadata["warnings"][0]
    assert overlap_warning(study, 33, block_size=5000.0) is None          # blocks keep neighbours together
    assert overlap_warning(study, 3, block_size=None) is None             # 90 m windows hardly overlap
    far_apart = dataclasses.replace(study, coords=study.coords * 100.0)  # the same layout, 100 times larger
    assert overlap_warning(far_apart, 33, None) is None


@pytest.mark.slow
def test_a_confounded_study_on_the_imagery_is_adjusted_by_the_image_propensity(small_trial, demo_raster):
    import dataclasses

    from geocate.core.design import StudyDesign
    from geocate.core.pipeline import estimate_ate
    from geocate.core.simulate import confound

    treated, outcome, propensity = confound(small_trial, seed=2)
    assert propensity.min() < 0.15 and propensity.max() > 0.85     # settlement makes treatment likely
    units = dataclasses.replace(unit_table(small_trial), treated=treated.astype(float), outcome=outcome)
    study, out = estimate_ate(units, demo_raster, StudyDesign("observational", seed=2), n_filters=128,
                              sensitivity=(0.03, 0.03, 1.0))
    effects = {(e.estimator, e.estimand): e for e in out["effects"]}
    naive, aipw = effects[("naive difference in means", "ATE")], effects[("AIPW", "ATE")]
    assert naive.estimate - 1.0 > 0.5                               # confounded by what the image shows
    # The image propensity and outcome models remove most of it (bench_observational.py: 200 draws at full size,
    # 7 % of the effect left; one draw on this small trial is noisier).
    assert abs(aipw.estimate - 1.0) < 0.35 * (naive.estimate - 1.0)
    assert {("IPW (Horvitz-Thompson)", "ATE"), ("Hajek", "ATE"), ("AIPW", "ATT")} <= set(effects)
    assert out["metadata"]["propensity_model"]["model"].startswith("multinomial logistic")
    assert [row[0] for row in out["balance"]][:2] == ["image component 1", "image component 2"]
    # Sensitivity (issue 23): without trimming, a few extreme weights make nu2 unreliable here, and the run says so;
    # with Crump's trimming the imagery - the only confounder (the covariates drive the outcome, not treatment) -
    # is the strongest benchmark, in the treatment (CF_D) and in the bias bound it implies.
    assert any("Riesz representer" in w for w in out["warnings"])
    # A contrast whose weights leave nu2 undefined (here the ATT's, negative) is left out alone, with a warning:
    # the ATE's analysis is still given.
    assert [el.contrast for el in out["sensitivity"].elements] == ["1 vs 0"]
    assert any(w.startswith("No sensitivity analysis of 1 vs 0 (ATT)") for w in out["warnings"])
    _, out = estimate_ate(units, demo_raster, StudyDesign("observational", seed=2, trim="crump"), n_filters=128,
                          sensitivity=(0.03, 0.03, 1.0))
    analysis = out["sensitivity"]
    aipw = next(e for e in out["effects"] if (e.estimator, e.estimand) == ("AIPW", "ATE"))
    assert analysis.elements[0].theta == pytest.approx(aipw.estimate, abs=1e-9) and not analysis.warnings
    marks = {b.name: b for b in analysis.benchmarks["1 vs 0"]}
    image = marks.pop("everything the imagery shows")
    assert marks and all(image.cf_d > b.cf_d + 0.1 for b in marks.values())

    def strength(b):
        return np.sqrt(b.cf_y * min(b.cf_d, 0.999) / (1 - min(b.cf_d, 0.999)))

    assert all(strength(image) > strength(b) for b in marks.values())
    rows = analysis.rows["1 vs 0"]
    assert rows[0]["low"] < aipw.estimate < rows[0]["high"] and rows[0]["ci_low"] < rows[0]["low"]
    assert rows[1]["confounder"] == "as strong as everything the imagery shows" and rows[1]["low"] < rows[0]["low"]
    assert out["metadata"]["sensitivity"]["contrasts"]["1 vs 0"]["rv"] == analysis.rv["1 vs 0"][0] > 0
    att = next(e for e in out["effects"] if (e.estimator, e.estimand) == ("AIPW", "ATT"))
    assert analysis.elements[1].contrast == "1 vs 0 (ATT)" and analysis.elements[1].theta == pytest.approx(
        att.estimate, abs=1e-9)
    # Randomized, the same units give the known propensity and no balance warning.
    _, randomized = estimate_ate(unit_table(small_trial), demo_raster, StudyDesign("randomized"), n_filters=128)
    assert np.allclose(randomized["propensity"], 0.5)
    assert not [w for w in randomized["warnings"] if "covariate" in w]


@pytest.mark.slow
def test_calibrated_propensities_balance_and_every_estimate_and_the_sensitivity_use_them(small_trial, demo_raster):
    """Issue 23, point 1 (CALIBRATE): after Crump's trimming the propensities are calibrated to balance the outcome
    models' inputs; the balance table is 0 after weighting; the AIPW ATE and ATT are the sensitivity analysis's
    theta; overlap and trimming stay the model's; the confounding is removed as without calibration."""
    import dataclasses

    from geocate.core.design import StudyDesign
    from geocate.core.pipeline import estimate_ate
    from geocate.core.simulate import confound

    treated, outcome, _ = confound(small_trial, seed=2)
    units = dataclasses.replace(unit_table(small_trial), treated=treated.astype(float), outcome=outcome)
    _, out = estimate_ate(units, demo_raster, StudyDesign("observational", seed=2, trim="crump", calibrate=True),
                          n_filters=128, sensitivity=(0.03, 0.03, 1.0))
    calibration = out["metadata"]["calibration"]
    assert calibration["balance"] == "exact" and calibration["largest_standardized_difference"] < 1e-8
    assert all(abs(row[2]) < 1e-6 for row in out["balance"]) and abs(out["balance"][0][1]) > 0.5
    kept = out["kept"]
    assert out["metadata"]["n_trimmed"] == int((~kept).sum()) > 0
    calibrated, model = out["calibrated_propensity"], out["propensity"]
    np.testing.assert_array_equal(calibrated[~kept], model[~kept])
    assert np.abs(calibrated[kept] - model[kept]).max() > 0.01
    effects = {(e.estimator, e.estimand): e for e in out["effects"]}
    naive, aipw, att = (effects[key] for key in (("naive difference in means", "ATE"), ("AIPW", "ATE"),
                                                  ("AIPW", "ATT")))
    assert abs(aipw.estimate - 1.0) < 0.35 * (naive.estimate - 1.0)    # as the uncalibrated test above
    theta = {el.contrast: el.theta for el in out["sensitivity"].elements}
    assert theta["1 vs 0"] == pytest.approx(aipw.estimate, abs=1e-9)
    assert theta["1 vs 0 (ATT)"] == pytest.approx(att.estimate, abs=1e-9)


def test_estimatecate_warns_about_a_covariate_affected_by_treatment(small_trial, demo_raster):
    import dataclasses

    trial = small_trial
    covariates = np.column_stack([trial.covariates[:, 0], trial.treated * trial.covariates[:, 1]])
    units = dataclasses.replace(unit_table(trial), covariates=covariates, covariate_names=("assets", "assets_x_t"))
    result = estimate_cate(units, demo_raster, n_folds=3, n_estimators=40, n_draws=50)[1]
    assert any("'assets_x_t' is 0 in every control unit" in w for w in result.metadata["warnings"])


@pytest.mark.slow
def test_estimatecate_in_an_observational_design_uses_the_image_propensity(small_trial, demo_raster, estimated):
    import dataclasses

    from geocate.core.design import StudyDesign
    from geocate.core.simulate import confound

    # Randomized (the default) gives the same numbers as an explicit randomized design.
    same = estimate_cate(unit_table(small_trial), demo_raster, seed=3, study_design=StudyDesign("randomized"))[1]
    np.testing.assert_allclose(same.cate, estimated[1].cate, atol=1e-9)   # to the determinism test's tolerance
    assert same.ate == pytest.approx(estimated[1].ate, abs=1e-9) and same.metadata["study_design"] == "randomized"
    treated, outcome, _ = confound(small_trial, seed=4)
    units = dataclasses.replace(unit_table(small_trial), treated=treated.astype(float), outcome=outcome)
    naive = estimate_cate(units, demo_raster, n_folds=3, n_estimators=40, n_draws=50)[1]
    adjusted = estimate_cate(units, demo_raster, n_folds=3, n_estimators=40, n_draws=50,
                             study_design=StudyDesign("observational", seed=4), sensitivity=(0.03, 0.03, 1.0))[1]
    assert adjusted.metadata["study_design"] == "observational"
    # The ATE's sensitivity analysis is on the forest's own DR ATE (same folds, propensity and outcome models).
    assert adjusted.sensitivity.elements[0].theta == pytest.approx(adjusted.ate, abs=1e-9)
    assert adjusted.metadata["sensitivity"]["contrasts"]["1 vs 0"]["rv"] > 0
    assert naive.sensitivity is None   # a randomized design has none
    assert adjusted.metadata["propensity_model"]["calibration_slope"] > 0.5
    # The raw difference in means is confounded (true ATE 1); treating the study as a trial leaves part of it
    # (only the outcome models adjust); the image propensity takes the estimate closer still.
    raw = outcome[treated == 1].mean() - outcome[treated == 0].mean()
    assert raw - 1.0 > 1.0
    assert abs(adjusted.ate - 1.0) < abs(naive.ate - 1.0) and abs(adjusted.ate - 1.0) < 0.35 * (raw - 1.0)


def test_the_run_record_says_where_each_part_ran(estimated):
    """Issue 26, point 3: the image features on the pipeline's device, the models and the forest on the processor."""
    study, result = estimated
    ran_on = result.metadata["ran_on"]
    assert ran_on["image features"] == result.metadata["device"] in ("cpu", "cuda")
    assert ran_on["causal forest"] == "cpu (econml)" and ran_on["outcome and propensity models"].startswith("cpu")
    assert ran_on["image windows"] == "memory"   # 600 windows: within WindowSource's memory budget


def test_prepare_study_is_the_one_path_study_features_groups(small_trial, demo_raster, monkeypatch):
    """core.pipeline.prepare_study (issue 20, point 4): windows read and checked -> the algorithm's own check ->
    features -> windows released unless kept -> fold groups; every algorithm starts here."""
    from geocate.core import pipeline
    from geocate.core.pipeline import fold_groups, prepare_study
    from geocate.core.represent import ImageryOptions

    steps, features_of = [], pipeline.study_features
    monkeypatch.setattr(pipeline, "study_features", lambda *a, **k: steps.append("features") or features_of(*a, **k))
    imagery = ImageryOptions()
    units = unit_table(small_trial)
    prepared = prepare_study(units, demo_raster, None, 33, None, imagery.pipeline(64, 1, "cpu"), imagery, 2000.0,
                             check=lambda study: steps.append(("check", study.patches is not None)))
    assert steps == [("check", True), "features"]   # checked on the read windows, before the features
    study = prepared.study
    assert study.patches is None and study.views is None and prepared.features.shape == (600, 128)
    groups, block = fold_groups(study, 2000.0, 33)
    assert np.array_equal(prepared.groups, groups) and prepared.block_size == block == 2000.0
    assert set(prepared.timings) == {"read_windows_s", "image_features_s"}
    kept = prepare_study(units, demo_raster, None, 33, None, imagery.pipeline(64, 1, "cpu"), imagery, 0,
                         keep_windows=True)
    assert kept.study.patches is not None and kept.block_size is None
    np.testing.assert_array_equal(kept.features, prepared.features)   # the same pipeline and seed
    assert prepared.windows_held == kept.windows_held == "memory"
    from geocate.core import represent

    monkeypatch.setattr(represent, "WINDOW_MEMORY_MB", 1)   # 600 windows of 13 KB: over the budget, to a file
    on_disk = prepare_study(units, demo_raster, None, 33, None, imagery.pipeline(64, 1, "cpu"), imagery, 0,
                            keep_windows=True)
    assert on_disk.windows_held == "a memory-mapped temporary file" and isinstance(on_disk.study.patches, np.memmap)
    np.testing.assert_array_equal(on_disk.features, prepared.features)

    def refuse(study):
        raise GeoCateError("Refused by the algorithm.", "Fix it.")

    steps.clear()
    with pytest.raises(GeoCateError, match="Refused by the algorithm"):
        prepare_study(units, demo_raster, None, 33, None, imagery.pipeline(64, 1, "cpu"), imagery, 0, check=refuse)
    assert steps == []   # refused before any feature was computed


def test_estimate_ate_stops_during_the_propensity_fit_when_cancelled(small_trial, demo_raster):
    """Issue 20, point 7: a cancel pressed while estimateate fits its propensity model stops the run there (the
    propensity polls between its folds, core.crossfit), before the outcome models start."""
    import dataclasses

    from geocate.core.design import StudyDesign
    from geocate.core.pipeline import estimate_ate
    from geocate.core.simulate import confound

    treated, outcome, _ = confound(small_trial, seed=2)
    units = dataclasses.replace(unit_table(small_trial), treated=treated.astype(float), outcome=outcome)
    messages, polls_in_propensity = [], []

    def progress(fraction, message=""):
        messages.append(message)

    def is_cancelled():
        if any(m.startswith("Propensity") for m in messages):
            polls_in_propensity.append(1)
            return len(polls_in_propensity) >= 2   # pressed during the propensity fit, after its first fold
        return False

    with pytest.raises(Cancelled):
        estimate_ate(units, demo_raster, StudyDesign("observational", seed=2), n_filters=64, progress=progress,
                     is_cancelled=is_cancelled)
    assert any(m.startswith("Propensity") for m in messages)
    assert not any(m.startswith("Outcome models") for m in messages)   # stopped before the outcome models
    assert len(polls_in_propensity) == 2                               # at the next poll, not at the end


def test_the_out_of_bag_forest_runs_the_same_study(small_trial, demo_raster, estimated):
    """FOREST "out-of-bag" (issue 26): one forest, each unit predicted by the bags grown without its group; the
    nuisances, DR scores and ATE are the fold forests' own, and the effects recover the truth as well."""
    study, result = estimate_cate(unit_table(small_trial), demo_raster, seed=3, forest="out-of-bag")
    truth = small_trial.true_cate
    assert result.metadata["forest"] == "out-of-bag"
    assert result.metadata["estimator"]["estimator"] == "causal forest, out-of-bag by groups"
    assert spearmanr(result.cate, truth).correlation > 0.75
    folds_rmse = np.sqrt(np.mean((estimated[1].cate - truth) ** 2))
    assert np.sqrt(np.mean((result.cate - truth) ** 2)) < 1.1 * folds_rmse
    assert result.ate == pytest.approx(estimated[1].ate)
    assert result.heterogeneity.p_value < 0.05
    parts = result.metadata["timings"]         # the forest stage's parts, in the run record (issue 26, point 3)
    assert {"outcome_models_s", "forest_growth_s", "out_of_bag_s"} <= set(parts)
    assert parts["outcome_models_s"] + parts["forest_growth_s"] + parts["out_of_bag_s"] <= parts["causal_forest_s"]


def test_estimate_ate_with_stacked_models_and_the_window_network(small_trial, demo_raster, monkeypatch, tmp_path):
    """Issue 23, point 1: NUISANCE "stacked with windows" reads the windows (kept for the networks, then let go),
    reads them again when the feature cache spared reading them, reports each fold's weights for the propensity
    and both arms' outcome models (fitted on the units trimming kept), refuses a study larger than the networks
    take, and stops when cancelled inside the stack."""
    import dataclasses

    from geocate.core import stacking
    from geocate.core.design import StudyDesign
    from geocate.core.pipeline import estimate_ate
    from geocate.core.represent import FeatureCache, ImageryOptions
    from geocate.core.simulate import confound

    monkeypatch.setattr(stacking, "WINDOW_EPOCHS", 5)   # the path, not the networks' fit (tests/core/test_stacking)
    devices, network = [], stacking.window_network_propensity
    monkeypatch.setattr(stacking, "window_network_propensity",
                        lambda *a, **k: devices.append((a[0].device.type, k["device"])) or network(*a, **k))
    treated, outcome, _ = confound(small_trial, seed=2)
    units = dataclasses.replace(unit_table(small_trial), treated=treated.astype(float), outcome=outcome)
    design = StudyDesign("observational", seed=2, trim=(0.25, 0.75))
    imagery = ImageryOptions(cache=FeatureCache(tmp_path / "cache"))
    estimate_ate(units, demo_raster, design, n_filters=64, imagery=imagery)   # fills the cache: no windows kept
    study, out = estimate_ate(units, demo_raster, design, n_filters=64, nuisance="stacked with windows",
                              imagery=imagery)
    assert study.patches is None                                  # the windows were let go after the networks
    record = out["metadata"]
    assert record["n_trimmed"] > 0                                # the outcome stack ran on the kept units
    assert record["nuisance"] == "stacked with windows"
    assert record["ran_on"]["window networks"] == record["ran_on"]["image features"] in ("cpu", "cuda")
    assert devices == [(record["ran_on"]["window networks"],) * 2]   # where the network's windows really were
    assert [list(row["weights"]) for row in record["propensity_model"]["stack"]] == [[
        "penalised logistic (image features)", "gradient boosting (components)", "network on the windows"]] * 5
    assert all(set(w) == {"spline ridge (components)", "gradient boosting (components)", "network on the windows"}
               for row in record["outcome_models"]["stack"] for w in row["weights_by_arm"].values())
    aipw = next(e for e in out["effects"] if (e.estimator, e.estimand) == ("AIPW", "ATE"))
    assert np.isfinite(aipw.estimate) and aipw.std_err > 0
    from geocate.core import pipeline

    embedded = []
    monkeypatch.setattr(pipeline, "study_features", lambda *a, **k: embedded.append(1))
    monkeypatch.setattr(stacking, "WINDOW_NETWORK_UNITS", 50)
    with pytest.raises(GeoCateError, match="at most 50 units"):
        estimate_ate(units, demo_raster, design, n_filters=64, nuisance="stacked with windows")
    assert embedded == []                                           # refused before any feature was computed
    monkeypatch.undo()
    with pytest.raises(GeoCateError, match="Unknown nuisance models"):
        estimate_ate(units, demo_raster, design, n_filters=64, nuisance="forest")
    messages = []
    with pytest.raises(Cancelled):
        estimate_ate(units, demo_raster, design, n_filters=64, nuisance="stacked",
                     progress=lambda f, m="": messages.append(m),
                     is_cancelled=lambda: any(m.startswith("Stacked models") for m in messages))


@pytest.mark.slow
def test_with_spatial_blocks_each_sensitivity_analysis_is_on_its_own_estimate(small_trial, demo_raster):
    """Blocks of several units: estimateate's outcome models choose their penalty over whole blocks and its
    sensitivity analysis refits them so (theta = the AIPW ATE); estimatecate's forest keeps leave-one-out, and so
    does its analysis (theta = its DR ATE)."""
    import dataclasses

    from geocate.core.design import StudyDesign
    from geocate.core.pipeline import estimate_ate
    from geocate.core.simulate import confound

    treated, outcome, _ = confound(small_trial, seed=4)
    units = dataclasses.replace(unit_table(small_trial), treated=treated.astype(float), outcome=outcome)
    design = StudyDesign("observational", seed=4, trim="crump", calibrate=True)
    _, out = estimate_ate(units, demo_raster, design, n_filters=128, spatial_block=4000, sensitivity=(0.03, 0.03, 1.0))
    assert out["metadata"]["outcome_models"]["penalty"].startswith(
        "the splines' ridge penalty by cross-validation over whole groups") and out["metadata"]["fold_groups"] < 200
    aipw = next(e for e in out["effects"] if (e.estimator, e.estimand) == ("AIPW", "ATE"))
    assert out["sensitivity"].elements[0].theta == pytest.approx(aipw.estimate, abs=1e-9)
    # Its interval at zero strength is the AIPW's own, read on t over the blocks (core.observational), as the record
    # says; estimatecate's (below) is its ATE's, on the normal.
    from geocate.core.sensitivity import bounds

    assert bounds(out["sensitivity"].elements[0], 0.0, 0.0)[2:] == pytest.approx(aipw.interval(), abs=1e-9)
    assert "Student's t" in out["metadata"]["standard_errors"]
    treated, outcome, _ = confound(small_trial, seed=4, strength=0.6)   # untrimmed: milder, so nu2 > 0
    units = dataclasses.replace(units, treated=treated.astype(float), outcome=outcome)
    cate = estimate_cate(units, demo_raster, n_folds=3, n_estimators=40, n_draws=50, spatial_block=4000,
                         study_design=StudyDesign("observational", seed=4), sensitivity=(0.03, 0.03, 1.0))[1]
    assert cate.sensitivity.elements[0].theta == pytest.approx(cate.ate, abs=1e-9)
    assert bounds(cate.sensitivity.elements[0], 0.0, 0.0)[2:] == pytest.approx(
        (cate.ate - 1.959964 * cate.ate_se, cate.ate + 1.959964 * cate.ate_se), abs=1e-6)

"""Plots (matplotlib, PNG) and self-contained HTML reports of GeoCATE runs."""

import base64
import html
import json
import os
import time

from .scores import Z95


def plot_toc(rates, path, title="Targeting operator characteristic"):
    """TOC curves of RateResults (estimate and 95 % band against the treated fraction q) to a PNG."""
    from matplotlib.figure import Figure  # the Figure API alone: QGIS's own pyplot backend is left alone

    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    for rate in rates:
        line, = axes.plot(rate.q, rate.toc, marker="o", label=f"{rate.priority} (AUTOC {rate.estimate:.3f} "
                                                           f"± {Z95 * rate.std_err:.3f})")
        axes.fill_between(rate.q, rate.toc - Z95 * rate.toc_se, rate.toc + Z95 * rate.toc_se,
                          color=line.get_color(), alpha=0.18)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xlabel("fraction treated, by priority (q)")
    axes.set_ylabel("TOC(q): effect among the top q minus the ATE")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def table(headers, rows, digits=4):
    """An HTML table; numbers to ``digits`` places, missing and not-finite values as a dash (never "nan")."""
    import math

    def cell(value):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "\u2013"
        if isinstance(value, float):
            return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(png_path, alt):
    with open(png_path, "rb") as handle:
        encoded = base64.b64encode(handle.read()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


STYLE = """body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #bbb;padding:0.25em 0.6em;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:0.8em;overflow:auto}
.note{color:#555;font-size:0.9em}.warnings{background:#fff4e5;border-left:4px solid #b35806;padding:0.2em 1em}"""


def run_warnings(metadata):
    """What a reader must see before the numbers: the run's warnings, units dropped, a map's extrapolation."""
    from .study import describe_dropped

    out = list(metadata.get("warnings") or [])
    if metadata.get("n_dropped"):
        dropped = metadata.get("dropped") or {}
        out.append(f"{metadata['n_dropped']} unit(s) were dropped"
                   + (f" ({describe_dropped(dropped)})" if dropped else "") + "; they keep their row with nulls.")
    share = metadata.get("share_outside_support")
    if share:
        out.append(f"{share:.0%} of the mapped cells lie outside the trial's support (imagery unlike any trial "
                   "unit's): effects there are extrapolations (hatched on the map).")
    return out


def plain_record(metadata):
    """The run record as plain JSON values: a core.record.RunRecord in its file layout, a dict as it is."""
    return metadata.to_json() if hasattr(metadata, "to_json") else metadata


def write_html(path, title, sections, metadata=None):
    """A self-contained HTML page: ``sections`` is a list of (heading, html body); metadata goes at the end."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p class='note'>Written by GeoCATE on {time.strftime('%Y-%m-%d %H:%M')}.</p>"]
    warnings = run_warnings(metadata or {})
    if warnings and not any(heading == "Warnings" for heading, _ in sections):   # first, not in the folded JSON
        parts.append("<div class='warnings'><h2>Warnings</h2><ul>"
                     + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>")
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    if metadata is not None:   # for reproducing the run, folded away
        parts.append("<h2>Run metadata</h2><details><summary>Everything this run used and measured (JSON)</summary>"
                     "<pre>" + html.escape(json.dumps(plain_record(metadata), indent=2, default=str))
                     + "</pre></details>")
    parts.append("</body></html>")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("".join(parts))
    os.replace(tmp, path)
    return path


#: Parameter ids as the labels users see in the dialogs.
SETTING_LABELS = {
    "INPUT": "Units layer", "TREATMENT": "Treatment", "OUTCOME": "Outcome", "COVARIATES": "Covariates",
    "RASTER": "Imagery", "BANDS": "Bands", "PATCH_SIZE": "Window size (pixels)", "NODATA": "Extra nodata value",
    "SEED": "Seed", "GROUPS": "Effect groups", "FOREST": "Causal forest", "CLUSTER": "Cluster field", "SPATIAL_BLOCK": "Spatial blocks",
    "CLUSTERS": "Clusters", "MAX_CLUSTERS": "Largest K tried", "EPOCHS": "Training epochs", "DEVICE": "Device",
    "PRIORITY": "Priority", "PRIORITY_2": "Second priority", "BOOTSTRAP": "Bootstrap draws", "DESIGN": "Study design",
    "TRIM": "Trimming", "NUISANCE": "Propensity and outcome models",
    "CALIBRATE": "Calibrate the propensities to balance", "OUTCOME_CORRECTION": "Outcome correction file", "CORRECTION": "Correction",
    "OUTCOME_TRUTH": "True outcome field", "SCALES": "Wider context (window sizes, pixels)",
    "RASTERS_TIME": "Imagery of later dates", "TIME_POOLING": "Pooling over dates", "ENCODER": "Image encoder",
    "FEATURE_CACHE": "Feature cache", "COMPARE": "Compare", "METHOD": "Model", "EXTENT": "Extent",
    "STRIDE": "Stride (pixels)", "MASK": "Mask", "DASK_SCHEDULER": "Dask scheduler", "MODEL": "Saved model",
    "STRATA": "Strata", "PROPENSITY": "Known assignment probability", "BUDGET": "Budget", "COST": "Cost field",
    "PRIORITY_FIELD": "Priority field compared", "TREE_DEPTH": "Policy tree depth", "CANDIDATES": "Candidates",
    "OUTSIDE_SUPPORT": "Choose outside the trial's support", "TRUTH": "True outcome field",
    "PREDICTION": "Predicted outcome field", "PREDICTION_RASTER": "Map raster", "PREDICTION_BAND": "Band of the map",
    "OUTCOME_NAME": "What the map predicts", "TRIM_LOW": "Lower propensity bound",
    "TRIM_HIGH": "Upper propensity bound", "CF_Y": "Confounder's share of the outcome's variation (CF_Y)",
    "CF_D": "Confounder's gain in the weights' variation (CF_D)", "RHO": "Correlation of the two parts (RHO)",
    "UNIT_ID": "Unit id field", "TIME": "Time field", "RASTERS_BY_TIME": "Imagery by year",
    "CONTROL_GROUP": "Comparison group", "ANTICIPATION": "Anticipation (periods)", "NOISE": "Outcome noise",
    "FOREST_CHECK": "Checked against the forest's test", "APPROACH": "Approach",
    "TIME_EFFECTS": "Year effects absorbed", "LEARNER": "Nuisance learner"}


def readable_setting(name, value):
    """A parameter's value as a reader wants it: "all" bands, "none" for no blocks or cluster field, lists joined."""
    if name == "BANDS":
        return ", ".join(str(b) for b in value) if value else "all"
    if name == "SPATIAL_BLOCK":
        return "none" if not value else "chosen from the data" if value < 0 else f"{value:,.0f} m"
    if name == "CLUSTERS" and value == 0:
        return "chosen from the data"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "none"
    if value is None or value == "":
        return "none"
    return value


def settings_table(parameters):
    """The run's parameters with the labels users see and readable values."""
    return table(["setting", "value"], [(SETTING_LABELS.get(name, name), readable_setting(name, value))
                                        for name, value in parameters.items()])


def ratio(estimate, std_err):
    """estimate / SE, nan where the SE is 0 or missing (a constant priority or outcome), never a ZeroDivisionError."""
    return estimate / std_err if std_err and std_err == std_err else float("nan")


def rate_rows(evaluation):
    """Rows (metric, priority, estimate, SE, 95 % low, high, p-value, estimate/SE) of an Evaluation."""
    rows = []
    for target, results in evaluation.rates.items():
        for rate in results:
            rows.append((target, rate.priority, rate.estimate, rate.std_err, rate.ci[0], rate.ci[1], rate.p_value,
                         rate.ratio))
    for name, calibration in zip(evaluation.names, evaluation.calibration):
        rows.append(("BLP mean (b1)", name, calibration.mean_forest, calibration.mean_forest_se,
                     calibration.mean_forest - Z95 * calibration.mean_forest_se,
                     calibration.mean_forest + Z95 * calibration.mean_forest_se, calibration.mean_forest_p,
                     ratio(calibration.mean_forest, calibration.mean_forest_se)))
        rows.append(("BLP differential (b2)", name, calibration.differential, calibration.differential_se,
                     calibration.differential - Z95 * calibration.differential_se,
                     calibration.differential + Z95 * calibration.differential_se, calibration.differential_p,
                     ratio(calibration.differential, calibration.differential_se)))
    for name, gates in zip(evaluation.names, evaluation.gates):
        for group, n, estimate, se, low, high in gates:
            rows.append((f"GATE group {group} (n={n})", name, estimate, se, low, high, float("nan"), ratio(estimate, se)))
    return rows


RATE_HEADERS = ["metric", "priority", "estimate", "SE", "95 % low", "95 % high", "p-value", "estimate / SE"]


def evaluation_report(evaluation, html_path, png_path, inputs, metadata=None):
    """The HTML report of geocate:evaluate (TOC plot embedded), written atomically."""
    plot_toc([r for r in evaluation.rates["AUTOC"] if " - " not in r.priority], png_path)
    autoc = evaluation.rates["AUTOC"][0]
    verdict = ("The ranking finds heterogeneity: units it puts first gain more than average (AUTOC > 0 at the 5 % level)."
               if autoc.ci[0] > 0 else
               "No heterogeneity detected at the 5 % level: the 95 % interval of the AUTOC includes 0.")
    verdict += (" This holds only if the priority was built without these units' outcomes (see 'How to read "
                "this').")
    sections = [
        ("How to read this", "<p class='note'>The test is valid only if the priority was built without these "
         "units' outcomes (a model fit on other data, or a rule fixed in advance). GeoCATE's own cate field does "
         "not qualify: it is cross-fitted on the same units, so its AUTOC here is descriptive; the test for it is "
         "the sequential cross-fold test in the report of 'Estimate treatment effects from imagery'. "
         "TOC(q) is the average effect among the fraction q of units the rule "
         "treats first, minus the average effect; AUTOC is its area, Qini its area weighted by q (Yadlowsky et al.). "
         "Doubly robust scores use outcome models that did not see the unit; intervals come from a half-sample "
         "bootstrap over clusters (locations or spatial blocks). The BLP differential b2 is 1 for a well-calibrated "
         "CATE and 0 for one without signal (Chernozhukov et al.). GATEs are average effects by quantile group of "
         "the priority (group 1 lowest). In the plot's legend, \u00b1 is 1.96 standard errors (a 95 % interval); a dash in a table is a value that does not apply.</p>"),
        ("Inputs", table(["item", "value"], list(inputs.items()))),
        ("Summary", f"<p>{html.escape(verdict)}</p>"),
        ("TOC curve", image(png_path, "TOC curve")),
        ("Estimates", table(RATE_HEADERS, rate_rows(evaluation))),
    ]
    if metadata and metadata.get("predicted_outcome"):
        sections.insert(3, ("Outcome from a map", predicted_outcome_section(metadata["predicted_outcome"])))
    return write_html(html_path, "GeoCATE: evaluation of heterogeneity", sections, metadata)


def test_row(metric, test):
    """A table row (metric, rule, estimate, SE, 95 % low, high, one-sided p, t) of a HeterogeneityTest."""
    return (metric, test.priority, test.estimate, test.std_err, test.estimate - Z95 * test.std_err,
            test.estimate + Z95 * test.std_err, test.p_value, test.t_stat)


def comparison_rows(comparison):
    """Rows (metric, rule, estimate, SE, 95 % low, high, p-value, estimate/SE) of compare_sources' output.

    First the valid tests (held-out folds, one-sided p), then the pooled
    out-of-fold RATEs, descriptive only (no p-value).
    """
    rows = []
    for kind in ("tests", "test_differences"):
        for target, results in comparison[kind].items():
            rows.extend(test_row(f"{target} (held-out test)", test) for test in results)
    for kind in ("rates", "differences"):
        for target, results in comparison[kind].items():
            for rate in results:
                rows.append((f"{target} (pooled, descriptive)", rate.priority, rate.estimate, rate.std_err,
                             rate.ci[0], rate.ci[1], float("nan"), rate.ratio))
    return rows


def comparison_report(comparison, html_path, png_path, inputs, metadata=None):
    """The HTML report of geocate:comparesources (TOC curves of each source embedded)."""
    plot_toc(comparison["rates"]["AUTOC"], png_path, "TOC by source of the pooled out-of-fold CATE (descriptive)")
    lines = []
    for test in comparison["test_differences"]["AUTOC"]:
        verdict = ("ranks units by their gain better (one-sided p < 0.05)" if test.detected else
                   "is not shown to rank better")
        lines.append(f"<li>{html.escape(test.priority)}: held-out AUTOC difference {test.estimate:.3f} "
                     f"(SE {test.std_err:.3f}, t = {test.t_stat:.2f}, one-sided p = {test.p_value:.3g}); "
                     f"the first {verdict}.</li>")
    sections = [
        ("How to read this", "<p class='note'>The tests are sequential cross-fold tests (grf's rate_cv): in each "
         "fold after the first, every source's learner, built on the earlier folds only, ranks the fold's units, "
         "which are judged by the same doubly robust scores and the same bootstrap half-samples, so differences "
         "are paired; the folds' t-statistics are combined. They are one-sided: a small p says the first source "
         "ranks units by their gain better than the second. The pooled rows rank all units by their "
         "out-of-fold CATE: descriptive only, since each unit was ranked by a model that saw the other ranked "
         "units, and no p-value is given for them.</p>"),
        ("Inputs", table(["item", "value"], list(inputs.items()))),
        ("What the imagery adds", "<ul>" + "".join(lines) + "</ul>" if lines else
         "<p>Only imagery was given: no covariates to compare with.</p>"),
        ("TOC curves", image(png_path, "TOC curves by source")),
        ("Estimates", table(RATE_HEADERS, comparison_rows(comparison))),
    ]
    return write_html(html_path, "GeoCATE: what the imagery adds", sections, metadata)


def _finish_effect_axes(axes, ticks, xlabel, ate=None):
    if ate is not None:
        axes.axhline(ate, color="grey", linestyle="--", linewidth=0.8, label="ATE")
    axes.axhline(0, color="black", linewidth=0.6)
    axes.set_xticks(ticks)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("treatment effect")
    axes.legend(fontsize=7, loc="upper left")


def draw_group_effects(axes, group_effects, ate=None):
    """Effects by group (doubly robust group averages, 95 % intervals) on matplotlib ``axes``."""
    groups = [row["group"] for row in group_effects]
    effect = [row["effect"] for row in group_effects]
    low = [row["effect"] - row["ci_low"] for row in group_effects]
    high = [row["ci_high"] - row["effect"] for row in group_effects]
    axes.errorbar(groups, effect, yerr=[low, high], fmt="o", color="#2166ac", capsize=4,
                  label="group average effect (95 %)")
    axes.plot(groups, [row["mean_cate"] for row in group_effects], "x", color="#b2182b",
              label="mean estimated CATE")
    _finish_effect_axes(axes, groups, "effect group (1 = smallest estimated)", ate)


def plot_group_effects(group_effects, path, ate=None):
    from matplotlib.figure import Figure  # the Figure API alone: QGIS's own pyplot backend is left alone

    figure = Figure(figsize=(5.6, 3.6), dpi=110)
    draw_group_effects(figure.add_subplot(1, 1, 1), group_effects, ate)
    figure.tight_layout()
    figure.savefig(path)
    return path


def predicted_outcome_section(record):
    """The report's account of an outcome taken from a map: the ATE under each correction, the PPI ATE."""
    parts = []
    if "ate_by_correction" in record:
        used = record["correction"]
        rows = [(method + (" (used)" if method == used else ""), ate["estimate"], ate["std_err"],
                 ate["estimate"] - Z95 * ate["std_err"], ate["estimate"] + Z95 * ate["std_err"])
                for method, ate in record["ate_by_correction"].items()]
        parts.append(f"<p>The outcome is the map's prediction of <b>{html.escape(record['outcome'])}</b>"
                     f" ({html.escape(str(record['map'].get('name') or 'map'))}), corrected with the "
                     f"<b>{html.escape(used)}</b> correction before estimation: maps predicted from imagery are "
                     "shrunk toward the mean, which makes effects measured on them too small. The doubly robust "
                     "ATE under each correction, on the same folds:</p>"
                     + table(["correction", "ATE", "SE", "95 % low", "95 % high"], rows, digits=3))
        if record["outside_range"]:
            parts.append(f"<p class='note'>{record['outside_range']} unit(s) have map values outside the range the "
                         "correction was fit on: their correction extrapolates.</p>")
    if "prediction_powered_ate" in record:
        ppi = record["prediction_powered_ate"]
        parts.append(f"<p>Prediction-powered ATE, using the true outcome measured on {ppi['n_labelled']} units "
                     f"(a random subset): <b>{ppi['estimate']:.3f}</b> (SE {ppi['std_err']:.3f}). It corrects the "
                     "map's bias with those units, whatever the map, with a valid interval.</p>")
    return "".join(parts)


HOW_TO_READ_ESTIMATE = (
    "<p class='note'>Each unit's CATE comes from a causal forest that did "
    "not see it, nor its cluster (cross-fitting), calibrated on that forest's own training units so "
    "that extreme effects are less shrunk toward the mean. Its 95 % interval covers the forest's "
    "sampling noise, assuming independent units, not the smoothing bias that remains. Group averages "
    "are means of doubly robust scores within each group of estimated effects, with cluster-robust intervals; they, not the CATE of single "
    "units, are the numbers to quote. The heterogeneity test ranks each fold with a forest built "
    "on the earlier folds only and combines the folds' t-statistics (grf's sequential cross-fold "
    "test): it asks whether the units ranked first gain more than average. The TOC shows how much "
    "more than average the units ranked first gain.</p>")


def estimate_report(metadata, html_path, map_png=None, figures=None, sensitivity=None):
    """The HTML report of geocate:estimatecate: inputs, settings, ATE, effects by group, TOC, map, metadata.

    figures: the folder where its PNG figures are drawn before they are embedded (default beside the report);
    sensitivity: the ATE's core.sensitivity.Sensitivity (observational design), shown with its contour plot."""
    import numpy as np

    from .evaluate import RateResult

    stem = os.path.join(figures, "report") if figures else os.path.splitext(html_path)[0]
    autoc = metadata["autoc"]
    rate = RateResult(target="AUTOC", priority="cate", estimate=autoc["estimate"], std_err=autoc["std_err"],
                      ci=tuple(autoc["ci"]), p_value=float("nan"), q=np.array(autoc["q"]),
                      toc=np.array(autoc["toc"]), toc_se=np.array(autoc["toc_se"]), draws=np.array([]))
    toc_png = plot_toc([rate], stem + "_toc.png", "TOC of the pooled out-of-fold CATE (descriptive)")
    groups_png = plot_group_effects(metadata["group_effects"], stem + "_groups.png", metadata["ate"])
    parameters = metadata.get("parameters", {})
    low, high = metadata["ate"] - Z95 * metadata["ate_se"], metadata["ate"] + Z95 * metadata["ate_se"]
    test = metadata["heterogeneity_test"]
    verdict = ("Heterogeneity detected: the units the estimated effects rank first gain more than average, in folds "
               "the ranking model never saw" if test["detected"] else
               "No heterogeneity detected: in folds the ranking model never saw, the units it ranks first do not "
               "gain clearly more than average")
    summary = (f"<p>Average treatment effect (doubly robust): <b>{metadata['ate']:.3f}</b> "
               f"(SE {metadata['ate_se']:.3f}, 95 % interval {low:.3f} to {high:.3f}), from "
               f"{metadata['n_used']} units ({metadata['n_dropped']} dropped); standard errors are robust to "
               f"{metadata['fold_groups']} clusters ({html.escape(metadata['clustered_by'])}"
               f"{', spatial blocks' if metadata.get('spatial_block_m') else ''}).</p>"
               f"<p>{verdict} (sequential cross-fold test, one-sided: held-out AUTOC {test['estimate']:.3f}, "
               f"SE {test['std_err']:.3f}, t = {test['t_stat']:.2f}, p = {test['p_value']:.3g}, "
               f"{test['held_out_folds']} held-out folds).</p>"
               f"<p class='note'>The AUTOC of the pooled out-of-fold CATE, {autoc['estimate']:.3f}, and the TOC "
               "curve below are descriptive: each unit there was ranked by a model that saw the other ranked "
               "units, so they are not a test.</p>")
    group_rows = [(row["group"], row["n"], row["mean_cate"], row["effect"], row["ci_low"], row["ci_high"])
                  for row in metadata["group_effects"]]
    sections = [
        ("How to read this", HOW_TO_READ_ESTIMATE),
        ("Summary", summary),
        ("Inputs and settings", settings_table(parameters)),
        ("Effects by group", table(["group", "units", "mean estimated CATE", "group average effect (DR)",
                                    "95 % low", "95 % high"], group_rows) + image(groups_png, "Effects by group")),
        ("Targeting operator characteristic", image(toc_png, "TOC curve")),
    ]
    predicted = metadata.get("predicted_outcome")
    if predicted:
        sections.insert(2, ("Outcome from a map", predicted_outcome_section(predicted)))
    check = metadata.get("randomization_check")
    if check:
        ranked = sorted(zip(check["inputs"], check["standardized_differences"]), key=lambda r: -abs(r[1]))[:10]
        sections.insert(2, ("Randomization check", (
            f"<p>Is treatment predictable from what was known before it? Cross-fitted AUC {check['auc']:.3f} "
            f"(0.5: not at all), permutation p = {check['p_value']:.3f} ({check['permutations']} permutations, "
            "treatment permuted as the design assigned it). "
            + ("<b>It is: the trial does not look randomized as declared.</b>" if check["warns"] else
               "No sign that it is.") + " The largest standardized differences between the arms (treated "
            "minus control, in standard deviations; image components are the outcome models' inputs):</p>"
            + table(["input", "standardized difference"], ranked))))
    if map_png:
        sections.append(("Map", image(map_png, "Map of the estimated effects")))
    if sensitivity is not None:
        png = stem + "_sensitivity.png"
        plot_sensitivity(sensitivity, png)
        sections.append(("Sensitivity to an unmeasured confounder",
                         sensitivity_section(sensitivity) + image(png, "Sensitivity contours")))
    return write_html(html_path, "GeoCATE: treatment effects from imagery", sections, metadata)


def plot_effect_map(raster_path, coords, cate, path, max_pixels=900, bands=None):
    """Units coloured by CATE (diverging, centred on 0) over the imagery around them, to a PNG.

    coords are in the raster's CRS. Only the units' bounding box (plus a margin)
    is read, decimated by GDAL to at most ``max_pixels`` per side; imagery is
    shown in natural colour with the bands core.patches.rgb_bands finds (the
    raster's colour interpretation, else the user's ``bands``), else as grey.
    """
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from osgeo import gdal

    from .patches import rgb_bands

    coords, cate = np.asarray(coords, float), np.asarray(cate, float)
    shown = np.isfinite(cate) & np.isfinite(coords).all(axis=1)
    dataset = gdal.Open(raster_path)
    gt = dataset.GetGeoTransform()
    inverse = gdal.InvGeoTransform(gt)
    cols = inverse[0] + inverse[1] * coords[shown, 0] + inverse[2] * coords[shown, 1]
    rows = inverse[3] + inverse[4] * coords[shown, 0] + inverse[5] * coords[shown, 1]
    margin = 0.05 * max(np.ptp(cols), np.ptp(rows), 10)
    c0, c1 = int(max(cols.min() - margin, 0)), int(min(cols.max() + margin, dataset.RasterXSize))
    r0, r1 = int(max(rows.min() - margin, 0)), int(min(rows.max() + margin, dataset.RasterYSize))
    scale = max((c1 - c0) / max_pixels, (r1 - r0) / max_pixels, 1)
    width, height = max(int((c1 - c0) / scale), 1), max(int((r1 - r0) / scale), 1)
    bands = list(rgb_bands(raster_path, bands) or [bands[0] if bands else 1])
    image_data = np.stack([dataset.GetRasterBand(b).ReadAsArray(c0, r0, c1 - c0, r1 - r0, width, height)
                           .astype(float) for b in bands], axis=-1)
    for band in range(image_data.shape[-1]):  # a 2-98 % stretch per band, fill (0) left out
        values = image_data[..., band]
        low, high = np.percentile(values[values > 0], [2, 98]) if (values > 0).any() else (0.0, 1.0)
        image_data[..., band] = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    figure = Figure(figsize=(7, 7 * height / width + 0.6), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(image_data if image_data.shape[-1] == 3 else image_data[..., 0], cmap="gray",
                extent=(c0, c1, r1, r0))
    bound = float(np.nanpercentile(np.abs(cate[shown]), 98)) or 1.0
    points = axes.scatter(cols, rows, c=cate[shown], cmap="RdBu", norm=TwoSlopeNorm(0, -bound, bound), s=14,
                          edgecolors="#333333", linewidths=0.4)
    figure.colorbar(points, ax=axes, fraction=0.04, label="estimated CATE (out-of-fold)")
    axes.set_axis_off()
    figure.tight_layout()
    figure.savefig(path)
    return path


def draw_cluster_effects(axes, clusters, ate=None):
    """Each latent cluster's effect with its 95 % interval, labelled with its share of units."""
    numbers = [row[0] for row in clusters]
    effect = [row[1] for row in clusters]
    axes.errorbar(numbers, effect, yerr=[[row[1] - row[2] for row in clusters], [row[3] - row[1] for row in clusters]],
                  fmt="o", color="#2166ac", capsize=4, label="cluster effect (95 %)")
    for row in clusters:
        axes.annotate(f"{100 * row[4]:.0f} %", (row[0], row[3]), textcoords="offset points", xytext=(0, 4),
                      ha="center", fontsize=7)
    _finish_effect_axes(axes, numbers, "latent cluster (share of units above)", ate)


def _display_rgb(window):
    """(bands, h, w) -> (h, w, 3) in [0, 1] for display: the first three bands (one band: grey), each stretched
    between its 2nd and 98th percentile."""
    import numpy as np

    window = np.asarray(window, float)
    bands = window[:3] if len(window) >= 3 else np.repeat(window[:1], 3, axis=0)
    low = np.nanpercentile(bands, 2, axis=(1, 2))[:, None, None]
    high = np.nanpercentile(bands, 98, axis=(1, 2))[:, None, None]
    return np.clip((bands - low) / np.where(high > low, high - low, 1.0), 0, 1).transpose(1, 2, 0)


def plot_salience(typical, path, rgb_order=(0, 1, 2)):
    """For each cluster, its most typical unit's window and where the image model looks (gradient salience).

    typical: [(cluster number, window (bands, h, w), salience (h, w))]; rgb_order: which bands show as red,
    green and blue (from the raster's colour interpretation)."""
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.2 * len(typical), 4.4), dpi=100)
    for column, (cluster, window, gradient) in enumerate(typical):
        window = np.asarray(window)
        order = [b for b in rgb_order if b < len(window)] or [0]
        image = figure.add_subplot(2, len(typical), column + 1)
        image.imshow(_display_rgb(window[order]))
        image.set_title(f"cluster {cluster}", fontsize=9)
        heat = figure.add_subplot(2, len(typical), len(typical) + column + 1)
        heat.imshow(gradient, cmap="magma")
        heat.set_title("salience", fontsize=8)
        for axes in (image, heat):
            axes.set_xticks([])
            axes.set_yticks([])
    figure.tight_layout()
    figure.savefig(path)
    return path


def cluster_report(metadata, html_path, figures, typical=None, rgb_order=(0, 1, 2)):
    """The HTML report of geocate:imageclusters: how to read it, the clusters with their effects and shares, the
    choice of K, the most typical unit of each cluster with its salience, settings, run metadata."""
    from matplotlib.figure import Figure

    clusters = metadata["clusters"]
    figure = Figure(figsize=(5.6, 3.6), dpi=110)
    draw_cluster_effects(figure.add_subplot(1, 1, 1), clusters, metadata.get("ate"))
    figure.tight_layout()
    effects_png = os.path.join(figures, "clusters.png")
    figure.savefig(effects_png)
    k = metadata["n_clusters"]
    low = metadata["ate"] - Z95 * metadata["ate_se"]
    high = metadata["ate"] + Z95 * metadata["ate_se"]
    summary = (f"<p><b>{k} cluster{'s' if k > 1 else ''}</b>" + (" (no heterogeneity found)" if k == 1 else "") + f". Average treatment effect (doubly robust): "
               f"<b>{metadata['ate']:.3f}</b> (95 % interval {low:.3f} to {high:.3f}), from {metadata['n_used']} "
               f"units ({metadata['n_dropped']} dropped).</p>")
    if metadata.get("k_rule"):
        summary += f"<p>{html.escape(metadata['k_rule'])}.</p>"
    forest = metadata.get("forest_test")
    if forest:   # issue 24: the clusters against estimatecate's own heterogeneity test
        summary += (f"<p>{'' if forest['supports_clusters'] else '<b>Not supported by the forest:</b> '}the causal "
                    f"forest's heterogeneity test on the same units and folds: held-out AUTOC "
                    f"{forest['estimate']:.3f}, p = {forest['p_value']:.3f}"
                    + (" - it confirms heterogeneity." if forest['supports_clusters'] else
                       " - it finds none; treat the clusters as exploratory and quote their held-out effects.")
                    + "</p>")
    if metadata.get("noise"):
        summary += f"<p>Outcome noise: {html.escape(metadata['noise'])}.</p>"
    masses = (metadata.get("estimator") or {}).get("point_masses")
    if masses:   # issue 24's hurdle part: the model's own effects are approximate there
        summary += (f"<p><b>Point masses:</b> {html.escape(masses)}. The clusters share them (a hurdle part), so "
                    "the model's effects and intervals are approximate and understate differences between clusters "
                    "in the share at these values: quote each cluster's held-out effect (DR).</p>")
    if metadata.get("assignment") and k > 1:
        summary += f"<p>Each unit's cluster (group in the layer) from {html.escape(metadata['assignment'])}.</p>"
    rows = [(f"cluster {row[0]}", f"{100 * row[4]:.0f} %", row[1], row[2], row[3], row[5], row[6])
            + ((row[7], row[8], row[9]) if len(row) > 9 else ("", "", "")) for row in clusters]
    sections = [
        ("How to read this", "<p class='note'>Each unit belongs to the latent clusters with the probabilities its "
         "image gives (p_1..p_K in the layer); each cluster has its own treatment effect. A unit's cluster (group) "
         "is the most probable one given those probabilities and, where the forest's test found heterogeneity, "
         "the causal forest's estimate of the unit's effect (both from models that did not see the unit). The interval of a "
         "cluster's effect is its posterior 95 % interval; 'share' is the mean probability over the units. K is "
         "proposed by the held-out likelihood of the cross-fitted model (the smallest K within one standard error "
         "of the best) and kept above 1 only when the clusters' effects differ in units the model did not see (a "
         "held-out test; a mixture can otherwise fit the outcome's shape - zeros, skew - rather than its effect); "
         "neighbouring clusters whose held-out effects do not differ are then merged (the model refit with one "
         "cluster fewer), so K = 1 means the images show no heterogeneity. The salience maps show which pixels "
         "move a unit's cluster probability most (brighter = more). ± and intervals are 95 %.</p>"),
        ("Summary", summary),
        ("Clusters", table(["cluster", "share of units", "effect", "95 % low", "95 % high", "outcome sd, control",
                            "outcome sd, treated", "held-out effect (DR)", "its SE", "units assigned"], rows, digits=3)
         + "<p class='note'>The held-out effect is the doubly robust effect of the units assigned to the cluster by "
           "a model that did not see them: the number the data support, to quote next to the model's own effect."
           "</p>" + image(effects_png, "Cluster effects")),
    ]
    if metadata.get("k_table"):
        sections.append(("Choice of K", table(["K", "held-out log-likelihood per unit", "SE"],
                                              [tuple(row) for row in metadata["k_table"]])))
    if typical:
        sections.append(("The most typical unit of each cluster", image(
            plot_salience(typical, os.path.join(figures, "salience.png"), rgb_order), "Typical windows and salience")))
    sections.append(("Settings", settings_table(metadata.get("parameters", {}))))
    return write_html(html_path, "GeoCATE: effect clusters from imagery", sections, metadata)


def correction_report(correction, html_path, truth, prediction):
    """The HTML report of geocate:calibratemap: the shrinkage found, and how each correction tracks the truth."""
    import tempfile

    import numpy as np
    from matplotlib.figure import Figure

    keep = np.isfinite(truth) & np.isfinite(prediction)
    truth, prediction = truth[keep], prediction[keep]
    figure = Figure(figsize=(5.6, 3.8), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    axes.scatter(truth, prediction, s=6, alpha=0.4, color="#777777", label="map's prediction")
    order = np.argsort(prediction)
    for method, colour in (("linear", "#2166ac"), ("tweedie", "#b2182b")):
        axes.plot(truth[order], correction.apply(prediction[order], method)[0], ".", ms=2, color=colour,
                  label=f"{method} correction")
    low, high = float(truth.min()), float(truth.max())
    axes.plot([low, high], [low, high], "k--", lw=1, label="truth")
    axes.set_xlabel("true outcome")
    axes.set_ylabel("map value")
    axes.legend(fontsize=7)
    figure.tight_layout()
    v = correction.validation
    rows = [(method, v[method]["slope_on_truth"], v[method]["rmse"], v[method]["sd_ratio"], v[method]["correlation"])
            for method in ("none", "linear", "tweedie")]
    with tempfile.TemporaryDirectory(prefix="geocate-") as folder:
        png = os.path.join(folder, "calibration.png")
        figure.savefig(png)
        plot = image(png, "Predictions and corrected values against the truth")
    sections = [
        ("How to read this", "<p class='note'>A map predicted from imagery is shrunk toward the mean: the slope of "
         "its prediction on the truth is below 1, and a treatment effect measured on the map is that much too "
         "small. The corrections stretch the map back: the linear one divides by the slope; Tweedie's uses the "
         "prediction error's variance and the shape of the predictions' distribution. A corrected value tracks "
         "the truth when its slope on the truth is near 1. The corrections fix averages and effects, not single "
         "units: a corrected unit is noisier than the map (higher RMSE), as it should be.</p>"),
        ("Summary", f"<p>{correction.n_validation} validation units; the map predicts "
         f"<b>{html.escape(correction.outcome)}</b>. Slope of the prediction on the truth "
         f"<b>{correction.slope:.3f}</b> (effects on the map are about {100 * correction.slope:.0f} % of the true "
         f"ones); standard deviation of prediction - truth {np.sqrt(correction.sigma2):.3f}; the correction holds "
         f"for map values from {correction.low:.3f} to {correction.high:.3f}.</p>"),
        ("How each version tracks the truth", table(["version", "slope on the truth", "RMSE", "sd ratio",
                                                    "correlation"], rows, digits=3) + plot),
    ]
    return write_html(html_path, "GeoCATE: calibration of a predicted-outcome map", sections,
                      {"algorithm": "geocate:calibratemap", "map": correction.map, "validation": v})


def stacked_models_section(metadata):
    """The stacked propensity's and outcome models' weights by fold (core.stacking), or "" without a stack."""
    propensity, outcome = metadata.get("propensity_model") or {}, metadata.get("outcome_models") or {}
    if "stack" not in propensity:
        return ""
    names = list(propensity["stack"][0]["weights"])
    rows = [(row["fold"], *(row["weights"][n] for n in names), row["scale"], row["winner"])
            for row in propensity["stack"]]
    part = ("<p class='note'>Each model is a super learner: its learners' weights were chosen by cross-validated "
            "loss among each fold's training units, so no unit's prediction used its own fold. Propensity: shares "
            "of the non-negative slopes on the learners' log-odds; scale is their sum (below 1: the learners' "
            "propensities were pulled toward the middle, i.e. calibrated).</p>"
            + table(["fold", *names, "scale", "largest"], rows, digits=3))
    if "stack" in outcome:
        arm_names = list(outcome["stack"][0]["weights_by_arm"])
        learner_names = list(outcome["stack"][0]["weights_by_arm"][arm_names[0]])
        rows = [(row["fold"], arm, *(row["weights_by_arm"][arm][n] for n in learner_names))
                for row in outcome["stack"] for arm in arm_names]
        part += ("<p>Outcome models: each arm's weights (non-negative least squares, summing to 1).</p>"
                 + table(["fold", "arm", *learner_names], rows, digits=3))
    return part


def calibration_sentence(calibration, before="", after=""):
    """What calibrating the propensities did (core.design.balancing_propensities' record): the log's line and the
    report's paragraph; "" when it was not asked for, or not reached (the run's warnings then say so)."""
    from .design import CLIP

    if not calibration or calibration["balance"] == "not reached":
        return ""
    left = (f"largest standardized difference of an arm's weighted mean from all units' "
            f"{calibration['largest_standardized_difference']:.1e}")
    if calibration["balance"] == "close":
        return (f"{before}Propensities calibrated so that each arm's weights balance the outcome models' "
                f"{calibration['inputs']} inputs (image components and covariates) closely, not exactly: some units "
                f"would need less weight than a propensity of {1 - CLIP:g} gives (their arm is over-represented "
                "there), and "
                f"are held at it; {left}.{after}")
    return (f"{before}Propensities calibrated so that each arm's weights balance the outcome models' "
            f"{calibration['inputs']} inputs (image components and covariates) exactly: {left}.{after}")


def observational_report(metadata, out, html_path):
    """The HTML report of geocate:estimateate: how to read it, the estimates, overlap (propensities by arm), balance
    before and after weighting, warnings, settings."""
    import tempfile

    import numpy as np
    from matplotlib.figure import Figure

    sections = [("How to read this", "<p class='note'>Without randomization, treated and untreated units differ in "
                 "what decided treatment. The propensity (each unit's probability of treatment given its image and "
                 "covariates) reweights the units so that the arms compare like with like. IPW weights outcomes by "
                 "1/propensity; Hajek normalises those weights; AIPW adds outcome models and is right if either "
                 "model is; the ATT is the effect on the units that were treated. All rest on the assumption that "
                 "the imagery and covariates capture everything that decided treatment and also drives the outcome. "
                 "Overlap: where propensities are near 0 or 1 some units have no comparable units in the other arm, "
                 "weights explode, and trimming them changes the population the estimate describes. Balance: a "
                 "standardized difference above 0.1 after weighting means the weighting did not make the arms "
                 "alike on that variable. Intervals are 95 %; standard errors are robust to clusters.</p>")]
    if out["warnings"]:
        sections.append(("Warnings", "<ul>" + "".join(f"<li><b>{html.escape(w)}</b></li>" for w in out["warnings"])
                         + "</ul>"))
    rows = []
    for effect in out["effects"]:
        low, high = effect.interval()
        rows.append((effect.estimator, effect.estimand, effect.contrast, effect.estimate, effect.std_err, low, high,
                     effect.n))
    trimmed = (f"<p>{metadata['n_trimmed']} unit(s) were trimmed (propensity outside "
               f"[{metadata['trim_bounds'][0]:.3f}, {metadata['trim_bounds'][1]:.3f}]): the estimates describe the "
               "units kept.</p>") if metadata["n_trimmed"] else ""
    if metadata.get("predicted_outcome"):
        sections.append(("Outcome from a map", predicted_outcome_section(metadata["predicted_outcome"])))
    sections.append(("Estimates", f"<p>Design: <b>{html.escape(metadata['design'])}</b>; {metadata['n_used']} units "
                     f"used. Propensity: {html.escape(metadata['propensity_model']['model'])}."
                     + (f" Standard errors: {html.escape(metadata['standard_errors'])}."
                        if metadata.get("standard_errors") else "") + "</p>" + trimmed
                     + calibration_sentence(metadata.get("calibration"), "<p>", "</p>")
                     + table(["estimator", "estimand", "contrast", "estimate", "SE", "95 % low", "95 % high", "units"],
                             rows, digits=3)))
    stack = stacked_models_section(metadata)
    if stack:
        sections.append(("Stacked models", stack))
    with tempfile.TemporaryDirectory(prefix="geocate-") as folder:
        if out["overlap"]:
            figure = Figure(figsize=(5.6, 3.2), dpi=110)
            axes = figure.add_subplot(1, 1, 1)
            e, arms = np.asarray(out["propensity"])[:, 1], np.asarray(out["arms"])
            bins = np.linspace(0, 1, 41)
            for arm, colour, label in ((0, "#b2182b", "control"), (1, "#2166ac", "treated")):
                axes.hist(e[arms == arm], bins=bins, alpha=0.5, color=colour, label=label)
            for bound in (0.05, 0.95):
                axes.axvline(bound, color="k", lw=0.8, ls="--")
            axes.set_xlabel("propensity (probability of treatment)")
            axes.set_ylabel("units")
            axes.legend(fontsize=8)
            figure.tight_layout()
            png = os.path.join(folder, "overlap.png")
            figure.savefig(png)
            overlap = out["overlap"]
            sections.append(("Overlap", f"<p>{overlap['share_outside']:.1%} of the units have a propensity outside "
                             "[0.05, 0.95] (treated: " f"{overlap['share_outside_treated']:.1%}, control: "
                             f"{overlap['share_outside_control']:.1%}). The 1&nbsp;% of units with the largest "
                             "weights in their arm carry "
                             f"{overlap.get('top_1pct_weight_share', float('nan')):.1%} of that arm's weight "
                             f"({overlap.get('top_1pct_equal_share', float('nan')):.1%} were all weights equal; units "
                             "kept, as the estimate weighs them).</p>" + image(png, "Propensities by arm")))
        if out["balance"]:
            sections.append(("Balance", table(["variable", "standardized difference before", "after weighting",
                                               "above 0.1 before", "above 0.1 after"],
                                              [(r[0], r[1], r[2], "yes" if r[3] else "", "yes" if r[4] else "")
                                               for r in out["balance"]], digits=3)))
        if out.get("sensitivity") is not None:
            png = os.path.join(folder, "sensitivity.png")
            plot_sensitivity(out["sensitivity"], png)
            sections.append(("Sensitivity to an unmeasured confounder",
                             sensitivity_section(out["sensitivity"]) + image(png, "Sensitivity contours")))
        sections.append(("Settings", settings_table(metadata.get("parameters", {}))))
        return write_html(html_path, "GeoCATE: average effect with confounding adjustment", sections, metadata)


def sensitivity_sentence(analysis, contrast=None):
    """The plain sentence of the imagery benchmark: 'A confounder as strong as everything the imagery shows
    would move the estimate to [a, b] (95 % interval [c, d]).'"""
    contrast = contrast or analysis.elements[0].contrast
    row = next((r for r in analysis.rows[contrast] if r["confounder"] == "as strong as everything the imagery shows"),
               None)
    if row is None:
        return ""
    return (f"A confounder as strong as everything the imagery shows would move the estimate ({contrast}) to "
            f"[{row['low']:.3f}, {row['high']:.3f}] (95 % interval [{row['ci_low']:.3f}, {row['ci_high']:.3f}]).")


def sensitivity_section(analysis):
    """How to read the omitted-variable bounds, the robustness values, and the bounds table of every contrast."""
    parts = ["<p class='note'>How strong would a confounder the imagery and covariates do not capture have to be to "
             "change the conclusion? (Chernozhukov, Cinelli, Newey, Sharma &amp; Syrgkanis 2022.) CF_Y is the share "
             "of the outcome's remaining variation it would explain; CF_D how much it would add to the variation of "
             "the weights (the Riesz representer); RHO the correlation of the two (1: the worst case). The bounds "
             "are the AIPW estimate moved by the largest bias such a confounder could cause, and the interval "
             "around them. RV is the strength (CF_Y = CF_D) that would bring the estimate to 0, RV_a the strength "
             "that would bring its interval to include 0. Benchmarks: a confounder that adds to the adjusted model "
             "what everything the imagery shows, or one covariate, adds (each refit without it).</p>"]
    sentence = sensitivity_sentence(analysis)
    if sentence:
        parts.append(f"<p><b>{html.escape(sentence)}</b></p>")
    for el in analysis.elements:
        rv, rv_a = analysis.rv[el.contrast]
        parts.append(f"<p>{html.escape(el.contrast)}: estimate {el.theta:.3f}; RV = {rv:.3f}, RV_a = {rv_a:.3f}.</p>")
        marks = {b.name: b for b in analysis.benchmarks[el.contrast]}
        rows = []
        for r in analysis.rows[el.contrast]:
            mark = marks.get(r["confounder"].replace("as strong as ", ""))
            rows.append((r["confounder"], r["cf_y"], r["cf_d"], r["rho"] if mark is None else mark.rho,
                         "" if mark is None else mark.delta_theta, r["low"], r["high"], r["ci_low"], r["ci_high"]))
        parts.append(table(["confounder", "CF_Y", "CF_D", "RHO (benchmark's own)", "estimate without it - with it",
                            "estimate low", "estimate high", "95 % low", "95 % high"], rows, digits=3))
    parts.append(f"<p class='note'>Benchmark rows use RHO = {analysis.rho:g} (the chosen value); the benchmark's own "
                 "RHO is shown for reference.</p>")
    return "".join(parts)


def plot_sensitivity(analysis, path):
    """Contours of the bound nearest 0 of the first contrast over (CF_D, CF_Y), 0 in bold, benchmarks marked."""
    from matplotlib.figure import Figure

    el = analysis.elements[0]
    grid, values = analysis.grid, analysis.contour
    figure = Figure(figsize=(5.6, 4.4), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    filled = axes.contourf(grid, grid, values, levels=14, cmap="RdBu", vmin=-abs(el.theta), vmax=abs(el.theta))
    figure.colorbar(filled, ax=axes).set_label(f"{'lower' if el.theta >= 0 else 'upper'} bound of the estimate")
    if values.min() < 0 < values.max():
        axes.contour(grid, grid, values, levels=[0.0], colors="k", linewidths=2)
    axes.plot([analysis.cf_d], [analysis.cf_y], marker="x", color="k", ms=8, ls="")
    axes.annotate("chosen", (analysis.cf_d, analysis.cf_y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    top = float(grid[-1])
    for b in analysis.benchmarks[el.contrast]:
        x, y = min(b.cf_d, top), min(b.cf_y, top)
        axes.plot([x], [y], marker="o" if b.name.startswith("everything") else "^", color="#222222", ls="")
        label = "imagery" if b.name.startswith("everything") else b.name.replace("covariate ", "")
        axes.annotate(label + ("" if (b.cf_d <= top and b.cf_y <= top) else " (beyond the plot)"), (x, y),
                      fontsize=7, xytext=(4, -9), textcoords="offset points")
    axes.set_xlabel("CF_D (confounder's strength in the treatment)")
    axes.set_ylabel("CF_Y (in the outcome)")
    axes.set_title(f"{el.contrast}: estimate {el.theta:.3f}; RHO = {analysis.rho:g}", fontsize=9)
    axes.set_xlim(0, top)
    axes.set_ylim(0, top)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_map(map_path, band_names, path, threshold=1.0, max_cells=600):
    """The mapped effect (diverging about zero) or the most likely cluster, with cells outside the trial's support
    hatched; from the GeoTIFF itself, at most ``max_cells`` cells a side (overviews do the rest)."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from osgeo import gdal

    dataset = gdal.Open(map_path)
    scale = max(dataset.RasterXSize, dataset.RasterYSize) / max_cells
    width, height = (max(int(dataset.RasterXSize / max(scale, 1)), 1), max(int(dataset.RasterYSize / max(scale, 1)), 1))

    def band(name):
        values = dataset.GetRasterBand(band_names.index(name) + 1).ReadAsArray(buf_xsize=width, buf_ysize=height)
        return np.ma.masked_equal(values.astype(float), -9999.0)

    figure = Figure(figsize=(6.2, 5.0), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    if "cluster" in band_names:
        clusters = band("cluster")
        k = band_names.index("cluster")
        shown = axes.imshow(clusters, cmap=ListedColormap([f"C{j}" for j in range(k)]), vmin=0.5, vmax=k + 0.5,
                            interpolation="nearest")
        bar = figure.colorbar(shown, ax=axes, ticks=range(1, k + 1))
        bar.set_label("most likely cluster")
    else:
        cate = band("cate")
        bound = float(np.quantile(np.abs(cate.compressed()), 0.98)) if cate.count() else 1.0
        shown = axes.imshow(cate, cmap="RdBu", vmin=-(bound or 1.0), vmax=bound or 1.0, interpolation="nearest")
        figure.colorbar(shown, ax=axes).set_label("predicted effect (CATE)")
    if "support" in band_names:
        outside = (band("support") > threshold).filled(False).astype(float)
        if outside.any():
            axes.contourf(outside, levels=[0.5, 1.5], colors="none", hatches=["////"])
            axes.contour(outside, levels=[0.5], colors="0.3", linewidths=0.6)
    if "treat" in band_names:   # targeting: the cells the budget's cut-off chooses, outlined
        chosen = (band("treat") == 1).filled(False).astype(float)
        if chosen.any():
            axes.contour(chosen, levels=[0.5], colors="black", linewidths=0.9)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(("hatched: outside the trial's support (extrapolated)" if "support" in band_names else "")
                   + ("; outlined: cells to treat" if "treat" in band_names else ""))
    figure.tight_layout()
    figure.savefig(path)
    return path


def map_report(metadata, html_path, map_path, figures):
    """The HTML report of geocate:mapeffects and geocate:applyclusters: how to read the map, its summary, the map
    with the extrapolated cells hatched, settings, run metadata."""
    bands = metadata["bands"]
    png = plot_map(map_path, bands, os.path.join(figures, "map.png"), metadata.get("support_threshold", 1.0))
    share = metadata.get("share_outside_support")
    summary = (f"<p>{metadata['n_cols']} x {metadata['n_rows']} map cells of {metadata['stride']} pixels, "
               f"<b>{metadata['usable']}</b> with a usable window"
               + (f"; model fit on <b>{metadata['n_units']}</b> trial units" if metadata.get("n_units") else "")
               + (f". <b>{share:.0%}</b> of the mapped area lies outside the trial's support." if share is not None
                  and "support" in bands else ".") + "</p>")
    reading = ("<p class='note'>Each map cell is a square of the imagery; its value is what the model fitted on the "
               "trial units predicts for a unit there, from the window around the cell's centre (the same window "
               "a trial unit sees). <b>cate</b> is the predicted treatment effect (red: harm, blue: gain) and "
               "<b>cate_se</b> its standard error from the forests' sampling noise; for the cluster model, "
               "<b>p_k</b> are the cluster probabilities, <b>cluster</b> the most likely one and <b>cate</b> the "
               "expected effect. <b>support</b> compares the cell's imagery with the trial units': above "
               f"{metadata.get('support_threshold', 1.0):g} (hatched) the cell looks less like any trial unit than "
               "trial units look like each other, and its effect is an extrapolation, not an estimate.</p>")
    sections = [("How to read this", reading), ("Summary", summary), ("Map", image(png, "Map")),
                ("Settings", settings_table(metadata.get("parameters", {})))]
    return write_html(html_path, "GeoCATE: effects mapped over the imagery", sections, metadata)


def panel_report(metadata, rows, html_path):
    """The HTML report of geocate:paneleffects: theta per approach and per period (periods that cannot be
    estimated shown with dashes), the settings, the run record."""
    parameters = metadata.get("parameters", {})
    summary = "".join(
        f"<p><b>{html.escape(e['approach'])}</b>: theta {e['theta']:.4f} (SE {e['std_err']:.4f}, 95 % interval "
        f"{e['theta'] - Z95 * e['std_err']:.4f} to {e['theta'] + Z95 * e['std_err']:.4f}), "
        f"{e['n_units']} units, {e['n_obs']} rows; year effects {'absorbed' if e.get('time_effects') else 'ignored'}."
        + (f" Not estimable: {', '.join(f'{p:g} ({r})' for p, r in e['not_estimable'])}." if e.get("not_estimable")
           else "") + "</p>" for e in metadata["estimates"])
    sections = [("Summary", summary),
                ("Estimates", table(["approach", "period", "theta", "SE", "95 % low", "95 % high", "units", "rows"],
                                    rows)),
                ("Inputs and settings", settings_table(parameters))]
    return write_html(html_path, "GeoCATE: panel effects", sections, metadata)


def plot_event_study(study, path):
    """The event-study plot of a core.eventstudy.EventStudy: effects by periods since adoption with pointwise 95 %
    intervals and the simultaneous (sup-t) band, placebo effects before adoption in grey, to a PNG."""
    import numpy as np
    from matplotlib.figure import Figure

    rows = sorted(study.event_time, key=lambda r: r.key)
    e = np.array([r.key for r in rows], float)
    att = np.array([r.att for r in rows])
    low, high = np.array([r.ci_low for r in rows]), np.array([r.ci_high for r in rows])
    band_low, band_high = np.array([r.band_low for r in rows]), np.array([r.band_high for r in rows])
    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    if np.isfinite(band_low).any():
        axes.fill_between(e, band_low, band_high, color="#4393c3", alpha=0.15, step=None,
                          label="simultaneous 95 % band (sup-t)")
    before = e < -study.anticipation
    for mask, colour, label in ((before, "#7f7f7f", "before adoption (placebo)"), (~before, "#2166ac", "effect")):
        if mask.any():
            axes.errorbar(e[mask], att[mask], yerr=[att[mask] - low[mask], high[mask] - att[mask]], fmt="o",
                          color=colour, capsize=3, label=label)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.axvline(-0.5 - study.anticipation, color="#b35806", linestyle="--", linewidth=0.8)
    axes.set_xlabel("periods since adoption (event time)")
    axes.set_ylabel("average effect on the treated")
    axes.set_title(f"Event study: overall ATT {study.overall.att:.3f} (SE {study.overall.std_err:.3f})")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def event_study_report(metadata, rows, html_path, plot_png):
    """The HTML report of geocate:eventstudy: the overall ATT, the pre-trend test, the event-study plot, the
    tables of every aggregation, the settings and the run record."""
    overall, pre = metadata["overall"], metadata["pre_trend"]
    summary = (f"<p>Overall effect on the treated (the mean over treated unit-periods): <b>{overall['att']:.3f}</b> "
               f"(SE {overall['std_err']:.3f}, 95 % interval {overall['ci_low']:.3f} to {overall['ci_high']:.3f}), "
               f"from {metadata['n_units']} units ({metadata['n_treated_units']} treated, in "
               f"{len(metadata['cohorts'])} cohort(s)); comparison group: {html.escape(metadata['control'])}; "
               f"standard errors clustered by unit.</p>"
               f"<p>Pre-trends: joint test that the {pre['df']} placebo effect(s) before adoption are all zero, "
               f"chi-square {pre['statistic']:.2f}, p = {pre['p_value']:.3g}"
               + (" (a small p-value says the treated and comparison units were already drifting apart before "
                  "adoption: parallel trends are doubtful)." if pre["p_value"] < 0.05 else ".") + "</p>")
    headers = ["aggregation", "event time", "cohort", "period", "ATT", "SE", "95 % low", "95 % high",
               "band low", "band high", "units"]
    sections = [("Summary", summary), ("Effects by periods since adoption", image(plot_png, "Event-study plot")),
                ("Estimates", table(headers, rows)),
                ("Inputs and settings", settings_table(metadata.get("parameters", {})))]
    return write_html(html_path, "GeoCATE: event study (staggered adoption)", sections, metadata)


def plot_budget_curve(curve, path):
    """The budget curve (gain per unit against treating nobody as the budget grows, 95 % band), a random allocation
    of the same spend, and the chosen budget marked."""
    import numpy as np
    from matplotlib.figure import Figure

    spend, gain, se = (np.asarray(curve[k], float) for k in ("spend", "gain", "gain_se"))
    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    x = spend / curve["mean_cost"]   # the share of the total cost (without costs: of the units)
    line, = axes.plot(x, gain, label="the rule (units by CATE" + (" per cost" if curve["costs"] else "") + ")")
    axes.fill_between(x, gain - Z95 * se, gain + Z95 * se, color=line.get_color(), alpha=0.18)
    axes.plot([0, 1], [0, curve["ate"]], color="0.4", linestyle="--", label="a random set of the same cost")
    if curve.get("budget") is not None:
        axes.axvline(curve["budget"] / curve["mean_cost"], color="black", linewidth=0.9, label="the budget")
    axes.axhline(0, color="black", linewidth=0.6)
    axes.set_xlabel("budget: share of the total cost" if curve["costs"] else "budget: share of the units treated")
    axes.set_ylabel("gain per unit against treating nobody")
    axes.set_title("Budget curve (doubly robust scores, held-out folds)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _estimate_cells(record):
    return (record["estimate"], record["std_err"], record["ci_low"], record["ci_high"])


def targeting_report(metadata, html_path, figures, map_path=None):
    """The HTML report of geocate:targeting: the verdict, the rule's value, the rules compared, the budget curve,
    the policy tree, the candidates and the map of cells to treat, settings, run record."""
    plan = metadata["targeting"]
    budget = plan["budget"]
    verdict = (f"<p><b>{html.escape(plan['message'])}</b></p>"
               f"<p>The rule ranks units by {html.escape(plan['rule'])}; the budget ({html.escape(budget['described'])})"
               f" treats <b>{plan['n_treat']}</b> of the trial's units ({plan['treated_share']:.0%}). Each unit's "
               "rank comes from a model that did not see its fold, and the rule's value from the doubly robust "
               "scores of the same held-out folds, with standard errors robust to the clusters the folds keep "
               f"whole. Effect modifiers: {html.escape(plan['effect_modifiers'])}.</p>")
    rows = [("GAIN: mean effect of the treated minus that of all units", *_estimate_cells(plan["gain"])),
            ("per unit, against a random set of the same size", *_estimate_cells(plan["vs_random"])),
            ("per unit, against treating everyone", *_estimate_cells(plan["vs_everyone"])),
            ("per unit, against treating nobody", *_estimate_cells(plan["value"]))]
    if plan.get("vs_random_cost"):
        rows.append(("per unit, against a random set of the same cost", *_estimate_cells(plan["vs_random_cost"])))
    sequential = plan["sequential_gain"]
    rows.append(("GAIN judged fold by fold (each fold ranked by earlier folds only)", *_estimate_cells(sequential)))
    totals = plan.get("totals") or {}
    for name, label in (("vs_random", "total over the trial's units, against a random set of the same size"),
                        ("vs_random_cost", "total over the trial's units, against a random set of the same cost"),
                        ("vs_everyone", "total over the trial's units, against treating everyone"),
                        ("value", "total over the trial's units, against treating nobody")):
        if name in totals:
            rows.append((label, *_estimate_cells(totals[name])))
    value = (table(["estimate", "value", "SE", "95 % low", "95 % high"], rows)
             + f"<p class='note'>The heterogeneity test of the trial: p = {plan['heterogeneity_p']:.3g}. The fold-by-"
             "fold GAIN judges rules learnt on fewer units (it understates the final rule) but stays honest when "
             "the ranking is noise: quote it when no heterogeneity was detected.</p>")
    sections = [("Verdict", verdict), ("What the rule gains", value)]
    curve_png = plot_budget_curve(plan["curve"], os.path.join(figures, "budget.png"))
    sections.append(("Budget curve", image(curve_png, "Budget curve")
                     + "<p class='note'>Gain per unit of the trial against treating nobody as the budget grows "
                       "(units expected to gain, by CATE" + (" per cost" if plan["curve"]["costs"] else "")
                     + "; exact, the last unit in part), with its 95 % band; the dashed line is a random set of "
                       "the same cost.</p>"))
    if plan.get("comparison"):
        comparison = plan["comparison"]
        body = table(["rule", "units treated", "GAIN", "SE", "95 % low", "95 % high", "per unit", "SE"],
                     [tuple(r.values()) for r in comparison["rules"]])
        body += table(["difference", "GAIN difference", "SE", "95 % low", "95 % high", "p-value"],
                      [(f"{d['first']} - {d['second']}", d["estimate"], d["std_err"], d["ci_low"], d["ci_high"],
                        d["p_value"]) for d in comparison["differences"]])
        body += ("<p class='note'>Every rule at the same budget, on the same folds and scores; differences are "
                 "paired. A positive 'imagery CATE - covariates-only CATE' says the imagery earns its place.</p>")
        sections.append(("Rules compared", body))
    if plan.get("tree"):
        tree = plan["tree"]
        oof = tree["out_of_fold"]
        sections.append((f"A rule to read: policy tree of depth {tree['depth']}",
                         f"<pre>{html.escape(tree['rule'])}</pre><p>Judged out-of-fold (each fold decided by a tree "
                         f"of the other folds), it treats {oof['n_treat']} units; per unit against a random set of "
                         f"the same size: {oof['estimate']:.4f} (SE {oof['std_err']:.4f}). Columns: "
                         f"{html.escape(', '.join(tree['columns']))}.</p>"))
    if plan.get("candidates"):
        c = plan["candidates"]
        sections.append(("Candidates", f"<p>{c['n']} candidate units, {c['usable']} with a usable window; "
                                       f"<b>{c['treat']}</b> reach the rule's cut-off and are chosen"
                         + (f" (total cost {c['cost_of_treated']:,.6g})" if c.get("cost_of_treated") is not None
                            else "")
                         + f"; {c['outside_support']} lie outside the trial's support"
                         + (f", of which {c['excluded_outside_support']} would reach the cut-off but are not chosen"
                            if c.get("excluded_outside_support") else "") + ".</p>"))
    if map_path and plan.get("map"):
        m = plan["map"]
        png = plot_map(map_path, m["bands"], os.path.join(figures, "map.png"))
        sections.append(("Map of cells to treat", image(png, "Map")
                         + f"<p>{m['usable']} cells with a usable window; <b>{m.get('treat', 0)}</b> chosen (CATE "
                           f"at least {plan['cate_cut']:.3g}: the same share of places as the budget buys among the trial's units); "
                           f"{m.get('treat_outside_support', 0)} more reach it outside the trial's support and "
                         + ("are chosen too." if plan.get("outside_support_allowed") else "are not chosen.")
                         + " The map's band 'treat' holds the choice.</p>"))
    sections.append(("Settings", settings_table(metadata.get("parameters", {}))))
    return write_html(html_path, "GeoCATE: where the programme should go next", sections, metadata)

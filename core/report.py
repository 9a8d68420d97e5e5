"""Plots (matplotlib, PNG) and self-contained HTML reports of GeoCATE runs."""

import base64
import html
import json
import os
import time


def plot_toc(rates, path, title="Targeting operator characteristic"):
    """TOC curves of RateResults (estimate and 95 % band against the treated fraction q) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    axes = figure.add_subplot(1, 1, 1)
    for rate in rates:
        line, = axes.plot(rate.q, rate.toc, marker="o", label=f"{rate.priority} (AUTOC {rate.estimate:.3f} "
                                                           f"± {1.96 * rate.std_err:.3f})")
        axes.fill_between(rate.q, rate.toc - 1.96 * rate.toc_se, rate.toc + 1.96 * rate.toc_se,
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
    def cell(value):
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
.note{color:#555;font-size:0.9em}"""


def write_html(path, title, sections, metadata=None):
    """A self-contained HTML page: ``sections`` is a list of (heading, html body); metadata goes at the end."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p class='note'>Written by GeoCATE on {time.strftime('%Y-%m-%d %H:%M')}.</p>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    if metadata is not None:
        parts.append("<h2>Run metadata</h2><pre>" + html.escape(json.dumps(metadata, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("".join(parts))
    os.replace(tmp, path)
    return path


def rate_rows(evaluation):
    """Rows (metric, priority, estimate, SE, 95 % low, high, p-value, estimate/SE) of an Evaluation."""
    rows = []
    for target, results in evaluation.rates.items():
        for rate in results:
            rows.append((target, rate.priority, rate.estimate, rate.std_err, rate.ci[0], rate.ci[1], rate.p_value,
                         rate.ratio))
    for name, calibration in zip(evaluation.names, evaluation.calibration):
        rows.append(("BLP mean (b1)", name, calibration.mean_forest, calibration.mean_forest_se,
                     calibration.mean_forest - 1.959964 * calibration.mean_forest_se,
                     calibration.mean_forest + 1.959964 * calibration.mean_forest_se, calibration.mean_forest_p,
                     calibration.mean_forest / calibration.mean_forest_se))
        rows.append(("BLP differential (b2)", name, calibration.differential, calibration.differential_se,
                     calibration.differential - 1.959964 * calibration.differential_se,
                     calibration.differential + 1.959964 * calibration.differential_se, calibration.differential_p,
                     calibration.differential / calibration.differential_se))
    for name, gates in zip(evaluation.names, evaluation.gates):
        for group, n, estimate, se, low, high in gates:
            rows.append((f"GATE group {group} (n={n})", name, estimate, se, low, high, float("nan"), estimate / se))
    return rows


RATE_HEADERS = ["metric", "priority", "estimate", "SE", "95 % low", "95 % high", "p-value", "estimate / SE"]


def evaluation_report(evaluation, html_path, png_path, inputs, metadata=None):
    """The HTML report of geocate:evaluate (TOC plot embedded), written atomically."""
    plot_toc([r for r in evaluation.rates["AUTOC"] if " - " not in r.priority], png_path)
    autoc = evaluation.rates["AUTOC"][0]
    verdict = ("The ranking finds heterogeneity: units it puts first gain more than average (AUTOC > 0 at the 5 % level)."
               if autoc.ci[0] > 0 else
               "No heterogeneity detected at the 5 % level: the 95 % interval of the AUTOC includes 0.")
    sections = [
        ("Inputs", table(["item", "value"], list(inputs.items()))),
        ("Summary", f"<p>{html.escape(verdict)}</p>"),
        ("TOC curve", image(png_path, "TOC curve")),
        ("Estimates", table(RATE_HEADERS, rate_rows(evaluation))),
        ("How to read this", "<p class='note'>TOC(q) is the average effect among the fraction q of units the rule "
         "treats first, minus the average effect; AUTOC is its area, Qini its area weighted by q (Yadlowsky et al.). "
         "Doubly robust scores use outcome models that did not see the unit; intervals come from a half-sample "
         "bootstrap over clusters (locations or spatial blocks). The BLP differential b2 is 1 for a well-calibrated "
         "CATE and 0 for one without signal (Chernozhukov et al.). GATEs are average effects by quantile group of "
         "the priority (group 1 lowest).</p>"),
    ]
    return write_html(html_path, "GeoCATE: evaluation of heterogeneity", sections, metadata)


def comparison_rows(comparison):
    """Rows (metric, rule, estimate, SE, 95 % low, high, p-value, estimate/SE) of compare_sources' output."""
    rows = []
    for kind in ("rates", "differences"):
        for target, results in comparison[kind].items():
            for rate in results:
                rows.append((target, rate.priority, rate.estimate, rate.std_err, rate.ci[0], rate.ci[1],
                             rate.p_value, rate.ratio))
    return rows


def comparison_report(comparison, html_path, png_path, inputs, metadata=None):
    """The HTML report of geocate:comparesources (TOC curves of each source embedded)."""
    plot_toc(comparison["rates"]["AUTOC"], png_path, "TOC by source of the CATE")
    lines = []
    for rate in comparison["differences"]["AUTOC"]:
        verdict = "ranks better" if rate.ci[0] > 0 else ("ranks worse" if rate.ci[1] < 0 else "is not distinguishable")
        lines.append(f"<li>{html.escape(rate.priority)}: AUTOC difference {rate.estimate:.3f} "
                     f"(95 % [{rate.ci[0]:.3f}, {rate.ci[1]:.3f}]); the first {verdict}.</li>")
    sections = [
        ("Inputs", table(["item", "value"], list(inputs.items()))),
        ("What the imagery adds", "<ul>" + "".join(lines) + "</ul>" if lines else
         "<p>Only imagery was given: no covariates to compare with.</p>"),
        ("TOC curves", image(png_path, "TOC curves by source")),
        ("Estimates", table(RATE_HEADERS, comparison_rows(comparison))),
        ("How to read this", "<p class='note'>Each source's CATE is out-of-fold, all on the same honest folds; "
         "all rules are judged on the same doubly robust scores and the same bootstrap half-samples, so the "
         "differences are paired. A positive difference with an interval above 0 means the first source ranks "
         "units by their gain better than the second.</p>"),
    ]
    return write_html(html_path, "GeoCATE: what the imagery adds", sections, metadata)

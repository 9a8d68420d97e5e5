"""Finish the demo: a QGIS project with the imagery and styled results, a map PNG rendered by QGIS, run.json, and a summary.

Usage: python scripts/finish_demo.py OUT_DIR --started EPOCH_SECONDS

Reads OUT_DIR/result.gpkg (written by qgis_process), its run metadata
(result.run.json) and qgis_process.json, compares the estimates with the
simulated truth (true_cate in the units layer) and prints the figures.
"""

import argparse
import json
import os
import time

import numpy as np
from qgis.core import (
    QgsApplication,
    QgsLayoutExporter,
    QgsLayoutItemLabel,
    QgsLayoutItemLegend,
    QgsLayoutItemMap,
    QgsLayoutPoint,
    QgsLayoutSize,
    QgsPrintLayout,
    QgsProject,
    QgsRasterLayer,
    QgsUnitTypes,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QFont

from geocate.core.record import RunRecord
from geocate.provider.convert import as_number
from geocate.provider.maps import set_view_extent, true_color
from geocate.provider.styles import apply_result_styles

HERE = os.path.dirname(os.path.abspath(__file__))
RASTER = os.path.join(os.path.dirname(HERE), "resources", "demo", "landsat8_demo_b234.tif")


def export_map(project, result, raster, png_path, title):
    layout = QgsPrintLayout(project)
    layout.initializeDefaults()
    page = layout.pageCollection().page(0)
    page.setPageSize(QgsLayoutSize(270, 200, QgsUnitTypes.LayoutMillimeters))
    item = QgsLayoutItemMap(layout)
    item.attemptMove(QgsLayoutPoint(5, 15, QgsUnitTypes.LayoutMillimeters))
    item.attemptResize(QgsLayoutSize(180, 180, QgsUnitTypes.LayoutMillimeters))
    item.setLayers([result, raster])
    item.setExtent(raster.extent())
    layout.addLayoutItem(item)
    label = QgsLayoutItemLabel(layout)
    label.setText(title)
    label.setFont(QFont("Sans", 14))
    label.attemptMove(QgsLayoutPoint(5, 3, QgsUnitTypes.LayoutMillimeters))
    label.attemptResize(QgsLayoutSize(250, 10, QgsUnitTypes.LayoutMillimeters))
    layout.addLayoutItem(label)
    legend = QgsLayoutItemLegend(layout)
    legend.setLinkedMap(item)
    legend.setTitle("Legend")
    legend.setAutoUpdateModel(False)
    root = legend.model().rootGroup()
    root.clear()
    root.addLayer(result)
    legend.attemptMove(QgsLayoutPoint(190, 15, QgsUnitTypes.LayoutMillimeters))
    layout.addLayoutItem(legend)
    exporter = QgsLayoutExporter(layout)
    settings = QgsLayoutExporter.ImageExportSettings()
    settings.dpi = 110
    status = exporter.exportToImage(png_path, settings)
    if status != QgsLayoutExporter.Success:
        raise RuntimeError(f"Map export failed ({status}): {exporter.errorMessage()}")


def spearman(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).correlation)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--started", type=float, default=time.time())
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)

    from osgeo import gdal

    gdal.PushErrorHandler("CPLQuietErrorHandler")  # the PNG export's georeferencing attempt is noise
    app = QgsApplication([], False)
    app.initQgis()
    project = QgsProject.instance()
    raster = QgsRasterLayer(RASTER, "Landsat 8, 2020-05-18 (B4 B3 B2)")
    true_color(raster)
    result = QgsVectorLayer(os.path.join(out, "result.gpkg") + "|layername=result", "CATE, out-of-fold", "ogr")
    if not result.isValid():
        raise SystemExit("The result layer is missing: did qgis_process fail?")
    apply_result_styles(result)
    project.addMapLayer(raster)
    project.addMapLayer(result)
    project.setCrs(raster.crs())
    set_view_extent(project, result)   # opens on the units, not on a blank map
    project_path = os.path.join(out, "demo.qgz")
    if not project.write(project_path):
        raise SystemExit(f"Could not write {project_path}")

    cate = np.array([as_number(f["cate"]) for f in result.getFeatures()])
    truth = np.array([as_number(f["true_cate"]) for f in result.getFeatures()])
    estimated = np.isfinite(cate) & np.isfinite(truth)
    rho = spearman(cate[estimated], truth[estimated])
    rmse = float(np.sqrt(np.mean((cate[estimated] - truth[estimated]) ** 2)))
    true_ate = float(np.mean(truth[estimated]))

    metadata = RunRecord.read(os.path.join(out, "result.run.json"))
    results = json.load(open(os.path.join(out, "qgis_process.json"), encoding="utf-8"))["results"]
    title = (f"GeoCATE demo: ATE {results['ATE']:.2f} (SE {results['ATE_SE']:.2f}), "
             f"Spearman with truth {rho:.2f}")
    export_map(project, result, raster, os.path.join(out, "map.png"), title)
    app.exitQgis()

    elapsed = time.time() - args.started
    metadata = metadata.with_figures(demo={
        "true_ate": true_ate, "spearman_cate_truth": rho, "rmse_cate_truth": rmse,
        "n_compared": int(estimated.sum()), "wall_time_s": round(elapsed, 2),
        "qgis_process_results": results,
    })
    with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as handle:
        json.dump(metadata.to_json(), handle, indent=2, default=str)
    low, high = results["ATE"] - 1.96 * results["ATE_SE"], results["ATE"] + 1.96 * results["ATE_SE"]
    print(f"Units used: {results['N_USED']}, dropped: {results['N_DROPPED']} "
          f"({'; '.join(f'{v} {k}' for k, v in metadata['dropped'].items() if v)})")
    print(f"ATE (doubly robust): {results['ATE']:.3f}, SE {results['ATE_SE']:.3f}, "
          f"95 % interval [{low:.3f}, {high:.3f}]; true ATE of these units {true_ate:.3f}")
    print(f"Estimated vs true CATE: Spearman {rho:.3f}, RMSE {rmse:.3f} (n = {int(estimated.sum())})")
    print(f"Heterogeneity (sequential cross-fold test, one-sided): held-out AUTOC {results['AUTOC']:.3f}, "
          f"SE {results['AUTOC_SE']:.3f}, t = {results['AUTOC_T']:.2f}, p = {results['AUTOC_P']:.2g}; "
          f"pooled out-of-fold AUTOC (descriptive) {results['AUTOC_POOLED']:.3f}")
    print(f"Device: {metadata['device']}; time taken: {elapsed:.1f} s")
    print(f"Outputs in {out}: result.gpkg, demo.qgz, map.png, report.html, run.json")


if __name__ == "__main__":
    main()

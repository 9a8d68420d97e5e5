"""The demo study: a simulated trial on the bundled Landsat crop, written as a GeoPackage of points.

The points are written in WGS 84 (longitude/latitude, as GPS positions of
villages usually are) while the imagery is in UTM 21N, so the demo exercises
the CRS transformation. As in a real survey, a few outcomes are missing
(attrition) and a few units sit so close to the image edge that their window
is unusable; GeoCATE keeps them with patch_ok = 0 or drops them and says so.
Used by `make demo` (scripts/build_demo.py), the tests and the dock's "Load the demo study".
"""

import os

import numpy as np

from . import patches, simulate

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_RASTER = os.path.join(os.path.dirname(HERE), "resources", "demo", "landsat8_demo_b234.tif")


def edge_units(raster, n, rng):
    """Coordinates of ``n`` units within a few pixels of the raster's left edge."""
    info = patches.raster_info(raster)
    gt = info.geotransform
    col = rng.integers(0, 5, n)
    row = rng.integers(50, info.height - 50, n)
    return np.column_stack([gt[0] + (col + 0.5) * gt[1], gt[3] + (row + 0.5) * gt[5]])


def build(out_path, n_units=1200, seed=2020, raster=DEMO_RASTER, n_missing=24, n_edge=12):
    """Write the demo study to ``out_path`` (a GeoPackage); returns the number of units."""
    from osgeo import ogr, osr

    rng = np.random.default_rng(seed)
    trial = simulate.simulate_trial(raster, n_units=n_units, seed=seed)
    coords = np.vstack([trial.coords, edge_units(raster, n_edge, rng)])
    n = len(coords)
    treated = np.concatenate([trial.treated, rng.integers(0, 2, n_edge)])
    outcome = np.concatenate([trial.outcome, rng.normal(0, 1, n_edge)])
    covariates = np.vstack([trial.covariates, rng.standard_normal((n_edge, 2))])
    true_cate = np.concatenate([trial.true_cate, np.full(n_edge, np.nan)])
    true_group = np.concatenate([trial.true_group, np.zeros(n_edge, int)])
    missing = rng.choice(n_units, n_missing, replace=False)

    src = osr.SpatialReference()
    src.ImportFromWkt(trial.crs_wkt)
    dst = osr.SpatialReference()
    dst.ImportFromEPSG(4326)
    for srs in (src, dst):
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    lonlat = np.asarray(osr.CoordinateTransformation(src, dst).TransformPoints(coords.tolist()))[:, :2]

    if os.path.exists(out_path):
        os.remove(out_path)
    ogr.UseExceptions()
    dataset = ogr.GetDriverByName("GPKG").CreateDataSource(out_path)
    layer = dataset.CreateLayer("units", dst, ogr.wkbPoint)
    for name, kind in (("unit_id", ogr.OFTInteger), ("treated", ogr.OFTInteger), ("outcome", ogr.OFTReal),
                       ("assets", ogr.OFTReal), ("distance", ogr.OFTReal), ("true_cate", ogr.OFTReal),
                       ("true_group", ogr.OFTInteger)):
        layer.CreateField(ogr.FieldDefn(name, kind))
    layer.StartTransaction()
    for i in range(n):
        feature = ogr.Feature(layer.GetLayerDefn())
        feature["unit_id"] = i + 1
        feature["treated"] = int(treated[i])
        if i not in missing:
            feature["outcome"] = float(outcome[i])
        feature["assets"] = float(covariates[i, 0])
        feature["distance"] = float(covariates[i, 1])
        if np.isfinite(true_cate[i]):
            feature["true_cate"] = float(true_cate[i])
            feature["true_group"] = int(true_group[i])
        point = ogr.Geometry(ogr.wkbPoint)
        point.AddPoint_2D(float(lonlat[i, 0]), float(lonlat[i, 1]))
        feature.SetGeometry(point)
        layer.CreateFeature(feature)
    layer.CommitTransaction()
    dataset = None
    return n



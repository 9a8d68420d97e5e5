"""geocate:mapeffects and geocate:applyclusters through QGIS: outputs, styles, bad input, qgis_process."""

import json
import subprocess

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import (
    QgsPalettedRasterRenderer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProject,
    QgsRasterLayer,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)
from test_estimatecate_in_qgis import base_parameters, plugin, qgis_process_env, run_clusters  # noqa: F401


def map_run(units, raster, **extra):
    import processing

    parameters = dict(base_parameters(units, raster), STRIDE=66, N_ESTIMATORS=20)
    parameters.pop("N_ESTIMATORS")
    parameters.update(extra)
    return processing.run("geocate:mapeffects", parameters)


def mask_layer(raster, epsg=4326):
    """A square polygon over the middle of the demo scene, in another CRS than the raster."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsFeature, QgsGeometry

    dataset = gdal.Open(raster)
    gt = dataset.GetGeoTransform()
    x0, y0 = gt[0] + 300 * 30, gt[3] - 300 * 30
    square = QgsGeometry.fromWkt(f"POLYGON(({x0} {y0},{x0 + 9000} {y0},{x0 + 9000} {y0 - 9000},{x0} {y0 - 9000},"
                                 f"{x0} {y0}))")
    square.transform(QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:32621"),
                                            QgsCoordinateReferenceSystem(f"EPSG:{epsg}"), QgsProject.instance()))
    layer = QgsVectorLayer(f"Polygon?crs=EPSG:{epsg}", "mask", "memory")
    feature = QgsFeature()
    feature.setGeometry(square)
    layer.dataProvider().addFeatures([feature])
    return layer


def test_mapeffects_writes_a_cog_its_record_and_the_support_share(plugin, demo_units_gpkg, demo_raster,  # noqa: F811
                                                                  tmp_path):
    out = tmp_path / "effects.tif"
    results = map_run(demo_units_gpkg, demo_raster, MASK=mask_layer(demo_raster), OUTPUT=str(out),
                      OUTPUT_REPORT=str(tmp_path / "map.html"))
    report = (tmp_path / "map.html").read_text()
    assert "How to read this" in report and "outside the trial's support" in report and "base64" in report
    assert results["OUTPUT"] == str(out) and results["N_USED"] == 294
    dataset = gdal.Open(str(out))
    assert [dataset.GetRasterBand(b + 1).GetDescription() for b in range(3)] == ["cate", "cate_se", "support"]
    values = dataset.ReadAsArray()
    inside = values[0] != -9999
    # The mask (given in degrees, reprojected to the raster's UTM) covers 9 km = about 4.5 cells of 66 px.
    assert 12 <= inside.sum() <= 30 and results["CELLS"] == inside.sum()
    record = json.loads((tmp_path / "effects.run.json").read_text())
    assert record["algorithm"] == "geocate:mapeffects" and record["parameters"]["MASK"] == "mask"
    assert record["parameters"]["EXTENT"] is None and record["parameters"]["STRIDE"] == 66
    assert 0 <= results["SHARE_OUTSIDE_SUPPORT"] <= 1
    assert results["SHARE_OUTSIDE_SUPPORT"] == pytest.approx(record["share_outside_support"])
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name or "tiles" in p.name]


def test_the_map_loads_diverging_with_a_veil_over_what_it_extrapolates(plugin, demo_units_gpkg,  # noqa: F811
                                                                       demo_raster, tmp_path):
    from geocate.core.maps import SUPPORT_THRESHOLD
    from geocate.provider.mapeffects import StyleMapOnLoad

    out = tmp_path / "styled.tif"
    map_run(demo_units_gpkg, demo_raster, STRIDE=99, OUTPUT=str(out))
    project = QgsProject.instance()
    layer = QgsRasterLayer(str(out), "map")
    project.addMapLayer(layer)
    context = QgsProcessingContext()
    context.setProject(project)
    StyleMapOnLoad(["cate", "cate_se", "support"], SUPPORT_THRESHOLD, "Effects map (outcome)").postProcessLayer(
        layer, context, None)
    assert layer.name() == "Effects map (outcome)" and isinstance(layer.renderer(), QgsSingleBandPseudoColorRenderer)
    shader = layer.renderer().shader().rasterShaderFunction()
    assert shader.minimumValue() == pytest.approx(-shader.maximumValue())   # centred on zero
    veils = [lyr for lyr in project.mapLayers().values() if lyr.name().endswith("outside the trial's support")]
    assert len(veils) == 1 and veils[0].renderer().band() == 3
    # The legend reads "CATE" over classes with round limits (-1.5, -0.75, 0 ... not -1.4837).
    from qgis.core import QgsLayerTreeModel

    model = QgsLayerTreeModel(project.layerTreeRoot())
    assert model.layerLegendNodes(project.layerTreeRoot().findLayer(layer.id()))[0].data(0) == "CATE"
    del model
    limits = [item.value for item in shader.colorRampItemList()]
    assert all(abs(v * 4 - round(v * 4)) < 1e-9 or abs(v * 40 - round(v * 40)) < 1e-9 for v in limits)
    assert veils[0].renderer().opacity() == 1.0 and shader.colorRampItemList()[0].color.alpha() == 255
    project.removeAllMapLayers()


def test_bad_map_input_is_named_and_nothing_is_written(plugin, demo_units_gpkg, demo_raster, tmp_path):  # noqa: F811
    out = str(tmp_path / "bad.tif")
    with pytest.raises(QgsProcessingException, match="at least 1 pixel"):
        map_run(demo_units_gpkg, demo_raster, STRIDE=0, OUTPUT=out)
    with pytest.raises(QgsProcessingException, match="does not overlap"):
        map_run(demo_units_gpkg, demo_raster, EXTENT="10,11,40,41 [EPSG:4326]", OUTPUT=out)
    with pytest.raises(QgsProcessingException, match="does not exist"):
        map_run(demo_units_gpkg, demo_raster, OUTPUT=str(tmp_path / "no" / "such" / "map.tif"))
    assert not list(tmp_path.iterdir())


def test_applyclusters_maps_a_saved_model_and_refuses_other_bands(plugin, demo_units_gpkg, demo_raster,  # noqa: F811
                                                                   tmp_path):
    import processing

    fitted = run_clusters(demo_units_gpkg, demo_raster, tmp_path, CLUSTERS=2, EPOCHS=60)
    out = tmp_path / "clusters_map.tif"
    results = processing.run("geocate:applyclusters", {"MODEL": fitted["OUTPUT_MODEL"], "RASTER": demo_raster,
                                                       "STRIDE": 66, "OUTPUT": str(out),
                                                       "OUTPUT_REPORT": str(tmp_path / "clusters.html")})
    assert "the most likely one" in (tmp_path / "clusters.html").read_text()
    dataset = gdal.Open(str(out))
    names = [dataset.GetRasterBand(b + 1).GetDescription() for b in range(dataset.RasterCount)]
    assert names == ["p_1", "p_2", "cluster", "cate"] and results["CELLS"] > 0
    values = dataset.ReadAsArray()
    usable = values[2] != -9999
    assert np.allclose(values[0][usable] + values[1][usable], 1, atol=1e-5)
    assert set(np.unique(values[2][usable])) <= {1.0, 2.0}
    layer = QgsRasterLayer(str(out), "clusters")
    from geocate.provider.styles import effect_map_style

    assert isinstance(effect_map_style(layer, names).renderer(), QgsPalettedRasterRenderer)
    del layer   # a layer object alive at interpreter exit, after QGIS has gone, crashes the process
    two_bands = str(tmp_path / "two.tif")
    gdal.Translate(two_bands, demo_raster, bandList=[1, 2])
    with pytest.raises(QgsProcessingException, match="reads band"):
        processing.run("geocate:applyclusters", {"MODEL": fitted["OUTPUT_MODEL"], "RASTER": two_bands,
                                                 "OUTPUT": str(tmp_path / "never.tif")})
    assert not (tmp_path / "never.tif").exists()


def test_qgis_process_maps_effects_from_the_command_line(demo_units_gpkg, demo_raster, tmp_path):
    out = tmp_path / "cli_map.tif"
    done = subprocess.run(
        ["qgis_process.bin", "--json", "run", "geocate:mapeffects", "--", f"INPUT={demo_units_gpkg}",
         "TREATMENT=treated", "OUTCOME=outcome", f"RASTER={demo_raster}", "STRIDE=99", "FEATURE_CACHE=false",
         f"OUTPUT={out}"], env=qgis_process_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    assert results["N_USED"] == 294 and results["CELLS"] == 100
    assert gdal.Open(str(out)).RasterCount == 3


def test_cluster_maps_are_coloured_by_each_clusters_effect_and_labelled_as_the_table(tmp_path):
    import numpy as np
    from conftest import write_raster
    from qgis.core import QgsPalettedRasterRenderer

    from geocate.provider.styles import effect_map_style

    values = np.stack([np.full((8, 8), 0.5), np.full((8, 8), 0.5), np.tile([1.0, 2.0], (8, 4)), np.ones((8, 8))])
    layer = QgsRasterLayer(write_raster(tmp_path / "clusters.tif", values), "clusters")
    # (cluster, effect, ci_low, ci_high, share, ...): the cluster table the log and the report print
    table = [[1, 0.33, 0.1, 0.5, 0.55], [2, -0.40, -0.7, -0.1, 0.45]]
    effect_map_style(layer, ["p_1", "p_2", "cluster", "cate"], table)
    renderer = layer.renderer()
    assert isinstance(renderer, QgsPalettedRasterRenderer)
    classes = renderer.classes()
    assert [c.label for c in classes] == ["cluster 1: +0.33, 55%", "cluster 2: -0.40, 45%"]
    gain, harm = classes[0].color, classes[1].color
    assert gain.blue() > gain.red() and harm.red() > harm.blue()   # red only for harm

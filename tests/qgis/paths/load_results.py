"""Run GeoCATE algorithms as the Processing dialog does (processing.runAndLoadResults) in a QGIS of its own.

Usage: python load_results.py cases.json report.json

cases.json: a list of {"name", "algorithm", "parameters"}; a parameter value "@<case>:<OUTPUT>" is the named
output of an earlier case. After each case report.json is rewritten with what happened (so a crash of QGIS
names the case it happened in): the results, the errors Processing reported (e.g. "not correctly
generated"), the layers the case added to the project (name, type, source, renderer, style names, where in
the layer tree), and at the end whether QGIS closed cleanly.
"""

import json
import os
import sys
import traceback

from qgis.core import (
    QgsApplication,
    QgsMapLayerType,
    QgsProcessingFeedback,
    QgsProject,
)


class Feedback(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.errors, self.warnings = [], []

    def reportError(self, error, fatalError=False):  # noqa: N802,N803 - QGIS's names
        self.errors.append(error)

    def pushWarning(self, warning):  # noqa: N802 - QGIS's name
        self.warnings.append(warning)


def describe(layer):
    node = QgsProject.instance().layerTreeRoot().findLayer(layer.id())
    parent = node.parent() if node is not None else None
    entry = {"name": layer.name(), "source": layer.source(), "valid": layer.isValid(),
             "group": parent.name() if parent is not None and parent.parent() is not None else "",
             "styles": layer.styleManager().styles()}
    if layer.type() == QgsMapLayerType.VectorLayer:
        entry.update(kind="vector", renderer=layer.renderer().type() if layer.renderer() else None,
                     features=layer.featureCount(), fields=[f.name() for f in layer.fields()])
    elif layer.type() == QgsMapLayerType.RasterLayer:
        entry.update(kind="raster", renderer=layer.renderer().type() if layer.renderer() else None,
                     bands=layer.bandCount(), opacity=layer.renderer().opacity() if layer.renderer() else None)
    return entry


def plain(value):
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return str(value)


def main(cases_path, report_path):
    app = QgsApplication([], False)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing

    Processing.initialize()
    from geocate.provider.provider import GeoCateProvider

    provider = GeoCateProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    import processing

    with open(cases_path, encoding="utf-8") as handle:
        cases = json.load(handle)
    report = {"cases": {}, "finished": False}
    results = {}

    def save():
        with open(report_path + ".tmp", "w", encoding="utf-8") as out:
            json.dump(report, out, indent=1, default=str)
        os.replace(report_path + ".tmp", report_path)

    for case in cases:
        entry = report["cases"][case["name"]] = {"started": True}
        save()
        parameters = {}
        for key, value in case["parameters"].items():
            if isinstance(value, str) and value.startswith("@"):
                ref, output = value[1:].split(":")
                value = results[ref][output]
            parameters[key] = value
        before = set(QgsProject.instance().mapLayers())
        feedback = Feedback()
        try:
            outcome = processing.runAndLoadResults(case["algorithm"], parameters, feedback=feedback)
            results[case["name"]] = outcome
            entry.update(ok=True, results=plain(outcome))
        except Exception as error:  # noqa: BLE001 - reported to the test
            entry.update(ok=False, error=str(error), traceback=traceback.format_exc())
        added = [layer for key, layer in QgsProject.instance().mapLayers().items() if key not in before]
        entry.update(errors=feedback.errors, warnings=feedback.warnings, layers=[describe(layer) for layer in added])
        save()
    QgsProject.instance().clear()
    provider_registry = QgsApplication.processingRegistry()
    provider_registry.removeProvider(provider)
    report["finished"] = True
    save()
    app.exitQgis()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Every algorithm's Help button opens its own page (help/<name>.html), and the page documents the algorithm as it is:
every parameter and output by name, a worked example running it, references; plain, self-contained HTML."""

import glob
import html
import os
import re

import pytest
from conftest import ROOT

pytestmark = pytest.mark.qgis

HELP = ROOT / "help"
NAMES = ["estimatecate", "imageclusters", "evaluate", "comparesources", "estimateate", "calibratemap",
         "paneleffects", "mapeffects", "applyclusters", "eventstudy", "targeting"]


@pytest.fixture(scope="module")
def algorithms(qgis_app):
    from geocate.provider.provider import GeoCateProvider

    provider = GeoCateProvider()
    provider.loadAlgorithms()
    yield {algorithm.name(): algorithm for algorithm in provider.algorithms()}   # the provider stays alive meanwhile


def page_text(name):
    with open(HELP / f"{name}.html", encoding="utf-8") as handle:
        return handle.read()


def section(text, start, end):
    """The HTML between the heading with id ``start`` and the one with id ``end``."""
    begin, stop = text.find(f'id="{start}"'), text.find(f'id="{end}"')
    assert 0 <= begin < stop, f"sections '{start}' and '{end}' missing or out of order"
    return text[begin:stop]


def mentions(text, name):
    """``name`` as a whole word: CLUSTER is not found inside MAX_CLUSTERS, nor OUTPUT inside OUTPUT_REPORT."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text) is not None


def test_every_algorithm_has_a_page(algorithms):
    assert sorted(algorithms) == sorted(NAMES), "an algorithm was added or renamed: give it a help page"
    for name in NAMES:
        assert (HELP / f"{name}.html").is_file(), name


@pytest.mark.parametrize("name", NAMES)
def test_help_url_opens_the_page(algorithms, name):
    from qgis.PyQt.QtCore import QUrl

    url = algorithms[name].helpUrl()
    assert url.startswith("file://"), url
    path = QUrl(url).toLocalFile()
    assert os.path.basename(path) == f"{name}.html", url
    assert os.path.isfile(path)
    assert os.path.realpath(path) == os.path.realpath(HELP / f"{name}.html")


@pytest.mark.parametrize("name", NAMES)
def test_page_documents_every_parameter_and_output(algorithms, name):
    algorithm, text = algorithms[name], page_text(name)
    inputs = section(text, "inputs", "outputs")
    outputs = section(text, "outputs", "example")
    missing = [d.name() for d in algorithm.parameterDefinitions() if not mentions(inputs, d.name())]
    assert not missing, f"parameters without a row in the Inputs of help/{name}.html: {missing}"
    missing = [o.name() for o in algorithm.outputDefinitions() if not mentions(outputs, o.name())]
    assert not missing, f"outputs not described in the Outputs of help/{name}.html: {missing}"
    for definition in algorithm.parameterDefinitions():   # the label the dialog shows, so the reader finds it
        assert html.escape(definition.description()) in inputs, (name, definition.name())


@pytest.mark.parametrize("name", NAMES)
def test_page_has_an_example_and_references(name):
    text = page_text(name)
    assert re.search(r'<h2 id="example">\s*Worked example', text), name
    example = section(text, "example", "reading")
    commands = re.findall(r"<pre>(.*?)</pre>", example, flags=re.S)
    assert any(f"run geocate:{name} --" in command for command in commands), \
        f"help/{name}.html shows no qgis_process command running geocate:{name}"
    references = text[text.find('id="references"'):]
    assert re.search(r"<h2[^>]*>\s*References\s*</h2>", text), name
    assert len(re.findall(r"<li>", references)) >= 1, name
    for heading in ("What it answers", "When to use it", "Inputs", "Outputs", "How to read the results",
                    "Common mistakes"):
        assert re.search(rf"<h2[^>]*>\s*{heading}\s*</h2>", text), (name, heading)


def test_index_links_every_page():
    text = page_text("index")
    for name in NAMES:
        assert f'href="{name}.html"' in text, name


def test_pages_are_plain_self_contained_html_for_readers_not_programmers():
    pages = sorted(glob.glob(str(HELP / "*.html")))
    assert len(pages) == len(NAMES) + 1
    assert (HELP / "help.css").is_file()
    for path in pages:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        name = os.path.basename(path)
        assert "CausalForestDML" not in text, name
        assert "<script" not in text.lower() and "javascript:" not in text.lower(), name
        for target in re.findall(r'(?:href|src)="([^"]+)"', text):
            assert not re.match(r"[a-z]+://|//", target), (name, target)   # nothing fetched from the network
            assert (HELP / target.split("#")[0]).is_file(), (name, target)
        assert text.count("<table") == text.count("</table>"), name
        assert text.count("<pre>") == text.count("</pre>"), name


def test_every_input_parameter_has_a_label_in_the_reports_settings_table(algorithms):
    """The run record keeps every input parameter (its definitions); the report's settings table shows each with a
    label a reader knows, never the bare Processing name."""
    from geocate.core.report import SETTING_LABELS

    missing = sorted({d.name() for algorithm in algorithms.values() for d in algorithm.parameterDefinitions()
                      if not d.isDestination() and d.name() not in SETTING_LABELS})
    assert missing == []

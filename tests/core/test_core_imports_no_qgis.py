"""core/ must never import qgis or PyQt5 (ARCHITECTURE.md): checked in the source and at import time."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"
FORBIDDEN = ("qgis", "PyQt5", "PyQt6", "sip")


def imported_modules(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_no_core_module_names_qgis_or_pyqt_in_an_import():
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) >= 6
    offenders = {p.name: m for p in modules for m in imported_modules(p) if m.split(".")[0] in FORBIDDEN}
    assert offenders == {}


def test_importing_every_core_module_loads_no_qgis_or_pyqt():
    names = [p.stem for p in CORE.glob("*.py") if p.stem != "__init__"]
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {FORBIDDEN!r}: raise ImportError('core imported ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {names!r}: importlib.import_module('geocate.core.' + name)\n"
        "print('ok')\n"
    )
    plugins = str(Path(__file__).resolve().parents[2] / ".qgis-profile/profiles/default/python/plugins")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": plugins + ":" + ":".join(p for p in sys.path if "site-packages" in p)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def core_imports():
    """{module: the core modules it imports}, imports inside functions counted."""
    names = {p.stem for p in CORE.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for path in CORE.glob("*.py"):
        if path.stem == "__init__":
            continue
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        graph[path.stem] = found & names - {path.stem}
    return graph


def test_no_circle_among_core_modules_counting_imports_inside_functions():
    """Issue 20: the modules of core/ form a hierarchy (a circle hidden in function-level imports was how
    design, evaluate, learners and scores depended on each other)."""
    graph = core_imports()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert len(done) == len(graph) >= 20

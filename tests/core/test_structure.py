"""Issue 20's walls, checked in the source: each Processing algorithm is parameters -> core call -> outputs (at
most 40 lines), the run record's parameters come from the definitions (no hand-typed parameter dicts), and the
provider does not import the plugin module."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROVIDER = sorted((ROOT / "provider").glob("*.py"))


def process_algorithms():
    for path in PROVIDER:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "processAlgorithm":
                        yield f"{path.name}:{node.name}", item


def test_every_process_algorithm_is_at_most_40_lines():
    found = dict(process_algorithms())
    assert len(found) >= 11   # the eleven algorithms of the provider
    long = {name: node.end_lineno - node.lineno + 1 for name, node in found.items()
            if node.end_lineno - node.lineno + 1 > 40}
    assert long == {}


def test_no_algorithm_types_its_parameters_into_the_run_record():
    """A dict literal with two or more Processing parameter names as keys ("SEED": seed, ...) is a hand-typed
    copy of the definitions: the record reads them (provider.base.parameter_record)."""
    names = {"INPUT", "TREATMENT", "OUTCOME", "COVARIATES", "RASTER", "SEED", "CLUSTER", "STRATA", "DESIGN",
             "PATCH_SIZE", "SPATIAL_BLOCK", "BOOTSTRAP", "GROUPS"}
    offenders = []
    for path in PROVIDER:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                if len(keys & names) >= 2:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_the_provider_does_not_import_the_plugin_module():
    for path in PROVIDER:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "plugin" and not (node.module or "").endswith(".plugin"), path.name


def test_no_fold_loop_is_written_by_hand_outside_crossfit():
    """Issue 20: folds are assigned and walked in core/crossfit.py (Folds, crossfit); elsewhere a loop over folds
    goes through Folds (split, sequential), never np.unique(folds) or a mask folds == k written again."""
    import re

    hand_written = re.compile(r"np\.unique\(\s*folds?\b|\bfolds? [!=]= |for \w+ in range\(\s*n_folds\s*\)")
    offenders = []
    for path in sorted((ROOT / "core").glob("*.py")) + PROVIDER:
        if path.name == "crossfit.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if hand_written.search(line.split("#")[0]):
                offenders.append(f"{path.name}:{number}")
    assert offenders == []
    crossfit = (ROOT / "core" / "crossfit.py").read_text(encoding="utf-8")
    assert hand_written.search(crossfit)   # the pattern finds the one home's own loop

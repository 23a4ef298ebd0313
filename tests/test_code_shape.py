"""The shape the architecture issue (13) set for the code, kept by a test so it stays:

- no module of ``twin/`` over ~450 lines (one idea per module);
- no function over ~80 lines where the serving loops and the searches live (the scheduler,
  both clocks, server construction, calibration, validation, recommend and placement);
- an import inside a function only to keep a heavy or optional dependency (torch,
  transformers, scipy.optimize, matplotlib, tqdm, scikit-learn, ...) or a whole layer off
  the import path of ``import twin`` and of commands that do not need it, and each such
  import says why on its line (``# lazy: reason``). Any other import belongs at the top of
  its module, where the import-graph test (tests/test_import_graph.py) sees the layering.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# where function length is held to MAX_FUNCTION_LINES: the serving loops and the searches
SHORT_FUNCTIONS = ("twin/sched", "twin/sim", "twin/servers.py", "twin/executor/engine.py",
                   "twin/executor/loop_state.py", "twin/calibrate", "twin/validate",
                   "twin/ml/recommend.py", "twin/ml/placement.py", "twin/ml/verify.py",
                   "twin/ml/recommender.py", "twin/fleet")


def _modules() -> list[Path]:
    files = sorted((ROOT / "twin").rglob("*.py"))
    assert len(files) > 50, "scan is broken"
    return files


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_no_module_over_450_lines():
    long = {_rel(p): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_serving_loops_and_searches_are_made_of_short_functions():
    long = {}
    for path in _modules():
        if not _rel(path).startswith(SHORT_FUNCTIONS):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{_rel(path)}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def unexplained_lazy_imports(text: str, name: str) -> list[str]:
    """``name:line`` of every import inside a function whose lines carry no ``# lazy:``."""
    src = text.splitlines()
    found = set()
    for fn in ast.walk(ast.parse(text)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not any(
                        "# lazy:" in line for line in src[node.lineno - 1:node.end_lineno]):
                    found.add(f"{name}:{node.lineno}")
    return sorted(found)


def test_every_import_inside_a_function_says_why():
    bad = [hit for p in _modules()
           for hit in unexplained_lazy_imports(p.read_text(encoding="utf-8"), _rel(p))]
    assert not bad, ("imports inside functions without a '# lazy: reason' (move them to the "
                     f"top of the module, or say what they keep off the import path): {bad}")


def test_the_lazy_import_scan_sees_an_unexplained_import():
    text = ("import sys\n\ndef f():\n    import json\n    from os import (\n        path)  # lazy: x\n"
            "    return json, path\n")
    assert unexplained_lazy_imports(text, "m.py") == ["m.py:4"]

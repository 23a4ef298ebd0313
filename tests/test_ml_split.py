"""The ML layer stays in small modules (issue 13), and its lazy imports keep doing their job.

- every module of ``twin/ml/`` (and ``twin/cli/ml.py``) stays under ~450 lines, and the
  placement and recommend searches are made of functions under ~80 lines (``place`` was one
  127-line function inside a 798-line ``recommender.py``);
- recommending and placing (the shipped model, predicted in numpy) import none of the heavy
  optional libraries: scikit-learn and the others load only to fit, plot or sweep;
- building the ``twin`` parser (``twin --help``, every command's start) loads no ``twin.ml``
  module: the command functions of ``twin/cli/ml.py`` import their part when they run.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _ml_files() -> list[Path]:
    return sorted((ROOT / "twin" / "ml").glob("*.py")) + [ROOT / "twin" / "cli" / "ml.py"]


def test_ml_modules_are_small():
    long = {p.relative_to(ROOT).as_posix(): n for p in _ml_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_recommend_and_place_are_made_of_short_steps():
    long = {}
    for name in ("recommend.py", "placement.py", "verify.py", "recommender.py"):
        path = ROOT / "twin" / "ml" / name
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = f"import json, sys; {code}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return set(json.loads(out.stdout))


def test_recommending_imports_no_heavy_library():
    heavy = {"sklearn", "xgboost", "interpret", "ray", "matplotlib", "tqdm", "torch"}
    loaded = _loaded_after("import twin.ml.recommend, twin.ml.placement, twin.ml.recommender, "
                           "twin.ml.verify, twin.ml.report")
    assert "twin.ml.placement" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in heavy) == []


def test_twin_parser_loads_no_ml_module():
    loaded = _loaded_after("from twin.cli.app import build_parser; build_parser()")
    assert "twin.cli.ml" in loaded   # the ML commands are registered ...
    assert sorted(m for m in loaded if m.startswith("twin.ml.")) == []   # ... not loaded

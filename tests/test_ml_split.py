"""The ML layer stays in small modules (issue 13), and its lazy imports keep doing their job.

- (module and function sizes: tests/test_code_shape.py, for the whole tree);
- recommending and placing (the shipped model, predicted in numpy) import none of the heavy
  optional libraries: scikit-learn and the others load only to fit, plot or sweep;
- building the ``twin`` parser (``twin --help``, every command's start) loads no ``twin.ml``
  module: the command functions of ``twin/cli/ml.py`` import their part when they run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

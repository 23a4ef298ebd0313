"""twin/results/: one results layer below both clocks (issue 13).

- it imports nothing from the layers above it (the clocks, policies, ml, calibration, CLI),
  and importing it pulls in neither torch nor a clock;
- both clocks (the twin and the executor) record through the same ``Recorder`` and build
  their result with the same ``build_result``, so their tables line up column for column;
- one ``smape`` (validation, calibration and the recommender's models use the same function)
  and one ``crop_window``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "twin" / "results"
# what the results layer may import from the project (it sits below both clocks)
ALLOWED = ("twin.results", "twin.sched", "twin.errors", "twin.outputs")


def _twin_imports(path: Path) -> set[str]:
    """Every ``twin.*`` module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "twin"}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] == "twin":
                found.add(node.module)
    return found


def test_results_layer_imports_nothing_above_it():
    files = sorted(RESULTS.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "recorder.py", "results.py",
                                      "itl_histogram.py", "plot.py"}
    bad = {f"{f.name}: {m}" for f in files for m in _twin_imports(f)
           if not any(m == a or m.startswith(a + ".") for a in ALLOWED)}
    assert not bad, f"twin/results/ imports from above it: {sorted(bad)}"


def test_importing_results_loads_no_clock_and_no_torch():
    code = ("import sys, twin.results, twin.results.recorder, twin.results.plot; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith("
            "('twin.sim', 'twin.executor', 'twin.policies', 'twin.ml'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_one_smape_everywhere():
    from twin.ml import estimators as ml_estimators
    from twin.calibrate import step_fit as calibrate_vllm
    from twin.results import smape
    import twin.validate as validate

    assert ml_estimators.smape is smape and validate.smape is smape
    assert calibrate_vllm.smape is smape
    defined = [p.relative_to(ROOT).as_posix() for p in (ROOT / "twin").rglob("*.py")
               if any(isinstance(n, ast.FunctionDef) and n.name == "smape"
                      for n in ast.parse(p.read_text()).body)]   # module-level functions
    assert defined == ["twin/results/results.py"]


def test_smape_values():
    from twin.results import smape

    assert smape(1, 3) == pytest.approx(1.0) and isinstance(smape(1, 3), float)
    assert smape(0, 0) == 0.0
    a, b = np.array([1.0, 0.0, 2.0, np.nan, 5.0]), np.array([3.0, 0.0, 2.0, 1.0, np.nan])
    got = smape(a, b)
    assert got[:3].tolist() == [1.0, 0.0, 0.0]
    # an unknown value has an unknown error: it must not pass for a perfect match (0)
    assert np.isnan(got[3]) and np.isnan(got[4])
    pct = smape(a, b, percent=True)
    assert pct[0] == 200.0 * 2 / 4 and pct[1] == 0.0 and np.isnan(pct[3])


def test_crop_window():
    from twin.results import crop_window

    t = pd.DataFrame({"request_id": [5, 6, 7, 8], "arrival_s": [0.0, 1.0, 2.0, 2.5]})
    assert crop_window(t, None) is t
    c = crop_window(t, 2.0)       # an arrival at the window's end is still sent
    assert c["request_id"].tolist() == [5, 6, 7] and c.index.tolist() == [0, 1, 2]
    assert crop_window(t, 0.5)["request_id"].tolist() == [5]


def _trace(n=12, adapters=("a", "b")):
    rng = np.random.default_rng(3)
    return pd.DataFrame({
        "request_id": np.arange(n), "arrival_s": np.sort(rng.uniform(0, 2.0, n)),
        "adapter": pd.array([adapters[i % len(adapters)] for i in range(n)], dtype="string"),
        "prompt_tokens": rng.integers(8, 40, n), "output_tokens": rng.integers(2, 12, n)})


def _count_recorder_calls(monkeypatch, engine: str) -> dict:
    """Count the calls of the shared ``Recorder.step`` and of ``build_result`` as the clock
    module ``engine`` calls it."""
    from twin.results import recorder

    calls = {"step": 0, "build": 0}
    step, build = recorder.Recorder.step, recorder.build_result

    def counting_step(self, *a, **k):
        calls["step"] += 1
        return step(self, *a, **k)

    def counting_build(*a, **k):
        calls["build"] += 1
        return build(*a, **k)

    monkeypatch.setattr(recorder.Recorder, "step", counting_step)
    monkeypatch.setattr(f"{engine}.build_result", counting_build)
    return calls


def test_the_twin_records_through_the_shared_recorder(monkeypatch):
    """simulate() writes its steps, timeline and result through twin.results.recorder."""
    from twin.config import ServingConfig
    from twin.results import recorder
    from twin.sim import simulate

    calls = _count_recorder_calls(monkeypatch, "twin.sim.engine")
    cfg = ServingConfig(max_loras=1, max_cpu_loras=2, max_model_len=4096)
    res = simulate(_trace(), cfg, record_steps=True)
    assert calls["build"] == 1 and calls["step"] == len(res.steps) > 0
    assert list(res.steps.columns) == recorder.STEP_COLUMNS
    assert list(res.timeline.columns) == recorder.TIMELINE_COLUMNS
    assert res.summary["steps"] == int(res.steps["steps"].sum())


def test_the_executor_records_through_the_shared_recorder(monkeypatch, tmp_path,
                                                          one_torch_thread):
    """execute() uses the same Recorder and build_result: its step log starts with the
    twin's columns, its request table and timeline have the twin's columns."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from twin.config import ServingConfig
    from twin.executor.adapters import write_synthetic_adapters
    from twin.executor.engine import execute
    from twin.executor.weights import make_tiny_llama
    from twin.results import recorder
    from twin.sim import simulate
    from twin.workload.catalog import AdapterCatalog

    make_tiny_llama(tmp_path / "model", seed=0, max_position_embeddings=512)
    cat = AdapterCatalog(write_synthetic_adapters(tmp_path / "model", tmp_path / "ad", 2,
                                                  ranks=(8,)))
    calls = _count_recorder_calls(monkeypatch, "twin.executor.engine")
    names = cat.adapters
    trace = _trace(6, adapters=names)
    cfg = ServingConfig(max_loras=1, max_cpu_loras=2, max_lora_rank=8, max_model_len=512)
    res = execute(trace, cfg, tmp_path / "model", cat, time_scale=0.01)
    assert calls["build"] == 1 and calls["step"] == len(res.steps) > 0
    assert list(res.steps.columns[:len(recorder.STEP_COLUMNS)]) == recorder.STEP_COLUMNS
    assert list(res.timeline.columns) == recorder.TIMELINE_COLUMNS
    sim = simulate(trace, cfg, record_steps=True)
    assert list(res.requests.columns[:len(sim.requests.columns)]) == list(sim.requests.columns)
    assert res.requests["status"].tolist() == ["finished"] * len(trace)
    # the executor has no API server: no metrics-scrape stalls to record
    assert set(sim.summary) - {"frontend_stalls"} <= set(res.summary)
    assert "frontend_stalls" in sim.summary and "frontend_stalls" not in res.summary


def test_itl_histogram_binned_in_chunks_as_at_once_and_last_range_replaceable():
    """Ranges are binned a chunk at a time as they come (bounded memory); the weights are
    those of binning everything at the end, and the last range can still be replaced (a
    fleet's fed clock cuts a priced run short)."""
    import numpy as np

    from twin.results.itl_histogram import ITLHistogram

    rng = np.random.default_rng(0)
    ranges = [(float(a), float(a) * (1 + b), int(k), float(p)) for a, b, k, p in zip(
        rng.uniform(1e-3, 0.1, 300), rng.uniform(0, 0.2, 300), rng.integers(1, 50, 300),
        rng.integers(1, 64, 300))]
    at_once, chunked = ITLHistogram(), ITLHistogram()
    at_once.CHUNK = 10**9
    chunked.CHUNK = 7
    for h in (at_once, chunked):
        for r in ranges:
            h.add_range(*r)
        h.replace_last(0.02, 0.03, 5, 8.0)
    assert len(chunked._cols[0]) < 8 and len(at_once._cols[0]) == 300
    np.testing.assert_array_equal(at_once._weights(), chunked._weights())
    assert at_once.percentile(99) == chunked.percentile(99)

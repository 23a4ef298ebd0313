"""Calibration and validation split by idea (issue 13): the executor fit on a saved
measurements log, the layering of ``twin.calibrate`` / ``twin.validate``, and their size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twin.calibrate.executor_fit import EXECUTOR_FEATURES, fit_measurements
from twin.calibrate.executor_measure import MeasurementCache
from twin.costs.profile import load_profile
from twin.costs.step_time import FEATURES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_import_graph import import_graphs  # noqa: E402

#: step-time coefficients (s per unit) the synthetic executor log is made of
TRUE = {"const": 2e-3, "prefill_tokens": 3e-6, "decode_tokens": 4e-5, "adapters": 5e-4}


def synthetic_log(seed: int = 0, repeats: int = 3, slice_hit: float = 4e-3):
    """A measurements log as ``twin calibrate --executor`` saves it: step rows of two cells
    (``repeats`` rounds each, every round scheduling alike), whose durations are ``TRUE``
    priced features plus the step's load time, one round of one step losing a scheduler
    slice; and load rows affine in the adapter's bytes."""
    rng = np.random.default_rng(seed)
    rows = []
    for key in ("cell-a", "cell-b"):
        n = 12
        X = np.zeros((n, len(FEATURES)))
        X[:, FEATURES.index("const")] = 1.0
        X[:, FEATURES.index("prefill_tokens")] = rng.integers(0, 512, n)
        X[:, FEATURES.index("decode_tokens")] = rng.integers(1, 32, n)
        X[:, FEATURES.index("adapters")] = rng.integers(0, 4, n)
        y = X @ np.array([TRUE.get(k, 0.0) for k in FEATURES])
        load = np.where(rng.random(n) < 0.3, 1.5e-3, 0.0)
        for rep in range(repeats):
            df = pd.DataFrame(X, columns=list(FEATURES))
            df.insert(0, "kind", "step")
            df.insert(1, "key", key)
            df["repeat"] = rep
            df["step"] = np.arange(n)
            df["duration_s"] = y + load + ((np.arange(n) == 3) * slice_hit if rep == 1 else 0)
            df["load_s"] = load
            df["loads"] = (load > 0).astype(int)
            rows.append(df)
    measured = pd.concat(rows, ignore_index=True)
    shape = load_profile("cpu-tiny").model
    ranks = np.array([8, 16, 32, 64])
    nbytes = np.array([shape.adapter_bytes(int(r)) for r in ranks], float)
    loads = pd.DataFrame({"kind": "load", "key": [f"load-r{r}" for r in ranks], "rank": ranks,
                          "disk_s": 1e-3 + 2e-9 * nbytes, "copy_s": 1e-4 + 5e-10 * nbytes})
    return measured, loads, shape


def test_fit_on_a_saved_log_recovers_its_costs():
    """The median over repeats drops the scheduler slice one round lost, the load time is
    taken out of each step, and the fit finds the costs the log was made of."""
    measured, loads, shape = synthetic_log()
    fit = fit_measurements(measured, loads, shape, statistic="median")
    for k in EXECUTOR_FEATURES:   # all but vLLM's LoRA grid term, which the executor lacks
        assert fit.coef[k] == pytest.approx(TRUE.get(k, 0.0), rel=1e-6, abs=1e-12), k
    assert len(fit.steps) == 24 and set(fit.sum_error_per_cell) == {"cell-a", "cell-b"}
    assert all(abs(e) < 1e-6 for e in fit.sum_error_per_cell.values())
    assert fit.residuals["n"] == 24 and fit.residuals["rel_abs_median"] < 1e-6
    lt = fit.load_time
    assert (lt.disk_s, lt.disk_s_per_byte) == pytest.approx((1e-3, 2e-9), rel=1e-6)
    assert (lt.host_to_gpu_s, lt.host_to_gpu_s_per_byte) == pytest.approx((1e-4, 5e-10), rel=1e-6)
    # the mean keeps the slice (a served trace pays it): that cell's step costs more
    mean = fit_measurements(measured, loads, shape, statistic="mean")
    st = mean.steps.set_index(["key", "step"])
    assert st.loc[("cell-a", 3), "y"] == pytest.approx(
        st.loc[("cell-a", 3), "y_median"] + 4e-3 / 3, rel=1e-9)


def test_refit_of_the_saved_log_is_the_fit_of_what_was_measured(tmp_path):
    """The measurements log round-trips through its Parquet file (as a resumed calibration
    reads it): the refit equals the fit of the rows measured, to the bit, and rows measured
    under another identity (another model, device, threads) in the same file are not used."""
    measured, loads, shape = synthetic_log(seed=3)
    path = tmp_path / "p.json.measurements.parquet"
    mine, other = {"model": "tiny", "threads": 1}, {"model": "tiny", "threads": 2}
    MeasurementCache(path, other).add(synthetic_log(seed=4, slice_hit=0.5)[0])
    cache = MeasurementCache(path, mine)
    cache.add(loads)
    cache.add(measured)
    again = MeasurementCache(path, mine)
    assert again.reused == len(measured) + len(loads) and again.new == 0
    df = again.df
    a = fit_measurements(measured, loads, shape)
    b = fit_measurements(df[df["kind"] == "step"], df[df["kind"] == "load"], shape)
    assert a.coef == b.coef and a.load_time == b.load_time
    assert a.sum_error_per_cell == b.sum_error_per_cell


def test_calibrate_and_validate_import_only_downward():
    """Calibration and validation drive the engines; nothing they import runs back up to the
    command line (which drives them), and the scheduler and cost models never import them."""
    packages, _ = import_graphs(ROOT)
    for unit in ("twin.calibrate", "twin.validate"):
        assert unit in packages, "scan is broken"
        assert "twin.cli" not in packages[unit]
        for low in ("twin.sched", "twin.costs", "twin.sim", "twin.executor", "twin.results"):
            assert unit not in packages.get(low, set()), (low, unit)


def test_importing_calibrate_and_validate_loads_no_torch():
    code = ("import sys, importlib, pkgutil, twin.calibrate, twin.validate\n"
            "for m in pkgutil.iter_modules(twin.calibrate.__path__):\n"
            "    importlib.import_module('twin.calibrate.' + m.name)\n"
            "print(sorted(m for m in ('torch', 'scipy.optimize', 'tqdm', 'matplotlib')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"

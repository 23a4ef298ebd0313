"""Issue 15: the validation's breadth (workload classes, p99 / overload / spread figures),
the step-residual grouping, calibration cells that excite base/adapter mixes and mid-run
adapter swaps, and a profile's record of the machine it was measured on."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import twin
from twin.calibrate.executor_design import Cell, design
from twin.costs.machine import machine_mismatch, this_machine, warn_if_other_machine
from twin.costs.profile import load_profile
from twin.costs.step_time import FEATURES

ROOT = Path(__file__).resolve().parents[1]


def _experiment(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _other_machine(profile, **prov):
    return dataclasses.replace(profile, provenance=dict(profile.provenance, **prov))


# -- provenance: where a profile was measured --------------------------------------------------
def test_mismatch_names_each_difference_of_an_executor_profile():
    prof = _other_machine(load_profile("cpu-tiny"), cpu_model="Some CPU", cpu_count=2,
                          torch="2.0.0", threads=1)
    here = {"cpu_model": "Other CPU", "cpu_count": 16, "torch": "2.13.0", "gpu": None}
    diff = machine_mismatch(prof, here)
    assert len(diff) == 3 and "Some CPU" in diff[0] and "16" in diff[1] and "2.0.0" in diff[2]
    # the same machine: nothing; a profile of real vLLM runs describes the GPU it predicts
    same = {"cpu_model": "Some CPU", "cpu_count": 2, "torch": "2.0.0", "gpu": None}
    assert machine_mismatch(prof, same) == []
    assert machine_mismatch(load_profile(None), here) == []
    # more torch threads than this machine has cores
    assert any("threads" in d for d in machine_mismatch(
        _other_machine(prof, threads=8), dict(same, cpu_count=4)))


def test_simulate_warns_once_when_the_profile_describes_another_machine(capsys):
    trace = twin.powerlaw_trace(2, 2.0, duration_s=2, seed=1)
    cfg = {"max_loras": 2, "max_lora_rank": 16}
    here = this_machine()
    other = _other_machine(load_profile("cpu-tiny"), name="cpu-tiny-elsewhere",
                           cpu_model=f"not {here['cpu_model']}")
    twin.simulate(trace, cfg, other)
    twin.simulate(trace, cfg, other)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another machine" in err[0] and "twin calibrate --executor" in err[0]
    mine = _other_machine(load_profile("cpu-tiny"), name="cpu-tiny-here", **{
        k: here[k] for k in ("cpu_model", "cpu_count", "torch")})
    twin.simulate(trace, cfg, mine)
    assert capsys.readouterr().err == ""


def test_warning_is_one_line_on_the_given_stream():
    buf = io.StringIO()
    prof = _other_machine(load_profile("cpu-tiny"), name="p-stream", cpu_count=64)
    assert warn_if_other_machine(prof, file=buf, here={"cpu_count": 2})
    assert buf.getvalue().count("\n") == 1 and "64 cores, here 2" in buf.getvalue()


def test_calibration_records_the_machine(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from twin.calibrate.executor import calibrate_executor

    prof, _ = calibrate_executor("tiny", out=tmp_path / "p.json", max_cells=1, repeats=1,
                                 budget_s=0.0, progress=False, log=lambda *a, **k: None)
    saved = load_profile(tmp_path / "p.json").provenance
    here = this_machine()
    for k in ("cpu_model", "cpu_count", "torch", "threads", "dtype"):
        assert saved.get(k) is not None, k
    assert saved["cpu_model"] == here["cpu_model"] and saved["cpu_count"] == here["cpu_count"]
    assert machine_mismatch(load_profile(tmp_path / "p.json")) == []


# -- calibration cells ---------------------------------------------------------------------------
def test_cells_mix_base_and_adapter_rows_and_swap_adapters_mid_run():
    c = Cell(8, 32, 4, 4, 4, 16, 256, base_every=2)
    t = c.trace()
    assert t["adapter"].isna().sum() == 4                 # every 2nd request: base model
    assert t["adapter"].dropna().nunique() == 4           # the others over all 4 adapters
    # the key of an ordinary cell is unchanged: its earlier measurements are reused
    assert Cell(8, 32, 4, 4, 4, 16, 256).key == "n8-p32-o4-a4-m4-r16-b256"
    cells = design()
    assert any(c.base_every for c in cells)
    assert any(c.adapters > c.max_loras for c in cells)   # loads beside running decodes


# -- the validation experiment -------------------------------------------------------------------
def _gap_cv(trace):
    g = np.diff(np.sort(trace["arrival_s"].to_numpy()))
    return float(g.std() / g.mean())


def test_validation_workloads_span_issue_15s_classes():
    ve = _experiment("validate_executor")
    wl = [w for w in ve.workloads() if w[3].policy == "vllm"]
    assert len(wl) >= 12
    base_share = [t["adapter"].isna().mean() for _, _, t, _, _ in wl]
    assert any(0.2 <= s <= 0.8 for s in base_share)                       # base/adapter mix
    assert max(_gap_cv(t) for _, _, t, _, _ in wl) >= 4                   # bursty
    assert any(t["adapter"].nunique() >= 8 * c.max_loras                  # adapter switches
               for _, _, t, c, _ in wl)
    ranks = {n: ve.WORKLOAD_RANKS.get(n, ve.ADAPTER_RANKS["vllm"]) for n, *_ in wl}
    assert any(min(r) == 8 and max(r) == 64 for r in ranks.values())      # ranks 8-64
    assert all(max(r) <= c.max_lora_rank for (n, _, _, c, _), r in zip(wl, ranks.values()))
    names = [n for n, *_ in wl]
    assert any(n in ve.OVERLOADED and n not in ("kv-starved-skewed-16a-ml4",) for n in names)


def test_fidelity_figures():
    ve = _experiment("validate_executor")
    d = pd.DataFrame({
        "workload": ["a", "b", "c"], "thru": [0.5, 4.0, 1.0],
        "TTFT": [10.0, 3.0, 30.0], "ITL": [1.0, 6.0, 4.0],
        "TTFT99": [5.0, 20.0, 11.0], "ITL99": [1.0, 2.0, 9.0],
        "TTFT_spread": [2.0, 1.0, 20.0], "ITL_spread": [1.0, np.nan, 1.0],
        "overloaded": [False, True, False]})
    f = ve.fidelity_figures(d)
    # a: 10 / max(2, 5) = 2.0; b: 6 / 5 = 1.2; c: 30 / 20 = 1.5
    assert f["worst_error_over_spread"] == 2.0 and f["worst_error_over_spread_workload"] == "a"
    assert f["ttft_p99_smape_median"] == 11.0 and f["itl_p99_smape_median"] == 2.0
    assert f["overload_throughput_smape_max"] == 4.0
    assert ve.fidelity_figures(d.assign(overloaded=False))["overload_throughput_smape_max"] is None


# -- step residuals --------------------------------------------------------------------------------
def _step(**kw):
    f = dict.fromkeys(FEATURES, 0.0)
    f["const"] = 1.0
    f.update(kw)
    return [f[k] for k in FEATURES]


def test_step_residual_groups():
    sr = _experiment("step_residuals")
    prof = load_profile("cpu-tiny")
    reqs = pd.DataFrame({"request_id": [1, 2, 3, 4, 5, 6],
                         "adapter": pd.array([None, "a", "b", "c", "d", None], dtype="string")})
    steps = pd.DataFrame({
        "features": [
            _step(decode_tokens=2, decode_context=400, lora_token_rank=16, adapters=1,
                  lora_slots=4, lora_active=1),                            # mixed base + lora
            _step(prefill_tokens=32, prefill_context=1024, prefill_seqs=1, decode_tokens=1,
                  decode_context=300, lora_token_rank=32 * 16, adapters=1, lora_slots=4,
                  lora_active=1),                                          # loads; beside long
            _step(decode_tokens=4, decode_context=40, lora_token_rank=64, adapters=4,
                  lora_slots=4, lora_active=1),                            # after load; many
            _step(decode_tokens=1, decode_context=10),                     # base decode
            _step(prefill_tokens=32, prefill_context=32 * 416, prefill_seqs=1,
                  decode_tokens=1, decode_context=20),      # a 32-token suffix over 384 cached
            _step(prefill_tokens=32, prefill_context=32 * 416, prefill_seqs=1)],  # alone
        "batch_request_ids": [[1, 2], [3, 6], [2, 3, 4, 5], [6], [1, 6], [1]],
        "batch_tokens": [[1, 1], [32, 1], [1, 1, 1, 1], [1], [32, 1], [32]],
        "num_tokens": [2, 33, 4, 1, 33, 32], "loads": [0, 1, 0, 0, 0, 0],
        "duration_s": [0.004, 0.010, 0.003, 0.001, 0.005, 0.004],
        "load_s": [0.0, 0.002, 0.0, 0.0, 0.0, 0.0]})
    t = sr.step_table(steps, reqs, prof)
    groups = {g: t.index[t[g]].tolist() for g, _ in sr.GROUPS}
    assert groups["mixed base + adapter rows"] == [0, 1]
    assert groups["adapter load in step"] == [1]
    assert groups["first step after a load"] == [2]
    assert groups["many adapters, few tokens each"] == [2]
    assert groups["prefill beside long decodes"] == [1]
    assert groups["decode only, base"] == [3]
    # attending earlier (cached) context: 32 x (384 + 32), not step 1's fresh 32 x 32
    assert groups["prefill over context beside decodes"] == [4]
    assert groups["prefill over context, no decodes"] == [5]
    # residual: measured (minus the load's time) less the profile's price of the features
    assert t.loc[1, "measured_s"] == pytest.approx(0.008)
    assert t.loc[1, "residual_s"] == pytest.approx(0.008 - prof.step_time(steps["features"][1]))
    g = sr.group_residuals(t).set_index("group")
    assert g.loc["mixed base + adapter rows", "steps"] == 2
    assert g.loc["prefill only", "steps"] == 1                 # step 5


def test_local_residual_cancels_the_machines_drift():
    """A run whose second half ran 2x slower (the box's slow state): against the profile
    every step of that half is +100%, against its neighbours only the one step that was
    slower than the steps around it stands out."""
    sr = _experiment("step_residuals")
    t = np.arange(40) * 0.1                       # 4 s of steps, 0.1 s apart
    pred = np.full(40, 1e-3)
    meas = np.where(t >= 2.0, 2e-3, 1e-3)
    meas[10] *= 1.5                               # a composition 50% dearer than its neighbours
    r = sr.local_ratio(pd.DataFrame({"start_s": t}), meas, pred)
    assert r[10] == pytest.approx(1.5)
    assert np.allclose(np.delete(r, [10]), 1.0)
    assert np.isnan(sr.local_ratio(pd.DataFrame({"x": t}), meas, pred)).all()


# -- validate: further executor runs with the first run's adapters ---------------------------------
def test_serve_again_reuses_the_adapters_and_blocks(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from twin.executor.model import LlamaModel
    from twin.executor.weights import resolve_model
    from twin.validate import validate

    trace = twin.powerlaw_trace(3, 6.0, duration_s=1.0, seed=3)
    trace = trace.assign(prompt_tokens=np.minimum(trace["prompt_tokens"], 24),
                         output_tokens=np.minimum(trace["output_tokens"], 6))
    cfg = twin.ServingConfig(max_loras=2, max_cpu_loras=3, max_lora_rank=16)
    m = LlamaModel.from_pretrained(resolve_model("tiny"))
    v = validate(trace, cfg, "cpu-tiny", m, adapters=_adapters(trace),
                 plot=False, warmup=False)
    r = v.serve_again(m)   # the experiment's later rounds: same catalog, config, KV blocks
    assert len(v.executor_summaries) == 2
    assert r.summary["completed"] == v.executor.summary["completed"] == len(trace)
    assert r.summary["adapter_loads"]["from_disk"] > 0


def _adapters(trace):
    from twin.executor.adapters import make_cached_adapters
    from twin.executor.weights import resolve_model

    names = trace["adapter"].dropna().unique().tolist()
    return make_cached_adapters(resolve_model("tiny"), len(names), (8, 16), names=names,
                                prefix="test-fidelity")


def test_refit_cells_leaves_out_the_named_cells_and_keeps_the_rest(tiny_profile, tmp_path):
    """experiments/refit_cells.py: the profile refitted without a cell is the fit of the
    other cells' steps alone (an A/B of two designs on one calibration's minutes)."""
    from twin.calibrate.executor_fit import fit_measurements

    rc = _experiment("refit_cells")
    df = pd.read_parquet(str(tiny_profile) + ".measurements.parquet")
    keys = sorted(df.loc[df["kind"] == "step", "key"].unique())
    prof, fit, gone = rc.refit_without(tiny_profile, [keys[0]])
    assert gone == [keys[0]]
    kept = df[(df["kind"] == "step") & (df["key"] != keys[0])]
    assert fit.residuals["n"] == len(fit_measurements(kept, df[df["kind"] == "load"],
                                                      prof.model).steps)
    assert fit.residuals["n"] < len(fit_measurements(df[df["kind"] == "step"],
                                                     df[df["kind"] == "load"],
                                                     prof.model).steps)
    assert prof.provenance["refit_without"] == [keys[0]]
    assert rc.main([str(tiny_profile), "--drop", "no-such-cell", "--out",
                    str(tmp_path / "x.json")]) == 2
    assert rc.main([str(tiny_profile), "--drop", keys[0], "--out",
                    str(tmp_path / "p.json")]) == 0
    nonzero = lambda b: {k: v for k, v in b.items() if v}   # noqa: E731 (zeros not saved)
    assert nonzero(load_profile(tmp_path / "p.json").step_time.base) == \
        nonzero(prof.step_time.base)
    # without a feature: its coefficient 0, the others refitted to do without it
    full = rc.refit_without(tiny_profile, [keys[0]])[0].step_time.base
    # a feature it uses: which ones this machine's fresh calibration fitted non-zero varies
    # (a fit can keep only the constant), so the constant is the last resort
    used = next(k for k in sorted(full, key=lambda k: k == "const") if full[k] > 0)
    cut = rc.refit_without(tiny_profile, [keys[0]], [used])[0]
    assert cut.step_time.base.get(used, 0.0) == 0.0
    assert cut.provenance["refit_without_features"] == [used]
    assert rc.main([str(tiny_profile), "--drop", keys[0], "--zero-features", "no_such",
                    "--out", str(tmp_path / "y.json")]) == 2


def test_prefix_caching_baseline_prices_the_same_runs_with_another_profile():
    """prefix_caching.py --baseline-profile: the second profile's raw SMAPEs against the
    same executor runs, the validation left priced with its own profile afterwards."""
    pc = _experiment("prefix_caching")
    keys = ["throughput", "ttft_mean", "itl_mean"]

    class Run:   # the part of twin.validate.Validation it uses
        profile = "own"
        twin = twin_raw = None   # the twin runs (kept, put back as they were)

        def resimulate(self, p):
            self.profile = p
            self.table = pd.DataFrame({"key": keys, "smape_raw": [0.01, 0.2, 0.3]
                                       if p == "other" else [0.0, 0.1, 0.1]})

    v = Run()
    v.resimulate("own")
    assert pc.baseline_smapes(v, None, "") == {}
    got = pc.baseline_smapes(v, "other", "_off")
    assert got == {"throughput_smape_off_baseline": 0.01, "ttft_mean_smape_off_baseline": 0.2,
                   "itl_mean_smape_off_baseline": 0.3}
    assert v.profile == "own" and v.table["smape_raw"].tolist() == [0.0, 0.1, 0.1]

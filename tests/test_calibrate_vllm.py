"""Calibration from real vLLM runs: memory and load fits, workload reconstruction, the
``twin calibrate`` CLI and its input errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from twin.config import ServingConfig
from twin.errors import TwinInputError
from twin.calibrate.frontend_fit import SERIES_GRID_S
from twin.calibrate.vllm import (fit_load_time, fit_memory, read_kv_capacity,
                                 read_load_times)
from twin.costs.profile import load_profile
from twin.calibrate.vllm_runs import read_bench_results, read_run_table, reconstruct


@pytest.fixture(scope="module")
def data():
    from twin.workload.public import shared_data_dir

    try:
        d = shared_data_dir() / "vllm-h100"
    except TwinInputError:
        pytest.skip("shared data not available")
    if not (d / "real_runs_llama31_8b.csv").exists():
        pytest.skip("vllm-h100 data not available")
    return d


@pytest.fixture(scope="module")
def base():
    return load_profile("llama31-8b-h100-64gb-first-principles")


@pytest.fixture(scope="module")
def runs(data):
    return read_run_table(data / "real_runs_llama31_8b.csv")


def test_memory_fit_within_one_percent(data, base):
    kv = read_kv_capacity(data / "kv_cache_tokens_llama31_8b.csv")
    mem, rep = fit_memory(kv, base.memory)
    assert rep["rows"] == 42
    assert rep["kv_tokens_rel_error_max"] <= 0.01
    for _, row in kv[kv["kv_cache_tokens"].notna()].iterrows():
        cfg = ServingConfig(max_loras=int(row.max_loras), max_lora_rank=int(row.max_lora_rank),
                            max_num_seqs=2048, max_num_batched_tokens=2048)
        assert abs(mem.kv_tokens(cfg) - row.kv_cache_tokens) <= 0.01 * row.kv_cache_tokens
    # physically sane: bf16 weights of an 8B model, LoRA bytes per slot-rank near the
    # first-principles A+B size, start-up failures predicted where vLLM failed
    assert 14.5 < mem.weights_gib < 15.5
    assert 0.9 < mem.lora_bytes_per_slot_rank / base.memory.lora_bytes_per_slot_rank < 1.1
    assert all(v == 0 for v in rep["rows_without_kv_predicted_tokens"].values())


@pytest.mark.parametrize("probes,why", [
    ([(16, 16)] * 3, "distinct"),                      # one probe three times
    ([(16, 8), (16, 16), (16, 32)], "distinct"),       # one max_loras: slots not separable
])
def test_memory_fit_refuses_probes_that_cannot_identify_it(base, probes, why):
    """Three copies of a probe fitted -1.28 GiB of weights and wrote the profile (which
    simulate then refused); probes at one max_loras predicted 0 KV tokens elsewhere."""
    cfgs = [ServingConfig(max_loras=m, max_lora_rank=r, max_num_seqs=2048,
                          max_num_batched_tokens=2048) for m, r in probes]
    kv = pd.DataFrame({"max_loras": [m for m, _ in probes],
                       "max_lora_rank": [r for _, r in probes],
                       "kv_cache_tokens": [base.memory.kv_tokens(c) for c in cfgs]})
    with pytest.raises(TwinInputError, match=why):
        fit_memory(kv, base.memory)


def test_memory_fit_refuses_negative_memory_and_recovers_a_consistent_one(base):
    grid = [(8, 8), (8, 32), (64, 8), (64, 32)]
    cfgs = [ServingConfig(max_loras=m, max_lora_rank=r, max_num_seqs=2048,
                          max_num_batched_tokens=2048) for m, r in grid]
    tokens = [base.memory.kv_tokens(c) for c in cfgs]
    kv = pd.DataFrame({"max_loras": [m for m, _ in grid],
                       "max_lora_rank": [r for _, r in grid], "kv_cache_tokens": tokens})
    mem, rep = fit_memory(kv, base.memory)   # the first-principles model's own capacities
    assert rep["kv_tokens_rel_error_max"] < 0.01 and mem.lora_bytes_per_slot_rank > 0
    more_slots_more_room = kv.assign(kv_cache_tokens=tokens[::-1])   # capacity rising
    with pytest.raises(TwinInputError, match="negative memory"):
        fit_memory(more_slots_more_room, base.memory)
    # a model whose per-slot term is exactly 0 fits ~-1e-19 of it: noise, not a refusal
    tiny = load_profile("cpu-tiny").memory
    assert tiny.lora_bytes_per_slot == 0
    own = kv.assign(kv_cache_tokens=[tiny.kv_tokens(c) for c in cfgs])
    mem, _ = fit_memory(own, tiny)
    assert mem.lora_bytes_per_slot == 0 and mem.lora_bytes_per_slot_rank > 0


def test_a_step_fit_says_when_its_runs_cannot_determine_it():
    """One run three times over, seven free terms, no iteration better than the start and
    a 72% miss: each is said (the profile was written as fitted without a word)."""
    from twin.calibrate.fit_checks import fit_warnings
    from twin.calibrate.run_spec import RunSpec

    def run(key, max_loras=16, rate=0.1):
        return RunSpec(key, ServingConfig(max_loras=max_loras, max_cpu_loras=128),
                       {16: 64}, {rate: 64}, (223.0, 196.0))

    hist = [{"itl_smape_median": 72.0, "throughput_smape_median": 25.0},
            {"itl_smape_median": 80.0, "throughput_smape_median": 30.0}]
    w = " | ".join(fit_warnings([run("a"), run("b"), run("c")], 7, hist))
    assert "2 of the 3 runs repeat" in w and "1 distinct run(s) for 7 free" in w
    assert "no iteration improved" in w and "misses its own runs by 72% mean ITL" in w
    good = [run(f"r{i}", m, q) for i, (m, q) in enumerate(
        (m, q) for m in (16, 64, 128) for q in (0.05, 0.1, 0.2))]
    fine = [{"itl_smape_median": 30.0, "throughput_smape_median": 9.0},
            {"itl_smape_median": 4.0, "throughput_smape_median": 1.3}]
    assert fit_warnings(good, 7, fine) == []


def test_load_time_fit_sane(data, base):
    loads = read_load_times(data / "adapter_load_times_llama31_8b.csv")
    lt, rep = fit_load_time(loads, base.model)
    for rank in (8, 16, 32):
        nbytes = base.model.adapter_bytes(rank)
        assert 6.0e-3 <= lt.host_to_gpu(nbytes) <= 8.0e-3
        assert 60e-3 <= lt.disk(nbytes) <= 130e-3
    # robust: the 520 ms / 884 ms first loads do not drag the fit
    assert lt.disk(base.model.adapter_bytes(8)) < 75e-3
    assert lt.disk(base.model.adapter_bytes(32)) > 115e-3


def test_reconstruction_matches_run(runs):
    spec = next(r for r in runs if r.config.max_cpu_loras == 128
                and abs(r.aggregate_rate - 7.5) < 1e-9 and r.config.max_lora_rank == 16)
    trace, catalog = reconstruct(spec, seed=3)
    # ranks: the run's counts
    assert Counter(catalog.table["rank"]) == Counter(spec.ranks)
    assert len(catalog) == spec.config.max_cpu_loras == 128
    # rates: each adapter's arrival count is near its class rate x window; classes have
    # the run's counts
    window = np.floor(spec.duration_s)
    per = trace.groupby("adapter").size().reindex(catalog.adapters, fill_value=0) / window
    rates = sorted(spec.rates)
    cls = per.apply(lambda x: min(rates, key=lambda r: abs(np.log(max(x, 1e-4) / r))))
    assert Counter(cls) == Counter(spec.rates)
    assert len(trace) == pytest.approx(spec.aggregate_rate * window, rel=0.03)
    # lengths: the run's pool means, within the filter
    assert trace["prompt_tokens"].mean() == pytest.approx(spec.pool_means[0], rel=0.03)
    assert trace["output_tokens"].mean() == pytest.approx(spec.pool_means[1], rel=0.03)
    assert trace["prompt_tokens"].max() <= 1024
    assert (trace["prompt_tokens"] + trace["output_tokens"]).max() <= 2048
    # deterministic by seed
    again, _ = reconstruct(spec, seed=3)
    pd.testing.assert_frame_equal(trace, again)
    other, _ = reconstruct(spec, seed=4)
    assert len(other) != len(trace) or not other["arrival_s"].equals(trace["arrival_s"])


def test_run_table_config(runs):
    r = runs[0]
    assert r.config.max_num_seqs == 2048 and r.config.max_num_batched_tokens == 2048
    assert r.config.preload_adapters and r.config.max_model_len == 131072
    assert not any("anomaly" in x.extra for x in runs)


def test_calibrate_cli_writes_loadable_profile(data, tmp_path):
    from twin.cli import main

    out = tmp_path / "p.json"
    rc = main(["calibrate", "--from-vllm-runs", str(data / "real_runs_llama31_8b.csv"),
               "--experiment-set", "digital_twin_modelling", "--max-runs", "3",
               "--kv-capacity", str(data / "kv_cache_tokens_llama31_8b.csv"),
               "--load-times", str(data / "adapter_load_times_llama31_8b.csv"),
               "--window-s", "30", "--iterations", "1", "--processes", "1", "--quiet",
               "--out", str(out)])
    assert rc == 0
    prof = load_profile(out)
    prov = prof.provenance
    assert prov["fitted"] and prov["sources"]["run_count"] == 3
    assert prov["memory"]["kv_tokens_rel_error_max"] <= 0.01
    assert "history" in prov["step_time"] and prov["step_time"]["runs"] >= 1
    assert prov["step_time"]["residual_weights"] == {"itl": 1.0, "throughput": 1.0, "ttft": 0.25}
    assert prov["step_time"]["decode_target"] == "mean ITL"
    assert "log-errors of mean ITL" in prov["step_time"]["method"]
    assert prof.step_time.base["const"] > 0


def test_bench_json_with_sidecar(tmp_path):
    res = {"date": "20250101-000000", "backend": "vllm", "request_rate": 4.0,
           "completed": 1000, "total_input_tokens": 223000, "total_output_tokens": 196000,
           "duration": 300.0, "mean_ttft_ms": 40.0, "mean_tpot_ms": 20.0, "mean_itl_ms": 20.5,
           "total_token_throughput": 1396.0, "max_lora_rank": "16"}
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(res))
    side = {"max_loras": 4, "max_cpu_loras": 8, "adapter_ranks": {8: 4, 16: 4},
            "runs": {"bench.json": {"adapter_rates_rps": [1.0] * 2 + [0.333333] * 6}}}
    (spec,) = read_bench_results([p], side)
    assert spec.config.max_loras == 4 and spec.config.max_cpu_loras == 8
    assert spec.config.max_lora_rank == 16
    assert spec.ranks == {8: 4, 16: 4}
    assert spec.aggregate_rate == pytest.approx(4.0, rel=1e-3)
    assert spec.pool_means == (223.0, 196.0)
    # lengths come from the shared ShareGPT pool, outside the repository: skip only when
    # that file is absent, so that any other input error from reconstruct fails the test
    from twin.workload.public import SHAREGPT_FILE, shared_trace_path
    try:
        shared_trace_path(SHAREGPT_FILE)
    except TwinInputError:
        pytest.skip("shared data (ShareGPT length pool) not available")
    trace, cat = reconstruct(spec, seed=0)
    assert len(cat) == 8 and trace["arrival_s"].max() < 300
    # a calibration's window is at most the run's own 300 s (it simulated 1200 s of it)
    from twin.calibrate.run_sim import simulate_run
    sim = simulate_run(spec, load_profile("llama31-8b-h100-64gb-first-principles"),
                       window_s=1200.0)
    assert sim["window_s"] == 300.0


# -- bad input ------------------------------------------------------------------------------

def test_missing_column_names_file_and_field(tmp_path, data):
    df = pd.read_csv(data / "real_runs_llama31_8b.csv", nrows=5).drop(columns=["rate_counts"])
    p = tmp_path / "runs.csv"
    df.to_csv(p, index=False)
    with pytest.raises(TwinInputError) as e:
        read_run_table(p)
    assert e.value.file == str(p) and e.value.field == "rate_counts"


def test_wrong_file_is_refused(data):
    with pytest.raises(TwinInputError) as e:
        read_run_table(data / "kv_cache_tokens_llama31_8b.csv")
    assert "missing column" in str(e.value) and "kv_cache_tokens" in e.value.file
    with pytest.raises(TwinInputError) as e:
        read_kv_capacity(data / "adapter_load_times_llama31_8b.csv")
    assert e.value.field in ("max_loras", "kv_cache_tokens")


def test_bad_value_names_row(tmp_path, data):
    df = pd.read_csv(data / "real_runs_llama31_8b.csv", nrows=6)
    ok_rows = np.flatnonzero((df["status"] == "ok").to_numpy())
    df.loc[ok_rows[1], "rate_counts"] = "5 x 6"
    p = tmp_path / "runs.csv"
    df.to_csv(p, index=False)
    with pytest.raises(TwinInputError) as e:
        read_run_table(p)
    assert e.value.row == ok_rows[1] and e.value.field == "rate_counts"
    df = pd.read_csv(data / "real_runs_llama31_8b.csv", nrows=6)
    df.loc[ok_rows[0], "max_loras"] = -3
    df.to_csv(p, index=False)
    with pytest.raises(TwinInputError) as e:
        read_run_table(p)
    assert e.value.row == ok_rows[0] and e.value.field == "max_loras"


def test_bad_load_event_names_row(tmp_path, data):
    df = pd.read_csv(data / "adapter_load_times_llama31_8b.csv")
    df.loc[7, "event"] = "teleport"
    p = tmp_path / "loads.csv"
    df.to_csv(p, index=False)
    with pytest.raises(TwinInputError) as e:
        read_load_times(p)
    assert e.value.row == 7 and e.value.field == "event"


def test_bench_json_errors(tmp_path):
    p = tmp_path / "not_bench.json"
    p.write_text(json.dumps({"hello": 1}))
    with pytest.raises(TwinInputError) as e:
        read_bench_results([p])
    assert e.value.file == str(p) and "missing key" in str(e.value)
    p.write_text("{not json")
    with pytest.raises(TwinInputError) as e:
        read_bench_results([p])
    assert "not valid JSON" in str(e.value)
    p.write_text(json.dumps({"completed": 10, "total_input_tokens": 100,
                             "total_output_tokens": 100, "duration": 10.0,
                             "mean_ttft_ms": 1.0, "mean_itl_ms": 1.0, "mean_tpot_ms": 1.0}))
    with pytest.raises(TwinInputError) as e:
        read_bench_results([p])
    assert e.value.field == "max_loras" and "--metadata" in str(e.value)
    # vllm bench serve's default rate, inf: the hint names what to give instead
    p.write_text(json.dumps({"completed": 10, "total_input_tokens": 100, "request_rate": "inf",
                             "total_output_tokens": 100, "duration": 10.0, "max_loras": 2,
                             "max_cpu_loras": 2, "max_lora_rank": 16, "mean_ttft_ms": 1.0,
                             "mean_itl_ms": 1.0, "mean_tpot_ms": 1.0}))
    with pytest.raises(TwinInputError, match="adapter_rates_rps") as e:
        read_bench_results([p])
    assert e.value.field == "request_rate" and "default" in str(e.value)


def test_client_cap_is_the_ceiling_the_overloaded_runs_reached():
    """The cap is the most the client held (largest waiting queue + running batch), over
    runs overloaded enough to reach it; light runs and runs without a scrape say nothing."""
    from types import SimpleNamespace as NS

    from twin.calibrate.vllm_fits import fit_client_cap

    def run(w_mean, w_max, running):
        return NS(metrics={"num_waiting_mean": w_mean, "num_waiting_max": w_max,
                           "num_running_mean": running})

    heavy = [run(20000, 25000, 500), run(21000, 26000, 400), run(15000, 27000, 300)]
    light = [run(10, 50, 100), run(9000, 30000, 100), NS(metrics={"mean_ttft_ms": 1.0})]
    cap = fit_client_cap(heavy + light)
    assert cap["max_in_flight"] == 26400 and cap["runs"] == 3    # median of 25500, 26400, 27300
    assert cap["mean_in_flight"] == 20500                        # the time averages, recorded
    assert fit_client_cap(heavy[:2] + light) is None             # fewer than 3: unbounded


def test_balanced_fit_weighs_each_cell_alike():
    """``balance``: every measured regime (or (max_loras, regime) cell) of fit runs carries
    the same total weight, whatever its size, and the weights average 1; the weighted median
    the fit scores with is the plain median under equal weights; another balance, or residual
    weights that are not three non-negative numbers, are refused before any work."""
    from types import SimpleNamespace as NS

    from twin.calibrate.run_weights import cell_weights, weighted_median
    from twin.calibrate.step_fit import fit_step_time
    from twin.errors import ConfigError

    def run(max_loras, waiting):
        return NS(config=NS(max_loras=max_loras), metrics={"num_waiting_mean": waiting})

    runs = ([run(16, 20000)] * 6 + [run(16, 0.0)] * 2 + [run(64, 0.5)] + [run(64, 50.0)] * 3)
    w = cell_weights(runs, by_slots=True)
    assert w.mean() == pytest.approx(1.0)
    totals = Counter()
    for r, wi in zip(runs, w):
        totals[(r.config.max_loras, r.metrics["num_waiting_mean"])] += wi
    assert set(totals) == {(16, 20000), (16, 0.0), (64, 0.5), (64, 50.0)}
    assert np.allclose(list(totals.values()), len(runs) / 4)
    assert w[8] == pytest.approx(6 * w[0])          # the lone light 64-slot run vs one of six
    by_regime = cell_weights(runs)                    # light 3, queue 3, overloaded 6
    assert by_regime[6] == pytest.approx(by_regime[8]) == pytest.approx(2 * by_regime[0])
    assert by_regime.mean() == pytest.approx(1.0)
    x = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    assert weighted_median(x, np.ones(5)) == 3.0
    assert weighted_median(x, np.array([1.0, 10.0, 1.0, 1.0, 1.0])) == 1.0
    with pytest.raises(ConfigError, match="balance"):
        fit_step_time(runs, None, balance="cells")
    for bad in ((1.0, 1.0), (1.0, -1.0, 0.25), (0, 0, 0)):
        with pytest.raises(ConfigError, match="weights"):
            fit_step_time(runs, None, weights=bad)


def _recorded_sims(n: int, ranges: dict, seed: int) -> list:
    """``n`` simulated runs as the fit records them: one step each, ``const`` 1 and each
    feature of ``ranges`` drawn uniformly in its (low, high)."""
    from twin.costs.step_time import FEATURES

    rng = np.random.default_rng(seed)
    sims = []
    for _ in range(n):
        rec = np.zeros(len(FEATURES))
        rec[FEATURES.index("const")] = 1.0
        for k, (lo, hi) in ranges.items():
            rec[FEATURES.index(k)] = rng.uniform(lo, hi)
        sims.append({"rec_dec": rec, "rec_ndec": 1.0, "rec_all": rec, "rec_steps": 1,
                     "rec_pre": rec, "rec_npre": 1.0})
    return sims


def test_tied_terms_share_one_coefficient():
    """A term ``a+b`` fits one coefficient for two features: it starts at their mean, its
    column is their summed features, and the surrogate step moves both to the same value
    (here up: the twin's ITL is 20% short of the real one)."""
    from twin.calibrate.step_fit import _columns, _Measured, _Round, _surrogate_step, start_coef
    from twin.costs.step_time import FEATURES

    terms = ("const", "decode_tokens+prefill_tokens")
    coef = start_coef(None, [], terms, init={"const": 0.01, "decode_tokens": 1e-6,
                                               "prefill_tokens": 3e-6})
    assert coef["decode_tokens"] == coef["prefill_tokens"] == pytest.approx(2e-6)
    assert "decode_tokens+prefill_tokens" not in coef
    sims = _recorded_sims(6, {"decode_tokens": (10, 500), "prefill_tokens": (0, 1500)}, seed=0)
    assert _columns(sims[0]["rec_dec"], terms)[1] == pytest.approx(
        sims[0]["rec_dec"][FEATURES.index("decode_tokens")]
        + sims[0]["rec_dec"][FEATURES.index("prefill_tokens")])
    twin_itl = np.array([_columns(s["rec_dec"], terms) @ [coef["const"], coef["decode_tokens"]]
                         for s in sims]) * 1e3
    none = np.zeros(6, bool)
    rnd = _Round(sims=sims, itl=twin_itl, thr=np.ones(6), ttft=np.ones(6), sat=none, light=none)
    real = _Measured(itl=1.2 * twin_itl, thr=np.ones(6), ttft=np.ones(6))
    new, change = _surrogate_step(coef, terms, rnd, real, (1.0, 1.0, 0.25), np.ones(6))
    assert new["decode_tokens"] == new["prefill_tokens"]
    assert change > 0.05
    assert _columns(sims[0]["rec_dec"], terms) @ [new["const"], new["decode_tokens"]] > \
        1.1 * (_columns(sims[0]["rec_dec"], terms) @ [coef["const"], coef["decode_tokens"]])


def test_itl_gain_is_the_measured_response_over_the_frozen_batch_one():
    """``itl_gains``: a run whose mean ITL moved 3x as much (in log) as its round-0 batch
    predicts for the new coefficients gets gain 3; one that moved as predicted gets 1; one
    whose predicted change is under 1% keeps its last gain; gains are clipped to [1, 8]."""
    from twin.calibrate.step_fit import _Round, itl_gains
    from twin.costs.step_time import FEATURES

    terms = ("const", "adapters")
    rec = np.zeros(len(FEATURES))
    rec[FEATURES.index("const")] = 1.0
    rec[FEATURES.index("adapters")] = 10.0

    def rnd(itl):
        sims = [{"rec_dec": rec, "rec_ndec": 1.0}] * len(itl)
        return _Round(sims=sims, itl=np.array(itl), thr=None, ttft=None, sat=None, light=None)

    c0 = {"const": 0.010, "adapters": 0.001}            # 20 ms a step
    c1 = {"const": 0.010, "adapters": 0.0012}           # 22 ms at the same batch: +9.5% in log
    static = np.log(22.0 / 20.0)
    itl1 = [20.0 * np.exp(k * static) for k in (3.0, 1.0, 20.0, 0.5)]
    g = itl_gains(rnd([20.0] * 4), c0, rnd(itl1), c1, terms, last=np.full(4, 2.0))
    assert g == pytest.approx([3.0, 1.0, 8.0, 1.0])
    same = itl_gains(rnd([20.0] * 4), c0, rnd([20.0] * 4), c0, terms, last=np.full(4, 2.0))
    assert same == pytest.approx([2.0] * 4)             # no predicted change: last gain kept


def test_a_held_coefficient_is_refused_among_the_fitted_and_stays_put():
    """``hold``: a coefficient fixed at a given value (not fitted) must not also be a fitted
    term and must be >= 0 (refused before any work); the surrogate step moves the fitted
    terms only, so a held one keeps its value through the fit."""
    from twin.calibrate.step_fit import _Measured, _Round, _surrogate_step, fit_step_time
    from twin.errors import ConfigError

    for bad in ({"decode_context": 1e-8}, {"adapters": -1.0}):
        with pytest.raises(ConfigError, match="held"):
            fit_step_time([], None, terms=("const", "decode_context"), hold=bad)
    coef = {"const": 0.01, "decode_tokens": 1e-6, "decode_context": 6.5e-8}
    sims = _recorded_sims(5, {"decode_tokens": (10, 500), "decode_context": (1e3, 1e5)}, seed=1)
    none = np.zeros(5, bool)
    itl = np.full(5, 20.0)
    rnd = _Round(sims=sims, itl=itl, thr=np.ones(5), ttft=np.ones(5), sat=none, light=none)
    new, change = _surrogate_step(coef, ("const", "decode_tokens"), rnd,
                                  _Measured(itl=1.3 * itl, thr=np.ones(5), ttft=np.ones(5)),
                                  (1.0, 1.0, 0.25), np.ones(5))
    assert change > 0.05 and new["decode_context"] == 6.5e-8


def test_the_decode_target_is_checked_and_picks_the_runs_tpot():
    """``decode_target="tpot"``: the decode residuals aim at each run's mean TPOT, not at
    bench serve's mean ITL (its gaps between streamed chunks); anything else is refused
    before any work."""
    from types import SimpleNamespace

    from twin.calibrate.step_fit import _Measured, fit_step_time
    from twin.errors import ConfigError

    with pytest.raises(ConfigError, match="decode_target"):
        fit_step_time([], None, decode_target="e2e")
    runs = [SimpleNamespace(metrics={"mean_itl_ms": 40.0 + i, "mean_tpot_ms": 36.0 + i,
                                     "total_throughput": 3000.0, "mean_ttft_ms": 90.0})
            for i in range(3)]
    assert list(_Measured.of(runs).itl) == [40.0, 41.0, 42.0]
    assert list(_Measured.of(runs, "tpot").itl) == [36.0, 37.0, 38.0]


def test_calibrate_cli_takes_the_step_terms_target_hold_and_frontend(data, tmp_path, capsys):
    """The flags that reproduce the shipped fit: the terms (one tied), the TPOT target, a
    held coefficient, the metrics scrape at the runs' collector rate and the per-request
    delay (not fitted without a light run among the three: said, not a crash). A term
    twin does not know is refused before any work, naming the known ones."""
    from twin.cli import main

    out = tmp_path / "p.json"
    args = ["calibrate", "--from-vllm-runs", str(data / "real_runs_llama31_8b.csv"),
            "--experiment-set", "digital_twin_modelling", "--max-runs", "3",
            "--window-s", "30", "--iterations", "1", "--processes", "1", "--quiet",
            "--out", str(out), "--decode-target", "tpot",
            "--hold", "decode_context=6.5536e-8", "--metrics-series-s", "2.2e-5",
            "--request-delay"]
    terms = "const,decode_tokens+prefill_tokens,adapters,waiting_skipped"
    assert main(args + ["--terms", terms]) == 0
    prof = load_profile(out)
    st = prof.provenance["step_time"]
    assert st["terms"] == terms.split(",") and st["decode_target"] == "mean TPOT"
    assert st["held"] == {"decode_context": 6.5536e-8}
    assert prof.step_time.base["decode_context"] == 6.5536e-8
    assert prof.step_time.base["decode_tokens"] == prof.step_time.base["prefill_tokens"]
    assert prof.frontend.metrics_series_s == 2.2e-5 and prof.frontend.metrics_scrape_hz > 0
    assert "request" in prof.provenance["frontend"]
    assert main(args + ["--terms", "const,no_such_term"]) != 0
    err = capsys.readouterr().err
    assert "unknown step-time term(s) ['no_such_term']" in err and "waiting_skipped" in err
    # the scrape's cost per series fitted on the runs that keep up, on its grid
    fit = [a if a != "2.2e-5" else "fit" for a in args]
    assert main(fit + ["--terms", "const,decode_tokens"]) == 0
    prof = load_profile(out)
    cost = prof.provenance["frontend"]["series_cost"]
    assert cost["runs"] >= 1 and cost["metrics_series_s"] == prof.frontend.metrics_series_s
    assert prof.frontend.metrics_series_s in set(SERIES_GRID_S.tolist())
    with pytest.raises(SystemExit):
        main([a if a != "2.2e-5" else "nope" for a in args])
    assert "--metrics-series-s" in capsys.readouterr().err

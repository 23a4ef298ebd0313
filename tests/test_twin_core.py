"""The twin end to end: memory model vs vLLM, bad input, results, CLI, window semantics."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from twin.cli import main as twin_main
from twin.config import ServingConfig
from twin.errors import ConfigError, TwinInputError
from twin.costs import load_profile
from twin.sim import simulate
from twin.workload.catalog import AdapterCatalog
from twin.workload.schema import read_trace, validate_trace

from shared_data import KV_CSV


def small_trace(n=300, adapters=4, seed=0, span=30.0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "arrival_s": np.sort(rng.uniform(0, span, n)),
        "adapter": [f"a{i}" for i in rng.integers(0, adapters, n)],
        "prompt_tokens": rng.integers(4, 600, n),
        "output_tokens": rng.integers(1, 200, n)})


@pytest.mark.skipif(KV_CSV is None, reason="shared vLLM data not present")
def test_memory_model_matches_vllm_reported_kv_capacity_within_2pct():
    prof = load_profile()
    kv = pd.read_csv(KV_CSV).dropna(subset=["kv_cache_tokens"])
    errs = []
    for _, r in kv.iterrows():
        cfg = ServingConfig(max_loras=int(r.max_loras), max_cpu_loras=int(r.max_loras),
                            max_lora_rank=int(r.max_lora_rank), max_num_seqs=2048,
                            max_num_batched_tokens=2048, max_model_len=131072)
        errs.append(abs(prof.memory.kv_tokens(cfg) - r.kv_cache_tokens) / r.kv_cache_tokens)
    assert len(errs) >= 36
    assert max(errs) <= 0.02


@pytest.mark.skipif(KV_CSV is None, reason="shared vLLM data not present")
def test_refuses_to_start_exactly_where_vllm_did():
    prof = load_profile()
    kv = pd.read_csv(KV_CSV)
    for _, r in kv.iterrows():
        cfg = ServingConfig(max_loras=int(r.max_loras), max_cpu_loras=int(r.max_loras),
                            max_lora_rank=int(r.max_lora_rank), max_num_seqs=2048,
                            max_num_batched_tokens=2048, max_model_len=131072)
        started = prof.memory.kv_tokens(cfg) >= 131072
        assert started == (r.status == "started"), (r.max_loras, r.max_lora_rank)


def test_kv_cache_too_small_is_refused_with_the_numbers():
    cfg = ServingConfig(max_loras=384, max_cpu_loras=384, max_lora_rank=32)
    with pytest.raises(ConfigError) as e:
        simulate(small_trace(10), cfg)
    msg = str(e.value)
    assert "max_model_len" in msg and "LoRA slots" in msg and "GiB" in msg


@pytest.mark.parametrize("mutate, field, row", [
    (lambda d: d.assign(arrival_s=d["arrival_s"][::-1].to_numpy()), "arrival_s", 1),
    (lambda d: d.assign(prompt_tokens=np.where(np.arange(len(d)) == 3, 0, d["prompt_tokens"])),
     "prompt_tokens", 3),
    (lambda d: d.assign(output_tokens=np.where(np.arange(len(d)) == 5, np.nan, d["output_tokens"])),
     "output_tokens", 5),
    (lambda d: d.drop(columns=["prompt_tokens"]), "prompt_tokens", None),
    (lambda d: d.assign(arrival_s=d["arrival_s"] - 1.0), "arrival_s", 0),
])
def test_bad_trace_names_file_row_and_field(tmp_path, mutate, field, row):
    bad = mutate(small_trace(20))
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(TwinInputError) as e:
        read_trace(path)
    assert e.value.field == field and e.value.row == row and e.value.file == str(path)
    assert str(path) in str(e.value)


def test_unknown_adapter_and_rank_above_max_lora_rank():
    trace = small_trace(20, adapters=3)
    trace.loc[0, "adapter"] = None   # base-model rows mixed in
    cat = AdapterCatalog(pd.DataFrame({"adapter": ["a0", "a1"], "rank": [8, 8]}), source="cat.csv")
    with pytest.raises(TwinInputError) as e:
        simulate(trace, ServingConfig(max_loras=2), catalog=cat)
    assert e.value.field == "adapter" and "a2" in str(e.value)
    cat = AdapterCatalog(pd.DataFrame({"adapter": ["a0", "a1", "a2"], "rank": [8, 64, 8]}),
                         source="cat.csv")
    with pytest.raises(TwinInputError) as e:
        simulate(trace, ServingConfig(max_loras=2, max_lora_rank=16), catalog=cat)
    assert e.value.row == 1 and e.value.field == "rank" and "max_lora_rank" in str(e.value)


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(TwinInputError) as e:
        ServingConfig(max_loras=4, max_cpu_loras=2)
    assert e.value.field == "max_cpu_loras"
    y = tmp_path / "c.yaml"
    y.write_text("max-loras: 4\nmax_lora_rank: 17\n")
    with pytest.raises(TwinInputError) as e:
        ServingConfig.from_yaml(y)
    assert e.value.field == "max_lora_rank"
    y.write_text("max_loras: four\n")
    with pytest.raises(TwinInputError) as e:
        ServingConfig.from_yaml(y)
    assert e.value.field == "max_loras" and str(y) in str(e.value)
    y.write_text("max_lorras: 4\n")
    with pytest.raises(TwinInputError):
        ServingConfig.from_yaml(y)


def test_summary_metrics_follow_vllm_bench_definitions():
    res = simulate(small_trace(200), ServingConfig(max_loras=2, max_cpu_loras=4))
    req, s = res.requests, res.summary
    done = req[req.status == "finished"]
    assert s["completed"] == len(done) == len(req)            # conservation
    assert (done.generated_tokens == done.output_tokens).all()
    assert math.isclose(s["total_throughput"],
                        (done.prompt_tokens.sum() + done.generated_tokens.sum()) / s["duration_s"])
    ttft = (done.first_token_s - done.arrival_s) * 1000
    # the mean adds the profile's metrics-scrape stalls (recorded beside it), the rest not
    wait = s.get("frontend_stalls", {}).get("ttft_wait_ms", 0.0)
    assert math.isclose(s["ttft_ms"]["mean"] - wait, ttft.mean())
    assert math.isclose(s["ttft_ms"]["median"], ttft.median())
    multi = done[done.generated_tokens > 1]
    tpot = (multi.finish_s - multi.first_token_s) / (multi.generated_tokens - 1) * 1000
    assert math.isclose(s["tpot_ms"]["mean"], tpot.mean())
    assert (done.first_scheduled_s >= done.arrival_s).all()
    assert (done.first_token_s > done.first_scheduled_s).all()
    assert (done.finish_s >= done.first_token_s).all()
    loads = s["adapter_loads"]
    assert loads["from_disk"] == 4          # each adapter read from disk once (host cache 4)
    assert s["itl_ms"]["median"] <= s["itl_ms"]["p99"]


def test_window_reports_unfinished_requests_with_their_state():
    trace = small_trace(400, span=20.0)
    cfg = ServingConfig(max_loras=1, max_cpu_loras=4, max_num_seqs=4)   # overloaded
    res = simulate(trace, cfg, window_s=10.0)
    st = res.requests.status.value_counts().to_dict()
    assert set(st) <= {"finished", "running", "waiting"}
    assert st.get("waiting", 0) > 0 and res.summary["duration_s"] == 10.0
    assert res.summary["starving"]
    assert res.summary["completed"] + res.summary["unfinished"] == int(
        (trace.arrival_s <= 10.0).sum())


def test_cli_simulate_writes_results_and_plot(tmp_path, capsys):
    trace = tmp_path / "t.parquet"
    small_trace(150).to_parquet(trace)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max_loras: 2\nmax-cpu-loras: 4\n")
    out = tmp_path / "run"
    rc = twin_main(["simulate", "--trace", str(trace), "--config", str(cfg),
                    "--max-num-seqs", "64", "--out", str(out), "--plot", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Total token throughput" in text and "Verdict" in text
    assert {p.name for p in out.iterdir()} == {"requests.parquet", "summary.json",
                                              "timeline.parquet", "timeline.png",
                                              ".twin-output"}
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["config"]["max_loras"] == 2 and meta["config"]["max_num_seqs"] == 64
    assert pd.read_parquet(out / "requests.parquet").shape[0] == 150


def test_cli_leaves_nothing_half_written_on_failure(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    small_trace(30).assign(adapter="x").to_csv(trace, index=False)
    out = tmp_path / "run"
    rc = twin_main(["simulate", "--trace", str(trace), "--max-loras", "384",
                    "--max-lora-rank", "32", "--out", str(out), "--no-progress"])
    assert rc == 2
    assert "refuses to start" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [trace]


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    res = simulate(small_trace(50), ServingConfig(max_loras=2, max_cpu_loras=4))
    out = tmp_path / "run"
    res.save(out)
    before = sorted(p.name for p in out.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OSError):
        res.save(out)
    assert sorted(p.name for p in out.iterdir()) == before   # old result intact
    assert [p.name for p in tmp_path.iterdir()] == ["run"]    # no temp dir left


def test_preloaded_adapters_need_no_disk_loads():
    trace = small_trace(100, adapters=4)
    res = simulate(trace, ServingConfig(max_loras=4, max_cpu_loras=4, preload_adapters=True))
    assert res.summary["adapter_loads"]["from_disk"] == 0
    assert res.summary["adapter_loads"]["from_host"] == 0


def test_more_slots_never_hurt_a_skewed_light_workload():
    trace = small_trace(300, adapters=8, span=60)
    few = simulate(trace, ServingConfig(max_loras=1, max_cpu_loras=8)).summary
    many = simulate(trace, ServingConfig(max_loras=8, max_cpu_loras=8)).summary
    assert many["ttft_ms"]["mean"] < few["ttft_ms"]["mean"]
    assert many["adapter_loads"]["from_host"] < few["adapter_loads"]["from_host"]


def test_vllm_serve_yaml_is_accepted_with_irrelevant_settings_ignored(tmp_path):
    y = tmp_path / "vllm_config.yaml"
    y.write_text("model: meta-llama/Llama-3.1-8B-Instruct\nenable-lora: true\nmax-loras: 8\n"
                 "lora-modules:\n- a0=/adapters/a0\nport: 8000\n")
    cfg = ServingConfig.from_yaml(y)
    assert cfg.max_loras == 8 and cfg.max_cpu_loras == 8 and cfg.enable_lora


def test_after_idle_steps_pay_their_extra_cost_and_only_they():
    """A request that meets an idle engine pays the profile's after-idle cost once, in its
    first (prefill) step; requests arriving to a busy engine never do."""
    import dataclasses

    from twin.costs.step_time import StepTimeModel

    base = load_profile("cpu-tiny")
    extra = 0.004
    coef = dict(base.step_time.base, after_idle=extra)
    idle_prof = dataclasses.replace(base, step_time=StepTimeModel(base=coef))
    quiet = dataclasses.replace(base, step_time=StepTimeModel(
        base={k: v for k, v in coef.items() if k != "after_idle"}))
    cfg = ServingConfig(enable_lora=False, max_model_len=512)

    def run(arrivals, prof):
        n = len(arrivals)
        t = pd.DataFrame({"request_id": np.arange(n), "arrival_s": arrivals,
                          "adapter": pd.array([None] * n, dtype="string"),
                          "prompt_tokens": np.full(n, 40), "output_tokens": np.full(n, 8)})
        return simulate(t, cfg, prof, record_steps=True)

    spaced = [0.5, 1.0, 1.5, 2.0]            # each finishes long before the next arrives
    a, b = run(spaced, idle_prof), run(spaced, quiet)
    assert a.steps["after_idle"].sum() == 4
    ttft_gap = (a.requests["first_token_s"] - b.requests["first_token_s"]).to_numpy()
    np.testing.assert_allclose(ttft_gap, extra, rtol=1e-9)
    burst = [0.5, 0.5, 0.5001, 0.5002]       # later ones arrive to a busy engine
    a, b = run(burst, idle_prof), run(burst, quiet)
    assert a.steps["after_idle"].sum() == 1
    np.testing.assert_allclose(a.requests["finish_s"] - b.requests["finish_s"], extra,
                               rtol=1e-9)

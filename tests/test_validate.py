"""``twin validate``: executor and twin on the same trace, side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twin.cli import main  # noqa: E402
from twin.config import ServingConfig  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402
from twin.validate import (compare, format_table, median_summary, run_spread,  # noqa: E402
                           smape, validate)


@pytest.fixture(scope="module")
def profile(tiny_profile):
    return tiny_profile


def spaced_trace(n=12, gap=0.15):
    """Requests far enough apart that each is served alone (the ``alone_gap`` fixture: a
    slower machine needs more than 0.15 s): the schedule (and so the adapter caches'
    sequence of loads) cannot depend on step timing."""
    return pd.DataFrame({
        "request_id": np.arange(n), "arrival_s": np.arange(n) * gap,
        "adapter": pd.array([f"a{i % 5}" for i in (0, 1, 2, 0, 3, 4, 1, 2, 0, 4, 3, 1)[:n]],
                            dtype="string"),
        "prompt_tokens": np.full(n, 24), "output_tokens": np.full(n, 6)})


def test_smape():
    assert smape(1, 1) == 0 and smape(0, 0) == 0
    assert smape(1, 3) == pytest.approx(1.0)
    assert np.isnan(smape(float("nan"), 1))


def test_validate_table_plot_and_equal_loads(profile, tmp_path, alone_gap):
    cfg = ServingConfig(max_loras=1, max_cpu_loras=2, max_lora_rank=16, max_num_seqs=16,
                        max_num_batched_tokens=64)
    gap = alone_gap(spaced_trace(), cfg, load_profile(profile), 0.15)
    v = validate(spaced_trace(gap=gap), cfg, profile, "tiny", out=tmp_path / "v")
    text = v.format("t")
    for label in ("total throughput", "TTFT mean", "TTFT p99", "TPOT mean", "ITL p99",
                  "E2E mean", "adapter loads from disk", "preemptions", "SMAPE"):
        assert label in text
    ex, tw = v.executor.summary, v.twin.summary
    assert ex["completed"] == tw["completed"] == 12
    # the caches are the same code: the same loads for the same trace
    assert ex["adapter_loads"]["from_disk"] == tw["adapter_loads"]["from_disk"] > 5
    assert ex["adapter_loads"]["from_host"] == tw["adapter_loads"]["from_host"]
    assert v.smape("loads_disk") == 0 and v.smape("preemptions") == 0
    assert (tmp_path / "v" / "timeline_overlay.png").stat().st_size > 1000
    assert (tmp_path / "v" / "table.csv").exists()
    assert v.executor.meta["threads"] == 1


def test_cli_prints_table(profile, tmp_path, capsys):
    trace = tmp_path / "t.csv"
    spaced_trace(6).to_csv(trace, index=False)
    rc = main(["validate", "--trace", str(trace), "--profile", str(profile), "--model", "tiny",
               "--max-loras", "2", "--max-cpu-loras", "2", "--max-num-batched-tokens", "64",
               "--out", str(tmp_path / "o"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "executor" in out and "twin" in out and "SMAPE" in out
    assert (tmp_path / "o" / "timeline_overlay.png").exists()


def summary(thr=100.0, ttft=10.0):
    return {"total_throughput": thr, "output_throughput": 50.0, "request_throughput": 1.0,
            "completed": 10, "ttft_ms": {"mean": ttft, "p99": 20.0},
            "tpot_ms": {"mean": 1.0, "p99": 2.0}, "itl_ms": {"mean": 1.0, "p99": 2.0},
            "e2e_ms": {"mean": 30.0, "p99": 40.0},
            "adapter_loads": {"from_disk": 3, "from_host": 1, "time_s": 0.1},
            "preemptions": 0, "duration_s": 10.0}


def test_twin_is_compared_to_the_median_executor_run():
    runs = [summary(100.0, 10.0), summary(90.0, 40.0), summary(120.0, 12.0)]
    med = median_summary(runs)
    assert med["total_throughput"] == 100.0 and med["ttft_ms"]["mean"] == 12.0
    t = compare(med, summary(100.0, 12.0)).set_index("key")
    assert t.loc["throughput", "smape"] == 0 and t.loc["ttft_mean", "smape"] == 0
    sp = run_spread(runs)   # median of the three pairwise SMAPEs
    want = np.median([smape(10, 40), smape(10, 12), smape(40, 12)])
    assert sp["ttft_mean"] == pytest.approx(want) and sp["preemptions"] == 0


def test_validate_repeats_the_executor(profile):
    cfg = ServingConfig(max_loras=2, max_cpu_loras=2, max_lora_rank=16, max_num_seqs=16,
                        max_num_batched_tokens=64)
    v = validate(spaced_trace(4), cfg, profile, "tiny", repeats=2, plot=False)
    assert len(v.executor_summaries) == 2 and v.to_dict()["executor_runs"] == 2
    # the spread is the two runs' own SMAPE, the table sets the twin against their median
    # (two runs: their mean) metric by metric, each SMAPE the hand value of its row
    e0, e1 = (s["ttft_ms"]["mean"] for s in v.executor_summaries)
    assert e0 > 0 and e1 > 0 and v.spread["ttft_mean"] == pytest.approx(smape(e0, e1))
    assert v.spread["completed requests"] == 0 and v.spread["loads_disk"] == 0
    t = v.table.set_index("key")
    assert t.loc["ttft_mean", "executor"] == pytest.approx((e0 + e1) / 2)
    assert t.loc["ttft_mean", "twin"] == pytest.approx(v.twin.summary["ttft_ms"]["mean"])
    for key, row in t.iterrows():
        d = abs(row.executor) + abs(row.twin)
        assert row.smape == pytest.approx(2 * abs(row.executor - row.twin) / d if d else 0.0,
                                          nan_ok=True), key
    # a spaced trace of requests served alone: the twin's calibrated profile (raw: not
    # scaled by the speed anchor, whose samples on a loaded box vary several-fold) prices
    # the executor's TTFT within a factor of ~3 (this box's hiccups); a unit slip (ms vs s)
    # or a lost step cost would give ~2
    assert v.smape_raw("ttft_mean") < 1.0
    # the twin again with a profile twice as slow: its latencies double, the KV stays
    import dataclasses

    from twin.costs.profile import load_profile
    from twin.costs.step_time import StepTimeModel

    p = load_profile(profile)
    slow = dataclasses.replace(p, step_time=StepTimeModel(
        base={k: 2 * c for k, c in p.step_time.base.items()}))
    before = v.twin.summary["itl_ms"]["mean"]
    v.resimulate(slow)
    assert v.twin.summary["itl_ms"]["mean"] == pytest.approx(2 * before, rel=0.05)
    assert v.twin.summary["kv_cache"]["capacity_tokens"] == v.num_blocks * cfg.block_size


def test_compare_format():
    s = {"total_throughput": 100.0, "output_throughput": 50.0, "request_throughput": 1.0,
         "completed": 10, "ttft_ms": {"mean": 10.0, "p99": 20.0},
         "tpot_ms": {"mean": 1.0, "p99": 2.0}, "itl_ms": {"mean": 1.0, "p99": 2.0},
         "e2e_ms": {"mean": 30.0, "p99": 40.0},
         "adapter_loads": {"from_disk": 3, "from_host": 1, "time_s": 0.1},
         "preemptions": 0, "duration_s": 10.0}
    t = compare(s, dict(s, total_throughput=110.0))
    assert t.set_index("key").loc["throughput", "smape"] == pytest.approx(20 / 210)
    assert "9.5%" in format_table(t)

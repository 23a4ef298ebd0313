"""Prefix-cache figures in a run's result: vLLM's counters, hit rates overall and per
adapter, the cached blocks in the KV timeline, the report lines; none of it without
hash_ids (every existing result stays as it was)."""

from __future__ import annotations

import pandas as pd
import pytest

from prefix_traces import conversations
from twin.config import ServingConfig
from twin.errors import TwinInputError
from twin.policies import simulate_policy
from twin.results.recorder import PREFIX_TIMELINE_COLUMNS, TIMELINE_COLUMNS
from twin.sim import simulate

CFG = ServingConfig(max_loras=2, max_num_seqs=32, max_num_batched_tokens=512,
                    max_model_len=4096)


def test_summary_counts_queries_and_hits_per_adapter():
    trace = conversations(11, 40, 3, ["a", "b"], base_every=3)
    res = simulate(trace, CFG)
    s, req = res.summary, res.requests
    assert s["enable_prefix_caching"] is True
    assert s["prefix_cache_queries"] == int(req["prefix_cache_queries"].sum())
    assert 0 < s["prefix_cache_hits"] == s["prefill_tokens_saved"] < s["prefix_cache_queries"]
    # every finished request was looked up with its whole prompt at least once
    done = req["status"] == "finished"
    assert (req["prefix_cache_queries"][done] >= req["prompt_tokens"][done]).all()
    q, h = req["prefix_cache_queries"], req["prefix_cache_hits"]
    assert ((h < q) | (q == 0)).all()
    by = s["prefix_cache_by_adapter"]
    assert set(by) == {"a", "b", "base"}
    assert sum(v["prefix_cache_hits"] for v in by.values()) == s["prefix_cache_hits"]
    # the first turn of a conversation finds only its adapter's system prompt: later turns
    # find their whole history, so the hit rate is well above the system prompt's share
    assert s["prefix_cache_hit_rate"] > 0.3
    text = res.format_summary()
    assert "Prefix cache hit rate (%):" in text and "hit rate, base (%)" in text
    assert list(res.timeline.columns) == PREFIX_TIMELINE_COLUMNS
    assert res.timeline["kv_cached"].max() > 0
    assert (res.timeline["kv_cached"] + res.timeline["kv_usage"] <= 1 + 1e-12).all()


def test_caching_off_reports_no_hits_and_no_trace_reports_nothing():
    trace = conversations(12, 20, 2, ["a"])
    off = simulate(trace, CFG.replace(enable_prefix_caching=False))
    assert off.summary["prefix_cache_hits"] == 0 and not off.summary["enable_prefix_caching"]
    assert off.summary["prefix_cache_queries"] == 0
    plain = simulate(trace.drop(columns="hash_ids"), CFG)
    assert "prefix_cache_queries" not in plain.summary
    assert "prefix_cache_hits" not in plain.requests
    assert list(plain.timeline.columns) == TIMELINE_COLUMNS
    assert "Prefix" not in plain.format_summary()


def test_hash_block_size_comes_from_the_trace_metadata():
    """The same token content named in 48-token blocks, or in 16-token blocks (each id
    split in three): the same hits, request by request (and a hash block size that is
    not a multiple of the KV block's, 40, is served too)."""
    trace = conversations(13, 30, 3, ["a"], hbs=48)
    fine = trace.copy()
    # (at most the blocks prompt + output fill: the trace contract's bound)
    fine["hash_ids"] = [tuple(3 * h + k for h in ids for k in range(3))[:-(-(p + o) // 16)]
                        for ids, p, o in zip(trace["hash_ids"], trace["prompt_tokens"],
                                             trace["output_tokens"])]
    fine.attrs["hash_block_size"] = 16
    coarse, split = simulate(trace, CFG), simulate(fine, CFG)
    assert coarse.summary["prefix_cache_hits"] > 0
    pd.testing.assert_frame_equal(coarse.requests, split.requests)
    assert simulate(conversations(13, 30, 3, ["a"], hbs=40), CFG).summary[
        "prefix_cache_hits"] > 0
    wrong = trace.copy()
    wrong.attrs["hash_block_size"] = 16    # the same ids naming fewer tokens than the prompt
    with pytest.raises(TwinInputError, match="do not cover the prompt"):
        simulate(wrong, CFG)


def test_a_deployment_of_several_servers_sums_its_servers_figures():
    trace = conversations(14, 30, 3, ["a", "b", "c", "d"])
    res = simulate_policy(trace, CFG, gpus=2)
    assert res.summary["prefix_cache_hits"] == int(res.requests["prefix_cache_hits"].sum()) > 0
    assert set(res.summary["prefix_cache_by_adapter"]) == {"a", "b", "c", "d"}
    pd.testing.assert_series_equal(
        res.requests["prefix_cache_queries"] > 0, res.requests["status"] == "finished",
        check_names=False)


def test_a_preempted_requests_lookups_are_counted_apart_as_vllm_does():
    """A KV pool small enough to preempt: a victim re-admitted finds its own blocks again.
    vLLM counts that lookup apart (``PrefixCacheStats.preempted_queries`` / ``_hits``), so
    its hit rate counts each request's first lookup only: queries are the admitted
    requests' prompts, and the rate cannot exceed what an ideal cache gives the trace (it
    read above it, the victims' own blocks counted as reuse). The prefill the re-hits
    saved is still counted."""
    from twin.workload.prefix_stats import prefix_share

    trace = conversations(11, 40, 3, ["a", "b"], base_every=3)
    trace = trace.assign(arrival_s=trace["arrival_s"] * 0.05)   # a burst
    cfg = ServingConfig(max_loras=2, max_num_seqs=64, max_num_batched_tokens=512,
                        max_model_len=1024, gpu_memory_utilization=0.2705)
    res = simulate(trace, cfg)
    s, req = res.summary, res.requests
    assert s["preemptions"] > 0 and s["prefix_cache_preempted_hits"] > 0
    admitted = req["first_scheduled_s"].notna()
    assert s["prefix_cache_queries"] == int(req["prompt_tokens"][admitted].sum())
    assert s["prefix_cache_hit_rate"] <= prefix_share(trace)
    assert s["prefill_tokens_saved"] == s["prefix_cache_hits"] + s["prefix_cache_preempted_hits"]
    assert s["prefix_cache_preempted_hits"] == int(req["prefix_cache_preempted_hits"].sum())
    assert (req["prefix_cache_preempted_hits"][req["preemptions"] == 0] == 0).all()


def test_compare_says_which_strategy_served_prefixes_from_its_cache():
    """S-LoRA's server has no prefix cache: beside vLLM's on a trace of conversations its
    TTFT includes recomputed history, and the comparison says so with both hit rates
    (it said nothing: one strategy with caching against one without)."""
    from twin.policies.compare import compare

    trace = conversations(11, 40, 3, ["a", "b"])
    cmp = compare(trace, CFG, policies=("vllm", "slora"), gpus=1)
    rates = cmp.table.set_index("policy")["prefix_cache_hit_rate"]
    assert rates["vllm"] > 0.3 and rates["slora"] == 0.0
    assert f"vllm {100 * rates['vllm']:.0f}%, slora 0%" in cmp.verdict
    plain = compare(trace.drop(columns="hash_ids"), CFG, policies=("vllm", "slora"), gpus=1)
    assert plain.table["prefix_cache_hit_rate"].isna().all()
    assert "prefix-cache hits differ" not in plain.verdict

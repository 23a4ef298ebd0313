"""Prefix caching in the scheduler and the twin: adapters' namespaces, the hit cap, LRU
eviction, preemption, and caching on being caching off when no request names its tokens."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from prefix_traces import conversations
from twin.config import ServingConfig
from twin.costs.step_time import features
from twin.results.results import PREFIX_COLUMNS
from twin.sched import AdapterCache, Request, Scheduler
from twin.sim import simulate


def make_sched(num_blocks=1000, block_size=4, budget=100, caching=True, max_num_seqs=8):
    return Scheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget, max_loras=4, max_model_len=10**6,
                     adapter_cache=AdapterCache(4, 4), enable_prefix_caching=caching)


def serve(s, *reqs, now=0.0):
    """Add ``reqs`` and step until nothing runs; returns each request's computed tokens
    at its (first) admission."""
    at_admission = {}
    for r in reqs:
        s.add_request(r)
    while s.has_work():
        plan = s.schedule(now)
        for r in plan.admitted:
            at_admission.setdefault(r.idx, r.computed)
        now += 1.0
        s.finish_step(plan, now)
    return [at_admission[r.idx] for r in reqs]


def req(i, adapter, prompt, ids, output=1, hbs=4):
    return Request(i, i, 0.0, adapter, prompt, output, ids, hbs)


def test_same_adapter_hits_other_adapters_and_base_never():
    s = make_sched()
    ids = (1, 2, 3, 4)
    assert serve(s, req(0, 0, 16, ids)) == [0]
    # 16 tokens in 4 full cached blocks; at least one token is computed: 3 blocks hit
    assert serve(s, req(1, 0, 16, ids)) == [12]
    assert serve(s, req(2, 1, 16, ids), req(3, -1, 16, ids)) == [0, 0]
    assert serve(s, req(4, 1, 16, ids), req(5, -1, 16, ids)) == [12, 12]  # their own
    assert s.prefix.hits == 3 * 12 and s.prefix.queries == 6 * 16


def test_hit_stops_at_the_first_different_block_and_at_num_tokens_minus_one():
    s = make_sched()
    serve(s, req(0, 0, 16, (1, 2, 3, 4)))
    assert serve(s, req(1, 0, 16, (1, 2, 9, 4))) == [8]
    assert serve(s, req(2, 0, 17, (1, 2, 3, 4, 5))) == [16]
    assert serve(s, req(3, 0, 13, (1, 2, 3, 4))) == [12]
    assert serve(s, req(4, 0, 3, (1,))) == [0]
    assert serve(s, req(5, 0, 16, None)) == [0]            # no hash ids: shares nothing


def test_freed_blocks_are_evicted_least_recently_freed_first_tail_first():
    # 10 blocks of 4 tokens; A then B each leave 3 cached blocks (A's queued first)
    s = make_sched(num_blocks=10)
    serve(s, req(0, 0, 12, (1, 2, 3)))
    serve(s, req(1, 0, 12, (4, 5, 6)))
    assert s.prefix.cached_blocks == 6
    # C needs 6 new blocks: the 4 never used, then A's tail blocks (A2, A1); A0 survives
    serve(s, req(2, 0, 24, None))
    assert s.prefix.cached_blocks == 4
    # queue now: A0, B2, B1, B0, then C's 6 uncached blocks; B' hits B0 B1 and its one
    # new block is the head, A0 (vLLM's queue is least recently freed first, cached or not)
    assert serve(s, req(4, 0, 12, (4, 5, 6))) == [8]
    assert serve(s, req(3, 0, 12, (1, 2, 3))) == [0]


def test_shared_blocks_are_counted_once_while_several_requests_hold_them():
    s = make_sched(num_blocks=100)
    serve(s, req(0, 0, 40, tuple(range(10))))
    a, b = req(1, 0, 40, tuple(range(10)), output=30), req(2, 0, 40, tuple(range(10)),
                                                            output=30)
    s.add_request(a)
    s.add_request(b)
    s.schedule(0.0)
    # both hold 9 cached blocks and one new block each: 11 blocks in use, not 20
    assert s.kv_used_blocks() == 11
    assert s.prefix.hits == 2 * 36


def test_a_hit_prices_only_computed_tokens_and_attends_the_hit_as_context():
    s = make_sched()
    serve(s, req(0, 0, 40, tuple(range(10))))
    r = req(1, 0, 40, tuple(range(10)))
    s.add_request(r)
    plan = s.schedule(0.0)
    assert r.computed == 36                      # 9 cached blocks of 4 tokens
    f = features(plan, max_lora_rank=16, max_loras=4)
    assert f.prefill_tokens == 4 and f.prefill_context == 4 * (36 + 4)
    assert f.lora_token_rank == 4 * 16           # LoRA applies to computed tokens only


def test_preempted_request_hits_its_own_prefix_when_readmitted():
    def run(caching):
        s = make_sched(num_blocks=10, caching=caching)
        other = Request(0, 0, 0.0, -1, 12, 14, None, 4)
        own = Request(1, 1, 0.0, 0, 8, 14, tuple(range(20, 26)), 4)  # ids name its output too
        serve(s, other, own)
        return own, s

    own, s = run(True)
    assert own.preemptions >= 1 and own.status == 3
    assert own.prefix.rehit > 0                   # its re-admission found its blocks
    # counted apart from the hit rate's, as vLLM's PrefixCacheStats does for a lookup of a
    # preempted request: its own blocks found again are no cache reuse (they inflated the
    # hit rate above what an infinite cache could give the trace)
    assert own.prefix.hit == 0 and s.prefix.hits == 0 and s.prefix.queries == own.prefix.queried
    assert s.prefix.preempted_hits == own.prefix.rehit
    assert s.prefix.preempted_queries == own.prefix.requeried > 0
    off, _ = run(False)
    assert off.preemptions >= 1 and off.prefix is None


def _equal(a, b):
    pd.testing.assert_frame_equal(a.requests, b.requests)
    pd.testing.assert_frame_equal(a.timeline, b.timeline)
    assert json.dumps(a.summary, sort_keys=True, default=str) == json.dumps(
        b.summary, sort_keys=True, default=str)


@pytest.mark.parametrize("kv_tokens", [None, 6000])
def test_caching_on_equals_caching_off_without_hash_ids(kv_tokens):
    trace = conversations(5, 60, 3, ["a", "b", "c"], base_every=4).drop(columns="hash_ids")
    cfg = ServingConfig(max_loras=2, max_num_seqs=32, max_num_batched_tokens=512,
                        max_model_len=4096)
    on = simulate(trace, cfg, record_steps=True)
    off = simulate(trace, cfg.replace(enable_prefix_caching=False), record_steps=True)
    _equal(on, off)
    pd.testing.assert_frame_equal(on.steps, off.steps)


def test_caching_off_ignores_hash_ids():
    trace = conversations(6, 40, 3, ["a", "b"])
    cfg = ServingConfig(max_loras=2, max_num_batched_tokens=512, max_model_len=4096,
                        enable_prefix_caching=False)
    named = simulate(trace, cfg)
    assert named.summary["prefix_cache_hits"] == 0
    # the prefix figures aside (reported because the trace names its tokens), the same run
    named.requests = named.requests.drop(columns=list(PREFIX_COLUMNS))
    named.timeline = named.timeline.drop(columns="kv_cached")
    named.summary = {k: v for k, v in named.summary.items()
                     if "prefix_cach" not in k and k != "prefill_tokens_saved"}
    _equal(named, simulate(trace.drop(columns="hash_ids"), cfg))


def test_caching_speeds_up_conversations_and_jumps_equal_steps():
    trace = conversations(7, 80, 4, ["a", "b", "c"], base_every=5)
    cfg = ServingConfig(max_loras=3, max_num_seqs=64, max_num_batched_tokens=512,
                        max_model_len=4096)
    on = simulate(trace, cfg, record_steps=True)
    off = simulate(trace, cfg.replace(enable_prefix_caching=False))
    assert on.summary["ttft_ms"]["mean"] < off.summary["ttft_ms"]["mean"]
    stepwise = simulate(trace, cfg, record_steps=True, jump=False)
    pd.testing.assert_frame_equal(on.requests, stepwise.requests)


def test_cached_blocks_have_stable_ids_shared_within_an_adapter_only():
    s = make_sched()
    a, b, c = (req(0, 0, 24, (1, 2, 3, 4, 5, 6), output=20),
               req(1, 0, 24, (1, 2, 3, 9, 9, 9), output=20),
               req(2, 1, 24, (1, 2, 3, 4, 5, 6), output=20))
    for r in (a, b, c):
        s.add_request(r)
    s.schedule(0.0)     # a registers its 6 blocks first; b hits 3 of them, c none
    ids = [s.prefix.block_ids(r) for r in (a, b, c)]
    assert (b.prefix.hit_blocks, c.prefix.hit_blocks) == (3, 0)
    assert ids[0][:3] == ids[1][:3] and ids[0][3:] != ids[1][3:]
    assert not set(ids[0]) & set(ids[2])


def test_aborted_requests_leave_their_blocks_cached_and_the_counts_consistent():
    s = make_sched(num_blocks=40, budget=8)
    ids = tuple(range(8))
    serve(s, req(0, 0, 32, ids))
    a, b = req(1, 0, 32, ids, output=10), req(2, 0, 20, tuple(range(50, 55)), output=10)
    s.add_request(a)
    s.add_request(b)
    s.finish_step(s.schedule(0.0), 1.0)
    # a hit 28 tokens and decodes; b's first chunk (the budget's last 4 tokens) is cached
    assert a.status == 2 and b.status == 1 and b.computed == 4
    s.abort(a)
    s.abort(b)
    assert s.kv_used_blocks() == 0 and not s.has_work()
    s.prefix.sync(s.pool.num_blocks)
    assert s.prefix.qlen == 40 and s.prefix.evictable == s.prefix.cached_blocks == 8 + 1
    assert serve(s, req(3, 0, 20, tuple(range(50, 55)))) == [4]   # b's computed block

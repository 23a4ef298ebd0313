"""The scheduler with prefix caching against vLLM's loop with vLLM's prefix cache, block by
block (``tests/sched_reference.py`` + ``tests/prefix_cache_reference.py``): the same batches,
preemptions and times, step by step and with the twin's jumps."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from prefix_cache_reference import RefPrefixCache
from sched_reference import run_reference
from test_scheduler import STEP, _normalise, drive_stepwise
from twin.costs.step_time import features
from twin.sched import AdapterCache, Request, Scheduler

HBS = 4   # tokens per hash id

rows_strategy = st.lists(
    st.tuples(st.floats(0, 5, allow_nan=False), st.integers(-1, 2), st.integers(1, 60),
              st.integers(1, 30), st.integers(0, 2), st.integers(0, 12)),
    min_size=1, max_size=30)


# small pools (preemptions, evictions), blocks of one or two hash ids or a quarter of one
cfg_strategy = st.fixed_dictionaries({
    "num_blocks": st.integers(10, 40), "block_size": st.sampled_from([4, 8, 1]),
    "max_num_seqs": st.integers(1, 12), "max_num_batched_tokens": st.integers(4, 64),
    "max_loras": st.integers(1, 3), "extra_cpu": st.integers(0, 3)})


def _ids(rows):
    """Per row: hash ids covering its prompt's full hash blocks, the first ``d`` of them
    those of family ``f`` (requests of one family share a prefix), the rest its own. The
    ids stay inside the prompt, so no block of a decoder's output is hashed (the twin
    caches those when it leaves, vLLM as they fill: the same but for concurrent sharing)."""
    out = []
    for i, (_, _, prompt, _, family, d) in enumerate(rows):
        k = prompt // HBS
        out.append(tuple(family * 1000 + j if j < d else 10**6 + 100 * i + j
                         for j in range(k)) or None)
    return out


def run_twin(rows, ids, **kw):
    s = Scheduler(num_blocks=kw["num_blocks"], block_size=kw["block_size"],
                  max_num_seqs=kw["max_num_seqs"],
                  max_num_batched_tokens=kw["max_num_batched_tokens"],
                  max_loras=kw["max_loras"], max_model_len=10**9,
                  adapter_cache=AdapterCache(kw["max_loras"], kw["max_cpu_loras"]),
                  enable_prefix_caching=True)
    reqs = [Request(i, i, a, ad, p, o, h, HBS) for i, ((a, ad, p, o), h) in
            enumerate(zip(rows, ids))]
    batches = []
    step_s = lambda plan: STEP(features(plan, kw["max_lora_rank"], kw["max_loras"]))  # noqa: E731
    for _, plan, b in drive_stepwise(s, reqs, step_s):
        batches.append((tuple(b), tuple(r.idx for r in plan.preempted)))
    return reqs, batches, s


@settings(max_examples=int(os.environ.get("PREFIX_EXAMPLES", 150)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows_strategy, cfg_strategy)
def test_prefix_caching_scheduler_matches_vllm_loop_with_vllm_cache(rows6, cfg):
    rows6 = sorted(rows6, key=lambda r: r[0])
    rows, kw = _normalise([r[:4] for r in rows6], cfg)
    rows6 = [r + r6[4:] for r, r6 in zip(rows, rows6)]
    ids = _ids(rows6)
    ref, ref_batches = run_reference(rows, step_time=STEP, prefix=RefPrefixCache(
        kw["num_blocks"], kw["block_size"]), hash_ids=ids, hash_block_size=HBS, **kw)
    twin, twin_batches, s = run_twin(rows, ids, **kw)
    event(f"hits: {'some' if s.prefix.hits else 'none'}; preemptions: "
          f"{'some' if s.num_preemptions else 'none'}")
    assert twin_batches == ref_batches
    for a, b in zip(ref, twin):
        assert (a.first_token, a.finish, a.preemptions) == (b.first_token, b.finish, b.preemptions)
    assert s.kv_used_blocks() == 0      # everything freed, the cache's counts consistent
    s.prefix.sync(s.pool.num_blocks)
    assert s.prefix.qlen == s.pool.num_blocks and s.prefix.evictable == s.prefix.cached_blocks

"""``twin.sched.AdapterCache``: its API on hand-built cases, and differential tests against an
independent transcription of vLLM's LRU LoRA managers (tests/lora_manager_reference.py),
alone over random batch streams and inside the literal scheduler loop."""

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_manager_reference import LRUCacheWorkerLoRAManager, loads_of
from twin.sched import AdapterCache
from twin.sched.adapter_cache import AdapterLoad


# -- the API ------------------------------------------------------------------------------
def use(cache, *adapters):
    """One request per adapter runs and finishes, in order; returns the loads."""
    loads = []
    for a in adapters:
        loads.append(cache.acquire(a))
        cache.release(a)
    return loads


def test_miss_then_hit_and_counters():
    c = AdapterCache(2, 3)
    assert c.acquire(5) == AdapterLoad(5, True)
    assert c.is_resident(5) and c.active == {5: 1}
    assert c.acquire(5) is None                  # a second request: already running
    assert c.active == {5: 2}
    c.release(5)
    c.release(5)
    assert c.active == {}
    assert c.acquire(5) is None                  # idle but still in its slot
    assert (c.loads_from_disk, c.loads_from_host) == (1, 0)


def test_host_hit_is_a_host_to_gpu_copy_that_reuses_the_lru_slot():
    c = AdapterCache(1, 2)
    use(c, 0)
    assert use(c, 1) == [AdapterLoad(1, True, evicted_gpu=0)]
    assert use(c, 0) == [AdapterLoad(0, False, evicted_gpu=1)]
    assert (c.loads_from_disk, c.loads_from_host) == (2, 1)
    assert set(c.host.resident) == {0, 1} and set(c.gpu.resident) == {0}


def test_lru_order_follows_last_release_not_first_load():
    c = AdapterCache(3, 3)
    use(c, 0, 1, 2, 0)                           # 0 used again: 1 is now the oldest
    assert use(c, 3) == [AdapterLoad(3, True, evicted_gpu=-1, evicted_host=1)]
    assert use(c, 4) == [AdapterLoad(4, True, evicted_gpu=-1, evicted_host=2)]
    assert set(c.gpu.resident) == {0, 3, 4}


def test_adapters_of_running_requests_are_never_victims():
    c = AdapterCache(2, 2)
    c.acquire(0)                                 # stays running (the oldest)
    use(c, 1)
    assert c.acquire(2) == AdapterLoad(2, True, evicted_gpu=-1, evicted_host=1)
    assert c.is_resident(0)
    with pytest.raises(RuntimeError):            # every slot held by a running adapter
        c.acquire(3)


def test_capacity_one_every_switch_reads_from_disk():
    c = AdapterCache(1, 1)
    assert use(c, 0, 1, 0) == [AdapterLoad(0, True), AdapterLoad(1, True, -1, 0),
                               AdapterLoad(0, True, -1, 1)]   # the host eviction frees the slot
    assert (c.loads_from_disk, c.loads_from_host) == (3, 0)


def test_large_capacity_evicts_only_when_full():
    n = 64
    c = AdapterCache(n, n)
    assert all(ld.evicted_gpu == ld.evicted_host == -1 for ld in use(c, *range(n)))
    assert use(c, *range(n)) == [None] * n       # all hits
    assert use(c, n) == [AdapterLoad(n, True, -1, 0)]


def test_the_running_key_names_the_set_of_adapters_in_use_whatever_the_order():
    """``running_key``: one number per set of adapters with running requests (vLLM's
    lora_requests_info label, as a set), kept as adapters join and leave; the same set
    reached in another order gives the same key, another set another key."""
    a, b = AdapterCache(4, 8), AdapterCache(4, 8)
    empty = a.running_key
    seen = {empty}
    for x in (1, 1, 2, 3):                    # {1}, {1}, {1,2}, {1,2,3}
        a.acquire(x)
        seen.add(a.running_key)
    assert len(seen) == 4
    for x in (3, 2, 1):                       # b reaches {1,2,3} in another order
        b.acquire(x)
    assert b.running_key == a.running_key
    a.release(1)                              # 1 still runs once
    assert a.running_key == b.running_key
    a.release(1)
    b.release(1)
    assert a.running_key == b.running_key != empty
    for x in (2, 3):
        a.release(x)
    assert a.running_key == empty


def test_a_run_counts_the_metrics_labels_its_steps_ran_with():
    """The summary's ``lora_running_sets``: vLLM's ``lora_requests_info`` labels, a pair of
    (running adapters, waiting adapters) per step. Many adapters churn through many; one
    adapter whose burst queues gives exactly three: (none, it) before the first step, (it,
    it) while some wait, (it, none) at the end; with the queue never holding it, fewer."""
    import numpy as np
    import pandas as pd

    from twin.config import ServingConfig
    from twin.sim.engine import simulate

    rng = np.random.default_rng(0)
    n = 400

    def trace(adapters, burst=False):
        arrival = np.zeros(n) if burst else np.sort(rng.uniform(0, 60, n))
        return pd.DataFrame({"request_id": range(n), "arrival_s": arrival,
                             "prompt_tokens": rng.integers(20, 200, n),
                             "output_tokens": rng.integers(5, 80, n),
                             "adapter": [f"a{k}" for k in rng.integers(0, adapters, n)]})
    cfg = ServingConfig(max_loras=8, max_cpu_loras=32)
    burst = simulate(trace(1, burst=True), ServingConfig(max_loras=8, max_cpu_loras=32,
                                                         max_num_seqs=8)).summary
    assert burst["lora_running_sets"] == 3
    assert simulate(trace(1), cfg).summary["lora_running_sets"] <= 4
    assert simulate(trace(32), cfg).summary["lora_running_sets"] > 50


def test_a_label_is_the_pair_of_running_and_waiting_sets():
    """The same running set beside two waiting sets is two labels, the same pair once; a
    waiting set is its adapters whatever their order of arrival (the queue's key)."""
    from twin.sched.request import Request
    from twin.sched.waiting_queue import WaitingQueue

    c = AdapterCache(4, 8)
    c.acquire(1)
    q1, q2 = WaitingQueue(), WaitingQueue()
    for q, order in ((q1, (2, 3, -1)), (q2, (3, -1, 2, 3))):
        for k, a in enumerate(order):
            q.append(Request(k, k, 0.0, a, 8, 8))
    assert q1.adapters_key == q2.adapters_key != 0   # {2, 3}: the base model is no label
    for key in (0, q1.adapters_key, q2.adapters_key, 0):
        c.note_label(key)
    assert len(c.running_sets) == 2
    q1.pop(q1.first())   # adapter 2's only request leaves: {3} waits
    c.note_label(q1.adapters_key)
    assert len(c.running_sets) == 3


def test_preload_and_drop():
    c = AdapterCache(1, 2, preload=[7, 8, 9])
    assert set(c.host.resident) == {7, 8} and set(c.gpu.resident) == {7}
    assert (c.loads_from_disk, c.loads_from_host) == (0, 0)
    assert c.acquire(8) == AdapterLoad(8, False, evicted_gpu=7)
    with pytest.raises(ValueError):
        c.drop(8)                                # in use
    c.release(8)
    c.drop(8)                                    # frees its slot and its host entry
    assert not c.is_resident(8) and 8 not in c.host
    assert c.acquire(8) == AdapterLoad(8, True)  # no eviction at either level
    assert set(c.host.resident) == {7, 8} and set(c.gpu.resident) == {8}
    with pytest.raises(ValueError):
        AdapterCache(3, 2)                       # max_cpu_loras < max_loras


# -- against vLLM's managers, batch by batch ---------------------------------------------------
def run_streams(stream, max_loras, max_cpu_loras):
    """Feed the same batches to the reference and to AdapterCache; compare every step.

    A batch is a list of running requests' adapters (-1: base model, repeats: several
    requests). The reference gets vLLM's ``lora_id_to_lora_request`` order (adapters still
    in the batch keep their place, new ones are appended); AdapterCache gets what the
    scheduler calls: a release per request that left (in the previous batch's order), then
    an acquire per request that joined.
    """
    ref = LRUCacheWorkerLoRAManager(max_loras, max_cpu_loras)
    twin = AdapterCache(max_loras, max_cpu_loras)
    prev: Counter = Counter()
    order: list = []
    for t, batch in enumerate(stream):
        now = Counter(a for a in batch if a >= 0)
        for a in order:
            for _ in range(prev[a] - now[a]):
                twin.release(a)
        order = [a for a in order if a in now] + [a for a in now if a not in order]
        got = []
        for a in order:
            for _ in range(now[a] - prev[a]):
                ld = twin.acquire(a)
                if ld is not None:
                    got.append((ld.adapter, ld.from_disk, ld.evicted_gpu, ld.evicted_host))
        want = loads_of(ref.set_active_adapters(order))
        assert got == want, f"step {t}, batch {order}"
        assert set(twin.gpu.resident) == ref.active_adapters(), f"step {t}: GPU slots"
        assert set(twin.host.resident) == ref.list_adapters(), f"step {t}: host cache"
        prev = now
    return ref, twin


@st.composite
def streams(draw):
    max_loras = draw(st.integers(1, 4))
    max_cpu_loras = max_loras + draw(st.integers(0, 3))
    n_adapters = draw(st.integers(1, max_cpu_loras + 4))
    steps = draw(st.integers(1, 40))
    out = []
    for _ in range(steps):
        # at most max_loras distinct adapters per batch (vLLM's scheduler guarantees it)
        k = draw(st.integers(0, min(max_loras, n_adapters)))
        pick = draw(st.lists(st.integers(0, n_adapters - 1), min_size=k, max_size=k,
                             unique=True))
        reqs = draw(st.lists(st.sampled_from(pick + [-1]), max_size=6)) if pick else \
            draw(st.lists(st.just(-1), max_size=2))
        out.append(pick + reqs)
    return out, max_loras, max_cpu_loras


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_adapter_cache_matches_vllm_lru_managers(case):
    stream, max_loras, max_cpu_loras = case
    ref, twin = run_streams(stream, max_loras, max_cpu_loras)
    kinds = Counter(ev[0] for ev in ref.events)
    assert twin.loads_from_disk == kinds["disk"]
    assert twin.loads_from_disk + twin.loads_from_host == kinds["activate"]


def test_the_stream_test_sees_evictions_at_both_levels():
    """A fixed stream with host and GPU evictions, so the differential test is not vacuous."""
    ref, twin = run_streams([[0], [1], [2], [0, 1], [3], [2, 1], [-1], [0]], 2, 3)
    kinds = Counter(ev[0] for ev in ref.events)
    assert kinds["evict_host"] >= 2 and kinds["deactivate"] >= 3
    assert twin.loads_from_host >= 1


# -- inside the scheduler ---------------------------------------------------------------------
from sched_reference import run_reference  # noqa: E402
from test_scheduler import STEP, _normalise, cfg_strategy, rows_strategy, run_fast_stepwise  # noqa: E402


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_strategy, cfg_strategy)
def test_scheduler_loads_match_literal_loop_with_vllm_lora_manager(rows, cfg):
    """The twin's scheduler with AdapterCache against the literal vLLM loop whose adapters
    go through vLLM's managers: same batches, and the same loads in the same steps."""
    rows, kw = _normalise(rows, cfg)
    manager = LRUCacheWorkerLoRAManager(kw["max_loras"], kw["max_cpu_loras"])
    ref_loads, fast_loads = [], []
    _, ref_batches = run_reference(rows, step_time=STEP, lora_manager=manager,
                                   loads_log=ref_loads, **kw)
    _, fast_batches = run_fast_stepwise(rows, loads_log=fast_loads, **kw)
    assert fast_batches == ref_batches
    assert fast_loads == ref_loads


# -- the reference itself ---------------------------------------------------------------------
def test_reference_reloads_a_batch_adapter_evicted_by_an_earlier_load():
    """vLLM applies a batch's adapters one by one: a load can evict one that comes later in
    the same batch, which is then read from disk again (AdapterCache's docstring notes that
    it touches running adapters first instead; the drivers above put them first)."""
    ref = LRUCacheWorkerLoRAManager(2, 2)
    ref.set_active_adapters([1, 2])
    ev = ref.set_active_adapters([0, 1])
    assert [e[:2] for e in ev] == [("disk", 0), ("evict_host", 1), ("deactivate", 1),
                                   ("activate", 0), ("disk", 1), ("evict_host", 2),
                                   ("deactivate", 2), ("activate", 1)]
    ref = LRUCacheWorkerLoRAManager(2, 2)
    ref.set_active_adapters([1, 2])
    assert loads_of(ref.set_active_adapters([1, 0])) == [(0, True, -1, 2)]


def test_reference_pinned_adapter_survives_eviction():
    """``pin_adapter`` (a user API, never used while batches run) exempts an adapter from
    ``remove_oldest`` at both levels."""
    ref = LRUCacheWorkerLoRAManager(2, 2)
    ref.set_active_adapters([0])
    ref._adapter_manager.pin_adapter(0)
    for a in (1, 2, 3):
        ref.set_active_adapters([a])
    assert ref.list_adapters() == {0, 3} and ref.active_adapters() == {0, 3}
    ref._adapter_manager.pin_adapter(3)
    with pytest.raises(RuntimeError):
        ref.set_active_adapters([4])

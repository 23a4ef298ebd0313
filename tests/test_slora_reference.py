"""``SLoRAScheduler`` and its unified page pool against a plain-list reference of S-LoRA's
admission and paging (tests/slora_reference.py)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slora_reference import run_slora_reference
from test_scheduler import drive_stepwise
from twin.sched.unified_pool import SLoRAScheduler
from twin.sched import Request


def step_time(prefill_tokens, decode_n, adapters, loads):
    return 0.01 + 1e-4 * prefill_tokens + 2e-4 * decode_n + 1e-3 * adapters + 3e-3 * loads


MAX_STEPS = 50_000   # far above any case here (40 requests of at most 100 tokens)


def run_twin(rows, *, num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
             adapter_pages, admission):
    """SLoRAScheduler one step at a time, logged as the reference logs."""
    s = SLoRAScheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, max_model_len=10**9,
                       adapter_pages=adapter_pages, adapter_ranks=[8] * len(adapter_pages),
                       admission=admission)
    reqs = [Request(i, i, a, ad, p, o) for i, (a, ad, p, o) in enumerate(rows)]
    log = []

    def step_s(plan):
        return step_time(plan.prefill_tokens, plan.decode_n, plan.adapters, len(plan.loads))

    for now, plan, b in drive_stepwise(s, reqs, step_s, max_steps=MAX_STEPS):
        if not b and not plan.preempted:   # every request fits alone: a step always runs one
            raise AssertionError(f"twin: empty step at {now} with work waiting")
        log.append((tuple(b), tuple(r.idx for r in plan.preempted),
                    tuple(ld.adapter for ld in plan.loads), plan.kv_blocks,
                    tuple(sorted(s.cache.resident))))
    return reqs, log, s


N_ADAPTERS = 6
rows_strategy = st.lists(
    st.tuples(st.floats(0, 5, allow_nan=False), st.integers(-1, N_ADAPTERS - 1),
              st.integers(1, 60), st.integers(1, 40)), min_size=1, max_size=40)
cfg_strategy = st.fixed_dictionaries({
    "num_blocks": st.integers(12, 80), "block_size": st.sampled_from([4, 16]),
    "max_num_seqs": st.integers(1, 12), "max_num_batched_tokens": st.integers(4, 64),
    "adapter_pages": st.lists(st.integers(1, 6), min_size=N_ADAPTERS, max_size=N_ADAPTERS),
    "admission": st.sampled_from(["conservative", "on_demand"])})


def normalise(rows, cfg):
    """Sort by arrival; every request fits the pool alone with the largest adapter (the
    twin's SLoRAPolicy refuses a pool smaller than that)."""
    room = (cfg["num_blocks"] - max(cfg["adapter_pages"])) * cfg["block_size"]
    return [(a, ad, min(p, room // 2), min(o, room // 2))
            for a, ad, p, o in sorted(rows, key=lambda r: r[0])]


def check(rows, cfg):
    rows = normalise(rows, cfg)
    ref, ref_log = run_slora_reference(rows, step_time=step_time, **cfg)
    tw, tw_log, sched = run_twin(rows, **cfg)
    for k, (a, b) in enumerate(zip(ref_log, tw_log)):
        assert a == b, f"step {k} (batch, preempted, loads, pages, resident): ref {a} != twin {b}"
    assert len(ref_log) == len(tw_log)
    for a, b in zip(ref, tw):
        assert (a.first_token, a.finish, a.preemptions) == (b.first_token, b.finish,
                                                            b.preemptions)
    assert sched.cache.loads_from_host == sum(len(e[2]) for e in ref_log)
    if cfg["admission"] == "conservative":       # the worst case always fits: no preemption
        assert all(not e[1] for e in ref_log)
    return ref_log


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_strategy, cfg_strategy)
def test_slora_scheduler_matches_reference(rows, cfg):
    check(rows, cfg)


def test_fixed_case_exercises_paging_admission_and_drops():
    """A fixed case where adapter pages decide admission, adapters are dropped and
    reloaded, so the differential test is not vacuous."""
    rows = [(0.0, 0, 20, 12), (0.0, 1, 20, 12), (0.0, 2, 8, 4), (0.05, 0, 8, 30),
            (0.3, 3, 30, 5), (0.3, -1, 12, 3), (0.6, 1, 10, 10)]
    for admission in ("conservative", "on_demand"):
        cfg = dict(num_blocks=24, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                   adapter_pages=[3, 4, 2, 5, 1, 1], admission=admission)
        log = check(rows, cfg)
        loads = [a for e in log for a in e[2]]
        assert len(loads) > len(set(loads))      # some adapter was dropped and loaded again
        if admission == "on_demand":
            assert any(e[1] for e in log)        # pages ran out: preemption

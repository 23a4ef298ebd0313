"""The scheduler's vLLM V1 rules, on hand-built traces and against a literal reference."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sched_reference import run_reference
from twin.config import ServingConfig
from twin.costs.step_time import StepTimeModel, features
from twin.sched import AdapterCache, Request, Scheduler
from twin.sim import simulate


def make_sched(num_blocks=1000, block_size=4, max_num_seqs=8, budget=16, max_loras=2,
               max_cpu_loras=4):
    cache = AdapterCache(max_loras, max_cpu_loras)
    return Scheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget, max_loras=max_loras, max_model_len=10**6,
                     adapter_cache=cache)


def batch_of(sched, plan):
    """(request idx, tokens) in running order, decode-group members included."""
    return sorted(((r.idx, n) for r, n in sched.batch(plan)), key=lambda x: x[0])


def step(sched, now=0.0):
    plan = sched.schedule(now)
    done = sched.finish_step(plan, now + 1.0)
    return plan, done


def test_skip_rule_lets_later_requests_pass():
    s = make_sched(max_loras=1, budget=100)
    a = Request(0, 0, 0.0, 0, 10, 5)
    b = Request(1, 1, 0.0, 1, 10, 5)   # other adapter: skipped while adapter 0 runs
    c = Request(2, 2, 0.0, 0, 10, 5)   # same adapter as a: passes b
    d = Request(3, 3, 0.0, -1, 10, 5)  # base model never counts toward max_loras
    for r in (a, b, c, d):
        s.add_request(r)
    plan = s.schedule()
    assert [r.idx for r in plan.admitted] == [0, 2, 3]
    assert s.blocked == "lora"
    assert [r.idx for r in s.waiting] == [1]      # b kept its place at the head
    assert s.arrival_may_change(0) and not s.arrival_may_change(1)
    assert plan.waiting_skipped == 1              # vLLM's loop passed over b, to the end


def test_waiting_skipped_counts_what_vllm_s_loop_passes_over():
    """The feature priced as vLLM's Python scan of ``waiting``: once the step's adapters fill
    ``max_loras`` every other adapter's request is visited and put back. Counted where the
    loop ran to the queue's end (the LoRA rule) or stopped on the budget or the KV cache
    (taken as all of them ahead of the stop); none while the set has room."""
    s = make_sched(max_loras=1, budget=100)
    for i, ad in enumerate((0, 1, 2, 1, 0, 2, -1)):
        s.add_request(Request(i, i, 0.0, ad, 10, 5))
    plan = s.schedule()
    assert [r.idx for r in plan.admitted] == [0, 4, 6]
    assert plan.blocked == "lora" and plan.waiting_skipped == 4 == len(s.waiting)
    room = make_sched(max_loras=4, budget=100)
    for i in range(3):
        room.add_request(Request(i, i, 0.0, i, 10, 5))
    assert room.schedule().waiting_skipped == 0
    tight = make_sched(max_loras=1, budget=10)    # the first prompt takes the whole budget
    for i, ad in enumerate((0, 1, 0, 1, -1)):
        tight.add_request(Request(i, i, 0.0, ad, 10, 5))
    plan = tight.schedule()
    # adapter 1's two requests were passed over; adapter 0's and the base one were not
    assert plan.blocked == "budget" and plan.waiting_skipped == 2
    chunked = make_sched(max_loras=1, budget=10)   # a running prompt's chunks take it all:
    for i, ad in enumerate((0, 1)):                # the loop never starts, skips no one
        chunked.add_request(Request(i, i, 0.0, ad, 30, 5))
    first, _ = step(chunked)
    second = chunked.schedule(1.0)
    assert first.waiting_skipped == 1 and second.blocked == "budget" and not second.admitted
    assert second.waiting_skipped == 0
    roomy_budget = make_sched(max_loras=2, budget=10)
    for i, ad in enumerate((0, 1, 2)):
        roomy_budget.add_request(Request(i, i, 0.0, ad, 10, 5))
    assert roomy_budget.schedule().waiting_skipped == 0   # one adapter of two: no skip yet
    kv = make_sched(num_blocks=4, block_size=4, max_loras=1, budget=100)
    for i, ad in enumerate((0, 1, 1, 0)):
        kv.add_request(Request(i, i, 0.0, ad, 12, 5))
    plan = kv.schedule()
    assert plan.blocked == "kv" and plan.waiting_skipped == 2
    price = StepTimeModel(base={"const": 0.01, "waiting_skipped": 5e-7})
    assert price(features(plan, 16, 1)) == pytest.approx(0.01 + 2 * 5e-7)
    many = make_sched(max_loras=1, budget=100)
    for i in range(1001):
        many.add_request(Request(i, i, 0.0, 0 if i == 0 else 1, 10, 5))
    assert price(features(many.schedule(), 16, 1)) == pytest.approx(0.01 + 1000 * 5e-7)


def test_kv_failure_blocks_admission_head_of_line():
    s = make_sched(num_blocks=5, block_size=4, budget=100, max_loras=4)
    s.add_request(Request(0, 0, 0.0, -1, 12, 5))   # 3 blocks
    s.add_request(Request(1, 1, 0.0, -1, 12, 5))   # 3 more: does not fit
    s.add_request(Request(2, 2, 0.0, -1, 4, 5))    # 1 block would fit, but FCFS blocks
    plan = s.schedule()
    assert [r.idx for r in plan.admitted] == [0]
    assert s.blocked == "kv"


def test_budget_split_chunked_prefill():
    s = make_sched(budget=16, block_size=4)
    s.add_request(Request(0, 0, 0.0, -1, 40, 3))
    plans = [step(s, t)[0] for t in range(3)]
    assert [p.prefill_tokens for p in plans] == [16, 16, 8]
    # the request produced its first token at the end of the last chunk
    r = s.group.members[0]
    assert r.generated == 1 and r.first_token == 3.0


def test_running_first_then_waiting_gets_the_rest_of_the_budget():
    s = make_sched(budget=16, block_size=4, max_loras=4)
    s.add_request(Request(0, 0, 0.0, -1, 8, 10))
    step(s)  # request 0 prefilled, now decoding
    s.add_request(Request(1, 1, 1.0, -1, 40, 3))
    plan = s.schedule(1.0)
    assert plan.decode_n == 1 and plan.prefill_tokens == 15


def test_preempts_last_running_and_admits_nothing_that_step():
    # 6 blocks of 4 tokens; two requests of 12 prompt tokens fill them; decoding needs more
    s = make_sched(num_blocks=6, block_size=4, budget=100, max_loras=4)
    for i in range(2):
        s.add_request(Request(i, i, 0.0, -1, 12, 20))
    step(s)                                  # both prefilled: 3 + 3 blocks
    s.add_request(Request(2, 2, 1.0, -1, 1, 1))
    plan = s.schedule(1.0)                   # both need a 4th block: preempt the last
    assert [r.idx for r in plan.preempted] == [1]
    assert plan.admitted == []               # no admission in a step that preempted
    assert [r.idx for r in s.waiting][0] == 1  # preempted request at the head of waiting
    s.finish_step(plan, 2.0)
    r1 = next(r for r in s.waiting if r.idx == 1)
    assert r1.computed == 0 and r1.preemptions == 1 and r1.generated == 1


STEP = StepTimeModel(base={"const": 0.01, "prefill_tokens": 1e-4, "decode_tokens": 2e-4,
                           "decode_context": 1e-6, "adapters": 1e-3})


def drive_stepwise(s, reqs, step_s, max_steps=None):
    """Serve ``reqs`` through scheduler ``s`` one step at a time (no jumps), jumping idle
    time to the next arrival. Yields ``(now, plan, batch)`` before each step is finished,
    ``batch`` the step's (request idx, tokens) in running order; ``step_s(plan)`` is the
    step's duration."""
    now, nxt, steps = 0.0, 0, 0
    while True:
        while nxt < len(reqs) and reqs[nxt].arrival <= now:
            s.add_request(reqs[nxt])
            nxt += 1
        if not s.has_work():
            if nxt >= len(reqs):
                return
            now = reqs[nxt].arrival
            continue
        if max_steps is not None and steps >= max_steps:
            raise AssertionError(f"no end after {max_steps} steps (admission stuck?)")
        plan = s.schedule(now)
        order = {r.idx: r.seq for r in s.running_in_order()}
        b = batch_of(s, plan)
        b.sort(key=lambda x: order.get(x[0], 1 << 60))
        yield now, plan, b
        now += step_s(plan)
        s.finish_step(plan, now)
        steps += 1


def run_fast_stepwise(rows, loads_log=None, **kw):
    """Drive the fast scheduler one step at a time (no jumps), recording batches (and in
    ``loads_log`` each step's adapter loads)."""
    cache = AdapterCache(kw["max_loras"], kw["max_cpu_loras"])
    s = Scheduler(num_blocks=kw["num_blocks"], block_size=kw["block_size"],
                  max_num_seqs=kw["max_num_seqs"],
                  max_num_batched_tokens=kw["max_num_batched_tokens"],
                  max_loras=kw["max_loras"], max_model_len=10**9, adapter_cache=cache)
    reqs = [Request(i, i, a, ad, p, o) for i, (a, ad, p, o) in enumerate(rows)]
    batches = []
    step_s = lambda plan: STEP(features(plan, kw["max_lora_rank"], kw["max_loras"]))  # noqa: E731
    for _, plan, b in drive_stepwise(s, reqs, step_s):
        batches.append((tuple(b), tuple(r.idx for r in plan.preempted)))
        if loads_log is not None:
            loads_log.append(tuple((ld.adapter, ld.from_disk, ld.evicted_gpu, ld.evicted_host)
                                   for ld in plan.loads))
    return reqs, batches


rows_strategy = st.lists(
    st.tuples(st.floats(0, 5, allow_nan=False), st.integers(-1, 5), st.integers(1, 60),
              st.integers(1, 40)), min_size=1, max_size=40)
cfg_strategy = st.fixed_dictionaries({
    "num_blocks": st.integers(16, 80), "block_size": st.sampled_from([4, 16]),
    "max_num_seqs": st.integers(1, 12), "max_num_batched_tokens": st.integers(4, 64),
    "max_loras": st.integers(1, 3), "extra_cpu": st.integers(0, 3)})


def _normalise(rows, cfg):
    rows = sorted(rows, key=lambda r: r[0])
    kw = dict(cfg)
    kw["max_cpu_loras"] = kw["max_loras"] + kw.pop("extra_cpu")
    kw["max_lora_rank"] = 16
    # every request must fit the KV cache on its own, as vLLM guarantees at start-up
    cap = kw["num_blocks"] * kw["block_size"]
    rows = [(a, ad, min(p, cap // 2), min(o, cap // 2)) for a, ad, p, o in rows]
    return rows, kw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_strategy, cfg_strategy)
def test_fast_scheduler_matches_literal_vllm_loop(rows, cfg):
    rows, kw = _normalise(rows, cfg)
    ref, ref_batches = run_reference(rows, step_time=STEP, **kw)
    fast, fast_batches = run_fast_stepwise(rows, **kw)
    assert fast_batches == ref_batches
    for a, b in zip(ref, fast):
        assert (a.first_token, a.finish, a.preemptions) == (b.first_token, b.finish, b.preemptions)


def _twin_inputs(rows, kw, *, free_loads=True):
    """The twin's trace, config and profile for the reference's (rows, kw): step times from
    ``STEP``, KV capacity exactly the reference's, adapters named so that catalog order
    equals the reference's integer ids; loads free (as in the reference) unless told."""
    from twin.costs.first_principles import build_profile
    from twin.workload.catalog import AdapterCatalog

    prof = build_profile()
    prof.step_time = STEP
    if free_loads:
        prof.load_time.disk_s = prof.load_time.host_to_gpu_s = 0.0
        prof.load_time.disk_s_per_byte = prof.load_time.host_to_gpu_s_per_byte = 0.0
    prof.memory = _fixed_memory(kw["num_blocks"] * kw["block_size"])
    trace = pd.DataFrame({"arrival_s": [r[0] for r in rows],
                          "adapter": [f"a{r[1]}" if r[1] >= 0 else None for r in rows],
                          "prompt_tokens": [r[2] for r in rows],
                          "output_tokens": [r[3] for r in rows]})
    catalog = AdapterCatalog.uniform([f"a{i}" for i in range(6)], 16)
    cfg_obj = ServingConfig(max_loras=kw["max_loras"], max_cpu_loras=kw["max_cpu_loras"],
                            max_num_seqs=kw["max_num_seqs"],
                            max_num_batched_tokens=kw["max_num_batched_tokens"],
                            block_size=kw["block_size"],
                            max_model_len=kw["num_blocks"] * kw["block_size"])
    return trace, cfg_obj, prof, catalog


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_strategy, cfg_strategy)
def test_twin_jumps_match_literal_loop_and_conserve_requests(rows, cfg):
    """simulate() jumps over quiet decode runs; timings equal the step-by-step reference."""
    rows, kw = _normalise(rows, cfg)
    ref, _ = run_reference(rows, step_time=STEP, **kw)
    trace, cfg_obj, prof, catalog = _twin_inputs(rows, kw)
    res = simulate(trace, cfg_obj, prof, catalog)
    out = res.requests
    assert (out["status"] == "finished").all()          # conservation
    assert out["generated_tokens"].tolist() == [r[3] for r in rows]
    np.testing.assert_allclose(out["first_token_s"], [r.first_token for r in ref], rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_allclose(out["finish_s"], [r.finish for r in ref], rtol=1e-9, atol=1e-9)
    assert out["preemptions"].tolist() == [r.preemptions for r in ref]


def assert_jump_equals_stepwise(jumped, stepwise):
    """Per-request results equal (float sums of the closed form vs one step at a time);
    the jumped run's step log covers exactly the step-by-step run's steps."""
    a, b = jumped.requests, stepwise.requests
    for col in ("request_id", "status", "generated_tokens", "preemptions"):
        assert a[col].tolist() == b[col].tolist(), col
    for col in ("first_scheduled_s", "first_token_s", "finish_s"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-9, atol=1e-9, err_msg=col)
    assert jumped.summary["steps"] == stepwise.summary["steps"] == len(stepwise.steps)
    assert int(jumped.steps["steps"].sum()) == len(stepwise.steps)
    assert (stepwise.steps["steps"] == 1).all()
    for key in ("completed", "unfinished", "adapter_loads", "preemptions"):
        assert jumped.summary[key] == stepwise.summary[key], key


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_strategy, cfg_strategy, st.one_of(st.none(), st.floats(0.2, 6.0)))
def test_jumped_runs_equal_step_by_step_runs(rows, cfg, window_s):
    """``jump=False`` prices every decode step on its own: the jumped run must give the same
    per-request results and step count, here with adapter loads priced (they shape which
    steps are quiet), after-idle steps and a measurement window cutting runs short."""
    rows, kw = _normalise(rows, cfg)
    trace, cfg_obj, prof, catalog = _twin_inputs(rows, kw, free_loads=False)
    runs = [simulate(trace, cfg_obj, prof, catalog, window_s=window_s, record_steps=True,
                     jump=j) for j in (True, False)]
    assert_jump_equals_stepwise(*runs)


@pytest.mark.parametrize("seed", range(6))
def test_jumps_equal_stepping_when_the_waiting_scan_is_priced(seed):
    """With ``waiting_skipped`` priced, an arrival the waiting loop would pass over changes
    the price of the steps ahead, so it cuts a jumped run (``arrival_may_change``): the
    jumped run still equals the step-by-step one, time for time. One slot, long decodes of
    one adapter, the others' requests arriving during them (skipped: the LoRA stop), some
    runs short of KV blocks (the KV stop); priced at 1 ms per request so that a count left
    stale over a run would show."""
    rng = np.random.default_rng(seed)
    n = 40
    rows = sorted((float(t), int(a), int(p), int(o)) for t, a, p, o in zip(
        rng.uniform(0, 3, n), rng.integers(0, 4, n), rng.integers(4, 30, n),
        rng.integers(20, 120, n)))
    kw = {"num_blocks": int(rng.choice([40, 400])), "block_size": 4, "max_num_seqs": 16,
          "max_num_batched_tokens": 64, "max_loras": 1, "max_cpu_loras": 4,
          "max_lora_rank": 16}
    trace, cfg_obj, prof, catalog = _twin_inputs(rows, kw)
    prof.step_time = StepTimeModel(base={**STEP.base, "waiting_skipped": 1e-3})
    runs = [simulate(trace, cfg_obj, prof, catalog, record_steps=True, jump=j)
            for j in (True, False)]
    assert (runs[1].steps["steps"] == 1).all() and len(runs[1].steps) > 100
    assert_jump_equals_stepwise(*runs)


class _fixed_memory:
    """A memory model that yields exactly ``tokens`` KV tokens."""

    def __init__(self, tokens):
        self.tokens = tokens

    def kv_tokens(self, cfg):
        return self.tokens


def test_determinism_and_no_jump_equivalence_on_bigger_trace():
    rng = np.random.default_rng(3)
    n = 400
    trace = pd.DataFrame({"arrival_s": np.sort(rng.uniform(0, 60, n)),
                          "adapter": [f"a{i}" for i in rng.integers(0, 6, n)],
                          "prompt_tokens": rng.integers(5, 900, n),
                          "output_tokens": rng.integers(1, 300, n)})
    cfg = ServingConfig(max_loras=2, max_cpu_loras=3, max_num_seqs=64,
                        max_num_batched_tokens=1024)
    a = simulate(trace, cfg, record_steps=True)
    b = simulate(trace, cfg, record_steps=True)
    pd.testing.assert_frame_equal(a.requests, b.requests)
    # NaN-aware equality (NaN != NaN would fail, and must not be excused either)
    assert json.dumps(a.summary, sort_keys=True, default=str) == json.dumps(
        b.summary, sort_keys=True, default=str)
    assert math.isfinite(a.summary["tpot_ms"]["mean"]) and a.summary["steps"] > 0
    # the jumps did something here, and the step-by-step run agrees with them
    assert len(a.steps) < a.summary["steps"] / 2
    assert_jump_equals_stepwise(a, simulate(trace, cfg, record_steps=True, jump=False))

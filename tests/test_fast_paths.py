"""Fast paths that must answer exactly what the general code answers (issue 18's speed
work): the decode group's held blocks now and one step on, a linear step-time model's
decode runs, ``simulate``'s own driver against a ``simpy.Environment``, and the state-free
routers' whole-trace routing against their per-request ``pick``."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import simpy

from twin.config import ServingConfig
from twin.costs.profile import load_profile
from twin.costs.step_time import FEATURES, StepTimeModel, StepFeatures
from twin.errors import TwinInputError
from twin.fleet.routers import ConsistentHash, RoundRobin, StaticTable
from twin.sched.decode_group import DecodeGroup
from twin.results import crop_window
from twin.sched.request import Request
from twin.sim import simulate
from twin.sim.engine import _Clock, _result, default_catalog, run_alone
from twin.servers import build_server
from twin.workload.generate import rate_class_trace, uniform_lengths
from twin.workload.schema import read_trace

PROFILE = "llama31-8b-h100-64gb"   # a calibrated, linear step-time model
TRACES = Path(__file__).resolve().parents[1] / "traces"


@pytest.mark.parametrize("block_size", [1, 2, 16])
def test_held_blocks_now_and_next_is_held_blocks_at_both_clocks(block_size):
    rng = random.Random(block_size)
    for trial in range(200):
        g = DecodeGroup(block_size)
        g.clock = rng.randrange(0, 100)
        for j in range(rng.randrange(0, 8)):
            r = Request(j, j, 0.0, -1, rng.randrange(1, 60), 50)
            r.seq = j
            g.add(r, g.clock + rng.randrange(1, 80))
        for _ in range(3 * block_size + 2):   # every phase of the clock in a block
            assert g.held_blocks_now_and_next() == (g.held_blocks(),
                                                    g.held_blocks(g.clock + 1))
            g.clock += 1


def test_linear_decode_run_is_the_general_form_bit_for_bit():
    rng = random.Random(0)
    base = {k: rng.uniform(1e-8, 1e-2) for k in FEATURES}
    fast = StepTimeModel(base)
    general = StepTimeModel(base)
    general._linear = False   # the lines of base, memory and compute, memory/compute empty
    assert fast._linear
    for _ in range(200):
        # every feature >= 0, const 1, a decode step's large attended context
        f = StepFeatures(*(1.0 if k == "const" else rng.randrange(1, 10**6)
                           if k == "decode_context" else rng.uniform(0, 500)
                           for k in FEATURES))
        ctx, k = rng.randrange(1, 300), rng.randrange(1, 4000)
        assert fast.decode_run(f, ctx, k) == general.decode_run(f, ctx, k)
        h = rng.uniform(0.0, 5.0)
        assert fast.steps_within(f, ctx, k, h) == general.steps_within(f, ctx, k, h)


def test_linear_steps_within_at_the_run_times_themselves_is_the_bisection():
    """The closed form's bracket (``StepTimeModel._linear_bracket``) must give the
    bisection's step at the hardest horizons: a run's own times and the floats either
    side of them, for short and long runs, a slope of 0 and a slope much larger than the
    first step."""
    rng = random.Random(1)
    for trial in range(300):
        base = {k: rng.uniform(1e-8, 1e-2) for k in FEATURES}
        base["decode_context"] = rng.choice([0.0, 1e-9, rng.uniform(1e-9, 1e-6), 1e-3])
        fast = StepTimeModel(base)
        general = StepTimeModel(base)
        general._linear = False
        f = StepFeatures(*(1.0 if k == "const" else rng.randrange(1, 10**6)
                           if k == "decode_context" else rng.uniform(0, 500)
                           for k in FEATURES))
        ctx, k = rng.randrange(1, 300), rng.choice([1, 2, 3, rng.randrange(4, 10**5)])
        j = rng.randrange(1, k + 1)
        t = fast.decode_run(f, ctx, j)[0]
        for h in (t, np.nextafter(t, 0), np.nextafter(t, np.inf), t / 2, 0.0, -1.0,
                  fast.decode_run(f, ctx, k)[0] * 2, float("inf"), float("nan")):
            assert fast.steps_within(f, ctx, k, h) == general.steps_within(f, ctx, k, h)


@pytest.fixture(scope="module")
def trace():
    return rate_class_trace(8, (3.2, 1.6, 0.8), duration_s=60,
                            lengths=uniform_lengths(8, 512), seed=3)


@pytest.mark.parametrize("window_s", [None, 30.0])
def test_simulate_without_simpy_equals_the_simpy_process(trace, window_s):
    config = ServingConfig(max_loras=2, max_cpu_loras=4, max_num_seqs=32)
    res = simulate(trace, config, PROFILE, window_s=window_s, record_steps=True)
    profile = load_profile(PROFILE)
    trace = crop_window(trace, window_s)   # as simulate does
    catalog = default_catalog(trace, config)
    server = build_server(config, profile, catalog, trace=trace)
    clock = _Clock(trace, catalog, server, profile, window_s=window_s, max_in_flight=None,
                   record_steps=True, sample_dt=None, jump=True)
    env = simpy.Environment()
    env.process(clock.engine(env, None))
    env.run()
    clock.rec.sample(env.now, server.scheduler)
    ref = _result(clock, config, profile, window_s if window_s else env.now, window_s)
    pd.testing.assert_frame_equal(res.requests, ref.requests, check_exact=True)
    pd.testing.assert_frame_equal(res.timeline, ref.timeline, check_exact=True)
    pd.testing.assert_frame_equal(res.steps, ref.steps, check_exact=True)
    ref.summary["meta"], res.summary["meta"] = None, None
    assert res.summary == ref.summary


@pytest.mark.parametrize("case", ["preemptions", "prefix"])
def test_run_alone_makes_no_reference_cycles_and_restores_the_gc(trace, case):
    """``run_alone`` pauses Python's cyclic GC (``gc_paused``): sound only while an engine
    run leaves no cyclic garbage behind, through preemptions and the prefix cache too; the
    GC's state is restored after it, on or off."""
    import gc

    if case == "prefix":
        trace = read_trace(TRACES / "sessions_16lora_10min.parquet")
        trace = trace[trace["arrival_s"] <= 120].reset_index(drop=True)
        config = ServingConfig(max_loras=4, max_cpu_loras=16, max_num_seqs=32)
    else:   # a KV pool of 120 blocks: recomputations, the slow running loop
        config = ServingConfig(max_loras=2, max_cpu_loras=4, max_num_seqs=32)
    profile = load_profile(PROFILE)
    catalog = default_catalog(trace, config)

    def clock():
        server = build_server(config, profile, catalog, trace=trace,
                              num_blocks=120 if case == "preemptions" else None)
        return _Clock(trace, catalog, server, profile, window_s=None, max_in_flight=None,
                      record_steps=True, sample_dt=None, jump=True)

    run_alone(clock())   # warm: imports, caches
    gc.collect()
    gc.disable()
    try:
        c = clock()
        run_alone(c)
        assert not gc.isenabled()   # left as it was found
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0
    if case == "preemptions":
        assert c.sched.num_preemptions > 0
    else:
        assert c.out.prefix[1].sum() > 0   # prefix-cache hits
    run_alone(clock())
    assert gc.isenabled()


def test_run_alone_refuses_a_negative_wait():
    class Clock:
        @staticmethod
        def engine(env, bar):
            yield env.timeout(1.0)
            yield env.timeout(-0.5)

    with pytest.raises(ValueError, match="Negative delay"):
        run_alone(Clock())


def _one_by_one(router, ids):
    return np.array([router.pick(a, None) for a in ids], dtype=np.int64)


def test_state_free_routers_route_a_whole_trace_as_request_by_request():
    rng = np.random.default_rng(0)
    names = [f"a{i}" for i in range(6)]
    ids = rng.integers(-1, 6, size=500)
    table = pd.DataFrame({"adapter": ["a0", "a0", "a0", "a1", "a2", "a3", "a4", "a5",
                                      "a5", "(base model)"],
                          "gpu": [0, 1, 2, 1, 2, 3, 0, 2, 3, 3],
                          "weight": [0.5, 0.3, 0.2, 1, 1, 1, 1, 2.0, 1.0, 1]})
    for make in (lambda: StaticTable(table), ConsistentHash, RoundRobin):
        a, b = make().bind(4, names), make().bind(4, names)
        first = a.route_all(ids[:200])
        assert np.array_equal(first, _one_by_one(b, ids[:200]))
        # the router's state carries on as after the same picks
        assert np.array_equal(a.route_all(ids[200:]), _one_by_one(b, ids[200:]))


def test_static_route_all_refuses_the_first_adapter_without_a_row():
    table = pd.DataFrame({"adapter": ["a"], "gpu": [0], "weight": [1.0]})
    r = StaticTable(table).bind(1, ["a", "b", "c"])
    with pytest.raises(TwinInputError, match="'c' of the trace has no row"):
        r.route_all([0, 0, 2, 1, 2])

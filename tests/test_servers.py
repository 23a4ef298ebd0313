"""Server construction in one place (``twin.servers``, issue 13): both layouts built by one
function for both clocks, named step features, the scheduler's documented hooks, and the
dispatch of strategies one layer above the simulator (``twin.policies.simulate_policy``)."""

from __future__ import annotations

import pandas as pd
import pytest

import twin.servers as servers
from twin.config import ServingConfig
from twin.costs.profile import load_profile
from twin.costs.step_time import FEATURES, StepFeatures, after_idle, features
from twin.errors import TwinInputError
from twin.policies import SLoRAPolicy, simulate_policy
from twin.sched import Request, Scheduler
from twin.sched.unified_pool import SLoRAScheduler
from twin.servers import build_server, kv_capacity_tokens
from twin.sim import simulate
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import powerlaw_trace

PROFILE = load_profile()


@pytest.fixture(scope="module")
def trace():
    return powerlaw_trace(4, 3.0, alpha=0.5, duration_s=20, seed=3)


def cfg(**kw):
    base = dict(max_loras=2, max_cpu_loras=4, max_lora_rank=16, max_model_len=2048,
                max_num_seqs=64, max_num_batched_tokens=1024)
    base.update(kw)
    return ServingConfig(**base)


def catalog_of(trace, rank=8):
    return AdapterCatalog.uniform(sorted(trace["adapter"].dropna().unique()), rank)


def test_features_are_named_and_after_idle_sets_only_its_flag():
    s = Scheduler(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=256,
                  max_loras=2, max_model_len=512, adapter_cache=servers.AdapterCache(2, 4))
    s.add_request(Request(0, 0, 0.0, 1, 40, 5))
    s.add_request(Request(1, 1, 0.0, -1, 30, 5))
    plan = s.schedule()
    f = features(plan, max_lora_rank=16, max_loras=2)
    assert isinstance(f, StepFeatures) and f._fields == FEATURES
    assert (f.prefill_tokens, f.lora_token_rank, f.adapter_rank, f.lora_slots) == (70, 40 * 16,
                                                                                   16, 2)
    # vLLM's LoRA kernel grid: every token of the step (base rows too) times every slot
    assert f.lora_slot_tokens == 70 * 2
    assert features(plan, max_lora_rank=16, max_loras=8).lora_slot_tokens == 70 * 8
    base = Scheduler(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=256,
                     max_loras=2, max_model_len=512, adapter_cache=servers.AdapterCache(2, 4))
    base.add_request(Request(0, 0, 0.0, -1, 30, 5))
    assert features(base.schedule(), max_lora_rank=16, max_loras=2).lora_slot_tokens == 0
    g = after_idle(f)
    assert g.after_idle == 1.0 and f.after_idle == 0.0
    assert g._replace(after_idle=0.0) == f


def test_vllm_layout_is_the_config_and_the_profile(trace):
    c = cfg()
    parts = build_server(c, PROFILE, catalog_of(trace), trace=trace)
    assert parts.layout == "vllm" and type(parts.scheduler) is Scheduler
    assert parts.kv_tokens == kv_capacity_tokens(c, PROFILE)
    assert parts.num_blocks == parts.kv_tokens // c.block_size
    assert parts.adapter_pool(10.0) is None
    # the executor's way: the pool size it chose, no profile
    ex = build_server(c, None, catalog_of(trace), num_blocks=100, preload=[])
    assert ex.num_blocks == 100 and ex.kv_tokens == 100 * c.block_size
    # a merged replica: the vllm layout without LoRA
    m = build_server(c, PROFILE, AdapterCatalog.uniform([], 16), layout="merged")
    assert m.layout == "vllm" and not m.scheduler.enable_lora


def test_vllm_layout_refuses_what_vllm_refuses(trace):
    with pytest.raises(TwinInputError, match="enable_lora is false"):
        build_server(cfg(enable_lora=False), PROFILE, catalog_of(trace), trace=trace)
    with pytest.raises(TwinInputError, match="max_lora_rank"):
        build_server(cfg(max_lora_rank=8), PROFILE, catalog_of(trace, rank=16), trace=trace)


def test_slora_layout_counts_exact_ranks_with_the_policys_admission(trace):
    cat = catalog_of(trace, rank=8)
    parts = SLoRAPolicy(admission="on_demand").server_parts(cfg(max_lora_rank=64), PROFILE, cat)
    assert parts.layout == "slora" and isinstance(parts.scheduler, SLoRAScheduler)
    assert not parts.scheduler.conservative
    s = parts.scheduler
    for i in range(2):
        s.add_request(Request(i, i, 0.0, i, 10, 5))
    f = parts.featurize(s.schedule())
    assert (f.lora_token_rank, f.adapter_rank, f.lora_slots) == (20 * 8, 2 * 8, 2)
    assert f.lora_slot_tokens == 20 * 2   # the grid spans the batch's adapters


def test_scheduler_hook_sees_every_request_leave_the_running_set(trace):
    """``left_running`` is the documented hook S-LoRA's reservations use: it fires once per
    finish and once per preemption."""
    left = []

    class Counting(Scheduler):
        def left_running(self, r):
            left.append(r.request_id)

    # a small KV pool so that requests are preempted on the way
    c = cfg(max_num_seqs=64, max_num_batched_tokens=2048)
    cat = catalog_of(trace)
    parts = build_server(c, PROFILE, cat, trace=trace, num_blocks=140)
    parts.scheduler.__class__ = Counting
    res = simulate(trace, c, PROFILE, cat, server=parts)
    finished = int((res.requests["status"] == "finished").sum())
    assert res.summary["preemptions"] > 0
    assert len(left) == finished + res.summary["preemptions"]


def test_one_slora_server_is_the_policys_single_server_run(trace):
    """sim.simulate builds the slora layout itself; the strategy's run of one server adds
    only its deployment summary."""
    c = cfg(policy="slora")
    bare = simulate(trace, c, PROFILE)
    run = simulate_policy(trace, c, PROFILE)
    assert "deployment" not in bare.summary and run.summary["deployment"]["policy"] == "slora"
    assert bare.summary["adapter_pool"]["max_gib"] > 0
    assert {k: v for k, v in run.summary.items() if k != "deployment"} == bare.summary
    assert bare.meta["policy"] == run.meta["policy"] == "slora"
    pd.testing.assert_frame_equal(bare.requests, run.requests)


def test_simulate_policy_is_plain_simulate_for_one_vllm_server(trace):
    a = simulate(trace, cfg(), PROFILE, max_in_flight=50)
    b = simulate_policy(trace, cfg(), PROFILE, max_in_flight=50)
    assert a.summary == b.summary and "policy" not in b.meta
    two = simulate_policy(trace, cfg(), PROFILE, gpus=2)
    assert two.summary["deployment"]["gpus"] == 2
    with pytest.raises(TwinInputError, match="one vllm server"):
        simulate_policy(trace, cfg(policy="slora"), PROFILE, max_in_flight=50)


@pytest.mark.parametrize("policy", ["merged", "hybrid"])
def test_simulator_refuses_deployments_and_names_the_dispatch(trace, policy):
    with pytest.raises(TwinInputError, match="simulate_policy"):
        simulate(trace, cfg(policy=policy), PROFILE)
    assert simulate_policy(trace, cfg(policy=policy), PROFILE).meta["policy"] == policy

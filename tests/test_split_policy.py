"""The twin's ``split`` policy (Symbiosis): what reduces to vLLM, what batching, links and
fine-tuning jobs change, and that runs repeat."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twin.config import ServingConfig
from twin.costs.profile import load_profile
from twin.costs.split_costs import LINKS, Link, get_link, split_costs
from twin.costs.step_time import StepFeatures
from twin.errors import TwinInputError
from twin.policies import get_policy
from twin.sim.engine import simulate
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import powerlaw_trace

PROFILE = load_profile("llama31-8b-h100-64gb")


def _config(**kw) -> ServingConfig:
    d = dict(max_loras=4, max_cpu_loras=4, max_lora_rank=8, max_model_len=1024,
             preload_adapters=True)
    d.update(kw)
    return ServingConfig(**d)


def _trace(n_adapters=4, rate=8.0, duration=20.0, seed=0):
    t = powerlaw_trace(n_adapters, rate, alpha=1.0, duration_s=duration, seed=seed)
    return t, AdapterCatalog.uniform(sorted(t["adapter"].dropna().unique()), 8)


def _split(trace, catalog, **opts):
    return get_policy("split", **opts).simulate(trace, _config(policy="split"), PROFILE, catalog)


def test_one_client_on_a_free_link_is_the_vllm_server():
    """Base-model traffic, one client, a free link, no job: every step lasts the profile's
    step time, so admission order, token counts and every request time equal
    ``simulate(jump=False)``'s (up to the float sums of the stages)."""
    t, _ = _trace()
    t = t.assign(adapter=pd.array([None] * len(t), dtype="string"))
    ref = simulate(t, _config(), PROFILE, jump=False).requests
    got = get_policy("split", clients=1, link="free").simulate(
        t, _config(policy="split"), PROFILE).result.requests
    for col in ("status", "generated_tokens", "preemptions"):
        assert (ref[col].to_numpy() == got[col].to_numpy()).all(), col
    assert (np.argsort(ref["first_scheduled_s"].to_numpy(), kind="stable")
            == np.argsort(got["first_scheduled_s"].to_numpy(), kind="stable")).all()
    for col in ("first_scheduled_s", "first_token_s", "finish_s"):
        np.testing.assert_allclose(got[col].to_numpy(), ref[col].to_numpy(), rtol=1e-9)


def test_base_plus_local_is_the_profile_step():
    """The decomposition: base pass alone + local = the profile's step time."""
    c = split_costs(PROFILE, "free")
    f = StepFeatures(1.0, 300, 20, 20 * 400, 300 * 300, 0.0, 0, 0.0, 0, 0, 1, 0.0, 0.0)
    base = c.base.pass_time(300, 20, 21)
    assert base > 0
    assert base + c.local(f) == pytest.approx(PROFILE.step_time(f), rel=1e-12)


def test_transfer_time_falls_with_link_bandwidth():
    """At one latency a wider link moves a pass's activations faster; in a run, mean ITL
    falls as only the bandwidth grows."""
    base = split_costs(PROFILE)
    times = [type(base)(base.base, base.local, Link("x", 20e-6, bw)).pass_costs(100, 20, 21)[3]
             for bw in (1e9, 1e10, 1e11, 1e12, float("inf"))]
    assert all(a > b for a, b in zip(times, times[1:]))
    assert times[-1] == pytest.approx(20e-6 * 2 * sum(s.layers for s in base.base.stages))
    named = {k: split_costs(PROFILE, k).pass_costs(100, 20, 21)[3] for k in LINKS}
    assert named["nvlink"] < named["pcie"] < named["network"] and named["free"] == 0.0
    t, cat = _trace(duration=10.0)
    itl = [_split(t, cat, clients=2, link=Link(f"b{bw}", 20e-6, bw)).result.summary["itl_ms"]
           ["mean"] for bw in (1e9, 1e10, 1e11)]
    assert itl[0] > itl[1] > itl[2]


def test_batching_saves_base_time():
    """Two clients with the same requests at the same times move in step: each base batch
    holds both, so the base works less than the two passes would unbatched."""
    t, cat = _trace(n_adapters=1, duration=10.0)
    t = t.assign(adapter=pd.array([None] * len(t), dtype="string"))
    both = pd.concat([t.assign(client=0), t.assign(client=1)]).sort_values(
        ["arrival_s", "client"], kind="stable").reset_index(drop=True)
    both["request_id"] = np.arange(len(both))
    pol = get_policy("split", clients=2, link="free", log_batches=True)
    run = pol.simulate(both, _config(policy="split"), PROFILE)
    batches = run.result.extras["base_batches"]
    steps = run.result.extras["client_steps"]
    assert (batches["clients"] == 2).mean() > 0.9
    c = split_costs(PROFILE, "free", pol.layer_groups)
    unbatched = sum(c.base.pass_time(int(p), int(d), int(d) + (1 if p else 0))
                    for p, d in zip(steps["num_prefill_tokens"], steps["num_decode"]))
    # the clients share the base's GPU ("same"): their own (local) work queues on it too and
    # is in the batches' compute, so it is in the unbatched reference as well
    assert batches["compute_s"].sum() < 0.75 * (unbatched + steps["local_s"].sum())


def test_finetune_job_loads_the_base():
    t, cat = _trace(duration=10.0)
    plain = _split(t, cat, clients=2, link="nvlink").result.summary
    tuned = _split(t, cat, clients=2, link="nvlink", finetune_tokens_per_s=2000.0,
                   finetune_tokens_per_step=512).result.summary
    assert tuned["itl_ms"]["mean"] > plain["itl_ms"]["mean"]
    assert tuned["split"]["finetune_tokens_per_s"] == pytest.approx(2000.0, rel=0.15)
    assert "finetune_tokens_per_s" not in plain["split"]


def test_finetune_rate_is_tokens_over_the_run_and_compare_shows_it():
    """A job slower than one step per run trains one step: its rate is that step's tokens
    over the run, not over the step's own span (which read thousands of tok/s)."""
    from twin.policies.compare import compare

    t, cat = _trace(duration=10.0)
    cmp = compare(t, _config(), PROFILE, cat, policies=["vllm", "split"],
                  options={"clients": 2, "finetune_tokens_per_s": 10.0})
    s = cmp.runs["split"].result.summary
    job = s["split"]
    assert job["finetune_steps"] == 1 and job["finetune_tokens"] == 2048
    assert job["finetune_tokens_per_s"] == pytest.approx(2048 / s["duration_s"])
    assert job["finetune_target_tokens_per_s"] == 10.0
    row = cmp.table.set_index("policy")
    assert row.loc["split", "finetune_tok_per_s"] == job["finetune_tokens_per_s"]
    assert pd.isna(row.loc["vllm", "finetune_tok_per_s"])
    assert (f"fine-tuning job: 2048 tokens in 1 step(s) of 2048, "
            f"{job['finetune_tokens_per_s']:.1f} tok/s over the run (target 10)") in cmp.format()


def test_runs_repeat_and_memory_counts_the_base_once():
    t, cat = _trace(duration=10.0)
    a = _split(t, cat, clients=3, link="pcie")
    b = _split(t, cat, clients=3, link="pcie")
    pd.testing.assert_frame_equal(a.result.requests, b.result.requests)
    mem = a.memory_split()
    assert mem["weights_gib"] == pytest.approx(PROFILE.memory.weights_gib)
    one = _split(t, cat, clients=1, link="pcie").memory_split()
    assert one["weights_gib"] == pytest.approx(mem["weights_gib"])
    assert a.result.summary["deployment"]["servers"] == 3


def test_routing_by_client_column_and_bad_input():
    t, cat = _trace(duration=5.0)
    pol = get_policy("split", clients=2)
    route = pol.route(t.assign(client=np.arange(len(t)) % 2), cat)
    assert (route == np.arange(len(t)) % 2).all()
    route = pol.route(t, cat)        # adapter i of the catalog -> client i % 2
    want = [0 if pd.isna(a) else cat.adapters.index(a) % 2 for a in t["adapter"]]
    assert route.tolist() == want
    with pytest.raises(TwinInputError, match="client"):
        pol.route(t.assign(client=5), cat)
    with pytest.raises(TwinInputError, match="link"):
        get_link("carrier-pigeon")
    with pytest.raises(TwinInputError, match="device"):
        get_policy("split", devices="tpu")


def test_cpu_clients_are_slower_and_hold_their_kv_on_the_host():
    t, cat = _trace(duration=10.0)
    gpu = _split(t, cat, clients=2, link="pcie", devices="gpu")
    cpu = _split(t, cat, clients=2, link="pcie", devices="cpu")
    assert cpu.result.summary["itl_ms"]["mean"] > gpu.result.summary["itl_ms"]["mean"]
    assert gpu.gpus == 3 and cpu.gpus == 1
    assert cpu.memory_split()["kv_gib"] == 0.0


def test_split_fit_recovers_the_twins_own_costs():
    """The calibration read on the twin's own logs (the executor's columns) gives back the
    per-op base costs and the link the twin ran with."""
    from twin.calibrate.split_fit import fit_split_costs
    from twin.costs.split_costs import SplitCosts, base_costs

    tiny = load_profile("cpu-tiny")
    t = powerlaw_trace(4, 20.0, alpha=1.0, duration_s=5.0, seed=3)
    t = t.assign(prompt_tokens=(t["prompt_tokens"] % 60) + 4,
                 output_tokens=(t["output_tokens"] % 20) + 2)
    runs = []
    link = Link("pipe", 50e-6, 1e9)
    base = base_costs(tiny.model, {"const": 1e-3, "prefill_tokens": 4e-6, "decode_tokens": 4e-6,
                                   "prefill_seqs": 9e-6})
    true = SplitCosts(base, split_costs(tiny).local, link)
    for n in (1, 2):
        pol = get_policy("split", clients=n, costs=true, layer_groups=None, log_batches=True,
                         shared_compute=False)
        runs.append(pol.simulate(t, _config(policy="split", max_model_len=256), tiny).result)
    fit = fit_split_costs(runs, tiny.model)
    for i, s in enumerate(true.base.stages):
        assert fit.base.const[i] == pytest.approx(true.base.const[i], rel=0.02, abs=1e-9)
        assert fit.base.decode[i] == pytest.approx(true.base.decode[i], rel=0.02, abs=1e-12)
        assert fit.base.seq[i] == pytest.approx(true.base.seq[i], rel=0.02, abs=1e-12)
    assert fit.link.latency_s == pytest.approx(link.latency_s, rel=0.05)


def test_base_overhead_moves_time_from_the_link_to_the_base():
    """``with_base_overhead``: one client alone sees the same round trips (its requests
    take the same time), two clients queue behind each other's handling."""
    from twin.calibrate.split_fit import with_base_overhead

    t, cat = _trace(duration=5.0)
    c = split_costs(PROFILE, Link("pipe", 200e-6, 1e10))
    h = with_base_overhead(c, 300e-6)
    assert h.link.latency_s == pytest.approx(50e-6) and h.base.per_request == 300e-6

    def run(costs, n):
        return get_policy("split", clients=n, costs=costs).simulate(
            t, _config(policy="split"), PROFILE, cat).result
    one, one_h = run(c, 1), run(h, 1)
    np.testing.assert_allclose(one_h.requests["finish_s"], one.requests["finish_s"], rtol=1e-9)
    two, two_h = run(c, 2), run(h, 2)
    assert two_h.summary["split"]["base_busy_fraction"] > two.summary["split"]["base_busy_fraction"]


def test_split_fit_recovers_the_clients_waits():
    """Waits for a core added to the one-client run's base waits (a constant and a cost
    per prefill token) come back: the constant in the link's latency (a median per
    message, which a constant shifts), the per-token cost in the local model on top of
    the clean fit; without ``client_waits`` it does not."""
    from twin.calibrate.split_fit import fit_split_costs
    from twin.costs.split_costs import SplitCosts, base_costs

    tiny = load_profile("cpu-tiny")
    t = powerlaw_trace(4, 20.0, alpha=1.0, duration_s=5.0, seed=3)
    t = t.assign(prompt_tokens=(t["prompt_tokens"] % 60) + 4,
                 output_tokens=(t["output_tokens"] % 20) + 2)
    base = base_costs(tiny.model, {"const": 1e-3, "prefill_tokens": 4e-6, "decode_tokens": 4e-6,
                                   "prefill_seqs": 9e-6})
    true = SplitCosts(base, split_costs(tiny).local, Link("pipe", 50e-6, 1e9))
    runs = [get_policy("split", clients=n, costs=true, layer_groups=None, log_batches=True,
                       shared_compute=False).simulate(
        t, _config(policy="split", max_model_len=256), tiny).result for n in (1, 2)]
    clean = fit_split_costs(runs, tiny.model)
    steps = runs[0].extras["client_steps"]
    extra = 3e-4 + 5e-6 * steps["num_prefill_tokens"]
    runs[0].extras["client_steps"] = steps.assign(base_wait_s=steps["base_wait_s"] + extra,
                                                  t_end=steps["t_end"] + extra)
    got = fit_split_costs(runs, tiny.model)
    calls = len(true.base.stages)
    const = (got.local.base["const"] - clean.local.base["const"]
             + 2 * calls * (got.link.latency_s - clean.link.latency_s))
    assert const == pytest.approx(3e-4, rel=0.05)
    assert (got.local.base["prefill_tokens"] - clean.local.base["prefill_tokens"]
            == pytest.approx(5e-6, rel=0.05))
    assert got.notes["client_waits"]["prefill_tokens"] == pytest.approx(5e-6, rel=0.05)
    assert got.local.base["const"] == pytest.approx(clean.local.base["const"], rel=1e-6)
    off = fit_split_costs(runs, tiny.model, client_waits=False)
    assert off.local.base["prefill_tokens"] == pytest.approx(
        clean.local.base["prefill_tokens"], rel=0.05, abs=1e-7)
    assert off.notes["client_waits"] is None

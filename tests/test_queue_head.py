"""What held the queue (``summary["waiting_held_by"]``: the limit that kept the oldest
waiting request out, as a share of busy time; the verdict's "queue held by ..."): each of
vLLM's four limits made to bind alone is the one named, base-model requests are never
held by ``max_loras``, a light trace names none, the shares equal a tally of the step log,
a jumped run gives the step-by-step run's shares (an arrival that finds the queue empty
cuts a run), and a fleet's figure is its replicas' weighted by their busy time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twin.config import ServingConfig
from twin.fleet import simulate_fleet
from twin.results.queue_head import LIMITS, combined, main_limit
from twin.sim import simulate


def trace_of(n, span_s, prompt, output, adapters=None, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = [None] * n if adapters is None else [f"a{i % adapters}" for i in range(n)]
    return pd.DataFrame({"request_id": np.arange(n),
                         "arrival_s": np.sort(rng.uniform(0.0, span_s, n)),
                         "adapter": pd.array(names, dtype="string"),
                         "prompt_tokens": np.full(n, prompt, dtype=np.int64),
                         "output_tokens": np.full(n, output, dtype=np.int64)})


def shares_from_step_log(res) -> dict:
    """The shares recomputed from the step log (an independent tally of the same steps)."""
    steps = res.steps
    busy = steps["duration_s"].sum()
    by = steps.groupby("held")["duration_s"].sum() / busy
    name = {"lora": "max_loras", "kv": "kv_cache", "preempted": "kv_cache",
            "budget": "max_num_batched_tokens", "seqs": "max_num_seqs"}
    out = dict.fromkeys(LIMITS, 0.0)
    for reason, share in by.items():
        if reason in name:
            out[name[reason]] += share
    return out


# each limit made to bind on its own: (trace, config, the limit expected to be named)
CASES = {
    # 40 adapters, 2 slots, overload: the waiting requests belong to adapters outside the set
    "max_loras": (trace_of(1200, 60.0, 500, 200, adapters=40),
                  dict(max_loras=2, max_cpu_loras=40, max_lora_rank=16)),
    # long base-model requests at a high rate: the KV cache fills before anything else binds
    "kv_cache": (trace_of(3000, 30.0, 1000, 1500),
                 dict(max_num_seqs=2048, max_num_batched_tokens=16384, max_model_len=4096)),
    # a small token budget and long prompts: each step's chunks use it up
    "max_num_batched_tokens": (trace_of(600, 30.0, 2000, 20),
                               dict(max_num_batched_tokens=512, max_model_len=4096)),
    # four sequences at most, short requests at a high rate
    "max_num_seqs": (trace_of(1500, 30.0, 50, 200), dict(max_num_seqs=4)),
}


@pytest.mark.parametrize("limit", list(CASES))
def test_the_limit_made_to_bind_is_named(limit):
    trace, cfg = CASES[limit]
    res = simulate(trace, ServingConfig(**cfg), record_steps=True)
    s = res.summary
    shares = s["waiting_held_by"]
    assert s["starving"], (limit, s["achieved_over_offered"])
    assert main_limit(shares) == limit, shares
    assert max(shares[k] for k in LIMITS if k != limit) < shares[limit]
    assert sum(shares[k] for k in LIMITS) <= 1.0 + 1e-9
    assert shares["busy_s"] == pytest.approx(res.steps["duration_s"].sum(), rel=1e-9)
    # the recorder's running tally equals a tally of the step log
    for k, v in shares_from_step_log(res).items():
        assert shares[k] == pytest.approx(v, abs=1e-9), k
    assert f"queue held by {limit})" in res.format_summary()
    if trace["adapter"].isna().all():   # base-model requests never count against max_loras
        assert shares["max_loras"] == 0.0


def test_a_light_trace_names_no_limit():
    res = simulate(trace_of(40, 60.0, 300, 100, adapters=4),
                   ServingConfig(max_loras=4, max_cpu_loras=4))
    s = res.summary
    assert not s["starving"]
    assert all(s["waiting_held_by"][k] == 0.0 for k in LIMITS), s["waiting_held_by"]
    assert main_limit(s["waiting_held_by"]) is None
    assert "queue held by" not in res.format_summary()


@pytest.mark.parametrize("case", ["max_loras", "seqs_full_queue_empty"])
def test_a_jumped_run_gives_the_step_by_step_shares(case):
    if case == "max_loras":
        trace, cfg = CASES["max_loras"]
        trace = trace.iloc[:400]
    else:   # two long decodes fill max_num_seqs with nobody waiting; arrivals join mid-run
        trace, cfg = trace_of(60, 60.0, 100, 400, seed=5), dict(max_num_seqs=2)
    a, b = (simulate(trace, ServingConfig(**cfg), jump=j) for j in (True, False))
    assert a.summary["steps"] == b.summary["steps"]
    assert b.summary["waiting_held_by"]["max_num_seqs" if case != "max_loras" else case] > 0.1
    for k in ("busy_s", *LIMITS):
        assert a.summary["waiting_held_by"][k] == pytest.approx(
            b.summary["waiting_held_by"][k], rel=1e-9, abs=1e-12), k


def test_a_fleet_weights_its_replicas_by_busy_time():
    slot_bound, cfg = CASES["max_loras"]
    light = trace_of(30, 60.0, 300, 100, adapters=2, seed=3)
    light["adapter"] = pd.array(["b0", "b1"] * 15, dtype="string")
    trace = pd.concat([slot_bound, light]).sort_values("arrival_s", kind="stable")
    trace["request_id"] = np.arange(len(trace))
    table = pd.DataFrame({"adapter": [f"a{i}" for i in range(40)] + ["b0", "b1"],
                          "gpu": [0] * 40 + [1, 1], "weight": 1.0})
    run = simulate_fleet(trace.reset_index(drop=True), 2, "static", routing=table,
                         config=ServingConfig(**cfg))
    per = [r.summary["waiting_held_by"] for r in run.replicas]
    fleet = run.summary["waiting_held_by"]
    assert fleet == pytest.approx(combined(per))
    assert per[0]["max_loras"] > 0.5 and per[1]["max_loras"] == 0.0
    assert per[1]["max_loras"] < fleet["max_loras"] < per[0]["max_loras"]
    rows = run.summary["fleet"]["per_replica"]
    assert [r["held_by"] for r in rows] == ["max_loras", ""]


def test_twin_compare_s_skip_rule_share_is_the_time_the_queue_was_held_by_the_slots():
    """``twin compare``'s "skip rule" and "KV capacity" costs are the run's own shares of
    what held the queue (one definition for the verdict and the comparison)."""
    from twin.policies.compare import compare

    trace, cfg = CASES["max_loras"]
    cmp = compare(trace, ServingConfig(**cfg), policies=["vllm"], gpus=1)
    held = cmp.runs["vllm"].result.summary["waiting_held_by"]
    costs = cmp.costs["vllm"]
    assert costs["skip rule"] == pytest.approx(held["max_loras"], rel=1e-9)
    assert costs["KV capacity"] == pytest.approx(held["kv_cache"], abs=1e-12)
    assert cmp.table.set_index("policy").loc["vllm", "dominant_cost"].startswith("skip rule")

"""A run priced past the batches its profile's step time was fitted on says so
(``summary["extrapolated"]``, a note under the verdict, ``twin compare``'s verdict, ``twin
recommend``'s warnings): S-LoRA steps with more distinct adapters than any fitted step, a
``max_loras`` above every fitted run's. The most adapters in a step is checked where it is
known by construction (every request in one step); a profile without an extent, or one
that prices no per-adapter term, is never flagged, nor is base-model traffic for its
slots; deployments and fleets carry their servers' furthest, each with its own profile's
figure; calibration records the extent of its runs."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from twin.config import ServingConfig
from twin.costs.profile import load_profile
from twin.costs.step_time import StepTimeModel
from twin.fleet import simulate_fleet
from twin.policies.compare import compare
from twin.results.extrapolation import describe, fit_extent, fitted_extent
from twin.sim import simulate

PROFILE = "llama31-8b-h100-64gb-first-principles"   # prices adapter_rank (per adapter)


def with_extent(profile, **extent):
    prov = dict(profile.provenance)
    prov["step_time"] = {"extent": extent} if extent else {}
    return dataclasses.replace(profile, provenance=prov)


def trace_of(n=400, span_s=20.0, adapters=40, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"request_id": np.arange(n),
                         "arrival_s": np.sort(rng.uniform(0.0, span_s, n)),
                         "adapter": pd.array([f"a{i % adapters}" for i in range(n)],
                                             dtype="string"),
                         "prompt_tokens": rng.integers(50, 400, n),
                         "output_tokens": rng.integers(50, 300, n)})


def slora_config(**kw):
    return ServingConfig(policy="slora", max_lora_rank=8, max_loras=8, max_cpu_loras=40,
                         max_model_len=1024, **kw)


def all_at_once(n_adapters: int, per_adapter: int = 2) -> pd.DataFrame:
    """Short requests that all arrive at 0: the first step admits every one of them."""
    n = n_adapters * per_adapter
    return pd.DataFrame({"request_id": np.arange(n), "arrival_s": np.zeros(n),
                         "adapter": pd.array([f"a{i % n_adapters}" for i in range(n)],
                                             dtype="string"),
                         "prompt_tokens": np.full(n, 20), "output_tokens": np.full(n, 30)})


def test_the_most_adapters_in_a_step_is_counted():
    trace = all_at_once(12)
    prof = load_profile(PROFILE)
    # no slots: the first step holds all 12 adapters
    assert simulate(trace, slora_config(), prof).summary["step_adapters_max"] == 12
    # vLLM: the slots bound a step's adapters
    cfg = ServingConfig(max_loras=4, max_cpu_loras=12, max_lora_rank=8, max_model_len=1024)
    assert simulate(trace, cfg, prof).summary["step_adapters_max"] == 4
    base = trace.assign(adapter=pd.array([None] * len(trace), dtype="string"))
    assert simulate(base, cfg, prof).summary["step_adapters_max"] == 0


def test_slora_steps_past_the_fitted_adapters_are_flagged():
    trace = trace_of()
    prof = with_extent(load_profile(PROFILE), adapters=4, max_loras=8)
    res = simulate(trace, slora_config(), prof, record_steps=True)
    s = res.summary
    most = int(res.steps["adapters"].max())
    assert s["step_adapters_max"] == most
    assert most > 4
    assert s["extrapolated"] == {"step_adapters_max": most, "fitted_adapters_max": 4}
    assert "Note: outside the profile's calibration" in res.format_summary()
    assert f"up to {most} distinct adapters" in res.format_summary().replace("\n  ", " ")


@pytest.mark.parametrize("extent", [{}, {"adapters": 1000, "max_loras": 1000}])
def test_within_the_extent_or_without_one_nothing_is_flagged(extent):
    prof = with_extent(load_profile(PROFILE), **extent)
    res = simulate(trace_of(), slora_config(), prof)
    assert "extrapolated" not in res.summary
    assert "Note:" not in res.format_summary()
    assert res.summary["step_adapters_max"] > 4


def test_max_loras_above_the_fitted_runs_is_flagged_where_slots_are_priced():
    trace = trace_of(adapters=6)
    cfg = ServingConfig(max_loras=8, max_cpu_loras=8, max_lora_rank=8, max_model_len=1024)
    base = load_profile(PROFILE)
    slots = dataclasses.replace(base, step_time=StepTimeModel(
        base={"const": 0.01, "decode_tokens": 1e-4, "prefill_tokens": 1e-4,
              "lora_slots": 1e-4}))
    s = simulate(trace, cfg, with_extent(slots, adapters=16, max_loras=4)).summary
    assert s["extrapolated"] == {"max_loras": 8, "fitted_max_loras": 4}
    note = describe(s["extrapolated"])
    assert "max_loras 8 is above the fitted runs' largest (4)" in note
    assert "its per-slot step terms" in note
    # the vLLM layout's adapters past the fitted ones: flagged where a term is per adapter
    s = simulate(trace, cfg, with_extent(slots, adapters=2, max_loras=4)).summary
    assert "step_adapters_max" not in s["extrapolated"] and s["step_adapters_max"] > 2
    both = dataclasses.replace(slots, step_time=StepTimeModel(
        base={**slots.step_time.base, "adapters": 1e-4}))
    s = simulate(trace, cfg, with_extent(both, adapters=2, max_loras=4)).summary
    assert s["extrapolated"]["step_adapters_max"] == s["step_adapters_max"] > 2
    assert "its per-adapter and per-slot step terms" in describe(s["extrapolated"])
    # base-model traffic runs no LoRA kernel: its slots are not priced, nothing is flagged
    no_lora = trace.assign(adapter=pd.array([None] * len(trace), dtype="string"))
    s = simulate(no_lora, cfg, with_extent(slots, adapters=16, max_loras=4)).summary
    assert "extrapolated" not in s
    # a step time with no per-slot or per-adapter term extrapolates nothing
    flat = dataclasses.replace(base, step_time=StepTimeModel(
        base={"const": 0.01, "decode_tokens": 1e-4, "prefill_tokens": 1e-4}))
    s = simulate(trace, cfg, with_extent(flat, adapters=1, max_loras=4)).summary
    assert "extrapolated" not in s and s["step_adapters_max"] > 1


def test_a_fleet_and_a_comparison_carry_their_servers_furthest():
    trace = trace_of(n=600, adapters=60)
    prof = with_extent(load_profile(PROFILE), adapters=8, max_loras=64)
    cfg = ServingConfig(max_loras=8, max_cpu_loras=60, max_lora_rank=8, max_model_len=1024)
    run = simulate_fleet(trace, 2, "round_robin", config=cfg.replace(policy="slora"),
                         profile=prof)
    per = [r.summary for r in run.replicas if r is not None]
    assert len(per) == 2
    furthest = max(s["step_adapters_max"] for s in per)
    assert run.result.summary["step_adapters_max"] == furthest
    assert run.result.summary["extrapolated"]["step_adapters_max"] == furthest
    cmp = compare(trace, cfg, prof, policies=("vllm", "slora"), gpus=1)
    assert "Note on slora: outside the profile's calibration" in cmp.verdict
    assert "Note on vllm" not in cmp.verdict   # 8 slots, 8 adapters a step at most: inside
    ext = cmp.table.set_index("policy")["extrapolated"]   # the table (and its JSON) too
    assert ext["vllm"] is None and ext["slora"]["fitted_adapters_max"] == 8


def test_servers_combine_each_kind_with_its_own_profile_s_figure():
    from twin.results.extrapolation import combined

    far = {"step_adapters_max": 300, "fitted_adapters_max": 100}     # 3x its fit
    farther = {"step_adapters_max": 250, "fitted_adapters_max": 50}  # 5x its own
    slots = {"max_loras": 256, "fitted_max_loras": 192}
    assert combined([far, None, farther, slots]) == {**farther, **slots}
    assert combined([None, None]) is None


def test_calibration_records_the_most_adapters_a_fit_step_could_hold():
    runs = [(SimpleNamespace(max_loras=8), 20), (SimpleNamespace(max_loras=32), 10),
            (SimpleNamespace(max_loras=4), 4)]
    assert fit_extent(runs) == {"adapters": 10, "max_loras": 32}


def test_the_shipped_h100_profile_says_where_it_was_fitted():
    assert fitted_extent(load_profile("llama31-8b-h100-64gb")) == {"adapters": 192,
                                                                   "max_loras": 192}
    assert fitted_extent(load_profile(PROFILE)) is None


def test_a_recommendation_verified_past_the_calibration_warns():
    from twin.ml.recommend import recommend
    from twin.workload.generate import powerlaw_trace

    trace = powerlaw_trace(8, 4.0, alpha=1.0, duration_s=60, seed=0)
    for extent, warned in (({"adapters": 2, "max_loras": 384}, True),
                           ({"adapters": 384, "max_loras": 384}, False)):
        prof = with_extent(load_profile(PROFILE), **extent)
        rec = recommend(trace, profile=prof, max_runs=2, workers=1)
        assert rec.ok
        note = [w for w in rec.warnings if w.startswith("outside the profile's calibration")]
        assert bool(note) == warned, rec.warnings
        assert ("extrapolated" in rec.verified) == warned

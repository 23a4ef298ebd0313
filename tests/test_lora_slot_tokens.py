"""``lora_slot_tokens`` (and its capped form): the launch cost of vLLM's Triton LoRA kernel grid (a thread block per
token block and adapter slot, ``lora_shrink`` / ``lora_expand``), fitted on real vLLM runs
only; the executor's fit leaves it out and reads step logs written before it existed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from twin.calibrate.executor_fit import EXECUTOR_FEATURES, fit_measurements, step_table
from twin.calibrate.step_fit import CAPPED_GRID_TERMS, GRID_TERMS, STEP_TERMS, start_coef
from twin.costs.profile import Profile, load_profile
from twin.costs.step_time import (FEATURES, LORA_GRID_TOKEN_CAP, StepFeatures, StepTimeModel,
                                  features)
from twin.ml.queueing import prefill_s


def _steps(n: int, with_column: bool, seed: int = 0) -> pd.DataFrame:
    """A synthetic executor step log: decode and prefill steps whose duration is linear in
    a few features (``lora_slot_tokens`` present in the log or not)."""
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n):
        pre, dec = int(rng.integers(0, 64)), int(rng.integers(1, 16))
        slots = int(rng.choice([1, 4, 8]))
        f = dict.fromkeys(FEATURES, 0.0)
        f.update(const=1.0, prefill_tokens=pre, decode_tokens=dec, lora_slots=slots,
                 lora_active=1.0, lora_slot_tokens=(pre + dec) * slots)
        t = 1e-3 + 2e-5 * pre + 1e-4 * dec + 5e-5 * slots
        rows.append({"kind": "step", "key": f"c{j % 3}", "repeat": 0, "step": j, **f,
                     "duration_s": t, "load_s": 0.0})
    df = pd.DataFrame(rows)
    return df if with_column else df.drop(columns="lora_slot_tokens")


def _loads() -> pd.DataFrame:
    return pd.DataFrame({"rank": [8, 16, 32], "disk_s": [1e-3, 1.5e-3, 2.5e-3],
                         "copy_s": [1e-4, 1.5e-4, 2.5e-4]})


def test_the_executor_fit_leaves_the_grid_term_out_and_reads_old_logs():
    shape = load_profile("cpu-tiny").model
    assert "lora_slot_tokens" in FEATURES and "lora_slot_tokens" not in EXECUTOR_FEATURES
    new = fit_measurements(_steps(60, True), _loads(), shape)
    old = fit_measurements(_steps(60, False), _loads(), shape)
    assert "lora_slot_tokens" not in new.coef
    assert new.coef == pytest.approx(old.coef)
    assert new.coef["prefill_tokens"] == pytest.approx(2e-5, rel=1e-3)
    # an old log's rows group as steps without the feature
    assert (step_table(_steps(5, False))["lora_slot_tokens"] == 0).all()


def test_the_vllm_fit_prices_the_grid_only_when_asked_and_starts_it_positive():
    """The default terms leave it out (the shipped fit); opted in, it starts above 0 (the
    surrogate moves a coefficient at most x3 per iteration: from 0 it would stay there)."""
    prof = load_profile("llama31-8b-h100-64gb")
    assert "lora_slot_tokens" not in STEP_TERMS and "lora_slot_tokens" in GRID_TERMS
    assert "lora_slot_tokens" not in start_coef(prof, [], STEP_TERMS)
    assert start_coef(prof, [], GRID_TERMS)["lora_slot_tokens"] > 0
    assert start_coef(prof, [], GRID_TERMS, init={"lora_slot_tokens": 1e-9})[
        "lora_slot_tokens"] == 1e-9


def test_a_prefill_over_more_slots_costs_more_and_decode_runs_stay_closed_form():
    base = load_profile("llama31-8b-h100-64gb")
    coef = dict(base.step_time.base, lora_slot_tokens=5e-7, lora_slot_tokens_capped=1e-7)
    prof = Profile(name="grid", hardware=base.hardware, model=base.model, memory=base.memory,
                   step_time=StepTimeModel(base=coef), load_time=base.load_time,
                   provenance={})
    few, many = prefill_s(prof, 512, 2048, 16, 8), prefill_s(prof, 512, 2048, 16, 128)
    capped = min(512, LORA_GRID_TOKEN_CAP) * 1e-7
    assert many - few == pytest.approx(120 * (512 * 5e-7 + capped + coef["lora_slots"]))
    st = prof.step_time
    f0 = StepFeatures(1.0, 0, 40, 8000, 0, 40 * 16, 10, 160, 64, 1, 0, 0.0, 40 * 64, 0, 40 * 64)
    total, first, _ = st.decode_run(f0, 40, 7)
    steps = [st(f0._replace(decode_context=8000 + 40 * i)) for i in range(7)]
    assert total == pytest.approx(sum(steps)) and first == pytest.approx(steps[0])


def _plan(prefill: int, decode: int):
    """A scheduled step with ``prefill`` adapter prompt tokens and ``decode`` adapter decodes."""
    return SimpleNamespace(decode_lora=decode, prefill_lora_tokens=prefill,
                           prefill_tokens=prefill, decode_n=decode, decode_ctx=100 * decode,
                           prefill_ctx=prefill * prefill, adapters=2, prefill_n=1 if prefill else 0,
                           prefill_ctx_n=0, waiting_skipped=0)


def test_the_capped_grid_term_grows_with_a_small_step_and_stops_at_the_cap():
    """``lora_slot_tokens_capped`` = min(tokens, cap) x slots: a decode step pays per token
    and slot as the linear term does; a step past the cap pays no more (its empty blocks
    hide behind the real LoRA work); no adapter token, no grid."""
    cap = LORA_GRID_TOKEN_CAP
    small = features(_plan(0, 40), max_lora_rank=16, max_loras=64)
    assert small.lora_slot_tokens_capped == small.lora_slot_tokens == 40 * 64
    big = features(_plan(2048 - 40, 40), max_lora_rank=16, max_loras=64)
    assert big.lora_slot_tokens == 2048 * 64 and big.lora_slot_tokens_capped == cap * 64
    at_cap = features(_plan(cap - 40, 40), max_lora_rank=16, max_loras=64)
    st = StepTimeModel(base={"lora_slot_tokens_capped": 1e-7})
    assert st(big) == pytest.approx(st(at_cap)) and st(small) < st(at_cap)
    none = features(_no_lora(_plan(0, 40)), max_lora_rank=16, max_loras=64)
    assert none.lora_slot_tokens_capped == 0
    # the executor fit leaves it out, the vLLM fit opts in to it and starts it above 0
    assert "lora_slot_tokens_capped" not in EXECUTOR_FEATURES
    assert "lora_slot_tokens_capped" not in STEP_TERMS + GRID_TERMS
    assert start_coef(load_profile("llama31-8b-h100-64gb"), [],
                      CAPPED_GRID_TERMS)["lora_slot_tokens_capped"] > 0


def _no_lora(plan):
    plan.decode_lora = plan.prefill_lora_tokens = 0
    return plan

"""``adapters_squared`` and ``adapter_tokens_capped``: the LoRA kernels' blocks per active
adapter span the whole batch's tokens, so a light step's LoRA cost grows faster than its
distinct adapters. Fitted on real vLLM runs only; every hand-built step carries them."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from twin.calibrate.executor_fit import EXECUTOR_FEATURES, step_features
from twin.calibrate.step_fit import STEP_TERMS, start_coef
from twin.calibrate.step_terms import ADAPTER_PAIR_TERMS
from twin.costs.profile import Profile, load_profile
from twin.costs.step_time import (FEATURES, LORA_GRID_TOKEN_CAP, StepTimeModel,
                                  derived_features, features)
from twin.ml.queueing import prefill_s


def _plan(prefill: int, decode: int, adapters: int):
    return SimpleNamespace(decode_lora=decode, prefill_lora_tokens=prefill,
                           prefill_tokens=prefill, decode_n=decode, decode_ctx=100 * decode,
                           prefill_ctx=prefill * prefill, adapters=adapters,
                           prefill_n=1 if prefill else 0, prefill_ctx_n=0, waiting_skipped=0)


@pytest.mark.parametrize("prefill,decode,adapters", [(0, 1, 1), (0, 40, 17), (300, 40, 8),
                                                     (2048 - 300, 300, 32), (0, 0, 0)])
def test_the_scheduler_s_features_equal_the_hand_built_ones(prefill, decode, adapters):
    """``step_features`` computes the derived features inline for speed; the hand-built
    steps use ``derived_features``: the two must agree, feature for feature."""
    f = features(_plan(prefill, decode, adapters), max_lora_rank=16, max_loras=32)
    slots = 32 if prefill + decode else 0
    for k, v in derived_features(prefill + decode, slots, adapters).items():
        assert getattr(f, k) == pytest.approx(v), k
    assert f.adapters_squared == adapters ** 2
    assert f.adapter_tokens_capped == adapters * min(prefill + decode, LORA_GRID_TOKEN_CAP)


def test_the_squared_term_charges_a_light_step_by_its_adapters_not_its_slots():
    st = StepTimeModel(base={"const": 0.01, "adapters": 3e-4, "adapters_squared": 2e-6})
    few, many = (st(features(_plan(0, 64, a), 16, 128)) for a in (4, 64))
    assert few == pytest.approx(0.01 + 4 * 3e-4 + 16 * 2e-6)
    assert many == pytest.approx(0.01 + 64 * 3e-4 + 64 ** 2 * 2e-6)
    # the same adapters under more slots: the same price (the slots term is another term)
    assert st(features(_plan(0, 64, 64), 16, 256)) == pytest.approx(many)


def test_the_queueing_model_and_the_executor_log_reconstruction_carry_them():
    base = load_profile("llama31-8b-h100-64gb")

    def with_coef(coef):
        return Profile(name="pairs", hardware=base.hardware, model=base.model,
                       memory=base.memory, step_time=StepTimeModel(base=coef),
                       load_time=base.load_time, provenance={})

    plain = with_coef({"const": 0.01})
    pairs = with_coef({"const": 0.01, "adapters_squared": 1e-4})
    # one prompt of one adapter: one adapter squared per chunk
    assert prefill_s(pairs, 4096, 2048, 16, 8) - prefill_s(plain, 4096, 2048, 16, 8) == \
        pytest.approx(2 * 1e-4)
    # an executor step log's batch of a 5-token prefill chunk and a decode, 3 adapters
    trace = pd.DataFrame({"request_id": [0, 1], "prompt_tokens": [5, 4],
                          "adapter": ["a", "b"]})
    steps = pd.DataFrame({"batch_request_ids": [[1], [0, 1]], "batch_tokens": [[4], [5, 1]],
                          "batch_adapters": [1, 3], "after_idle": [True, False]})
    row = dict(zip(FEATURES, step_features(steps, trace, max_lora_rank=8, max_loras=4)[1]))
    assert (row["prefill_tokens"], row["decode_tokens"]) == (5, 1)
    assert row["adapters_squared"] == 9 and row["adapter_tokens_capped"] == 3 * 6


def test_the_vllm_fit_prices_them_when_asked_and_the_executor_fit_leaves_them_out():
    for k in ("adapters_squared", "adapter_tokens_capped"):
        assert k not in STEP_TERMS and k not in EXECUTOR_FEATURES
    assert "adapters_squared" in ADAPTER_PAIR_TERMS
    prof = load_profile("llama31-8b-h100-64gb")
    assert start_coef(prof, [], ADAPTER_PAIR_TERMS)["adapters_squared"] > 0

"""``tokens_past_ridge``: a step's dense layers read the weights once whatever the batch
(a per-step cost) until the batch's FLOPs take longer than that read; past the ridge every
further token costs its FLOPs. Fitted on real vLLM runs only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from twin.calibrate.executor_fit import EXECUTOR_FEATURES
from twin.calibrate.step_fit import RIDGE_TERMS, STEP_TERMS, start_coef
from twin.costs.profile import Profile, load_profile
from twin.costs.step_time import (DENSE_RIDGE_TOKENS, StepTimeModel, features, past_ridge)
from twin.ml.queueing import prefill_s


def _plan(prefill: int, decode: int):
    return SimpleNamespace(decode_lora=decode, prefill_lora_tokens=prefill,
                           prefill_tokens=prefill, decode_n=decode, decode_ctx=100 * decode,
                           prefill_ctx=prefill * prefill, adapters=2,
                           prefill_n=1 if prefill else 0, prefill_ctx_n=0, waiting_skipped=0)


def _with(coef: dict) -> Profile:
    base = load_profile("llama31-8b-h100-64gb")
    return Profile(name="ridge", hardware=base.hardware, model=base.model, memory=base.memory,
                   step_time=StepTimeModel(base=coef), load_time=base.load_time, provenance={})


@pytest.mark.parametrize("prefill,decode", [(0, 1), (0, 40), (DENSE_RIDGE_TOKENS - 40, 40),
                                            (DENSE_RIDGE_TOKENS, 1), (2048 - 300, 300)])
def test_the_feature_counts_the_tokens_beyond_the_ridge_prefill_and_decode_alike(prefill, decode):
    f = features(_plan(prefill, decode), max_lora_rank=16, max_loras=8)
    assert f.tokens_past_ridge == max(0, prefill + decode - DENSE_RIDGE_TOKENS)
    assert f.tokens_past_ridge == past_ridge(prefill + decode)


def test_a_step_below_the_ridge_costs_no_token_work_and_one_past_it_per_token():
    st = StepTimeModel(base={"const": 0.01, "tokens_past_ridge": 3e-5})
    price = [st(features(_plan(p, 16), 16, 8)) for p in (0, 200, DENSE_RIDGE_TOKENS - 16,
                                                         DENSE_RIDGE_TOKENS + 84, 2048 - 16)]
    assert price[0] == price[1] == price[2] == pytest.approx(0.01)
    assert price[3] == pytest.approx(0.01 + 100 * 3e-5)
    assert price[4] == pytest.approx(0.01 + (2048 - DENSE_RIDGE_TOKENS) * 3e-5)


def test_a_long_prompt_pays_the_ridge_term_in_the_queueing_model_too():
    """``twin.ml.queueing`` builds its steps by hand: the term must reach it."""
    plain = _with({"const": 0.01, "prefill_tokens": 1e-5})
    ridge = _with({"const": 0.01, "prefill_tokens": 1e-5, "tokens_past_ridge": 3e-5})
    assert prefill_s(ridge, 256, 2048, 16, 8) == pytest.approx(prefill_s(plain, 256, 2048, 16, 8))
    extra = prefill_s(ridge, 2048, 2048, 16, 8) - prefill_s(plain, 2048, 2048, 16, 8)
    assert extra == pytest.approx((2048 - DENSE_RIDGE_TOKENS) * 3e-5)


def test_a_run_of_large_decode_steps_stays_closed_form():
    st = StepTimeModel(base={"const": 0.01, "decode_tokens": 1e-6, "decode_context": 5e-8,
                             "tokens_past_ridge": 3e-5})
    f0 = features(_plan(0, DENSE_RIDGE_TOKENS + 88), 16, 8)
    assert f0.tokens_past_ridge == 88
    total, first, _ = st.decode_run(f0, f0.decode_tokens, 9)
    steps = [st(f0._replace(decode_context=f0.decode_context + f0.decode_tokens * i))
             for i in range(9)]
    assert total == pytest.approx(sum(steps)) and first == pytest.approx(steps[0])


def test_the_vllm_fit_prices_it_when_asked_and_the_executor_fit_leaves_it_out():
    """Opted in, it starts above 0 (the surrogate moves a coefficient at most x3 per
    iteration: from 0 it would stay there)."""
    assert "tokens_past_ridge" not in STEP_TERMS and "tokens_past_ridge" in RIDGE_TERMS
    assert "tokens_past_ridge" not in EXECUTOR_FEATURES
    prof = load_profile("llama31-8b-h100-64gb")
    assert "tokens_past_ridge" not in start_coef(prof, [], STEP_TERMS)
    assert start_coef(prof, [], RIDGE_TERMS)["tokens_past_ridge"] > 0

"""The per-kind PEFT cost terms (twin.costs.peft_costs): pure arithmetic, no torch."""

from __future__ import annotations

import pytest

from twin.costs.peft_costs import (IA3, LORA, PEFT_KINDS, PREFIX_TUNING, PROMPT_TUNING,
                                   module_dims, peft_cost, peft_cost_from_config)
from twin.costs.profile import load_profile
from twin.errors import TwinInputError

MODEL = load_profile().model     # Llama-3.1-8B, bf16


def test_lora_bytes_match_the_profiles_adapter_bytes_and_scale_with_rank():
    for r in (8, 16, 64):
        c = peft_cost(MODEL, LORA, rank=r)
        assert c.adapter_bytes == MODEL.adapter_bytes(r)
        assert c.flops_per_token == 2 * c.adapter_bytes / MODEL.dtype_bytes
        assert c.extra_prefill_tokens == c.extra_context_tokens == c.kv_bytes_per_request == 0
    qv = peft_cost(MODEL, LORA, rank=8, target_modules=["q_proj", "v_proj"])
    d = module_dims(MODEL)
    assert qv.adapter_bytes == MODEL.layers * 8 * (sum(d["q_proj"]) + sum(d["v_proj"])) * 2


def test_ia3_is_tiny_and_scales_k_v_outputs_and_the_down_input():
    c = peft_cost(MODEL, IA3)
    kv = MODEL.kv_heads * MODEL.head_dim
    assert c.adapter_bytes == MODEL.layers * (2 * kv + MODEL.intermediate) * MODEL.dtype_bytes
    assert c.flops_per_token == c.adapter_bytes / MODEL.dtype_bytes
    assert c.flops_per_token < peft_cost(MODEL, LORA, rank=8).flops_per_token / 50
    assert c.extra_context_tokens == 0


def test_prefix_adds_context_and_prompt_adds_prefill_too():
    pre = peft_cost(MODEL, PREFIX_TUNING, virtual_tokens=20)
    pro = peft_cost(MODEL, PROMPT_TUNING, virtual_tokens=20)
    for c in (pre, pro):
        assert c.extra_context_tokens == c.virtual_tokens == 20
        assert c.kv_bytes_per_request == 20 * MODEL.kv_bytes_per_token
        assert c.attention_flops_per_token == 4 * MODEL.layers * MODEL.heads * MODEL.head_dim * 20
        assert c.flops_per_token == 0
    assert pre.extra_prefill_tokens == 0 and pro.extra_prefill_tokens == 20
    # prefix stores keys and values of every layer; prompt one embedding per virtual token
    assert pre.adapter_bytes == pre.kv_bytes_per_request
    assert pro.adapter_bytes == 20 * MODEL.hidden * MODEL.dtype_bytes
    assert peft_cost(MODEL, PREFIX_TUNING, virtual_tokens=40).attention_flops_per_token == (
        2 * pre.attention_flops_per_token)


def test_costs_from_adapter_configs():
    assert peft_cost_from_config(MODEL, {"peft_type": "LORA", "r": 16}) == peft_cost(
        MODEL, LORA, rank=16)
    assert peft_cost_from_config(MODEL, {"r": 8, "target_modules": ["q_proj"]}) == peft_cost(
        MODEL, LORA, rank=8, target_modules=["q_proj"])
    assert peft_cost_from_config(MODEL, {
        "peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"]}) == peft_cost(MODEL, IA3)
    assert peft_cost_from_config(MODEL, {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 7}
                                 ).extra_prefill_tokens == 7
    assert peft_cost_from_config(MODEL, {"peft_type": "LORA", "r": 8,
                                         "target_modules": "q_proj|v_proj"}) == peft_cost(
        MODEL, LORA, rank=8)


@pytest.mark.parametrize("kind,kw,msg", [
    ("LOHA", {}, "unknown PEFT kind 'LOHA'"),
    (PREFIX_TUNING, {}, "num_virtual_tokens >= 1"),
    (LORA, {"rank": 0}, "rank >= 1"),
    (IA3, {"target_modules": ["lm_head"]}, "not among the linear modules"),
])
def test_bad_input_is_named(kind, kw, msg):
    with pytest.raises(TwinInputError, match=msg):
        peft_cost(MODEL, kind, **kw)


def test_every_kind_is_priced():
    assert {peft_cost(MODEL, k, rank=8, virtual_tokens=4).kind for k in PEFT_KINDS} == set(
        PEFT_KINDS)


def test_catalog_kinds_rank_zero_only_for_non_lora_and_vllm_refuses_them():
    """A catalog's ``kind`` column: rank 0 is allowed for non-LoRA kinds only; unknown kinds
    are refused naming the row; vLLM's server (LoRA only) refuses a trace that names a
    non-LoRA adapter, a split client (any_peft_kind) serves it."""
    import pandas as pd
    import pytest as _pytest

    from twin.errors import TwinInputError
    from twin.workload.catalog import AdapterCatalog

    ok = AdapterCatalog(pd.DataFrame({"adapter": ["a", "b"], "rank": [8, 0],
                                      "kind": ["LORA", "ia3"]}))
    assert ok.kind("b") == IA3 and ok.kind("a") == LORA
    with _pytest.raises(TwinInputError) as e:
        AdapterCatalog(pd.DataFrame({"adapter": ["a"], "rank": [0], "kind": ["LORA"]}))
    assert e.value.field == "rank"
    with _pytest.raises(TwinInputError) as e:
        AdapterCatalog(pd.DataFrame({"adapter": ["a", "b"], "rank": [8, 8],
                                     "kind": ["LORA", "ADAPTER_V2"]}))
    assert e.value.field == "kind" and e.value.row == 1
    with _pytest.raises(TwinInputError):
        AdapterCatalog(pd.DataFrame({"adapter": ["a"], "rank": [0]}))   # LoRA by default
    trace = pd.DataFrame({"adapter": ["a", "b"]})
    with _pytest.raises(TwinInputError) as e:
        ok.check(trace, 16)
    assert e.value.field == "kind" and "split" in str(e.value)
    ok.check(trace, 16, lora_only=False)

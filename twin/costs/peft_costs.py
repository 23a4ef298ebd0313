"""What each PEFT method costs per token, beside the base model (pure Python, no torch).

Split execution (issue 19) serves LoRA, IA³, prefix tuning and prompt tuning side by side;
each adds different work to a request, and the twin's ``split`` policy prices them here:

- **LoRA**: a shrink and an expand matmul per target module: ``2 * rank * (in + out)``
  FLOPs per token and module; ``rank * (in + out)`` weights per module.
- **IA³**: one learned vector per target module, multiplied elementwise into its output
  (k_proj, v_proj) or its input (down_proj): one FLOP per element, negligible beside the
  GEMMs; the vectors are the whole adapter.
- **Prefix tuning**: ``virtual_tokens`` keys and values per layer ahead of every
  sequence: no extra tokens to compute, but every token attends over ``virtual_tokens``
  more context (``4 * heads * head_dim`` FLOPs per layer and context token: QK^T and PV)
  and the KV cache holds them (``virtual_tokens`` more KV tokens per request).
- **Prompt tuning**: ``virtual_tokens`` learned embeddings prefilled ahead of the prompt:
  that many more prefill tokens through the whole model, and as much more context.

The kinds are PEFT's ``peft_type`` names; ``twin.executor.peft_methods`` implements them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from twin.costs.profile import ModelShape
from twin.errors import TwinInputError
# the kind names belong to the catalog (its ``kind`` column); re-exported for the executor
from twin.workload.catalog import (IA3, LORA, PEFT_KINDS, PREFIX_TUNING,  # noqa: F401
                                   PROMPT_TUNING)
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IA3_DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")     # PEFT's default for Llama
IA3_FEEDFORWARD = ("down_proj",)     # the modules whose *input* IA³ scales (PEFT's default)


@dataclass(frozen=True)
class PeftCost:
    """One adapter's costs beside the base model.

    ``extra_prefill_tokens``: tokens each request prefills beyond its prompt (prompt
    tuning); ``extra_context_tokens``: tokens each request's attention and KV cache hold
    beyond its own (prefix and prompt tuning); ``adapter_bytes``: the adapter's weights;
    ``flops_per_token``: the adapter's own FLOPs per token it processes (LoRA matmuls, IA³
    scalings); ``attention_flops_per_token``: the extra attention FLOPs per token over the
    ``extra_context_tokens``; ``kv_bytes_per_request``: the KV cache those take.
    """

    kind: str
    virtual_tokens: int
    extra_prefill_tokens: int
    extra_context_tokens: int
    adapter_bytes: int
    flops_per_token: float
    attention_flops_per_token: float
    kv_bytes_per_request: int


def module_dims(model: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear module of one layer."""
    h, q = model.hidden, model.heads * model.head_dim
    kv, i = model.kv_heads * model.head_dim, model.intermediate
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _targets(kind: str, target_modules: Iterable[str] | None) -> tuple[str, ...]:
    default = LINEAR_MODULES if kind == LORA else IA3_DEFAULT_TARGETS
    mods = tuple(default if target_modules is None else target_modules)
    bad = [m for m in mods if m not in LINEAR_MODULES]
    if bad:
        raise TwinInputError(f"{kind} target modules {bad} are not among the linear modules "
                             f"{list(LINEAR_MODULES)}", field="target_modules")
    return mods


def peft_cost(model: ModelShape, kind: str, *, rank: int = 0, virtual_tokens: int = 0,
              target_modules: Iterable[str] | None = None,
              feedforward_modules: Iterable[str] = IA3_FEEDFORWARD) -> PeftCost:
    """The costs of one adapter of ``kind`` on ``model`` (weights of ``model.dtype_bytes``).

    ``rank``: LoRA's r; ``virtual_tokens``: prefix/prompt tuning's num_virtual_tokens;
    ``target_modules``: LoRA's (default all seven linear modules) or IA³'s (default k_proj,
    v_proj, down_proj), with IA³'s ``feedforward_modules`` scaled on their input.
    """
    kind = str(kind).upper()
    if kind not in PEFT_KINDS:
        raise TwinInputError(f"unknown PEFT kind {kind!r}; expected one of {list(PEFT_KINDS)}",
                             field="peft_type")
    prompt_learning = kind in (PREFIX_TUNING, PROMPT_TUNING)
    if prompt_learning and virtual_tokens < 1:
        raise TwinInputError(f"{kind} needs num_virtual_tokens >= 1, got {virtual_tokens}",
                             field="num_virtual_tokens")
    if kind == LORA and rank < 1:
        raise TwinInputError(f"LoRA needs a rank >= 1, got {rank}", field="r")
    L, b = model.layers, model.dtype_bytes
    kv_size = model.kv_heads * model.head_dim
    dims = module_dims(model)
    elems = flops = 0.0
    if kind == LORA:
        elems = L * rank * sum(sum(dims[m]) for m in _targets(kind, target_modules))
        flops = 2.0 * elems                   # shrink + expand: one MAC per weight
    elif kind == IA3:
        ff = set(feedforward_modules)
        elems = L * sum(dims[m][0] if m in ff else dims[m][1]
                        for m in _targets(kind, target_modules))
        flops = elems                         # one multiply per scaled element
    elif kind == PREFIX_TUNING:
        elems = virtual_tokens * L * 2 * kv_size
    else:
        elems = virtual_tokens * model.hidden
    extra_ctx = virtual_tokens if prompt_learning else 0
    return PeftCost(
        kind=kind, virtual_tokens=extra_ctx,
        extra_prefill_tokens=virtual_tokens if kind == PROMPT_TUNING else 0,
        extra_context_tokens=extra_ctx, adapter_bytes=int(elems * b),
        flops_per_token=float(flops),
        attention_flops_per_token=4.0 * L * model.heads * model.head_dim * extra_ctx,
        kv_bytes_per_request=extra_ctx * model.kv_bytes_per_token)


def peft_cost_from_config(model: ModelShape, adapter_config: dict) -> PeftCost:
    """:func:`peft_cost` of an adapter from its ``adapter_config.json`` (as a dict): kind
    from ``peft_type``, ``r``, ``num_virtual_tokens``, ``target_modules`` (a regex string
    counts as PEFT's default for the kind) and ``feedforward_modules``."""
    kind = str(adapter_config.get("peft_type") or LORA).upper()
    targets = adapter_config.get("target_modules")
    targets = list(targets) if isinstance(targets, (list, tuple, set)) else None
    ff = adapter_config.get("feedforward_modules")
    ff = list(ff) if isinstance(ff, (list, tuple, set)) else IA3_FEEDFORWARD
    return peft_cost(model, kind, rank=int(adapter_config.get("r") or 0),
                     virtual_tokens=int(adapter_config.get("num_virtual_tokens") or 0),
                     target_modules=targets, feedforward_modules=ff)

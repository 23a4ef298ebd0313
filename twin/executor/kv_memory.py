"""How many KV blocks the executor's run gets, as vLLM sizes its cache.

Apart from the serving loop because it runs once before the server is built, and both
memory layouts (vLLM's slots, S-LoRA's unified pool) size their pool with it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from twin.config import ServingConfig
from twin.errors import ConfigError
from twin.executor.model import LlamaModel

GIB = 2 ** 30
DEFAULT_CPU_KV_GIB = 1.0   # CPU KV-cache budget when no block count is given (cf. vLLM's
                           # VLLM_CPU_KVCACHE_SPACE); capped by what the trace can use


def kv_block_bytes(model: LlamaModel, block_size: int) -> int:
    s = model.shape
    return 2 * s.layers * block_size * s.kv_size * model.embed.element_size()


def choose_num_blocks(model: LlamaModel, config: ServingConfig, trace: pd.DataFrame, *,
                      num_gpu_blocks: int | None = None, kv_cache_gib: float | None = None,
                      lora_bytes: int = 0, extra_blocks: int = 0) -> int:
    """KV blocks for the run: ``num_gpu_blocks`` if given (vLLM's override); else on CUDA
    ``util x total - allocated - activation estimate`` as vLLM does, on CPU a budget of
    ``kv_cache_gib``; never more than the trace could ever use. Refuses (ConfigError), as
    vLLM does, a cache that cannot hold one ``max_model_len`` request.
    ``extra_blocks``: pages the trace may need besides KV (slora: its adapters' pages),
    added to the cap."""
    B = config.block_size
    per_block = kv_block_bytes(model, B)
    L = config.max_model_len
    if num_gpu_blocks is not None:
        nb = int(num_gpu_blocks)
        source = f"num_gpu_blocks={nb}"
    else:
        total = np.minimum(trace["prompt_tokens"].to_numpy(np.int64)
                           + trace["output_tokens"].to_numpy(np.int64), L)
        usable = int((-(-total // B)).sum()) + 1
        usable = max(usable, -(-L // B)) + int(extra_blocks)
        if model.device.type == "cuda":
            free, total_mem = torch.cuda.mem_get_info(model.device)
            s = model.shape
            act = (config.max_num_batched_tokens * (4 * s.hidden + s.q_size + 2 * s.kv_size
                                                    + 3 * s.intermediate)
                   * model.embed.element_size() * 2
                   + config.max_num_seqs * s.vocab * 4 * 2)
            avail = (config.gpu_memory_utilization * total_mem - (total_mem - free) - act)
            source = (f"{config.gpu_memory_utilization:.2f} x {total_mem / GIB:.1f} GiB minus "
                      f"{(total_mem - free) / GIB:.2f} GiB in use minus "
                      f"{act / GIB:.2f} GiB activations")
        else:
            gib = DEFAULT_CPU_KV_GIB if kv_cache_gib is None else float(kv_cache_gib)
            avail = gib * GIB
            source = f"kv_cache_gib={gib:g}"
        nb = min(int(max(avail, 0) // per_block), usable)
    if nb * B < L:
        raise ConfigError(
            f"the KV cache holds {nb * B} tokens ({source}, {per_block} bytes per block of "
            f"{B}), fewer than one max_model_len request ({L}); vLLM refuses to start. "
            "Lower max_model_len or give more KV blocks.", file="config", field="max_model_len")
    return nb

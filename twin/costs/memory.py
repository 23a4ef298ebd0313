"""GPU memory model: how many KV-cache tokens remain once weights, LoRA slots and the
profiled activation peak are taken (vLLM ``determine_available_memory`` + ``get_num_blocks``).

``kv_tokens = floor((util·gpu_mem − weights − lora_slots − activation_peak)
/ kv_bytes_per_token / block) · block``. LoRA slot buffers are reserved at start-up for
``max_loras × max_lora_rank`` on every wrapped module, so they shrink the KV cache.

What the slot buffers cost is what PyTorch's CUDA caching allocator *reserves* for them, not
their bytes: vLLM's start-up profile counts memory the process holds beyond torch's
allocations as "non-torch" and takes it from the KV cache, and the unused tail of a segment
that holds a live buffer is exactly that. With the buffers listed tensor by tensor
(``lora_buffers``), :func:`reserved_bytes` replays the allocator's rules over them; this is
what makes (max_loras=128, rank=8), (64, 16) and (32, 32) on Llama-3.1-8B lose 0.43 GiB more
than their neighbours (8-MiB tensors two to a 20-MiB segment), within 1% of vLLM's figures
on every measured combination. Without the list the linear form
``max_loras·(rank·a + b)`` applies (fitted profiles).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import lru_cache

GIB = 2 ** 30
MIB = 2 ** 20

# PyTorch's CUDACachingAllocator constants (c10/cuda/CUDACachingAllocator.cpp, unchanged
# from torch 2.0 to 2.7): request sizes round up to 512 B; requests up to 1 MiB come from
# the small pool (2-MiB segments), larger ones below 10 MiB from 20-MiB segments, the rest
# from their own segment rounded up to 2 MiB; a free block is split when the remainder is
# >= 512 B (small pool) or > 1 MiB (large pool), else handed out whole.
_MIN_BLOCK, _SMALL, _SMALL_BUFFER, _LARGE_BUFFER, _MIN_LARGE, _ROUND_LARGE = (
    512, MIB, 2 * MIB, 20 * MIB, 10 * MIB, 2 * MIB)


def reserved_bytes(sizes) -> int:
    """Bytes the caching allocator reserves (cudaMalloc's) to hold tensors of ``sizes``
    allocated in order and never freed, starting from no free block.

    Best fit among free blocks, as PyTorch does. Nothing is freed, so every segment has at
    most one free block, its tail: one sorted list of tails per pool is the whole state.
    Ties between equal tails go to the older segment (PyTorch orders them by address).
    """
    total = 0
    tails = {False: [], True: []}    # per pool (small?): sorted [(free bytes, segment no)]
    for n, size in enumerate(sizes):
        size = max(_MIN_BLOCK, -(-int(size) // _MIN_BLOCK) * _MIN_BLOCK)
        small = size <= _SMALL
        pool = tails[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            free, seg = pool.pop(i)
        else:
            free = _SMALL_BUFFER if small else _LARGE_BUFFER if size < _MIN_LARGE else \
                -(-size // _ROUND_LARGE) * _ROUND_LARGE
            total += free
            seg = n
        rest = free - size
        if rest >= _MIN_BLOCK if small else rest > _SMALL:
            bisect.insort(pool, (rest, seg))
    return total


@lru_cache(maxsize=4096)
def _lora_reserved(buffers: tuple, max_loras: int, max_lora_rank: int) -> int:
    head, layer, layers, tail = buffers
    one = [max_loras * (max_lora_rank * a + b) for a, b in layer]
    sizes = [max_loras * (max_lora_rank * a + b) for a, b in head] + one * layers + \
            [max_loras * (max_lora_rank * a + b) for a, b in tail]
    return reserved_bytes(sizes)


@dataclass
class MemoryModel:
    gpu_memory_gib: float
    weights_gib: float
    kv_bytes_per_token: int
    lora_bytes_per_slot_rank: float   # bytes per slot per unit of max_lora_rank
    lora_bytes_per_slot: float        # rank-independent bytes per slot (extra-vocab etc.)
    activation_gib: float             # rank/slot-independent peak (non-torch + profile run)
    activation_bytes_per_seq: float = 0.0      # sampler tensors sized by max_num_seqs
    activation_bytes_per_token: float = 0.0    # forward activations per batched token
    # the slot buffers one tensor at a time, in vLLM's allocation order: {"head": [[a, b]..],
    # "layer": [[a, b]..], "layers": n, "tail": [[a, b]..]}, each tensor max_loras·(rank·a + b)
    # bytes; None: the linear form (fitted profiles, profiles written before it existed)
    lora_buffers: dict | None = None
    _key: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.lora_buffers is not None:
            lb = self.lora_buffers
            pairs = lambda k: tuple((float(a), float(b)) for a, b in lb.get(k, ()))  # noqa: E731
            self._key = (pairs("head"), pairs("layer"), int(lb.get("layers", 0)), pairs("tail"))

    def lora_bytes(self, max_loras: int, max_lora_rank: int, enable_lora: bool = True) -> float:
        """GPU bytes the LoRA slot buffers take: reserved by the allocator when the buffers
        are listed (``lora_buffers``), else ``max_loras·(rank·a + b)``."""
        if not enable_lora or max_loras <= 0:
            return 0.0
        if self._key is not None:
            return float(_lora_reserved(self._key, int(max_loras), int(max_lora_rank)))
        return max_loras * (max_lora_rank * self.lora_bytes_per_slot_rank
                            + self.lora_bytes_per_slot)

    def activation_bytes(self, max_num_seqs: int, max_num_batched_tokens: int) -> float:
        return (self.activation_gib * GIB + self.activation_bytes_per_seq * max_num_seqs
                + self.activation_bytes_per_token * max_num_batched_tokens)

    def available_bytes(self, cfg) -> float:
        return (cfg.gpu_memory_utilization * self.gpu_memory_gib * GIB
                - self.weights_gib * GIB
                - self.lora_bytes(cfg.max_loras, cfg.max_lora_rank, cfg.enable_lora)
                - self.activation_bytes(cfg.max_num_seqs, cfg.max_num_batched_tokens))

    def kv_tokens(self, cfg) -> int:
        avail = self.available_bytes(cfg)
        if avail <= 0:
            return 0
        blocks = int(avail // (self.kv_bytes_per_token * cfg.block_size))
        return blocks * cfg.block_size

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        if d["lora_buffers"] is None:   # profiles written before it existed
            del d["lora_buffers"]
        return d

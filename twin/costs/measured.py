"""Cost models that a measured run fixes: the exact KV capacity an executor run had, and
load times that are already inside its measured step durations.

Both the executor (its S-LoRA server is built from a profile of its own pool) and the
twin replaying an executor run (``twin.sim.replay``) need them, so they sit with the cost
models, below both clocks.
"""

from __future__ import annotations

from twin.costs.load_time import LoadTimeModel
from twin.costs.memory import GIB, MemoryModel


def zero_load_time() -> LoadTimeModel:
    """Loads that cost nothing apart: the measured step durations already contain them."""
    return LoadTimeModel(disk_s=0.0, disk_s_per_byte=0.0, host_to_gpu_s=0.0,
                         host_to_gpu_s_per_byte=0.0)


def exact_kv_memory(num_blocks: int, block_size: int, gpu_memory_utilization: float,
                    kv_bytes_per_token: int = 1) -> MemoryModel:
    """A memory model whose KV cache is exactly ``num_blocks`` blocks (for that utilisation).

    ``kv_bytes_per_token``: the real per-token KV bytes, so that a page's size is right for
    the ``slora`` policy (adapter pages = adapter bytes / page bytes); capacity in blocks
    does not depend on it."""
    kvb = int(kv_bytes_per_token)
    nbytes = int(num_blocks) * int(block_size) * kvb
    return MemoryModel(gpu_memory_gib=(nbytes + 0.5) / (gpu_memory_utilization * GIB),
                       weights_gib=0.0, kv_bytes_per_token=kvb, lora_bytes_per_slot_rank=0.0,
                       lora_bytes_per_slot=0.0, activation_gib=0.0)

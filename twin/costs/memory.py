"""GPU memory model: how many KV-cache tokens remain once weights, LoRA slots and the
profiled activation peak are taken (vLLM ``determine_available_memory`` + ``get_num_blocks``).

``kv_tokens = floor((util·gpu_mem − weights − lora_slots − activation_peak)
/ kv_bytes_per_token / block) · block``. LoRA slot buffers are reserved at start-up for
``max_loras × max_lora_rank`` on every wrapped module, so they shrink the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


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

    def lora_bytes(self, max_loras: int, max_lora_rank: int, enable_lora: bool = True) -> float:
        if not enable_lora:
            return 0.0
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
        return dict(self.__dict__)

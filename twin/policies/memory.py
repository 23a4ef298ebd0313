"""One server's GPU memory at start-up, as a strategy accounts it (DESIGN §2.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from twin.costs.memory import GIB


@dataclass
class MemoryPlan:
    """One server's GPU memory at start-up, in GiB (DESIGN §2.4 terms).

    ``adapters_gib`` is the static LoRA reservation (vLLM's slot buffers); a unified-pool
    server (``slora``) reserves none and its adapters take pages of ``pool_gib`` at run
    time (see ``RunMemory``). ``host_adapters_gib`` is host RAM held for adapters.
    """

    policy: str
    budget_gib: float            # gpu_memory_utilization x GPU memory x this server's share
    weights_gib: float           # base weights (a merged replica: adapter folded in, same size)
    activations_gib: float       # profiled activation peak
    adapters_gib: float          # static adapter reservation (vLLM slots); 0 for slora/merged
    pool_gib: float              # KV pool (slora: shared by KV blocks and adapter pages)
    kv_tokens: int               # KV tokens the pool holds with no adapter resident
    host_adapters_gib: float = 0.0
    adapter_pages: dict = field(default_factory=dict)   # slora: rank -> pages of one adapter

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def gib(nbytes: float) -> float:
    return float(nbytes) / GIB


def memory_plan(policy: str, config, profile, share: float, *, slots: bool,
                **extra) -> MemoryPlan:
    """One server's start-up split of ``share`` of the GPU: weights, activations, vLLM's
    LoRA slot buffers when ``slots`` (and LoRA is enabled), the KV pool from the rest.
    ``extra``: the strategy's own fields (host adapters, adapter pages)."""
    m = profile.memory
    cfg = config.replace(gpu_memory_utilization=config.gpu_memory_utilization * share)
    if not slots:
        cfg = cfg.replace(enable_lora=False)
    kv_tokens = m.kv_tokens(cfg)
    return MemoryPlan(
        policy=policy, budget_gib=cfg.gpu_memory_utilization * m.gpu_memory_gib,
        weights_gib=m.weights_gib,
        activations_gib=m.activation_bytes(config.max_num_seqs,
                                           config.max_num_batched_tokens) / GIB,
        adapters_gib=gib(m.lora_bytes(cfg.max_loras, cfg.max_lora_rank, cfg.enable_lora)),
        pool_gib=gib(kv_tokens * m.kv_bytes_per_token), kv_tokens=kv_tokens, **extra)

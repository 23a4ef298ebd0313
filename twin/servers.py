"""Server construction in one place: a serving config becomes the scheduler core a clock drives.

A *layout* is how one serving process arranges GPU memory for adapters:

- ``vllm``: ``max_loras`` LoRA slots padded to ``max_lora_rank`` reserved at start-up beside
  a separate KV pool; ``AdapterCache`` (GPU slots + host cache) and vLLM's ``Scheduler``
  with the skip rule; step features at padded ranks over ``max_loras`` slots.
- ``slora``: S-LoRA's unified pool, KV blocks and exact-rank adapter pages in one pool, no
  slots; ``UnifiedAdapterPool`` and ``SLoRAScheduler`` (``twin.sched.unified_pool``); step
  features at exact ranks. S-LoRA has no prefix cache: ``enable_prefix_caching`` applies to
  the ``vllm`` layout (and merged replicas) only.
- ``merged``: a merged replica is a plain base-model vLLM server, the ``vllm`` layout with
  ``enable_lora=False``.

Both clocks build their servers here: the twin (``twin.sim.simulate``) from a profile's
memory model, the executor (``twin.executor.engine``) with the pool size it chose for its
own model (``num_blocks``). Deployments of several servers (``twin.policies``) build each
of theirs through the twin. This module knows no clock and no policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twin.config import ServingConfig, refuse_unserved_adapters
from twin.costs.memory import GIB
from twin.costs.profile import Profile
from twin.costs.step_time import ExactRankFeatures, PaddedRankFeatures
from twin.errors import ConfigError
from twin.sched import AdapterCache, Scheduler
from twin.sched.unified_pool import SLoRAScheduler

LAYOUTS = ("vllm", "slora", "merged")
#: the layouts a config's ``policy`` names by itself (``merged`` and ``hybrid`` are
#: deployments of several servers, ``twin.policies``')
SERVER_LAYOUTS = ("vllm", "slora")


@dataclass
class ServerParts:
    """One built server: what a clock drives and prices, and what is read after the run."""

    layout: str                       # "vllm" | "slora" (a merged replica is "vllm")
    scheduler: Scheduler              # Scheduler or SLoRAScheduler
    cache: object                     # AdapterCache or UnifiedAdapterPool (in_use, acquire, ...)
    kv_tokens: int                    # tokens the (KV or unified) pool holds
    featurize: Callable               # StepPlan -> StepFeatures, at this layout's rank count
    page_bytes: int = 0               # slora: bytes of one page (a KV block)

    @property
    def num_blocks(self) -> int:
        return self.scheduler.pool.num_blocks

    def adapter_pool(self, duration: float) -> dict | None:
        """A unified pool's adapter pages over a run of ``duration`` s, in GiB (time mean
        and peak); None for a layout without one (``summary["adapter_pool"]``)."""
        if self.layout != "slora":
            return None
        sched = self.scheduler
        return {"mean_gib": sched.adapter_pages_mean(duration) * self.page_bytes / GIB,
                "max_gib": sched.cache.max_resident_pages * self.page_bytes / GIB}


def kv_capacity_tokens(config: ServingConfig, profile: Profile) -> int:
    """KV-cache tokens for this config, refusing configs vLLM refuses to start."""
    tokens = profile.memory.kv_tokens(config)
    if tokens < config.max_model_len:
        m = profile.memory
        raise ConfigError(
            f"the KV cache holds {tokens} tokens, fewer than one max_model_len request "
            f"({config.max_model_len}); vLLM refuses to start. Memory: "
            f"{config.gpu_memory_utilization:.2f} x {m.gpu_memory_gib:.2f} GiB usable, weights "
            f"{m.weights_gib:.2f} GiB, LoRA slots "
            f"{m.lora_bytes(config.max_loras, config.max_lora_rank, config.enable_lora) / 2**30:.2f} "
            f"GiB (max_loras={config.max_loras} x max_lora_rank={config.max_lora_rank}), "
            f"activations {m.activation_bytes(config.max_num_seqs, config.max_num_batched_tokens) / 2**30:.2f} GiB. "
            "Lower max_model_len, max_loras or max_lora_rank.", file="config",
            field="max_model_len")
    return tokens


def page_bytes(config: ServingConfig, profile: Profile) -> int:
    """Bytes of one page of a unified pool: one KV block."""
    return profile.memory.kv_bytes_per_token * config.block_size


def adapter_pages(rank: int, config: ServingConfig, profile: Profile) -> int:
    """Pages of a unified pool an adapter of ``rank`` takes (its exact-rank bytes)."""
    return -(-profile.model.adapter_bytes(rank) // page_bytes(config, profile))


def unified_pool_tokens(config: ServingConfig, profile: Profile) -> int:
    """Tokens of a unified pool: the memory left after weights and activations, no slots."""
    return profile.memory.kv_tokens(config.replace(enable_lora=False))


def server_kv_tokens(config: ServingConfig, profile: Profile) -> int:
    """The KV tokens the server ``config`` lays out holds (``build_server``'s): vLLM's
    pool beside its slots, or S-LoRA's unified pool."""
    if config.policy == "slora":
        return unified_pool_tokens(config, profile)
    return kv_capacity_tokens(config, profile)


def preload_ids(config: ServingConfig, catalog, lora_modules=None) -> list[int]:
    """The catalog ids a vLLM server loads at start-up with ``preload_adapters`` (none
    without): the adapters ``lora_modules`` names, else ``config.lora_modules`` (vLLM's
    ``--lora-modules``, in their order; a name the catalog lacks is not in this trace and
    is skipped), else every catalog adapter."""
    if not config.preload_adapters:
        return []
    if lora_modules is None:
        lora_modules = config.lora_modules
    if lora_modules is None:
        return list(range(len(catalog)))
    ids = {a: i for i, a in enumerate(catalog.adapters)}
    return [ids[a] for a in lora_modules if a in ids]


def build_server(config: ServingConfig, profile: Profile | None, catalog, *, trace=None,
                 trace_source: str = "trace", layout: str | None = None,
                 num_blocks: int | None = None, preload: list[int] | None = None,
                 admission: str = "conservative", any_peft_kind: bool = False) -> ServerParts:
    """The server ``config`` describes, in ``layout`` (default ``config.policy``).

    ``catalog``: adapter ids are its order (as both clocks number them). ``trace``: the
    (validated, windowed) requests it will serve, checked against what a vLLM server
    refuses (adapters without ``enable_lora``, unknown adapters, ranks over
    ``max_lora_rank``). ``num_blocks``: the pool's size when the caller chose it (the
    executor); default from ``profile``'s memory model, refusing a config the server would
    not start with. ``preload``: adapters resident at start-up (vllm; default
    :func:`preload_ids`: the config's ``lora_modules``, else every catalog adapter, when
    ``preload_adapters``). ``admission``: S-LoRA's rule (slora).
    ``any_peft_kind``: serve catalog adapters of every PEFT kind (a split client), not
    LoRA only as vLLM does.
    """
    layout = config.policy if layout is None else layout
    if layout == "merged":
        config, layout = config.replace(policy="vllm", enable_lora=False), "vllm"
    if layout == "vllm":
        return _build_vllm(config, profile, catalog, trace, trace_source, num_blocks, preload,
                           any_peft_kind)
    if layout == "slora":
        return _build_slora(config, profile, catalog, num_blocks, admission)
    raise ConfigError(f"no server layout {layout!r}; known: {LAYOUTS} (deployments of "
                      "several servers are twin.policies')", file="config", field="policy")


def _build_vllm(config, profile, catalog, trace, trace_source, num_blocks, preload,
                any_peft_kind=False):
    if trace is not None:
        refuse_unserved_adapters(config, trace, trace_source)
        catalog.check(trace, config.max_lora_rank, trace_source, lora_only=not any_peft_kind)
    if num_blocks is None:
        kv_tokens = kv_capacity_tokens(config, profile)
        num_blocks = kv_tokens // config.block_size
    else:
        kv_tokens = num_blocks * config.block_size
    if preload is None:
        preload = preload_ids(config, catalog)
    cache = AdapterCache(config.max_loras, config.max_cpu_loras, preload=preload)
    sched = Scheduler(num_blocks=num_blocks, block_size=config.block_size,
                      max_num_seqs=config.max_num_seqs,
                      max_num_batched_tokens=config.max_num_batched_tokens,
                      max_loras=config.max_loras, max_model_len=config.max_model_len,
                      adapter_cache=cache, enable_lora=config.enable_lora,
                      enable_prefix_caching=config.enable_prefix_caching)
    # vLLM's features: LoRA padded to max_lora_rank, the kernel spanning max_loras slots
    featurize = PaddedRankFeatures(config.max_lora_rank, config.max_loras)
    return ServerParts("vllm", sched, cache, kv_tokens, featurize)


def _build_slora(config, profile, catalog, num_blocks, admission):
    kv_tokens = unified_pool_tokens(config, profile) if num_blocks is None else (
        num_blocks * config.block_size)
    num_blocks = kv_tokens // config.block_size
    ranks = [int(catalog.rank(a)) for a in catalog.adapters]
    pages = [adapter_pages(r, config, profile) for r in ranks]
    need = -(-config.max_model_len // config.block_size) + max(pages, default=0)
    if num_blocks < need:
        raise ConfigError(
            f"the unified pool holds {num_blocks} blocks of {config.block_size} tokens, "
            f"fewer than one max_model_len request ({config.max_model_len} tokens) plus "
            f"the largest adapter ({max(pages, default=0)} pages); S-LoRA could not "
            "serve it. Lower max_model_len.", file="config", field="max_model_len")
    sched = SLoRAScheduler(num_blocks=num_blocks, block_size=config.block_size,
                           max_num_seqs=config.max_num_seqs,
                           max_num_batched_tokens=config.max_num_batched_tokens,
                           max_model_len=config.max_model_len, adapter_pages=pages,
                           adapter_ranks=ranks, admission=admission)
    return ServerParts("slora", sched, sched.cache, kv_tokens, ExactRankFeatures(sched.cache),
                       page_bytes=page_bytes(config, profile))


__all__ = ["LAYOUTS", "SERVER_LAYOUTS", "ServerParts", "build_server", "kv_capacity_tokens",
           "adapter_pages", "page_bytes", "unified_pool_tokens", "server_kv_tokens",
           "preload_ids"]

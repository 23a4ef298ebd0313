"""S-LoRA-style serving: unified paging of KV blocks and adapter weights (arXiv 2311.03285).

The scheduler core (``SLoRAScheduler``, ``UnifiedAdapterPool``) is in
``twin.sched.unified_pool``, the server built by ``twin.servers.build_server`` (layout
``slora``, step features at exact ranks: ``twin.costs.step_time.ExactRankFeatures``); this
module is the strategy: memory accounting and deployment. What changes against vLLM
(``twin.policies.vllm``), and nothing else:

- **Memory.** No LoRA slot buffers are reserved at start-up, so the pool is the whole
  memory left after weights and activations. An adapter in use takes
  ``ceil(adapter_bytes(exact rank) / KV block bytes)`` pages *of the same pool* as the KV
  blocks (S-LoRA: an adapter of rank r takes 4r hidden-size slots per layer); no padding
  to ``max_lora_rank``. All adapters are in host memory from start-up (S-LoRA loads them
  at launch), so a fetch is a host→GPU copy.
- **No slot count.** There is no ``max_loras`` and so no skip rule: the waiting queue is
  strict FCFS and stops at the first request that does not fit (head-of-line).
- **Admission bounded by the pool.** ``admission="conservative"`` (S-LoRA's): a request is
  admitted only if the worst case of the batch still fits, i.e. the pool holds every
  running request's final length (prompt + output, capped by ``max_model_len``), the
  adapters in use, and the newcomer's final length and adapter pages. The running batch
  then never runs out of blocks, so there are no preemptions. (S-LoRA's reference code
  refines the sum by the order in which requests finish, the peak rather than the sum of
  the final lengths, which admits somewhat more; the sum keeps admission O(1).)
  ``admission="on_demand"`` is vLLM's rule instead: the first chunk and the adapter's
  pages must fit now; shortages later preempt the last running request (recompute).
- **Adapters fetched for the batch, dropped when unused.** A request whose adapter is
  not resident pays its host→GPU copy inside the step that admits it (S-LoRA loads the
  batch's adapters before its prefill); an adapter whose last running request left is
  dropped before the next step (S-LoRA offloads adapters the running batch does not use).
- **Step cost without padding.** LoRA work is priced at the batch's exact ranks: the
  adapter-weight bytes read are the sum of the distinct adapters' ranks, and LoRA FLOPs
  use the running requests' mean rank (exact when ranks are uniform). The kernel grid
  spans the batch's adapters, not ``max_loras`` slots.

Batching is the shared chunked-prefill step (DESIGN §2.1), not S-LoRA's separate
prefill/decode steps, so a comparison with ``vllm`` isolates the memory and adapter
strategy from the batching loop.
"""

from __future__ import annotations

from twin.policies.base import Policy
from twin.policies.deployment import dynamic_deployment
from twin.policies.memory import MemoryPlan, gib, memory_plan
from twin.sched.unified_pool import ADMISSIONS
from twin.servers import ServerParts, adapter_pages, build_server


class SLoRAPolicy(Policy):
    name = "slora"
    summary = "unified paging: KV and exact-rank adapter pages share one pool, no slots"
    peft_note = "S-LoRA serves LoRA adapters only"

    def __init__(self, admission: str = "conservative"):
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
        self.admission = admission

    # -- memory ---------------------------------------------------------------------------
    def adapter_pages(self, rank: int, config, profile) -> int:
        return adapter_pages(rank, config, profile)

    def memory(self, config, profile, catalog=None, share: float = 1.0) -> MemoryPlan:
        ranks = sorted(set(catalog.table["rank"])) if catalog is not None else [config.max_lora_rank]
        host = (sum(profile.model.adapter_bytes(int(r)) for r in catalog.table["rank"])
                if catalog is not None else 0)
        return memory_plan(
            self.name, config, profile, share, slots=False, host_adapters_gib=gib(host),
            adapter_pages={int(r): self.adapter_pages(int(r), config, profile) for r in ranks})

    # -- the server -------------------------------------------------------------------------
    def server_parts(self, config, profile, catalog) -> ServerParts:
        """The unified-pool server with this strategy's admission rule."""
        return build_server(config, profile, catalog, layout="slora", admission=self.admission)

    def deploy(self, trace, config, profile, catalog, gpus=None):
        return dynamic_deployment(self, "slora", trace, gpus or 1)

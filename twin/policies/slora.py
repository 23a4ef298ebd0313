"""S-LoRA-style serving: unified paging of KV blocks and adapter weights (arXiv 2311.03285).

What changes against vLLM (``twin.policies.vllm``), and nothing else:

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

from twin.errors import ConfigError
from twin.policies.base import MemoryPlan, Policy, ServerParts, gib, memory_plan
from twin.sched.adapter_cache import AdapterLoad
from twin.sched.scheduler import BUDGET, EMPTY, KV, SEQS, Scheduler

ADMISSIONS = ("conservative", "on_demand")
NO_SLOT_LIMIT = 1 << 30


class UnifiedAdapterPool:
    """Adapter residency as pages of the KV pool (the scheduler's adapter cache).

    ``acquire``/``release`` as ``twin.sched.AdapterCache``; pages are taken from the KV
    pool when an adapter becomes resident and given back by :meth:`drop_idle`.
    """

    def __init__(self, pool, pages: list[int], ranks: list[int]):
        self.pool = pool
        self.pages = pages            # adapter id -> pages of its weights
        self.ranks = ranks            # adapter id -> exact rank
        self.in_use: dict[int, int] = {}   # adapter -> running requests
        self.resident: set[int] = set()
        self.idle: set[int] = set()        # resident, unused: dropped before the next step
        self.resident_pages = 0
        self.rank_sum = 0             # sum of ranks over adapters in use
        self.rank_weighted = 0        # sum over running LoRA requests of their rank
        self.running_lora = 0
        self.loads_from_disk = 0      # never: every adapter is in host memory from start-up
        self.loads_from_host = 0
        self.max_resident_pages = 0

    @property
    def active(self) -> dict[int, int]:
        return self.in_use

    def is_resident(self, adapter: int) -> bool:
        return adapter in self.resident

    def pages_to_load(self, adapter: int) -> int:
        """Pages the pool must give for ``adapter`` to run (0: base model or resident)."""
        if adapter < 0 or adapter in self.resident:
            return 0
        return self.pages[adapter]

    def acquire(self, adapter: int) -> AdapterLoad | None:
        n = self.in_use.get(adapter, 0)
        self.in_use[adapter] = n + 1
        rank = self.ranks[adapter]
        self.running_lora += 1
        self.rank_weighted += rank
        if n:
            return None
        self.rank_sum += rank
        if adapter in self.resident:
            self.idle.discard(adapter)
            return None
        self.resident.add(adapter)
        p = self.pages[adapter]
        self.pool.take(p)
        self.resident_pages += p
        if self.resident_pages > self.max_resident_pages:
            self.max_resident_pages = self.resident_pages
        self.loads_from_host += 1
        return AdapterLoad(adapter, False)

    def release(self, adapter: int) -> None:
        rank = self.ranks[adapter]
        self.running_lora -= 1
        self.rank_weighted -= rank
        n = self.in_use[adapter] - 1
        if n:
            self.in_use[adapter] = n
            return
        del self.in_use[adapter]
        self.rank_sum -= rank
        self.idle.add(adapter)

    def drop_idle(self) -> None:
        for a in self.idle:
            self.resident.discard(a)
            p = self.pages[a]
            self.pool.give(p)
            self.resident_pages -= p
        self.idle.clear()

    def mean_running_rank(self) -> float:
        return self.rank_weighted / self.running_lora if self.running_lora else 0.0


class SLoRAScheduler(Scheduler):
    """The shared scheduler with S-LoRA's admission over a unified pool.

    The running phase (chunked prefill, decode group, preemption) is the base class's;
    only the waiting phase, the adapter cache and the bookkeeping of reservations differ.
    """

    def __init__(self, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, adapter_pages: list[int],
                 adapter_ranks: list[int], admission: str = "conservative"):
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
        super().__init__(num_blocks=num_blocks, block_size=block_size,
                         max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens,
                         max_loras=NO_SLOT_LIMIT, max_model_len=max_model_len,
                         adapter_cache=None, enable_lora=True)
        self.cache = UnifiedAdapterPool(self.pool, adapter_pages, adapter_ranks)
        self.conservative = admission == "conservative"
        self.reserved = 0          # blocks of the running requests' final lengths
        self._t = 0.0              # adapter-page time integral (memory split)
        self.adapter_page_seconds = 0.0

    def reservation(self, r) -> int:
        """Blocks a request holds at its longest (prompt + output, capped)."""
        return self.pool.blocks_for(min(r.prompt + r.output, self.max_model_len))

    def schedule(self, now: float = 0.0):
        cache = self.cache
        self.adapter_page_seconds += cache.resident_pages * (now - self._t)
        self._t = now
        if cache.idle:
            cache.drop_idle()
        return super().schedule(now)

    def adapter_pages_mean(self, end: float) -> float:
        """Time-averaged adapter pages over [0, end]."""
        total = self.adapter_page_seconds + self.cache.resident_pages * max(end - self._t, 0.0)
        return total / end if end > 0 else 0.0

    def _admit(self, plan, budget: int, now: float) -> str:
        # vLLM's waiting loop (Scheduler._admit) without the max_loras skip rule, with the
        # adapter's pages and (conservative) the final-length reservation in the KV check
        waiting, pool, cache = self.waiting, self.pool, self.cache
        free = pool.num_blocks - pool.used - self._held_next if plan.group_decode else pool.free
        cap = pool.num_blocks
        while True:
            if self.num_running >= self.max_num_seqs:
                return SEQS
            if budget <= 0:
                return BUDGET
            if not len(waiting):
                return EMPTY
            r = waiting.first()
            pages = cache.pages_to_load(r.adapter)
            n = min(r.num_tokens, budget)
            nb = pool.blocks_for(n)
            if nb + pages > free:
                return KV
            if self.conservative:
                res = self.reservation(r)
                if self.reserved + res + cache.resident_pages + pages > cap:
                    return KV
                self.reserved += res
            waiting.pop(r)
            free -= nb + pages
            self._start_running(plan, r, n, nb, now)
            budget -= n

    def _preempt(self, r) -> None:
        if self.conservative:
            self.reserved -= self.reservation(r)
        super()._preempt(r)

    def _finish(self, r, now: float) -> None:
        if self.conservative:
            self.reserved -= self.reservation(r)
        super()._finish(r, now)


def slora_featurize(cache: UnifiedAdapterPool):
    """Step features at exact ranks (``twin.costs.step_time.FEATURES`` order)."""

    def featurize(plan) -> tuple:
        lt = plan.decode_lora + plan.prefill_lora_tokens
        return (1.0, plan.prefill_tokens, plan.decode_n, plan.decode_ctx, plan.prefill_ctx,
                lt * cache.mean_running_rank(), plan.adapters, cache.rank_sum,
                plan.adapters if lt else 0, 1 if lt else 0, plan.prefill_n, 0.0)
    return featurize


class SLoRAPolicy(Policy):
    name = "slora"
    summary = "unified paging: KV and exact-rank adapter pages share one pool, no slots"

    def __init__(self, admission: str = "conservative"):
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
        self.admission = admission

    # -- memory ---------------------------------------------------------------------------
    @staticmethod
    def block_bytes(config, profile) -> int:
        return profile.memory.kv_bytes_per_token * config.block_size

    def adapter_pages(self, rank: int, config, profile) -> int:
        b = self.block_bytes(config, profile)
        return -(-profile.model.adapter_bytes(rank) // b)

    def memory(self, config, profile, catalog=None, share: float = 1.0) -> MemoryPlan:
        ranks = sorted(set(catalog.table["rank"])) if catalog is not None else [config.max_lora_rank]
        host = (sum(profile.model.adapter_bytes(int(r)) for r in catalog.table["rank"])
                if catalog is not None else 0)
        return memory_plan(
            self.name, config, profile, share, slots=False, host_adapters_gib=gib(host),
            adapter_pages={int(r): self.adapter_pages(int(r), config, profile) for r in ranks})

    # -- the server -------------------------------------------------------------------------
    def server_parts(self, config, profile, catalog, trace=None, trace_source="trace") -> ServerParts:
        """Build the unified-pool scheduler for ``simulate(..., build_server=...)``."""
        mem = self.memory(config, profile)
        num_blocks = mem.kv_tokens // config.block_size
        ranks = [int(catalog.rank(a)) for a in catalog.adapters]
        pages = [self.adapter_pages(r, config, profile) for r in ranks]
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
                               adapter_ranks=ranks, admission=self.admission)
        return ServerParts(scheduler=sched, cache=sched.cache, kv_tokens=mem.kv_tokens,
                           featurize=slora_featurize(sched.cache))

    def deploy(self, trace, config, profile, catalog, gpus=None):
        from twin.policies.deployment import dynamic_deployment

        return dynamic_deployment(self, "slora", trace, gpus or 1)

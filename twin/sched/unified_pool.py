"""S-LoRA's scheduler core (arXiv 2311.03285): KV blocks and adapter weights in one pool.

:class:`UnifiedAdapterPool` is the adapter cache of a unified pool: an adapter in use takes
pages of the KV pool at its exact rank, fetched from host memory when it becomes resident
and given back once no running request uses it. :class:`SLoRAScheduler` is the shared
scheduler with S-LoRA's admission over that pool (strict FCFS, no ``max_loras`` skip rule,
optionally the conservative worst-case reservation); it changes only the scheduler's
documented hooks (``admit``, ``left_running``) and ``schedule``'s preamble. Why these rules
and what they model: ``twin.policies.slora``. Both clocks build it through
``twin.servers.build_server``.
"""

from __future__ import annotations

from twin.sched.adapter_cache import AdapterLoad
from twin.sched.scheduler import Scheduler
from twin.sched.step_plan import BUDGET, EMPTY, KV, SEQS

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

    def step_adapters(self) -> int:
        """The distinct adapters of the step being scheduled (``AdapterCache``'s)."""
        return len(self.in_use)

    def note_label(self, waiting_key: int) -> None:
        """No metrics labels are counted for a unified pool (S-LoRA's server has none)."""

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

    def admit(self, plan, budget: int, now: float) -> str:
        # vLLM's waiting loop (Scheduler.admit) without the max_loras skip rule, with the
        # adapter's pages and (conservative) the final-length reservation in the KV check
        waiting, pool, cache = self.waiting, self.pool, self.cache
        free = self.admission_free_blocks(plan)
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
            self.start_running(plan, r, n, nb, now)
            budget -= n

    def left_running(self, r) -> None:
        if self.conservative:   # a preempted request reserves again when readmitted
            self.reserved -= self.reservation(r)

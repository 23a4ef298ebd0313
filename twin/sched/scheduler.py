"""vLLM V1's scheduling step (``v1/core/sched/scheduler.py::Scheduler.schedule``).

Each step, with a token budget ``max_num_batched_tokens`` and at most ``max_num_seqs``
running requests:

1. Running requests in order get ``min(remaining, budget)`` tokens (chunked prefill). When
   KV blocks run out the *last* running request is preempted (recompute: blocks freed,
   computed tokens reset, put at the head of ``waiting``) until the allocation fits.
2. Only if nothing was preempted: waiting requests in FCFS order; one whose adapter is not
   among the step's adapters while ``max_loras`` are already scheduled is skipped (keeps its
   place; ``StepPlan.waiting_skipped`` counts them); a KV allocation failure stops
   admission. Base-model requests never count.

With ``enable_prefix_caching`` (vLLM V1's default) an admission first looks up the cached
prefix (``twin.sched.prefix_cache``): the hit sets its computed tokens; full blocks are cached
as scheduled (decoders' when they leave), evictable once unused. No ``hash_ids``, no hit.

The fast path covers the usual step (all decoders first, everything fits) in O(1) plus the
admissions; anything else falls back to the literal per-request loop, the reference
semantics, both checked against vLLM's loop transcribed (``tests/sched_reference.py``).
"""

from __future__ import annotations

from twin.sched.abort import Aborts
from twin.sched.adapter_cache import AdapterCache
from twin.sched.cache_leaving import CacheLeaving
from twin.sched.decode_group import DecodeGroup
from twin.sched.kv_pool import KVBlockPool
from twin.sched.prefix_cache import PrefixCache
from twin.sched.request import Request, RequestStatus, exceeds_max_model_len
from twin.sched.step_plan import BUDGET, EMPTY, KV, LORA, PREEMPTED, SEQS, StepPlan
from twin.sched.waiting_queue import WaitingQueue

WAITING, PREFILLING, DECODING, FINISHED, REJECTED, ABORTED = (
    RequestStatus.WAITING, RequestStatus.PREFILLING, RequestStatus.DECODING,
    RequestStatus.FINISHED, RequestStatus.REJECTED, RequestStatus.ABORTED)

class Scheduler(Aborts, CacheLeaving):
    def __init__(self, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_loras: int, max_model_len: int,
                 adapter_cache: AdapterCache, enable_lora: bool = True,
                 enable_prefix_caching: bool = False):
        self.pool = KVBlockPool(num_blocks, block_size)
        self.prefix = PrefixCache(self.pool) if enable_prefix_caching else None
        self.caching = False   # a prefix cache, and a request that names its tokens arrived
        self.group = DecodeGroup(block_size)
        self.waiting = WaitingQueue()
        self.prefilling: list[Request] = []   # running, not decoding, in running order
        self.cache = adapter_cache
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.max_loras = max_loras
        self.max_model_len = max_model_len
        self.enable_lora = enable_lora
        self._seq = 0
        self.blocked = EMPTY
        self.num_preemptions = 0
        self._held_next = 0   # decode group's blocks after the current step's allocation
        self.prices_skipped = False   # the step time prices waiting_skipped (set by the clock)

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.group.n + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def in_flight(self) -> int:
        """Requests running or waiting (a router's count of a replica's load)."""
        return self.group.n + len(self.prefilling) + self.waiting.n

    def kv_used_blocks(self) -> int:
        return self.pool.used + self.group.held_blocks()

    def kv_cached_blocks(self) -> int:
        """Blocks cached and evictable (free for vLLM, reusable by a hit), between steps."""
        if self.prefix is None:
            return 0
        self.prefix.sync(self.pool.num_blocks - self.kv_used_blocks())
        return self.prefix.evictable

    def has_work(self) -> bool:
        # num_running's terms, read directly: asked once per engine step
        return self.group.n > 0 or len(self.prefilling) > 0 or self.waiting.n > 0

    def computed(self, req: Request) -> int:
        return self.group.computed(req) if req.status == DECODING else req.computed

    def batch(self, plan: StepPlan) -> list[tuple[Request, int]]:
        """The step's (request, new tokens): explicit chunks in running order, then every
        decode-group member with one token (the group's order is its admission order)."""
        items = list(plan.explicit)
        if plan.group_decode:
            items += [(r, 1) for r in self.group.members.values()]
        return items

    def running_in_order(self) -> list[Request]:
        reqs = list(self.group.members.values()) + self.prefilling
        reqs.sort(key=lambda r: r.seq)
        return reqs

    # -- arrivals --------------------------------------------------------------------------
    def add_request(self, req: Request) -> bool:
        """Queue an arriving request; False (and REJECTED, its output length untouched) if
        vLLM would refuse it (``exceeds_max_model_len``)."""
        if exceeds_max_model_len(req.prompt, req.output, self.max_model_len):
            req.status = REJECTED
            return False
        if not self.enable_lora:
            req.adapter = -1
        if req.hash_ids is not None and self.prefix is not None:
            self.caching = True   # till then nothing is cached: no call is needed
        req.status = WAITING
        self.waiting.append(req)
        return True

    def arrival_may_change(self, adapter: int) -> bool:
        """Could a request arriving now change the next steps, given the blocked state (SEQS,
        BUDGET, KV persist)? With ``prices_skipped``, one the waiting loop passes over does;
        so does one that finds the queue empty (it changes what holds the queue's head)."""
        b = self.blocked
        if b == LORA:
            return adapter < 0 or adapter in self.cache.in_use or self.prices_skipped
        return (b == EMPTY or b == PREEMPTED or (b == KV and self.prices_skipped)
                or not self.waiting.n)

    # -- the step --------------------------------------------------------------------------
    def schedule(self, now: float = 0.0) -> StepPlan:
        plan = StepPlan()
        self.cache.note_label(self.waiting.adapters_key)   # the last step's metrics label
        budget, group, pool, prefilling = self.budget, self.group, self.pool, self.prefilling
        gn = group.n
        ordered = gn <= budget and (
            not prefilling or gn == 0 or group.max_seq() < prefilling[0].seq)
        if not ordered:
            budget = self._schedule_running_slow(plan, budget)
        else:
            # decoders first (one token each), then prefill chunks in running order
            held, held_next = group.held_blocks_now_and_next()
            self._held_next = held_next
            need = held_next - held  # decoders crossing into a new block
            left = budget - gn
            chunks = []
            B, max_model_len = pool.block_size, self.max_model_len
            for r in prefilling:   # r.num_tokens and pool.blocks_for written out
                if left <= 0:
                    break
                c = r.computed
                n = min(r.prompt + r.generated - c, left, max_model_len - c)
                if n <= 0:
                    continue
                nb = -(-(c + n) // B) - r.blocks
                need += nb
                chunks.append((r, n, nb))
                left -= n
            if need > pool.num_blocks - pool.used - held:
                need, chunks = self._preempt_tail(plan, need, chunks)
            if group.n:
                plan.group_decode = True
                plan.decode_n = gn = group.n
                plan.decode_ctx = group.X + gn * (group.clock + 1)   # group.context_tokens()
                plan.decode_lora = gn - group.n_base
            for r, n, nb in chunks:
                r.blocks += nb
                pool.take(nb)
                self._add_chunk(plan, r, n)
            budget = left
        # waiting phase
        self.blocked = plan.blocked = (PREEMPTED if plan.preempted
                                       else self.admit(plan, budget, now))
        if self.waiting.n:
            plan.held = self._head_held(plan.blocked)
        plan.adapters = self.cache.step_adapters()
        plan.kv_blocks = pool.used + (self._held_next if plan.group_decode else 0)
        return plan

    def _head_held(self, blocked: str) -> str:
        """What kept the oldest waiting request out (``StepPlan.held``): its adapter outside
        a full set of slots (``LORA``), else where admission stopped. Constant through a run
        of identical decode steps: arrivals join at the tail, one finding the queue empty
        cuts the run (:meth:`arrival_may_change`)."""
        a, in_use = self.waiting.first().adapter, self.cache.in_use
        full = self.enable_lora and len(in_use) >= self.max_loras
        return LORA if blocked == LORA or (full and a >= 0 and a not in in_use) else blocked

    def _preempt_tail(self, plan: StepPlan, need: int, chunks: list):
        """KV shortage: pop running requests from the tail until the rest fit. vLLM
        allocates in running order and pops ``running[-1]`` whenever an allocation fails;
        the outcome is the longest prefix whose new blocks fit in the free blocks plus those
        of the popped suffix, so popping from the tail here gives the same split in
        O(popped)."""
        group, pool = self.group, self.pool
        free = pool.num_blocks - pool.used - group.held_blocks()
        while need > free:
            if self.prefilling:
                t = self.prefilling.pop()
                if chunks and chunks[-1][0] is t:
                    need -= chunks.pop()[2]
                free += t.blocks
            else:
                t = group.members[group.max_seq()]
                held, held_next = group.held_blocks(), self._held_next
                c = group.remove(t)
                t.computed = c
                t.generated = c - t.prompt + 1
                t.blocks = 0
                now_held, self._held_next = group.held_blocks_now_and_next()
                need += (self._held_next - now_held) - (held_next - held)
                free += held - now_held
            self._preempt(t)
            if self.caching:   # blocks t shared stay held: only its own ones are free
                free = pool.num_blocks - pool.used - group.held_blocks()
            plan.preempted.append(t)
        return need, chunks

    def _add_chunk(self, plan: StepPlan, r: Request, n: int) -> None:
        plan.explicit.append((r, n))
        if r.prefix is not None:   # vLLM caches the full blocks a step will compute
            self.prefix.register(r, r.computed + n, self.admission_free_blocks(plan))
        if n == 1 and r.generated > 0 and r.computed + 1 == r.num_tokens:
            # a decoder outside the group (slow path): a decode sequence, not a prefill
            plan.decode_n += 1
            plan.decode_ctx += r.computed + 1
            if r.adapter >= 0:
                plan.decode_lora += 1
            return
        plan.prefill_tokens += n
        plan.prefill_n += 1
        plan.prefill_ctx += n * (r.computed + n)
        if r.computed:
            plan.prefill_ctx_n += 1
        if r.adapter >= 0:
            plan.prefill_lora_tokens += n

    def _schedule_running_slow(self, plan: StepPlan, budget: int) -> int:
        """vLLM's running loop, literally, over an explicit running list."""
        group, pool = self.group, self.pool
        # explode the decode group into explicit requests
        exploded = group.in_order()
        for r in exploded:
            c = group.remove(r)
            r.computed = c
            r.generated = c - r.prompt + 1
            r.blocks = pool.blocks_for(c)
            pool.take(r.blocks)
            r.status = PREFILLING  # explicit; re-enters the group after the step
        running = sorted(exploded + self.prefilling, key=lambda r: r.seq)
        self.prefilling = running
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = min(r.num_tokens - r.computed, budget, self.max_model_len - r.computed)
            if n <= 0:
                i += 1
                continue
            scheduled = True
            while True:
                nb = pool.blocks_for(r.computed + n) - r.blocks
                if nb <= pool.free:
                    break
                victim = running.pop()
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is r:
                    scheduled = False
                    break
            if not scheduled:
                break
            r.blocks += nb
            pool.take(nb)
            self._add_chunk(plan, r, n)
            budget -= n
            i += 1
        return budget

    def _preempt(self, r: Request) -> None:
        if self.caching:
            # a decoder has left the group already (r.blocks 0): its blocks are uncounted
            held = r.blocks or self.pool.blocks_for(r.computed)
            self._leave_cache(r, r.computed, held, held - r.blocks)
        self.pool.give(r.blocks)
        r.blocks = 0
        r.computed = 0
        r.status = WAITING
        r.preemptions += 1
        self.num_preemptions += 1
        if r.adapter >= 0:
            self.cache.release(r.adapter)
        self.left_running(r)
        self.waiting.prepend(r)

    # -- hooks for another admission rule (twin.sched.unified_pool.SLoRAScheduler) -------
    def left_running(self, r: Request) -> None:
        """Hook: ``r`` left the running set (finished or preempted), its blocks and
        adapter already released. vLLM keeps no other state per running request."""

    def admission_free_blocks(self, plan: StepPlan) -> int:
        """KV blocks the waiting phase of ``plan`` may still allocate: the pool's free
        blocks less what the decode group takes in this step."""
        pool = self.pool
        return pool.num_blocks - pool.used - self._held_next if plan.group_decode else pool.free

    def admit(self, plan: StepPlan, budget: int, now: float) -> str:
        """Hook: the waiting phase (vLLM's loop with the ``max_loras`` skip rule). Admits with
        :meth:`start_running`; returns why it stopped (``EMPTY``, ``SEQS``, ``BUDGET``, ``KV``,
        ``LORA``), which must persist as :meth:`arrival_may_change` assumes."""
        waiting, pool, in_use = self.waiting, self.pool, self.cache.in_use
        free = None   # asked at the first request considered: most steps admit no one
        running = self.group.n + len(self.prefilling)
        max_num_seqs = self.max_num_seqs
        lora_gate = self.max_loras if self.enable_lora else 1 << 62
        while True:
            if running >= max_num_seqs:
                return SEQS
            if budget <= 0:   # vLLM's loop ran only if it admitted someone before
                plan.waiting_skipped = len(plan.admitted) and waiting.passed_over(in_use, lora_gate)
                return BUDGET
            if not waiting.n:
                return EMPTY
            if free is None:
                free = self.admission_free_blocks(plan)
            if len(in_use) >= lora_gate:
                r = waiting.first_among(in_use)
                if r is None:
                    plan.waiting_skipped = waiting.n   # the loop passed over them all
                    return LORA
            else:
                r = waiting.first()
            hit = evictable = 0   # leading blocks cached, and those of them in the free queue
            if self.caching and r.hash_ids is not None:
                hit, evictable = self.prefix.peek(r, free)
            n = min(r.prompt + r.generated - hit * pool.block_size, budget)   # r.num_tokens
            nb = pool.blocks_for(hit * pool.block_size + n)
            if nb - hit + evictable > free:
                plan.waiting_skipped = waiting.passed_over(in_use, lora_gate)
                return KV
            waiting.pop(r)
            free -= nb - hit + evictable
            self.start_running(plan, r, n, nb, now, hit)
            budget -= n
            running += 1

    def start_running(self, plan: StepPlan, r: Request, n: int, nb: int, now: float,
                      hit: int = 0) -> None:
        """Admit waiting request ``r`` (already popped) with a first chunk of ``n`` tokens
        after its ``hit`` cached blocks, holding ``nb`` KV blocks in all: it joins the
        running list and its adapter is acquired."""
        self.pool.take(nb)
        r.blocks = nb
        r.computed = hit * self.pool.block_size
        if r.prefix is not None:
            self.prefix.acquire(r, hit)
        r.status = PREFILLING
        r.seq = self._seq
        self._seq += 1
        if r.first_scheduled < 0:
            r.first_scheduled = now
        self.prefilling.append(r)
        if r.adapter >= 0:
            load = self.cache.acquire(r.adapter)
            if load is not None:
                plan.loads.append(load)
        plan.admitted.append(r)
        self._add_chunk(plan, r, n)

    # -- after the step --------------------------------------------------------------------
    def finish_step(self, plan: StepPlan, now: float, steps: int = 1) -> list[Request]:
        """Commit a step (or ``steps`` identical pure-decode steps) that ended at ``now``.

        Returns the requests that finished; first-token times are stamped here.
        """
        done: list[Request] = []
        group = self.group
        if plan.group_decode:
            group.clock += steps
            finished = group.pop_finished()
            if self.caching and finished:
                self._leave_group(finished)
            for r in finished:
                r.generated = r.output
                self._finish(r, now)
                done.append(r)
        if plan.explicit:
            max_model_len = self.max_model_len
            finished_prefill, gone = [], ()   # gone: their seqs
            for r, n in plan.explicit:
                c = r.computed = r.computed + n
                if c >= r.prompt + r.generated or c >= max_model_len:   # r.num_tokens
                    r.generated += 1
                    if r.first_token < 0:
                        r.first_token = now
                    finished_prefill.append(r)
            if finished_prefill:
                gone = set()
                for r in finished_prefill:
                    gone.add(r.seq)
                    if r.generated >= r.output or r.computed >= max_model_len:
                        if self.caching:
                            self._leave_cache(r, r.computed, r.blocks)
                        self.pool.give(r.blocks)
                        r.blocks = 0
                        self._finish(r, now)
                        done.append(r)
                    else:
                        self.pool.give(r.blocks)
                        r.blocks = 0
                        group.add(r, r.computed)
            # the rest, in order (a finisher's status changed, not its seq): a loop, no call
            prefilling = []
            for r in self.prefilling:
                if r.status == PREFILLING and r.seq not in gone:
                    prefilling.append(r)
            self.prefilling = prefilling
        return done

    def _finish(self, r: Request, now: float) -> None:
        r.status = FINISHED
        r.finish = now
        if r.adapter >= 0:
            self.cache.release(r.adapter)
        self.left_running(r)

    # -- quiet runs ------------------------------------------------------------------------
    def quiet_steps(self, plan: StepPlan) -> int:
        """How many steps, starting with ``plan`` (pure decode), repeat it exactly.

        Bounded by the next completion and by the KV pool; arrivals are the caller's
        business (``arrival_may_change``). Returns 1 when no jump is possible.
        """
        if not plan.pure_decode or plan.blocked == PREEMPTED:
            return 1
        g = self.group
        k = g.steps_to_next_finish()
        # the j-th step of the run allocates up to held(clock + j); the plan's own step
        # (j = 1) already fit
        cap = self.pool.num_blocks - self.pool.used
        if g.held_blocks(g.clock + k) > cap:
            k = g.max_steps_within(cap)
        return max(1, k)

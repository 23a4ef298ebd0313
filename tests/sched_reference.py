"""A literal transcription of vLLM V1's ``Scheduler.schedule`` loop (lists, one request at a
time), stepped one step at a time with the same cost model. The fast scheduler and the
twin's jumps are checked against it."""

from __future__ import annotations

from collections import deque

from twin.costs.step_time import FEATURES
from twin.sched import AdapterCache
from twin.sched.adapter_cache import AdapterLoad


class RefReq:
    def __init__(self, idx, arrival, adapter, prompt, output):
        self.idx, self.arrival, self.adapter = idx, arrival, adapter
        self.prompt, self.output = prompt, output
        self.computed = self.generated = self.blocks = 0
        self.first_token = self.finish = self.first_scheduled = -1.0
        self.preemptions = 0

    @property
    def num_tokens(self):
        return self.prompt + self.generated


class _Plan:
    """Duck-types the StepPlan fields that ``features`` reads."""


def run_reference(trace_rows, *, num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
                  max_loras, max_cpu_loras, max_lora_rank, step_time, max_model_len=10**9,
                  preload=(), load_time=None, adapter_bytes=None, max_steps=10**6,
                  lora_manager=None, loads_log=None, prefix=None, hash_ids=None,
                  hash_block_size=4):
    """trace_rows: list of (arrival, adapter int or -1, prompt, output), sorted by arrival.

    Returns (requests, batches) where batches lists, per step, the tuple of
    (request idx, new tokens) in running order plus the preempted idxs.

    ``lora_manager`` (tests/lora_manager_reference.py, no preload) replaces twin's
    AdapterCache: each step the adapters of the scheduled requests go through vLLM's
    ``set_active_adapters``. ``loads_log`` gets, per step, the loads as
    (adapter, from_disk, evicted_gpu, evicted_host).

    ``prefix`` (tests/prefix_cache_reference.py's ``RefPrefixCache``) turns on vLLM's prefix
    caching: every block goes through it, admissions look up ``hash_ids`` (per row, ids of
    ``hash_block_size`` tokens) and every scheduled chunk caches its full blocks.
    """
    from twin.costs.step_time import features

    reqs = [RefReq(i, *row) for i, row in enumerate(trace_rows)]
    if prefix is not None:
        from prefix_cache_reference import RefRequest

        for r, ids in zip(reqs, hash_ids):
            r.pr = RefRequest(r.adapter, ids, hash_block_size, r.prompt, block_size)
    n_free = (lambda: prefix.num_free()) if prefix is not None else (lambda: free)
    cache = (AdapterCache(max_loras, max_cpu_loras, preload=list(preload))
             if lora_manager is None else None)
    waiting: deque = deque()
    running: list = []
    free = num_blocks
    now, nxt = 0.0, 0
    batches = []

    def cdiv(a, b):
        return -(-a // b)

    for _ in range(max_steps):
        while nxt < len(reqs) and reqs[nxt].arrival <= now:
            waiting.append(reqs[nxt])
            nxt += 1
        if not running and not waiting:
            if nxt >= len(reqs):
                break
            now = reqs[nxt].arrival
            continue
        budget = max_num_batched_tokens
        scheduled, preempted, loads, admitted = [], [], [], []
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = min(r.num_tokens - r.computed, budget, max_model_len - r.computed)
            if n <= 0:
                i += 1
                continue
            ok = True
            while True:
                need = cdiv(r.computed + n, block_size) - r.blocks
                if need <= n_free():
                    break
                v = running.pop()
                free += v.blocks
                if prefix is not None:
                    prefix.free(v.pr)
                v.blocks = v.computed = 0
                v.preemptions += 1
                if v.adapter >= 0 and cache is not None:
                    cache.release(v.adapter)
                waiting.appendleft(v)
                preempted.append(v)
                if v is r:
                    ok = False
                    break
            if not ok:
                break
            free -= need
            r.blocks += need
            if prefix is not None:
                prefix.grow(r.pr, r.computed + n)
                prefix.cache_full_blocks(r.pr, r.computed + n)
            scheduled.append((r, n))
            budget -= n
            i += 1
        loras = {r.adapter for r, _ in scheduled if r.adapter >= 0}
        skipped = []
        if not preempted:
            while waiting and budget > 0:
                if len(running) == max_num_seqs:
                    break
                r = waiting[0]
                if r.adapter >= 0 and len(loras) == max_loras and r.adapter not in loras:
                    waiting.popleft()
                    skipped.append(r)
                    continue
                hit = []
                if prefix is not None:
                    r.pr.num_tokens = r.num_tokens
                    hit = prefix.longest_hit(r.pr)
                c = len(hit) * block_size
                n = min(r.num_tokens - c, budget)
                need = cdiv(c + n, block_size)
                if prefix is not None:
                    if not prefix.allocate(r.pr, hit, c + n):
                        break
                    prefix.cache_full_blocks(r.pr, c + n)
                elif need > free:
                    break
                waiting.popleft()
                free -= need
                r.blocks = need
                r.computed = c
                running.append(r)
                admitted.append(r)
                if r.first_scheduled < 0:
                    r.first_scheduled = now
                if r.adapter >= 0:
                    loras.add(r.adapter)
                    ld = cache.acquire(r.adapter) if cache is not None else None
                    if ld is not None:
                        loads.append(ld)
                scheduled.append((r, n))
                budget -= n
            waiting.extendleft(reversed(skipped))
        p = _Plan()
        p.decode_n = p.decode_ctx = p.decode_lora = 0
        p.prefill_tokens = p.prefill_n = p.prefill_ctx = p.prefill_lora_tokens = 0
        p.prefill_ctx_n = 0
        p.waiting_skipped = len(skipped)   # the literal loop: every request it passed over
        for r, n in scheduled:
            if n == 1 and r.generated > 0 and r.computed + 1 == r.num_tokens:
                p.decode_n += 1
                p.decode_ctx += r.computed + 1
                p.decode_lora += r.adapter >= 0
            else:
                p.prefill_tokens += n
                p.prefill_n += 1
                p.prefill_ctx += n * (r.computed + n)
                p.prefill_ctx_n += r.computed > 0
                if r.adapter >= 0:
                    p.prefill_lora_tokens += n
        if lora_manager is not None:
            # the model runner applies the set of the batch's LoRARequests (hashed by name:
            # any order is one vLLM may use). Taken here: adapters already running first,
            # ordered by their last request in the batch, then new ones in admission order.
            # Ties among adapters last used in the same step then break as twin's
            # AdapterCache breaks them (release order); running adapters are touched
            # before any load, as in AdapterCache.
            fresh = {r.idx for r in admitted}
            pos: dict = {}                   # adapter -> positions of its scheduled requests
            for k, (r, _) in enumerate(scheduled):
                if r.adapter >= 0:
                    pos.setdefault(r.adapter, []).append(k)
            order = {a: (0, ks[-1]) if any(scheduled[k][0].idx not in fresh for k in ks)
                     else (1, ks[0]) for a, ks in pos.items()}
            from lora_manager_reference import loads_of

            batch = sorted(order, key=order.get)
            loads = [AdapterLoad(*ld) for ld in loads_of(lora_manager.set_active_adapters(batch))]
        if loads_log is not None:
            loads_log.append(tuple((ld.adapter, ld.from_disk, ld.evicted_gpu, ld.evicted_host)
                                   for ld in loads))
        p.adapters = (len(cache.in_use) if cache is not None else
                      len({r.adapter for r in running if r.adapter >= 0}))
        dur = step_time(features(p, max_lora_rank, max_loras))
        if load_time is not None:
            for ld in loads:
                dur += load_time.load(adapter_bytes[ld.adapter], ld.from_disk)
        batches.append((tuple((r.idx, n) for r, n in scheduled), tuple(v.idx for v in preempted)))
        now += dur
        for r, n in scheduled:
            r.computed += n
            if r.computed >= r.num_tokens:
                r.generated += 1
                if r.first_token < 0:
                    r.first_token = now
                if r.generated >= r.output:
                    r.finish = now
                    free += r.blocks
                    if prefix is not None:
                        prefix.free(r.pr)
                    r.blocks = 0
                    running.remove(r)
                    if r.adapter >= 0 and cache is not None:
                        cache.release(r.adapter)
    return reqs, batches

"""A literal transcription of vLLM V1's ``Scheduler.schedule`` loop (lists, one request at a
time), stepped one step at a time with the same cost model. The fast scheduler and the
twin's jumps are checked against it."""

from __future__ import annotations

from collections import deque

from twin.models.step_time import FEATURES
from twin.sched import AdapterCache


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
                  preload=(), load_time=None, adapter_bytes=None, max_steps=10**6):
    """trace_rows: list of (arrival, adapter int or -1, prompt, output), sorted by arrival.

    Returns (requests, batches) where batches lists, per step, the tuple of
    (request idx, new tokens) in running order plus the preempted idxs.
    """
    from twin.models.step_time import features

    reqs = [RefReq(i, *row) for i, row in enumerate(trace_rows)]
    cache = AdapterCache(max_loras, max_cpu_loras, preload=list(preload))
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
        scheduled, preempted, loads = [], [], []
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
                if need <= free:
                    break
                v = running.pop()
                free += v.blocks
                v.blocks = v.computed = 0
                v.preemptions += 1
                if v.adapter >= 0:
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
            scheduled.append((r, n))
            budget -= n
            i += 1
        loras = {r.adapter for r, _ in scheduled if r.adapter >= 0}
        if not preempted:
            skipped = []
            while waiting and budget > 0:
                if len(running) == max_num_seqs:
                    break
                r = waiting[0]
                if r.adapter >= 0 and len(loras) == max_loras and r.adapter not in loras:
                    waiting.popleft()
                    skipped.append(r)
                    continue
                n = min(r.num_tokens, budget)
                need = cdiv(n, block_size)
                if need > free:
                    break
                waiting.popleft()
                free -= need
                r.blocks = need
                r.computed = 0
                running.append(r)
                if r.first_scheduled < 0:
                    r.first_scheduled = now
                if r.adapter >= 0:
                    loras.add(r.adapter)
                    ld = cache.acquire(r.adapter)
                    if ld is not None:
                        loads.append(ld)
                scheduled.append((r, n))
                budget -= n
            waiting.extendleft(reversed(skipped))
        p = _Plan()
        p.decode_n = p.decode_ctx = p.decode_lora = 0
        p.prefill_tokens = p.prefill_n = p.prefill_ctx = p.prefill_lora_tokens = 0
        for r, n in scheduled:
            if n == 1 and r.generated > 0 and r.computed + 1 == r.num_tokens:
                p.decode_n += 1
                p.decode_ctx += r.computed + 1
                p.decode_lora += r.adapter >= 0
            else:
                p.prefill_tokens += n
                p.prefill_n += 1
                p.prefill_ctx += n * (r.computed + n)
                if r.adapter >= 0:
                    p.prefill_lora_tokens += n
        p.adapters = len(cache.in_use)
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
                    r.blocks = 0
                    running.remove(r)
                    if r.adapter >= 0:
                        cache.release(r.adapter)
    return reqs, batches

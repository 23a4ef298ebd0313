"""A reference of S-LoRA's admission and unified paging in plain lists, for differential tests
of ``twin.sched.unified_pool.SLoRAScheduler`` / ``UnifiedAdapterPool``.

Written from the paper (arXiv 2311.03285, §4-5) and the S-LoRA repository's router
(``slora/server/router/manager.py``: ``_step`` loads the new batch's adapters before its
prefill and offloads the adapters the running batch no longer uses after finished requests
are filtered out; ``req_queue.py::ReqQueue.generate_new_batch``: waiting requests in strict
FCFS order, stop at the first that does not fit, ``_can_add_new_req``: the batch's future KV
plus the adapters' slots, ``4 * rank`` per adapter, must fit the pool). Nothing is shared
with ``twin.policies.slora``.

What is S-LoRA's and what is the twin's modelling choice (DESIGN, twin/policies/slora.py):

- One pool of pages: KV blocks and adapter pages (an adapter takes the pages the caller
  gives, ``ceil(adapter bytes / KV block bytes)`` in the twin; S-LoRA's ``4 r`` token slots
  per layer is the same ratio for q,k,v,o adapters of a model with as many KV heads as
  query heads).
- Conservative admission: the sum over the running requests and the candidate of their
  final lengths (prompt + output, in blocks), plus the pages of the adapters in use and of
  the candidate's adapter if not resident, must fit the pool. S-LoRA's code bounds the
  peak instead of the sum (requests sorted by remaining output); the twin documents the sum.
  ``on_demand``: only the first chunk and the adapter's pages must fit now (vLLM's rule).
- Batching is vLLM V1's chunked-prefill step (running first, then waiting, preemption of
  the last running request when KV runs out, no admission in a step that preempted), not
  S-LoRA's separate prefill and decode steps with a new batch tried every N decodes: the
  twin keeps the shared loop so that a comparison isolates memory and adapters.
- Adapters are all in host memory from start-up: a load is a host→GPU copy, paid in the
  step that admits the request; an adapter no running request uses is dropped before the
  next step.
"""

from __future__ import annotations

from collections import deque


class SReq:
    def __init__(self, idx, arrival, adapter, prompt, output):
        self.idx, self.arrival, self.adapter = idx, arrival, adapter
        self.prompt, self.output = prompt, output
        self.computed = self.generated = self.blocks = 0
        self.first_token = self.finish = -1.0
        self.preemptions = 0

    @property
    def num_tokens(self):
        return self.prompt + self.generated


def run_slora_reference(rows, *, num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
                        adapter_pages, admission, step_time, max_steps=10**6):
    """rows: (arrival, adapter int or -1, prompt, output), sorted by arrival.

    ``step_time(prefill_tokens, decode_n, adapters_in_use, loads)`` prices a step.
    Returns (requests, log); log has per step (batch, preempted, loads, pages, resident):
    (idx, tokens) in running order, preempted idxs, adapters copied to the GPU, pages in use
    (KV blocks + adapter pages) once the step is scheduled, resident adapters (sorted).
    """
    reqs = [SReq(i, *row) for i, row in enumerate(rows)]
    waiting: deque = deque()
    running: list = []
    resident: list = []                  # adapters whose pages are in the pool
    free = num_blocks
    now, nxt = 0.0, 0
    log = []

    def cdiv(a, b):
        return -(-a // b)

    def final_blocks(r):
        return cdiv(r.prompt + r.output, block_size)

    for _ in range(max_steps):
        while nxt < len(reqs) and reqs[nxt].arrival <= now:
            waiting.append(reqs[nxt])
            nxt += 1
        if not running and not waiting:
            if nxt >= len(reqs):
                break
            now = reqs[nxt].arrival
            continue
        # offload the adapters the running batch does not use
        used = {r.adapter for r in running}
        for a in [a for a in resident if a not in used]:
            resident.remove(a)
            free += adapter_pages[a]
        budget = max_num_batched_tokens
        scheduled, preempted, loads = [], [], []
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = min(r.num_tokens - r.computed, budget)
            ok = True
            while True:
                need = cdiv(r.computed + n, block_size) - r.blocks
                if need <= free:
                    break
                v = running.pop()
                free += v.blocks
                v.blocks = v.computed = 0
                v.preemptions += 1
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
        if not preempted:
            while waiting and budget > 0 and len(running) < max_num_seqs:
                r = waiting[0]
                pages = adapter_pages[r.adapter] if r.adapter >= 0 and r.adapter not in resident \
                    else 0
                n = min(r.num_tokens, budget)
                need = cdiv(n, block_size)
                if need + pages > free:
                    break
                if admission == "conservative":
                    future = sum(final_blocks(x) for x in running) + final_blocks(r)
                    adapters = sum(adapter_pages[a] for a in resident) + pages
                    if future + adapters > num_blocks:
                        break
                waiting.popleft()
                free -= need + pages
                if pages:
                    resident.append(r.adapter)
                    loads.append(r.adapter)
                r.blocks = need
                r.computed = 0
                running.append(r)
                scheduled.append((r, n))
                budget -= n
        prefill = decode = 0
        for r, n in scheduled:
            if n == 1 and r.generated > 0 and r.computed + 1 == r.num_tokens:
                decode += 1
            else:
                prefill += n
        in_use = len({r.adapter for r in running if r.adapter >= 0})
        log.append((tuple((r.idx, n) for r, n in scheduled), tuple(v.idx for v in preempted),
                    tuple(loads), num_blocks - free, tuple(sorted(resident))))
        now += step_time(prefill, decode, in_use, len(loads))
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
    return reqs, log

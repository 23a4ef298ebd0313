"""The waiting queue with vLLM V1's LoRA skip rule, in O(adapters in use) per admission.

vLLM scans ``waiting`` in FCFS order and *skips* (keeps in place) a request whose adapter
is not among this step's ``scheduled_loras`` once that set holds ``max_loras`` ids. With
tens of thousands waiting, scanning is too slow for the twin, so requests sit in one FIFO
per adapter; each request carries a key that orders it globally (its arrival index, or a
decreasing negative number when a preempted request is put back at the head). The next
request vLLM would consider is then the smallest head key, over all adapters when the set
has room, or over the set's adapters and the base model when it is full.
"""

from __future__ import annotations

import heapq
from collections import deque

from twin.sched.adapter_cache import SET_SALT
from twin.sched.request import Request


class WaitingQueue:
    __slots__ = ("_fifo", "_heads", "n", "_next_front", "adapters_key")

    BASE = -1

    def __init__(self):
        self._fifo: dict[int, deque[Request]] = {}
        self._heads: list[tuple[int, int]] = []  # (head key, adapter), lazily validated
        self.n = 0   # requests waiting (``len``; read as a field where every step asks)
        self._next_front = -1
        # the adapters with a request waiting, as one number (XOR of their set hashes, kept
        # as an adapter's FIFO opens and empties): the waiting half of vLLM's
        # lora_requests_info label (twin.sched.adapter_cache.AdapterCache.note_label)
        self.adapters_key = 0

    def __len__(self) -> int:
        return self.n

    def clear(self) -> None:
        """Drop every waiting request (the run is over and they are recorded)."""
        self._fifo.clear()
        self._heads.clear()
        self.n = 0
        self.adapters_key = 0

    def _push_head(self, adapter: int, q: deque) -> None:
        heapq.heappush(self._heads, (q[0].key, adapter))
        if len(self._heads) > 4 * len(self._fifo) + 1024:  # drop stale head entries
            self._heads = [(q[0].key, a) for a, q in self._fifo.items()]
            heapq.heapify(self._heads)

    def _open(self, adapter: int) -> deque:
        """A new FIFO for ``adapter``: it now has a request waiting (its share of
        ``adapters_key`` added, as :meth:`append` and :meth:`pop` do inline: they run
        once per request)."""
        q = self._fifo[adapter] = deque()
        if adapter >= 0:
            self.adapters_key ^= hash((adapter, SET_SALT))
        return q

    def append(self, req: Request) -> None:
        """Arrival: goes behind everything already waiting (key = arrival index)."""
        a = req.adapter
        q = self._fifo.get(a)
        if q is None:
            q = self._fifo[a] = deque()
            if a >= 0:
                self.adapters_key ^= hash((a, SET_SALT))
        q.append(req)
        self.n += 1
        if len(q) == 1:
            self._push_head(req.adapter, q)

    def prepend(self, req: Request) -> None:
        """Preempted request: goes to the head of the whole queue."""
        req.key = self._next_front
        self._next_front -= 1
        q = self._fifo.get(req.adapter)
        if q is None:
            q = self._open(req.adapter)
        q.appendleft(req)
        self.n += 1
        self._push_head(req.adapter, q)

    def first(self) -> Request | None:
        """The FCFS head over all adapters."""
        heads, fifo = self._heads, self._fifo
        while heads:
            key, a = heads[0]
            q = fifo.get(a)
            if q and q[0].key == key:
                return q[0]
            heapq.heappop(heads)
        return None

    def first_among(self, adapters) -> Request | None:
        """The FCFS head among base-model requests and the given adapters' requests.

        The head over all adapters is tried first: when it is among them (every adapter
        of a server whose ``max_loras`` covers its adapters, a hot adapter's queue) it is
        the answer in one heap read instead of a lookup per adapter of the set."""
        head = self.first()
        if head is None:
            return None
        if head.adapter == self.BASE or head.adapter in adapters:
            return head
        best = None
        fifo = self._fifo
        q = fifo.get(self.BASE)
        if q:
            best = q[0]
        for a in adapters:
            q = fifo.get(a)
            if q and (best is None or q[0].key < best.key):
                best = q[0]
        return best

    def passed_over(self, adapters, gate: int) -> int:
        """The requests vLLM's waiting loop skipped before it stopped, given the step's
        ``adapters``: none while they are fewer than ``gate`` (``max_loras``), else every
        other adapter's request, taken as all ahead of the stop (those the rule holds back
        are the ones waiting longest). Priced as the loop's Python work (``waiting_skipped``)."""
        if len(adapters) < gate:
            return 0
        fifo = self._fifo
        q = fifo.get(self.BASE)
        n = self.n - (len(q) if q else 0)
        for a in adapters:
            q = fifo.get(a)
            if q:
                n -= len(q)
        return n

    def pop(self, req: Request) -> None:
        """Remove ``req``, which must be the head of its adapter's FIFO."""
        q = self._fifo[req.adapter]
        q.popleft()
        self.n -= 1
        if q:
            self._push_head(req.adapter, q)
        else:
            a = req.adapter
            del self._fifo[a]
            if a >= 0:
                self.adapters_key ^= hash((a, SET_SALT))

    def __iter__(self):
        """All waiting requests in FCFS order (slow; for reports and tests)."""
        reqs = [r for q in self._fifo.values() for r in q]
        reqs.sort(key=lambda r: r.key)
        return iter(reqs)

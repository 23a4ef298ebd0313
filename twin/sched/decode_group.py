"""Running requests that are decoding, kept so that a decode step costs O(1).

Every decoding request computes one token per step, so its computed-token count is
``x + clock`` with a per-request constant ``x`` and one shared ``clock``. The KV blocks the
group holds, sum(ceil((x + clock) / B)), follow from a histogram of ``x mod B``; the next
completion from a heap of finishing clocks. Runs of steps in which nothing else changes
can then be advanced in one jump (DESIGN §4).
"""

from __future__ import annotations

import heapq

from twin.sched.request import Request, RequestStatus


class DecodeGroup:
    def __init__(self, block_size: int):
        self.B = block_size
        self.clock = 0
        self.n = 0           # members
        self.n_base = 0      # members without adapter
        self.X = 0           # sum of x
        self.Q = 0           # sum of x // B
        self.hist = [0] * block_size   # count of x % B
        self.members: dict[int, Request] = {}   # seq -> request
        self._finish: list[tuple] = []   # (finish clock, seq, push id, x, req); stale skipped
        self._pushes = 0
        self._maxseq: list[tuple[int, Request]] = []        # (-seq, req)

    def add(self, req: Request, computed: int) -> None:
        x = computed - self.clock
        req.x = x
        req.status = RequestStatus.DECODING
        self.n += 1
        if req.adapter < 0:
            self.n_base += 1
        self.X += x
        q, m = divmod(x, self.B)
        self.Q += q
        self.hist[m] += 1
        self.members[req.seq] = req
        # finishes after the step that brings computed to prompt + output - 1
        heapq.heappush(self._finish, (req.prompt + req.output - 1 - x, req.seq, self._pushes, x, req))
        self._pushes += 1
        heapq.heappush(self._maxseq, (-req.seq, req))
        if len(self._finish) + len(self._maxseq) > 8 * self.n + 2048:
            self._compact()  # drop entries of departed members (and their references)

    def _compact(self) -> None:
        self._finish = [e for e in self._finish if self._valid(e)]
        heapq.heapify(self._finish)
        self._maxseq = [(-s, r) for s, r in self.members.items()]
        heapq.heapify(self._maxseq)

    def _valid(self, entry) -> bool:
        _, seq, _, x, req = entry
        return req.x == x and req.status == RequestStatus.DECODING and self.members.get(seq) is req

    def remove(self, req: Request) -> int:
        """Take ``req`` out of the group; returns its computed-token count."""
        x = req.x
        self.n -= 1
        if req.adapter < 0:
            self.n_base -= 1
        self.X -= x
        q, m = divmod(x, self.B)
        self.Q -= q
        self.hist[m] -= 1
        del self.members[req.seq]
        return x + self.clock

    def computed(self, req: Request) -> int:
        return req.x + self.clock

    def held_blocks(self, clock: int | None = None) -> int:
        """KV blocks the members hold when the group clock reads ``clock``."""
        t = self.clock if clock is None else clock
        if self.n == 0:
            return 0
        a, s = divmod(t, self.B)
        h = self.Q + self.n * a + self.n
        if s == 0:
            h -= self.hist[0]
        else:
            h += sum(self.hist[self.B - s + 1:])
        return h

    def held_blocks_now_and_next(self) -> tuple[int, int]:
        """``(held_blocks(), held_blocks(clock + 1))`` in one call (every step asks both).
        One more token takes a new block exactly for the members whose context ends a block,
        those with ``x ≡ -clock (mod B)``: one histogram bin (``sum(hist) == n`` makes the
        wrap from ``s = B - 1`` to the next block row the same bin, ``hist[1]``)."""
        if self.n == 0:
            return 0, 0
        h = self.held_blocks()
        return h, h + self.hist[-self.clock % self.B]

    def context_tokens(self, clock: int | None = None) -> int:
        """Sum of attended context (computed + the new token) in a step at ``clock``."""
        t = self.clock if clock is None else clock
        return self.X + self.n * (t + 1)

    def steps_to_next_finish(self) -> int:
        """Steps until (and including) the one after which a member finishes."""
        heap = self._finish
        while heap:
            if self._valid(heap[0]):
                return heap[0][0] - self.clock
            heapq.heappop(heap)
        return 1 << 62

    def pop_finished(self) -> list[Request]:
        """Members whose last token was computed by now (removed from the group)."""
        out = []
        heap = self._finish
        while heap and heap[0][0] <= self.clock:
            entry = heapq.heappop(heap)
            if self._valid(entry):
                self.remove(entry[4])
                out.append(entry[4])
        return out

    def max_seq(self) -> int:
        heap = self._maxseq
        while heap:
            negseq, req = heap[0]
            if self.members.get(-negseq) is req:
                return -negseq
            heapq.heappop(heap)
        return -1

    def max_steps_within(self, cap_blocks: int) -> int:
        """Largest k >= 0 with held_blocks(clock + k) <= cap_blocks (monotone in k)."""
        t0 = self.clock
        if self.held_blocks(t0) > cap_blocks:
            return 0
        hi = 1
        while self.held_blocks(t0 + hi) <= cap_blocks:
            hi *= 2
            if hi > 1 << 40:
                return hi
        lo = hi // 2  # held(lo) ok, held(hi) not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.held_blocks(t0 + mid) <= cap_blocks:
                lo = mid
            else:
                hi = mid
        return lo

    def in_order(self) -> list[Request]:
        return [self.members[s] for s in sorted(self.members)]

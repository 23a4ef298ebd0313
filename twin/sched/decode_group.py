"""Running requests that are decoding, kept so that a decode step costs O(1).

Every decoding request computes one token per step, so its computed-token count is
``x + clock`` with a per-request constant ``x`` and one shared ``clock``. The KV blocks the
group holds, sum(ceil((x + clock) / B)), follow from a histogram of ``x mod B``; the next
completion from a heap of finishing clocks. Runs of steps in which nothing else changes
can then be advanced in one jump (DESIGN §4).
"""

from __future__ import annotations

import heapq
from heapq import heappop, heappush

from twin.sched.request import Request, RequestStatus

DECODING = RequestStatus.DECODING


class DecodeGroup:
    # slotted, as the waiting queue, adapter cache and recorder: a fleet's event loop steps
    # 64 servers interleaved, and a smaller object is less to bring back into the CPU caches
    __slots__ = ("B", "clock", "n", "n_base", "X", "Q", "hist", "members", "_finish", "_pushes",
                 "_maxseq")

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
        req.status = DECODING
        self.n += 1
        if req.adapter < 0:
            self.n_base += 1
        self.X += x
        q, m = divmod(x, self.B)
        self.Q += q
        self.hist[m] += 1
        seq = req.seq
        self.members[seq] = req
        # finishes after the step that brings computed to prompt + output - 1
        pushes = self._pushes
        heappush(self._finish, (req.prompt + req.output - 1 - x, seq, pushes, x, req))
        self._pushes = pushes + 1
        heappush(self._maxseq, (-seq, req))
        if len(self._finish) + len(self._maxseq) > 8 * self.n + 2048:
            self._compact()  # drop entries of departed members (and their references)

    def _compact(self) -> None:
        self._finish = [e for e in self._finish if self._valid(e)]
        heapq.heapify(self._finish)
        self._maxseq = [(-s, r) for s, r in self.members.items()]
        heapq.heapify(self._maxseq)

    def _valid(self, entry) -> bool:
        # steps_to_next_finish and pop_finished test the same inline: change all three
        _, seq, _, x, req = entry
        return req.x == x and req.status == DECODING and self.members.get(seq) is req

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
        wrap from ``s = B - 1`` to the next block row the same bin, ``hist[1]``).
        :meth:`held_blocks` is written out here: this runs once per engine step."""
        n = self.n
        if n == 0:
            return 0, 0
        B, hist, t = self.B, self.hist, self.clock
        a, s = divmod(t, B)
        h = self.Q + n * a + n
        if s == 0:
            h -= hist[0]
        else:
            h += sum(hist[B - s + 1:])
        return h, h + hist[-t % B]

    def context_tokens(self, clock: int | None = None) -> int:
        """Sum of attended context (computed + the new token) in a step at ``clock``."""
        t = self.clock if clock is None else clock
        return self.X + self.n * (t + 1)

    def steps_to_next_finish(self) -> int:
        """Steps until (and including) the one after which a member finishes."""
        heap, members = self._finish, self.members
        while heap:
            # _valid, written out (asked at every quiet decode run)
            entry = heap[0]
            req = entry[4]
            if req.x == entry[3] and req.status == DECODING and members.get(entry[1]) is req:
                return entry[0] - self.clock
            heappop(heap)
        return 1 << 62

    def pop_finished(self) -> list[Request]:
        """Members whose last token was computed by now (removed from the group)."""
        heap = self._finish
        if not heap or heap[0][0] > self.clock:
            return []   # the usual step: no one finishes
        out = []
        clock, members = self.clock, self.members
        while heap and heap[0][0] <= clock:
            entry = heappop(heap)
            req = entry[4]   # _valid, written out as in steps_to_next_finish
            if req.x == entry[3] and req.status == DECODING and members.get(entry[1]) is req:
                self.remove(req)
                out.append(req)
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

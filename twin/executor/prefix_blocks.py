"""KV block tables that reuse cached blocks: the executor's side of the prefix cache.

The scheduler's prefix cache (``twin.sched.prefix_cache``) decides which leading blocks of
an admitted request are cache hits and counts them; it names each cached block by a stable
id (``PrefixCache.block_ids``). These tables map those ids to physical KV blocks, so that a
hit *reads* the keys and values another request of the same adapter computed (never
recomputes them), and a freed block keeps its KV until the scheduler's cache evicts it.

Physical blocks are reference-counted (a shared prefix is one block in several tables).
A freed block with a cached id waits in ``_cached_free``; a freed block without one joins
the empty free list. New blocks come only from the empty list: before each step
(:meth:`before_step`) every cached free block whose id the scheduler no longer holds
(evicted, or cached afresh by a request of this step) is emptied, so the empty list holds
exactly the blocks the scheduler allocated from (vLLM's ``get_new_blocks`` evicting from the
free queue). A block's id is taken when the scheduler registers it: at schedule time for the
chunks it computes (:meth:`ensure_for`, in batch order, which is the scheduler's order, so a
request admitted after another in the same step finds the blocks that one registered), and
when a request leaves (finished or preempted: a decoder's output blocks, :meth:`release`).
Two adapters never share an id (the adapter is in the chain hash), so they never read each
other's blocks.
"""

from __future__ import annotations

from twin.executor.block_tables import PagedBlockTables


def block_tables(num_blocks: int, block_size: int, scheduler):
    """The tables a server needs: with the scheduler's prefix cache on, cached-block reuse."""
    if getattr(scheduler, "prefix", None) is None:
        return PagedBlockTables(num_blocks, block_size)
    return CachedBlockTables(num_blocks, block_size, scheduler)


class CachedBlockTables(PagedBlockTables):
    """:class:`PagedBlockTables` whose blocks carry the scheduler's cached-block ids."""

    def __init__(self, num_blocks: int, block_size: int, scheduler):
        super().__init__(num_blocks, block_size)
        self.sched = scheduler
        self._ref = [0] * self.num_blocks
        self._id_of: dict[int, tuple] = {}        # physical block -> cached id
        self._by_id: dict[tuple, int] = {}        # cached id -> physical block
        self._cached_free: dict[int, None] = {}   # free blocks keeping their KV
        self._tagged: dict[int, int] = {}         # request -> leading blocks carrying ids
        self._req: dict[int, object] = {}         # request -> Request
        self.reused_blocks = 0                    # hit blocks read instead of computed
        self._evicted_seen = 0                    # the scheduler's evictions scanned for

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached_free)

    @property
    def free(self) -> int:
        return len(self._free) + len(self._cached_free)

    def _cached(self, bid: tuple) -> bool:
        """Whether the scheduler's cache holds block id ``bid`` (its pops applied)."""
        seg = self.sched.prefix.segments.get(bid[0])
        return seg is not None and seg.cached > bid[1]

    def before_step(self, plan, items) -> None:
        """Empty the cached free blocks the scheduler no longer holds, or registered anew in
        ``plan`` (``items``: its batch), before any new block is handed out. Incremental:
        only the batch's newly registered ids are looked up, and the free blocks are
        scanned only after the scheduler evicted something (a scan of every cached free
        block per step cost the CPU executor ~1 ms a step, which no vLLM step pays)."""
        if not self.sched.caching:   # no request named its tokens yet: nothing cached
            return
        pc = self.sched.prefix
        # the scheduler's pending pops (evictions), its decoders' next blocks included
        pc.sync(self.num_blocks - plan.kv_blocks)
        drop, B = set(), self.block_size
        for r, _ in items:   # ids past a request's tagged blocks (or, admitted: its hit)
            st = r.prefix
            if st is not None:
                done = self._tagged.get(r.idx)
                if done is None:
                    done = self.sched.computed(r) // B
                if st.chain > done:
                    for bid in pc.block_ids(r, done):
                        q = self._by_id.get(bid)
                        if q is not None and q in self._cached_free:
                            drop.add(q)
        if pc.evicted != self._evicted_seen:
            self._evicted_seen = pc.evicted
            drop.update(q for q in self._cached_free if not self._cached(self._id_of[q]))
        if drop:
            for q in [q for q in self._cached_free if q in drop]:
                del self._cached_free[q]
                self._untag(q)
                self._give([q])

    def ensure_for(self, r, start: int, tokens: int) -> list[int]:
        """``r``'s table covering ``tokens`` tokens; at its admission (``start``: its
        computed tokens, the hit) its leading blocks are the cached ones."""
        ids = self.sched.prefix.block_ids(r) if r.prefix is not None else []
        if r.idx not in self._tables:
            hit = start // self.block_size
            self._tables[r.idx] = [self._hold(b) for b in ids[:hit]]
            self._tagged[r.idx] = hit
            self._req[r.idx] = r
        t = self.ensure(r.idx, tokens)
        for i in range(self._tagged[r.idx], min(len(ids), len(t))):
            self._tag(t[i], ids[i])
            self._tagged[r.idx] = i + 1
        return t

    def release(self, key: int) -> int:
        """Free ``key``'s blocks, last first; its blocks the scheduler cached on the way
        out (full output blocks named by its hash ids) take their ids first."""
        t = self._tables.pop(key, None)
        r = self._req.pop(key, None)
        tagged = self._tagged.pop(key, 0)
        if not t:
            return 0
        st = r.prefix
        if st is not None:
            for i in range(tagged, min(len(t), st.nblocks)):
                bid = (st.keys[i // st.seg], i % st.seg)
                if not self._cached(bid):
                    break
                if bid not in self._by_id:
                    self._tag(t[i], bid)
        empty = []
        for p in reversed(t):
            self._ref[p] -= 1
            if not self._ref[p]:
                if p in self._id_of:
                    self._cached_free[p] = None
                else:
                    empty.append(p)
        self._give(empty[::-1])   # the base class's order: the last block handed out first
        return len(t)

    def _take(self, n: int) -> list[int]:
        t = super()._take(n)
        for p in t:
            self._ref[p] = 1
        return t

    def _hold(self, bid: tuple) -> int:
        """The physical block of cached id ``bid``, held once more (a hit)."""
        p = self._by_id.get(bid)
        assert p is not None, (f"prefix cache: the scheduler hit block {bid} but the executor "
                               "holds no KV for it (a bug)")
        if not self._ref[p]:
            del self._cached_free[p]
        self._ref[p] += 1
        self.reused_blocks += 1
        return p

    def _tag(self, p: int, bid: tuple) -> None:
        """Block ``p`` now holds cached id ``bid`` (an older free copy is emptied)."""
        old = self._by_id.get(bid)
        if old == p:
            return
        if old is not None:
            assert not self._ref[old], f"prefix cache: block id {bid} held twice (a bug)"
            self._cached_free.pop(old, None)
            self._untag(old)
            self._give([old])
        self._untag(p)
        self._by_id[bid] = p
        self._id_of[p] = bid

    def _untag(self, p: int) -> None:
        bid = self._id_of.pop(p, None)
        if bid is not None and self._by_id.get(bid) == p:
            del self._by_id[bid]

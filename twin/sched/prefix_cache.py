"""vLLM V1's automatic prefix cache, adapter-aware, over the scheduler's KV block counts.

Followed from vLLM's source (V1 engine): ``vllm/v1/core/kv_cache_utils.py``
(``hash_block_tokens``: a full block's hash chains its parent's hash, its tokens and the
extra keys, among them the LoRA name from ``generate_block_hash_extra_keys``),
``vllm/v1/core/block_pool.py`` (``BlockPool``: ``cache_full_blocks``, ``touch``,
``free_blocks``, ``get_new_blocks`` evicting from the head of ``FreeKVCacheBlockQueue``,
``get_num_free_blocks``), ``vllm/v1/core/kv_cache_manager.py`` (``get_computed_blocks``
with ``max_cache_hit_length = num_tokens - 1``, ``allocate_slots`` counting evictable hit
blocks as allocations and caching full blocks at schedule time, ``free`` in reverse order)
and ``vllm/v1/core/sched/scheduler.py`` (the lookup only for a request with no computed
tokens, i.e. at each admission).

What a block holds comes from the trace: ``Request.hash_ids`` name its tokens in blocks of
``hash_block_size`` (512 in Mooncake); KV block ``i`` (``block_size`` tokens) is keyed by
the hash ids it covers and its offset inside them, chained over its parent and the adapter
(-1: the base model, its own namespace), so adapters never share a block. A request with
``hash_ids`` None shares nothing and costs nothing here.

Blocks are counted, not named: the scheduler's counts (``KVBlockPool.used`` plus the decode
group's lazily held blocks) stay what they were; the cache keeps which *cached* blocks a
count stands for. Full blocks are grouped into *segments* (one trace hash id's KV blocks
when ``hash_block_size`` is a multiple of ``block_size``, else one KV block each): within a
segment, running holders hold leading blocks, so a segment is ``cached`` (leading blocks
present) and its holders' extents, and a Mooncake hour costs ~10^2 operations per request,
not one per KV block. The free queue (vLLM's ``FreeKVCacheBlockQueue``: empty and evictable
blocks, least recently freed first) is a list of runs; pops for new blocks are applied
lazily (:meth:`sync`) before anything whose outcome depends on the queue's order.

Accounting: a block several running requests share is counted once per holder by the
scheduler; the cache gives the surplus back to the pool (``pool.give``) while it is shared,
so ``num_blocks - used - held`` stays vLLM's ``get_num_free_blocks`` (empty + evictable).
One deviation from vLLM, kept by the reference test too: a request that computes a block
someone else cached meanwhile (a concurrent duplicate) stops registering its blocks there
(vLLM caches the duplicate copy under the same hash as well).
"""

from __future__ import annotations

from collections import OrderedDict


class Segment:
    """Cached leading blocks of one segment, the running holders' extents, and its runs in
    the free queue (earliest queued first: they hold its highest free blocks)."""

    __slots__ = ("cached", "holders", "runs")

    def __init__(self):
        self.cached = 0
        self.holders: list[int] = []
        self.runs: list[Run] = []


class Run:
    """A stretch of the free queue: blocks ``[lo, hi)`` of segment ``key`` (None: empty)."""

    __slots__ = ("key", "lo", "hi", "id")

    def __init__(self, key, lo: int, hi: int, rid: int):
        self.key, self.lo, self.hi, self.id = key, lo, hi, rid


class PrefixState:
    """A request's view of the cache: its segment keys, the leading blocks it holds as
    cached blocks (``chain``), and what its admissions queried and hit (tokens)."""

    __slots__ = ("keys", "seg", "nblocks", "chain", "stopped", "queried", "hit", "hit_blocks")

    def __init__(self, keys: list[int], seg: int, nblocks: int):
        self.keys = keys          # chain hash per segment
        self.seg = seg            # KV blocks per segment
        self.nblocks = nblocks    # full KV blocks the hash ids name
        self.chain = 0
        self.stopped = False      # met a concurrent duplicate: registers no more
        self.queried = 0
        self.hit = 0
        self.hit_blocks = 0       # leading blocks hit at the latest admission


def segment_keys(hash_ids, hash_block_size: int, block_size: int, adapter: int):
    """(chain hash per segment, KV blocks per segment, full KV blocks named) of a request.

    With ``hash_block_size`` a multiple of ``block_size`` a segment is one hash id's blocks;
    otherwise one KV block, keyed by the ids it covers and where it starts in the first."""
    parent = hash(("twin-prefix", hash_block_size, block_size))
    nblocks = len(hash_ids) * hash_block_size // block_size
    keys = []
    if hash_block_size % block_size == 0:
        for h in hash_ids:
            parent = hash((parent, h, adapter))
            keys.append(parent)
        return keys, hash_block_size // block_size, nblocks
    for i in range(nblocks):
        lo, hi = i * block_size, (i + 1) * block_size - 1
        content = (tuple(hash_ids[lo // hash_block_size: hi // hash_block_size + 1]),
                   lo % hash_block_size)
        parent = hash((parent, content, adapter))
        keys.append(parent)
    return keys, 1, nblocks


class PrefixCache:
    """The cached blocks of one KV pool (``pool``: the scheduler's ``KVBlockPool``)."""

    def __init__(self, pool):
        self.pool = pool
        self.B = pool.block_size
        self.segments: dict[int, Segment] = {}
        self.queue: OrderedDict[int, Run] = OrderedDict()
        self.loose = 0            # empty blocks at the queue's head, ahead of every run
        self.qlen = 0             # blocks in the free queue (empty + evictable)
        self.evictable = 0        # cached blocks in the free queue
        self.cached_blocks = 0    # cached blocks, held or evictable
        self.queries = 0          # prefix_cache_queries (tokens looked up at admissions)
        self.hits = 0             # prefix_cache_hits (tokens found)
        self._rid = 0

    def state(self, r) -> PrefixState | None:
        """``r``'s prefix state (built at its first lookup); None without hash ids."""
        st = r.prefix
        if st is None and r.hash_ids is not None:
            st = r.prefix = PrefixState(*segment_keys(r.hash_ids, r.hash_block_size, self.B,
                                                      r.adapter))
        return st

    # -- the free queue ----------------------------------------------------------------------
    def sync(self, free: int) -> None:
        """Apply the pops (allocations) made since the last call: the queue holds ``free``
        blocks, the pool's empty + evictable count, before any order-dependent operation."""
        if not self.queue:
            self.loose = self.qlen = free
            return
        excess = self.qlen - free
        if excess > 0:
            self._pop(excess)
        elif excess < 0:           # freed outside the cache (an adapter's pages): empty
            self._append(None, 0, -excess)

    def _pop(self, n: int) -> None:
        """Take ``n`` blocks from the queue's head, evicting the cached ones."""
        self.qlen -= n
        k = min(self.loose, n)
        self.loose -= k
        n -= k
        q = self.queue
        while n:
            run = next(iter(q.values()))
            k = min(run.hi - run.lo, n)
            n -= k
            run.hi -= k
            if run.key is not None:
                seg = self.segments[run.key]
                seg.cached = run.hi
                self.evictable -= k
                self.cached_blocks -= k
                if run.hi == run.lo:
                    seg.runs.pop(0)
                    if seg.cached == 0:
                        del self.segments[run.key]
            if run.hi == run.lo:
                q.popitem(last=False)

    def _append(self, key, lo: int, hi: int, seg: Segment | None = None) -> None:
        """Blocks ``[lo, hi)`` of segment ``key`` (None: ``hi - lo`` empty ones) join the
        queue's tail."""
        n = hi - lo
        self.qlen += n
        q = self.queue
        if key is None:
            if not q:
                self.loose += n
                return
            tail = q[next(reversed(q))]
            if tail.key is None:
                tail.hi += n
                return
        run = Run(key, lo, hi, self._rid)
        q[self._rid] = run
        self._rid += 1
        if seg is not None:
            seg.runs.append(run)
            self.evictable += n

    def _touch(self, seg: Segment, lo: int, hi: int) -> None:
        """Take the evictable blocks ``[lo, hi)`` of ``seg`` out of the queue (a hit)."""
        n = hi - lo
        self.qlen -= n
        self.evictable -= n
        runs = seg.runs
        while n:
            run = runs[-1]                # the latest queued run holds the lowest blocks
            k = min(run.hi - run.lo, n)
            run.lo += k
            n -= k
            if run.lo == run.hi:
                runs.pop()
                del self.queue[run.id]

    # -- what the scheduler calls ----------------------------------------------------------
    def peek(self, r, free: int) -> tuple[int, int]:
        """(leading blocks of ``r`` cached, how many of them are evictable) at admission:
        at most ``num_tokens - 1`` tokens, in full blocks. ``free``: empty + evictable
        blocks now. Changes nothing but applying pending pops."""
        st = self.state(r)
        if st is None:
            return 0, 0
        self.sync(free)
        limit = min((r.prompt + r.generated - 1) // self.B, st.nblocks)
        hit = ev = 0
        S, segments = st.seg, self.segments
        for key in st.keys:
            if hit >= limit:
                break
            seg = segments.get(key)
            if seg is None:
                break
            e = min(seg.cached, limit - hit)
            m = max(seg.holders, default=0)
            if e > m:
                ev += e - m
            hit += e
            if seg.cached < S:
                break
        return hit, ev

    def acquire(self, r, hit: int) -> None:
        """``r`` is admitted holding its first ``hit`` blocks from the cache (``peek``'s)."""
        st = r.prefix
        if st is None:
            return
        n = r.prompt + r.generated
        st.queried += n
        st.hit += hit * self.B
        st.hit_blocks = hit
        self.queries += n
        self.hits += hit * self.B
        st.chain, st.stopped = hit, False
        S, segments, shared, j = st.seg, self.segments, 0, 0
        while hit > 0:
            seg = segments[st.keys[j]]
            e = min(S, hit)
            m = max(seg.holders, default=0)
            if e > m:
                self._touch(seg, m, e)
            shared += min(e, m)
            seg.holders.append(e)
            hit -= e
            j += 1
        if shared:   # the scheduler counts shared blocks per holder: once is physical
            self.pool.give(shared)

    def register(self, r, tokens: int) -> None:
        """``r``'s full blocks within its first ``tokens`` (computed or being computed)
        and named by its hash ids become cached, as vLLM's ``cache_full_blocks``."""
        st = r.prefix
        if st is None or st.stopped:
            return
        target = min(tokens // self.B, st.nblocks)
        c, S, segments = st.chain, st.seg, self.segments
        while c < target:
            j, k = divmod(c, S)
            key = st.keys[j]
            seg = segments.get(key)
            if seg is None:
                seg = segments[key] = Segment()
            if seg.cached != k:      # cached meanwhile by another request: a duplicate
                st.stopped = True
                break
            e = min(S, target - j * S)
            seg.cached = e
            if k:
                seg.holders.remove(k)
            seg.holders.append(e)
            self.cached_blocks += e - k
            c = j * S + e
        st.chain = c

    def release(self, r, blocks: int, free: int) -> None:
        """``r`` leaves the running set holding ``blocks`` (the scheduler's count; ``free``:
        empty + evictable before): its blocks join the queue's tail last block first, its
        cached ones staying cached (vLLM's ``free``)."""
        st = r.prefix
        if st is None and not self.queue:
            return                 # nothing cached anywhere: the queue is only empty blocks
        self.sync(free)
        chain = st.chain if st is not None else 0
        if blocks > chain:
            self._append(None, 0, blocks - chain)
        if not chain:
            return
        S, segments, shared = st.seg, self.segments, 0
        for j in range((chain - 1) // S, -1, -1):
            key = st.keys[j]
            seg = segments[key]
            e = min(S, chain - j * S)
            seg.holders.remove(e)
            m = max(seg.holders, default=0)
            if e > m:
                self._append(key, m, e, seg)
            shared += min(e, m)
        st.chain = 0
        if shared:
            self.pool.take(shared)

    def block_ids(self, r) -> list[tuple[int, int]]:
        """A stable id (segment key, index) for each cached block ``r`` holds, in order: the
        same id is the same cached block for every request (for executor block reuse)."""
        st = r.prefix
        if st is None:
            return []
        return [(st.keys[i // st.seg], i % st.seg) for i in range(st.chain)]

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
blocks, least recently freed first) is a queue of *batches*, one per release, each a list
of pieces ``[segment key or None (empty blocks), lo, hi]`` in the order vLLM appends the
blocks; pops for new blocks are applied lazily (:meth:`sync`) before anything whose
outcome depends on the queue's order. While no cached block is free the queue is one count
of empty blocks, so a trace without hash ids costs nothing here.

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
    """Cached leading blocks of one segment, the running holders' extents (``top``: the
    largest), and its pieces in the free queue (earliest queued first: they hold its
    highest free blocks, ``[top, cached)`` in all)."""

    __slots__ = ("cached", "holders", "top", "runs")

    def __init__(self):
        self.cached = 0
        self.holders: list[int] = []
        self.top = 0
        self.runs: list[list] = []


class PrefixState:
    """A request's view of the cache: its segment keys, the leading blocks it holds as
    cached blocks (``chain``), and what its admissions queried and hit (tokens): its first
    (``queried``, ``hit``) apart from those after a preemption (``requeried``, ``rehit``),
    as vLLM's ``PrefixCacheStats.record`` counts a preempted request's lookup apart."""

    __slots__ = ("keys", "seg", "nblocks", "chain", "stopped", "queried", "hit", "hit_blocks",
                 "requeried", "rehit")

    def __init__(self, keys: list[int], seg: int, nblocks: int):
        self.keys = keys          # chain hash per segment
        self.seg = seg            # KV blocks per segment
        self.nblocks = nblocks    # full KV blocks the hash ids name
        self.chain = 0
        self.stopped = False      # met a concurrent duplicate: registers no more
        self.queried = 0
        self.hit = 0
        self.hit_blocks = 0       # leading blocks hit at the latest admission
        self.requeried = 0
        self.rehit = 0


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
        self.queue: OrderedDict[int, list] = OrderedDict()   # id -> [next piece, pieces]
        self.loose = 0            # empty blocks at the queue's head, ahead of every batch
        self.qlen = 0             # blocks in the free queue (empty + evictable)
        self.evictable = 0        # cached blocks in the free queue
        self.cached_blocks = 0    # cached blocks, held or evictable
        self.evicted = 0          # cached blocks evicted so far (only ever grows)
        self.queries = 0          # prefix_cache_queries (tokens looked up at admissions)
        self.hits = 0             # prefix_cache_hits (tokens found)
        # a preempted request's lookups, counted apart as vLLM does (not in its hit rate)
        self.preempted_queries = 0
        self.preempted_hits = 0
        self._bid = 0

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
        if not self.evictable:     # only empty blocks: their order does not matter
            if self.queue:
                self.queue.clear()
            self.loose = self.qlen = free
            return
        excess = self.qlen - free
        if excess > 0:
            self._pop(excess)
        elif excess < 0:           # freed outside the cache (an adapter's pages): empty
            self._batch([[None, 0, -excess]], -excess, 0)

    def _pop(self, n: int) -> None:
        """Take ``n`` blocks from the queue's head, evicting the cached ones."""
        self.qlen -= n
        k = self.loose if self.loose < n else n
        self.loose -= k
        n -= k
        q, segments = self.queue, self.segments
        while n:
            batch = q[next(iter(q))]
            pieces, i = batch[1], batch[0]
            while n and i < len(pieces):
                p = pieces[i]
                k = p[2] - p[1]
                if k > n:
                    k = n
                p[2] -= k
                n -= k
                if k and p[0] is not None:   # evict from the segment's top
                    seg = segments[p[0]]
                    seg.cached = p[2]
                    self.evictable -= k
                    self.cached_blocks -= k
                    self.evicted += k
                    if p[1] == p[2]:
                        seg.runs.pop(0)
                        if not seg.cached:
                            del segments[p[0]]
                if p[1] == p[2]:
                    i += 1
            if i == len(pieces):
                q.popitem(last=False)
            else:
                batch[0] = i

    def _batch(self, pieces: list, n: int, cached: int) -> None:
        """``pieces`` (``n`` blocks, ``cached`` of them cached) join the queue's tail."""
        self.qlen += n
        self.evictable += cached
        if not cached and not self.queue:
            self.loose += n
            return
        self.queue[self._bid] = [0, pieces]
        self._bid += 1

    def _touch(self, seg: Segment, lo: int, hi: int) -> None:
        """Take the evictable blocks ``[lo, hi)`` of ``seg`` out of the queue (a hit)."""
        n = hi - lo
        self.qlen -= n
        self.evictable -= n
        runs = seg.runs
        while n:
            p = runs[-1]                  # the latest queued piece holds the lowest blocks
            k = p[2] - p[1]
            if k > n:
                k = n
            p[1] += k
            n -= k
            if p[1] == p[2]:
                runs.pop()

    # -- what the scheduler calls ----------------------------------------------------------
    def peek(self, r, free: int) -> tuple[int, int]:
        """(leading blocks of ``r`` cached, how many of them are evictable) at admission:
        at most ``num_tokens - 1`` tokens, in full blocks. ``free``: empty + evictable
        blocks now. Changes nothing but applying pending pops."""
        st = self.state(r)
        if st is None or not self.segments:
            return 0, 0
        self.sync(free)
        limit = (r.prompt + r.generated - 1) // self.B
        if limit > st.nblocks:
            limit = st.nblocks
        hit = ev = 0
        S, segments = st.seg, self.segments
        for key in st.keys:
            if hit >= limit:
                break
            seg = segments.get(key)
            if seg is None:
                break
            c = seg.cached
            e = c if c < limit - hit else limit - hit
            if e > seg.top:
                ev += e - seg.top
            hit += e
            if c < S:
                break
        return hit, ev

    def acquire(self, r, hit: int) -> None:
        """``r`` is admitted holding its first ``hit`` blocks from the cache (``peek``'s)."""
        st = r.prefix
        if st is None:
            return
        n = r.prompt + r.generated
        if r.preemptions:   # vLLM: preempted_queries/_hits, outside prefix_cache_queries/_hits
            st.requeried += n
            st.rehit += hit * self.B
            self.preempted_queries += n
            self.preempted_hits += hit * self.B
        else:
            st.queried += n
            st.hit += hit * self.B
            self.queries += n
            self.hits += hit * self.B
        st.hit_blocks = hit
        st.chain, st.stopped = hit, False
        S, segments, shared, j = st.seg, self.segments, 0, 0
        while hit > 0:
            seg = segments[st.keys[j]]
            e = S if S < hit else hit
            m = seg.top
            if e > m:
                self._touch(seg, m, e)
                seg.top = e
                shared += m
            else:
                shared += e
            seg.holders.append(e)
            hit -= e
            j += 1
        if shared:   # the scheduler counts shared blocks per holder: once is physical
            self.pool.give(shared)

    def register(self, r, tokens: int, free: int) -> None:
        """``r``'s full blocks within its first ``tokens`` (computed or being computed)
        and named by its hash ids become cached, as vLLM's ``cache_full_blocks`` after
        ``allocate_slots``: ``free`` (empty + evictable now) applies the pops before, which
        may have evicted a block ``r`` would otherwise find cached."""
        st = r.prefix
        if st is None or st.stopped:
            return
        target = tokens // self.B
        if target > st.nblocks:
            target = st.nblocks
        if target <= st.chain:
            return
        self.sync(free)
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
            e = target - j * S
            if e > S:
                e = S
            seg.cached = seg.top = e  # every other holder holds at most k < e
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
        chain = st.chain if st is not None else 0
        if not chain and not self.evictable:
            return                 # nothing cached is free: the queue is only empty blocks
        self.sync(free)
        pieces = [[None, 0, blocks - chain]] if blocks > chain else []
        if not chain:
            self._batch(pieces, blocks, 0)
            return
        S, segments, keys = st.seg, self.segments, st.keys
        shared = freed = 0
        last = (chain - 1) // S
        e = chain - last * S
        for j in range(last, -1, -1):
            key = keys[j]
            seg = segments[key]
            h = seg.holders
            h.remove(e)
            if e == seg.top:
                seg.top = max(h) if h else 0
            m = seg.top
            if e > m:
                p = [key, m, e]
                pieces.append(p)
                seg.runs.append(p)
                freed += e - m
                shared += m
            else:
                shared += e
            e = S
        st.chain = 0
        self._batch(pieces, blocks - chain + freed, freed)
        if shared:
            self.pool.take(shared)

    def block_ids(self, r, start: int = 0) -> list[tuple[int, int]]:
        """A stable id (segment key, index) for each cached block ``r`` holds, in order,
        from its ``start``-th: the same id is the same cached block for every request (for
        executor block reuse)."""
        st = r.prefix
        if st is None:
            return []
        return [(st.keys[i // st.seg], i % st.seg) for i in range(start, st.chain)]

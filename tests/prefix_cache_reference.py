"""vLLM V1's prefix cache, block by block, in plain dicts and lists: the reference the
twin's ``twin.sched.prefix_cache`` is checked against (``tests/test_prefix_cache.py``).

Transcribed from vLLM's source, sharing no code with ``twin/sched``:

- ``vllm/v1/core/kv_cache_utils.py``: ``hash_block_tokens(parent_hash, tokens, extra_keys)``
  for each *full* block, the extra keys holding the LoRA name; here a block's tokens are
  named by the trace's hash ids that cover it (and where it starts in the first of them).
- ``vllm/v1/core/block_pool.py``: ``BlockPool`` with ``free_block_queue`` (all free
  blocks, cached or not, least recently freed at the head), ``cached_block_hash_to_block``,
  ``get_new_blocks`` (pop from the head, evicting a cached block's hash), ``touch`` (a hit
  block leaves the queue, ref_cnt + 1), ``free_blocks`` (ref_cnt - 1, appended at the tail
  when 0), ``get_num_free_blocks``.
- ``vllm/v1/core/kv_cache_manager.py``: ``get_computed_blocks`` (longest hit, at most
  ``num_tokens - 1`` tokens), ``allocate_slots`` (new blocks + evictable hit blocks must be
  free; full blocks cached at schedule time), ``free`` (the request's blocks in reverse).

The twin's one deviation is kept here too: a block someone else cached meanwhile (a
concurrent duplicate) is not cached again, and its request caches no further block.
"""

from __future__ import annotations

from collections import OrderedDict


def block_hashes(hash_ids, hash_block_size: int, block_size: int, adapter: int) -> list:
    """The chain of full-block hashes a request's hash ids name (vLLM's block_hashes)."""
    out, parent = [], None
    n_blocks = len(hash_ids) * hash_block_size // block_size
    for i in range(n_blocks):
        first, last = i * block_size, (i + 1) * block_size - 1
        covering = tuple(hash_ids[first // hash_block_size: last // hash_block_size + 1])
        parent = (parent, covering, first % hash_block_size, adapter)   # exact, no hashing
        out.append(parent)
    return out


class RefRequest:
    def __init__(self, adapter, hash_ids, hash_block_size, num_tokens, block_size=None):
        self.adapter = adapter
        self.num_tokens = num_tokens
        self.hashes = ([] if hash_ids is None else
                       block_hashes(hash_ids, hash_block_size, block_size or BLOCK, adapter))
        self.blocks: list[int] = []        # block ids, in order
        self.num_cached = 0                # leading blocks cached (own or hit)
        self.stopped = False
        self.computed = 0


BLOCK = 16


class RefPrefixCache:
    """BlockPool + KVCacheManager for one request group, block ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK):
        self.B = block_size
        self.ref = [0] * num_blocks
        self.hash = [None] * num_blocks
        self.queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict = {}             # block hash -> block id
        self.evictions = 0

    def num_free(self) -> int:
        return len(self.queue)

    def num_evictable(self) -> int:
        return sum(1 for b in self.queue if self.hash[b] is not None)

    def longest_hit(self, req: RefRequest) -> list[int]:
        limit = (req.num_tokens - 1) // self.B
        hit = []
        for h in req.hashes[:limit]:
            b = self.cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def allocate(self, req: RefRequest, hit: list[int], tokens: int) -> bool:
        """Admission: ``hit`` blocks then room for ``tokens`` tokens in all."""
        need = -(-tokens // self.B) - len(hit)
        evictable = sum(1 for b in hit if self.ref[b] == 0)
        if need + evictable > self.num_free():
            return False
        for b in hit:                       # touch
            if self.ref[b] == 0:
                del self.queue[b]
            self.ref[b] += 1
        req.blocks = list(hit)
        req.num_cached = len(hit)
        req.stopped = False
        req.computed = len(hit) * self.B
        self._new_blocks(req, need)
        return True

    def grow(self, req: RefRequest, tokens: int) -> bool:
        need = -(-tokens // self.B) - len(req.blocks)
        if need > self.num_free():
            return False
        self._new_blocks(req, need)
        return True

    def _new_blocks(self, req: RefRequest, n: int) -> None:
        for _ in range(n):
            b, _ = self.queue.popitem(last=False)
            if self.hash[b] is not None:    # evict
                del self.cached[self.hash[b]]
                self.evictions += 1
                self.hash[b] = None
            self.ref[b] = 1
            req.blocks.append(b)

    def cache_full_blocks(self, req: RefRequest, tokens: int) -> None:
        target = min(tokens // self.B, len(req.hashes))
        while not req.stopped and req.num_cached < target:
            i = req.num_cached
            h = req.hashes[i]
            if h in self.cached:
                req.stopped = True
                break
            b = req.blocks[i]
            self.cached[h] = b
            self.hash[b] = h
            req.num_cached += 1

    def free(self, req: RefRequest) -> None:
        for b in reversed(req.blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.queue[b] = None
        req.blocks = []
        req.num_cached = 0

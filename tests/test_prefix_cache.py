"""The prefix cache (``twin.sched.prefix_cache``) against vLLM's, block by block
(``tests/prefix_cache_reference.py``), on random streams of admissions with hits, growth
and frees over several adapters and hash block sizes."""

from __future__ import annotations

import random

import pytest

from tests.prefix_cache_reference import BLOCK, RefPrefixCache, RefRequest
from twin.sched.kv_pool import KVBlockPool
from twin.sched.prefix_cache import PrefixCache
from twin.sched.request import Request


class Pair:
    """One request on both sides."""

    def __init__(self, i, adapter, ids, hbs, num_tokens):
        self.twin = Request(i, i, 0.0, adapter, num_tokens, 1, ids, hbs)
        self.ref = RefRequest(adapter, ids, hbs, num_tokens)
        self.num_tokens = num_tokens


def random_ids(rng: random.Random, seqs: list, hbs: int, max_ids: int = 5):
    """A request's hash ids: often a known sequence's prefix extended by fresh ids (a
    shared system prompt, a conversation's next turn), sometimes none at all."""
    if rng.random() < 0.1:
        return None, rng.randint(1, 60)
    base = list(rng.choice(seqs)[:rng.randint(0, max_ids)]) if seqs and rng.random() < 0.8 else []
    ids = base + [rng.randrange(10**6) for _ in range(rng.randint(0, 2))]
    if not ids:
        ids = [rng.randrange(10**6)]
    seqs.append(tuple(ids))
    cover = len(ids) * hbs
    return tuple(ids), rng.randint(max(1, cover - hbs), cover + rng.choice([0, 0, 20]))


def free_count(pool) -> int:
    return pool.num_blocks - pool.used


def check_same(pc: PrefixCache, ref: RefPrefixCache, pool) -> None:
    pc.sync(free_count(pool))
    assert free_count(pool) == ref.num_free()
    assert pc.qlen == ref.num_free()
    assert pc.cached_blocks == len(ref.cached)
    assert pc.evictable == ref.num_evictable()


def run_stream(seed: int, hbs: int, num_blocks: int = 48, ops: int = 400) -> dict:
    rng = random.Random(seed)
    pool = KVBlockPool(num_blocks, BLOCK)
    pc, ref = PrefixCache(pool), RefPrefixCache(num_blocks)
    seqs: list = []
    running: list[Pair] = []
    stats = {"hits": 0, "admitted": 0, "evicted_hits_lost": 0}
    for i in range(ops):
        op = rng.random()
        if op < 0.45 or not running:
            ids, tokens = random_ids(rng, seqs, hbs)
            p = Pair(i, rng.choice([-1, 0, 1]), ids, hbs, tokens)
            hit_blocks = ref.longest_hit(p.ref)
            hit, ev = pc.peek(p.twin, free_count(pool))
            assert hit == len(hit_blocks)
            assert ev == sum(1 for b in hit_blocks if ref.ref[b] == 0)
            n = rng.randint(1, tokens - hit * BLOCK)
            nb = pool.blocks_for(hit * BLOCK + n)
            fits = ref.allocate(p.ref, hit_blocks, hit * BLOCK + n)
            assert fits == (nb - hit + ev <= free_count(pool))
            if fits:
                pc.acquire(p.twin, hit)
                pool.take(nb)
                p.twin.blocks, p.twin.computed = nb, hit * BLOCK
                pc.register(p.twin, hit * BLOCK + n, free_count(pool))
                ref.cache_full_blocks(p.ref, hit * BLOCK + n)
                p.twin.computed += n
                running.append(p)
                stats["hits"] += hit
                stats["admitted"] += 1
        elif op < 0.75:
            p = rng.choice(running)
            left = p.num_tokens - p.twin.computed
            if left <= 0:
                continue
            n = rng.randint(1, left)
            nb = pool.blocks_for(p.twin.computed + n) - p.twin.blocks
            fits = ref.grow(p.ref, p.twin.computed + n)
            assert fits == (nb <= free_count(pool))
            if fits:
                pool.take(nb)
                p.twin.blocks += nb
                pc.register(p.twin, p.twin.computed + n, free_count(pool))
                ref.cache_full_blocks(p.ref, p.twin.computed + n)
                p.twin.computed += n
        else:
            p = running.pop(rng.randrange(len(running)))
            pc.release(p.twin, p.twin.blocks, free_count(pool))
            pool.give(p.twin.blocks)
            p.twin.blocks = 0
            ref.free(p.ref)
        check_same(pc, ref, pool)
    stats["evictions"] = ref.evictions
    return stats


@pytest.mark.parametrize("hbs", [16, 32, 48, 24, 8])
@pytest.mark.parametrize("seed", range(6))
def test_prefix_cache_matches_vllm_block_by_block(seed, hbs):
    stats = run_stream(seed, hbs)
    assert stats["admitted"] > 50
    assert stats["hits"] > 0     # the streams do exercise hits


def test_streams_exercise_eviction():
    """The differential streams do evict cached blocks (the comparison covers which)."""
    assert sum(run_stream(s, 32)["evictions"] for s in range(3)) > 20

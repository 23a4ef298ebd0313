"""Concrete KV block ids for the scheduler's block counts.

The scheduler's ``KVBlockPool`` only counts blocks; the executor needs to know *which*
blocks of the paged cache hold a request's keys and values. ``PagedBlockTables`` keeps a
free list and one block table per request: before each step a request's table is extended
to cover the tokens it will have computed by the end of the step, and the whole table goes
back to the free list when the request finishes or is preempted (recompute).

The free list is LIFO, so a freed block is the next one handed out: reuse happens as soon
as possible, which is what the KV-reuse tests want to exercise. The scheduler has already
checked capacity, so running out of blocks here is a bug (AssertionError), never a
condition to handle.
"""

from __future__ import annotations


class PagedBlockTables:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        # pop() from the end hands out 0, 1, 2, ... on a fresh pool
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @property
    def used(self) -> int:
        """Blocks held by all tables."""
        return self.num_blocks - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def __contains__(self, key: int) -> bool:
        return key in self._tables

    def table(self, key: int) -> list[int]:
        """The block ids of ``key`` (empty if it holds none)."""
        return self._tables.get(key, [])

    def ensure(self, key: int, tokens: int) -> list[int]:
        """Extend ``key``'s table to hold ``tokens`` tokens; returns the table."""
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = []
        need = -(-int(tokens) // self.block_size) - len(t)
        if need > 0:
            assert need <= len(self._free), (
                f"KV block tables: request {key} needs {need} more block(s) for {tokens} "
                f"tokens but only {len(self._free)} are free; the scheduler's block count and "
                "the executor's block tables disagree (a bug)")
            t.extend(self._take(need))
        return t

    def before_step(self, plan, items) -> None:
        """Hook before a step's tables are extended (the prefix cache's tables use it)."""

    def ensure_for(self, r, start: int, tokens: int) -> list[int]:
        """Request ``r``'s table extended to hold ``tokens`` tokens (``start``: its
        computed tokens; the prefix cache's tables read their hits there)."""
        return self.ensure(r.idx, tokens)

    def release(self, key: int) -> int:
        """Return all of ``key``'s blocks to the free list; returns how many."""
        return self._give(self._tables.pop(key, None))

    def _take(self, n: int) -> list[int]:
        """The next ``n`` free blocks, in the order a fresh pool hands them out."""
        free = self._free
        t = list(reversed(free[len(free) - n:]))
        del free[len(free) - n:]
        return t

    def _give(self, table: list[int] | None) -> int:
        """Blocks back to the free list, the last given out first handed out again."""
        if not table:
            return 0
        self._free.extend(reversed(table))
        return len(table)

"""KV-cache block pool: a counter of fixed-size blocks, as vLLM V1's ``BlockPool`` sees it.

The scheduler only needs counts; the executor maps counts to concrete block ids with its
own ``PagedBlockTables`` (the scheduler has already checked that enough blocks are free).
With prefix caching, ``used`` is the prefilling requests' blocks less the surplus of blocks
several running requests share (``twin.sched.prefix_cache``), so that ``used`` plus the
decode group's blocks is what is held, each block once (``used`` alone may then be
negative); cached blocks no one holds count as free, as in vLLM.
"""

from __future__ import annotations


class KVBlockPool:
    __slots__ = ("num_blocks", "block_size", "used")

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1:
            raise ValueError(f"KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.used = 0

    @property
    def free(self) -> int:
        return self.num_blocks - self.used

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens (ceil division)."""
        return -(-tokens // self.block_size)

    def take(self, n: int) -> None:
        """Count ``n`` more blocks as used; every caller goes through here, not ``used +=``."""
        self.used += n

    def give(self, n: int) -> None:
        """Return ``n`` blocks to the pool (the caller held them)."""
        self.used -= n

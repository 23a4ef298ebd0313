"""A request leaving the running set hands its full blocks to the prefix cache.

A mixin of ``twin.sched.scheduler.Scheduler`` (uses its pool, decode group and prefix
cache), apart so the scheduling step reads on its own: vLLM caches a request's full blocks
as they are computed and frees them, cached ones evictable, when it finishes or is
preempted.
"""

from __future__ import annotations

from twin.sched.request import Request


class CacheLeaving:
    """``_leave_cache`` / ``_leave_group`` for :class:`twin.sched.scheduler.Scheduler`."""

    def _leave_cache(self, r: Request, computed: int, blocks: int, uncounted: int = 0) -> None:
        """``r`` leaves the running set with ``computed`` tokens in ``blocks`` blocks, of
        which ``uncounted`` are already out of the scheduler's counts: its full blocks are
        cached, then freed (cached ones stay, evictable)."""
        if r.prefix is None and not self.prefix.evictable:
            return   # nothing to cache, nothing cached is free: the queue is empty blocks
        pool = self.pool
        free = pool.num_blocks - pool.used - self.group.held_blocks() - uncounted
        self.prefix.register(r, computed, free)
        self.prefix.release(r, blocks, free)

    def _leave_group(self, finished: list[Request]) -> None:
        """Decoders that finished together leave the cache one by one (their blocks are
        out of the group's count already)."""
        if not self.prefix.evictable and all(r.prefix is None for r in finished):
            return
        blocks = [self.pool.blocks_for(r.prompt + r.output - 1) for r in finished]
        pending = sum(blocks)
        for r, b in zip(finished, blocks):
            self._leave_cache(r, r.prompt + r.output - 1, b, pending)
            pending -= b

"""Taking a running request out of the scheduler before it finishes (the executor's aborts).

A mixin of ``twin.sched.scheduler.Scheduler``, apart so the scheduling step reads on its own:
an aborted request's KV blocks and adapter are released as a finished one's are.
"""

from __future__ import annotations

from twin.sched.request import Request, RequestStatus
from twin.sched.step_plan import StepPlan

PREFILLING, DECODING, ABORTED = (RequestStatus.PREFILLING, RequestStatus.DECODING,
                                 RequestStatus.ABORTED)


class Aborts:
    """``abort`` for :class:`twin.sched.scheduler.Scheduler` (uses its pool, group, cache,
    prefilling list and prefix cache)."""

    def abort(self, req: Request, plan: StepPlan | None = None) -> None:
        """Take a prefilling request out of the running set (the executor aborts requests
        whose adapter failed to load): its KV blocks are freed, its adapter released and
        its status set to ABORTED. With ``plan`` (the current step, not yet finished) its
        share of that step is removed too, so ``finish_step`` never sees it.

        Between steps (no ``plan``) a decoding request can be aborted too (the executor
        stops a request whose logits became non-finite); it leaves the decode group.
        """
        if req.status == DECODING and plan is None:
            c = self.group.remove(req)          # the group keeps counts lazily: settle them
            req.computed = c
            req.generated = c - req.prompt + 1
            if self.caching:
                self._leave_cache(req, c, self.pool.blocks_for(c), self.pool.blocks_for(c))
            req.status = ABORTED
            if req.adapter >= 0:
                self.cache.release(req.adapter)
            return
        if req.status != PREFILLING:
            raise ValueError(f"abort: only prefilling requests (or decoding ones between "
                             f"steps) can be aborted, got {req!r}")
        self.prefilling.remove(req)
        if plan is not None:
            for j, (r, n) in enumerate(plan.explicit):
                if r is req:
                    del plan.explicit[j]
                    self._sub_chunk(plan, r, n)
                    break
            if req in plan.admitted:
                plan.admitted.remove(req)
            plan.kv_blocks -= req.blocks
        if self.caching:
            self._leave_cache(req, req.computed, req.blocks)
        self.pool.give(req.blocks)
        req.blocks = 0
        req.status = ABORTED
        if req.adapter >= 0:
            self.cache.release(req.adapter)
        if plan is not None:
            plan.adapters = len(self.cache.in_use)

    def _sub_chunk(self, plan: StepPlan, r: Request, n: int) -> None:
        """Undo :meth:`_add_chunk` (same classification: r has not advanced yet)."""
        if n == 1 and r.generated > 0 and r.computed + 1 == r.num_tokens:
            plan.decode_n -= 1
            plan.decode_ctx -= r.computed + 1
            if r.adapter >= 0:
                plan.decode_lora -= 1
            return
        plan.prefill_tokens -= n
        plan.prefill_n -= 1
        plan.prefill_ctx -= n * (r.computed + n)
        if r.computed:
            plan.prefill_ctx_n -= 1
        if r.adapter >= 0:
            plan.prefill_lora_tokens -= n

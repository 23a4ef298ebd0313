"""The cyclic garbage collector with the start-up heap frozen, as vLLM's engine runs.

A process that serves has imported torch, pandas and the twin first: ~2 x 10^5 objects
that live until it exits. CPython's collector scans all of them in every full
(generation-2) collection, which a run's own allocations trigger now and then: a 150-180 ms
pause on this repo's CPU box (measured: ``gc.collect()`` with torch and the twin loaded,
214k objects, 163-178 ms; in an executor validation of ``rank-mix-8to64-16a-ml4`` one
such collection, 148 ms, landed inside a served run and became that run's p99 TTFT). vLLM
does not pay it: its workers call ``freeze_gc_heap()`` (``gc.collect(); gc.freeze()``) at
the end of ``compile_or_warm_up_model``, so a later full collection scans only what the
run created. The reference executor does the same over its runs (:func:`frozen_heap`);
a process of its own that serves until it exits freezes once (:func:`freeze_startup_heap`).
"""

from __future__ import annotations

import contextlib
import gc


def freeze_startup_heap() -> None:
    """Collect once and freeze what survives, for good (a serving process's start-up)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def frozen_heap(enabled: bool = True):
    """The heap frozen for the ``with`` body and thawed after (a library call inside a
    user's process leaves the collector as it found it). Nested or inside a process that
    froze already, it does nothing: one collection per session of runs, not per run (a
    calibration serves ~100 cells; each full collection costs ~170 ms)."""
    if not enabled or gc.get_freeze_count():
        yield
        return
    freeze_startup_heap()
    try:
        yield
    finally:
        gc.unfreeze()


def gc_frozen() -> bool:
    """Whether a start-up heap is frozen now (a run's ``meta["gc_frozen"]``)."""
    return gc.get_freeze_count() > 0

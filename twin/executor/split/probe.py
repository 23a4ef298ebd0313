"""Where a split run's time goes, process by process, and the collector frozen at start-up.

**The GC heap.** Each split process imports torch, pandas and the twin (a few 10^5
objects) before it serves. CPython's cyclic collector scans all of them in every
generation-2 collection, which the run's own allocations trigger every few hundred steps:
a 100-250 ms pause of one process (the base: every client waits; a client: its step and
every request queued behind it). Each process freezes its start-up heap as vLLM's
workers do (``twin.executor.gc_heap``), so a later full collection scans only what the run
created.

**The probe** (``execute_split(probe=True)``): per process, its GC pauses
(:class:`GCPauses`), its thread's CPU time and its run-queue delay (time runnable but
waiting for a core, ``/proc/thread-self/schedstat``) over the run; the instants of each
base call on both sides of the pipe (the client's ``Exchange.calls_log``, the base's
``BaseServer.probe``) and, per client step, its CPU time and run-queue delay. It is off
by default: every figure of an unprobed run stays as it was.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pandas as pd

SCHEDSTAT = Path("/proc/thread-self/schedstat")
#: the client's per-call log (``Exchange.calls_log``)
CALL_COLUMNS = ["kind", "layer", "op", "rows", "bytes_in", "bytes_out", "copy_in_s",
                "t_send", "t_sent", "t_ready", "t_recv", "copy_out_s"]
#: the base's per-request log (``BaseServer.probe``)
BASE_CALL_COLUMNS = ["client", "batch", "t_send", "t_arrived", "t_start", "t_computed",
                     "t_answered"]
#: the client's per-step log (``ClientEngine.probe_rows``)
STEP_PROBE_COLUMNS = ["cpu_s", "run_delay_s"]
GC_COLUMNS = ["t_start", "pause_s", "generation", "collected"]


def schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of the calling thread
    since it started; (thread CPU time, 0) where the kernel keeps no schedstat."""
    try:
        on, wait = SCHEDSTAT.read_text().split()[:2]
        return int(on) * 1e-9, int(wait) * 1e-9
    except (OSError, ValueError):
        return time.thread_time(), 0.0


class GCPauses:
    """Every collection of this process while installed: (start, pause, generation,
    objects collected)."""

    def __init__(self):
        self.log: list[tuple] = []
        self._t = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.log.append((self._t, time.perf_counter() - self._t, info["generation"],
                             info["collected"]))

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


class ProcessProbe:
    """One process's figures between :meth:`start` and :meth:`report`."""

    def __init__(self):
        self.gc = GCPauses()
        self.t0 = time.perf_counter()
        self.sched0 = schedstat()

    def start(self) -> None:
        """Count from now (the run's start): the clock, the schedstat, the GC log."""
        self.t0, self.sched0 = time.perf_counter(), schedstat()
        self.gc.log.clear()

    def report(self, **tables) -> dict:
        """Wall, CPU and run-queue seconds since :meth:`start`, the GC pauses, and the
        given row lists as they are (the driver makes them tables)."""
        on, wait = schedstat()
        self.gc.close()
        return {"wall_s": time.perf_counter() - self.t0, "cpu_s": on - self.sched0[0],
                "run_delay_s": wait - self.sched0[1], "gc": self.gc.log, **tables}


def probe_tables(report: dict, t0: float, columns: dict) -> dict:
    """A process's probe report with its row lists as tables (``columns``: name ->
    column names) and its instants relative to ``t0`` (the clients' common start)."""
    out = dict(report)
    out["gc"] = pd.DataFrame(report["gc"], columns=GC_COLUMNS)
    out["gc"]["t_start"] -= t0
    for name, cols in columns.items():
        df = pd.DataFrame(report.get(name, []), columns=cols)
        for c in cols:
            if c.startswith("t_"):
                df[c] -= t0
        out[name] = df
    return out

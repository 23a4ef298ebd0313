"""Executor replicas in processes of their own, routed in real time (``twin validate
--replicas N --replica-processes``).

The default fleet validation (``twin.validate.fleet``) steps N executor replicas on one
thread in logical time, so both sides run the very same event loop; but the replicas'
steps then alternate on one core, and their KV caches and LoRA slots share its caches
(+5-10% per step, measured: experiments/README_fleet.md), which separate GPUs do not.
Here each replica is a process (``twin.executor.live.LiveEngine``, one torch thread),
and this process is the router. A router that reads no state routes the trace as the twin
does, and each replica gets its share at the start, as a lone executor gets its trace. A
router that reads state picks each request ``ROUTE_LEAD_S`` before its arrival's wall
instant from what the replicas last published (``twin.fleet.view.PublishedView``: as of
each one's last step, plus what it sent since), as a real router reads its replicas' last
reports, and sends it; the replica releases it at its arrival.

The replicas run concurrently on the wall clock, so a run takes the trace's span, and
each replica should have a core: with fewer cores than replicas they time-share one and
the rig measures the box again (a warning says so).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from multiprocessing import connection
from multiprocessing.connection import Connection

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.executor.gc_heap import frozen_heap
from twin.fleet import make_router
from twin.fleet.fleet import progress_bar
from twin.fleet.report import combine_fleet
from twin.fleet.view import PublishedView
from twin.validate.run import warm_up

__all__ = ["check_live_fleet", "execute_live_fleet"]

START_LEAD_S = 0.05   # between the start message and logical 0: every replica is listening
#: a state-reading router routes a request this long before its arrival: the replica has it
#: when its clock reaches the arrival (a socket and a wake-up take ~0.1-1 ms; more on a
#: loaded box), and the router reads the replicas as of then (up to ~a step earlier)
ROUTE_LEAD_S = 0.005
#: how often the router empties the replicas' sockets while it waits for an arrival (a
#: socket holds ~300 reports: ~1 s of a busy replica's steps)
READ_EVERY_S = 0.1


def execute_live_fleet(trace, reps, blocks, router, m, model_dir, catalog, lora, *,
                       window_s, sample_dt, seed, refresh_s, routing, trace_source,
                       threads, warmup: bool, progress: bool = False):
    """One executor fleet run, each replica in its own process, routed in real time from
    this one. Arguments as ``twin.validate.fleet._execute_fleet``; each process loads the
    model in ``model_dir`` on the device and in the dtype of ``m``, the loaded one."""
    from twin.executor.inputs import checked_inputs   # lazy: needs torch

    if (os.cpu_count() or 1) < len(reps):
        warnings.warn(f"{len(reps)} replica processes on {os.cpu_count()} cores: replicas "
                      f"time-share a core, and the run measures the box", stacklevel=2)
    t0 = time.perf_counter()
    trace, xcat = checked_inputs(trace, lora, catalog, trace_source=trace_source)
    router = make_router(router, table=routing).bind(len(reps), xcat.adapters)
    meta = {"model": str(model_dir), "threads": threads, "trace": trace_source, "seed": seed,
            "time_scale": 1.0, "replica_processes": True}
    dtype = str(m.dtype).removeprefix("torch.")
    specs = [dict(trace=trace, config=r.config, model_dir=str(model_dir), dtype=dtype,
                  device=m.device.type,
                  catalog=xcat, num_gpu_blocks=nb, window_s=window_s, sample_dt=sample_dt,
                  seed=seed, meta=dict(meta, replica=k), threads=threads, warmup=warmup)
             for k, (r, nb) in enumerate(zip(reps, blocks))]
    aid = pd.Categorical(trace["adapter"], categories=xcat.adapters).codes.tolist()
    with _Replicas(specs) as procs:
        route = _route_live(procs, trace["arrival_s"].tolist(), aid, router, progress)
        results = procs.results()
    return combine_fleet(trace, reps, router, np.asarray(route, dtype=np.int64), results,
                         window_s, wall_s=time.perf_counter() - t0, refresh_s=0.0)


def check_live_fleet(model, refresh_s: float) -> None:
    """What replica processes cannot do, refused before anything is loaded."""
    if refresh_s:
        raise TwinInputError("--router-refresh-s is for the logical-time fleet: replica "
                             "processes are read as of their last step", field="refresh_s")
    if not isinstance(model, (str, os.PathLike)):
        raise TwinInputError("replica processes load the model themselves: pass a model "
                             "name or directory, not a loaded model", field="model")


def _route_live(procs, arrival, adapter, router, progress: bool) -> list[int]:
    """Route every arrival. A router that reads no state routes the whole trace at once,
    and each replica gets its share with the start (as a lone executor has its trace);
    one that reads state picks each request ``ROUTE_LEAD_S`` before its arrival's wall
    instant, from what the replicas have published by then, and sends it."""
    if not router.reads_state:
        route = router.route_all(adapter).tolist()
        procs.start([[j for j, k in enumerate(route) if k == r] for r in range(procs.n)],
                    publish=False)
        return route
    view = procs.view
    start = procs.start([[] for _ in range(procs.n)], publish=True)
    bar = progress_bar(progress, arrival[-1] if arrival else 0.0, "s", "executor fleet")
    route = [0] * len(arrival)
    for j, a in enumerate(arrival):
        procs.listen_until(start + a - ROUTE_LEAD_S)
        k = router.pick(adapter[j], view)
        route[j] = k
        view.sent(k)
        procs.send(k, ("row", j))
        if bar is not None and a >= bar.n + 1.0:
            bar.update(a - bar.n)
    if bar is not None:
        bar.close()
    return route


class _Replicas:
    """The replica processes: started, ready (built and warmed up, their first state
    published), fed, closed, their results collected; killed on any error."""

    def __init__(self, specs):
        # a fresh interpreter per replica (``python -m twin.validate.fleet_live FD``), not a
        # fork (torch's thread pools do not survive one) nor multiprocessing's spawn (it
        # re-imports the caller's main script); a socket pair carries pickled messages
        self.conns, self.procs = [], []
        self.view = PublishedView(len(specs))
        self._results, self._done = [None] * len(specs), [False] * len(specs)
        try:
            for spec in specs:
                mine, theirs = socket.socketpair()
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "twin.validate.fleet_live", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()]))
                theirs.close()
                self.conns.append(Connection(mine.detach()))
                self.send(len(self.conns) - 1, spec)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise

    def __enter__(self):
        try:
            for k in range(self.n):   # each replica's "ready" and first state
                while not self._take(k, self._recv(k)):
                    pass
        except BaseException:   # no __exit__ when __enter__ raises: the replicas end here
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, *exc):
        """Close the sockets; on an error kill every replica at once (one waiting for a
        message, or sleeping to its next arrival, would outlive the run), else let each
        end."""
        for c in self.conns:
            c.close()
        for p in self.procs:
            if exc_type is not None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    @property
    def n(self) -> int:
        return len(self.conns)

    def start(self, rows: list[list[int]], publish: bool) -> float:
        """Start every replica at one wall instant, replica ``k`` given ``rows[k]`` (the
        fleet trace's rows routed to it ahead of time, delivered before its clock starts);
        ``publish``: whether they report their state (a router that reads it)."""
        start = time.perf_counter() + START_LEAD_S
        for k, mine in enumerate(rows):
            self.send(k, ("start", start, mine, publish))
        return start

    def send(self, k: int, msg) -> None:
        """Send replica ``k`` a message; a replica that has exited raises what it said."""
        try:
            self.conns[k].send(msg)
        except OSError:   # a broken pipe: it failed (its traceback waits unread) or died
            while True:
                self._take(k, self._recv(k))

    def listen_until(self, wall: float) -> None:
        """Read what the replicas have published by the wall instant ``wall``: asleep
        until then, waking every ``READ_EVERY_S`` to empty the sockets (a wake per report
        would take a core from a replica hundreds of times a second)."""
        while (left := wall - time.perf_counter()) > 0:
            time.sleep(min(left, READ_EVERY_S))
            self._read_ready(self.conns, 0.0)
        self._read_ready(self.conns, 0.0)

    def results(self) -> list:
        """Close every replica and collect its RunResult, reading every replica's reports
        meanwhile: one left unread would be held in ``send`` once its socket's buffer
        (~300 reports) is full, its clock counting the wait, until the others ended."""
        for k in range(self.n):
            self.send(k, ("close",))
        while not all(self._done):
            self._read_ready([c for c, d in zip(self.conns, self._done) if not d], None)
        return self._results

    def _read_ready(self, conns, timeout) -> None:
        """Take every message waiting on ``conns``, waiting up to ``timeout`` (None: until
        one has some) for the first."""
        for c in connection.wait(conns, timeout=timeout):
            k = self.conns.index(c)
            while not self._done[k] and c.poll():
                self._take(k, self._recv(k))

    def _recv(self, k: int):
        try:
            return self.conns[k].recv()
        except EOFError:   # its end closed without an error message: killed
            raise RuntimeError(f"executor replica {k} exited without its result (killed? "
                               f"out of memory?)") from None

    def _take(self, k: int, msg) -> bool:
        """Act on replica ``k``'s message; True for "ready"."""
        kind = msg[0]
        if kind == "state":
            self.view.update(k, *msg[1:])
        elif kind == "result":   # None: nothing was routed to it
            self._results[k], self._done[k] = msg[1], True
        elif kind == "error":
            raise RuntimeError(f"executor replica {k} failed:\n{msg[1]}")
        return kind == "ready"


def replica_main(conn, spec: dict) -> None:
    """A replica process: build the executor (one model load, a warm-up run), publish its
    state, serve from the start instant until closed, send the result."""
    try:
        import torch   # lazy: the replica's process, torch's first import there

        from twin.executor.live import LiveEngine   # lazy: needs torch
        from twin.executor.model import LlamaModel   # lazy: needs torch

        if spec["threads"]:
            torch.set_num_threads(int(spec["threads"]))
        m = LlamaModel.from_pretrained(spec["model_dir"], device=torch.device(spec["device"]),
                                       dtype=getattr(torch, spec["dtype"]))
        trace, config, cat, nb = (spec[k] for k in ("trace", "config", "catalog",
                                                     "num_gpu_blocks"))
        if spec["warmup"]:
            warm_up(trace, config, m, cat, nb, spec["seed"])
        e = LiveEngine(trace, config, m, cat, num_gpu_blocks=nb, window_s=spec["window_s"],
                       sample_dt=spec["sample_dt"], seed=spec["seed"], meta=spec["meta"])
        # served with the start-up heap frozen, as a vLLM engine serves; thawed on return,
        # so a replica run on a thread of a process (tests) leaves that process as it was
        with frozen_heap():
            conn.send(("state", *e.state()))
            conn.send(("ready",))
            _, start, rows, publish = conn.recv()
            for row in rows:
                e.deliver(row)
            res = e.serve(conn, start, publish)
            conn.send(("result", res if len(e.rows) else None))
    except Exception:   # the parent raises it, with the replica's traceback
        conn.send(("error", traceback.format_exc()))


if __name__ == "__main__":   # a replica process: its socket's descriptor, then its spec on it
    _conn = Connection(int(sys.argv[1]))
    replica_main(_conn, _conn.recv())

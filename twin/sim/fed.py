"""A clock fed its requests one at a time by a router, instead of reading a trace it owns.

A fleet (``twin.fleet``) runs many servers in one event loop and decides, at each arrival,
which server gets it from the servers' state at that moment. A server's clock then cannot
look ahead at its own arrivals as ``twin.sim.simulate``'s does (to cut a run of quiet
decode steps at the first arrival that could change the schedule): it learns of an arrival
when it is delivered. :class:`FedClock` runs the same engine (``_Clock.engine``) with a
*sentinel* arrival at +inf after the ones delivered (the engine waits for it when idle as
for any arrival), and does at delivery what ``simulate``'s look-ahead did: an arrival
during a quiet decode run that could change the schedule cuts the run at the same step
(``steps_within``); one that cannot joins the queue at once. So a fed clock's run is the
run ``simulate`` makes of the requests it was fed: a fleet of one server, or a fleet whose
router reads no state, equals ``simulate`` request for request (``tests/test_fleet.py``).

The driver (``twin.fleet.loop``) resumes the engine generator itself, through a
:class:`ManualEnv` whose ``timeout(d)`` returns ``d``: wake times are the driver's heap's
(SimPy's arithmetic, ``now + delay``), arrivals go before steps at equal times, and a run
cut short is rescheduled, which a SimPy ``Timeout`` cannot be.
"""

from __future__ import annotations

import warnings
from array import array

import numpy as np
import pandas as pd

from twin.sim.engine import ManualEnv, _Clock, _result
from twin.workload.hash_ids import request_hashes

INF = float("inf")


class TraceColumns:
    """A fleet's trace as the per-row columns every fed clock reads from."""

    def __init__(self, trace: pd.DataFrame, catalog):
        self.trace = trace
        self.arrival = trace["arrival_s"].to_numpy(dtype="float64").tolist()
        # ints as arrays: 10^6 requests' Python ints would take ~30 bytes each, per column
        self.aid = array("q", pd.Categorical(trace["adapter"],
                                             categories=catalog.adapters).codes.astype("int64"))
        self.prompt = array("q", trace["prompt_tokens"].to_numpy(dtype="int64"))
        self.output = array("q", trace["output_tokens"].to_numpy(dtype="int64"))
        self.rid = array("q", trace["request_id"].to_numpy(dtype="int64"))
        self.hashes, _ = request_hashes(trace)    # prefix cache: None without hash_ids

    def release(self) -> None:
        """Drop the per-row columns once every clock is done (~80 MB for a fleet's hour of
        10^6 requests, before the result tables are built); the trace stays."""
        self.arrival = self.aid = self.prompt = self.output = self.rid = self.hashes = None


class FedClock(_Clock):
    """One server of a fleet: the engine, fed arrivals by :meth:`deliver`, resumed by
    :meth:`resume` at :attr:`wake` (INF: waiting for an arrival; None once done)."""

    def __init__(self, cols: TraceColumns, catalog, server, profile, *, window_s, sample_dt,
                 record_steps: bool = False):
        if profile.frontend.first_lora_request_s > 0:
            warnings.warn(f"profile {profile.name}: the frontend's first-request delay "
                          f"(frontend.first_lora_request_s) is not modelled in a fleet's "
                          f"event loop; this replica runs without it", stacklevel=2)
        super().__init__(cols.trace.iloc[:0], catalog, server, profile, window_s=window_s,
                         max_in_flight=None, record_steps=record_steps, sample_dt=sample_dt,
                         jump=True)
        self.cols = cols
        self.rows = array("q")               # the fleet's trace rows, in delivery order
        self.arrival = [INF]                 # + the sentinel the idle engine waits for
        self.aid, self.prompt, self.output, self.rid = (array("q") for _ in range(4))
        self.n = 1
        self.env = ManualEnv()
        self.gen = self.engine(self.env, None)
        self.wake: float | None = 0.0
        self.version = 0                     # the driver's heap entry that is current
        self.idle_since = 0.0
        self.pending = None                  # (dur, steps, next row) sent at the next resume
        self.run = None                      # the quiet decode run in flight, while it may be cut
        self.inbox = 0                       # delivered since the last resume, not yet queued
        self.end = 0.0

    # -- the engine's hooks --------------------------------------------------------------
    def decode_run(self, plan, f, now: float, steps: int, i: int):
        dur, cut, i = super().decode_run(plan, f, now, steps, i)
        self.run = (now, plan, f, steps, cut, dur, i)
        return dur, cut, i

    # -- the driver's side ---------------------------------------------------------------
    def resume(self) -> float | None:
        """Run the engine from :attr:`wake` to its next wait; the new wake (None: done)."""
        t = self.env.now = self.wake
        send, self.pending, self.run, self.inbox = self.pending, None, None, 0
        try:
            d = self.gen.send(send)
        except StopIteration:
            self.end, self.wake = t, None
            return None
        self.wake = w = t + d
        if w == INF:
            self.idle_since = t
        return w

    def deliver(self, row: int) -> float | None:
        """Row ``row`` of the fleet's trace arrives here now (at its arrival time). Returns
        the clock's new wake time when the arrival moved it (woke the idle engine, cut a
        run short), else None."""
        c = self.cols
        a, aid = c.arrival[row], c.aid[row]
        k = self.n - 1
        self.rows.append(row)
        arr = self.arrival
        arr[k] = a
        arr.append(INF)
        self.aid.append(aid)
        self.prompt.append(c.prompt[row])
        self.output.append(c.output[row])
        self.rid.append(c.rid[row])
        if self.hashes is not None:
            self.hashes.append(c.hashes[row])
        self.n = k + 2
        out = self.out
        if k >= len(out.output):
            out.resize(2 * k + 64)
        out.output[k] = c.output[row]
        w = self.wake
        if w == INF:   # the engine waits: it wakes as SimPy would after timeout(a - t)
            t = self.idle_since
            self.wake = t + (a - t)
            return self.wake
        run = self.run
        if run is None or not a < w:
            self.inbox += 1   # queued at the engine's next loop
            return None
        start, plan, f, quiet, steps, dur, i = run
        if self.sched.arrival_may_change(aid):   # cut the run as simulate's look-ahead does
            cut = min(steps, self.step_time.steps_within(f, plan.decode_n, quiet, a - start))
            if cut != steps:
                dur, first, last = self.step_time.decode_run(f, plan.decode_n, cut)
                self.rec.itl.replace_last(first, last, cut, plan.decode_n)
            self.run = None
            self.pending = (dur, cut, i)
            self.inbox += 1
            self.wake = start + dur
            return self.wake
        self.arrive(k)   # cannot change the schedule: queued on the way
        self.run = (start, plan, f, quiet, steps, dur, k + 1)
        self.pending = (dur, steps, k + 1)
        return None

    def close(self) -> float | None:
        """No more arrivals: drop the sentinel. An engine waiting for one is woken where
        it waits, to end there (the new wake), as ``simulate``'s ends after its last."""
        self.arrival.pop()
        self.n -= 1
        if self.wake == INF:
            self.wake = self.idle_since
            return self.wake
        return None

    def result(self, config, profile, window_s):
        """The server's RunResult over the requests it was fed (``simulate``'s)."""
        rows = np.frombuffer(self.rows, dtype=np.int64) if self.rows else np.zeros(0, np.int64)
        self.trace = self.cols.trace.iloc[rows].reset_index(drop=True)
        self.out.resize(len(rows))
        # the run is over: its per-row arrays are no longer read (a fleet's hour: ~80 MB)
        self.arrival = self.aid = self.prompt = self.output = self.rid = self.hashes = None
        self.rec.sample(self.end, self.sched)
        duration = window_s if window_s is not None else self.end
        return _result(self, config, profile, duration, window_s)

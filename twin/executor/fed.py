"""The reference executor as one replica of a fleet: fed its requests by a router, ticked
by the fleet's event loop.

``twin.fleet.loop.run_loop`` drives the twin's replicas (``twin.sim.fed.FedClock``) through
``resume`` / ``deliver`` / ``close`` and reads their state (``sched``, ``inbox``,
``server.cache``) for the router. :class:`FedEngine` offers the same to the executor, so
executor replicas run behind the very same router and loop code as the fleet twin
(``twin.validate.fleet``): the validation of the fleet twin against real engines.

Time. Each replica keeps the executor's logical clock: it advances by that replica's own
measured step durations (one step per ``resume``) and, when the replica is idle, jumps to
the arrival that wakes it. The replicas' steps are measured one after another on the same
thread, so the wall time between two resumes of a replica (the other replicas' steps, the
router) is taken out of its clock at each resume; what the replica itself did after its
step's end (its finished requests recorded) counts toward its next step, as in a lone
executor. A replica woken from idle first sleeps what is left of its wait
(``Clock.wait_until``): its first step after a wait then meets the cold caches a lone
executor's does (the twin's ``after_idle`` step); the sleep, outside the step, moves no
logical clock. A step is run and timed when the loop resumes the replica at the step's
start, and committed (requests finished, the step recorded) when it resumes it at the
step's end: arrivals routed meanwhile see the replica during the step, as the twin's
replicas show themselves (``twin.sim.engine`` commits a step at its end), not its
outcome ahead of time. The replicas run concurrently in logical time, as N servers
would, each step timed alone on one core; a fleet run takes about the sum of the
replicas' busy and idle times on the wall clock.
"""

from __future__ import annotations

import time
from array import array
from collections import deque

import numpy as np

from twin.executor.engine import _Engine
from twin.executor.loop_state import Arrivals

INF = float("inf")


class FedArrivals(Arrivals):
    """The fleet trace's requests, released only once delivered to this replica. Until
    :attr:`open` is cleared (no more arrivals) the replica counts as having arrivals to
    come, with the next at +inf when none is queued (the engine then waits)."""

    def __init__(self, trace, ids, enable_lora):
        super().__init__(trace, ids, enable_lora)
        self.inbox: deque[int] = deque()   # delivered rows not yet released
        self.open = True

    @property
    def left(self) -> int:
        return len(self.inbox) + int(self.open)

    @property
    def next_s(self) -> float:
        return self.arrival[self.inbox[0]] if self.inbox else INF

    def due(self, now: float):
        inbox = self.inbox
        while inbox and self.arrival[inbox[0]] <= now:
            yield self.request(inbox.popleft())


class FedEngine(_Engine):
    """One executor replica of a fleet, built on the whole fleet trace (request ids are
    the trace's rows) and fed its share by :meth:`deliver`; :attr:`wake` is when it next
    ticks (INF: waiting for a delivery; None: done)."""

    arrivals_class = FedArrivals

    def __init__(self, trace, config, model, catalog, *, num_gpu_blocks: int, window_s,
                 sample_dt: float, seed: int = 0, meta: dict | None = None,
                 keep_tokens: bool = False):
        super().__init__(trace, config, model, catalog, window_s=window_s, progress=False,
                         seed=seed, num_gpu_blocks=num_gpu_blocks, kv_cache_gib=None,
                         keep_tokens=keep_tokens, sample_dt=sample_dt, meta=dict(meta or {}))
        self._start_run()
        self.rows = array("q")   # the fleet's trace rows delivered here, in order
        self.wake: float | None = 0.0
        self.version = 0         # the driver's heap entry that is current
        self.paused = self.clock.wall   # when this replica last gave the thread back
        self.step = None   # the step run at the last resume, committed at the next one

    @property
    def inbox(self) -> int:
        """Delivered, not yet released to the scheduler (a router counts them in flight)."""
        return len(self.arrivals.inbox)

    def resume(self) -> float | None:
        """Tick once at :attr:`wake` (committing the step that ends there, or jumping there
        when idle); the new wake.

        The wall time since the last resume returned (other replicas' steps, the router)
        is taken out of this replica's clock, and only that: what this replica did after
        its last step's end (recording the requests it finished, a timeline sample) still
        counts toward its next step, as a lone executor's ``Clock`` counts it."""
        clock = self.clock
        shift = time.perf_counter() - self.paused   # the others' time: not this replica's
        clock.wall += shift
        if self.step is not None:   # the step measured at the last resume ends now
            step, nonfinite, end, dur = self.step
            self.step = None
            self._commit(step, nonfinite, end + shift, dur)
        elif self.wake > clock.now:   # idle until now: sleep the wait, as Clock.wait_until
            clock.wait_until(self.wake)
        self.wake = self._tick()
        self.paused = time.perf_counter()
        return self.wake

    def _commit_phase(self, step) -> float:
        """Sample and time the step now, commit it at its end (the next resume): until
        then a router reads this replica as it is during the step (its requests in flight,
        none finished), as the twin's clock, which commits a step at its end, shows it."""
        nonfinite = self._sample(step) if step.logits is not None else []
        end = time.perf_counter()
        dur = end - self.clock.wall
        self.step = (step, nonfinite, end, dur)
        return self.clock.now + dur

    def _token_ids_ahead(self) -> list:
        """None per row: a replica makes the token ids of the rows delivered to it only (at
        :meth:`deliver`, between its steps: outside its clock), not the whole fleet's."""
        return [None] * self.arrivals.n

    def deliver(self, row: int) -> float | None:
        """Row ``row`` arrives here now; returns the new wake when it woke the replica."""
        if self.prompt_ids[row] is None:   # not made ahead (twin.executor.live makes all)
            self.prompt_ids[row] = self._token_ids(row)
        self.rows.append(row)
        self.arrivals.inbox.append(row)
        if self.wake == INF:
            self.wake = self.arrivals.arrival[row]
            return self.wake
        return None

    def close(self) -> float | None:
        """No more arrivals: a waiting replica wakes where it is, to end."""
        self.arrivals.open = False
        if self.wake == INF:
            self.wake = self.clock.now
            return self.wake
        return None

    def result(self):
        """The replica's RunResult over the requests it was fed (rows in delivery order)."""
        self._record_unfinished()
        rows = np.frombuffer(self.rows, dtype=np.int64) if self.rows else np.zeros(0, np.int64)
        self.trace = self.trace.iloc[rows].reset_index(drop=True)
        duration = self.window_s if self.window_s is not None else self.clock.now
        return self._result(self.out.take(rows), self.rec, duration)

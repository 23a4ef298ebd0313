"""The reference executor as a fleet replica in a process of its own, fed in real time.

``twin.executor.fed`` runs N executor replicas on one thread in logical time: each step
is timed alone, but the replicas' steps alternate on one core, whose caches then hold
every replica's KV cache and LoRA slots. Measured on two tiny-model replicas, that adds
~5-10% to a step against the lone calibration (experiments/README_fleet.md), a cost of
the test rig that a fleet of separate GPUs does not have. :class:`LiveEngine` is the
other rig: one replica per process (one torch thread each, on a core of its own where
the box has one per replica), with the lone executor's loop and clock on the wall clock
as it is, fed the requests a router sends it as they arrive (:func:`serve`). (Measured on
the 2-core box, it is not the cleaner rig: two replicas stepping at once on two cores
are slower than interleaved on one; README_fleet, "Replica processes".)

For a router that reads state it publishes, after every tick that changed them, its
requests in flight (delivered, not finished), how many it has received, and where its
adapters reside (``twin.fleet.view.PublishedView`` reads them). So a router reads a
replica as of its last step, as a real router reads a replica's last report; the
requests it sent since are counted on top.

Time. Logical 0 is the wall instant the parent names at start (``time.perf_counter`` is
the system's monotonic clock, the same in every process), or the replica's own start when
it takes that message late (the lateness is no step's); the parent sends a request no
later than its arrival's wall instant (``twin.validate.fleet_live``: a state-free router's
share with the start, a state-reading router's picks a few ms ahead), and the replica
releases it when its clock reaches the arrival, as a lone executor releases its trace's.
A step's logical duration is its measured wall duration, as in a lone executor, and an
idle replica waits for the next delivery, then for its arrival (``Clock.wait_until``): its
first step after a wait is an after-idle step, as alone.
"""

from __future__ import annotations

import time

from twin.executor.engine import _Engine
from twin.executor.fed import INF, FedEngine
from twin.sched.adapter_cache import residency

__all__ = ["LiveEngine"]


class LiveEngine(FedEngine):
    """One executor replica in its own process: the fed replica's arrivals (an inbox of
    the fleet trace's rows) and result, the lone executor's clock (a step is committed when
    it ends, on the wall clock)."""

    _commit_phase = _Engine._commit_phase
    #: every row's token ids before the clock starts, as a lone executor makes its trace's
    #: (the fed replica makes them at delivery, between its logical steps; here a delivery
    #: falls between two steps on the wall clock, and ~0.1-0.3 ms a request would land in
    #: the next step, or delay the start when a share comes with it). The cost: each
    #: process holds the fleet trace's ids, as a lone executor of that trace would.
    _token_ids_ahead = _Engine._token_ids_ahead

    def state(self) -> tuple:
        """(requests in flight, requests received, adapters on the GPU, in host memory or
        None: every adapter)."""
        gpu, host = residency(self.cache)
        return (self.sched.in_flight() + self.inbox, len(self.rows), tuple(sorted(gpu)),
                None if host is None else tuple(sorted(host)))

    def serve(self, conn, start_wall: float, publish: bool = True):
        """Serve what arrives on ``conn`` (``("row", i)``: row ``i`` of the fleet trace
        arrives now; ``("close",)``: no more) from logical 0 at wall instant
        ``start_wall``; with ``publish`` (a router that reads state), sends ``("state",
        ...)`` (:meth:`state`) after every tick that changed it, until closed (no route
        reads it after). Returns the replica's RunResult once closed and done."""
        clock = self.clock
        left = start_wall - time.perf_counter()
        if left > 0:
            time.sleep(left)
        # logical 0 is now: the start instant, or later when this replica took its start
        # late (a loaded box), which its first step must not count (a lone executor's clock
        # starts when it starts, and Clock.wait_until ends a wait where the sleep ends)
        clock.now, clock.wall = 0.0, time.perf_counter()
        last = None
        while True:
            self._drain(conn, block=False)
            t = self._tick()
            if publish and self.arrivals.open and (state := self.state()) != last:
                conn.send(("state", *state))
                last = state
            if t is None:
                if not self.arrivals.open:
                    break
                self._drain(conn, block=True)   # the window ended: take the rest, unserved
            elif t == INF:   # idle until a delivery: the wait is no step's
                self._drain(conn, block=True)
                if self.arrivals.inbox:   # due already (sent late): its step starts now
                    clock.wait_until(max(clock.now, self.arrivals.next_s))
            elif t > clock.now:
                clock.wait_until(t)
        return self.result()

    def _drain(self, conn, *, block: bool) -> None:
        """Take every message waiting on ``conn`` (with ``block``: at least one)."""
        while (block and self.arrivals.open) or conn.poll():
            block = False
            msg = conn.recv()
            if msg[0] == "row":
                self.deliver(msg[1])
            else:
                self.close()

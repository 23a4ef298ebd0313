"""The exact view's loop for adapter affinity, with replicas that lag behind the arrivals.

The heap-driven exact loop (``twin.fleet.loop._run``) steps every replica due before each
arrival, so 64 replicas' engines take turns step by step, and stepping them in time order
costs ~1.7x stepping each alone (memory locality, ``experiments/README_fleet.md``). Yet a
replica's run depends only on the requests delivered to it: it may run late, in chunks,
as long as the router's picks never read state it does not have yet. Here a replica is
*lagging*: its deliveries are queued and it is advanced (:meth:`Lagging.refine`: its steps
due before each queued delivery, the delivery, then its steps due before now) only

- when its horizon comes due (``horizon_s`` of simulated time after its last advance:
  then it runs that chunk alone), or
- when the affinity router's answer could depend on its exact state and its bounds
  cannot decide it (:func:`pick_bounded`).

Bounds on a lagging replica's in-flight count (the router's load) at an arrival before its
horizon: at most its count when it was last advanced plus the requests sent to it since
(steps only ever lower the count); at least the requests that cannot have finished by the
horizon: a request needing ``R`` more tokens needs ``R`` more steps, and no step is shorter
than the step-time model's ``const`` term when every term of the model is >= 0 (NNLS fits:
:meth:`StepTimeModel.min_step_s`). Residency (GPU / host) changes only when a request whose
adapter is not on the GPU is admitted: a replica with no such request queued, waiting or
sent has the residency it had when advanced. The picks, and so every run, are those of the
exact loop, request for request (``tests/test_fleet_lazy.py``).

Measured (``experiments/fleet_lazy_probe.py``, 64 replicas x 3 min of the scale workload):
identical, and ~1.6-2x the CPU of the heap loop. The bounds settle the slack test at ~90%
of arrivals, but affinity sends an adapter's request to the least loaded of its GPU
holders (~2.8 per arrival), whose loads are close: ~70% of arrivals must advance holders,
~2.3 advances per arrival for ~2.0 engine resumes per arrival. A replica is needed exactly
more often than it steps, so no replica runs more than about one step alone: no locality
is won, and the bookkeeping is on top.
"""

from __future__ import annotations

import heapq

from twin.fleet.view import GPU, HOST, NONE
from twin.sched.adapter_cache import AdapterCache
from twin.sched.request import RequestStatus, exceeds_max_model_len
from twin.sim.fed import INF

SAFETY = 1.0 - 1e-6   # step-time floor margin: the clock's float sums round (~1e-13 s)


def supported(clocks) -> bool:
    """Whether every replica allows the bounds: vLLM's adapter cache (residency changes
    only at loads) and a step-time model with a floor > 0."""
    return all(isinstance(c.server.cache, AdapterCache) and c.step_time.min_step_s() > 0
               for c in clocks)


class Lagging:
    """The replicas, each possibly behind the arrivals, with bounds on their loads.

    ``hi[k]`` / ``lo[k]``: bounds on replica k's in-flight count at the current arrival
    (equal, and exact, for a replica advanced to it); ``stable[k]``: its residency cannot
    have changed since it was advanced. ``lo`` falls as the arrivals pass the earliest
    times its requests could finish (``drops``: a heap of those times)."""

    def __init__(self, clocks, arrival, output, prompt, horizon_s: float):
        self.clocks, self.arrival, self.output, self.prompt = clocks, arrival, output, prompt
        self.horizon_s = horizon_s
        n = len(clocks)
        self.floor = [c.step_time.min_step_s() * SAFETY for c in clocks]
        self.max_len = [c.sched.max_model_len for c in clocks]
        self.gpu = [c.server.cache.gpu.resident for c in clocks]
        self.host = [c.server.cache.host.resident for c in clocks]
        self.queued: list[list[int]] = [[] for _ in range(n)]   # deliveries not yet made
        self.hi, self.lo, self.lo_t = [0] * n, [0] * n, [0] * n   # lo_t: lo when lagging
        self.until = [0.0] * n           # its horizon: advanced when an arrival passes it
        self.stable = [True] * n
        self.at = [-2] * n               # the arrival index it was last advanced to
        self.heap: list[tuple[float, int, int]] = []    # (horizon, version, k)
        self.drops: list[tuple[float, int, int]] = []   # (earliest finish, version, k)
        self.version = [0] * n
        self.exact: list[int] = []       # advanced at the current arrival
        self.advances = 0

    def next_arrival(self, j: int, a: float) -> None:
        """Arrival ``j`` at ``a``: the lower bounds of requests that could have finished
        by ``a`` drop; replicas whose horizon is past run up to ``a``."""
        lo, lo_t, version = self.lo, self.lo_t, self.version
        for k in self.exact:
            lo[k] = lo_t[k]
        self.exact.clear()
        drops, pop = self.drops, heapq.heappop
        while drops and drops[0][0] < a:
            _, v, k = pop(drops)
            if v == version[k]:
                lo[k] = lo_t[k] = lo_t[k] - 1
        heap = self.heap
        while heap and heap[0][0] < a:
            _, v, k = pop(heap)
            if v == version[k]:
                self.refine(k, j, a)

    def refine(self, k: int, j: int, a: float) -> None:
        """Advance replica ``k`` to arrival ``j`` at ``a``: its state is then what the
        exact loop reads there; new bounds up to ``a + horizon_s``."""
        if self.at[k] == j:
            return
        c, arrival = self.clocks[k], self.arrival
        self.advances += 1
        for row in self.queued[k]:
            _advance(c, arrival[row])
            c.deliver(row)
        self.queued[k].clear()
        _advance(c, a)
        self.hi[k] = self.lo[k] = c.sched.in_flight() + c.inbox
        self.at[k] = j
        self.exact.append(k)
        self.version[k] = v = self.version[k] + 1
        until = self.until[k] = a + self.horizon_s
        heapq.heappush(self.heap, (until, v, k))
        self.lo_t[k] = _earliest_finishes(c, a, until, self.floor[k], self.drops, v, k)
        self.stable[k] = _residency_stable(c, self.gpu[k])

    def send(self, k: int, j: int, adapter: int) -> None:
        """Queue arrival ``j`` for replica ``k`` (delivered when ``k`` is next advanced)."""
        self.queued[k].append(j)
        self.hi[k] += 1
        p, o = self.prompt[j], self.output[j]
        if not exceeds_max_model_len(p, o, self.max_len[k]):
            self.lo_t[k] += 1   # in flight until its o tokens' steps at the earliest
            e = self.arrival[j] + o * self.floor[k]
            if e < self.until[k]:
                heapq.heappush(self.drops, (e, self.version[k], k))
        self.lo[k] = self.lo_t[k]
        if adapter >= 0 and adapter not in self.gpu[k]:
            self.stable[k] = False

    def tier(self, k: int, adapter: int) -> int:
        if adapter < 0 or adapter in self.gpu[k]:
            return GPU
        return HOST if adapter in self.host[k] else NONE

    def finish(self) -> None:
        """No more arrivals: every replica takes its queued deliveries, then runs to its
        end (as ``loop._run_refreshed`` ends)."""
        for k, c in enumerate(self.clocks):
            for row in self.queued[k]:
                _advance(c, self.arrival[row])
                c.deliver(row)
            c.close()
            _advance(c, INF)


def _advance(c, t: float) -> None:
    w = c.wake
    while w is not None and w < t:
        w = c.resume()


def _earliest_finishes(c, a: float, until: float, floor: float, drops: list, v: int,
                       k: int) -> int:
    """A lower bound on clock ``c``'s requests in flight at ``a``: its decoding requests
    less those that could have finished by then; those that could finish before ``until``
    go on ``drops`` at the earliest time they could. A request needing ``R`` more tokens
    needs ``R`` more steps, the first starting no earlier than the clock's current step,
    each ``floor`` seconds at least. Prefilling, waiting and sent requests are left out
    (a request with one token to go can finish at the end of the current step; a sent one
    may be refused)."""
    start = c.env.now
    g = c.sched.group
    n = g.n
    push = heapq.heappush
    for r in g.finishing_within((until - start) / floor):
        e = start + r * floor
        if e < a:
            n -= 1
        else:
            push(drops, (e, v, k))
    return n


def _residency_stable(c, gpu) -> bool:
    """No request queued, waiting or sent to ``c`` needs an adapter that is off its GPU:
    no admission can load one (and evict another) before the next delivery."""
    for a in c.sched.waiting.adapters():
        if a >= 0 and a not in gpu:
            return False
    if c.inbox:
        aid = c.aid
        for i in range(c.n - 1 - c.inbox, c.n - 1):
            if aid[i] >= 0 and aid[i] not in gpu:
                return False
    return True


def pick_bounded(router, adapter: int, j: int, a: float, lag: Lagging) -> int:
    """``AdapterAffinity.pick`` at arrival ``j`` (time ``a``), advancing only the replicas
    its answer depends on and its bounds cannot settle."""
    held = router.holders.get(adapter)
    if held is None:   # first sight: every replica's residency now
        for k in range(len(lag.clocks)):
            lag.refine(k, j, a)
        held = router.holders[adapter] = {k for k in range(len(lag.clocks))
                                          if lag.tier(k, adapter) != NONE}
    top, best = NONE, []
    for k in held:
        if not lag.stable[k]:
            lag.refine(k, j, a)
        t = lag.tier(k, adapter)
        if t < top:
            top, best = t, [k]
        elif t == top and t != NONE:
            best.append(k)
    lo, hi, slack = lag.lo, lag.hi, router.slack
    if best and _within_slack(best, lo, hi, slack, j, a, lag):
        return _least(best, lo, hi, j, a, lag)
    k = _least(range(len(hi)), lo, hi, j, a, lag)
    held.add(k)
    return k


def _within_slack(best, lo, hi, slack, j, a, lag) -> bool:
    """Whether the least load among ``best`` is <= the least load of all + ``slack``,
    advancing the replicas that could change the answer until the bounds settle it."""
    for step in range(3):
        b_hi = min(hi[k] for k in best)
        if b_hi <= min(lo) + slack:
            return True
        if min(lo[k] for k in best) > min(hi) + slack:
            return False
        if step == 0:   # the holders first: often that settles it
            for k in best:
                lag.refine(k, j, a)
        else:
            for k in range(len(lo)):
                if lo[k] < b_hi - slack:
                    lag.refine(k, j, a)
    raise AssertionError("bounds left unsettled with every replica exact")  # pragma: no cover


def _least(ks, lo, hi, j, a, lag) -> int:
    """The replica of ``ks`` with the least load, the lowest index among equals."""
    top = min(hi[k] for k in ks)
    cands = [k for k in ks if lo[k] <= top]
    if len(cands) > 1:
        for k in cands:
            lag.refine(k, j, a)
        top = min(hi[k] for k in cands)
        cands = [k for k in cands if hi[k] == top]
    return min(cands)


def run_lazy(clocks, arrival, adapter, router, bar, horizon_s: float = 0.5) -> list[int]:
    """The exact view's loop for ``AdapterAffinity`` with lagging replicas: the same
    routes and runs as ``loop._run``."""
    cols = clocks[0].cols
    lag = Lagging(clocks, arrival, cols.output, cols.prompt, horizon_s)
    route = [0] * len(arrival)
    for k in range(len(clocks)):
        lag.refine(k, -1, 0.0)
    next_bar = 0.0
    for j, a in enumerate(arrival):
        lag.next_arrival(j, a)
        x = adapter[j]
        k = route[j] = pick_bounded(router, x, j, a, lag)
        lag.send(k, j, x)
        if bar is not None and a >= next_bar:
            bar.update(a - bar.n)
            next_bar = a + 1.0
    lag.finish()
    return route

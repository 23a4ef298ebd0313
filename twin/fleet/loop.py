"""The fleet's event loop: every replica's clock and the router in one simulated time.

Replicas are :class:`twin.sim.fed.FedClock` engines, resumed from a heap of wake times;
the router takes the trace's arrivals in order and delivers each to the replica it picks
from its view (``twin.fleet.view``), which is refreshed on its own ticks. At equal times
view refreshes and arrivals go before replica steps (``simulate`` admits an arrival at
the start of the step that begins when it arrives). A replica woken or cut short by a
delivery gets a new heap entry; its old one is skipped (``version``).

The loop is driven by the arrivals: before arrival ``j`` at ``a`` every replica step due
before ``a`` runs; then the arrival is routed and delivered. A replica resumed from the
heap's top that is due again replaces the top in one sift (``heapreplace``) instead of a
pop and a push: one engine step costs the heap one sift.

With a refreshed view (``refresh_s > 0``) the router's picks between two refreshes read
only the last scrape and its own sends, never a replica's progress: the loop routes all of an
interval's arrivals first, then runs each replica alone through its deliveries of the
interval (:func:`_run_refreshed`), the same runs in replica order instead of time order,
so one replica's objects stay in the CPU's caches while it steps.

Why not a SimPy environment with N processes: a run of quiet decode steps cut short by an
arrival must be rescheduled, which a SimPy ``Timeout`` cannot be, and an event loop that
only pushes and pops tuples keeps 64 replicas and 10^6 arrivals within a minute.
"""

from __future__ import annotations

import heapq

from twin.fleet.view import LiveView, ScrapedView
from twin.sim.engine import gc_paused
from twin.sim.fed import INF


def run_loop(clocks: list, arrival: list[float], adapter, router, *,
             refresh_s: float = 0.0, bar=None) -> list[int]:
    """Simulate ``clocks`` fed the arrivals (times ``arrival``, adapter ids ``adapter``)
    through ``router``; returns the replica of every arrival.

    Python's cyclic garbage collector is paused meanwhile: the loop makes no reference
    cycles (``gc.collect()`` after a fleet run finds none), so its passes over the
    fleet's objects, ~5% of the loop's time, free nothing; reference counting frees the
    requests as they finish."""
    with gc_paused():
        if refresh_s > 0:
            return _run_refreshed(clocks, arrival, adapter, router, refresh_s, bar)
        return _run(clocks, arrival, adapter, router, bar)


def _run(clocks, arrival, adapter, router, bar) -> list[int]:
    """The loop for the exact view (``refresh_s`` 0): every replica due before an arrival
    steps before the router reads the view."""
    view = LiveView(clocks)
    heap = [(0.0, 0, k) for k in range(len(clocks))]
    pick, sent, push, dirty = router.pick, view.sent, heapq.heappush, view.dirty
    route = [0] * len(arrival)
    next_bar = 0.0
    for j, a in enumerate(arrival):
        if heap and heap[0][0] < a:   # no call when no replica is due before ``a``
            _steps_before(clocks, heap, a, dirty)
        k = pick(adapter[j], view)
        route[j] = k
        sent(k)
        c = clocks[k]
        w = c.deliver(j)
        if w is not None:
            c.version += 1
            push(heap, (w, c.version, k))
        if bar is not None and a >= next_bar:
            bar.update(a - bar.n)
            next_bar = a + 1.0
    _close(clocks, heap)
    _steps_before(clocks, heap, INF, dirty)
    return route


def _run_refreshed(clocks, arrival, adapter, router, refresh_s, bar) -> list[int]:
    """The loop for a view scraped every ``refresh_s``: per interval between refreshes,
    route its arrivals, then run each replica alone up to each of its deliveries. Before
    a refresh every replica runs its steps due before it; of several refreshes due before
    the next arrival only the last is read, so only it is taken. After the last arrival
    no refresh is due: the replicas are closed where they are and run to their ends."""
    view = ScrapedView(clocks)
    pick, sent = router.pick, view.sent
    n = len(arrival)
    route = [0] * n
    nxt, j = refresh_s, 0
    while j < n:
        due = None
        while nxt <= arrival[j]:   # refresh times: repeated sums
            due, nxt = nxt, nxt + refresh_s
        if due is not None:
            for c in clocks:
                _advance(c, due)
            view.refresh()
        rows = [[] for _ in clocks]
        while j < n and arrival[j] < nxt:
            k = pick(adapter[j], view)
            route[j] = k
            sent(k)
            rows[k].append(j)
            j += 1
        for c, mine in zip(clocks, rows):
            for row in mine:
                _advance(c, arrival[row])
                c.deliver(row)
        if bar is not None:
            bar.update(arrival[j - 1] - bar.n)
    for c in clocks:
        c.close()
        _advance(c, INF)
    return route


def _advance(c, t: float) -> None:
    """Resume clock ``c`` while it is due before ``t`` (its wake: INF while it waits for
    an arrival, None once done)."""
    w = c.wake
    while w is not None and w < t:
        w = c.resume()


def _steps_before(clocks: list, heap: list, t: float, stepped: set) -> None:
    """Resume every replica due before ``t``, in wake order (``stepped``: the view's set of
    replicas whose state changed)."""
    replace, pop = heapq.heapreplace, heapq.heappop
    while heap and heap[0][0] < t:
        _, version, k = heap[0]
        c = clocks[k]
        if version != c.version:
            pop(heap)   # superseded: woken or cut short since
            continue
        w = c.resume()
        stepped.add(k)
        if w is not None and w != INF:
            c.version = version = version + 1
            replace(heap, (w, version, k))
        else:
            pop(heap)


def _close(clocks: list, heap: list) -> None:
    """No more arrivals: every clock drops its sentinel; waiting ones wake to end."""
    for k, c in enumerate(clocks):
        w = c.close()
        if w is not None:
            c.version += 1
            heapq.heappush(heap, (w, c.version, k))

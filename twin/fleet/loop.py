"""The fleet's event loop: every replica's clock and the router in one simulated time.

Replicas are :class:`twin.sim.fed.FedClock` engines, resumed from a heap of wake times;
the router takes the trace's arrivals in order and delivers each to the replica it picks
from its view (``twin.fleet.view``), which is refreshed on its own ticks. At equal times
view refreshes and arrivals go before replica steps (``simulate`` admits an arrival at
the start of the step that begins when it arrives). A replica woken or cut short by a
delivery gets a new heap entry; its old one is skipped (``version``).

Why not a SimPy environment with N processes: a run of quiet decode steps cut short by an
arrival must be rescheduled, which a SimPy ``Timeout`` cannot be, and an event loop that
only pushes and pops tuples keeps 64 replicas and 10^6 arrivals within a minute.
"""

from __future__ import annotations

import heapq

from twin.fleet.view import LiveView, ScrapedView
from twin.sim.fed import INF


def run_loop(clocks: list, arrival: list[float], adapter: list[int], router, *,
             refresh_s: float = 0.0, bar=None) -> list[int]:
    """Simulate ``clocks`` fed the arrivals (times ``arrival``, adapter ids ``adapter``)
    through ``router``; returns the replica of every arrival."""
    view = ScrapedView(clocks) if refresh_s > 0 else LiveView(clocks)
    heap = [(0.0, 0, k) for k in range(len(clocks))]
    pick, sent, push, pop = router.pick, view.sent, heapq.heappush, heapq.heappop
    stepped = view.dirty.add
    route = [0] * len(arrival)
    n, j = len(arrival), 0
    next_refresh = refresh_s if refresh_s > 0 else INF
    next_bar = 0.0
    if n == 0:
        _close(clocks, heap)
    while True:
        top = heap[0][0] if heap else INF
        a = arrival[j] if j < n else INF
        if next_refresh <= a and next_refresh <= top and next_refresh < INF:
            view.refresh()
            next_refresh += refresh_s
            continue
        if a <= top and j < n:
            k = pick(adapter[j], view)
            route[j] = k
            sent(k)
            c = clocks[k]
            w = c.deliver(j)
            if w is not None:
                c.version += 1
                push(heap, (w, c.version, k))
            j += 1
            if j == n:
                _close(clocks, heap)
                next_refresh = INF
            if bar is not None and a >= next_bar:
                bar.update(a - bar.n)
                next_bar = a + 1.0
            continue
        if not heap:
            break
        _, version, k = pop(heap)
        c = clocks[k]
        if version != c.version:
            continue   # superseded: woken or cut short since
        w = c.resume()
        stepped(k)
        if w is not None and w != INF:
            c.version += 1
            push(heap, (w, c.version, k))
    return route


def _close(clocks: list, heap: list) -> None:
    """No more arrivals: every clock drops its sentinel; waiting ones wake to end."""
    for k, c in enumerate(clocks):
        w = c.close()
        if w is not None:
            c.version += 1
            heapq.heappush(heap, (w, c.version, k))

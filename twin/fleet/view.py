"""What a router sees of the replicas: requests in flight and where each adapter resides.

:class:`LiveView` reads the replicas' schedulers at the moment of each arrival (refresh
0, exact). :class:`ScrapedView` holds what was read at the last refresh, every
``refresh_s`` seconds of simulated time, as real routers scrape ``/metrics``; between
refreshes it adds the requests the router itself sent since (a router knows what it
sent), but sees no completion and no adapter load or eviction until the next scrape.
"""

from __future__ import annotations

GPU, HOST, NONE = 0, 1, 2   # residency tiers, best first


def residency(cache, adapter: int) -> int:
    """Where ``adapter`` is on one replica: GPU, HOST or NONE (the base model: GPU)."""
    if adapter < 0:
        return GPU
    gpu = getattr(cache, "gpu", None)
    if gpu is not None:   # vLLM: GPU slots over a host cache
        return GPU if adapter in gpu.resident else HOST if adapter in cache.host.resident else NONE
    return GPU if adapter in cache.resident else HOST   # S-LoRA: all adapters in host memory


def _outstanding(clock) -> int:
    s = clock.sched
    return s.num_running + s.num_waiting + clock.inbox


class LiveView:
    """The replicas' state now (``--router-refresh-s 0``). Counts are read again only for
    the replicas in ``dirty`` (the event loop adds a replica when it steps or is sent a
    request): between two arrivals a few of 64 replicas step, so a router reading every
    replica's count reads a few."""

    def __init__(self, clocks):
        self.clocks = clocks
        self.loads = [0] * len(clocks)
        self.dirty = set(range(len(clocks)))

    def outstanding(self, k: int) -> int:
        return _outstanding(self.clocks[k])

    def outstanding_all(self) -> list[int]:
        loads, clocks = self.loads, self.clocks
        for k in self.dirty:
            loads[k] = _outstanding(clocks[k])
        self.dirty.clear()
        return loads

    def tier(self, k: int, adapter: int) -> int:
        return residency(self.clocks[k].server.cache, adapter)

    def preloaded(self, adapter: int) -> list[int]:
        """Replicas holding ``adapter`` before any request for it was routed."""
        return [k for k in range(len(self.clocks)) if self.tier(k, adapter) != NONE]

    def sent(self, k: int) -> None:
        """The router sent a request to replica ``k``."""
        self.dirty.add(k)

    def refresh(self) -> None:
        """Nothing to refresh: every read is live."""


class ScrapedView(LiveView):
    """The replicas' state as of the last :meth:`refresh`, plus the router's own sends."""

    def __init__(self, clocks):
        super().__init__(clocks)
        self.refresh()

    def refresh(self) -> None:
        self.dirty.clear()   # steps between refreshes are not seen
        self.loads = [_outstanding(c) for c in self.clocks]
        self.gpu, self.host = [], []
        for c in self.clocks:
            cache = c.server.cache
            if getattr(cache, "gpu", None) is not None:
                self.gpu.append(set(cache.gpu.resident))
                self.host.append(set(cache.host.resident))
            else:
                self.gpu.append(set(cache.resident))
                self.host.append(None)   # S-LoRA: every adapter

    def outstanding(self, k: int) -> int:
        return self.loads[k]

    def outstanding_all(self) -> list[int]:
        return self.loads

    def tier(self, k: int, adapter: int) -> int:
        if adapter < 0 or adapter in self.gpu[k]:
            return GPU
        host = self.host[k]
        return HOST if host is None or adapter in host else NONE

    def sent(self, k: int) -> None:
        self.loads[k] += 1

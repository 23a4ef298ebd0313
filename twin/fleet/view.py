"""What a router sees of the replicas: requests in flight and where each adapter resides.

:class:`LiveView` reads the replicas' schedulers at the moment of each arrival (refresh
0, exact). :class:`ScrapedView` holds what was read at the last refresh, every
``refresh_s`` seconds of simulated time, as real routers scrape ``/metrics``; between
refreshes it adds the requests the router itself sent since (a router knows what it
sent), but sees no completion and no adapter load or eviction until the next scrape.

Both keep each replica's in-flight count in a list that is read again only for the
replicas that changed (``dirty``), and where adapters reside as two containers per
replica (the live ones, or copies taken at the scrape): a router reads a count and a
residency tier with an index and a membership test, ~10^6 times in a fleet's hour.
"""

from __future__ import annotations

from twin.sched.adapter_cache import residency as _residents

GPU, HOST, NONE = 0, 1, 2   # residency tiers, best first


def _outstanding(clock) -> int:
    return clock.sched.in_flight() + clock.inbox


class LiveView:
    """The replicas' state now (``--router-refresh-s 0``). Counts are read again only for
    the replicas in ``dirty`` (the event loop adds a replica when it steps or is sent a
    request): between two arrivals a few of 64 replicas step, so a router reading every
    replica's count reads a few."""

    def __init__(self, clocks):
        self.clocks = clocks
        self.loads = [0] * len(clocks)
        self.dirty = set(range(len(clocks)))
        self.gpu, self.host = [], []   # the live containers: read, never copied
        for c in clocks:
            gpu, host = _residents(c.server.cache)
            self.gpu.append(gpu)
            self.host.append(host)

    def outstanding(self, k: int) -> int:
        return self.outstanding_all()[k]

    def outstanding_all(self) -> list[int]:
        loads, clocks, dirty = self.loads, self.clocks, self.dirty
        if dirty:
            for k in dirty:
                loads[k] = _outstanding(clocks[k])
            dirty.clear()
        return loads

    def tier(self, k: int, adapter: int) -> int:
        """Where ``adapter`` is on replica ``k``: GPU, HOST or NONE (the base model: GPU)."""
        if adapter < 0 or adapter in self.gpu[k]:
            return GPU
        host = self.host[k]
        return HOST if host is None or adapter in host else NONE

    def best_holder(self, replicas, adapter: int):
        """(tier, outstanding, k), the least, over the ``replicas`` that hold ``adapter``
        on GPU or in host memory; None when none does."""
        loads = self.outstanding_all()
        gpus, hosts = self.gpu, self.host
        best = None
        for k in replicas:
            if adapter < 0 or adapter in gpus[k]:
                key = (GPU, loads[k], k)
            elif hosts[k] is None or adapter in hosts[k]:
                key = (HOST, loads[k], k)
            else:
                continue
            if best is None or key < best:
                best = key
        return best

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
            gpu, host = _residents(c.server.cache)
            self.gpu.append(set(gpu))
            self.host.append(None if host is None else set(host))

    def outstanding_all(self) -> list[int]:
        return self.loads

    def sent(self, k: int) -> None:
        self.loads[k] += 1


class PublishedView(LiveView):
    """The replicas' state as each last published it, plus the router's own sends since.

    For replicas that run in processes of their own (``twin.executor.live``): a replica
    sends its requests in flight, the requests it has received and where its adapters
    reside after every step that changed them (:meth:`update`). A request the router sent
    that the replica had not received when it published is counted on top, so a burst
    routed between two steps is not sent to one replica as if it were idle."""

    def __init__(self, n: int):
        self.n = n
        self.loads, self.sent_to, self.received = [0] * n, [0] * n, [0] * n
        self.dirty: set = set()   # never read: the loads are kept current
        self.gpu: list = [set() for _ in range(n)]
        self.host: list = [set() for _ in range(n)]

    def update(self, k: int, in_flight: int, received: int, gpu, host) -> None:
        """Replica ``k`` published: ``in_flight`` requests (delivered, not finished),
        ``received`` requests delivered so far, adapters on its GPU and in host memory
        (None: every adapter, S-LoRA)."""
        self.received[k] = received
        self.loads[k] = in_flight + self.sent_to[k] - received
        self.gpu[k] = set(gpu)
        self.host[k] = None if host is None else set(host)

    def outstanding_all(self) -> list[int]:
        return self.loads

    def preloaded(self, adapter: int) -> list[int]:
        return [k for k in range(self.n) if self.tier(k, adapter) != NONE]

    def sent(self, k: int) -> None:
        self.sent_to[k] += 1
        self.loads[k] += 1

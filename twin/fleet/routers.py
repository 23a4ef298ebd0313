"""Routers: which replica of a fleet serves each arriving request.

Each router is a small class with ``pick(adapter, view) -> replica``: ``adapter`` is the
request's adapter id (the fleet catalog's order, -1 for the base model) and ``view`` the
router's view of the replicas (``twin.fleet.view``: outstanding requests and adapter
residency, exact or as last scraped). Routers that never read the view
(``reads_state = False``) decide every request from the trace alone, so their replicas can
be simulated independently (``route_all``, ``twin.fleet.fleet``'s process pool).

Names follow the routers operators run: vLLM production-stack's ``roundrobin``, Envoy's
``LEAST_REQUEST`` (least outstanding requests), a static table (``twin place``'s
``routing.csv``), consistent hashing by adapter (production-stack's session routing,
Envoy's ``RING_HASH``), and llm-d's LoRA affinity, here by *residency* (the adapter on
the replica's GPU, else in its host memory), bounded by load.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.sched.request import BASE_MODEL
from twin.workload.schema import read_table

BASE_KEY = BASE_MODEL   # the base model's key in routing tables and hash rings


class Router:
    """A routing rule. ``reads_state``: whether ``pick`` reads the view."""

    name = "router"
    reads_state = False

    def bind(self, n_replicas: int, adapters: list[str]) -> "Router":
        """Prepare for ``n_replicas`` replicas and the catalog's ``adapters`` (id order)."""
        self.n = int(n_replicas)
        self.adapters = list(adapters)
        return self

    def pick(self, adapter: int, view) -> int:
        raise NotImplementedError

    def served(self, k: int) -> tuple | None:
        """The adapters replica ``k`` can be sent (its ``--lora-modules``, what it preloads
        with ``preload_adapters``); None: any of them (every rule but a static table)."""
        return None

    def route_all(self, adapter_ids) -> np.ndarray:
        """Every request's replica, in trace order (routers that read no state): what
        ``pick`` would answer request after request, with its state left as after them."""
        if self.reads_state:
            raise TypeError(f"{self.name} reads replica state: it routes in the event loop")
        ids = np.asarray(adapter_ids, dtype=np.int64).tolist()
        return np.fromiter((self.pick(a, None) for a in ids), dtype=np.int64, count=len(ids))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RoundRobin(Router):
    """Replica ``j mod N`` for the j-th request (production-stack ``roundrobin``)."""

    name = "round_robin"

    def bind(self, n_replicas, adapters):
        self.next = 0
        return super().bind(n_replicas, adapters)

    def pick(self, adapter, view):
        k = self.next
        self.next = (k + 1) % self.n
        return k

    def route_all(self, adapter_ids):
        route = (self.next + np.arange(len(adapter_ids), dtype=np.int64)) % self.n
        self.next = (self.next + len(adapter_ids)) % self.n
        return route


class LeastOutstandingRequests(Router):
    """The replica with the fewest requests in flight (running + waiting + sent since the
    view was refreshed); ties to the lowest index (Envoy ``LEAST_REQUEST``, all hosts)."""

    name = "least_outstanding_requests"
    reads_state = True

    def pick(self, adapter, view):
        loads = view.outstanding_all()
        return loads.index(min(loads))


class StaticTable(Router):
    """A routing table: adapter -> replicas with weights (``twin place``'s ``routing.csv``:
    ``adapter, gpu, weight``; ``gpu`` is the replica index, the base model's row is
    ``(base model)``). An adapter's requests are spread over its replicas by smooth
    weighted round robin (nginx's), so equal weights take every r-th request as the
    placement split it."""

    name = "static"

    def __init__(self, table: pd.DataFrame | str | Path):
        self.source = "routing table" if isinstance(table, pd.DataFrame) else str(table)
        if not isinstance(table, pd.DataFrame):
            table = read_table(Path(table), "routing table", str_columns=("adapter",))
        self.table = _checked(table, self.source)

    def bind(self, n_replicas, adapters):
        super().bind(n_replicas, adapters)
        self.rows: dict[int, tuple[list[int], list[float]]] = {}
        ids = {a: i for i, a in enumerate(adapters)}
        for row, (a, g, w) in enumerate(zip(self.table["adapter"], self.table["gpu"],
                                            self.table["weight"])):
            key = -1 if a == BASE_KEY else ids.get(str(a))
            if key is None:
                continue   # an adapter without traffic in this trace
            g = int(self._cell(row, g, "gpu", lambda x: x == int(x) and 0 <= x < self.n,
                               f"a whole replica index in [0, {self.n})"))
            w = self._cell(row, w, "weight", lambda x: x > 0, "a number > 0")
            gs, ws = self.rows.setdefault(key, ([], []))
            gs.append(g)
            ws.append(w)
        self.current = {k: [0.0] * len(gs) for k, (gs, _) in self.rows.items()}
        return self

    def served(self, k: int) -> tuple:
        """The adapters the table sends to replica ``k``, in catalog order."""
        return tuple(self.adapters[key] for key in sorted(self.rows)
                     if key >= 0 and k in self.rows[key][0])

    def _cell(self, row: int, value, field: str, ok, expected: str) -> float:
        """Row ``row``'s ``field`` cell as a finite number passing ``ok``, or an error that
        names the file, row and field (a user's table: never a crash)."""
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = math.nan
        if not (math.isfinite(x) and ok(x)):
            raise TwinInputError(f"{field} {value!r} must be {expected}", file=self.source,
                                 row=row, field=field)
        return x

    def pick(self, adapter, view):
        entry = self.rows.get(adapter)
        if entry is None:
            self._no_row(adapter)
        gs, ws = entry
        if len(gs) == 1:
            return gs[0]
        cur = self.current[adapter]   # smooth weighted round robin
        total = 0.0
        best = 0
        for j, w in enumerate(ws):
            cur[j] += w
            total += w
            if cur[j] > cur[best]:
                best = j
        cur[best] -= total
        return gs[best]

    def route_all(self, adapter_ids):
        """``pick``'s answers, an adapter at a time: a table lookup for an adapter on one
        replica, the weighted round robin over its own requests for one on several (a
        fleet's hour is 10^6 requests: per request in Python, ~10 s before any replica
        starts)."""
        aid = np.asarray(adapter_ids, dtype=np.int64)
        order = np.argsort(aid, kind="stable")
        keys, starts = np.unique(aid[order], return_index=True)
        missing = [(order[i], a) for a, i in zip(keys.tolist(), starts.tolist())
                   if a not in self.rows]
        if missing:
            self._no_row(min(missing)[1])   # the first request pick would refuse
        route = np.empty(len(aid), dtype=np.int64)
        for a, rows in zip(keys.tolist(), np.split(order, starts[1:])):
            gs = self.rows[a][0]
            if len(gs) == 1:
                route[rows] = gs[0]
            else:
                route[rows] = [self.pick(a, None) for _ in range(len(rows))]
        return route

    def _no_row(self, adapter: int):
        name = BASE_KEY if adapter < 0 else self.adapters[adapter]
        raise TwinInputError(f"adapter {name!r} of the trace has no row in the routing "
                             "table", file=self.source, field="adapter")


def _checked(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """A routing table (read from ``source``, or given as a DataFrame) with its columns."""
    missing = [c for c in ("adapter", "gpu", "weight") if c not in df.columns]
    if missing:
        raise TwinInputError(f"routing table lacks column(s) {missing} (twin place writes "
                             "adapter, gpu, weight)", file=source, field=missing[0])
    return df


def stable_hash(key: str) -> int:
    """A hash that is the same in every process (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class ConsistentHash(Router):
    """Consistent hashing of the adapter name on a ring of ``vnodes`` points per replica
    (Envoy ``RING_HASH``): adding a replica moves only the keys its points take, ~1/N."""

    name = "consistent_hash"

    def __init__(self, vnodes: int = 160):
        self.vnodes = int(vnodes)

    def bind(self, n_replicas, adapters):
        super().bind(n_replicas, adapters)
        ring = sorted((stable_hash(f"replica-{k}#{v}"), k)
                      for k in range(self.n) for v in range(self.vnodes))
        self.points = [p for p, _ in ring]
        self.owner = [k for _, k in ring]
        self.table = [self.lookup(a) for a in adapters]
        self.base = self.lookup(BASE_KEY)
        return self

    def lookup(self, key: str) -> int:
        j = bisect.bisect(self.points, stable_hash(key)) % len(self.points)
        return self.owner[j]

    def pick(self, adapter, view):
        return self.base if adapter < 0 else self.table[adapter]

    def route_all(self, adapter_ids):
        lookup = np.asarray(self.table + [self.base], dtype=np.int64)   # -1: the base's
        return lookup[np.asarray(adapter_ids, dtype=np.int64)]


class AdapterAffinity(Router):
    """Prefer a replica with the adapter resident on its GPU, then one holding it in host
    memory, then any; among equals the least outstanding. Bounded by load: a replica with
    the adapter is skipped when it has more than ``slack`` requests in flight beyond the
    least-loaded replica (which then gets the request, and loads the adapter), so a hot
    adapter spreads instead of queueing on one GPU. llm-d's ``lora-affinity`` scorer ranks
    by adapters *active* on a replica (llm-d#2605); this one by residency."""

    name = "adapter_affinity"
    reads_state = True

    def __init__(self, slack: int = 16):
        if isinstance(slack, bool) or not isinstance(slack, (int, np.integer)) or slack < 0:
            raise TwinInputError(f"the affinity slack is a whole number of requests >= 0, "
                                 f"got {slack!r}", field="affinity_slack")
        self.slack = int(slack)

    def bind(self, n_replicas, adapters):
        self.holders: dict[int, set[int]] = {}   # replicas ever sent the adapter
        return super().bind(n_replicas, adapters)

    def pick(self, adapter, view):
        held = self.holders.get(adapter)
        if held is None:
            held = self.holders[adapter] = set(view.preloaded(adapter))
        best = view.best_holder(held, adapter)   # (tier, outstanding, replica)
        loads = view.outstanding_all()
        least = min(loads)
        if best is not None and best[1] <= least + self.slack:
            return best[2]
        k = loads.index(least)
        held.add(k)
        return k

    def __repr__(self) -> str:
        return f"AdapterAffinity(slack={self.slack})"


ROUTERS = {c.name: c for c in (RoundRobin, LeastOutstandingRequests, StaticTable,
                               ConsistentHash, AdapterAffinity)}


def make_router(name: str, *, table=None, **options) -> Router:
    """The router ``name`` (``ROUTERS``); ``table``: the static router's routing table."""
    cls = ROUTERS.get(name)
    if cls is None:
        raise TwinInputError(f"unknown router {name!r}; known: {sorted(ROUTERS)}",
                             field="--router")
    if cls is StaticTable:
        if table is None:
            raise TwinInputError("the static router needs a routing table (--routing "
                                 "routing.csv, as twin place writes)", field="--routing")
        return StaticTable(table)
    return cls(**options)

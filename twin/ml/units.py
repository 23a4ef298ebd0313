"""A placement's units and its routing table.

A unit is what a GPU is given: an adapter's traffic, a replica's share of it (every r-th
of its requests, ``name#j/r``), or the base model's traffic (``BASE_UNIT``);
:class:`Units` holds their request indices and loads for :mod:`twin.ml.placement`, and
:func:`routing_table` writes the placed units as ``routing.csv``, the static router's table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.workload.catalog import AdapterCatalog
from twin.sched.request import BASE_MODEL

BASE_UNIT = BASE_MODEL   # the base model's traffic, a unit of its own


class Units:
    """Placement units: an adapter's traffic, a replica's share of it (every r-th request,
    unit ``name#j/r``), or the base model's traffic; their request indices and loads."""

    def __init__(self, trace: pd.DataFrame, catalog):
        self.trace = trace
        self.catalog = catalog
        ad = trace["adapter"].astype(object).where(trace["adapter"].notna(), BASE_UNIT)
        codes, uniq = pd.factorize(ad)
        order = np.argsort(codes, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(codes, minlength=len(uniq)))]
        self.by_adapter = {u: order[bounds[i]:bounds[i + 1]] for i, u in enumerate(uniq)}
        for a in catalog.adapters:  # adapters of the catalog without traffic
            self.by_adapter.setdefault(a, np.zeros(0, dtype=np.int64))
        self.tok = (trace["prompt_tokens"].to_numpy(np.int64)
                    + trace["output_tokens"].to_numpy(np.int64))
        self.replicas = {a: 1 for a in self.by_adapter}
        self._build()

    def _build(self):
        self.index, self.adapter_of, self.part = {}, {}, {}
        for a, ix in self.by_adapter.items():
            r = self.replicas[a]
            if r == 1:
                self.index[a], self.adapter_of[a], self.part[a] = ix, a, 0
                continue
            for j in range(r):
                u = f"{a}#{j + 1}/{r}"
                self.index[u], self.adapter_of[u], self.part[u] = ix[j::r], a, j
        self.load = {u: int(self.tok[ix].sum()) for u, ix in self.index.items()}
        self.units = sorted(self.index, key=lambda u: (-self.load[u], u))

    def split(self, adapter: str, r: int) -> None:
        self.replicas[adapter] = r
        self._build()

    def restore(self, replicas: dict) -> None:
        """Back to an earlier replica count per adapter (a copy of ``replicas``)."""
        self.replicas = dict(replicas)
        self._build()

    def unit_of(self, adapter: str) -> str:
        r = self.replicas[adapter]
        return adapter if r == 1 else f"{adapter}#1/{r}"

    def adapters(self, units) -> list:
        return sorted({self.adapter_of[u] for u in units} - {BASE_UNIT})

    def sub(self, units):
        ix = np.sort(np.concatenate([self.index[u] for u in units]))
        names = self.adapters(units)
        cat = AdapterCatalog(self.catalog.table[self.catalog.table["adapter"].isin(names)]
                             .reset_index(drop=True))
        return self.trace.iloc[ix].reset_index(drop=True), cat


def routing_table(U: Units, plans: list, rank: dict, window: float) -> pd.DataFrame:
    """One row per (adapter, GPU): the share of the adapter's requests the GPU takes
    (``weight``), its replica count, rank, requests, offered tokens/s and request rate.
    A split adapter's rows come in the order of its units (``name#j/r``: every r-th
    request from the j-th): the static router deals an adapter's requests to its rows in
    table order (smooth weighted round robin), so each GPU gets the very requests it was
    verified with."""
    rows = []
    for p in plans:
        for u in p.units:
            a = U.adapter_of[u]
            n = len(U.index[u])
            rows.append({"adapter": a, "gpu": p.gpu, "weight": 1.0 / U.replicas[a],
                         "replicas": U.replicas[a], "rank": rank.get(a, np.nan),
                         "requests": n, "offered_tps": U.load[u] / window,
                         "part": U.part[u]})
    routing = (pd.DataFrame(rows)
               .groupby(["adapter", "gpu"], as_index=False)
               .agg(weight=("weight", "sum"), replicas=("replicas", "first"),
                    rank=("rank", "first"), requests=("requests", "sum"),
                    offered_tps=("offered_tps", "sum"), part=("part", "min"))
               .sort_values(["adapter", "part"], kind="stable")
               .drop(columns="part").reset_index(drop=True))
    routing["rate_rps"] = routing["requests"] / window
    return routing

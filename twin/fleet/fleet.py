"""``simulate_fleet``: N replicas behind a router, one trace.

Each replica is a whole twin server (``twin.servers.build_server``: its own scheduler, KV
pool, adapter caches, profile and serving config; replicas may differ). A router that reads
replica state (least outstanding requests, adapter affinity) runs with every replica in one
event loop (``twin.fleet.loop``); one that does not (round robin, a static table,
consistent hashing) routes the whole trace first, and each replica is then simulated on
its own share with ``twin.sim.simulate``, in a local process pool or on Ray
(``twin.ml.backends``). Both give the same per-replica runs for such a router.

The fleet's result is an ordinary ``RunResult`` (``twin.policies.combine.combine``: the
requests in trace order with the ``replica`` that served each, summary, timeline summed
over replicas) whose summary has a ``fleet`` section (``twin.fleet.report``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from twin.config import ServingConfig, require_serving_config
from twin.costs.profile import Profile
from twin.errors import TwinInputError
from twin.fleet.loop import run_loop
from twin.fleet.report import FleetRun, combine_fleet
from twin.fleet.routers import Router, make_router
from twin.ml.backends import make_backend
from twin.results import crop_window
from twin.results.recorder import default_sample_dt, trace_horizon
from twin.servers import build_server, preload_ids
from twin.sim.engine import check_run_inputs, default_catalog, simulate
from twin.sim.fed import FedClock, TraceColumns
from twin.workload.schema import validate_trace


@dataclass
class Replica:
    """One replica of a fleet: its serving config and profile (name, path or loaded), and
    ``adapters``, the ones it serves (its ``--lora-modules``): those are what it preloads
    at start-up with ``preload_adapters`` (default None: its config's ``lora_modules``,
    else those a static routing table sends it, else every catalog adapter, as a server
    given them all)."""

    config: ServingConfig
    profile: Profile | str | None = None
    adapters: tuple | None = None


def simulate_fleet(trace: pd.DataFrame, replicas, router: Router | str = "round_robin", *,
                   config: ServingConfig | None = None, profile=None, catalog=None,
                   routing=None, window_s: float | None = None, refresh_s: float = 0.0,
                   workers: int = 1, backend: str = "local", address: str | None = None,
                   sample_dt: float | None = None, progress: bool = False,
                   trace_source: str = "trace", one_loop: bool | None = None) -> FleetRun:
    """Simulate ``trace`` served by ``replicas`` behind ``router``.

    ``replicas``: a count (each ``config`` on ``profile``) or a list of :class:`Replica`
    (or ``ServingConfig``, on ``profile``). ``router``: a :class:`Router` or a name of
    ``twin.fleet.routers.ROUTERS``; ``routing``: the static router's table (path or
    DataFrame, ``twin place``'s ``routing.csv``). ``refresh_s``: how often a
    state-reading router's view of the replicas is refreshed (0: exact at each arrival).
    ``workers``/``backend``/``address``: where replicas of a state-free router run
    (``local`` process pool, or ``ray``). ``sample_dt``: the timeline's step, the same
    for every replica (default: the fleet's span / 2000, at least 50 ms, as ``simulate``).
    ``one_loop``: run every replica in one event loop even for a router that reads no
    state (default: only for one that does); the runs are the same either way (tests).
    """
    t0 = time.perf_counter()
    reps = _replicas(replicas, config, profile, window_s)
    trace = crop_window(validate_trace(trace, source=trace_source), window_s)
    # without a catalog each replica has every adapter at its own max_lora_rank, as twin
    # simulate has them (the same names in the same order: the router's ids are common)
    if catalog is not None:
        catalogs = [catalog] * len(reps)
    else:   # one per rank, not per replica: each reads the whole trace's adapters
        by_rank = {c.max_lora_rank: default_catalog(trace, c) for c in
                   {r.config for r in reps}}
        catalogs = [by_rank[r.config.max_lora_rank] for r in reps]
    catalog = catalogs[0]
    if isinstance(router, str):
        router = make_router(router, table=routing)
    router.bind(len(reps), catalog.adapters)
    # a replica told nothing of what it serves (adapters, its config's lora_modules) serves
    # what the router sends it: a static table's rows, else any adapter
    reps = [r if r.adapters is not None or r.config.lora_modules is not None
            else Replica(r.config, r.profile, router.served(k)) for k, r in enumerate(reps)]
    if isinstance(refresh_s, bool) or not isinstance(refresh_s, (int, float, np.number)) \
            or not refresh_s >= 0:
        raise TwinInputError(f"refresh_s must be a number of seconds >= 0, got {refresh_s!r}",
                             field="refresh_s")
    if refresh_s and not router.reads_state:   # nothing would read the refreshed view
        raise TwinInputError(f"router {router.name} routes from the trace alone and reads no "
                             "view to refresh; refresh_s is for the routers that read replica "
                             "state (least_outstanding_requests, adapter_affinity)",
                             field="refresh_s")
    if sample_dt is None:
        sample_dt = default_sample_dt(trace_horizon(trace, window_s))
    kw = dict(window_s=window_s, sample_dt=sample_dt, trace_source=trace_source)
    if router.reads_state or one_loop:
        route, results = _event_loop(trace, reps, router, catalogs, refresh_s,
                                     progress, **kw)
    else:
        aid = pd.Categorical(trace["adapter"], categories=catalog.adapters).codes
        route = router.route_all(aid)
        results = _independent(trace, reps, route, catalogs, workers, backend, address,
                               progress, **kw)
    return combine_fleet(trace, reps, router, route, results, window_s,
                         wall_s=time.perf_counter() - t0, refresh_s=refresh_s)


def _replicas(replicas, config, profile, window_s) -> list[Replica]:
    if config is not None:
        require_serving_config(config)
    if isinstance(replicas, bool) or not isinstance(replicas, (int, np.integer, list, tuple)):
        raise TwinInputError(f"replicas is a count or a list of ServingConfig / Replica, got "
                             f"{type(replicas).__name__} {str(replicas)[:40]!r}",
                             field="replicas")
    if isinstance(replicas, (int, np.integer)):
        if replicas < 1:
            raise TwinInputError(f"a fleet needs at least 1 replica, got {replicas}",
                                 field="replicas")
        replicas = [Replica(config or ServingConfig(), profile)] * int(replicas)
    out = []
    loaded: dict = {}
    for r in replicas:
        if isinstance(r, ServingConfig):
            r = Replica(r, profile)
        elif not isinstance(r, Replica) or not isinstance(r.config, ServingConfig):
            raise TwinInputError(f"a replica is a ServingConfig or a Replica of one (make one "
                                 f"from a dict: twin.fleet_replica), got {str(r)[:60]!r}",
                                 field="replicas")
        elif r.profile is None:
            r = Replica(r.config, profile, r.adapters)
        if r.config.policy not in ("vllm", "slora"):
            raise TwinInputError(f"a fleet replica is one server (vllm or slora), not "
                                 f"policy {r.config.policy!r}", field="policy")
        key = r.profile if not isinstance(r.profile, Profile) else id(r.profile)
        if key not in loaded:
            loaded[key] = check_run_inputs(r.config, r.profile, window_s)
        prof = loaded[key]
        prof.check_max_model_len(r.config)
        out.append(Replica(r.config, prof, r.adapters))
    if not out:
        raise TwinInputError("a fleet needs at least 1 replica", field="replicas")
    return out


def _event_loop(trace, reps, router, catalogs, refresh_s, progress, *, window_s,
                sample_dt, trace_source):
    cols = TraceColumns(trace, catalogs[0])
    checked: set = set()   # a config's adapters are checked against the trace once
    clocks = []
    for r, catalog in zip(reps, catalogs):
        server = build_server(r.config, r.profile, catalog, trace_source=trace_source,
                              trace=None if r.config in checked else trace,
                              preload=preload_ids(r.config, catalog, r.adapters))
        checked.add(r.config)
        clocks.append(FedClock(cols, catalog, server, r.profile, window_s=window_s,
                               sample_dt=sample_dt))
    bar = progress_bar(progress, float(cols.arrival[-1]) if cols.arrival else 0.0, "sim-s")
    route = run_loop(clocks, cols.arrival, cols.aid, router, refresh_s=refresh_s, bar=bar)
    if bar is not None:
        bar.close()
    cols.release()
    results = [c.result(r.config, r.profile, window_s) if c.rows else None
               for c, r in zip(clocks, reps)]
    return np.asarray(route, dtype=np.int64), results


def simulate_replica(payload):
    """One replica on its share of the trace (a process pool's or Ray's task)."""
    k, sub, config, profile, catalog, preload, kw = payload
    # sub: the fleet's validated, windowed trace's share
    server = build_server(config, profile, catalog, trace=sub,
                          trace_source=kw["trace_source"], preload=preload)
    return k, simulate(sub, config, profile, catalog, server=server, **kw)


class _Shares:
    """The replicas' payloads for a pool, sliced from the trace as the pool takes them
    (a sequence with a length, iterated once): the first replica starts while the parent
    slices the others, instead of after all 64 shares are cut and pickled. Largest share
    first, so the pool's last task is a small one."""

    def __init__(self, trace, reps, route, catalogs, kw):
        self.trace, self.reps, self.catalogs, self.kw = trace, reps, catalogs, kw
        order = np.argsort(route, kind="stable")
        bounds = np.searchsorted(route[order], np.arange(len(reps) + 1))
        rows = [order[bounds[k]:bounds[k + 1]] for k in range(len(reps))]
        self.rows = sorted(((k, r) for k, r in enumerate(rows) if len(r)),
                           key=lambda kr: -len(kr[1]))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        for k, rows in self.rows:
            r, catalog = self.reps[k], self.catalogs[k]
            sub = self.trace.iloc[rows].reset_index(drop=True)
            yield (k, sub, r.config, r.profile, catalog,
                   preload_ids(r.config, catalog, r.adapters), self.kw)


def _independent(trace, reps, route, catalogs, workers, backend, address, progress, **kw):
    payloads = _Shares(trace, reps, np.asarray(route, dtype=np.int64), catalogs, kw)
    results = [None] * len(reps)
    runner = make_backend(backend, workers=workers, address=address)
    bar = progress_bar(progress, len(payloads), "replica")
    for k, res in runner.map_unordered(simulate_replica, payloads):
        results[k] = res
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def progress_bar(enabled: bool, total: float, unit: str, desc: str = "fleet"):
    """A tqdm bar to ``total`` (simulated seconds, replicas), None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm  # lazy: tqdm only for an interactive progress bar

    return tqdm(total=round(total, 1), unit=unit, desc=desc)

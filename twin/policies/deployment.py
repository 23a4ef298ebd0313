"""Deployments: which servers run on which GPU, which requests each gets, and running them.

A strategy deploys a trace as a list of servers (:class:`ServerSpec`). Each server is one
serving process on one GPU, or on a share of one (merged replicas packed several to a
GPU), and serves a set of adapters; every request is routed to exactly one server, or to
none when its adapter has no server (a static deployment that ran out of GPUs).

Every server is simulated on its share of the trace with the shared scheduler and engine.
Servers sharing a GPU split its memory by ``share`` and time-slice its compute: each
server's step times are stretched by ``1 + sum of the other co-located servers' busy
fractions`` (processor sharing, mean field), found by re-simulating until the busy
fractions settle. The per-server results are then combined into one ``RunResult``
(requests, summary, timeline) for the whole deployment.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from twin.costs.step_time import StepTimeModel
from twin.policies.memory import MemoryPlan
from twin.policies.combine import annotate, combine
from twin.results.results import RunResult
from twin.sim.engine import default_catalog, simulate
from twin.workload.catalog import AdapterCatalog

MERGED, VLLM, SLORA = "merged", "vllm", "slora"
MAX_INTERFERENCE_ITERS = 5
INTERFERENCE_TOL = 0.02


class ServerPolicy(Protocol):
    """What a deployment asks of the strategy that made a server (``twin.policies.base``)."""

    name: str

    def memory(self, config, profile, catalog=None, share: float = 1.0) -> MemoryPlan: ...

    def server_parts(self, config, profile, catalog): ...


@dataclass
class ServerSpec:
    kind: str                 # "vllm" | "slora" | "merged" (base-model server, adapter folded in)
    gpu: int
    share: float              # fraction of the GPU's memory (compute is time-sliced)
    adapters: tuple           # adapters served; None stands for base-model requests
    label: str
    policy: ServerPolicy | None = None   # builds the server and accounts its memory


@dataclass
class Deployment:
    policy: str
    servers: list[ServerSpec]
    route: np.ndarray                  # trace row -> server index, -1 = unserved
    gpus: int
    replicas_per_gpu: int = 1
    unserved: list = field(default_factory=list)     # adapters with no server
    notes: dict = field(default_factory=dict)


@dataclass
class ServerRun:
    spec: ServerSpec
    rows: np.ndarray                   # trace rows it served
    result: RunResult | None
    memory: MemoryPlan
    slowdown: float = 1.0              # step-time stretch from co-located servers
    busy_s: float = float("nan")       # time spent in steps
    adapter_gib_mean: float = 0.0      # slora: adapter pages, time average
    adapter_gib_max: float = 0.0

    @property
    def busy_fraction(self) -> float:
        if self.result is None:
            return 0.0
        d = self.result.summary["duration_s"]
        return min(self.busy_s / d, 1.0) if d > 0 and not math.isnan(self.busy_s) else 0.0


@dataclass
class PolicyRun:
    """A strategy's deployment, simulated: the combined result and each server's."""

    policy: str
    deployment: Deployment
    result: RunResult
    servers: list[ServerRun]

    @property
    def gpus(self) -> int:
        return self.deployment.gpus

    def memory_split(self) -> dict:
        """GiB over the whole deployment: weights, KV, adapters (static + resident mean),
        activations; ``per_gpu`` divides by the GPU count."""
        tot = {"weights_gib": 0.0, "kv_gib": 0.0, "adapters_gib": 0.0, "adapters_max_gib": 0.0,
               "activations_gib": 0.0, "host_adapters_gib": 0.0}
        for s in self.servers:
            m = s.memory
            tot["weights_gib"] += m.weights_gib
            tot["activations_gib"] += m.activations_gib
            tot["kv_gib"] += m.pool_gib - s.adapter_gib_mean
            tot["adapters_gib"] += m.adapters_gib + s.adapter_gib_mean
            tot["adapters_max_gib"] += m.adapters_gib + s.adapter_gib_max
            tot["host_adapters_gib"] += m.host_adapters_gib
        g = max(self.gpus, 1)
        tot["per_gpu"] = {k: v / g for k, v in tot.items() if k.endswith("_gib")}
        return tot


# -- routing -----------------------------------------------------------------------------------
def adapter_keys(trace: pd.DataFrame) -> np.ndarray:
    """The adapter of each row as an object array, None for the base model."""
    col = trace["adapter"]
    keys = col.astype(object).to_numpy(copy=True)
    keys[col.isna().to_numpy()] = None
    return keys


def adapter_load(trace: pd.DataFrame) -> dict:
    """Offered tokens (prompt + output) per adapter key (None: base model), hottest first;
    ties by name."""
    keys = adapter_keys(trace)
    tok = (trace["prompt_tokens"].to_numpy(np.int64) + trace["output_tokens"].to_numpy(np.int64))
    load: dict = {}
    for k, t in zip(keys.tolist(), tok.tolist()):
        load[k] = load.get(k, 0) + t
    return dict(sorted(load.items(), key=lambda kv: (-kv[1], "" if kv[0] is None else str(kv[0]))))


def assign_dynamic(policy: ServerPolicy, kind: str, trace: pd.DataFrame, keys: np.ndarray,
                   rows: np.ndarray, gpus: int, route: np.ndarray, servers: list,
                   gpu0: int = 0) -> None:
    """Dynamic (multi-adapter) servers, one per GPU from ``gpu0``, for ``rows`` of the trace.

    Adapters are spread by longest-processing-time on their offered tokens (each adapter on
    one server, so its requests share its slot/pages); base-model requests go round-robin.
    """
    first = len(servers)
    sub = trace.iloc[rows]
    load = adapter_load(sub)
    heap = [(0, i) for i in range(gpus)]
    owner: dict = {}
    for a, t in load.items():
        if a is None:
            continue
        l, i = heapq.heappop(heap)
        owner[a] = i
        heapq.heappush(heap, (l + t, i))
    served: list[list] = [[] for _ in range(gpus)]
    for a, i in owner.items():
        served[i].append(a)
    sub_keys = keys[rows]
    base = np.array([k is None for k in sub_keys.tolist()], dtype=bool)
    srv = np.empty(len(rows), dtype=np.int64)
    if (~base).any():
        srv[~base] = [owner[k] for k in sub_keys[~base].tolist()]
    if base.any():
        srv[base] = np.arange(int(base.sum())) % gpus
        for i in range(gpus):
            served[i].append(None)
    route[rows] = first + srv
    for i in range(gpus):
        servers.append(ServerSpec(kind=kind, gpu=gpu0 + i, share=1.0,
                                  adapters=tuple(served[i]),
                                  label=f"{kind}@gpu{gpu0 + i}", policy=policy))


def dynamic_deployment(policy: ServerPolicy, kind: str, trace: pd.DataFrame,
                       gpus: int) -> Deployment:
    """``gpus`` servers of one dynamic kind (vllm or slora) sharing the whole trace."""
    gpus = max(int(gpus), 1)
    route = np.zeros(len(trace), dtype=np.int64)
    servers: list[ServerSpec] = []
    if gpus == 1:
        servers.append(ServerSpec(kind=kind, gpu=0, share=1.0,
                                  adapters=tuple(adapter_load(trace)), label=f"{kind}@gpu0",
                                  policy=policy))
    else:
        assign_dynamic(policy, kind, trace, adapter_keys(trace), np.arange(len(trace)), gpus,
                       route, servers)
    return Deployment(policy=policy.name, servers=servers, route=route, gpus=gpus)


# -- running -----------------------------------------------------------------------------------
def scaled_profile(profile, factor: float):
    """``profile`` with every step-time weight multiplied by ``factor`` (time-slicing)."""
    if factor == 1.0:
        return profile
    st = profile.step_time

    def mul(d):
        return None if d is None else {k: v * factor for k, v in d.items()}

    curves = [dict(c, s=[v * factor for v in c["s"]]) for c in st.to_dict().get("curves", ())]
    # the dispersion multiplies a price: the same at any speed
    return dataclasses.replace(profile, step_time=StepTimeModel(mul(st.base), mul(st.memory),
                                                               mul(st.compute), curves or None,
                                                               st.dispersion,
                                                               st.autocorrelation))


def _sub_catalog(catalog, adapters):
    names = [a for a in adapters if a is not None]
    t = catalog.table
    return AdapterCatalog(t[t["adapter"].isin(names)], source=catalog.source)


def run_server(spec: ServerSpec, trace: pd.DataFrame, rows: np.ndarray, config, profile,
               catalog, *, whole: bool, window_s, record_steps: bool, sample_dt,
               trace_source: str, slowdown: float = 1.0, progress: bool = False) -> ServerRun:
    """Simulate one server on its rows of ``trace``. ``catalog`` is the resolved catalog
    (a server given the whole trace gets all of it, as ``simulate`` would)."""
    util = config.gpu_memory_utilization * spec.share
    prof = scaled_profile(profile, slowdown)
    pol = spec.policy
    if spec.kind == MERGED:
        cfg = config.replace(policy=VLLM, enable_lora=False, gpu_memory_utilization=util)
    else:
        cfg = config.replace(policy=spec.kind, gpu_memory_utilization=util)
    mem = pol.memory(cfg, profile, None if spec.kind == MERGED else catalog)
    if not len(rows):
        return ServerRun(spec, rows, None, mem, slowdown, 0.0)
    sub = trace if whole else trace.iloc[rows].reset_index(drop=True)
    if spec.kind == MERGED:
        sub = sub.assign(adapter=pd.array([None] * len(sub), dtype="string"))
        cat = None
    else:
        cat = catalog if whole else _sub_catalog(catalog, spec.adapters)
    server = pol.server_parts(cfg, prof, cat) if cat is not None else None
    res = simulate(sub, cfg, prof, cat, server=server, window_s=window_s, progress=progress,
                   record_steps=record_steps, sample_dt=sample_dt, trace_source=trace_source)
    busy = float(res.summary["waiting_held_by"]["busy_s"])   # time in steps (busy_fraction)
    run = ServerRun(spec, rows, res, mem, slowdown, busy)
    pool = res.summary.get("adapter_pool")
    if pool is not None:
        run.adapter_gib_mean, run.adapter_gib_max = pool["mean_gib"], pool["max_gib"]
    return run


def run_deployment(dep: Deployment, trace: pd.DataFrame, config, profile, catalog=None, *,
                   window_s=None, progress=False, record_steps=False, sample_dt=None,
                   trace_source="trace") -> PolicyRun:
    """Simulate every server of ``dep`` (``trace`` already validated and windowed)."""
    if catalog is None:
        catalog = default_catalog(trace, config)
    n_srv = len(dep.servers)
    rows_of = [np.flatnonzero(dep.route == i) for i in range(n_srv)]
    single = n_srv == 1 and len(rows_of[0]) == len(trace) and dep.servers[0].share == 1.0
    by_gpu: dict[int, list[int]] = {}
    for i, s in enumerate(dep.servers):
        by_gpu.setdefault(s.gpu, []).append(i)
    runs: list[ServerRun | None] = [None] * n_srv
    for idxs in by_gpu.values():
        shared = len([i for i in idxs if len(rows_of[i])]) > 1
        slow = {i: 1.0 for i in idxs}
        for _ in range(MAX_INTERFERENCE_ITERS if shared else 1):
            for i in idxs:
                s = dep.servers[i]
                runs[i] = run_server(
                    s, trace, rows_of[i], config, profile, catalog,
                    whole=single, window_s=window_s, record_steps=record_steps or shared,
                    sample_dt=sample_dt, trace_source=trace_source, slowdown=slow[i],
                    progress=progress and single)
            if not shared:
                break
            busy = {i: runs[i].busy_fraction for i in idxs}
            new = {i: 1.0 + sum(busy[j] for j in idxs if j != i) for i in idxs}
            settled = max(abs(new[i] - slow[i]) for i in idxs) < INTERFERENCE_TOL
            slow = new
            if settled:
                break
    if single and dep.servers[0].kind != MERGED and runs[0].result is not None:
        result = runs[0].result
        annotate(result, dep, runs)
    else:
        idle = sum(r.memory.kv_tokens for r in runs
                   if r.result is None and r.memory is not None)
        result = combine(dep, trace, runs, config, profile, window_s, idle_kv_tokens=idle)
    return PolicyRun(policy=dep.policy, deployment=dep, result=result, servers=runs)

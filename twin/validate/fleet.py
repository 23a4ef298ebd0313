"""Validate the fleet twin against executor replicas behind the same router (issue 18).

``validate_fleet`` serves a trace on N reference-executor replicas
(``twin.executor.fed.FedEngine``: the executor ticked by a fleet's event loop) behind a
router, and simulates the same fleet on the twin (``twin.fleet.simulate_fleet``); both
sides run the *same* router classes and the *same* event loop (``twin.fleet.loop``), so a
router that reads replica state (least outstanding requests, adapter affinity) reads the
real replicas' schedulers and adapter caches on one side and the twin's on the other.
Each replica gets the KV capacity both sides agree on (as ``twin validate``) and every
adapter of the trace. Compared: the fleet-wide ``vllm bench serve`` metrics (SMAPE against
the median of the executor runs, as ``twin validate``), each replica's requests,
throughput, TTFT, ITL and adapter loads, and how many requests each side routed alike.

The replicas share one core: each replica's clock advances by its own steps' measured
durations, so they run concurrently in logical time, each step timed alone (see
``twin.executor.fed``).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.costs.machine import warn_if_other_machine
from twin.costs.profile import Profile, load_profile
from twin.errors import TwinInputError
from twin.executor.gc_heap import frozen_heap
from twin.fleet import Replica, make_router, simulate_fleet
from twin.fleet.fleet import progress_bar
from twin.fleet.loop import run_loop
from twin.fleet.report import combine_fleet
from twin.outputs import check_out, json_document, staged_dir
from twin.results import crop_window
from twin.results.plot import plot_timeline
from twin.results.recorder import default_sample_dt, trace_horizon
from twin.validate.compare import compare, format_table, median_summary, run_spread
from twin.validate.fleet_live import check_live_fleet, execute_live_fleet
from twin.validate.run import (_catalogs, _check_profile_model, _executor_model, _kv_blocks,
                               capacity_profile, capped_context, pinned_threads, warm_up)
from twin.workload.schema import validate_trace

__all__ = ["FleetValidation", "validate_fleet"]

REPLICA_KEYS = ("requests", "total_throughput", "ttft_mean_ms", "itl_mean_ms",
                "loads_from_disk", "loads_from_host")


@dataclasses.dataclass
class FleetValidation:
    """``table``: fleet-wide metrics, executor (median of runs) vs twin, with SMAPE;
    ``replicas``: per replica, the first executor run vs the twin; ``route_agreement``:
    the share of requests both sides sent to the same replica (1 for a router that reads
    no state)."""

    table: pd.DataFrame
    replicas: pd.DataFrame
    executor: object             # FleetRun of the first executor run
    twin: object                 # FleetRun of the twin
    executor_summaries: list
    route_agreement: float

    def smape(self, key: str) -> float:
        return float(self.table.set_index("key").loc[key, "smape"])

    @property
    def spread(self) -> dict:
        return run_spread(self.executor_summaries)

    def format(self, title: str = "") -> str:
        per = self.replicas.to_string(index=False, float_format=lambda v: f"{v:.1f}")
        return (format_table(self.table, title) + f"\n\nper replica (executor run 1 / twin); "
                f"requests routed alike: {100 * self.route_agreement:.1f}%\n{per}")

    def to_dict(self) -> dict:
        d = {"router": self.executor.summary["fleet"]["router"],
             "replicas": self.executor.summary["fleet"]["replicas"],
             "executor_runs": len(self.executor_summaries),
             "route_agreement": self.route_agreement,
             "table": self.table.drop(columns="fmt").to_dict(orient="records"),
             "per_replica": self.replicas.to_dict(orient="records")}
        if len(self.executor_summaries) > 1:
            d["executor_spread"] = self.spread
        return d

    def save(self, out, *, plot: bool = True) -> None:
        """executor/ and twin/ fleet results, table.csv, replicas.csv, validation.json and
        the two fleet timelines overlaid, written atomically (kind ``validate``)."""
        with staged_dir(out, "validate") as tmp:
            self.executor.result.write_into(tmp / "executor")
            self.twin.result.write_into(tmp / "twin")
            self.table.drop(columns="fmt").to_csv(tmp / "table.csv", index=False)
            self.replicas.to_csv(tmp / "replicas.csv", index=False)
            (tmp / "validation.json").write_text(json_document(self.to_dict(), indent=2) + "\n")
            if plot:
                plot_timeline(self.executor.result, tmp / "timeline_overlay.png",
                              other=self.twin.result, labels=("executor fleet", "twin fleet"))


def validate_fleet(trace: pd.DataFrame, replicas, profile, router: str = "round_robin",
                   model="tiny", adapters=None, *, config: ServingConfig | None = None,
                   routing=None, refresh_s: float = 0.0, threads: int | None = None,
                   device: str = "cpu", window_s: float | None = None, seed: int = 0,
                   repeats: int = 1, warmup: bool = True, adapter_ranks=(8, 16),
                   trace_source: str = "trace", out=None, plot: bool = True,
                   progress: bool = False, replica_processes: bool = False) -> FleetValidation:
    """Serve ``trace`` on ``replicas`` executor replicas behind ``router`` and compare with
    the fleet twin on ``profile`` (calibrated on this model: ``twin calibrate --executor``).
    ``replicas``: a count (each ``config``) or a list of ServingConfigs. ``routing``: the
    static router's table; ``refresh_s``: the router's view refresh (0: exact).
    ``repeats``: executor fleet runs, the twin compared to their median; ``progress``: a
    bar over the first run's simulated seconds. ``replica_processes``: each executor
    replica in a process of its own, routed in real time (``twin.validate.fleet_live``;
    default: all on this thread, in logical time). Other arguments as
    :func:`twin.validate.validate`."""
    if out is not None:   # a bad destination fails now, not after the executor's runs
        check_out(out, "validate")
    configs = _configs(replicas, config)
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    warn_if_other_machine(profile)
    trace = crop_window(validate_trace(trace, source=trace_source), window_s)
    _check_router(router, routing, len(configs), trace)
    if replica_processes:
        check_live_fleet(model, refresh_s)
    from twin.executor.inputs import checked_inputs   # lazy: needs torch

    with pinned_threads(profile, threads) as used:
        m, model_dir = _executor_model(model, profile, device)
        _check_profile_model(profile, m, model)
        configs = [capped_context(c, m) for c in configs]
        # the adapters every replica is given: a fleet serves them if any replica has LoRA
        lora = next((c for c in configs if c.enable_lora), configs[0])
        catalog, twin_catalog = _catalogs(trace, lora, adapters, model_dir,
                                          adapter_ranks=adapter_ranks, seed=seed)
        for c in dict.fromkeys(configs):   # each replica's config refused now, not mid-run
            checked_inputs(trace, c, catalog, trace_source=trace_source)
        blocks = [_kv_blocks(trace, c, profile, m, twin_catalog, None) for c in configs]
        reps = [Replica(c, capacity_profile(profile, nb, c)) for c, nb in zip(configs, blocks)]
        # one timeline step for both sides
        kw = dict(window_s=window_s, sample_dt=default_sample_dt(trace_horizon(trace, window_s)),
                  seed=seed,
                  refresh_s=refresh_s, routing=routing, trace_source=trace_source)
        if replica_processes:
            runs = [execute_live_fleet(trace, reps, blocks, router, m, model_dir, catalog,
                                       lora, threads=used, warmup=warmup,
                                       progress=progress and i == 0, **kw)
                    for i in range(max(int(repeats), 1))]
        else:
            if warmup:
                warm_up(trace, configs[0], m, catalog, blocks[0], seed)
            runs = [_execute_fleet(trace, reps, blocks, router, m, catalog, lora,
                                   progress=progress and i == 0, **kw)
                    for i in range(max(int(repeats), 1))]
    twin = simulate_fleet(trace, reps, make_router(router, table=routing), catalog=twin_catalog,
                          routing=routing, window_s=window_s, refresh_s=refresh_s,
                          sample_dt=kw["sample_dt"], trace_source=trace_source)
    ex = runs[0]
    summaries = [r.summary for r in runs]
    v = FleetValidation(compare(median_summary(summaries), twin.summary),
                        _replica_table(ex, twin), ex, twin, summaries,
                        float(np.mean(ex.route == twin.route)) if len(trace) else 1.0)
    if out is not None:
        v.save(out, plot=plot)
    return v


def _configs(replicas, config) -> list[ServingConfig]:
    """Every replica's config, refused now (before any executor run) unless the executor
    serves its policy, whether given as a count of ``config`` or one by one."""
    if isinstance(replicas, (int, np.integer)):
        if replicas < 1:
            raise TwinInputError(f"a fleet needs at least 1 replica, got {replicas}",
                                 field="replicas")
        configs = [config or ServingConfig()] * int(replicas)
    else:
        configs = list(replicas)
    if not configs:
        raise TwinInputError("a fleet needs at least 1 replica", field="replicas")
    for c in configs:
        if c.policy not in ("vllm", "slora"):
            raise TwinInputError(f"the executor serves the vllm and slora policies, not "
                                 f"{c.policy!r}", field="policy")
    return configs


def _check_router(router: str, routing, n: int, trace: pd.DataFrame) -> None:
    """The router's input refused before any executor run: an unknown name, the static
    router without a table, a table that cannot be read, names no replica of the fleet or
    lacks a row for an adapter of the trace (else found at that adapter's first request,
    in the middle of an executor run)."""
    r = make_router(router, table=routing)
    names = trace["adapter"].dropna().unique().tolist()
    r.bind(n, names)
    if not r.reads_state:   # a state-free router's picks are known before any run
        r.route_all(pd.Categorical(trace["adapter"], categories=names).codes)


def _execute_fleet(trace, reps, blocks, router, m, catalog, lora, *, window_s, sample_dt,
                   seed, refresh_s, routing, trace_source, progress):
    """One executor fleet run: a FedEngine per replica under the fleet's event loop;
    ``lora``: the config whose LoRA setting decides the adapters the fleet is given."""
    import torch   # lazy: torch is an optional dependency, off `import twin`'s path

    from twin.executor.fed import FedEngine   # lazy: needs torch
    from twin.executor.inputs import checked_inputs   # lazy: needs torch

    t0 = time.perf_counter()
    trace, xcat = checked_inputs(trace, lora, catalog, trace_source=trace_source)
    router = make_router(router, table=routing).bind(len(reps), xcat.adapters)
    meta = {"model": getattr(m, "name", "LlamaModel"), "threads": torch.get_num_threads(),
            "trace": trace_source, "seed": seed, "time_scale": 1.0}
    engines = [FedEngine(trace, r.config, m, xcat, num_gpu_blocks=nb, window_s=window_s,
                         sample_dt=sample_dt, seed=seed, meta=dict(meta, replica=k))
               for k, (r, nb) in enumerate(zip(reps, blocks))]
    aid = pd.Categorical(trace["adapter"], categories=xcat.adapters).codes.tolist()
    arrival = trace["arrival_s"].tolist()
    bar = progress_bar(progress, arrival[-1] if arrival else 0.0, "s", "executor fleet")
    with frozen_heap():   # as vLLM's engines serve (twin.executor.gc_heap)
        route = run_loop(engines, arrival, aid, router, refresh_s=refresh_s, bar=bar)
        if bar is not None:
            bar.close()
        results = [e.result() if len(e.rows) else None for e in engines]
    return combine_fleet(trace, reps, router, np.asarray(route, dtype=np.int64), results,
                         window_s, wall_s=time.perf_counter() - t0, refresh_s=refresh_s)


def _replica_table(ex, twin) -> pd.DataFrame:
    """Per replica: each key of the first executor run beside the twin's."""
    rows = []
    for e, t in zip(ex.summary["fleet"]["per_replica"], twin.summary["fleet"]["per_replica"]):
        row = {"replica": e["replica"]}
        for key in REPLICA_KEYS:
            row[f"{key}_executor"], row[f"{key}_twin"] = e[key], t[key]
        rows.append(row)
    return pd.DataFrame(rows)

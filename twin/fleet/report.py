"""A fleet's results: the fleet-wide ``RunResult`` and each replica's, and the ``fleet``
section of its summary (per replica throughput, TTFT/TPOT/ITL, adapter loads,
preemptions, the starvation verdict; load imbalance across replicas).

The fleet-wide result is the one ``twin.policies`` builds for a deployment of several
servers (``combine``: requests in trace order, the starvation rule per server and for the
whole, timelines summed on one grid); nothing here defines a metric of its own but the
imbalance (max over mean across replicas).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from twin.outputs import staged_dir
from twin.policies.combine import combine
from twin.policies.deployment import Deployment, ServerRun, ServerSpec
from twin.results import RunResult
from twin.servers import server_kv_tokens
from twin.results import plot as plots
from twin.results.queue_head import main_limit


@dataclass
class FleetRun:
    """``result``: the fleet-wide RunResult (``requests`` has the ``replica`` of each);
    ``replicas``: each replica's own RunResult (None: it got no request); ``route``: the
    replica of each trace row."""

    router: str
    result: RunResult
    replicas: list
    route: np.ndarray

    @property
    def summary(self) -> dict:
        return self.result.summary

    def format_summary(self) -> str:
        return self.result.format_summary() + "\n" + format_fleet(self.summary["fleet"])

    def save(self, out_dir, plot: bool = False) -> Path:
        """Write the fleet-wide result (requests.parquet with ``replica``, summary.json,
        timeline.parquet: the replicas' timelines summed), ``replicas.csv``,
        ``replica_timelines.parquet`` (each replica's own timeline, with its ``replica``)
        and ``timeline.png`` (``plot``: throughput, waiting requests and adapter loads over
        time, one line per replica), atomically."""
        with staged_dir(out_dir, "fleet") as tmp:
            self.result.write_into(tmp)
            pd.DataFrame(self.summary["fleet"]["per_replica"]).to_csv(
                Path(tmp) / "replicas.csv", index=False)
            self.replica_timelines().to_parquet(Path(tmp) / "replica_timelines.parquet",
                                                index=False)
            if plot:
                live = [(f"replica-{k}", r) for k, r in enumerate(self.replicas) if r]
                plots.plot_replicas([r for _, r in live], [n for n, _ in live],
                                    Path(tmp) / "timeline.png", title=_title(self.summary))
        return Path(out_dir)

    def replica_timelines(self) -> pd.DataFrame:
        """Every replica's own timeline, one below the other, with its ``replica`` first
        (a replica that got no request has no rows)."""
        parts = [r.timeline.assign(replica=k) for k, r in enumerate(self.replicas) if r]
        if not parts:
            return pd.DataFrame({"replica": pd.Series(dtype=np.int64)})
        df = pd.concat(parts, ignore_index=True)
        return df[["replica"] + [c for c in df.columns if c != "replica"]]


def combine_fleet(trace, reps, router, route, results, window_s, *, wall_s: float,
                  refresh_s: float) -> FleetRun:
    """One FleetRun from each replica's result (``results[k]``, None when idle)."""
    n = len(reps)
    served = _served_adapters(trace, route, n)
    runs = []
    for k, (rep, res) in enumerate(zip(reps, results)):
        spec = ServerSpec(kind=rep.config.policy, gpu=k, share=1.0, adapters=served[k],
                          label=f"replica-{k}")
        busy = res.summary["waiting_held_by"]["busy_s"] if res is not None else 0.0
        runs.append(ServerRun(spec, np.flatnonzero(route == k), res, memory=None, busy_s=busy))
    dep = Deployment(policy=f"fleet/{router.name}", servers=[r.spec for r in runs],
                     route=np.asarray(route), gpus=n)
    idle = sum(server_kv_tokens(rep.config, rep.profile)
               for rep, res in zip(reps, results) if res is None)
    result = combine(dep, trace, runs, reps[0].config, reps[0].profile, window_s,
                     idle_kv_tokens=idle)
    result.requests = result.requests.rename(columns={"server": "replica"})
    result.requests["adapter"] = trace["adapter"].array   # the trace's dtype, as simulate's
    verdicts = [p["starving"] for p in result.summary["deployment"]["per_server"]]
    per = [_replica_row(k, rep, res, verdicts[k]) for k, (rep, res) in
           enumerate(zip(reps, results))]
    result.summary["fleet"] = {
        "router": repr(router), "reads_state": bool(router.reads_state),
        "refresh_s": refresh_s if router.reads_state else None, "replicas": n, "wall_s": wall_s,
        "starving_replicas": int(sum(verdicts)),
        "imbalance": {key: _imbalance([p[key] for p in per])
                      for key in ("requests", "total_throughput")},
        "per_replica": per,
    }
    result.meta["router"] = repr(router)
    result.meta["replicas"] = [{"config": r.config.to_dict(), "profile": r.profile.name}
                               for r in reps]
    for key in ("config", "profile"):   # replica 0's stands for the fleet only if all agree
        if any(m[key] != result.meta["replicas"][0][key] for m in result.meta["replicas"]):
            result.meta[key] = None
    return FleetRun(router.name, result, results, np.asarray(route))


def _served_adapters(trace, route, n) -> list[tuple]:
    names = trace["adapter"].astype(object).where(trace["adapter"].notna(), None)
    pairs = pd.DataFrame({"k": route, "a": names}).drop_duplicates()
    out: list[list] = [[] for _ in range(n)]
    for k, a in zip(pairs["k"].tolist(), pairs["a"].tolist()):
        out[k].append(a)
    return [tuple(x) for x in out]


def _replica_row(k: int, rep, res: RunResult | None, starving: bool) -> dict:
    row = {"replica": k, "profile": rep.profile.name, "max_loras": rep.config.max_loras,
           "max_cpu_loras": rep.config.max_cpu_loras}
    s = res.summary if res is not None else None
    nan = float("nan")
    row.update({
        "requests": s["num_requests"] if s else 0,
        "completed": s["completed"] if s else 0,
        "total_throughput": s["total_throughput"] if s else 0.0,
        "ttft_mean_ms": s["ttft_ms"]["mean"] if s else nan,
        "ttft_p99_ms": s["ttft_ms"]["p99"] if s else nan,
        "tpot_mean_ms": s["tpot_ms"]["mean"] if s else nan,
        "tpot_p99_ms": s["tpot_ms"]["p99"] if s else nan,
        "itl_mean_ms": s["itl_ms"]["mean"] if s else nan,
        "itl_p99_ms": s["itl_ms"]["p99"] if s else nan,
        "loads_from_disk": s["adapter_loads"]["from_disk"] if s else 0,
        "loads_from_host": s["adapter_loads"]["from_host"] if s else 0,
        "preemptions": s["preemptions"] if s else 0,
        "starving": bool(starving),
        # the limit that held its queue most of its busy time ("" when none did)
        "held_by": (main_limit(s.get("waiting_held_by")) or "") if s else "",
        # the adapter it held back while keeping up in total (twin.results.fairness)
        "held_back": _held_back(s),
    })
    return row


def _held_back(s: dict | None) -> str:
    """The adapter a replica held back, with its mean wait ("" when none was)."""
    a = (s or {}).get("slowest_adapter")
    return f"{a['adapter']} waited {a['wait_mean_s']:.1f} s" if a and a["held_back"] else ""


def _imbalance(values) -> float:
    """Max over mean across replicas (1 = even; N = all on one replica)."""
    v = np.asarray(values, dtype=float)
    return float(v.max() / v.mean()) if len(v) and v.mean() > 0 else 1.0


def _title(s: dict) -> str:
    f = s["fleet"]
    verdict = (f"{f['starving_replicas']} replica(s) STARVING" if f["starving_replicas"]
               else "every replica keeps up")
    return (f"{f['router']}, {f['replicas']} replicas: {s['total_throughput']:.0f} tok/s, "
            f"p99 TTFT {s['ttft_ms']['p99']:.0f} ms; {verdict}")


def _view(f: dict) -> str:
    """What the router's picks read: the trace alone, or the replicas' state as of when."""
    if not f.get("reads_state", True):
        return "routing from the trace alone (no replica state read)"
    return "view refreshed " + ("at each arrival" if not f["refresh_s"]
                                else f"every {f['refresh_s']:g} s")


def _verdict(p: dict) -> str:
    """A replica's verdict as ``twin simulate`` words it: the limit that held its queue
    named only when it starves; an adapter held back named when it keeps up."""
    if p["starving"]:
        return "STARVING" + (f" (queue held by {p['held_by']})" if p.get("held_by") else "")
    return "ok" + (f" ({p['held_back']} on average: held back)" if p.get("held_back") else "")


def format_fleet(f: dict) -> str:
    """The per-replica table under the fleet-wide summary."""
    lines = [f"Fleet: {f['replicas']} replicas, router {f['router']}, " + _view(f),
             f"Imbalance (max/mean): requests {f['imbalance']['requests']:.2f}, "
             f"throughput {f['imbalance']['total_throughput']:.2f}; starving replicas: "
             f"{f['starving_replicas']}",
             f"{'replica':>7} {'requests':>9} {'tok/s':>9} {'TTFT p99':>9} {'ITL mean':>9} "
             f"{'disk':>6} {'host':>6} {'preempt':>7}  verdict"]
    for p in f["per_replica"]:
        lines.append(f"{p['replica']:>7} {p['requests']:>9} {p['total_throughput']:>9.0f} "
                     f"{p['ttft_p99_ms']:>9.0f} {p['itl_mean_ms']:>9.1f} "
                     f"{p['loads_from_disk']:>6} {p['loads_from_host']:>6} "
                     f"{p['preemptions']:>7}  {_verdict(p)}")
    return "\n".join(lines)

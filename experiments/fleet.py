"""The fleet twin's figures (issue 18): scale, and routers side by side.

Scale. The Azure 2023 conversation hour (19,366 requests, 5.5 req/s) sent by each of 64
tenants, one adapter each, arrivals circularly shifted per tenant
(``twin.workload.generate.tenant_copies``: 1.24 M requests in one simulated hour), served by
64 replicas (H100 profile, max_loras 4, max_cpu_loras 16), run to completion:

- ``fleet64_affinity_wall_s`` / ``fleet64_affinity_peak_rss_mb``: the adapter-affinity
  router, exact view (refresh 0), every replica in one event loop, one process;
- ``fleet64_static_pool_wall_s``: a static table (tenant k on replica k), replicas simulated
  independently in a local pool of 2 workers.

Each is timed in a fresh process (peak RSS is that process's, trace building included);
medians over ``--repeats``. ``..._cpu_s`` (CPU seconds, pool workers included) is reported
beside each wall time (``..._wall_s``) and peak RSS (``..._peak_rss_mb``): on a shared,
loaded machine it says more than the wall time.

Routers side by side. A skewed trace: the Azure hour x 4 tenants' arrivals (21.5 req/s)
with 128 adapters of power-law popularity alpha 0.3 (the hottest gets 23% of requests),
measured over its 30-minute window as ``vllm bench serve --duration`` (the backlog left at
the end counts against the verdict). Each router on 6 replicas (max_loras 8, max_cpu_loras 32): adapter loads
(disk, host), p99 TTFT, starving replicas; then the fewest replicas (4..10) with no replica
starving, per router. The static table is a longest-processing-time split of the adapters'
offered tokens, one replica per adapter (``twin place`` would also split a hot adapter).
Figure: ``experiments/figures/fleet_routers.png``; table: ``fleet_routers.csv``.

    python experiments/fleet.py [--repeats 1] [--part all|scale|routers|executor]

``--part executor`` (in ``all``): two executor replicas behind each router against the
fleet twin (``experiments/fleet_executor.py``, the ``fleet_vs_executor_*`` keys); run it
un-niced under the timing lock, its steps are timed.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.fleet import simulate_fleet
from twin.fleet.routers import ROUTERS, StaticTable
from twin.policies.deployment import adapter_load
from twin.workload.generate import tenant_copies
from twin.workload.popularity import assign_adapters
from twin.workload.schema import read_trace

ROOT = Path(__file__).resolve().parents[1]
AZURE = ROOT / "traces" / "azure_conv_1h.parquet"
FIGURES = ROOT / "experiments" / "figures"
PROFILE = "llama31-8b-h100-64gb"
SCALE_CONFIG = ServingConfig(max_loras=4, max_cpu_loras=16)
SKEW_CONFIG = ServingConfig(max_loras=8, max_cpu_loras=32)
SKEW_WINDOW_S, SKEW_REPLICAS, GPU_RANGE = 1800.0, 6, range(4, 11)


def scale_trace(n: int = 64) -> pd.DataFrame:
    return tenant_copies(read_trace(AZURE), n, span_s=3600.0, seed=0)


def one_to_one(n: int) -> pd.DataFrame:
    names = [f"tenant-{k}" for k in range(n)]
    return pd.DataFrame({"adapter": names, "gpu": range(n), "weight": 1.0})


def scale_case(case: str) -> dict:
    """One timed run (in its own process): the fleet call's wall time and peak RSS."""
    trace = scale_trace()
    router = "adapter_affinity" if case == "affinity" else StaticTable(one_to_one(64))
    t0, c0 = time.perf_counter(), _cpu_s()
    run = simulate_fleet(trace, 64, router, config=SCALE_CONFIG, profile=PROFILE,
                         workers=1 if case == "affinity" else 2)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    s = run.summary
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 1024, "requests": s["num_requests"], "completed": s["completed"],
            "starving_replicas": s["fleet"]["starving_replicas"],
            "loads": s["adapter_loads"]["from_disk"] + s["adapter_loads"]["from_host"],
            "imbalance": s["fleet"]["imbalance"]["requests"]}


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (a pool's workers)."""
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                 resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_child(case: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def skewed_trace() -> pd.DataFrame:
    t = tenant_copies(read_trace(AZURE), 4, span_s=3600.0, seed=1)
    t = t[t["arrival_s"] <= SKEW_WINDOW_S].reset_index(drop=True)
    return assign_adapters(t, 128, popularity="powerlaw", alpha=0.3, seed=0)


def lpt_table(trace: pd.DataFrame, n: int) -> pd.DataFrame:
    """Adapters on ``n`` replicas, hottest first onto the least-loaded (offered tokens)."""
    loads = np.zeros(n)
    rows = []
    for a, tok in adapter_load(trace).items():
        k = int(np.argmin(loads))
        loads[k] += tok
        rows.append({"adapter": a, "gpu": k, "weight": 1.0})
    return pd.DataFrame(rows)


def route(trace: pd.DataFrame, name: str, n: int):
    router = StaticTable(lpt_table(trace, n)) if name == "static" else name
    return simulate_fleet(trace, n, router, config=SKEW_CONFIG, profile=PROFILE,
                          window_s=SKEW_WINDOW_S, workers=2)


def routers_side_by_side() -> pd.DataFrame:
    trace = skewed_trace()
    rows = []
    for name in ROUTERS:
        run = route(trace, name, SKEW_REPLICAS)
        s = run.summary
        needed = None
        for n in GPU_RANGE:
            r = run if n == SKEW_REPLICAS else route(trace, name, n)
            if not r.summary["starving"]:
                needed = n
                break
        rows.append({"router": name, "replicas": SKEW_REPLICAS,
                     "loads_from_disk": s["adapter_loads"]["from_disk"],
                     "loads_from_host": s["adapter_loads"]["from_host"],
                     "ttft_p99_ms": s["ttft_ms"]["p99"], "ttft_mean_ms": s["ttft_ms"]["mean"],
                     "starving_replicas": s["fleet"]["starving_replicas"],
                     "imbalance": s["fleet"]["imbalance"]["total_throughput"],
                     "gpus_needed": needed})
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def plot_routers(df: pd.DataFrame, path: Path) -> None:
    import matplotlib   # lazy: only when the figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # lazy: as above

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = np.arange(len(df))
    axes[0].bar(x, df["loads_from_disk"], label="from disk")
    axes[0].bar(x, df["loads_from_host"], bottom=df["loads_from_disk"], label="from host")
    axes[0].set_ylabel(f"adapter loads ({SKEW_REPLICAS} replicas)")
    axes[0].legend()
    axes[1].bar(x, df["ttft_p99_ms"] / 1000)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("p99 TTFT (s, log)")
    needed = df["gpus_needed"].fillna(0)
    axes[2].bar(x, needed)
    axes[2].set_ylabel(f"GPUs needed (none starving; 0 = > {GPU_RANGE[-1]})")
    for ax in axes:
        ax.set_xticks(x, df["router"].str.replace("_", "\n"), fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Routers side by side: Azure conv x 4 tenants' arrivals, 128 adapters "
                 "(power law 0.3), 30 min, H100", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--part", choices=["all", "scale", "routers", "executor"], default="all")
    p.add_argument("--case", choices=["affinity", "static"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(scale_case(args.case)))
        return
    out = {"box_loadavg_1m_at_start": os.getloadavg()[0]}
    if args.part in ("all", "scale"):
        for case in ("affinity", "static"):
            runs = [run_child(case) for _ in range(args.repeats)]
            print(case, runs, flush=True)
            key = "fleet64_affinity" if case == "affinity" else "fleet64_static_pool"
            for fig in ("wall_s", "cpu_s", "peak_rss_mb"):
                out[f"{key}_{fig}"] = statistics.median(r[fig] for r in runs)
            out[f"{key}_detail"] = runs[-1]
    if args.part in ("all", "routers"):
        df = routers_side_by_side()
        FIGURES.mkdir(parents=True, exist_ok=True)
        df.to_csv(FIGURES / "fleet_routers.csv", index=False)
        plot_routers(df, FIGURES / "fleet_routers.png")
        out["routers"] = df.set_index("router").to_dict(orient="index")
    if args.part in ("all", "executor"):
        from fleet_executor import part_executor   # lazy: it imports this module

        out.update(part_executor(ROOT / "runs" / "fleet_executor"))
    out["box_loadavg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()

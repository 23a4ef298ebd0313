"""Issue 18, item 5: the fleet twin against executor replicas behind the same router.

Two reference-executor replicas (the tiny Llama on CPU, one torch thread, fp32) behind each
router the fleet twin offers, on workloads of different shapes, against the fleet twin with
a profile calibrated on this machine a minute before (``twin calibrate --executor``):
fleet-wide throughput, mean TTFT and mean ITL SMAPE against the median of the executor
runs, beside the executor's own spread between its runs; per replica, requests and adapter
loads on both sides; and how many requests both sides routed to the same replica (a router
that reads replica state routes by each side's own state).

    python experiments/fleet_executor.py [--repeats 2] [--profile P.json] [--only a,b]
                                         [--replica-processes]
    python experiments/fleet.py --part executor          # the same, inside fleet.py's JSON

Run it un-niced under the shared timing lock (``flock /work/timing.lock``): the executor's
steps are timed. The last line is one JSON object: ``fleet_vs_executor_throughput_smape_median``,
``fleet_vs_executor_ttft_smape_median``, ``fleet_vs_executor_itl_smape_median`` (and
``_max``), the executor's own spreads, per workload rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet import lpt_table  # noqa: E402
from validate_executor import cfg, real_slice, synthetic, with_base  # noqa: E402

from twin.validate.fleet import validate_fleet  # noqa: E402

REPLICAS = 2


def workloads() -> list[tuple]:
    """(name, trace, config, router, refresh_s); rates ~2x the one-server workloads of
    ``validate_executor.py``: two replicas share them."""
    sg = real_slice("servegen_32tenants_10min.parquet", 8, 2.5, 192, 64)
    return [
        ("rr-uniform-8a-ml2", synthetic(8, 8.0, 15, 16, 128, 1.0, 41),
         cfg(max_loras=2, max_cpu_loras=4), "round_robin", 0.0),
        ("lor-bursty-cv4-16a-ml4", synthetic(16, 16.0, 15, 16, 128, 0.3, 42, cv=4.0),
         cfg(max_loras=4, max_cpu_loras=8), "least_outstanding_requests", 0.0),
        ("affinity-skewed-32a-ml4", synthetic(32, 24.0, 12, 32, 160, 0.3, 43),
         cfg(max_loras=4, max_cpu_loras=8), "adapter_affinity", 0.0),
        ("affinity-scraped-mix-base-16a-ml4",
         with_base(synthetic(16, 20.0, 12, 16, 160, 1.0, 44), 0.3, 44),
         cfg(max_loras=4, max_cpu_loras=8), "adapter_affinity", 0.5),
        ("hash-azure-32a-ml8", real_slice("azure_conv_1h_32lora.parquet", 20, 0.5, 256, 96),
         cfg(max_loras=8, max_cpu_loras=16), "consistent_hash", 0.0),
        ("static-servegen-32t-ml4", sg, cfg(max_loras=4, max_cpu_loras=8), "static", 0.0),
        ("lor-overload-16a-ml8", synthetic(16, 120.0, 5, 32, 192, 0.3, 45),
         cfg(max_loras=8, max_cpu_loras=16, max_num_seqs=8), "least_outstanding_requests",
         0.0),
    ]


OVERLOADED = ("lor-overload-16a-ml8",)


def calibrate(out: Path, repeats: int) -> Path:
    from twin.calibrate.executor import calibrate_executor  # lazy: torch

    path = out / "cpu-tiny.json"
    calibrate_executor("tiny", out=path, repeats=repeats, threads=1, progress=False,
                       log=lambda *a, **k: None)
    return path


def run_workload(name, trace, config, router, refresh_s, profile, repeats,
                 processes: bool = False) -> dict:
    routing = lpt_table(trace, REPLICAS) if router == "static" else None
    if processes:   # replica processes are read as of their last step: no scrape interval
        refresh_s = 0.0
    t0 = time.perf_counter()
    v = validate_fleet(trace, REPLICAS, profile, router, "tiny", config=config,
                       routing=routing, refresh_s=refresh_s, threads=1, repeats=repeats,
                       replica_processes=processes)
    sp = v.spread if repeats > 1 else {}
    per = v.replicas
    row = {"workload": name, "router": router, "refresh_s": refresh_s, "requests": len(trace),
           "thru": 100 * v.smape("throughput"), "TTFT": 100 * v.smape("ttft_mean"),
           "ITL": 100 * v.smape("itl_mean"), "TTFT99": 100 * v.smape("ttft_p99"),
           "ITL99": 100 * v.smape("itl_p99"), "loads_disk": 100 * v.smape("loads_disk"),
           "thru_spread": 100 * sp.get("throughput", np.nan),
           "TTFT_spread": 100 * sp.get("ttft_mean", np.nan),
           "ITL_spread": 100 * sp.get("itl_mean", np.nan),
           "route_agreement": v.route_agreement,
           "requests_per_replica": (per["requests_executor"].tolist(),
                                    per["requests_twin"].tolist()),
           "disk_loads_per_replica": (per["loads_from_disk_executor"].tolist(),
                                      per["loads_from_disk_twin"].tolist()),
           "itl_ms": (v.executor.summary["itl_ms"]["mean"], v.twin.summary["itl_ms"]["mean"]),
           "wall_s": round(time.perf_counter() - t0, 1)}
    return row


def figures(df: pd.DataFrame) -> dict:
    over = df[df["workload"].isin(OVERLOADED)]
    r = lambda x: None if pd.isna(x) else round(float(x), 2)   # noqa: E731  (NaN: JSON null)
    return {
        "fleet_vs_executor_throughput_smape_median": r(df["thru"].median()),
        "fleet_vs_executor_throughput_smape_max": r(df["thru"].max()),
        "fleet_vs_executor_ttft_smape_median": r(df["TTFT"].median()),
        "fleet_vs_executor_itl_smape_median": r(df["ITL"].median()),
        "fleet_vs_executor_ttft_p99_smape_median": r(df["TTFT99"].median()),
        "fleet_vs_executor_itl_p99_smape_median": r(df["ITL99"].median()),
        "fleet_vs_executor_overload_throughput_smape_max": (r(over["thru"].max())
                                                            if len(over) else None),
        "fleet_vs_executor_route_agreement_median": r(df["route_agreement"].median()),
        "fleet_executor_spread_median": {c: r(df[f"{c}_spread"].median())
                                         for c in ("thru", "TTFT", "ITL")},
        "fleet_vs_executor_workloads": len(df),
    }


def part_executor(out: Path, *, repeats: int = 2, profile=None, cal_repeats: int = 3,
                  only=None, processes: bool = False, log=print) -> dict:
    import torch  # lazy: torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if profile is None:
        profile = calibrate(out, cal_repeats)
        log(f"calibrated {profile} in {time.perf_counter() - t0:.0f} s", flush=True)
    known = [w[0] for w in workloads()]
    if only and not set(only) <= set(known):
        raise SystemExit(f"--only: unknown workload(s) {sorted(set(only) - set(known))}; "
                         f"known: {', '.join(known)}")
    rows = []
    for w in workloads():
        if only and w[0] not in only:
            continue
        row = run_workload(*w, profile, repeats, processes)
        rows.append(row)
        log(f"{row['workload']:<36} {row['router']:<27} thru {row['thru']:5.1f}% "
            f"TTFT {row['TTFT']:5.1f}% ITL {row['ITL']:5.1f}% (spread {row['thru_spread']:.1f}"
            f"/{row['TTFT_spread']:.1f}/{row['ITL_spread']:.1f}) routed alike "
            f"{100 * row['route_agreement']:.0f}% ({row['wall_s']} s)", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "fleet_executor.csv", index=False)
    rows = df.round(2).astype(object).where(df.notna(), None).to_dict(orient="records")
    return {**figures(df), "fleet_executor_replica_processes": processes,
            "fleet_executor_rows": rows,
            "fleet_executor_wall_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="executor fleet runs per workload")
    p.add_argument("--profile", help="a calibrated cpu-tiny profile (default: calibrate now)")
    p.add_argument("--cal-repeats", type=int, default=3, help="calibration repeats")
    p.add_argument("--only", help="comma-separated workload names")
    p.add_argument("--out", type=Path, default=Path("runs/fleet_executor"))
    p.add_argument("--replica-processes", action="store_true",
                   help="each executor replica in a process of its own, routed in real time "
                        "(twin validate --replica-processes); default: one thread")
    a = p.parse_args(argv)
    res = part_executor(a.out, repeats=a.repeats, profile=a.profile, cal_repeats=a.cal_repeats,
                        only=set(a.only.split(",")) if a.only else None,
                        processes=a.replica_processes)
    print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Speed of the twin (issue 2): simulated requests per CPU-second and simulated seconds per
wall second, on three workloads, each case in its own process so peak RSS is its own.

Each case runs in a fresh process that reads the trace from Parquet and simulates it, as
`twin simulate --trace FILE` does; peak RSS is that process's.

(a) the Azure 2023 conversation hour (19,366 requests, 5.5 req/s), base model, default
    profile, run to completion;
(b) one simulated hour of the heaviest real vLLM-H100 workload at its best setting:
    32 adapters, rate classes 1.6/0.8/0.4 req/s (~30 req/s), rank 16,
    max_loras = max_cpu_loras = 32, max_num_seqs = max_num_batched_tokens = 2048;
(c) the same rates with 96 adapters (~90 req/s, max_loras 32, max_cpu_loras 96): it
    starves, the waiting queue grows to tens of thousands.

Lengths for (b)/(c) are drawn from the bundled ShareGPT-derived pool
(traces/rate_classes_32_heavy_10min.parquet: prompt <= 1024, prompt+output <= 2048, means
rescaled to the runs' 223/196 tokens). Timings are medians of --repeats runs.

    python experiments/bench_speed.py [--repeats 3]

The last line is one JSON object: azure_conv_req_per_cpu_s, heavy_hour_wall_s,
starving_hour_wall_s, peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.sim import simulate
from twin.workload.generate import rate_class_trace
from twin.workload.schema import read_trace, write_trace

ROOT = Path(__file__).resolve().parents[1]
N_ADAPTERS = {"heavy": 32, "starving": 96}


def case_config(case: str) -> tuple[ServingConfig, float | None]:
    """The serving config and measured window of ``case``."""
    if case == "azure":
        return ServingConfig(enable_lora=False), None
    cfg = ServingConfig(max_loras=32, max_cpu_loras=N_ADAPTERS[case], max_lora_rank=16,
                        max_num_seqs=2048, max_num_batched_tokens=2048, max_model_len=131072,
                        preload_adapters=True)
    return cfg, 3600.0


def build_trace(case: str) -> pd.DataFrame:
    """The trace of ``case`` (the parent process writes it for the child to read)."""
    if case == "azure":
        return read_trace(ROOT / "traces" / "azure_conv_1h.parquet")
    pool_trace = read_trace(ROOT / "traces" / "rate_classes_32_heavy_10min.parquet")
    pool = np.stack([pool_trace["prompt_tokens"].to_numpy(), pool_trace["output_tokens"].to_numpy()], 1)
    return rate_class_trace(N_ADAPTERS[case], (1.6, 0.8, 0.4), duration_s=3600, lengths=pool,
                            seed=1)


def run_case(case: str, repeats: int, trace_file: str) -> dict:
    """In a fresh process, as `twin simulate --trace FILE` would: read, then simulate (the
    config only: the child reads no other trace, so its peak RSS is that command's)."""
    cfg, window = case_config(case)
    trace = read_trace(trace_file)
    walls, cpus = [], []
    res = None
    for _ in range(repeats):
        res = None   # one run's memory at a time, as one `twin simulate` process holds
        w0, c0 = time.perf_counter(), time.process_time()
        res = simulate(trace, cfg, window_s=window)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    s = res.summary
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {"case": case, "requests": len(trace), "wall_s": wall, "cpu_s": cpu,
            "req_per_cpu_s": len(trace) / cpu, "sim_s_per_wall_s": s["duration_s"] / wall,
            "steps": s["steps"], "total_throughput": s["total_throughput"],
            "achieved_over_offered": s["achieved_over_offered"], "starving": s["starving"],
            "max_waiting": int(res.timeline["waiting"].max()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", choices=("azure", "heavy", "starving"), help=argparse.SUPPRESS)
    ap.add_argument("--trace-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process
        print(json.dumps(run_case(args.case, args.repeats, args.trace_file)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("azure", "heavy", "starving"):
            path = Path(tmp) / f"{case}.parquet"
            write_trace(build_trace(case), path)
            out = subprocess.run([sys.executable, __file__, "--case", case, "--repeats",
                                  str(args.repeats), "--trace-file", str(path)],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'case':<10}{'requests':>9}{'wall s':>8}{'cpu s':>8}{'req/cpu-s':>11}"
          f"{'sim-s/wall-s':>13}{'steps':>9}{'tok/s':>9}{'ach/off':>8}{'max wait':>9}{'RSS MB':>8}")
    for r in rows:
        print(f"{r['case']:<10}{r['requests']:>9}{r['wall_s']:>8.2f}{r['cpu_s']:>8.2f}"
              f"{r['req_per_cpu_s']:>11.0f}{r['sim_s_per_wall_s']:>13.0f}{r['steps']:>9}"
              f"{r['total_throughput']:>9.0f}{r['achieved_over_offered']:>8.2f}"
              f"{r['max_waiting']:>9}{r['peak_rss_mb']:>8.0f}")
    by = {r["case"]: r for r in rows}
    print("targets: (a) >= 10,000 req/CPU-s (Vidur ~450); (b) <= 5 s wall (paper's twin ~40 s per "
          "simulated hour); (c) <= 15 s wall; peak RSS <= 300 MB")
    print(json.dumps({"azure_conv_req_per_cpu_s": round(by["azure"]["req_per_cpu_s"]),
                      "heavy_hour_wall_s": round(by["heavy"]["wall_s"], 2),
                      "starving_hour_wall_s": round(by["starving"]["wall_s"], 2),
                      "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rows))}))


if __name__ == "__main__":
    main()

"""The benchmark client's cap on requests in flight, checked on overloaded real H100 runs
(issue 15, README_validate "the client's ceiling").

For each cap: simulate N overloaded runs of an experiment set (waiting queue above 10,000
at some point, over 12,000 in flight on average: ``overloaded_runs``, which
``fit_client_cap`` reads) with
the shipped profile's step time, and compare the twin's mean TTFT, throughput and
time-averaged requests in flight with the real scrape's.

    python experiments/client_cap_probe.py --caps 22101 26569 --set digital_twin_modelling

The last line printed is one JSON object: per cap, the medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp

import pandas as pd

from twin.calibrate.vllm import simulate_run
from twin.calibrate.vllm_fits import overloaded_runs
from twin.calibrate.vllm_runs import read_run_table
from twin.costs.profile import load_profile
from twin.workload.public import shared_data_dir

_PROFILE = None


def _job(args):
    run, cap = args
    s = simulate_run(run, _PROFILE, seed=0, max_in_flight=cap)
    m = run.metrics
    return {"run": run.key.rsplit("/", 2)[-2] + "/" + run.key.rsplit("/", 2)[-1],
            "cap": cap, "in_flight_real": m["num_waiting_mean"] + m["num_running_mean"],
            "in_flight_twin": s["num_waiting_mean"] + s["num_running_mean"],
            "throughput_signed": 100 * (s["total_throughput"] / m["total_throughput"] - 1),
            "ttft_signed": 100 * (s["mean_ttft_ms"] / m["mean_ttft_ms"] - 1)}


def overloaded(runs, n: int):
    """``n`` of the runs ``fit_client_cap`` reads, spread by key (deterministic)."""
    heavy = sorted(overloaded_runs(runs), key=lambda r: r.key)
    return heavy[::max(1, len(heavy) // n)][:n]


def main(argv=None) -> int:
    global _PROFILE
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", type=int, nargs="+", required=True)
    ap.add_argument("--set", default="digital_twin_modelling", help="experiment set")
    ap.add_argument("--runs", type=int, default=12, help="overloaded runs, spread by key")
    ap.add_argument("--profile", default="llama31-8b-h100-64gb")
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args(argv)
    _PROFILE = load_profile(args.profile)
    table = shared_data_dir() / "vllm-h100" / "real_runs_llama31_8b.csv"
    runs = overloaded([r for r in read_run_table(table)
                       if r.extra.get("experiment_set") == args.set], args.runs)
    jobs = [(r, c) for c in args.caps for r in runs]
    with mp.get_context("fork").Pool(args.processes) as pool:
        df = pd.DataFrame(pool.map(_job, jobs, chunksize=1))
    df["ttft_abs"] = df.ttft_signed.abs()
    df["real_over_twin_in_flight"] = df.in_flight_real / df.in_flight_twin
    with pd.option_context("display.width", 200):
        print(df.round(2).to_string(index=False))
    med = df.groupby("cap")[["ttft_signed", "ttft_abs", "throughput_signed",
                             "real_over_twin_in_flight"]].median().round(3)
    print(med.to_string())
    print(json.dumps({"set": args.set, "runs": len(runs),
                      "by_cap": {int(c): row.to_dict() for c, row in med.iterrows()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

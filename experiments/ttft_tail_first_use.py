"""Where the real H100 runs' TTFT tail comes from at light load: one slow first request per
served adapter (issue 15, README_validate "the TTFT tail at light load").

The runs record only the mean, median and p99 TTFT (no per-request data). A cost paid once
per adapter, by the first request that names it, shows in the p99 exactly when those first
requests are more than 1% of the run's requests (``served adapters / completed requests``
> 1%), whatever the load; a cost that grows with load or with the batch does not switch at
that line. This script takes the non-queueing runs of both sets (``num_waiting_mean`` < 1)
at light load (``num_running_mean`` below ``--max-running``), splits them at 1% and prints
each group's p99 and mean excess over the median; then estimates the per-adapter cost two
ways: from the p99 of the runs above the line (p99 - median: the p99 *is* a first request),
and from the mean of all light runs (mean - median = fraction x cost + the rest).

vLLM 0.8.5 does per-adapter work on a first request in its API server: its
``TokenizerGroup.get_lora_tokenizer`` tries to load a tokenizer from the adapter's folder
for every new ``lora_int_id`` (cached after, in an LRU of ``max(max_loras, max_num_seqs)``
entries). Whether that is the ~0.3 s measured here is not established (the runs' logs give
no per-request times); the twin replays the runs with adapters preloaded and has no such
cost.

    python experiments/ttft_tail_first_use.py
    python experiments/ttft_tail_first_use.py --profile llama31-8b-h100-64gb \
        --profile experiments/figures/llama31-8b-h100-64gb-firstreq.json

``--profile`` (repeatable) also simulates the same light runs with that profile (3600-s
windows, seed 0) and sets the twin's median / p99 TTFT beside the real ones, per band: the
first-request delay (``frontend.first_lora_request_s``) should raise the twin's p99 above
the 1% line only.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd

from twin.calibrate.frontend_fit import light_runs as light_specs
from twin.calibrate.run_sim import simulate_run
from twin.calibrate.vllm_runs import read_run_table
from twin.costs.profile import load_profile
from twin.results import smape
from twin.workload.public import shared_data_dir

RUNS_CSV = ("vllm-h100", "real_runs_llama31_8b.csv")


def light_runs(max_running: float) -> pd.DataFrame:
    """The ok, non-anomalous runs without a queue and below ``max_running`` running."""
    rr = pd.read_csv(shared_data_dir().joinpath(*RUNS_CSV))
    rr = rr[(rr["status"] == "ok") & rr["anomaly"].isna()]
    rr = rr[(rr["num_waiting_mean"] < 1) & (rr["num_running_mean"] < max_running)].copy()
    rr["first_share_pct"] = 100 * rr["max_cpu_loras"] / rr["completed_requests"]
    rr["p99_over_median"] = rr["p99_ttft_ms"] / rr["median_ttft_ms"]
    rr["mean_excess_ms"] = rr["mean_ttft_ms"] - rr["median_ttft_ms"]
    rr["p99_excess_ms"] = rr["p99_ttft_ms"] - rr["median_ttft_ms"]
    return rr


def by_share(rr: pd.DataFrame) -> pd.DataFrame:
    """Median figures of the runs below 0.8%, between 0.8% and 1% and above 1%."""
    band = pd.cut(rr["first_share_pct"], [0, 0.8, 1.0, 100],
                  labels=["< 0.8%", "0.8-1%", "> 1%"])
    g = rr.groupby(band, observed=True)
    return pd.DataFrame({
        "runs": g.size(),
        "running_mean": g["num_running_mean"].median(),
        "median_ttft_ms": g["median_ttft_ms"].median(),
        "p99_ttft_ms": g["p99_ttft_ms"].median(),
        "p99_over_median": g["p99_over_median"].median(),
        "p99_excess_ms_min": g["p99_excess_ms"].min(),
        "mean_excess_ms": g["mean_excess_ms"].median()}).round(2)


def twin_by_share(profile: str, max_running: float) -> tuple[pd.DataFrame, dict]:
    """The same light runs simulated with ``profile``: per run the real and twin median,
    mean and p99 TTFT; and per band (below 0.8%, above 1%) the medians of the p99s and
    the mean-TTFT SMAPE median."""
    specs = light_specs(read_run_table(shared_data_dir().joinpath(*RUNS_CSV)), max_running)
    prof = load_profile(profile)
    rows = []
    for r in specs:
        s = simulate_run(r, prof, seed=0)
        m = r.metrics
        rows.append({"max_loras": r.config.max_loras, "served": r.n_adapters,
                     "first_share_pct": 100 * r.n_adapters / m["completed"],
                     **{f"{w}_{q}_ttft_ms": src[f"{q}_ttft_ms"] for w, src in
                        (("real", m), ("twin", s)) for q in ("median", "mean", "p99")}})
    df = pd.DataFrame(rows)
    out = {}
    for band, sel in (("below_0p8pct", df["first_share_pct"] < 0.8),
                      ("above_1pct", df["first_share_pct"] > 1.0)):
        d = df[sel]
        out[band] = {"runs": int(len(d)),
                     "real_p99_ttft_ms_median": round(float(d["real_p99_ttft_ms"].median()), 1),
                     "twin_p99_ttft_ms_median": round(float(d["twin_p99_ttft_ms"].median()), 1),
                     "mean_ttft_smape_median": round(float(np.median(smape(
                         d["twin_mean_ttft_ms"], d["real_mean_ttft_ms"], percent=True))), 2)}
    return df, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-running", type=float, default=6.0,
                    help="light load: mean running requests below this (default %(default)s)")
    ap.add_argument("--profile", action="append", default=[], metavar="PROFILE",
                    help="also simulate the runs with this profile (repeatable)")
    args = ap.parse_args(argv)
    rr = light_runs(args.max_running)
    table = by_share(rr)
    with pd.option_context("display.width", 200):
        print(table.to_string())
        cols = ["experiment_set", "max_loras", "max_cpu_loras", "completed_requests",
                "first_share_pct", "num_running_mean", "median_ttft_ms", "mean_ttft_ms",
                "p99_ttft_ms"]
        print()
        print(rr.sort_values("first_share_pct")[cols].round(3).to_string(index=False))
    above = rr[rr["first_share_pct"] > 1.0]
    # mean - median = share x cost + a load-dependent rest: the slope over the light runs
    x = rr["first_share_pct"].to_numpy() / 100
    slope, rest = np.polyfit(x, rr["mean_excess_ms"].to_numpy(), 1)
    out = {"runs": int(len(rr)), "runs_above_1pct": int(len(above)),
           "p99_ttft_ms_above_1pct_median": round(float(above["p99_ttft_ms"].median()), 1),
           "p99_ttft_ms_below_0p8pct_median": round(float(
               rr[rr["first_share_pct"] < 0.8]["p99_ttft_ms"].median()), 1),
           "first_use_cost_ms_from_p99": round(float(above["p99_excess_ms"].median()), 1),
           "first_use_cost_ms_from_mean_slope": round(float(slope), 1),
           "mean_excess_ms_intercept": round(float(rest), 2)}
    for profile in args.profile:
        df, out[f"twin:{profile}"] = twin_by_share(profile, args.max_running)
        print(f"\ntwin, {profile}:")
        print(df.sort_values("first_share_pct").round(2).to_string(index=False))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

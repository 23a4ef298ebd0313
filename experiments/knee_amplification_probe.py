"""How much does a step-cost error grow into a mean-ITL error in a run that keeps up?

A request lives ``output x ITL``, so a twin whose steps are priced high keeps more requests
running, with more distinct adapters per step, which prices each step higher again: the
mean ITL of a run settles at a fixed point that magnifies the step-cost error, most near the
knee (no queue, the batch nearly as large as the token budget allows). This probe replays
real H100 runs that keep up (no waiting queue to speak of) with the shipped profile's
step-time coefficients all scaled by one factor and prints the twin's ITL error and batch
against the real ones (README_validate, "what the fit weighs"):

    python experiments/knee_amplification_probe.py [--factors 1 0.95 0.9 0.85]

Deterministic (seed 0, 1200-s windows, the client's ceiling). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from twin.calibrate.run_weights import regime  # noqa: E402
from twin.calibrate.vllm import simulate_run  # noqa: E402
from twin.calibrate.vllm_runs import read_run_table  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402
from twin.costs.step_time import StepTimeModel  # noqa: E402
from twin.errors import TwinInputError  # noqa: E402
from twin.workload.public import shared_data_dir  # noqa: E402

#: (experiment set, max_loras, served adapters, running requests between): runs that keep
#: up at the knee (the first) and at many slots
CASES = (("digital_twin_modelling", 32, 32, 400, 500),
         ("digital_twin_modelling", 64, 128, 50, 70),
         ("digital_twin_modelling", 128, 128, 60, 70),
         ("ml_modelling_test", 64, 96, 150, 170))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.85])
    ap.add_argument("--profile", default="llama31-8b-h100-64gb")
    ap.add_argument("--window-s", type=float, default=1200.0)
    args = ap.parse_args(argv)
    try:
        table = shared_data_dir() / "vllm-h100" / "real_runs_llama31_8b.csv"
    except TwinInputError as exc:
        print(f"shared data not available: {exc}", file=sys.stderr)
        return 2
    runs = read_run_table(table)
    prof = load_profile(args.profile)
    cap = (prof.provenance.get("client") or {}).get("max_in_flight")
    rows = []
    for exp_set, slots, served, lo, hi in CASES:
        run = next(r for r in runs if r.extra.get("experiment_set") == exp_set
                   and r.config.max_loras == slots and r.n_adapters == served
                   and regime(r.metrics.get("num_waiting_mean", 1.0)) != "overloaded"
                   and lo < r.metrics["num_running_mean"] < hi)
        real_itl, real_running = run.metrics["mean_itl_ms"], run.metrics["num_running_mean"]
        row = {"run": run.key, "max_loras": slots, "served": served,
               "real_itl_ms": real_itl, "real_running": real_running}
        cells = []
        for f in args.factors:
            scaled = StepTimeModel(base={k: v * f for k, v in prof.step_time.base.items()})
            sim = simulate_run(run, dataclasses.replace(prof, step_time=scaled),
                               window_s=args.window_s, max_in_flight=cap)
            err = 100.0 * (sim["mean_itl_ms"] / real_itl - 1.0)
            row[f"x{f:g}"] = {"itl_err_pct": round(err, 1),
                              "running": round(sim["num_running_mean"], 1)}
            cells.append(f"x{f:g}: ITL {err:+.0f}%, {sim['num_running_mean']:.0f} running")
        rows.append(row)
        print(f"{slots} slots / {served} served ({exp_set}): real {real_running:.0f} running, "
              f"ITL {real_itl:.1f} ms | " + " | ".join(cells), flush=True)
    print(json.dumps({"factors": args.factors, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

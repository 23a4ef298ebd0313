"""What the first step after an idle wait costs, by what the engine did before the wait.

The calibration's after-idle cells serve 8 requests 0.1 s apart with 4-token answers: each
prompt meets an idle engine that ran a handful of steps before it waited. In served
light-load traffic an idle wait follows a busy stretch (answers of tens to hundreds of
tokens), and the validation priced those after-idle steps 13-17% short (README_prefix).
Here *arms* serve requests onto an idle engine and differ in one thing each: cells (8
requests 0.4 s apart) with 4- to 128-token answers, prompt lengths off the 16-token grid,
the light workload's 4 adapters over 4 slots, Poisson arrivals (``poisson``: the
calibration's served-like cell); and the light validation workload's first seconds itself
(``light``), with the cells' config (``light_cellcfg``), with every prompt 64 tokens, every
answer 4 tokens, or arrivals evenly spaced. Arms are interleaved round by round (the box's
drift spreads over all). Per arm, pooled over the after-idle steps (each run's first step
left out: a fresh engine): the step (median, ms, load time subtracted), by the executor's
phases, over the profile's price of it (``vs_profile``), the step after it, and over the
run's one-sequence decode steps at least 4 steps past a wait (``ratio``).

    flock /work/timing.lock .venv/bin/python experiments/after_idle_probe.py --rounds 5 \
        --arms light,poisson,o4_4a_ml4 --profile runs/vq/cpu-tiny.json

Ends with one JSON line: per arm those medians, the step count and the share of steps over
1.6x the warm decode step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twin.calibrate.executor_design import Cell  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CELLS = {   # name -> the cell served (requests spaced so each meets an idle engine)
    "o4_4a_ml4": Cell(8, 64, 4, 4, 4, 16, 256, 0.4),      # the light workload's slots
    "o48_4a_ml4": Cell(8, 64, 48, 4, 4, 16, 256, 0.4),
    "o128": Cell(8, 64, 128, 4, 4, 16, 256, 0.7),         # answers as long as the light's
    "poisson": Cell(16, 64, 96, 4, 4, 16, 256, 0.33, poisson=True),   # light-like arrivals
    "p57": Cell(8, 57, 4, 4, 4, 16, 256, 0.4),            # prompt lengths off the cells' grid
    "p72": Cell(8, 72, 4, 4, 4, 16, 256, 0.4),
    "p63": Cell(8, 63, 4, 4, 4, 16, 256, 0.4),
}
LIGHT_S = 5.0   # the first seconds of validate_executor.py's light workload, served as it is
PHASES = {"gap": "gap_s", "schedule": "schedule_s", "inputs": "inputs_s",
          "forward": "forward_s", "sample": "sample_s"}


def after_idle_rows(steps: pd.DataFrame, profile) -> pd.DataFrame:
    """The run's after-idle steps (but the first request's, which met a fresh engine):
    duration minus load and each phase (ms), the next step (a one-sequence decode) and
    ``ratio``: the step over the median of the run's one-decode steps at least 4 steps
    past an idle wait (warm)."""
    idle = steps["after_idle"].to_numpy(bool).copy()
    idle[:1] = False
    y = 1e3 * (steps["duration_s"] - steps["load_s"]).to_numpy(float)
    since = np.arange(len(steps)) - np.maximum.accumulate(np.where(
        steps["after_idle"].to_numpy(bool), np.arange(len(steps)), 0))
    warm = ((steps["prefill_tokens"].to_numpy() == 0) & (steps["decode_seqs"].to_numpy() == 1)
            & (since >= 4))
    ref = float(np.median(y[warm])) if warm.any() else float("nan")
    i = np.flatnonzero(idle)
    pred = np.array([1e3 * profile.step_time(tuple(f)) for f in steps["features"].iloc[i]])
    out = pd.DataFrame({"after_idle": y[i], "vs_profile": y[i] / pred,
                        "next": y[np.minimum(i + 1, len(y) - 1)],
                        "warm_decode": ref, "ratio": y[i] / ref})
    for name, col in PHASES.items():
        out[name] = 1e3 * steps[col].to_numpy(float)[i]
    return out


def arms(only=None) -> dict:
    """name -> (trace, config, KV blocks): the cells, and the light validation workload's
    first ``LIGHT_S`` seconds with its own config and KV capacity (``light``) and with the
    cells' (``light_cellcfg``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from validate_executor import workloads   # lazy: an experiment script, not a module

    out = {k: (c.trace(), c.config(1024), 256) for k, c in CELLS.items()
           if only is None or k in only}
    _, _, trace, cfg, _ = next(w for w in workloads() if w[0] == "light-uniform-4a-ml4")
    trace = trace[trace["arrival_s"] < LIGHT_S].reset_index(drop=True)
    names = sorted(trace["adapter"].dropna().unique())
    trace["adapter"] = trace["adapter"].map(dict(zip(names, (f"lora-{j:04d}" for j in range(4)))))
    out["light"] = (trace, cfg, 422)
    out["light_cellcfg"] = (trace, CELLS["o4_4a_ml4"].config(1024), 256)
    # the light workload with one of its traits made a cell's: every prompt 64 tokens,
    # every answer 4 tokens, arrivals 0.4 s apart
    out["light_p64"] = (trace.assign(prompt_tokens=64), cfg, 422)
    out["light_o4"] = (trace.assign(output_tokens=4), cfg, 422)
    out["light_spaced"] = (trace.assign(arrival_s=0.4 * np.arange(len(trace))), cfg, 422)
    return {k: v for k, v in out.items() if only is None or k in only}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds (every arm once each)")
    ap.add_argument("--arms", default="", help="comma-separated arms to serve (default: all)")
    ap.add_argument("--profile", default=str(ROOT / "twin/profiles/cpu-tiny.json"),
                    help="profile whose step time prices each after-idle step (``vs_profile``)")
    args = ap.parse_args(argv)

    import torch   # lazy: the executor needs torch

    from twin.executor.adapters import make_cached_adapters   # lazy: needs torch
    from twin.executor.engine import execute   # lazy: needs torch
    from twin.executor.model import LlamaModel   # lazy: needs torch
    from twin.executor.weights import resolve_model   # lazy: needs torch

    torch.set_num_threads(1)
    model = LlamaModel.from_pretrained(resolve_model("tiny"))
    cat = make_cached_adapters(resolve_model("tiny"), 4, ranks=(8,), prefix="after-idle-probe",
                               names=[f"lora-{j:04d}" for j in range(4)])
    served = arms(args.arms.split(",") if args.arms else None)
    profile = load_profile(args.profile)
    rows, t0 = [], time.perf_counter()
    rng = np.random.default_rng(0)
    for rnd in range(-1, args.rounds):   # round -1: warm-up, not kept
        for name in rng.permutation(list(served)):
            trace, cfg, nb = served[name]
            st = execute(trace, cfg, model, cat, num_gpu_blocks=nb).steps
            if rnd >= 0:
                rows.append(after_idle_rows(st, profile).assign(arm=name))
        print(f"round {rnd + 1}/{args.rounds} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    allr = pd.concat(rows, ignore_index=True)
    table = allr.groupby("arm").median()
    table["steps"] = allr.groupby("arm").size()
    table["share_over_1.6x"] = allr.assign(s=allr["ratio"] > 1.6).groupby("arm")["s"].mean()
    pd.set_option("display.width", 220)
    print("after-idle steps (but each run's first), pooled over rounds, medians, ms:")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    print(json.dumps({"rounds": args.rounds, "wall_s": round(time.perf_counter() - t0, 1),
                      "arms": {a: {c: round(float(v), 3) for c, v in r.items()}
                               for a, r in table.iterrows()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

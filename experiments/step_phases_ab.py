"""What a base-model decode step costs in a served trace vs in a calibration cell (issue 15).

The same 2-sequence base-model decode batch is served under *arms* that each change one
thing between a calibration cell and a served trace (the KV pool's size, the served
config's ``max_num_seqs`` / chunk budget / ``max_loras``, LoRA slots present but unused, a
waiting queue, arrivals landing between steps) and, last, a served trace itself (the first
seconds of ``base-heavy-azure-x0.3`` of ``validate_executor.py``). Arms are interleaved
round by round (every arm once, then again), so the box's drift spreads over all of them;
each arm is compared with the cell arm *of the same round* (median) and, since the box
flips between a fast and a slow state (the same step 1.3 or 2.2 ms), at the 10th percentile
of its steps (the fast state) with the cell's.

Per arm, over its 2-sequence base decode steps (no prefill, no load, not after idle): the
measured step time, the profile's prediction for the very batch (it accounts for the
attended context, which differs between arms), their ratio, and the step's phases from the
executor's step log: ``gap`` (previous step's end to this schedule: commit bookkeeping,
arrivals), ``schedule``, ``assemble`` (the batch's chunks and block tables), ``inputs``
(the batch's tensors), ``model`` (the forward pass) and ``sample``.

    flock /work/timing.lock .venv/bin/python experiments/step_phases_ab.py --rounds 15

Ends with one JSON line: per arm the median over rounds of (arm's measured / predicted)
over (cell's measured / predicted), and the phase medians in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from twin.config import ServingConfig  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from validate_executor import real_slice  # noqa: E402

PHASES = ("gap", "schedule", "assemble", "inputs", "model", "sample")


def burst(n_extra: int = 0, extra_over_s: float = 0.0, output: int = 64) -> pd.DataFrame:
    """Two base-model requests at t = 0 (prompt 128, ``output`` tokens), then ``n_extra``
    short ones (prompt 128, 8 tokens) at t = 0 or spread over ``extra_over_s`` seconds."""
    n = 2 + n_extra
    arr = np.r_[0.0, 0.0, np.linspace(0, extra_over_s, n_extra) if n_extra else []]
    return pd.DataFrame({"request_id": np.arange(n, dtype=np.int64), "arrival_s": arr,
                         "adapter": pd.array([None] * n, dtype="string"),
                         "prompt_tokens": np.full(n, 128, np.int32),
                         "output_tokens": np.r_[output, output, np.full(n_extra, 8)]
                         .astype(np.int32)})


def cell_config(**kw) -> ServingConfig:
    """A base-model calibration cell's config (``Cell.config``: 8 slots, rank 16)."""
    base = dict(enable_lora=True, max_loras=8, max_cpu_loras=8, max_lora_rank=16,
                max_num_seqs=256, max_num_batched_tokens=256)
    base.update(kw)
    return ServingConfig(**base)


SERVED_CFG = dict(max_loras=1, max_cpu_loras=1, max_num_seqs=128, max_num_batched_tokens=512)
SERVED_BLOCKS = 1689   # base-heavy-azure-x0.3's KV pool (27024 tokens) in validate_executor


def arms(adapters: Path, served_s: float) -> dict:
    """name -> (trace, config, catalog, num_gpu_blocks, only the first two requests)."""
    served = real_slice("azure_conv_1h.parquet", 40, 0.3, 256, 96)
    served = served[served["arrival_s"] < served_s].reset_index(drop=True)
    return {
        "cell": (burst(), cell_config(), None, 128, True),
        "pool": (burst(), cell_config(), None, SERVED_BLOCKS, True),
        "served_config": (burst(), cell_config(**SERVED_CFG), None, SERVED_BLOCKS, True),
        "lora_slots_unused": (burst(), cell_config(), adapters, 128, True),
        "waiting_queue": (burst(30), cell_config(max_num_seqs=2), None, 128, True),
        "arrivals_between_steps": (burst(30, 0.1), cell_config(max_num_seqs=2), None, 128,
                                   True),
        "served_trace": (served, cell_config(**SERVED_CFG), None, SERVED_BLOCKS, False),
    }


def decode_steps(steps: pd.DataFrame, profile, first_two: bool) -> pd.DataFrame:
    """The run's 2-sequence base decode steps: measured and predicted ms and phases."""
    d = steps[(steps["prefill_tokens"] == 0) & (steps["decode_seqs"] == 2)
              & (steps["loads"] == 0) & ~steps["after_idle"].astype(bool)
              & (steps["batch_adapters"] == 0)]
    if first_two:
        d = d[d["batch_request_ids"].map(lambda ids: sorted(ids) == [0, 1])]
    f = np.array(d["features"].tolist(), float).reshape(len(d), -1)
    pred = np.array([profile.step_time(tuple(r)) for r in f])
    ms = lambda c: 1e3 * d[c].to_numpy(float)   # noqa: E731
    model = ms("forward_s") - ms("inputs_s")
    meas = 1e3 * d["duration_s"].to_numpy(float)
    known = ms("gap_s") + ms("schedule_s") + ms("forward_s") + ms("sample_s")
    return pd.DataFrame({"measured": meas, "predicted": 1e3 * pred, "ctx": f[:, 3] / 2 if len(d) else [],
                         "gap": ms("gap_s"), "schedule": ms("schedule_s"),
                         "assemble": meas - known, "inputs": ms("inputs_s"), "model": model,
                         "sample": ms("sample_s")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="rounds (every arm once each)")
    ap.add_argument("--served-s", type=float, default=1.5,
                    help="seconds of the served trace per round (default 1.5)")
    ap.add_argument("--profile", default=str(ROOT / "twin/profiles/cpu-tiny.json"),
                    help="profile whose step time predicts each batch")
    ap.add_argument("--out", type=Path, help="write every matched step here (Parquet)")
    args = ap.parse_args(argv)

    import torch   # lazy: the executor needs torch

    from twin.executor.engine import execute
    from twin.executor.model import LlamaModel
    from twin.executor.adapters import make_cached_adapters
    from twin.executor.weights import resolve_model

    torch.set_num_threads(1)
    profile = load_profile(args.profile)
    model = LlamaModel.from_pretrained(resolve_model("tiny"))
    plan = arms(make_cached_adapters(resolve_model("tiny"), 4, prefix="validate-adapters"), args.served_s)
    rows, t0 = [], time.perf_counter()
    rng = np.random.default_rng(0)
    for rnd in range(-1, args.rounds):   # round -1: warm-up, not kept
        for name in rng.permutation(list(plan)):   # a fresh order each round: no arm
            trace, cfg, cat, nb, first_two = plan[name]   # always follows the same one
            st = execute(trace, cfg, model, cat, num_gpu_blocks=nb).steps
            if rnd >= 0:
                rows.append(decode_steps(st, profile, first_two).assign(arm=name, round=rnd))
        print(f"round {rnd + 1}/{args.rounds} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    allr = pd.concat(rows, ignore_index=True)
    allr["ratio"] = allr["measured"] / allr["predicted"]
    if args.out:
        allr.to_parquet(args.out, index=False)
    per_round = allr.groupby(["arm", "round"])["ratio"].median().unstack("arm")
    vs_cell = per_round.div(per_round["cell"], axis=0).median()
    table = allr.groupby("arm", sort=False).agg(
        steps=("measured", "size"), ctx=("ctx", "median"), measured_ms=("measured", "median"),
        predicted_ms=("predicted", "median"), **{p + "_ms": (p, "median") for p in PHASES})
    table["measured/predicted"] = allr.groupby("arm", sort=False)["ratio"].median()
    table["vs cell (paired)"] = vs_cell.reindex(table.index)
    # the machine's fast state: the 10th percentile of each arm's steps, against the cell's
    fast = allr.groupby("arm", sort=False)["ratio"].quantile(0.1)
    table["p10 vs cell"] = fast / fast["cell"]
    pd.set_option("display.width", 220)
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    print(json.dumps({"rounds": args.rounds, "wall_s": round(time.perf_counter() - t0, 1),
                      "arms": {a: {"vs_cell": round(float(r["vs cell (paired)"]), 3),
                                   "p10_vs_cell": round(float(r["p10 vs cell"]), 3),
                                   "measured_ms": round(float(r["measured_ms"]), 3),
                                   **{p + "_ms": round(float(r[p + "_ms"]), 3)
                                      for p in PHASES}}
                               for a, r in table.iterrows()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

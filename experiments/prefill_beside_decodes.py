"""What one short prefill chunk beside running decodes costs, phase by phase (issue 17).

With prefix caching on, a hit turns a long prompt into a short suffix, and in a served trace
that suffix arrives beside running decodes. The validation measured such steps ~1.5 ms over
decode-only steps where the profile priced ~0.6 ms. Here *arms* serve 8 requests 20 ms apart
(2 adapters, 48-token answers, so each new prompt meets 1-7 running decodes) that differ only
in the prompt: fresh prompts of 8 / 32 / 64 / 160 tokens, a 32-token suffix over 128 cached
tokens (prefix cache on), and the 32-token prompt on the base model (no LoRA). Arms are
interleaved round by round (the box's drift spreads over all). Per arm, over the steps with
one prefill chunk beside decodes (not after idle, no load) and, as the reference, the same
run's nearest decode-only steps with as many decodes: what the chunk adds, measured and
predicted (the latter at the box's speed, the neighbours' measured / predicted), and by the
executor's phase
(``gap``: previous step's end to this schedule, i.e. the arrivals released then; ``schedule``;
``assemble``: the batch's chunks and block tables, commit; ``inputs``: the batch's tensors;
``model``: the forward pass; ``sample``).

    flock /work/timing.lock .venv/bin/python experiments/prefill_beside_decodes.py --rounds 6

Ends with one JSON line: per arm the medians (ms) of what the chunk adds, measured,
predicted, by phase, and ``excess`` (measured - predicted x speed).
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

from twin.calibrate.executor_design import Cell  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402
from twin.costs.step_time import FEATURES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("gap", "schedule", "assemble", "inputs", "model", "sample")
GAP = 0.02

ARMS = {   # name -> the cell served (8 requests GAP s apart)
    "fresh8": Cell(8, 8, 48, 2, 8, 16, 256, GAP),
    "fresh32": Cell(8, 32, 48, 2, 8, 16, 256, GAP),
    "fresh64": Cell(8, 64, 48, 2, 8, 16, 256, GAP),
    "fresh160": Cell(8, 160, 48, 2, 8, 16, 256, GAP),
    "hit32over128": Cell(8, 160, 48, 2, 8, 16, 256, GAP, cached=128),
    "fresh32_base": Cell(8, 32, 48, 0, 8, 16, 256, GAP),
}


def phases(steps: pd.DataFrame, profile) -> pd.DataFrame:
    """Every step not after idle and without a load: kind (decode / prefill beside decodes
    / other), measured and predicted ms, phases (ms)."""
    s = steps[~steps["after_idle"].astype(bool) & (steps["loads"] == 0)]
    f = np.array(s["features"].tolist(), float).reshape(len(s), -1)
    pred = np.array([profile.step_time(tuple(r)) for r in f])
    ms = lambda c: 1e3 * s[c].to_numpy(float)   # noqa: E731
    meas = 1e3 * s["duration_s"].to_numpy(float)
    known = ms("gap_s") + ms("schedule_s") + ms("forward_s") + ms("sample_s")
    pre, dec = s["prefill_tokens"].to_numpy(), s["decode_seqs"].to_numpy()
    one = f[:, FEATURES.index("prefill_seqs")] == 1
    kind = np.where(pre == 0, "decode", np.where((dec > 0) & one, "prefill", "other"))
    return pd.DataFrame({"kind": kind, "start_s": s["start_s"].to_numpy(float),
                         "prefill_tokens": pre, "decodes": dec, "measured": meas, "predicted": 1e3 * pred,
                         "gap": ms("gap_s"), "schedule": ms("schedule_s"),
                         "assemble": meas - known, "inputs": ms("inputs_s"),
                         "model": ms("forward_s") - ms("inputs_s"), "sample": ms("sample_s")})


def paired(run: pd.DataFrame, near: int = 4) -> pd.DataFrame:
    """Each prefill step of a run minus the median of the ``near`` decode-only steps of the
    same run with as many decodes, nearest in time: what the prefill chunk adds (measured,
    predicted, by phase), the box's drift cancelled; ``speed``: those decode steps' measured
    over predicted time (how much slower the box runs than the profile says)."""
    cols = ["measured", "predicted", *PHASES]
    dec = run[run["kind"] == "decode"]
    rows = []
    for _, r in run[run["kind"] == "prefill"].iterrows():
        ref = dec[dec["decodes"] == r["decodes"]]
        if not len(ref):
            continue
        ref = ref.iloc[np.argsort(np.abs(ref["start_s"].to_numpy() - r["start_s"]))[:near]]
        d = {c: r[c] - ref[c].median() for c in cols}
        d["speed"] = float((ref["measured"] / ref["predicted"]).median())
        rows.append(d)
    return pd.DataFrame(rows, columns=[*cols, "speed"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds (every arm once each)")
    ap.add_argument("--profile", default=str(ROOT / "twin/profiles/cpu-tiny.json"),
                    help="profile whose step time predicts each batch")
    args = ap.parse_args(argv)

    import torch   # lazy: the executor needs torch

    from twin.executor.adapters import make_cached_adapters   # lazy: needs torch
    from twin.executor.engine import execute   # lazy: needs torch
    from twin.executor.model import LlamaModel   # lazy: needs torch
    from twin.executor.weights import resolve_model   # lazy: needs torch

    torch.set_num_threads(1)
    profile = load_profile(args.profile)
    model = LlamaModel.from_pretrained(resolve_model("tiny"))
    cat = make_cached_adapters(resolve_model("tiny"), 4, prefix="validate-adapters")
    rows, t0 = [], time.perf_counter()
    rng = np.random.default_rng(0)
    for rnd in range(-1, args.rounds):   # round -1: warm-up, not kept
        for name in rng.permutation(list(ARMS)):
            c = ARMS[name]
            st = execute(c.trace(), c.config(1024), model, cat if c.adapters else None,
                         num_gpu_blocks=256).steps
            if rnd >= 0:
                rows.append(paired(phases(st, profile)).assign(arm=name, round=rnd))
        print(f"round {rnd + 1}/{args.rounds} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    allr = pd.concat(rows, ignore_index=True)
    # what the chunk adds beyond the profile's price of it at the box's current speed
    allr["excess"] = allr["measured"] - allr["predicted"] * allr["speed"]
    table = allr.groupby("arm").median()
    table["steps"] = allr.groupby("arm").size()
    pd.set_option("display.width", 220)
    print("prefill step minus its neighbouring decode-only steps (same decodes), medians, ms:")
    print(table.drop(columns="round").to_string(float_format=lambda x: f"{x:.3f}"))
    print(json.dumps({"rounds": args.rounds, "wall_s": round(time.perf_counter() - t0, 1),
                      "arms": {a: {c: round(float(v), 3) for c, v in r.items() if c != "round"}
                               for a, r in table.iterrows()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a split step's time goes (issue 19, the TTFT gap): the executor's split mode on
the calibration design, probed (``execute_split(probe=True)``,
``twin.executor.split.probe``), with the GC heap frozen at start-up (the default, as vLLM
does) and without (as the split mode ran before).

Per run: mean TTFT and ITL, the steps over 50 ms, each process's generation-2 GC pauses,
CPU time and run-queue delay (time runnable but waiting for a core); per base call,
prefill and decode steps apart, where the round trip goes: the client's send, the
message's way to the base (``inbound``: pipe and the base's wake-up or its other work),
the base's queue, its compute (the GEMM and the copy into the client's buffer), its
answer, the answer's way back (``outbound``: pipe and the client's wake-up), the read;
and the shared-memory copies' per-row cost on the client's side (least squares).

Executor runs hold the shared timing lock (``/work/timing.lock``), all in one hold.

    .venv/bin/python experiments/split_step_profile.py [--workloads cal-1client,...]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from split_execution import WORKLOADS, setup, timing_lock
from twin.calibrate.split_design import CALIBRATION, CONFIG, workload

PHASES = ("send", "inbound", "queue", "compute", "answer", "outbound", "read")


def call_phases(probe: dict, steps: pd.DataFrame) -> pd.DataFrame:
    """Every base call of every client with its phases (s) and its step's kind."""
    base = probe["base"]["calls"]
    parts = []
    for c, cp in enumerate(probe["clients"]):
        calls = cp["calls"].copy()
        calls["client"] = c
        calls["step"] = np.cumsum(calls["kind"].to_numpy() == "embed") - 1
        own = steps[steps["client"] == c].reset_index(drop=True)
        calls["prefill"] = own["prefill_tokens"].to_numpy()[calls["step"]] > 0
        parts.append(calls)
    calls = pd.concat(parts, ignore_index=True)
    m = calls.merge(base, on=["client", "t_send"], how="left", validate="one_to_one")
    return m.assign(send=m.t_sent - m.t_send, inbound=m.t_arrived - m.t_sent,
                    queue=m.t_start - m.t_arrived, compute=m.t_computed - m.t_start,
                    answer=m.t_answered - m.t_computed, outbound=m.t_ready - m.t_answered,
                    read=m.t_recv - m.t_ready)


def per_row(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(fixed s, s per unit) of ``y ~ a + b x`` (least squares)."""
    b, a = np.polyfit(x.astype(float), y.astype(float), 1)
    return float(a), float(b)


def profile(ex) -> dict:
    """The figures of one probed run (see the module docstring)."""
    s, p = ex.steps, ex.extras["probe"]
    calls = call_phases(p, s)
    pre = s["prefill_tokens"] > 0
    procs = {"base": p["base"], **{f"client {c}": q for c, q in enumerate(p["clients"])}}
    out = {"ttft_ms": ex.summary["ttft_ms"]["mean"], "itl_ms": ex.summary["itl_ms"]["mean"],
           "steps_over_50ms": int((s["duration_s"] > 0.05).sum()),
           "step_ms": {"prefill": 1e3 * s.loc[pre, "duration_s"].mean(),
                       "decode": 1e3 * s.loc[~pre, "duration_s"].mean()}}
    for name, q in procs.items():
        g2 = q["gc"][q["gc"]["generation"] == 2]
        out[name] = {"wall_s": q["wall_s"], "cpu_s": q["cpu_s"], "run_delay_s": q["run_delay_s"],
                     "gc2_pauses": len(g2), "gc2_pause_ms_max": 1e3 * float(g2["pause_s"].max())
                     if len(g2) else 0.0, "gc_pause_s": float(q["gc"]["pause_s"].sum())}
    steps_probe = pd.concat([q["steps"].assign(client=c) for c, q in enumerate(p["clients"])],
                            ignore_index=True)
    for lab, m in (("prefill", pre.to_numpy()), ("decode", ~pre.to_numpy())):
        c = calls[calls["prefill"] == (lab == "prefill")]
        out[f"{lab}_call_us"] = {k: 1e6 * float(c[k].median()) for k in PHASES}
        out[f"{lab}_call_us"]["rows"] = float(c["rows"].mean())
        out[f"{lab}_step_cpu_ms"] = 1e3 * float(steps_probe.loc[m, "cpu_s"].mean())
        out[f"{lab}_step_run_delay_ms"] = 1e3 * float(steps_probe.loc[m, "run_delay_s"].mean())
    out["copy_in_us"] = dict(zip(("fixed", "per_kib"), (1e6 * v for v in per_row(
        calls["bytes_in"] / 1024, calls["copy_in_s"]))))
    out["copy_out_us"] = dict(zip(("fixed", "per_kib"), (1e6 * v for v in per_row(
        calls["bytes_out"] / 1024, calls["copy_out_s"]))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="cal-1client,cal-2clients",
                    help="comma-separated names from the calibration design and the "
                         "validation workloads of split_execution.py")
    ap.add_argument("--keep", type=Path, default=None,
                    help="also pickle each probed run's RunResult here (for a closer look)")
    ap.add_argument("--freeze", default="false,true",
                    help="gc_freeze settings to run each workload with (comma-separated)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent
                    / "split_step_profile.json")
    args = ap.parse_args(argv)
    from twin.executor.split import execute_split  # lazy: torch

    known = {w[0]: w for w in CALIBRATION + WORKLOADS}
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        ap.error(f"unknown workload {bad[0]!r}; known: {', '.join(known)}")
    t0 = time.time()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="split-profile-") as tmp:
        model, cat = setup(Path(tmp))
        with timing_lock():
            for n in names:
                w = known[n]
                for freeze in [f.strip() == "true" for f in args.freeze.split(",")]:
                    ex = execute_split(workload(cat, *w), CONFIG, model, cat, clients=w[1],
                                       timeout_s=600, probe=True, gc_freeze=freeze)
                    key = f"{n} gc_freeze={freeze}"
                    if args.keep is not None:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        (args.keep / f"{n}-freeze{int(freeze)}.pkl").write_bytes(
                            pickle.dumps(ex))
                    runs[key] = profile(ex)
                    print(key, json.dumps(runs[key], default=float), flush=True)
    args.out.write_text(json.dumps(runs, indent=2, default=float) + "\n")
    head = {k: {"ttft_ms": v["ttft_ms"], "itl_ms": v["itl_ms"],
                "steps_over_50ms": v["steps_over_50ms"],
                "gc2_pauses": sum(x["gc2_pauses"] for n, x in v.items()
                                  if isinstance(x, dict) and "gc2_pauses" in x)}
            for k, v in runs.items()}
    print(json.dumps({"runs": head, "wall_s": round(time.time() - t0, 1)}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the step-time model misses, from the executor's own step logs (issue 15).

Each executor step logs the twin's features of its batch (``features``, the policy's
featurizer: see ``STEP_COLUMNS`` in ``twin/executor/engine.py``) and its measured duration;
the profile's step time on those features is the twin's prediction for that very batch.
Beside each group's residual: its residual against the neighbouring steps of the same run
(within ``LOCAL_S`` seconds: the machine's drift cancels) and, where the log has them, the
step's phases (gap since the previous step, schedule, input tensors, forward, sample).
The residual of a step is measured (duration minus adapter-load time, which the twin
prices separately) minus predicted. Steps are grouped by batch composition — the groups
issue 15 names, and plain decode / prefill steps as the reference — and each group's
median residual (ms and % of predicted) and count are printed. A group whose median sits
well away from the reference groups' is a feature the model lacks; a group inside the
spread of the others is not evidence for one.

    # the step logs of a validate_executor.py run (each workload's first executor run)
    .venv/bin/python experiments/step_residuals.py runs/validate_executor
    # or any `twin validate --out DIR` directories, with another profile
    .venv/bin/python experiments/step_residuals.py DIR1 DIR2 --profile twin/profiles/cpu-tiny.json

The profile defaults to the one each validation recorded (``validation.json``). Ends with
one JSON line: per group the median residual (ms, %) and the count of steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from twin.costs.profile import load_profile
from twin.costs.step_time import FEATURES

ROOT = Path(__file__).resolve().parents[1]
LONG_DECODE = 128   # mean attended context per decode sequence that counts as "long"
FEW_TOKENS = 2      # tokens per distinct adapter that count as "few"
MANY_ADAPTERS = 4   # distinct adapters that count as "many"
LONG_CONTEXT = 64  # earlier tokens a prefill token attends on average that count as "over context"
LOCAL_S = 0.5       # half-width (s) of the window of neighbouring steps a step is set against
# the executor's step phases (ms), where the log has them (``gap_s`` / ``inputs_s``: issue 15)
PHASES = {"gap": "gap_s", "schedule": "schedule_s", "inputs": "inputs_s",
          "forward": "forward_s", "sample": "sample_s"}

# (group, description): a step may sit in several groups
GROUPS = (
    ("decode only, base", "reference: decode steps without adapters"),
    ("decode only, adapters", "reference: decode steps, every row with an adapter"),
    ("prefill only", "reference: prefill chunks, no decode rows"),
    ("mixed base + adapter rows", "the batch has rows with and without an adapter"),
    ("adapter load in step", "the step loaded an adapter (load time subtracted)"),
    ("first step after a load", "the step right after one that loaded an adapter"),
    ("many adapters, few tokens each",
     f">= {MANY_ADAPTERS} distinct adapters, <= {FEW_TOKENS} tokens per adapter"),
    ("prefill beside long decodes",
     f"prefill chunk(s) with decode rows attending >= {LONG_DECODE} tokens on average"),
    ("after idle", "the first step after the engine waited for an arrival"),
    ("prefill over context, no decodes",
     f"prefill chunk(s) attending >= {LONG_CONTEXT} earlier tokens on average (a prefix-cache "
     "hit or an earlier chunk), no decode rows"),
    ("prefill over context beside decodes", "the same beside decode rows, not after idle"),
)


def with_derived(f: pd.DataFrame, loads) -> pd.DataFrame:
    """``f`` with every feature of ``FEATURES`` it lacks: a log or a measurement file
    written before a feature existed. ``after_load`` (a step that loads an adapter and is
    not after idle) follows from the step's load count; any other missing one is 0."""
    f = f.copy()
    for k in FEATURES:
        if k not in f:
            f[k] = (((np.asarray(loads) > 0) & (f["after_idle"].to_numpy() == 0)).astype(float)
                    if k == "after_load" else 0.0)
    return f


def logged_features(steps: pd.DataFrame) -> pd.DataFrame:
    """The step log's features as named columns (``FEATURES``; missing ones derived)."""
    arr = np.array(steps["features"].tolist(), float)
    return with_derived(pd.DataFrame(arr, columns=list(FEATURES[:arr.shape[1]])),
                        steps["loads"].to_numpy())[list(FEATURES)]


def refit(profile, measurements: Path):
    """``profile`` with its step-time model refitted on the calibration ``measurements``
    (``PROFILE.measurements.parquet``) with the current ``FEATURES``, deriving those the
    file predates: what a recalibration would fit, without measuring again."""
    import dataclasses

    from twin.calibrate.executor_fit import fit_measurements
    from twin.costs.step_time import StepTimeModel

    df = pd.read_parquet(measurements)
    steps = with_derived(df[df["kind"] == "step"], df.loc[df["kind"] == "step", "loads"])
    fit = fit_measurements(steps, df[df["kind"] == "load"], profile.model)
    return dataclasses.replace(profile, step_time=StepTimeModel(base=fit.coef)), fit


def step_table(steps: pd.DataFrame, requests: pd.DataFrame, profile) -> pd.DataFrame:
    """Per step: its features, measured and predicted seconds, the residual and its group
    flags. ``requests`` maps request ids to adapters (the run's ``requests`` table)."""
    f = logged_features(steps)
    st = profile.step_time
    pred = np.array([st(row) for row in f.itertuples(index=False)])
    meas = steps["duration_s"].to_numpy(float) - steps["load_s"].to_numpy(float)
    has_adapter = dict(zip(requests["request_id"].to_numpy(),
                           requests["adapter"].notna().to_numpy()))
    rows = [[has_adapter.get(int(r), False) for r in ids] for ids in steps["batch_request_ids"]]
    n_lora = np.array([sum(r) for r in rows])
    n_base = np.array([len(r) - sum(r) for r in rows])
    loads = steps["loads"].to_numpy() > 0
    after_load = np.r_[False, loads[:-1]]
    tokens = steps["num_tokens"].to_numpy(float)
    ad = f["adapters"].to_numpy()
    dec, pre = f["decode_tokens"].to_numpy(), f["prefill_tokens"].to_numpy()
    ctx_per = np.divide(f["decode_context"].to_numpy(), dec, out=np.zeros(len(f)),
                        where=dec > 0)
    # earlier tokens per prefill token: prefill_context = sum k (start + k) over chunks
    # (chunks of one token count as decodes here)
    sq = (np.array([sum(k * k for k in toks if k > 1) for toks in steps["batch_tokens"]], float)
          if "batch_tokens" in steps else pre ** 2)   # older logs: one chunk assumed
    earlier = np.divide(f["prefill_context"].to_numpy() - sq, pre, out=np.zeros(len(f)),
                        where=pre > 0)
    idle = f["after_idle"].to_numpy() > 0
    out = f.assign(measured_s=meas, predicted_s=pred, residual_s=meas - pred,
                   base_rows=n_base, lora_rows=n_lora,
                   local_ratio=local_ratio(steps, meas, pred))
    for name, col in PHASES.items():
        if col in steps:
            out[name + "_ms"] = 1e3 * steps[col].to_numpy(float)
    flags = {
        "decode only, base": (pre == 0) & (dec > 0) & (n_lora == 0),
        "decode only, adapters": (pre == 0) & (dec > 0) & (n_base == 0),
        "prefill only": (pre > 0) & (dec == 0),
        "mixed base + adapter rows": (n_base > 0) & (n_lora > 0),
        "adapter load in step": loads,
        "first step after a load": after_load & ~loads,
        "many adapters, few tokens each": (ad >= MANY_ADAPTERS)
        & (tokens <= FEW_TOKENS * np.maximum(ad, 1)),
        "prefill beside long decodes": (pre > 0) & (dec > 0) & (ctx_per >= LONG_DECODE),
        "after idle": idle,
        "prefill over context, no decodes": (pre > 0) & (dec == 0) & (earlier >= LONG_CONTEXT),
        "prefill over context beside decodes": (pre > 0) & (dec > 0) & ~idle
        & (earlier >= LONG_CONTEXT),
    }
    for g, mask in flags.items():
        out[g] = mask
    return out


def local_ratio(steps: pd.DataFrame, meas: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per step: its measured / predicted over the median of that ratio among the run's
    steps within ``LOCAL_S`` seconds of it (NaN without ``start_s``). The machine's speed
    drifts over seconds (on the 2-core box the same batch took 1.3 ms or 2.2 ms minutes
    apart); against its neighbours a step's batch composition shows without that drift —
    though a composition that fills whole windows (a base-only workload) is normalised
    away with it."""
    if "start_s" not in steps or not len(steps):
        return np.full(len(steps), np.nan)
    t = steps["start_s"].to_numpy(float)
    ratio = meas / np.where(pred > 0, pred, np.nan)
    lo = np.searchsorted(t, t - LOCAL_S)
    hi = np.searchsorted(t, t + LOCAL_S, side="right")
    return np.array([ratio[i] / np.nanmedian(ratio[a:b]) for i, (a, b)
                     in enumerate(zip(lo, hi))])


def group_residuals(table: pd.DataFrame) -> pd.DataFrame:
    """Per group: count, median residual (ms), median residual / predicted (%), the
    median residual against neighbouring steps (%, :func:`local_ratio`) and the median
    measured step time and phases (ms)."""
    rows = []
    phases = [c for c in table if c.endswith("_ms")]
    for g, _ in GROUPS:
        d = table[table[g]]
        rel = d["residual_s"] / d["predicted_s"].where(d["predicted_s"] > 0)
        med = (lambda x: float(x.median()) if len(d) else float("nan"))   # noqa: E731
        rows.append({"group": g, "steps": len(d),
                     "median_residual_ms": 1e3 * med(d["residual_s"]),
                     "median_residual_pct": 100 * med(rel),
                     "local_residual_pct": 100 * (med(d["local_ratio"]) - 1),
                     "median_measured_ms": 1e3 * med(d["measured_s"]),
                     **{c: med(d[c]) for c in phases}})
    return pd.DataFrame(rows)


def run_dirs(paths: list[Path]) -> list[Path]:
    """Validation directories (with ``executor/steps.parquet``) under the given paths."""
    out = []
    for p in paths:
        if (p / "executor" / "steps.parquet").is_file():
            out.append(p)
        else:
            out += sorted(q.parent.parent for q in p.glob("*/executor/steps.parquet"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path,
                    help="validation directories (twin validate --out), or their parent")
    ap.add_argument("--profile", help="profile to predict with (default: each validation's)")
    ap.add_argument("--refit", action="store_true",
                    help="refit each profile on its calibration measurements "
                         "(PROFILE.measurements.parquet) with the current FEATURES first")
    args = ap.parse_args(argv)
    tables, refits = [], {}
    for d in run_dirs(args.dirs):
        meta = json.loads((d / "validation.json").read_text())
        path = args.profile or meta["profile"]
        prof = load_profile(path)
        if args.refit:
            if path not in refits:
                refits[path] = refit(prof, Path(str(path) + ".measurements.parquet"))
                fit = refits[path][1]
                print(f"refitted {path}: {json.dumps({k: v for k, v in fit.coef.items() if v})}"
                      f"; |rel. error| median {fit.residuals['rel_abs_median']:.3f}")
            prof = refits[path][0]
        steps = pd.read_parquet(d / "executor" / "steps.parquet")
        req = pd.read_parquet(d / "executor" / "requests.parquet")
        t = step_table(steps, req, prof).assign(workload=d.name)
        tables.append(t)
        g = group_residuals(t).set_index("group")
        print(f"{d.name}: {len(t)} steps, median residual "
              f"{1e3 * t['residual_s'].median():+.3f} ms "
              f"({100 * (t['residual_s'] / t['predicted_s']).median():+.1f}%)")
    if not tables:
        print("no executor step logs (executor/steps.parquet) under the given paths",
              file=sys.stderr)
        return 2
    allt = pd.concat(tables, ignore_index=True)
    g = group_residuals(allt)
    pd.set_option("display.width", 200)
    print(f"\nall {len(allt)} steps of {len(tables)} runs; residual = measured - predicted")
    print(g.to_string(index=False, float_format=lambda x: f"{x:+.3f}"))
    print(json.dumps({r.group: {"median_residual_ms": round(r.median_residual_ms, 4),
                                "median_residual_pct": round(r.median_residual_pct, 2),
                                "local_residual_pct": round(r.local_residual_pct, 2),
                                "steps": int(r.steps)} for r in g.itertuples()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Why the twin misses the executor's p99 ITL and p99 TTFT (issue 15), from a finished
``validate_executor.py`` run: no executor run again.

Per vLLM-layout workload, p99 ITL (ms) five ways, each a step apart:

- ``exec``: the executor's, median over its runs (what the validation compares);
- ``exec_log``: recomputed from the first run's step log with the histogram both sides use
  (``ITLHistogram``: every step's duration, weighted by its decode rows) — equal to that
  run's recorded p99 when the two sides compute the metric alike (candidate c);
- ``priced``: the same steps of the executor's schedule, each priced by the run's profile
  (load time as measured) — what is left of the gap to ``exec_log`` is the steps' spread
  around their prices (candidate a), the rest is the schedule or the pricing of step kinds
  (candidate b: compare with ``twin``);
- ``twin``: the twin's own (its schedule, its prices), as the run printed it (without the
  spread in runs made before it; with it since, when the run's calibration stored one);
- ``twin_disp``: the twin with the profile's step-time dispersion (``twin.costs.dispersion``,
  refitted from the run's calibration measurements as a calibration now stores it).

Beside them the spread itself: quantiles of measured / predicted over the served decode
steps (first run) against the calibration's dispersion. For p99 TTFT: per workload the three
slowest requests of the first run, the longest step inside each one's TTFT (an executor stall
shows as one step of 100+ ms) and the twin's TTFT of the same requests; and p99 TTFT of the
twin without and with the spread (each TTFT mixed with the dispersion shrunk to the steps it
spans by the calibration's step-to-step correlation, ``twin.results.spread``).

    .venv/bin/python experiments/p99_sources.py /work/runs/q/val

Ends with one JSON line: per workload the five p99 ITLs, and the medians of their SMAPEs
against ``exec``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from twin.costs.profile import load_profile  # noqa: E402
from twin.results import smape  # noqa: E402
from twin.results.itl_histogram import ITLHistogram  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resimulate_validation as rv  # noqa: E402
import validate_executor as ve  # noqa: E402
from step_residuals import step_table  # noqa: E402

QS = (0.5, 0.9, 0.99, 0.999)


def p99_ms(durations, rows, dispersion=None) -> float:
    """p99 of ``durations`` weighted by ``rows`` (decode rows per step), read as the
    validation reads it (``ITLHistogram``), optionally mixed with ``dispersion``."""
    h = ITLHistogram()
    for d, n in zip(durations, rows):
        if n > 0:
            h.add(float(d), float(n))
    return 1e3 * h.percentile(99, dispersion)


def itl_row(wdir: Path, v: dict, profile, disp_profile, twin_disp: dict) -> dict:
    """The five p99 ITLs of one workload and the served steps' ratio quantiles
    (``twin_disp``: the twin's summary with ``disp_profile``)."""
    steps = pd.read_parquet(wdir / "executor" / "steps.parquet")
    req = pd.read_parquet(wdir / "executor" / "requests.parquet")
    first = json.loads((wdir / "executor" / "summary.json").read_text())["summary"]
    table = pd.DataFrame(v["table"]).set_index("key")
    t = step_table(steps, req, profile)
    rows = steps["decode_seqs"].to_numpy()
    dec = rows > 0
    ratio = (t["measured_s"] / t["predicted_s"]).to_numpy()[dec]
    out = {"exec": float(table.loc["itl_p99", "executor"]),
           "exec_first": float(first["itl_ms"]["p99"]),
           "exec_log": p99_ms(steps["duration_s"], rows),
           "priced": p99_ms(t["predicted_s"] + steps["load_s"], rows),
           "priced_disp": p99_ms(t["predicted_s"] + steps["load_s"], rows,
                                 disp_profile.step_time.dispersion),
           "twin": float(table.loc["itl_p99", "twin"]),
           "twin_disp": float(twin_disp["itl_ms"]["p99"])}
    out.update({f"served_q{q}": float(np.quantile(ratio / ratio.mean(), q)) for q in QS})
    # the executor's tail: its steps at or above its own p99, by decode rows — how many of
    # those rows sit in steps slower than 1.5x their price (spread), in steps with a prefill
    # chunk, with an adapter load, after idle (step kinds)
    tail = dec & (steps["duration_s"].to_numpy() >= out["exec_log"] / 1e3)
    w = rows * tail
    r_all = (t["measured_s"] / t["predicted_s"]).to_numpy()
    for key, mask in (("tail_slow", r_all > 1.5), ("tail_prefill", t["prefill_tokens"] > 0),
                      ("tail_load", steps["loads"] > 0), ("tail_idle", t["after_idle"] > 0)):
        out[key] = 100 * float((w * np.asarray(mask)).sum() / max(w.sum(), 1))
    return out


def ttft_row(wdir: Path, v: dict) -> dict:
    """p99 TTFT of the executor (median run) and the twin, and the first run's three
    slowest requests: their TTFT, the longest step inside it, the twin's TTFT of them."""
    er = pd.read_parquet(wdir / "executor" / "requests.parquet")
    tr = pd.read_parquet(wdir / "twin" / "requests.parquet").set_index("request_id")
    st = pd.read_parquet(wdir / "executor" / "steps.parquet")
    table = pd.DataFrame(v["table"]).set_index("key")
    e = (er["first_token_s"] - er["arrival_s"]).to_numpy()
    s0 = st["start_s"].to_numpy()
    s1 = s0 + st["duration_s"].to_numpy()
    top = np.argsort(-np.nan_to_num(e, nan=-1.0))[:3]
    longest = []
    for i in top:
        inside = (s1 > er["arrival_s"].iloc[i]) & (s0 < er["first_token_s"].iloc[i])
        longest.append(round(1e3 * float(st["duration_s"].to_numpy()[inside].max()), 1)
                       if inside.any() else float("nan"))
    twin_same = (tr["first_token_s"] - tr["arrival_s"]).reindex(er["request_id"].iloc[top])
    return {"ttft_exec": float(table.loc["ttft_p99", "executor"]),
            "ttft_twin": float(table.loc["ttft_p99", "twin"]),
            "ttft_spread": 100 * v.get("executor_spread", {}).get("ttft_p99", np.nan),
            "slowest_ms": [round(1e3 * float(e[i]), 1) for i in top],
            "longest_step_ms": longest,
            "twin_same_ms": [round(1e3 * float(x), 1) for x in twin_same]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a validate_executor.py --out folder")
    args = ap.parse_args(argv)
    rows, cal = [], {}
    for name, model, trace, config, _ in ve.workloads():
        wdir = args.run / name
        if config.policy != "vllm" or not (wdir / "validation.json").is_file():
            continue
        v = json.loads((wdir / "validation.json").read_text())
        ppath = args.run / f"cpu-{model}.json"
        if model not in cal:   # the run's profile, and refitted with its dispersion
            cal[model] = (load_profile(str(ppath)), rv.refit(ppath, "predicted", True)[0])
        prof, disp = cal[model]
        summary = rv.twin_summary(v, name, trace, disp, model)
        rows.append({"workload": name, **itl_row(wdir, v, prof, disp, summary),
                     **ttft_row(wdir, v), "ttft_disp": float(summary["ttft_ms"]["p99"])})
    d = pd.DataFrame(rows)
    for c in ("exec_log", "priced", "priced_disp", "twin", "twin_disp"):
        d[f"e_{c}"] = 100 * smape(d["exec"], d[c])
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 40)
    fmt = lambda x: f"{x:.2f}"   # noqa: E731
    print("p99 ITL (ms): executor (median run, first run, first run's step log), its "
          "schedule priced (without / with the dispersion), the twin (without / with)")
    print(d[["workload", "exec", "exec_first", "exec_log", "priced", "priced_disp", "twin",
             "twin_disp"]].to_string(index=False, float_format=fmt))
    print("\nSMAPE (%) against the executor's median run")
    print(d[["workload"] + [c for c in d if c.startswith("e_")]].to_string(
        index=False, float_format=lambda x: f"{x:.1f}"))
    print("\nmeasured / predicted (mean 1) over the served decode steps, first run, vs the "
          "calibration's dispersion")
    print(d[["workload"] + [f"served_q{q}" for q in QS]].to_string(index=False,
                                                                     float_format=fmt))
    print("\nthe executor's p99 tail (steps at or above its p99, % of their decode rows): "
          "slower than 1.5x their price; with a prefill chunk; an adapter load; after idle")
    print(d[["workload", "tail_slow", "tail_prefill", "tail_load", "tail_idle"]].to_string(
        index=False, float_format=lambda x: f"{x:.0f}"))
    for model, (_, disp) in cal.items():
        x = np.asarray(disp.step_time.dispersion)
        print(f"  calibration cpu-{model}: "
              + ", ".join(f"q{q} {np.quantile(x, q):.2f}" for q in QS))
    print("\np99 TTFT (ms): executor median run, twin; the first run's 3 slowest requests, "
          "the longest step inside each one's TTFT, the twin's TTFT of them")
    print(d[["workload", "ttft_exec", "ttft_twin", "ttft_spread", "slowest_ms",
             "longest_step_ms", "twin_same_ms"]].to_string(index=False, float_format=fmt))
    for c in ("ttft_twin", "ttft_disp"):
        d[f"t_{c}"] = 100 * smape(d["ttft_exec"], d[c])
    for model, (_, disp) in cal.items():
        rho = disp.step_time.autocorrelation
        print(f"  calibration cpu-{model}: step-to-step correlation of log(measured / "
              f"predicted) at lag 1 / 2 / 5 / 10: {rho[0]:.2f} / {rho[1]:.2f} / {rho[4]:.2f} / "
              f"{rho[9]:.2f}")
    print("\np99 TTFT (ms, SMAPE %): the twin without and with the spread (each TTFT mixed "
          "with the dispersion shrunk to the steps it spans, twin.results.spread)")
    print(d[["workload", "ttft_exec", "ttft_twin", "ttft_disp", "t_ttft_twin",
             "t_ttft_disp"]].to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    med = {c[2:]: round(float(d[c].median()), 2) for c in d if c.startswith("e_")}
    tmed = {c[2:]: round(float(d[c].median()), 2) for c in d if c.startswith("t_")}
    print(json.dumps({"itl_p99_smape_median": med, "ttft_p99_smape_median": tmed,
                      "workloads": len(d),
                      "per_workload": {r["workload"]: {k: round(r[k], 3) for k in (
                          "exec", "exec_log", "priced", "priced_disp", "twin", "twin_disp")}
                          for r in rows}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

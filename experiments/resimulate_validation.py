"""The twin side of a finished ``validate_executor.py`` run again, with another fit of the
same calibration measurements, without serving anything again (issue 15).

A validation run keeps, per workload, the executor's median figures (``validation.json``)
and the calibration's measurements (``PROFILE.measurements.parquet``). This refits the
profile on those measurements (``--weights``: how the step-time fit weighs each step, see
``twin.calibrate.executor_fit.fit_nnls``), simulates the twin on every workload with it
(same trace, config and KV capacity as the run), and prints the SMAPE of throughput, mean
and p99 TTFT and ITL against the executor's median run, per workload and as the
experiment's headline figures. A change to the fit is then judged on the executor runs it
must match, with the executor's noise held fixed.

    .venv/bin/python experiments/resimulate_validation.py runs/validate_executor_tq
    .venv/bin/python experiments/resimulate_validation.py runs/validate_executor_tq --weights observed

``--dispersion off on`` sets the twin's ITL percentiles from its prices alone beside those
mixed with the calibration's step-time spread (``twin.costs.dispersion``; the default, what a
calibration now stores; ``off`` reproduces runs made before it).

Ends with one JSON line: the headline figures for each ``--weights`` (and ``--dispersion``,
when several) given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from twin.calibrate.executor_fit import fit_measurements  # noqa: E402
from twin.config import ServingConfig  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402
from twin.costs.step_time import StepTimeModel  # noqa: E402
from twin.policies import simulate_policy  # noqa: E402
from twin.sim.replay import exact_kv_memory  # noqa: E402
from twin.validate.compare import compare  # noqa: E402
from twin.validate.run import _catalogs  # noqa: E402  (the validation's adapters and ranks)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import validate_executor as ve  # noqa: E402

KEYS = {"throughput": "thru", "ttft_mean": "TTFT", "itl_mean": "ITL", "ttft_p99": "TTFT99",
        "itl_p99": "ITL99"}


def refit(profile_path: Path, weights: str, dispersion: bool = True):
    """The run's profile refitted on its own calibration measurements with ``weights``;
    ``dispersion``: with the step-time spread and its step-to-step correlation a calibration
    now stores (the twin's ITL and TTFT percentiles read from its prices mixed with them;
    ``twin.costs.dispersion``)."""
    prof = load_profile(str(profile_path))
    df = pd.read_parquet(str(profile_path) + ".measurements.parquet")
    fit = fit_measurements(df[df["kind"] == "step"], df[df["kind"] == "load"], prof.model,
                           weights=weights)
    st = fit.step_time_model() if dispersion else StepTimeModel(base=fit.coef)
    return dataclasses.replace(prof, step_time=st), fit


def workload_row(run: Path, name: str, trace, profile, model: str = "tiny") -> dict | None:
    """SMAPE (%) of the twin with ``profile`` against the run's executor median."""
    vj = run / name / "validation.json"
    if not vj.is_file():
        return None
    v = json.loads(vj.read_text())
    twin = twin_summary(v, name, trace, profile, model)
    mine = compare(twin, twin).set_index("key")["twin"]
    ex = pd.DataFrame(v["table"]).set_index("key")["executor"]
    spread = v.get("executor_spread", {})
    row = {"workload": name, "overloaded": name in ve.OVERLOADED}
    for key, short in KEYS.items():
        a, b = float(ex[key]), float(mine[key])
        row[short] = 100 * 2 * abs(a - b) / (abs(a) + abs(b)) if a or b else 0.0
        row[short + "_sign"] = float(np.sign(b - a))
        row[short + "_spread"] = 100 * spread.get(key, np.nan)
    return row


def twin_summary(v: dict, name: str, trace, profile, model: str = "tiny") -> dict:
    """The twin's summary of workload ``name`` with ``profile``, on the run's config, KV
    capacity and adapters (``v``: its ``validation.json``)."""
    return twin_run(v, name, trace, profile, model).summary


def twin_run(v: dict, name: str, trace, profile, model: str = "tiny", **options):
    """The twin's run (``RunResult``) behind :func:`twin_summary`; ``options``: passed to
    ``simulate_policy`` (e.g. ``record_steps=True``)."""
    config = ServingConfig.from_dict(v["config"])
    ranks = ve.WORKLOAD_RANKS.get(name, ve.ADAPTER_RANKS[config.policy])
    from twin.executor.weights import resolve_model   # lazy: needs torch

    _, catalog = _catalogs(trace, config, None, resolve_model(model), adapter_ranks=ranks,
                           seed=0)
    nb = int(v["num_gpu_blocks"])
    tprof = dataclasses.replace(profile, memory=exact_kv_memory(
        nb, config.block_size, config.gpu_memory_utilization,
        kv_bytes_per_token=profile.memory.kv_bytes_per_token))
    return simulate_policy(trace, config, tprof, catalog, trace_source=name, **options)


def figures(d: pd.DataFrame) -> dict:
    out = {"throughput_smape_median": round(float(d["thru"].median()), 2),
           "throughput_smape_max": round(float(d["thru"].max()), 2),
           "ttft_smape_median": round(float(d["TTFT"].median()), 2),
           "itl_smape_median": round(float(d["ITL"].median()), 2),
           "twin_faster_itl": int((d["ITL_sign"] < 0).sum()), "workloads": len(d)}
    out.update(ve.fidelity_figures(d))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a validate_executor.py --out folder")
    ap.add_argument("--dispersion", nargs="+", default=["on"], choices=["on", "off"],
                    help="the twin's ITL percentiles with the fitted step-time spread (on: "
                         "what a calibration now stores) or from its prices alone (off: "
                         "reproduces runs made before it); several: each")
    ap.add_argument("--profile", default="cpu-tiny.json",
                    help="the run's profile file, relative to the run (default cpu-tiny.json)")
    ap.add_argument("--models", default="tiny",
                    help="comma-separated models whose vLLM-layout workloads to re-price "
                         "(tiny, smollm2: the run's cpu-smollm2.json); default tiny")
    ap.add_argument("--weights", nargs="+", default=["observed", "predicted"],
                    choices=["observed", "predicted"],
                    help="step-time fit weightings to compare (default both)")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    wl = [(n, m, t) for n, m, t, c, _ in ve.workloads() if m in models and c.policy == "vllm"]
    result = {}
    for w, disp in ((w, d) for w in args.weights for d in args.dispersion):
        key = w if len(args.dispersion) == 1 else f"{w}, dispersion {disp}"
        profs = {m: refit(args.run / (args.profile if m == "tiny" else f"cpu-{m}.json"), w,
                          disp == "on") for m in models}
        prof, fit = profs.get("tiny", next(iter(profs.values())))
        rows = [r for n, m, t in wl
                if (r := workload_row(args.run, n, t, profs[m][0], m)) is not None]
        d = pd.DataFrame(rows)
        print(f"\n--weights {w} --dispersion {disp}: fit sum error {100 * fit.residuals['sum_error']:+.1f}%, "
              f"mean relative error {100 * fit.residuals['rel_mean']:+.1f}%")
        print(d[["workload", *KEYS.values(), "ITL_sign"]].to_string(
            index=False, float_format=lambda x: f"{x:.1f}"))
        result[key] = figures(d)
        print(json.dumps(result[key]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

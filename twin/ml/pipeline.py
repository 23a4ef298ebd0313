"""``twin train`` / ``experiments/train_recommender.py``: the whole retraining in one command.

1. sample training and held-out workload families (different seeds, so held-out
   workloads are unseen);
2. sweep both through the twin (resumable; a re-run after a profile change re-runs only
   what the new profile's hash invalidates: everything), and the training workloads at the
   goodput search's latency knobs and at 120-s windows for the latency heads
   (:mod:`twin.ml.latency_sweep`; ``--no-latency-sweep`` skips it);
3. fit the recommender's tree ensembles, save them (and install them as the shipped model);
4. compare models on held-out families (GroupKFold): simplified tree, EBM, monotone linear,
   xgboost and the shipped ensemble; export trees and importances;
5. recommend for every held-out workload with the saved model and compare its verified
   throughput with the best of an exhaustive twin search over the same grid;
6. the SLO evaluation (:mod:`twin.ml.slo_bench`; alone with ``--slo-only``): held-out
   workloads x SLO levels, ``recommend --objective goodput`` (and ``place`` when one GPU
   cannot meet the SLO) against exhaustive twin search of the same knob space.

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from twin.costs.profile import load_profile
from twin.errors import TwinInputError
from twin.ml.latency_sweep import latency_plan
from twin.ml.recommender import SHIPPED_MODEL, Recommender
from twin.ml.slo_bench import slo_report
from twin.ml.slo_eval import headline as slo_headline
from twin.ml.sweep import EarlyExit, plan, read_sweep, run_sweep
from twin.ml.train import (compare_models, fit_recommender, heldout_report, predict_latency_ms,
                           sample_workloads)
from twin.outputs import input_paths, json_document, open_store


def train_main(args) -> int:
    """The whole retraining into the workspace ``args.out`` (checked and locked through
    :mod:`twin.outputs`; a workspace of kind train resumes its sweeps)."""
    with open_store(args.out, "train", inputs=input_paths(args)):
        return _train(args)


def _train(args) -> int:
    t_all = time.perf_counter()
    profile = load_profile(args.profile)
    if args.slo_only:
        return _slo_only(args, profile, t_all)
    out = Path(args.out)
    W = float(args.window_s)
    lo, hi = (float(x) for x in args.rate_range)   # argparse: two positive numbers
    if lo > hi:
        raise TwinInputError(f"--rate-range is LOW,HIGH req/s; got {lo:g},{hi:g}",
                             field="--rate-range")
    if args.families < 2:   # the model comparison cross-validates by family
        raise TwinInputError(f"needs at least 2 training families, got {args.families}",
                             field="--families")
    timings: dict = {}
    train, held, lat = _datasets(args, profile, W, (lo, hi), timings)

    t0 = time.perf_counter()
    model = fit_recommender(train, profile, latency_sweep=lat, meta={
        "window_s": W, "train_families": args.families, "seed": args.seed,
        "rate_range": [lo, hi],
        "command": "python experiments/train_recommender.py"})
    model_path = model.save(out / "recommender.json")
    timings["fit_s"] = time.perf_counter() - t0
    kb = model_path.stat().st_size / 1024
    print(f"model: {model_path} ({kb:.0f} kB), fitted in {timings['fit_s']:.1f} s", flush=True)

    t0 = time.perf_counter()
    scores = compare_models(train, out / "models", quick=args.quick)
    timings["compare_s"] = time.perf_counter() - t0
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.4f}".format):
        cols = [c for c in ("target", "model", "smape_median", "smape_mean", "r2", "accuracy",
                            "predict_us_per_row", "groups") if c in scores.columns]
        print("model comparison on held-out families (GroupKFold by family):")
        print(scores[cols].to_string(index=False), flush=True)

    t0 = time.perf_counter()
    rep = heldout_report(held, model, profile, window_s=W, workers=args.workers,
                         model_path=model_path)
    timings["heldout_s"] = time.perf_counter() - t0
    rep.to_csv(out / "heldout.csv", index=False)
    pms = predict_latency_ms(model, held, profile)
    with pd.option_context("display.width", 200, "display.max_colwidth", 70):
        print(rep[["workload", "exhaustive_best_max_loras", "exhaustive_throughput",
                   "predicted_max_loras", "rec_max_loras", "rec_throughput", "gap_pct",
                   "rec_runs", "e2e_s"]].to_string(index=False), flush=True)
    slo = {}
    if not args.no_slo:
        t0 = time.perf_counter()
        slo = _slo_part(args, profile, model, model_path)
        timings["slo_s"] = time.perf_counter() - t0
    summary = {**_headline(rep, pms), **_latency_keys(model), **slo,
               "train_rows": int(len(train)), "window_s": W, "profile": profile.name,
               "model_kb": round(kb, 1), "total_s": round(time.perf_counter() - t_all, 1),
               **{k: round(v, 1) for k, v in timings.items()}}
    (out / "summary.json").write_text(json_document(summary, indent=2) + "\n")
    if not args.no_install:   # last: a run that fails on the way installs nothing
        dest = Path(__file__).resolve().parent / SHIPPED_MODEL
        shutil.copyfile(model_path, dest)
        print(f"installed as {dest}", flush=True)
    print(json_document(summary))
    return 0


def _held_specs(args, rate_range: tuple) -> list:
    return sample_workloads(args.heldout_families, seed=args.seed + 1000,
                            window_s=float(args.window_s), rate_range=rate_range)


def _slo_part(args, profile, model: Recommender, model_path: Path | None) -> dict:
    """The SLO evaluation on the held-out families' workloads: its summary keys (the case
    table and model-vs-twin pairs go to ``out/slo_cases.csv``, ``slo_pred_pairs.csv``)."""
    lo, hi = (float(x) for x in args.rate_range)
    cases, pairs = slo_report(_held_specs(args, (lo, hi)), model, profile, Path(args.out),
                              window_s=float(args.slo_window_s),
                              n_workloads=args.slo_workloads, workers=args.workers,
                              model_path=model_path)
    if len(cases):
        with pd.option_context("display.width", 220, "display.max_colwidth", 60):
            print(cases[["workload", "level", "slo_ttft_ms", "slo_tpot_ms", "feasible",
                         "rec_ok", "rec_gpus", "min_gpus", "gap_pct", "violation",
                         "e2e_s"]].to_string(index=False), flush=True)
    return {**(slo_headline(cases, pairs) if len(cases) else {"slo_cases": 0}),
            "slo_window_s": float(args.slo_window_s)}


def _latency_keys(model: Recommender) -> dict:
    """The model's recorded p99 latency error (held-out families) as summary keys."""
    err = model.latency_error or {}
    return {f"latency_{m}_smape_{s}": err[m][f"smape_{s}"] for m in ("ttft_p99", "tpot_p99")
            if m in err for s in ("median", "p90")}


def _slo_only(args, profile, t_all: float) -> int:
    """``--slo-only``: the SLO evaluation with ``--model`` (default the shipped model)."""
    model = Recommender.load(args.model)
    summary = {**_latency_keys(model), **_slo_part(args, profile, model, args.model),
               "profile": profile.name,
               "total_s": round(time.perf_counter() - t_all, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary_slo.json").write_text(json_document(summary, indent=2) + "\n")
    print(json_document(summary))
    return 0


def _datasets(args, profile, W: float, rate_range: tuple, timings: dict):
    """Sample the training and held-out workload families (different seeds), sweep both
    through the twin (resumable), and the training workloads at the latency heads' knobs
    and windows (:mod:`twin.ml.latency_sweep`; not with ``--no-latency-sweep``); read back
    the rows of this run's points: (train, held-out, latency sweep or None)."""
    ee = EarlyExit()
    train_specs = sample_workloads(args.families, seed=args.seed, window_s=W,
                                   rate_range=rate_range)
    held_specs = _held_specs(args, rate_range)
    print(f"profile {profile.name}; window {W:.0f} s; {len(train_specs)} training workloads "
          f"({args.families} families), {len(held_specs)} held-out workloads "
          f"({args.heldout_families} families)", flush=True)
    out = Path(args.out)
    tasks = {name: plan(specs, window_s=W, profile=profile, early_exit=ee)
             for name, specs in (("train", train_specs), ("heldout", held_specs))}
    for name in ("train", "heldout"):
        t0 = time.perf_counter()
        rep = run_sweep(tasks[name], out / f"sweep-{name}", profile=profile,
                        workers=args.workers, early_exit=ee, progress=not args.no_progress)
        timings[f"sweep_{name}_s"] = time.perf_counter() - t0
        print(f"sweep {name}: {rep.line()}", flush=True)
    lat_tasks = [] if args.no_latency_sweep else latency_plan(
        train_specs, profile=profile, early_exit=ee, paper_window_s=W, seed=args.seed)
    if lat_tasks:
        t0 = time.perf_counter()
        rep = run_sweep(lat_tasks, out / "sweep-latency", profile=profile,
                        workers=args.workers, early_exit=ee, progress=not args.no_progress)
        timings["sweep_latency_s"] = time.perf_counter() - t0
        print(f"sweep latency (the latency heads' knobs and windows): {rep.line()}",
              flush=True)
    train = _rows_of(out / "sweep-train", tasks["train"])
    held = _rows_of(out / "sweep-heldout", tasks["heldout"])
    lat = _rows_of(out / "sweep-latency", lat_tasks) if lat_tasks else None
    print(f"dataset: {len(train)} training rows ({int((~train['early_exit']).sum())} full "
          f"runs, {int(train['early_exit'].sum())} early exits), {len(held)} held-out rows, "
          f"{0 if lat is None else len(lat)} latency-sweep rows", flush=True)
    return train, held, lat


def _rows_of(path: Path, tasks) -> pd.DataFrame:
    """The rows of a sweep store that belong to ``tasks`` (a store may hold more)."""
    keys = {t.key for t in tasks}
    rows = read_sweep(path)
    return rows[rows["key"].isin(keys)].reset_index(drop=True)


def _headline(rep: pd.DataFrame, pms: float) -> dict:
    """The held-out figures of the summary: gap to the exhaustive best, starving
    recommendations, refusals, prediction and end-to-end times, exact hits."""
    feas = rep[rep["exhaustive_ok"]]
    gaps = feas["gap_pct"].dropna()
    return {
        "gap_to_exhaustive_median_pct": round(float(gaps.median()), 3) if len(gaps) else None,
        "gap_to_exhaustive_max_pct": round(float(gaps.max()), 3) if len(gaps) else None,
        "starving_recommendations": int(feas["rec_starving"].sum()),
        "heldout_workloads": int(len(rep)),
        "heldout_feasible_workloads": int(len(feas)),
        "heldout_refused_correctly": int(((~rep["exhaustive_ok"]) & (~rep["rec_ok"])).sum()),
        "predict_ms": round(pms, 4),
        "recommend_e2e_median_s": round(float(rep["e2e_s"].median()), 3),
        "recommend_e2e_max_s": round(float(rep["e2e_s"].max()), 3),
        "recommend_runs_mean": round(float(rep["rec_runs"].mean()), 2),
        "exhaustive_runs_mean": round(float(rep["exhaustive_runs"].mean()), 2),
        "predicted_exact_pct": round(100 * float((feas["predicted_max_loras"]
                                                 == feas["exhaustive_best_max_loras"]).mean()), 1)
        if len(feas) else None,
        "recommended_exact_pct": round(100 * float((feas["rec_max_loras"]
                                                   == feas["exhaustive_best_max_loras"]).mean()), 1)
        if len(feas) else None,
    }

"""Reproduce real vLLM multi-LoRA runs on an H100-class GPU (Llama-3.1-8B, vLLM 0.8.5).

The twin's profile is fitted only on the ``digital_twin_modelling`` runs (the shipped
``llama31-8b-h100-64gb`` profile, or a fresh fit with ``--calibrate``); this script reports
on the held-out ``ml_modelling_test`` runs (different, heterogeneous workloads; ``anomaly``
rows and failed runs skipped). Every run's workload is reconstructed from its columns
(``twin.calibrate.vllm_runs``) and simulated for the real 3600-s window.

Side by side with the paper's own twin (arXiv 2508.08343), matched to the same runs in
``paper_twin_grid_llama31_8b.csv.gz`` on (max_loras, max_cpu_loras, rate set, rank set):
SMAPE = 2|a−b|/(|a|+|b|) of total throughput, mean TTFT, mean ITL, mean TPOT (median and
worst), starvation-verdict agreement (starving = total throughput < 90% of the offered
load ``offered_total_tps_est``, for real and twin alike) and, per workload, whether the best
non-starving (max_loras, max_cpu_loras) agrees (the paper's procedure: for each slots value
scan served adapters upward and keep the last acceptable one before the first starving one;
the optimum is the best throughput among those). ``optimum_agreement_with_ties`` also counts a
workload where the twin declares a tie (its candidates within its own throughput error of its
best: the fit-set throughput SMAPE its profile records, ``twin.ml.ties.tie_band``) that
names the real best.

    python experiments/reproduce_vllm_h100.py            # ~10-20 min on 2 cores
    python experiments/reproduce_vllm_h100.py --calibrate   # refit first (+ a few minutes)

The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from twin.calibrate.vllm import simulate_run
from twin.cli.calibrate import add_vllm_fit_args
from twin.calibrate.vllm_runs import read_run_table
from twin.costs.profile import load_profile
from twin.ml.ties import tie_band
from twin.results import smape
from twin.workload.public import shared_data_dir

HERE = Path(__file__).resolve().parent
FIT_SET, TEST_SET = "digital_twin_modelling", "ml_modelling_test"
METRICS = (("throughput", "total_throughput", "total throughput"),
           ("ttft", "mean_ttft_ms", "mean TTFT"),
           ("itl", "mean_itl_ms", "mean ITL"),
           ("tpot", "mean_tpot_ms", "mean TPOT"))

_PROFILE = None
_CAP = None
_SEED = 0


def _init(profile, cap, seed):
    global _PROFILE, _CAP, _SEED
    _PROFILE, _CAP, _SEED = profile, cap, seed


def _job(spec):
    return simulate_run(spec, _PROFILE, seed=_SEED, max_in_flight=_CAP)


def simulate_all(runs, profile, cap, processes: int, log=print, seed: int = 0) -> list[dict]:
    t0 = time.perf_counter()
    order = sorted(range(len(runs)), key=lambda i: -runs[i].aggregate_rate)  # longest first
    out = [None] * len(runs)
    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    with ctx.Pool(processes, initializer=_init, initargs=(profile, cap, seed)) as pool:
        for n, (i, res) in enumerate(zip(order, pool.imap(_job, [runs[i] for i in order]))):
            out[i] = res
            if (n + 1) % 50 == 0 or n + 1 == len(runs):
                log(f"  simulated {n + 1}/{len(runs)} runs [{time.perf_counter() - t0:.0f} s]")
    return out


# -- the comparison table -------------------------------------------------------------------

def results_frame(runs, sims) -> pd.DataFrame:
    rows = []
    for r, s in zip(runs, sims):
        m = r.metrics
        row = {"key": r.key, "workload": r.extra.get("workload_dir", ""),
               "max_loras": r.config.max_loras, "max_cpu_loras": r.config.max_cpu_loras,
               "max_lora_rank": r.config.max_lora_rank,
               "rate_set": r.extra.get("rate_set_arg"),
               "offered": float(r.extra.get("offered_total_tps_est", r.offered_tps)),
               "twin_error": s.get("error")}
        for short, name, _ in METRICS:
            row[f"real_{short}"] = m.get(name, np.nan)
            row[f"twin_{short}"] = s.get(name, np.nan)
        for q in ("median", "p99"):   # the TTFT tail (the means above are SMAPE'd)
            row[f"real_ttft_{q}"] = m.get(f"{q}_ttft_ms", np.nan)
            row[f"twin_ttft_{q}"] = s.get(f"{q}_ttft_ms", np.nan)
        # the batch (vLLM's num_requests_running scraped over the run; the twin's timeline)
        row["real_running"] = m.get("num_running_mean", np.nan)
        row["twin_running"] = s.get("num_running_mean", np.nan)
        row["twin_lora_running_sets"] = s.get("lora_running_sets", np.nan)
        row["twin_held_by"] = s.get("held_by", "")   # what held its queue (queue_head)
        row["twin_sim_wall_s"] = s.get("sim_wall_s", np.nan)
        row["twin_rejected"] = s.get("rejected", 0)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["real_starving"] = df["real_throughput"] < 0.9 * df["offered"]
    df["twin_starving"] = df["twin_throughput"] < 0.9 * df["offered"]
    return df


def attach_paper_twin(df: pd.DataFrame, runs, data: Path) -> pd.DataFrame:
    """The paper's twin output for the same runs (grid rows for the test set)."""
    grid = pd.read_csv(data / "paper_twin_grid_llama31_8b.csv.gz")
    grid = grid[grid["model"].astype(str).str.contains("llama", case=False)]
    key = ["max_loras", "max_cpu_loras", "rate_set", "adapter_rank_set"]
    grid = grid.drop_duplicates(key)
    cyc = {r.key: r.extra.get("adapter_module_ranks_cycle") for r in runs}
    df = df.copy()
    df["adapter_rank_set"] = df["key"].map(cyc)
    g = grid[key + ["total_throughput_tps", "mean_itl_ms", "mean_ttft_ms_incl_unfinished"]]
    g = g.rename(columns={"total_throughput_tps": "paper_throughput", "mean_itl_ms": "paper_itl",
                          "mean_ttft_ms_incl_unfinished": "paper_ttft"})
    df = df.merge(g, on=key, how="left")
    df["paper_tpot"] = np.nan     # the paper's twin reports no TPOT
    df["paper_starving"] = np.where(df["paper_throughput"].notna(),
                                    df["paper_throughput"] < 0.9 * df["offered"], np.nan)
    return df


def frontier(sub: pd.DataFrame, tput: str, starving: str) -> list:
    """The paper's candidates: per slots value scan served upward, keep the last acceptable
    point before the first starving one (rows)."""
    cands = []
    for slots, g in sub.sort_values(["max_loras", "max_cpu_loras"]).groupby("max_loras"):
        last = None
        for _, row in g.iterrows():
            if pd.isna(row[starving]) or pd.isna(row[tput]):
                continue
            if bool(row[starving]):
                break
            last = row
        if last is not None:
            cands.append(last)
    return cands


def _key(row) -> tuple:
    return int(row["max_loras"]), int(row["max_cpu_loras"])


def best_config(sub: pd.DataFrame, tput: str, starving: str):
    """The paper's optimum: the best throughput among the :func:`frontier` candidates
    (None if none)."""
    cands = frontier(sub, tput, starving)
    return _key(max(cands, key=lambda row: row[tput])) if cands else None


def declared_tie(sub: pd.DataFrame, tput: str, starving: str, band: float) -> list:
    """The configurations the twin cannot rank apart: its frontier candidates whose
    throughput is within ``band`` (the twin's own throughput error) of its best."""
    from twin.ml.ties import within_band

    return within_band({_key(r): float(r[tput]) for r in frontier(sub, tput, starving)}, band)


def optimum_table(df: pd.DataFrame, who: str, tie_band: float | None = None) -> pd.DataFrame:
    """Per workload: the real best and ``who``'s pick, whether they agree, and (with
    ``tie_band``) ``who``'s declared tie and whether it contains the real best."""
    rows = []
    for wl, sub in df.groupby("workload"):
        if who == "paper":
            sub = sub[sub["paper_throughput"].notna()]
        real = best_config(sub, "real_throughput", "real_starving")
        pred = best_config(sub, f"{who}_throughput", f"{who}_starving")
        tie = ([] if tie_band is None else
               declared_tie(sub, f"{who}_throughput", f"{who}_starving", tie_band))
        real_at_pred = np.nan
        if pred is not None:
            hit = sub[(sub.max_loras == pred[0]) & (sub.max_cpu_loras == pred[1])]
            real_at_pred = float(hit["real_throughput"].iloc[0]) if len(hit) else np.nan
            pred_ok = bool(len(hit)) and not bool(hit["real_starving"].iloc[0])
        else:
            pred_ok = False
        real_best = np.nan if real is None else float(
            sub[(sub.max_loras == real[0]) & (sub.max_cpu_loras == real[1])]["real_throughput"].iloc[0])
        ratio = real_at_pred / real_best if real_best else np.nan
        # how far below its own pick the twin puts the real best (the band a tie would need)
        gap = np.nan
        if real is not None and pred is not None:
            t = sub.set_index(["max_loras", "max_cpu_loras"])[f"{who}_throughput"]
            gap = 1 - float(t.get(real, np.nan)) / float(t[pred])
        rows.append({"workload": wl, "real_best": real, f"{who}_best": pred,
                     "agree": real == pred,
                     "real_tput_of_pick_over_best": round(float(ratio), 4),
                     "pick_not_starving_in_real": pred_ok,
                     # a tie within the runs' own noise (separate Poisson draws, +-2%)
                     "agree_within_1pct": bool(pred_ok and ratio >= 0.99),
                     f"{who}_gap_to_real_best": round(gap, 4),
                     f"{who}_tie": tie if len(tie) > 1 else None,
                     # the pick is the real best, or the declared tie (within the twin's
                     # own error) names the real best among its configurations
                     "agree_with_ties": bool(real == pred or (real is not None
                                                              and len(tie) > 1
                                                              and real in tie))})
    return pd.DataFrame(rows)


def error_stats(df: pd.DataFrame, who: str) -> dict:
    out = {}
    for short, _, _ in METRICS:
        a, b = df[f"{who}_{short}"], df[f"real_{short}"]
        ok = a.notna() & b.notna()
        e = smape(a[ok], b[ok], percent=True)
        out[short] = (float(np.median(e)) if len(e) else np.nan,
                      float(np.max(e)) if len(e) else np.nan, int(ok.sum()))
    ok = df[f"{who}_starving"].notna() if who == "paper" else df["twin_throughput"].notna()
    out["starvation"] = float((df.loc[ok, f"{who}_starving"].astype(bool)
                               == df.loc[ok, "real_starving"]).mean())
    return out


def twin_figures(ours: dict, opt: pd.DataFrame, band: float) -> dict:
    """The twin's headline keys (the summary's first ones): SMAPEs from :func:`error_stats`,
    starvation and optimum agreement from :func:`optimum_table` at tie band ``band``."""
    return {
        "throughput_smape_median": round(ours["throughput"][0], 2),
        "throughput_smape_max": round(ours["throughput"][1], 2),
        "ttft_smape_median": round(ours["ttft"][0], 2),
        "itl_smape_median": round(ours["itl"][0], 2),
        "tpot_smape_median": round(ours["tpot"][0], 2),
        "starvation_agreement": round(ours["starvation"], 4),
        "optimum_agreement": round(float(opt["agree"].mean()), 4),
        "optimum_agreement_within_1pct": round(float(opt["agree_within_1pct"].mean()), 4),
        "optimum_agreement_with_ties": round(float(opt["agree_with_ties"].mean()), 4),
        "optimum_tie_band_pct": round(100 * band, 2),
        "optimum_pick_real_throughput_ratio_min": round(
            float(opt["real_tput_of_pick_over_best"].min()), 4),
    }


def batch_ratios(df: pd.DataFrame) -> dict:
    """Median twin/real mean running requests, ``keepup`` in the runs that keep up (really)
    and ``starved`` in the others: the batch ITL scales with, checked against the real runs'
    own scrape (their Little's law holds to ~3%), which no fit uses; {} for a CSV without
    the columns."""
    if "real_running" not in df or "twin_running" not in df:
        return {}
    ratio = df["twin_running"] / df["real_running"].where(df["real_running"] > 0)
    return {name: round(float(ratio[mask].median()), 3)
            for name, mask in (("keepup", ~df["real_starving"]), ("starved", df["real_starving"]))
            if ratio[mask].notna().any()}


def format_table(ours: dict, ours_common: dict, paper: dict, opt_ours, opt_paper, n_all,
                 n_common, band: float) -> str:
    def cell(t):
        return "n/a" if t is None or np.isnan(t[0]) else f"{t[0]:.1f} / {t[1]:.0f}"

    lines = [f"| metric (SMAPE %, median / worst) | twin, all {n_all} test runs | twin, "
             f"{n_common} runs the paper's twin has | paper's twin, same {n_common} runs |",
             "|---|---|---|---|"]
    for short, _, label in METRICS:
        p = paper[short] if short != "tpot" else None
        note = " (incl. unfinished as window)" if short == "ttft" else ""
        lines.append(f"| {label} | {cell(ours[short])} | {cell(ours_common[short])} | "
                     f"{cell(p)}{note if p else ''} |")
    lines.append(f"| starvation verdict agrees with real | {100 * ours['starvation']:.1f}% | "
                 f"{100 * ours_common['starvation']:.1f}% | {100 * paper['starvation']:.1f}% |")
    lines.append(f"| best non-starving (max_loras, max_cpu_loras) agrees exactly | "
                 f"{int(opt_ours['agree'].sum())}/{len(opt_ours)} workloads | – | "
                 f"{int(opt_paper['agree'].sum())}/{len(opt_paper)} workloads |")
    lines.append(f"| ... or is a tie (acceptable in real, real throughput within 1% of the "
                 f"real best) | {int(opt_ours['agree_within_1pct'].sum())}/{len(opt_ours)} | – | "
                 f"{int(opt_paper['agree_within_1pct'].sum())}/{len(opt_paper)} |")
    lines.append(f"| ... or the twin declares a tie (its candidates within its own throughput "
                 f"error, {100 * band:.1f}%, of its best) that names the real best | "
                 f"{int(opt_ours['agree_with_ties'].sum())}/{len(opt_ours)} | – | – |")
    return "\n".join(lines)


def scatter(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6))
    for ax, (short, _, label) in zip(axes, METRICS):
        a, b = df[f"real_{short}"], df[f"twin_{short}"]
        ok = a.notna() & b.notna() & (a > 0) & (b > 0)
        ax.scatter(a[ok][~df.real_starving[ok]], b[ok][~df.real_starving[ok]], s=9, alpha=0.7,
                   label="real keeps up")
        ax.scatter(a[ok][df.real_starving[ok]], b[ok][df.real_starving[ok]], s=9, alpha=0.7,
                   color="C3", label="real starving")
        if "paper_" + short in df and df["paper_" + short].notna().any() and short != "ttft":
            p = df["paper_" + short]
            okp = ok & p.notna()
            ax.scatter(a[okp], p[okp], s=7, marker="x", alpha=0.35, color="gray",
                       label="paper's twin")
        lo, hi = float(min(a[ok].min(), b[ok].min())), float(max(a[ok].max(), b[ok].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        if short in ("ttft",):
            ax.set_xscale("log")
            ax.set_yscale("log")
        e = smape(b[ok], a[ok], percent=True)
        ax.set_title(f"{label}: SMAPE median {np.median(e):.1f}%")
        ax.set_xlabel("real vLLM")
        ax.set_ylabel("twin")
    axes[0].legend(fontsize=8)
    fig.suptitle("twin vs real vLLM 0.8.5, Llama-3.1-8B on one H100 64 GB: held-out "
                 "ml_modelling_test runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="llama31-8b-h100-64gb",
                    help="profile to evaluate (default: the shipped calibrated one)")
    ap.add_argument("--calibrate", action="store_true",
                    help="refit the profile on the digital_twin_modelling runs first (kept as "
                         "calibrated_profile.json in --out)")
    ap.add_argument("--terms", default="step",
                    help="with --calibrate: the step-time terms fitted: step, grid, "
                         "capped-grid, ridge, adapters-squared (twin.calibrate.step_terms) or a "
                         "comma-separated list, "
                         "where a+b ties two features to one coefficient")
    ap.add_argument("--balance", choices=("regime", "slots"),
                    help="with --calibrate: weigh each measured regime (no queue, a queue, "
                         "overloaded) of the fit runs alike, or each (max_loras, regime) "
                         "cell, not each run")
    ap.add_argument("--feedback", action="store_true",
                    help="with --calibrate: scale each run's ITL residual by the gain its "
                         "batch adds (fit_step_time(feedback=True))")
    ap.add_argument("--residual-weights", default="1,1,0.25", metavar="ITL,THR,TTFT",
                    help="with --calibrate: weights of the step-time fit's ITL, throughput "
                         "and light-load TTFT residuals (default 1,1,0.25)")
    add_vllm_fit_args(ap.add_argument_group("with --calibrate: the fit's target, held "
                                            "coefficients and frontend"))
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--max-runs", type=int, help="evaluate on N test runs (quick look)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the reconstructed workloads (arrivals, lengths, adapter "
                         "ranks and rates); another seed shows the twin's spread over "
                         "workloads the real runs' aggregates cannot tell apart")
    ap.add_argument("--results", type=Path, metavar="CSV",
                    help="recompute the tables from a per-run CSV this script wrote "
                         "(no simulation)")
    ap.add_argument("--out", type=Path, default=HERE / "figures",
                    help="where the scatter plot and the per-run CSV go")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data = shared_data_dir() / "vllm-h100"
    table = data / "real_runs_llama31_8b.csv"
    runs = read_run_table(table)
    fit_runs = [r for r in runs if r.extra.get("experiment_set") == FIT_SET]
    test_runs = [r for r in runs if r.extra.get("experiment_set") == TEST_SET]
    if args.max_runs:
        from twin.calibrate.vllm_runs import spread

        test_runs = spread(test_runs, args.max_runs)
    if args.results:
        df = pd.read_csv(args.results)
        profile = load_profile(args.profile)   # for its recorded error (the tie band)
    else:
        if args.calibrate:
            from twin.calibrate.step_terms import ADAPTER_PAIR_TERMS
            from twin.calibrate.vllm import (CAPPED_GRID_TERMS, GRID_TERMS, RIDGE_TERMS,
                                             STEP_TERMS, calibrate, read_kv_capacity,
                                             read_load_times)

            print(f"calibrating on {len(fit_runs)} {FIT_SET} runs")
            profile = calibrate(
                fit_runs, kv=read_kv_capacity(data / "kv_cache_tokens_llama31_8b.csv"),
                loads=read_load_times(data / "adapter_load_times_llama31_8b.csv"),
                processes=args.processes, window_s=1200.0, iterations=4,
                terms={"step": STEP_TERMS, "grid": GRID_TERMS, "capped-grid": CAPPED_GRID_TERMS,
                       "ridge": RIDGE_TERMS, "adapters-squared": ADAPTER_PAIR_TERMS}
                .get(args.terms) or tuple(args.terms.split(",")), balance=args.balance,
                feedback=args.feedback, decode_target=args.decode_target,
                residual_weights=[float(v) for v in args.residual_weights.split(",")],
                hold=args.hold, metrics_series_s=args.metrics_series_s,
                request_delay=args.request_delay,
                sources={"runs": str(table), "experiment_sets": [FIT_SET]})
            args.out.mkdir(parents=True, exist_ok=True)
            print(f"calibrated profile: {profile.save(args.out / 'calibrated_profile.json')}")
        else:
            profile = load_profile(args.profile)
        fitted_on = (profile.provenance.get("sources") or {}).get("experiment_sets")
        if fitted_on and set(fitted_on) != {FIT_SET}:
            print(f"warning: profile was fitted on {fitted_on}, not only {FIT_SET}",
                  file=sys.stderr)
        cap = (profile.provenance.get("client") or {}).get("max_in_flight")
        print(f"profile {profile.name} (fitted on {fitted_on or 'unknown'}); client cap "
              f"{cap} requests in flight; {len(test_runs)} held-out {TEST_SET} runs, "
              f"3600-s windows, {args.processes} processes")
        sims = simulate_all(test_runs, profile, cap, args.processes, seed=args.seed)
        df = results_frame(test_runs, sims)
        failed = df["twin_error"].notna()
        if failed.any():
            print(f"{int(failed.sum())} run(s) the twin's memory model refuses to start "
                  f"(real vLLM started them): {df.loc[failed, 'key'].tolist()}")
        df = attach_paper_twin(df[~failed], test_runs, data)
    common = df[df["paper_throughput"].notna()]
    ours, ours_c, paper = (error_stats(df, "twin"), error_stats(common, "twin"),
                           error_stats(common, "paper"))
    band, band_source = tie_band(profile)
    opt_ours, opt_paper = optimum_table(df, "twin", band), optimum_table(df, "paper")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.results:
        df.to_csv(args.out / "reproduce_vllm_h100_runs.csv", index=False)
    scatter(df, args.out / "reproduce_vllm_h100_scatter.png")
    print()
    print(format_table(ours, ours_c, paper, opt_ours, opt_paper, len(df), len(common), band))
    print(f"tie band {100 * band:.2f}% ({band_source})")
    print()
    with pd.option_context("display.width", 200):
        show = opt_ours.merge(opt_paper[["workload", "paper_best", "agree"]], on="workload",
                              suffixes=("", "_paper"))
        print(show.to_string(index=False))
    print()
    if "twin_sim_wall_s" in df:
        print(f"twin wall time per simulated hour: median {df.twin_sim_wall_s.median():.1f} s, "
              f"max {df.twin_sim_wall_s.max():.1f} s; script {time.perf_counter() - t0:.0f} s")
    batch = batch_ratios(df)
    if batch:
        print("mean running requests, twin / real (median): "
              + ", ".join(f"{name} {v:.3f}" for name, v in batch.items()))
    print(f"figures: {args.out / 'reproduce_vllm_h100_scatter.png'}")
    summary = {
        **twin_figures(ours, opt_ours, band),
        **{f"running_ratio_{name}_median": v for name, v in batch.items()},
        "paper_twin_throughput_smape_median": round(paper["throughput"][0], 2),
        "paper_twin_itl_smape_median": round(paper["itl"][0], 2),
        "paper_twin_starvation_agreement": round(paper["starvation"], 4),
        "paper_twin_optimum_agreement": round(float(opt_paper["agree"].mean()), 4),
        "paper_twin_optimum_agreement_within_1pct": round(
            float(opt_paper["agree_within_1pct"].mean()), 4),
        "runs": int(len(df)), "runs_with_paper_twin": int(len(common)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

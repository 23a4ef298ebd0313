#!/usr/bin/env python
"""Cost of a sweep of the paper's grid (arXiv 2508.08343), measured on a random sample.

The grid: the 120 rate triplets of three classes drawn from {3.2, 1.6, 0.8, 0.4, 0.1, 0.05,
0.025, 0.0125, 0.00625, 0.003125} req/s (adapters split evenly over the classes), 7 rank
triplets over {8, 16, 32}, (slots <= served) with both in {8, 16, 32, 64, 96, 128, 160,
192, 256, 320, 384}, one simulated hour each, ShareGPT lengths rescaled to the runs' pool
means (223 / 196), max_num_seqs = max_num_batched_tokens = 2048, adapters preloaded.
The paper's twin ran the 31,440 points that start in 299 CPU-hours.

A uniform random sample of grid points (seeded) is simulated twice, each point in a worker
process with its CPU time measured:
- **full**: the whole hour, however starved;
- **sweep**: as `twin sweep` runs it, with early exit (a point whose first 6 minutes
  already clearly starve -- achieved < 75 % of offered, a growing queue, and a token
  rate that even projected optimistically cannot serve 80 % of the hour -- is recorded
  from that probe; see twin/ml/sweep.py).
The bench checks that every early-exit verdict equals the full hour's.
The trace of a (rates, ranks, served) workload is built once per workload and shared by
its slot values in a sweep, so its cost is reported apart and amortised over the mean
number of slot values per workload.

    .venv/bin/python experiments/bench_sweep.py [--points 40] [--workers 2] [--seed 0]

Prints per-run figures, the extrapolation to the grid's points that start, and one JSON
line last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

RATES = (3.2, 1.6, 0.8, 0.4, 0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125)
RANK_SETS = ((8, 8, 8), (8, 8, 16), (8, 16, 16), (16, 16, 16), (8, 8, 32), (8, 16, 32),
             (16, 16, 32))
GRID = (8, 16, 32, 64, 96, 128, 160, 192, 256, 320, 384)
PAPER_POINTS, PAPER_CPU_H = 31_440, 299.0


def grid_points():
    for rates in itertools.combinations(RATES, 3):
        for ranks in RANK_SETS:
            for served in GRID:
                for slots in GRID:
                    if slots <= served:
                        yield rates, ranks, served, slots


def _spec(rates, ranks, served):
    from twin.ml.spec import WorkloadSpec

    return WorkloadSpec("rate_classes", dict(n_adapters=served, rates=list(rates),
                                             ranks=list(ranks), duration_s=3600.0,
                                             lengths="sharegpt", seed=0))


def _run(item):
    """One grid point, with and without early exit: CPU seconds, verdicts, requests."""
    from twin.errors import ConfigError
    from twin.ml.spec import config_for, paper_base
    from twin.ml.sweep import EarlyExit, simulate_point
    from twin.costs.profile import load_profile

    (rates, ranks, served, slots), profile_name = item
    profile = load_profile(profile_name)
    c0 = time.process_time()
    trace, catalog = _spec(rates, ranks, served).build()
    gen = time.process_time() - c0
    cfg = config_for(paper_base(), slots, served, max(ranks))
    out = {"rates": rates, "ranks": ranks, "served": served, "slots": slots,
           "requests": len(trace), "gen_cpu_s": gen}
    for mode, ee in (("full", EarlyExit(enabled=False)), ("sweep", EarlyExit())):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            s, full, _, _ = simulate_point(trace, catalog, cfg, profile, 3600.0, ee)
            out[f"{mode}_starving"] = bool(s["starving"])
            out["starts"] = True
            if mode == "full":
                out["achieved"] = float(s["achieved_over_offered"])
        except ConfigError:
            out["starts"] = False
            out[f"{mode}_starving"] = None
        out[f"{mode}_cpu_s"] = time.process_time() - c0
        out[f"{mode}_wall_s"] = time.perf_counter() - w0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=40, help="sampled grid points (40)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None, help="profile (default: the shipped default)")
    args = ap.parse_args(argv)
    from twin.costs.profile import load_profile

    prof = load_profile(args.profile)

    pts = list(grid_points())
    rng = np.random.default_rng(args.seed)
    sample = [pts[i] for i in rng.choice(len(pts), size=args.points, replace=False)]
    sample.sort(key=lambda p: -p[2] * sum(p[0]))  # heaviest first: better packing
    print(f"paper grid: {len(pts)} (slots <= served) points; sampling {len(sample)} "
          f"(seed {args.seed}), one simulated hour each, {args.workers} workers, profile "
          f"{prof.name}", flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as ex:
        res = list(ex.map(_run, [(p, args.profile) for p in sample]))
    wall = time.perf_counter() - t0
    ok = [r for r in res if r["starts"]]
    for r in sorted(res, key=lambda r: -r.get("full_cpu_s", 0)):
        print(f"  rates {'/'.join(f'{x:g}' for x in r['rates']):>22} ranks "
              f"{'/'.join(map(str, r['ranks'])):>8} served {r['served']:>3} slots "
              f"{r['slots']:>3}: {r['requests']:>8} req, "
              + (f"full {r['full_cpu_s']:6.2f} s "
                 f"({'starving' if r['full_starving'] else 'keeps up'}), "
                 f"sweep {r['sweep_cpu_s']:6.2f} s" if r["starts"] else "does not start"),
              flush=True)
    full = np.array([r["full_cpu_s"] for r in ok])
    sweep = np.array([r["sweep_cpu_s"] for r in ok])
    gen = np.array([r["gen_cpu_s"] for r in res])
    agree = sum(r["full_starving"] == r["sweep_starving"] for r in ok)
    # slot values per workload among the points that start ~ 31,440 / (120 x 7 x 11)
    per_workload = PAPER_POINTS / (120 * 7 * len(GRID))
    gen_per_run = gen.mean() / per_workload
    boot = np.random.default_rng(1)
    ci = lambda x: np.percentile([boot.choice(x, len(x)).mean() for _ in range(2000)], [5, 95])
    cpu_h = lambda per_run: PAPER_POINTS * (per_run + gen_per_run) / 3600
    full_h, sweep_h = cpu_h(full.mean()), cpu_h(sweep.mean())
    fl, fh = (cpu_h(x) for x in ci(full))
    sl, sh = (cpu_h(x) for x in ci(sweep))
    print(f"\n{len(ok)} of {len(res)} sampled points start (vLLM refuses the rest: KV cache "
          f"< max_model_len); {int(sum(r['full_starving'] for r in ok))} starve")
    print(f"per run, one simulated hour (CPU s): full mean {full.mean():.2f} / median "
          f"{np.median(full):.2f} / max {full.max():.2f}; sweep (early exit) mean "
          f"{sweep.mean():.2f} / median {np.median(sweep):.2f} / max {sweep.max():.2f}")
    print(f"trace generation per workload: mean {gen.mean():.2f} CPU s "
          f"(~{per_workload:.1f} runs share it: {gen_per_run:.2f} s per run)")
    print(f"early-exit verdicts equal to the full hour's: {agree}/{len(ok)}")
    print(f"extrapolation to the paper's {PAPER_POINTS} points: full hours {full_h:.1f} "
          f"CPU-h (90% CI {fl:.1f}-{fh:.1f}); as twin sweep runs it {sweep_h:.1f} CPU-h "
          f"(90% CI {sl:.1f}-{sh:.1f}); the paper's twin: {PAPER_CPU_H:.0f} CPU-h")
    print(f"bench wall time {wall:.0f} s on {args.workers} workers "
          f"(machine load average {os.getloadavg()[0]:.1f})")
    print(json.dumps({
        "profile": prof.name, "sampled_points": len(res), "starting_points": len(ok),
        "per_run_full_cpu_s_mean": round(float(full.mean()), 3),
        "per_run_full_cpu_s_median": round(float(np.median(full)), 3),
        "per_run_sweep_cpu_s_mean": round(float(sweep.mean()), 3),
        "trace_gen_cpu_s_per_workload": round(float(gen.mean()), 3),
        "grid_cpu_h_full": round(full_h, 1), "grid_cpu_h_sweep": round(sweep_h, 1),
        "grid_cpu_h_sweep_ci90": [round(sl, 1), round(sh, 1)],
        "paper_cpu_h": PAPER_CPU_H, "early_exit_agreement": f"{agree}/{len(ok)}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

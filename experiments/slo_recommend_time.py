#!/usr/bin/env python
"""End-to-end time of one SLO recommendation (issue 16's `slo_recommend_e2e_median_s`),
alone: the SLO evaluation's cases replayed, `recommend(objective="goodput")` only (no
exhaustive runs), each model in turn per case (interleaved, so load drifts hit both).

    flock /work/timing.lock .venv/bin/python experiments/slo_recommend_time.py \\
        --cases runs/slo/slo_cases.csv --model twin/ml/recommender.json [--model other.json]

``--cases``: the ``slo_cases.csv`` of ``train_recommender.py --slo-only`` (its workloads are
the held-out families' as that run picked them, rebuilt here; its SLO per case). Times
include loading the model, as the evaluation's do. The last line is one JSON object:
per model, the median and max seconds and the twin runs per case.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from twin.costs.profile import load_profile
from twin.ml.recommend import recommend
from twin.ml.recommender import Recommender
from twin.ml.slo_bench import SLO_KNOBS, SLO_WINDOW_S, pick_workloads
from twin.ml.spec import paper_base
from twin.ml.train import sample_workloads
from twin.results import crop_window


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=Path, required=True, help="slo_cases.csv of --slo-only")
    p.add_argument("--model", type=Path, action="append", required=True,
                   help="recommender model file (repeat to compare, interleaved)")
    p.add_argument("--seed", type=int, default=0, help="train_recommender.py's --seed")
    p.add_argument("--window-s", type=float, default=SLO_WINDOW_S)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    cases = pd.read_csv(a.cases)
    specs = {s.describe(): s for s in pick_workloads(sample_workloads(
        20, seed=a.seed + 1000, window_s=600.0))}
    profile, base = load_profile(None), paper_base()
    times = {str(m): [] for m in a.model}
    runs = {str(m): [] for m in a.model}
    for _, c in cases.iterrows():
        trace, catalog = specs[c["workload"]].build()
        trace = crop_window(trace, a.window_s)
        slo = {"ttft": float(c["slo_ttft_ms"]), "tpot": float(c["slo_tpot_ms"])}
        for m in a.model:
            t0 = time.perf_counter()
            rec = recommend(trace, catalog, profile=profile, model=Recommender.load(m),
                            base=base, objective="goodput", slo=slo, window_s=a.window_s,
                            workers=a.workers, knobs=SLO_KNOBS)
            times[str(m)].append(time.perf_counter() - t0)
            runs[str(m)].append(rec.runs)
        print(f"{c['workload'][:60]} {c['level']}: "
              + ", ".join(f"{t[-1]:.2f} s" for t in times.values()), flush=True)
    out = {m: {"slo_recommend_e2e_median_s": round(float(np.median(t)), 3),
               "slo_recommend_e2e_max_s": round(float(np.max(t)), 3),
               "runs_mean": round(float(np.mean(runs[m])), 2), "cases": len(t)}
           for m, t in times.items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

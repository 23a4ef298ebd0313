"""How good are SLO recommendations? Held-out workloads x SLO levels against exhaustive
twin search (issue 16's figures; driven by :func:`twin.ml.slo_bench.slo_report`).

Per workload, every configuration of the search space (:mod:`twin.ml.search_space`,
restricted to the knobs the evaluation covers) runs once on the twin, keeping each finished
request's TTFT/TPOT so that any SLO can be scored afterwards (:func:`goodput_of`). SLO
levels are set relative to what the workload can achieve on one GPU
(:func:`slo_levels`: multiples of the lowest p99 TTFT and p99 TPOT among runs that keep
up); a level below 1 cannot be met on one GPU by construction, so the infeasible path
(refusal + fewest GPUs) is exercised too.

The arithmetic of the figures is here, as plain functions of run tables, so it can be
checked on cases whose answer is known by construction (tests/test_slo_eval.py):
:func:`exhaustive_best`, :func:`score_case`, :func:`headline`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.ml.report import slo_violation
from twin.results import smape
from twin.ml.verify import goodput_of

#: SLO levels: (name, multiple of the workload's best achievable p99 TTFT, of its p99 TPOT
#: on one GPU), each minimum taken on its own (so "tight" may be jointly infeasible).
SLO_LEVELS = (("tight", 1.25, 1.25), ("medium", 2.0, 1.5), ("loose", 5.0, 2.0))
#: "beyond": a p99 TTFT between the best on one GPU and the best on an even 2-GPU split
#: (geometric mean), p99 TPOT at this multiple of one GPU's best: infeasible on one GPU by
#: construction; set only where two GPUs lower the best p99 TTFT by more than 10 %.
BEYOND_TPOT = 2.0
#: "overload", for a workload no one-GPU configuration keeps up with: this multiple of the
#: best p99 TTFT and TPOT on an even 2-GPU split (its worse GPU's).
OVERLOAD = 2.0

def keeps_up(r: dict) -> bool:
    """A run that starts, simulated the whole window and does not starve: its p99s count."""
    return bool(r.get("starts") and r.get("full") and not r.get("starving"))


def best_p99(runs: list[dict], metric: str) -> float:
    """The lowest ``metric`` among the runs that keep up (nan when none does)."""
    vals = [float(r[metric]) for r in runs if keeps_up(r)]
    return min(vals) if vals else float("nan")


def slo_levels(runs: list[dict], split: list[list[dict]] | None = None,
               levels=SLO_LEVELS) -> dict[str, dict]:
    """{level: {'ttft': ms, 'tpot': ms}} relative to the best p99s on one GPU (``runs``)
    and, for "beyond", on an even 2-GPU split (``split``: each GPU's runs; the split's best
    p99 TTFT is its worse GPU's best). When no one-GPU run keeps up, one level,
    "overload", relative to the split's best; {} when the split does not keep up either."""
    ttft, tpot = best_p99(runs, "ttft_p99"), best_p99(runs, "tpot_p99")
    if not np.isfinite(ttft):   # nothing keeps up on one GPU: an SLO relative to 2 GPUs
        two = [max(best_p99(g, m) for g in split) for m in ("ttft_p99", "tpot_p99")] \
            if split else [np.nan]
        return ({"overload": {"ttft": round(OVERLOAD * two[0], 1),
                              "tpot": round(OVERLOAD * two[1], 2)}}
                if np.all(np.isfinite(two)) else {})
    out = {name: {"ttft": round(ft * ttft, 1), "tpot": round(fp * tpot, 2)}
           for name, ft, fp in levels}
    if split:
        two = max(best_p99(g, "ttft_p99") for g in split)
        if two < 0.9 * ttft:
            out = {"beyond": {"ttft": round(float(np.sqrt(two * ttft)), 1),
                              "tpot": round(BEYOND_TPOT * tpot, 2)}, **out}
    return out


def meets(r: dict, slo: dict) -> bool:
    """Keeps up and meets every SLO on its own run's p99s (what ``recommend`` requires)."""
    return keeps_up(r) and slo_violation(r, slo) <= 1


def exhaustive_best(runs: list[dict], slo: dict) -> tuple[int | None, float]:
    """The index of the run of highest goodput among those meeting ``slo`` and that goodput
    (None, nan when no run meets it: the SLO is infeasible on this GPU). A run's goodput
    under ``slo`` comes from its kept request latencies."""
    best, top = None, float("nan")
    for i, r in enumerate(runs):
        if not meets(r, slo):
            continue
        g = goodput_of(r["latencies"], r["duration_s"], slo)
        if best is None or g > top:
            best, top = i, g
    return best, top


def score_case(runs: list[dict], slo: dict, rec: dict, min_gpus: int | None = None,
               feasible_2gpu: bool | None = None) -> dict:
    """One (workload, SLO) case. ``rec``: what the recommendation gave — ``ok``, and when
    ok its verifying run's ``goodput``, ``ttft_p99``, ``tpot_p99``, ``starving``,
    ``full``, plus ``gpus`` (1 when ok; the fewest GPUs ``place`` verified when not; None
    when it found none). ``feasible_2gpu``: whether an even 2-GPU split meets the SLO in
    an exhaustive search (None: not known). ``min_gpus``: the exhaustive minimum when more
    than two GPUs are needed (None: not searched). One GPU infeasible and two feasible (by
    the split, or by the placement recommended) make the minimum 2. Returns the case's
    figures: ``feasible``, ``gap_pct`` (100 when a feasible SLO was refused),
    ``violation``, ``infeasible_detected`` (refused, and a GPU count given),
    ``multi_gpu_known`` (infeasible on one GPU, some GPU count known to meet it),
    ``gpus_gap``."""
    i, top = exhaustive_best(runs, slo)
    feasible = i is not None
    ok = bool(rec.get("ok"))
    violation = ok and not meets({**rec, "starts": True}, slo)
    gap = np.nan
    if feasible:
        gap = 100.0 * (top - float(rec["goodput"])) / top if ok else 100.0
    gpus = rec.get("gpus")
    if feasible:
        k_min = 1
    elif feasible_2gpu or gpus == 2:   # one GPU is infeasible: two is the least possible
        k_min = 2
    else:
        k_min = min_gpus
    return {"feasible": feasible, "exhaustive_goodput": top,
            "exhaustive_config": runs[i].get("config") if feasible else None,
            "rec_ok": ok, "rec_goodput": float(rec["goodput"]) if ok else np.nan,
            "gap_pct": gap, "violation": bool(violation),
            "infeasible_detected": (not feasible) and (not ok) and gpus is not None,
            "feasible_2gpu": feasible_2gpu,
            "multi_gpu_known": (not feasible) and (k_min is not None or gpus is not None),
            "rec_gpus": gpus, "min_gpus": k_min,
            "gpus_gap": (gpus - k_min) if gpus is not None and k_min is not None else np.nan}


def _r(x, nd=3):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def headline(cases: pd.DataFrame, pred: pd.DataFrame) -> dict:
    """The summary keys of the SLO evaluation from the case table (:func:`score_case`
    rows plus ``e2e_s``) and the model-vs-twin p99 pairs (``pred``: columns ``metric``,
    ``predicted``, ``twin``, ``base_knobs``)."""
    feas = cases[cases["feasible"]]
    infeas = cases[~cases["feasible"]]
    known = infeas[infeas["multi_gpu_known"]]
    gaps = feas["gap_pct"].dropna()
    out = {
        "slo_cases": int(len(cases)), "slo_feasible_cases": int(len(feas)),
        "slo_gap_to_exhaustive_median_pct": _r(gaps.median()) if len(gaps) else None,
        "slo_gap_to_exhaustive_max_pct": _r(gaps.max()) if len(gaps) else None,
        "slo_feasible_refused": int((~feas["rec_ok"]).sum()),
        "slo_violations": int(cases["violation"].sum()),
        "slo_infeasible_cases": int(len(infeas)),
        "slo_infeasible_multi_gpu_cases": int(len(known)),
        "slo_infeasible_detected_pct": _r(100 * known["infeasible_detected"].mean(), 1)
        if len(known) else None,
        "slo_infeasible_refused_pct": _r(100 * (~infeas["rec_ok"]).mean(), 1)
        if len(infeas) else None,
        "cost_gap_gpus_max": _r(cases["gpus_gap"].max(), 0)
        if cases["gpus_gap"].notna().any() else None,
        "slo_recommend_e2e_median_s": _r(cases["e2e_s"].median()),
        "slo_recommend_e2e_max_s": _r(cases["e2e_s"].max()),
    }
    for metric in ("ttft_p99", "tpot_p99"):
        p = pred[pred["metric"] == metric]
        s = np.atleast_1d(smape(p["predicted"], p["twin"], percent=True))
        b = p[p["base_knobs"].astype(bool)]   # (an empty column is not a mask)
        sb = np.atleast_1d(smape(b["predicted"], b["twin"], percent=True))
        name = metric.split("_")[0]
        out[f"pred_{name}_p99_smape_median"] = _r(np.median(s), 1) if len(s) else None
        out[f"pred_{name}_p99_smape_median_base_knobs"] = _r(np.median(sb), 1) \
            if len(sb) else None
    return out

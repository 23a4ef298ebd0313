"""The SLO evaluation's twin runs (``twin train`` / ``experiments/train_recommender.py``,
``--slo-only`` for this part alone): held-out workloads x SLO levels, each SLO
recommendation (``recommend(objective="goodput")``, then ``place`` when one GPU cannot meet
the SLO, as ``twin recommend`` does) against an exhaustive twin search of the same space.
The figures' arithmetic is :mod:`twin.ml.slo_eval`.

Costs: per workload, one twin run per configuration of the space on one GPU and on each
GPU of an even 2-way split (the SLO levels share them: each run keeps its requests'
latencies), plus the recommendations' own runs. Windows
are short (default 120 s) and workloads few (default 8, at most 32 adapters each), so it
runs in minutes on 2 cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from twin.ml.features import workload_features
from twin.ml.placement import place
from twin.ml.recommend import recommend
from twin.ml.recommender import Recommender, catalog_max_rank, config_table
from twin.ml.search_space import LATENCY_KNOBS, at_base_latency_knobs, space_configs
from twin.ml.slo_eval import exhaustive_best, keeps_up, score_case, slo_levels
from twin.ml.spec import WorkloadSpec, paper_base
from twin.ml.sweep import EarlyExit
from twin.ml.verify import Verifier
from twin.results import crop_window

SLO_WINDOW_S = 120.0
SLO_WORKLOADS = 8
MAX_ADAPTERS = 32      # the space grows with the max_loras candidates (one per grid value)
MAX_GPUS = 4
#: The knobs evaluated, and searched by the recommendations scored (``recommend(knobs=)``,
#: ``place(search_kw=)``), so both judge the same space: the reduced space of ``max_loras``
#: and the latency knobs (96-144 configurations for 8-32 adapters). ``max_cpu_loras``, rank
#: padding and ``gpu_memory_utilization`` stay at the paper's candidates' values: with them
#: the exhaustive search is ~40x larger (pass ``knobs`` to widen it).
SLO_KNOBS = LATENCY_KNOBS


def pick_workloads(specs: list[WorkloadSpec], n: int = SLO_WORKLOADS,
                   max_adapters: int = MAX_ADAPTERS) -> list[WorkloadSpec]:
    """One workload per held-out family (its largest with at most ``max_adapters``), the
    first ``n`` families in the order sampled: deterministic, and spread over families."""
    by_family: dict = {}
    for s in specs:
        if s.params["n_adapters"] <= max_adapters:
            fk = s.family_key
            if fk not in by_family or s.params["n_adapters"] > by_family[fk].params["n_adapters"]:
                by_family[fk] = s
    return list(by_family.values())[:n]


def exhaustive_runs(trace, catalog, profile, window_s: float, configs: list,
                    workers: int) -> list[dict]:
    """Every configuration once on the twin (early exit for clearly starving runs), each
    full run with its requests' latencies (to score any SLO later)."""
    ver = Verifier(trace, catalog, profile, window_s, None, EarlyExit(), workers,
                   keep_latencies=True)
    try:
        out = dict(ver.run(list(enumerate(configs))))
    finally:
        ver.close()
    return [{**out[i], "config": c} for i, c in enumerate(configs)]


def split_runs(trace, catalog, profile, window_s: float, configs: list, k: int,
               workers: int) -> list[list[dict]]:
    """The exhaustive runs of each GPU of an even ``k``-way split of the requests (GPU j
    takes every k-th request; every GPU serves every adapter): the multi-GPU reference."""
    return [exhaustive_runs(trace.iloc[j::k].reset_index(drop=True), catalog, profile,
                            window_s, configs, workers) for j in range(k)]


def split_feasible(per_gpu: list[list[dict]], slo: dict) -> bool:
    """Does every GPU of a split meet ``slo`` in some configuration of the space?"""
    return all(exhaustive_best(runs, slo)[0] is not None for runs in per_gpu)


def min_gpus_even_split(trace, catalog, profile, window_s: float, configs: list, slo: dict,
                        k_rec: int, workers: int) -> int:
    """The fewest GPUs in 3..``k_rec``-1 whose even split meets ``slo``; ``k_rec`` when none
    does (called only when neither one GPU nor the 2-way split meets it)."""
    for k in range(3, k_rec):
        if split_feasible(split_runs(trace, catalog, profile, window_s, configs, k, workers),
                          slo):
            return k
    return k_rec


def _pred_pairs(runs: list[dict], model: Recommender, wf: dict, profile, base) -> list[dict]:
    """The model's p99 predictions for each run's own configuration (the latency knobs
    reach it through the queueing features) against every run that keeps up."""
    up = [r for r in runs if keeps_up(r)]
    if not up:
        return []
    pred = config_table(model, wf, [r["config"] for r in up], profile)
    rows = []
    for i, r in enumerate(up):
        c = r["config"]
        base_knobs = at_base_latency_knobs(c, base)
        for m in ("ttft_p99", "tpot_p99"):
            rows.append({"max_loras": c.max_loras, "metric": m, "base_knobs": base_knobs,
                         "predicted": float(pred.at[i, f"pred_{m}"]), "twin": float(r[m])})
    return rows


def _rec_outcome(rec, pl) -> dict:
    """What score_case needs of a recommendation (and of its placement when refused)."""
    if rec.ok:
        return {"ok": True, "gpus": 1, **{k: rec.verified[k] for k in (
            "goodput", "ttft_p99", "tpot_p99", "starving", "full")}}
    return {"ok": False, "gpus": len(pl.gpus) if pl is not None and pl.ok else None}


def evaluate_workload(spec: WorkloadSpec, model: Recommender, profile, *, window_s: float,
                      knobs, workers: int, model_path: Path | None = None,
                      max_gpus: int = MAX_GPUS, log=None) -> tuple[list[dict], list[dict]]:
    """The exhaustive runs of one workload, then each SLO level's recommendation scored
    against them. Returns (case rows, model-vs-twin pairs)."""
    log = log or _say
    base = paper_base()
    trace, catalog = spec.build()
    trace = crop_window(trace, window_s)
    wf = workload_features(trace, catalog, window_s)
    max_rank = catalog_max_rank(catalog, base.max_lora_rank)
    configs = space_configs(int(wf["n_adapters"]), max_rank, base, profile, knobs)
    t0 = time.perf_counter()
    runs = exhaustive_runs(trace, catalog, profile, window_s, configs, workers)
    split = split_runs(trace, catalog, profile, window_s, configs, 2, workers)
    ex_s = time.perf_counter() - t0
    cases = []
    for level, slo in slo_levels(runs, split).items():
        t0 = time.perf_counter()
        m = Recommender.load(model_path) if model_path else model
        rec = recommend(trace, catalog, profile=profile, model=m, base=base,
                        objective="goodput", slo=slo, window_s=window_s, workers=workers,
                        knobs=knobs)
        e2e = time.perf_counter() - t0
        pl = None
        if not rec.ok:
            pl = place(trace, catalog, profile=profile, model=m, base=base, window_s=window_s,
                       objective="goodput", slo=slo, max_gpus=max_gpus, known=rec,
                       workers=workers, search_kw={"knobs": knobs})
        out = _rec_outcome(rec, pl)
        k_min, two = None, split_feasible(split, slo)
        if out["gpus"] is not None and out["gpus"] >= 3 and not two \
                and exhaustive_best(runs, slo)[0] is None:
            k_min = min_gpus_even_split(trace, catalog, profile, window_s, configs, slo,
                                        out["gpus"], workers)
        row = score_case(runs, slo, out, k_min, feasible_2gpu=two)
        row.update(workload=spec.describe(), level=level, slo_ttft_ms=slo["ttft"],
                   slo_tpot_ms=slo["tpot"], e2e_s=e2e, rec_runs=rec.runs,
                   place_s=pl.total_s if pl is not None else 0.0,
                   rec_config=_knob_text(rec.config),
                   exhaustive_runs=len(runs) + sum(len(g) for g in split),
                   exhaustive_s=ex_s,
                   exhaustive_config=_knob_text(row["exhaustive_config"]))
        cases.append(row)
        log(f"  {level:>6} ttft<={slo['ttft']:.0f} tpot<={slo['tpot']:.1f}: "
            f"{'feasible' if row['feasible'] else 'infeasible'} on 1 GPU; recommended "
            f"{row['rec_config'] or 'none'} ({row['rec_gpus']} GPU), gap "
            f"{row['gap_pct']:.2f}%, {rec.runs} runs, {e2e:.1f} s")
    return cases, _pred_pairs(runs, model, wf, profile, base)


def _say(line: str) -> None:
    print(line, flush=True)


def _knob_text(cfg) -> str | None:
    if cfg is None:
        return None
    return (f"max_loras={cfg.max_loras} max_num_batched_tokens={cfg.max_num_batched_tokens} "
            f"max_num_seqs={cfg.max_num_seqs}")


def slo_report(held_specs: list[WorkloadSpec], model: Recommender, profile, out: Path, *,
               window_s: float = SLO_WINDOW_S, n_workloads: int = SLO_WORKLOADS,
               knobs=SLO_KNOBS, workers: int = 2,
               model_path: Path | None = None, log=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole SLO evaluation: (case table, model-vs-twin pairs), also written to
    ``out/slo_cases.csv`` and ``out/slo_pred_pairs.csv``. ``knobs``: the knobs of the
    space searched exhaustively (:data:`SLO_KNOBS`)."""
    log = log or _say
    specs = pick_workloads(held_specs, n_workloads)
    cases, pairs = [], []
    for n, spec in enumerate(specs, 1):
        log(f"SLO evaluation {n}/{len(specs)}: {spec.describe()}")
        c, p = evaluate_workload(spec, model, profile, window_s=window_s, knobs=knobs,
                                 workers=workers, model_path=model_path, log=log)
        cases += c
        pairs += p
    out.mkdir(parents=True, exist_ok=True)
    cases_df = pd.DataFrame(cases)
    pairs_df = pd.DataFrame(pairs, columns=["max_loras", "metric", "base_knobs", "predicted",
                                            "twin"])
    cases_df.to_csv(out / "slo_cases.csv", index=False)
    pairs_df.to_csv(out / "slo_pred_pairs.csv", index=False)
    return cases_df, pairs_df

"""Recommend a serving configuration for one GPU: predicted, then verified by the twin.

:func:`recommend`

1. computes the trace's features and the candidate configurations (``max_loras`` over the
   slot grid up to the adapter count; ``max_cpu_loras`` = adapters served;
   ``max_lora_rank`` = the largest rank present; the rest from a base configuration),
   dropping those whose KV cache cannot hold ``max_model_len`` (vLLM would not start);
2. predicts every candidate (:mod:`twin.ml.recommender`) and picks the best one predicted
   not to starve;
3. verifies it with twin runs (:mod:`twin.ml.verify`) and refines it by a small local
   search over neighbouring ``max_loras`` values (the prediction and its upper neighbour
   first, in parallel, then the neighbours of the best verified point whose predicted score
   is close), so the answer is a configuration the twin has actually seen keep up.
4. declares a tie when verified configurations that keep up lie within the twin's own
   throughput error of the best (:func:`twin.ml.report.tie_band`): the report and
   ``recommendation.json`` name them all instead of presenting one as clearly best.

For the goodput objective (latency SLOs on p99 TTFT/TPOT) the model only places the
search: its features do not see ``max_num_batched_tokens`` or ``max_num_seqs``, and its
latency predictions can be far off under bursts. So after the ``max_loras`` search (a third
of the budget), a coordinate search (:func:`_knob_search`) moves one knob at a time
(``max_loras``, ``max_num_batched_tokens``, ``max_num_seqs``) a grid step up or down from
the best verified point, keeping a move when the twin run is better, until no move helps
or ``max_runs`` is spent; deterministic (the twin is, and the order is fixed). A
configuration is recommended only if its own twin run meets the SLOs on its p99s; else the
result says so (``ok`` False) with the best achievable percentiles and what bounds them
(:func:`twin.ml.report.slo_verdict`). ``max_cpu_loras`` stays at the adapters served (below
it every request of the others would wait for a CPU load: a different service), and
``gpu_memory_utilization`` at the base's. A black-box optimizer (Optuna TPE) would fit the
larger space; it is not a dependency, and the grid search is what runs.

What it returns, and its report, is :class:`twin.ml.report.Recommendation`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.costs.profile import Profile, load_profile
from twin.errors import TwinInputError
from twin.ml.dataset import TIE_TOL
from twin.ml.features import public, workload_features
from twin.ml.recommender import STARVING_P, Recommender, candidate_table, catalog_max_rank
from twin.ml.report import (Recommendation, declared_tie, latency_disagreements, slo_violation,
                            slo_verdict, tie_band)
from twin.ml.spec import paper_base
from twin.ml.sweep import EarlyExit
from twin.ml.verify import Verifier
from twin.results import crop_window
from twin.workload.catalog import AdapterCatalog

NEIGHBOUR_TOL = 0.02      # goodput: explore a neighbour predicted within 2 % of the best
DEFAULT_RUNS = {"throughput": 4, "goodput": 16}   # twin runs when max_runs is not given
#: The latency knobs the goodput search moves, with the values it tries (the base's own
#: value is added): chunk size of prefills per step, and how many requests run at once.
KNOB_GRID = {"max_num_batched_tokens": (2048, 4096, 8192, 16384),
             "max_num_seqs": (64, 128, 256, 512, 1024, 2048)}
_VERIFIED = ("throughput", "achieved", "goodput", "ttft_p50", "ttft_p99", "tpot_p50",
             "tpot_p99")


def prepare_inputs(trace, profile, model, base, window_s, catalog):
    """Defaults shared by recommend and place: the profile and model loaded, the paper's
    base config, the trace cut to its window, a catalog at the base rank if none given."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    model = model or Recommender.load()
    base = base or paper_base()
    window = _trace_window(trace, window_s)
    trace = crop_window(trace, window)
    if catalog is None:
        names = sorted(trace["adapter"].dropna().unique().tolist())
        catalog = AdapterCatalog.uniform(names, base.max_lora_rank)
    return profile, model, base, window, trace, catalog


def _trace_window(trace: pd.DataFrame, window_s: float | None) -> float:
    if window_s is not None:
        return float(window_s)
    return float(max(1.0, math.ceil(float(trace["arrival_s"].max())))) if len(trace) else 1.0


def recommend(trace: pd.DataFrame, catalog=None, *, profile=None, model: Recommender | None = None,
              base: ServingConfig | None = None, objective: str = "throughput",
              slo: dict | None = None, window_s: float | None = None,
              max_runs: int | None = None,
              workers: int = 2, early_exit: EarlyExit = EarlyExit(),
              verifier: Verifier | None = None) -> Recommendation:
    """The best non-starving configuration for ``trace``, predicted then verified by twin
    runs (at most ``max_runs``, default :data:`DEFAULT_RUNS`). ``objective``: 'throughput'
    or 'goodput' (tokens/s of requests meeting ``slo`` = {'ttft': ms, 'tpot': ms}; the pick
    must meet the SLOs on its own run's p99 TTFT/TPOT, else ``ok`` is False)."""
    t_start = time.perf_counter()
    if objective not in ("throughput", "goodput"):
        raise TwinInputError(f"objective must be throughput or goodput, got {objective!r}",
                             field="--objective")
    if objective == "goodput" and not slo:
        raise TwinInputError("the goodput objective needs --slo ttft=MS,tpot=MS",
                             field="--slo")
    if max_runs is None:
        max_runs = DEFAULT_RUNS[objective]
    profile, model, base, window, trace, catalog = prepare_inputs(
        trace, profile, model, base, window_s, catalog)
    if not len(catalog):
        raise TwinInputError("the trace names no adapter: nothing to recommend for LoRA "
                             "serving", field="adapter")
    warnings = [w for w in [model.profile_warning(profile)] if w]
    wf = workload_features(trace, catalog, window)
    max_rank = catalog_max_rank(catalog, base.max_lora_rank)
    t0 = time.perf_counter()
    cand = candidate_table(model, wf, base, profile, max_rank)
    score = _pred_score(cand, objective, slo)
    predict_ms = 1000 * (time.perf_counter() - t0)
    start = _predicted_best(cand, score)
    own = verifier is None
    ver = verifier or Verifier(trace, catalog, profile, window, slo, early_exit, workers)
    key = "goodput" if objective == "goodput" else "throughput"
    goodput_search = objective == "goodput"
    try:
        first = max(2, max_runs // 3) if goodput_search else max_runs
        results = _search(cand, score, start, ver, min(first, max_runs), objective, key)
        if goodput_search:
            cand = _knob_search(cand, results, ver, max_runs, slo)
    finally:
        if own:
            ver.close()
    _record_verified(cand, results)
    good = [i for i, r in results.items() if r["starts"] and not r["starving"]]
    verdict = disagree = None
    if goodput_search:
        met = [i for i in good if r_full(results[i]) and slo_violation(results[i], slo) <= 1]
        disagree = latency_disagreements(cand, model)
        verdict = slo_verdict(cand, results, slo, met, KNOB_ORDER)
        good = met
    best = _best(results, good, key) if good else None
    tie = None
    if best is not None and not goodput_search:   # verified points the twin's own error
        # cannot rank: named, not hidden
        band, source = tie_band(profile)
        tie = declared_tie({int(cand.at[i, "max_loras"]): results[i][key] for i in good},
                           band, source, picked=cand.at[best, "max_loras"])
    pr = cand.iloc[start]
    return Recommendation(
        config=cand.at[best, "_config"] if best is not None else None, ok=best is not None,
        objective=objective, slo=slo, workload=public(wf), candidates=cand,
        predicted=_predicted(pr), verified=results[best] if best is not None else None,
        predicted_config=pr["_config"], runs=len(results), predict_ms=predict_ms,
        total_s=time.perf_counter() - t_start, window_s=window, warnings=warnings, tie=tie,
        slo_verdict=verdict, disagreements=disagree)


def r_full(r: dict) -> bool:
    """A run that simulated the whole window (the early exit's probe has no p99 to judge)."""
    return bool(r.get("full", False))


KNOB_ORDER = ("max_loras", *KNOB_GRID)


def _knob_values(cand: pd.DataFrame, knob: str, current) -> list:
    vals = (sorted(cand["max_loras"].astype(int).unique()) if knob == "max_loras"
            else sorted(set(KNOB_GRID[knob]) | {int(current)}))
    return vals


def _point(cfg: ServingConfig) -> tuple:
    return tuple(int(getattr(cfg, k)) for k in KNOB_ORDER)


def _knob_search(cand: pd.DataFrame, results: dict[int, dict], ver: Verifier, max_runs: int,
                 slo: dict) -> pd.DataFrame:
    """Coordinate search for the goodput objective, from the best verified point of the
    ``max_loras`` search: for each knob of :data:`KNOB_ORDER` in turn, the neighbouring
    grid values (one step down and up, run together), moving on while a step is better
    (:func:`_slo_rank`); passes until a whole pass moves nothing or ``max_runs`` twin runs
    are spent. New configurations are appended to ``cand`` (their model predictions empty:
    the model does not see these knobs); ``results`` is filled in place. Returns ``cand``."""
    cand = cand.copy()
    if "search" not in cand.columns:
        cand["search"] = "max_loras"
    for k in KNOB_GRID:
        cand[k] = [int(getattr(c, k)) for c in cand["_config"]]
    cand["pred_ok"] = cand["pred_ok"].astype(object)   # None for the model-blind rows
    index = {_point(c): i for i, c in cand["_config"].items()}
    budget = lambda: max_runs - len(results)   # noqa: E731

    def row(base_i: int, knob: str, value) -> int:
        cfg = cand.at[base_i, "_config"].replace(**{knob: int(value)})
        if knob == "max_loras":   # the candidate row of that slot count, with these knobs
            src = int(cand.index[(cand["max_loras"] == value)
                                 & (cand["search"] == "max_loras")][0])
            cfg = cand.at[src, "_config"].replace(
                **{k: getattr(cfg, k) for k in KNOB_GRID})
        else:
            src = base_i
        p = _point(cfg)
        if p not in index:
            r = cand.loc[src].copy()   # the workload and slot features; no prediction
            for c in [c for c in cand.columns if c.startswith("pred_")]:
                r[c] = None if c == "pred_ok" else np.nan
            r["_config"], r["search"] = cfg, "knobs"
            r["max_loras"] = float(cfg.max_loras)
            for k in KNOB_GRID:
                r[k] = int(getattr(cfg, k))
            i = len(cand)
            cand.loc[i] = r
            index[p] = i
        return index[p]

    def best() -> int | None:
        started = [i for i, r in results.items() if r["starts"]]
        return max(started, key=lambda i: (_slo_rank(results[i], slo), -i)) if started else None

    def rank(i: int) -> tuple:
        return _slo_rank(results[i], slo)

    def walk(knob: str) -> None:
        """From the best point, both directions of ``knob``'s grid, one step a time (the
        two first steps run together), on along a direction while its step is no worse
        (plateaus are crossed: a knob often does nothing until it binds)."""
        fronts = {d: best() for d in (-1, 1)}
        while fronts and budget() > 0:
            steps = {}
            for d, f in fronts.items():
                cur = int(getattr(cand.at[f, "_config"], knob))
                vals = _knob_values(cand, knob, cur)
                j = vals.index(cur) + d
                if 0 <= j < len(vals):
                    steps[d] = row(f, knob, vals[j])
            todo = [i for i in dict.fromkeys(steps.values()) if i not in results][:budget()]
            for i, out in ver.run([(i, cand.at[i, "_config"]) for i in todo]):
                results[i] = out
            fronts = {d: i for d, i in steps.items() if i in results and rank(i)[0] > 0
                      and rank(i) >= rank(fronts[d])}

    if best() is None:
        return cand
    moved = True
    while moved and budget() > 0:
        start = best()
        for knob in KNOB_ORDER:
            walk(knob)
        moved = best() != start
    return cand


def _slo_rank(r: dict, slo: dict) -> tuple:
    """How good a twin run is for the goodput objective, larger is better: one that does
    not start or keeps not up < one that misses the SLOs (less violation better) < one that
    meets them (more goodput better, then lower p99 TTFT)."""
    if not r["starts"] or r["starving"] or not r_full(r):
        return (0, 0.0, 0.0)
    v = slo_violation(r, slo)
    if v > 1:
        return (1, -v, 0.0)
    return (2, float(r["goodput"]), -_nan_inf(r.get("ttft_p99")))


def _search(cand: pd.DataFrame, score: np.ndarray, start: int, ver: Verifier, max_runs: int,
            objective: str, key: str) -> dict[int, dict]:
    """Twin runs from the predicted best ``start`` (with its upper neighbour, in parallel),
    then the neighbours of the best verified point worth a run (:func:`_promising`), or, while
    none keeps up, the candidates least likely to starve; at most ``max_runs``. Returns
    {candidate index: the run's figures}."""
    results: dict[int, dict] = {}

    def run(idxs):
        idxs = [i for i in dict.fromkeys(idxs) if 0 <= i < len(cand) and i not in results]
        idxs = idxs[:max(0, max_runs - len(results))]
        for i, out in ver.run([(i, cand.at[i, "_config"]) for i in idxs]):
            results[i] = out
        return bool(idxs)

    n = len(cand)
    first = [start, start + 1] if start + 1 < n else [start, start - 1]
    run(first)
    while len(results) < max_runs:
        good = [i for i, r in results.items() if r["starts"] and not r["starving"]]
        if not good:
            rest = [i for i in range(n) if i not in results]
            # least likely to starve first; ties to more slots
            rest.sort(key=lambda i: (cand.at[i, "pred_p_starve"] >= STARVING_P,
                                     -cand.at[i, "pred_achieved"], -i))
            nxt = rest[:2]
        else:
            b = _best(results, good, key)
            nxt = [j for j in (b - 1, b + 1) if 0 <= j < n and j not in results
                   and _promising(cand, score, results, b, j, objective)]
        if not nxt or not run(nxt):
            break
    return results


def _record_verified(cand: pd.DataFrame, results: dict[int, dict]) -> None:
    """The twin runs' figures as the candidates' ``ver_*`` columns (empty where not run)."""
    for col in ("ver_starts", "ver_starving", *(f"ver_{k}" for k in _VERIFIED)):
        cand[col] = np.nan
    cand["ver_starts"] = cand["ver_starts"].astype(object)
    cand["ver_starving"] = cand["ver_starving"].astype(object)
    for i, r in results.items():
        cand.at[i, "ver_starts"] = r["starts"]
        cand.at[i, "ver_starving"] = r["starving"]
        for k in _VERIFIED:
            cand.at[i, f"ver_{k}"] = r.get(k, np.nan)


def _predicted(pr: pd.Series) -> dict:
    """The predicted best candidate's figures (the report's "predicted" line)."""
    return {"max_loras": int(pr["max_loras"]), "throughput": float(pr["pred_throughput"]),
            "achieved": float(pr["pred_achieved"]), "p_starve": float(pr["pred_p_starve"]),
            "ttft_p50": float(pr["pred_ttft_p50"]), "ttft_p99": float(pr["pred_ttft_p99"]),
            "tpot_p50": float(pr["pred_tpot_p50"]), "tpot_p99": float(pr["pred_tpot_p99"])}


def _pred_score(c: pd.DataFrame, objective: str, slo: dict | None) -> np.ndarray:
    """Each candidate's predicted objective: its throughput, halved for goodput where an
    SLO's predicted p99 is missed."""
    score = c["pred_throughput"].to_numpy().copy()
    if objective == "goodput" and slo:
        meets = np.ones(len(c), dtype=bool)
        if slo.get("ttft"):
            meets &= c["pred_ttft_p99"].to_numpy() <= slo["ttft"]
        if slo.get("tpot"):
            meets &= c["pred_tpot_p99"].to_numpy() <= slo["tpot"]
        score = np.where(meets, score, 0.5 * score)
    return score


def _predicted_best(cand: pd.DataFrame, score: np.ndarray) -> int:
    """The candidate to verify first: among those predicted to keep up, the highest
    predicted score, ties (within ``TIE_TOL``) to the lowest predicted p99 TTFT; if none is
    predicted to keep up, the least likely to starve."""
    ok = np.flatnonzero(cand["pred_ok"].to_numpy())
    if not len(ok):
        return int(np.argmin(cand["pred_p_starve"].to_numpy()))
    top = score[ok].max()
    near = ok[score[ok] >= top * (1 - TIE_TOL)]
    return int(near[np.argmin(cand["pred_ttft_p99"].to_numpy()[near])])


def _best(results: dict, good: list, key: str) -> int:
    """The best verified point: the highest objective; among points within
    ``TIE_TOL`` of it, the lowest p99 TTFT (then fewer slots)."""
    top = max(results[i][key] for i in good)
    near = [i for i in good if results[i][key] >= top * (1 - TIE_TOL)]
    return min(near, key=lambda i: (_nan_inf(results[i].get("ttft_p99")), i))


def _nan_inf(x) -> float:
    return float("inf") if x is None or not np.isfinite(x) else float(x)


def _promising(cand, score, results, b: int, j: int, objective: str) -> bool:
    """Is neighbour ``j`` of the best verified point ``b`` worth a twin run? For
    throughput: when predicted to beat b's verified achieved share by more than the tie
    tolerance (a point near 100 % cannot be beaten), or when b's TTFT could improve
    (j has more slots and is predicted to keep up). For goodput: when its predicted score
    is within ``NEIGHBOUR_TOL`` of b's."""
    if objective == "goodput":
        return bool(score[j] >= score[b] * (1 - NEIGHBOUR_TOL))
    gain = cand.at[j, "pred_achieved"] - results[b]["achieved"]
    if gain > TIE_TOL:
        return True
    return bool(j > b and cand.at[j, "pred_ok"] and results[b]["achieved"] < 0.97)

"""Recommend a serving configuration for one GPU: predicted, then verified by the twin.

:func:`recommend`

1. computes the trace's features and the candidate configurations (``max_loras`` over the
   slot grid up to the adapter count; ``max_cpu_loras`` = adapters served;
   ``max_lora_rank`` = the largest rank present; the rest from a base configuration),
   dropping those whose KV cache cannot hold ``max_model_len`` (vLLM would not start);
2. predicts every candidate (:mod:`twin.ml.recommender`) and picks the best one predicted
   not to starve;
3. verifies it with twin runs (:mod:`twin.ml.verify`, with the base's
   ``enable_prefix_caching``: for a trace with ``hash_ids`` the runs reuse cached prefixes,
   which the model does not see -- :mod:`twin.ml.prefix_info`) and refines it by a small local
   search over neighbouring ``max_loras`` values (the prediction and its upper neighbour
   first, in parallel, then the neighbours of the best verified point whose predicted score
   is close), so the answer is a configuration the twin has actually seen keep up.
4. declares a tie when verified configurations that keep up lie within the twin's own
   throughput error of the best (:func:`twin.ml.ties.tie_band`): the report and
   ``recommendation.json`` name them all instead of presenting one as clearly best.

For the goodput objective (latency SLOs on p99 TTFT/TPOT) the model only places the
search: its features do not see ``max_num_batched_tokens``, ``max_num_seqs`` or
``max_cpu_loras``, and its latency predictions can be far off under bursts. After the
``max_loras`` search (a third of the budget), the rest of ``max_runs`` goes to a search over
the enlarged space of :mod:`twin.ml.search_space` (``max_loras``, ``max_cpu_loras``,
``max_lora_rank`` padding, ``max_num_batched_tokens``, ``max_num_seqs``,
``gpu_memory_utilization``) by :func:`twin.ml.optimize.optimize`: exhaustive when the space
fits the budget, else Optuna TPE (seeded; the model's best predicted configurations over
what it sees -- slots, padded rank, KV capacity -- enqueued first) when Optuna is installed,
else a deterministic coordinate walk (:func:`twin.ml.trials.coordinate_search`). Every trial
is a twin run. A configuration is recommended only if its own twin run meets the SLOs on
its p99s; else the result says so (``ok`` False) with the best achievable percentiles and
what bounds them (:func:`twin.ml.report.slo_verdict`). A goodput search's twin run stops
once proven to miss the SLOs (:mod:`twin.ml.slo_stop`, reported as such); when none meets
them, the stopped runs nearest to them are run again in full
(:func:`twin.ml.trials.full_reruns`), so the best achievable p99s are full runs' figures.
The model's explanation of its pick (which features drove it:
:func:`twin.ml.explain.explain`) is kept in the result.

What it returns, and its report, is :class:`twin.ml.report.Recommendation`.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from twin.argtypes import is_positive_number
from twin.config import ServingConfig
from twin.errors import TwinInputError
from twin.ml.dataset import TIE_TOL
from twin.ml.explain import explain
from twin.ml.features import public, workload_features
from twin.ml.inputs import prepare_inputs, short_window_warning, verification_window
from twin.ml.recommender import STARVING_P, Recommender, candidate_table, catalog_max_rank
from twin.ml.optimize import exhaustive_over_budget, optimize
from twin.ml.queueing import tpot_floor_ms
from twin.ml.prefix_info import prefix_info, unaware_warning, with_verified
from twin.ml.report import Recommendation, latency_disagreements, slo_violation
from twin.ml.search_space import SearchSpace, search_space
from twin.ml.ties import declared_tie, tie_band
from twin.ml.slo_verdict import slo_verdict
from twin.ml.sweep import EarlyExit
from twin.ml.trials import (FIRST_MET, Trials, any_met, full_reruns, nan_inf, r_full,
                            run_batches)
from twin.ml.verify import Verifier
from twin.results.extrapolation import describe

NEIGHBOUR_TOL = 0.02      # goodput: explore a neighbour predicted within 2 % of the best
DEFAULT_RUNS = {"throughput": 4, "goodput": 16}   # twin runs when max_runs is not given
PRIOR_TRIALS = 3          # the model's best predicted configurations enqueued for TPE
_VERIFIED = ("throughput", "achieved", "goodput", "ttft_p50", "ttft_p99", "tpot_p50",
             "tpot_p99")


def _warnings(model, profile, prefix, window: float | None) -> list[str]:
    """What a recommendation warns of: a profile unlike the model's, a prefix-caching trace
    the model does not see, a short window."""
    return [w for w in (model.profile_warning(profile), unaware_warning(prefix),
                        short_window_warning(window)) if w]


def recommend(trace: pd.DataFrame, catalog=None, *, profile=None, model: Recommender | None = None,
              base: ServingConfig | None = None, objective: str = "throughput",
              slo: dict | None = None, window_s: float | None = None, max_runs: int | None = None,
              workers: int = 2, early_exit: EarlyExit = EarlyExit(),
              verifier: Verifier | None = None, space: SearchSpace | None = None,
              optimizer: str = "auto", seed: int = 0, study_db: str | None = None,
              knobs=None, first_met: bool = False, to_completion: bool | None = None
              ) -> Recommendation:
    """The best non-starving configuration for ``trace``, predicted then verified by twin
    runs (``max_runs``, default :data:`DEFAULT_RUNS`; + reruns). ``objective``: 'throughput'
    or 'goodput' (tokens/s of requests meeting ``slo`` = {'ttft': ms, 'tpot': ms}; the pick
    must meet the SLOs on its own run's p99 TTFT/TPOT, else ``ok`` is False). Goodput only:
    ``space`` (default :func:`twin.ml.search_space.search_space`'s), ``optimizer`` ('auto',
    'tpe', 'coordinate', 'exhaustive': :mod:`twin.ml.optimize`), ``seed`` (TPE's) and
    ``study_db`` (an SQLite file: a resumable Optuna study); ``knobs``: search only these
    (default all of :data:`twin.ml.search_space.KNOBS`; ignored when ``space`` is given).
    A trace with ``hash_ids``: see :mod:`twin.ml.prefix_info` (``prefix``, a warning).
    ``first_met``: stop at the first run meeting the SLOs (:func:`twin.ml.placement.place`).
    ``to_completion``: twin runs to the last request, not over the window (default:
    :func:`twin.ml.inputs.runs_to_completion`: a short trace given no window)."""
    t_start = time.perf_counter()
    check_objective(objective, slo)
    _check_counts(max_runs=max_runs, workers=workers, window_s=window_s)
    max_runs = DEFAULT_RUNS[objective] if max_runs is None else max_runs
    profile, model, base, window, trace, catalog = prepare_inputs(
        trace, profile, model, base, window_s, catalog)
    if not len(catalog):
        raise TwinInputError("the trace names no adapter: nothing to recommend for LoRA "
                             "serving", field="adapter")
    run_window = verification_window(window, window_s, to_completion)   # None: to the end
    prefix = prefix_info(trace, base)
    warnings = _warnings(model, profile, prefix, run_window)
    wf = workload_features(trace, catalog, window)
    max_rank = catalog_max_rank(catalog, base.max_lora_rank)
    t0 = time.perf_counter()
    cand = candidate_table(model, wf, base, profile, max_rank)
    score = _pred_score(cand, objective, slo)
    predict_ms = 1000 * (time.perf_counter() - t0)
    start = _predicted_best(cand, score)
    own = verifier is None
    key = "goodput" if objective == "goodput" else "throughput"
    goodput_search = objective == "goodput"
    if goodput_search:   # an exhaustive search too large is refused before any twin run
        space = _space(space, len(catalog), max_rank, base, objective, knobs, optimizer, max_runs)
    ver = verifier or Verifier(trace, catalog, profile, run_window, slo, early_exit, workers,
                               slo_stop=goodput_search)   # a stopped run has no throughput
    search = verdict = disagree = None
    try:
        first = max(2, max_runs // 3) if goodput_search else max_runs
        results = _search(cand, score, start, ver, min(first, max_runs), objective, key,
                          slo if first_met else None)
        if goodput_search:
            T = Trials(cand, results, space, ver, max_runs, profile,
                       done=(lambda: any_met(results, slo)) if first_met else None)
            search = _slo_search(T, trace, model, wf, max_rank, slo, window, workers,
                                 optimizer=optimizer, seed=seed, study_db=study_db)
            cand = T.cand
    finally:
        if own:
            ver.close()
    _record_verified(cand, results)
    good = [i for i, r in results.items() if r["starts"] and not r["starving"]]
    if goodput_search:
        good, disagree, verdict = _slo_outcome(cand, results, good, slo, space.knobs, model,
                                               tpot_floor_ms(profile))
    best = best_verified(results, good, key) if good else None
    if best is not None and results[best].get("extrapolated"):
        warnings.append(describe(results[best]["extrapolated"]))
    tie = (_declared_tie(profile, cand, results, good, best, key)
           if best is not None and not goodput_search else None)
    pr = cand.iloc[start]
    return Recommendation(
        config=cand.at[best, "_config"] if best is not None else None, ok=best is not None,
        objective=objective, slo=slo, workload=public(wf), candidates=cand,
        predicted=_predicted(pr), verified=results[best] if best is not None else None,
        predicted_config=pr["_config"], runs=len(results), predict_ms=predict_ms,
        total_s=time.perf_counter() - t_start, window_s=window, to_completion=run_window is None,
        warnings=warnings, tie=tie, slo_verdict=verdict, disagreements=disagree, search=search,
        explanation=explain(model, cand.iloc[start]), prefix=with_verified(prefix, results, best))


def _space(space, n_adapters: int, max_rank: int, base, objective: str, knobs, optimizer: str,
           max_runs: int) -> SearchSpace:
    """The goodput search's space (given, else :func:`search_space`'s); with ``--optimizer
    exhaustive`` one larger than ``max_runs`` is refused here, before the ``max_loras`` walk's
    runs (``twin.ml.optimize.choose`` refuses it there too, counting the runs made)."""
    space = space or search_space(n_adapters, max_rank, base, objective, knobs)
    if optimizer == "exhaustive" and space.size() > max_runs:
        raise exhaustive_over_budget(space.size(), max_runs)
    return space


def _slo_outcome(cand: pd.DataFrame, results: dict, good: list, slo: dict, knobs, model,
                 floor_ms: float):
    """The goodput objective's outcome: the runs meeting the SLOs in full (the pick's
    candidates), the model-vs-twin latency disagreements and the verdict on the SLOs
    (``floor_ms``: the TPOT no configuration on any number of these GPUs goes under)."""
    met = [i for i in good if r_full(results[i]) and slo_violation(results[i], slo) <= 1]
    return met, latency_disagreements(cand, model), slo_verdict(
        cand, results, slo, met, knobs, tpot_floor_ms=floor_ms)


def _slo_search(T: Trials, trace, model, wf, max_rank: int, slo: dict, window: float,
                workers: int, **opt) -> dict:
    """The search over the enlarged space (:func:`twin.ml.optimize.optimize`, the model's
    best predictions its prior), unless ``T`` is done already (``first_met``); then the
    full reruns of stopped runs when none met the SLOs. Returns the search's record."""
    if T.done is not None and T.done():
        search = FIRST_MET.copy()
    else:
        space, profile = T.space, T.profile
        prior = _prior(model, wf, space, profile, max_rank, slo)
        ident = (int(pd.util.hash_pandas_object(trace, index=False).sum()), slo,
                 space.to_dict(), profile.name, window)   # what a stored study is of
        search = optimize(T, slo, prior=prior, study_key=ident, workers=workers, **opt)
    search.update(reruns=full_reruns(T, slo, max(1, workers)))
    search.update(space=T.space.to_dict(), trials=T.records())
    return search


def check_objective(objective: str, slo: dict | None, gpu_price=None, *,
                    allowed=("throughput", "goodput"), slo_ranks: bool = False) -> None:
    """The objective and what it takes: goodput and cost need an SLO, only cost a GPU price
    (it would be ignored without a word). The throughput objective takes an SLO in the API
    (each run's goodput is reported beside its throughput) but not from `twin recommend`,
    whose report ranks and shows throughput only (``slo_ranks``: an SLO must rank). ``allowed``:
    the API's recommend() ranks by throughput or goodput; `twin recommend` adds cost."""
    if objective not in allowed:
        raise TwinInputError(f"objective must be one of {', '.join(allowed)}, got "
                             f"{objective!r}", field="--objective")
    if gpu_price is not None and objective != "cost":
        raise TwinInputError("--gpu-price applies to --objective cost only; the "
                             f"{objective} objective would ignore it", field="--gpu-price")
    if slo_ranks and objective == "throughput" and slo:
        raise TwinInputError("--slo applies to --objective goodput or cost; the throughput "
                             "objective would ignore it", field="--slo")
    if objective != "throughput" and not slo:
        raise TwinInputError(f"the {objective} objective needs --slo ttft=MS,tpot=MS",
                             field="--slo")
    if slo is not None:
        check_slo(slo)


def _check_counts(**counts) -> None:
    """The API's counts (the CLI's flags check their own): each None or > 0, and the runs
    and workers whole numbers (a slice of 1.5 runs is no count)."""
    for name, v in counts.items():
        whole = name != "window_s"
        if v is not None and (not is_positive_number(v) or whole and v != int(v)):
            raise TwinInputError(f"must be {'a whole number ' if whole else ''}> 0, got {v!r}",
                                 field=name)


def check_slo(slo) -> None:
    """Refuse SLOs the searches would misread: not a dict of ``ttft`` / ``tpot`` p99s in ms,
    each a finite number > 0 (a 0 read as "no SLO" and the pick was reported as meeting
    it)."""
    if not isinstance(slo, dict) or not slo or not set(slo) <= {"ttft", "tpot"}:
        raise TwinInputError(f"slo must be a dict of p99 limits in ms, e.g. {{'ttft': 2000, "
                             f"'tpot': 100}}; got {slo!r}", field="--slo")
    for k, v in slo.items():
        if not is_positive_number(v):
            raise TwinInputError(f"slo {k} must be a number of ms > 0, got {v!r}",
                                 field="--slo")


def _prior(model, wf, space: SearchSpace, profile, max_rank: int, slo: dict) -> list:
    """The model's best predicted configurations over what it sees (``max_loras``, the
    padded rank, the KV capacity that ``gpu_memory_utilization`` sets), the latency knobs
    at the base's values: TPE's first trials (:data:`PRIOR_TRIALS`)."""
    rows = []
    for rank in space.grids["max_lora_rank"]:
        for u in space.grids["gpu_memory_utilization"]:
            try:
                c = candidate_table(model, wf, space.base.replace(gpu_memory_utilization=u),
                                    profile, rank)
            except TwinInputError:   # nothing starts at this rank and memory share
                continue
            c["score"] = _pred_score(c, "goodput", slo)
            rows.append(c)
    if not rows:
        return []
    c = pd.concat(rows, ignore_index=True)
    c = c[c["pred_ok"].astype(bool)] if c["pred_ok"].astype(bool).any() else c
    c = c.sort_values(["score", "pred_ttft_p99"], ascending=[False, True], kind="stable")
    return [space.config(space.point(cfg)) for cfg in c["_config"].head(PRIOR_TRIALS)]


def _search(cand: pd.DataFrame, score: np.ndarray, start: int, ver: Verifier, max_runs: int,
            objective: str, key: str, met_slo: dict | None = None) -> dict[int, dict]:
    """Twin runs from the predicted best ``start`` (with its upper neighbour, in parallel),
    then the neighbours of the best verified point worth a run (:func:`_promising`), or, while
    none keeps up, the candidates least likely to starve; at most ``max_runs``, and none
    once a run meets ``met_slo`` (``first_met``). Returns {candidate index: the run's
    figures}."""
    results: dict[int, dict] = {}

    def run(idxs):
        if met_slo and any_met(results, met_slo):
            return False
        idxs = [i for i in dict.fromkeys(idxs) if 0 <= i < len(cand) and i not in results]
        idxs = idxs[:max(0, max_runs - len(results))]
        # first_met: a batch of workers at a time (idxs holds two at most: one batch unless
        # one worker), none after the first run meeting the SLO
        done = (lambda: any_met(results, met_slo)) if met_slo else None
        run_batches(ver, idxs, lambda i: cand.at[i, "_config"], results, done)
        return bool(idxs)

    n = len(cand)
    first = [start, start + 1] if start + 1 < n else [start, start - 1]
    run(first)
    while len(results) < max_runs:
        # a run stopped once proven to miss the SLOs has starving None (not known)
        good = [i for i, r in results.items() if r["starts"] and not r["starving"]]
        if not good:
            rest = [i for i in range(n) if i not in results]
            # least likely to starve first; ties to more slots
            rest.sort(key=lambda i: (cand.at[i, "pred_p_starve"] >= STARVING_P,
                                     -cand.at[i, "pred_achieved"], -i))
            nxt = rest[:2]
        else:
            b = _walk_base(results, good, key)
            nxt = [j for j in (b - 1, b + 1) if 0 <= j < n and j not in results
                   and _promising(cand, score, results, b, j, objective)]
        if not nxt or not run(nxt):
            break
    return results


def _walk_base(results: dict[int, dict], good: list, key: str) -> int:
    """The run the ``max_loras`` walk goes on from: the best verified full run. A run
    stopped once proven to miss the SLOs by 2x counts as missing them, below every full
    run, whatever the goodput it proved so far: only when all of ``good`` were stopped, the
    one proven to miss them least."""
    full = [i for i in good if not results[i].get("slo_violated_early")]
    if full:
        return best_verified(results, full, key)
    return min(good, key=lambda i: (results[i]["slo_violation_lower_bound"], i))


def _declared_tie(profile, cand: pd.DataFrame, results: dict, good: list, best, key: str):
    """The verified configurations the twin's own error cannot rank against the pick:
    named, not hidden (:func:`twin.ml.ties.declared_tie`)."""
    band, source = tie_band(profile)
    return declared_tie({int(cand.at[i, "max_loras"]): results[i][key] for i in good},
                        band, source, picked=cand.at[best, "max_loras"],
                        ttft_p99={int(cand.at[i, "max_loras"]): results[i].get("ttft_p99")
                                  for i in good})


def _record_verified(cand: pd.DataFrame, results: dict[int, dict]) -> None:
    """The twin runs' figures as the candidates' ``ver_*`` columns (empty where not run).
    ``ver_full`` False: the run did not simulate the window (the early exit's probe of a
    clearly starving run, or a run stopped once it missed the SLOs), ``ver_simulated_s``
    what it did simulate: its figures are that span's, not the window's."""
    for col in ("ver_starts", "ver_starving", *(f"ver_{k}" for k in _VERIFIED),
                "ver_simulated_s"):
        cand[col] = np.nan
    for col in ("ver_starts", "ver_starving", "ver_full"):
        cand[col] = pd.Series([None] * len(cand), index=cand.index, dtype=object)
    cand["ver_slo_proven"] = None
    for i, r in results.items():
        cand.at[i, "ver_slo_proven"] = r.get("slo_proven")
        cand.at[i, "ver_starts"] = r["starts"]
        cand.at[i, "ver_starving"] = r["starving"]
        if r["starts"]:
            cand.at[i, "ver_full"] = bool(r.get("full", False))
            cand.at[i, "ver_simulated_s"] = r.get("simulated_s", r.get("stopped_s", np.nan))
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


def best_verified(results: dict, good: list, key: str) -> int:
    """The best verified point: the highest objective; among points within
    ``TIE_TOL`` of it, the lowest p99 TTFT (then fewer slots)."""
    top = max(results[i][key] for i in good)
    near = [i for i in good if results[i][key] >= top * (1 - TIE_TOL)]
    return min(near, key=lambda i: (nan_inf(results[i].get("ttft_p99")), i))


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

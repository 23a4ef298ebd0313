"""The twin runs of one recommendation's search, over a :class:`~twin.ml.search_space.
SearchSpace`: the candidate table grown by every configuration run, the runs' figures, the
budget, and how good a run is for the SLO objectives (:func:`slo_rank`, :func:`slo_value`).

Every search (the ``max_loras`` walk of :mod:`twin.ml.recommend`, the coordinate walk
:func:`coordinate_search`, Optuna's TPE in :mod:`twin.ml.optimize`, the exhaustive walk)
adds its configurations through :meth:`Trials.row` and runs them through
:meth:`Trials.run`: one table, one budget, each configuration run once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.ml.report import slo_violation
from twin.ml.search_space import KNOBS, SearchSpace
from twin.ml.slo_stop import might_beat


def r_full(r: dict) -> bool:
    """A run that simulated the whole window (the early exit's probe has no p99 to judge)."""
    return bool(r.get("full", False))


def nan_inf(x) -> float:
    return float("inf") if x is None or not np.isfinite(x) else float(x)


def slo_rank(r: dict, slo: dict) -> tuple:
    """How good a twin run is for the goodput objective, larger is better: one that does
    not start or keeps not up < one that misses the SLOs (less violation better) < one that
    meets them (more goodput better, then lower p99 TTFT). A run stopped once proven to
    miss them (:mod:`twin.ml.slo_stop`) ranks with the misses by its proven lower bound
    (``slo_violation_lower_bound``: it misses by at least that)."""
    if not r["starts"] or r["starving"]:
        return (0, 0.0, 0.0)
    if r.get("slo_violated_early"):
        return (1, -float(r["slo_violation_lower_bound"]), 0.0)
    if not r_full(r):
        return (0, 0.0, 0.0)
    v = slo_violation(r, slo)
    if v > 1:
        return (1, -v, 0.0)
    return (2, float(r["goodput"]), -nan_inf(r.get("ttft_p99")))


def slo_value(r: dict, slo: dict) -> float:
    """:func:`slo_rank` as one number for a black-box optimizer (ordered the same way up to
    the p99 TTFT tie-break): -1 for a run that does not start, 0 for one that keeps not up,
    1/violation in (0, 1) for one that misses the SLOs, 1 + goodput/offered in [1, 2] for
    one that meets them."""
    if not r["starts"]:
        return -1.0
    k, a, _ = slo_rank(r, slo)
    if k == 0:
        return 0.0
    if k == 1:
        return float(1.0 / -a) if np.isfinite(a) else 0.0
    return 1.0 + a / max(float(r.get("offered") or 0.0), a, 1e-9)


#: the search record when it stopped at the first run meeting the SLOs (``first_met``)
FIRST_MET = {"optimizer": "first met", "why": "stopped at the first configuration meeting "
             "the SLOs (one settles a GPU of the fewest-GPU search)", "seed": None,
             "study_db": None}


def keeps_up(r: dict) -> bool:
    """A run known to keep up: it started and ran the whole window without starving (a run
    stopped once proven to miss the SLOs has ``starving`` None, not known, and is not full)."""
    return bool(r["starts"] and not r["starving"] and r_full(r))


def any_met(results: dict, slo: dict) -> bool:
    """Has a full run that keeps up met the SLOs (p99s within them)?"""
    return any(keeps_up(r) and slo_violation(r, slo) <= 1 for r in results.values())


def run_batches(ver, rows: list, config_of, results: dict, done=None, order=None) -> list:
    """Twin-run ``rows`` (``ver.run`` of ``(row, config_of(row))``) into ``results`` (and
    ``order``): all together, or with ``done`` a batch of ``ver.workers`` at a time until
    ``done()`` (the search's end: its budget spent, a run meeting the SLOs). Returns the
    rows run. Every search runs its configurations through it (:meth:`Trials.run`, the
    ``max_loras`` walk of :mod:`twin.ml.recommend`)."""
    step = max(1, getattr(ver, "workers", 1)) if done is not None else max(1, len(rows))
    ran = []
    for j in range(0, len(rows), step):
        if j and done():
            break
        batch = rows[j:j + step]
        for i, out in ver.run([(i, config_of(i)) for i in batch]):
            results[i] = out
            if order is not None:
                order.append(i)
        ran += batch
    return ran


def full_reruns(T: "Trials", slo: dict, n: int) -> list[int]:
    """When no run met the SLOs and no full run keeps up (the verdict would have no p99 to
    show): runs stopped once proven to miss the SLOs (:mod:`twin.ml.slo_stop`) run again
    over the whole window, ``n`` together. First those that might hold a best achievable
    p99 (:func:`~twin.ml.slo_stop.might_beat`): for each SLO the one with the lowest
    proven bound of that p99 (not starving when stopped first), then the least far off
    (``slo_violation_lower_bound``); if none of those keeps up either, the stopped runs in
    the order the search made them (the model's predicted best first). Their full figures
    replace the stopped ones (``rerun_after_stop``: what the stop had proven). Returns the
    rows run again."""
    res, ran = T.results, []
    for second in (False, True):
        up = any(keeps_up(r) for r in res.values())
        if any_met(res, slo) or up:
            break
        stopped = [i for i in T.order if res[i].get("slo_violated_early")]
        picks = []
        if not second:
            for m in (f"{k}_p99" for k in ("ttft", "tpot") if slo.get(k)):
                near = might_beat(res, m)
                picks += sorted(near, key=lambda i: (res[i]["starving_at_stop"], near[i], i))[:1]
            stopped.sort(key=lambda i: (res[i]["starving_at_stop"],
                                        res[i]["slo_violation_lower_bound"], i))
        picks = list(dict.fromkeys(picks + stopped))[:n]
        for i, out in T.ver.run_full([(i, T.cand.at[i, "_config"]) for i in picks]):
            res[i] = {**out, "rerun_after_stop": res[i]["slo_proven"]}
        ran += picks
    return ran


class Trials:
    """The candidate table ``cand`` (one row per configuration: features, the model's
    predictions where it made them, ``search`` = which search added it), ``results``
    ({row: the twin run's figures}, shared with the caller), ``order`` (rows in the order
    they were run) and the budget of ``max_runs`` twin runs."""

    def __init__(self, cand: pd.DataFrame, results: dict, space: SearchSpace, ver,
                 max_runs: int, profile=None, done=None):
        cand = cand.copy()
        if "search" not in cand.columns:
            cand["search"] = "max_loras"
        for k in KNOBS[1:]:
            cand[k] = [getattr(c, k) for c in cand["_config"]]
        cand["pred_ok"] = cand["pred_ok"].astype(object)   # None for the model-blind rows
        self.cand, self.results, self.space, self.ver = cand, results, space, ver
        self.max_runs, self.profile, self.done = max_runs, profile, done
        self.index = {space.point(c): i for i, c in cand["_config"].items()}
        self.order = list(results)

    def budget(self) -> int:
        """Twin runs left: none once ``done()`` (the search's own end) is True."""
        if self.done is not None and self.done():
            return 0
        return self.max_runs - len(self.results)

    def row(self, cfg: ServingConfig, search: str) -> int:
        """The row of ``cfg``, added when new: the workload and slot features of the
        ``max_loras`` candidate with its slot count (KV capacity recomputed), no prediction
        (the model does not see most of these knobs)."""
        p = self.space.point(cfg)
        if p in self.index:
            return self.index[p]
        cand = self.cand
        same = cand.index[(cand["max_loras"] == cfg.max_loras) & (cand["search"] == "max_loras")]
        r = cand.loc[int(same[0]) if len(same) else int(cand.index[0])].copy()
        for c in [c for c in cand.columns if c.startswith("pred_")]:
            r[c] = None if c == "pred_ok" else np.nan
        r["_config"], r["search"] = cfg, search
        r["max_loras"] = float(cfg.max_loras)
        for k in KNOBS[1:]:
            r[k] = getattr(cfg, k)
        if self.profile is not None and "kv_tokens" in r:
            r["kv_tokens"] = float(self.profile.memory.kv_tokens(cfg))
        i = len(cand)
        cand.loc[i] = r
        self.index[p] = i
        return i

    def run(self, rows) -> list[int]:
        """Twin-run the rows not run yet, within the budget (in parallel); the rows run."""
        todo = [i for i in dict.fromkeys(rows) if i not in self.results][:max(0, self.budget())]
        done = (lambda: self.budget() <= 0) if self.done is not None else None
        return run_batches(self.ver, todo, lambda i: self.cand.at[i, "_config"], self.results,
                           done, self.order)

    def best(self, slo: dict) -> int | None:
        """The best run that started (:func:`slo_rank`; ties to the row added first)."""
        started = [i for i, r in self.results.items() if r["starts"]]
        return max(started, key=lambda i: (slo_rank(self.results[i], slo), -i)) \
            if started else None

    def records(self) -> list[dict]:
        """Every run, in the order run: its search, knobs and verified figures (JSON)."""
        out = []
        for n, i in enumerate(self.order):
            c = self.cand.at[i, "_config"]
            out.append({"trial": n, "search": str(self.cand.at[i, "search"]),
                        **{k: getattr(c, k) for k in KNOBS},
                        **{k: v for k, v in self.results[i].items() if k != "starving_reason"}})
        return out


def coordinate_search(T: Trials, slo: dict, knobs=None) -> None:
    """The deterministic search: from the best run, for each knob in turn (``knobs``,
    default the space's), the neighbouring grid values (one step down and up, run
    together), moving on along a direction while its step is no worse (plateaus are
    crossed: a knob often does nothing until it binds); passes until a whole pass moves
    nothing or the budget is spent."""
    knobs = knobs or T.space.knobs

    def rank(i: int) -> tuple:
        return slo_rank(T.results[i], slo)

    def walk(knob: str) -> None:
        fronts = {d: T.best(slo) for d in (-1, 1)}
        while fronts and T.budget() > 0:
            steps = {}
            for d, f in fronts.items():
                cur = getattr(T.cand.at[f, "_config"], knob)
                vals = sorted(set(T.space.grids[knob]) | {cur})
                j = vals.index(cur) + d
                if 0 <= j < len(vals):
                    cfg = T.space.config({**_knobs(T.cand.at[f, "_config"]), knob: vals[j]})
                    i = T.row(cfg, "coordinate")
                    if i != f:   # a step that changes nothing (max_cpu_loras raised): none
                        steps[d] = i
            T.run(list(steps.values()))
            fronts = {d: i for d, i in steps.items() if i in T.results and rank(i)[0] > 0
                      and rank(i) >= rank(fronts[d])}

    if T.best(slo) is None:
        return
    moved = True
    while moved and T.budget() > 0:
        start = T.best(slo)
        for knob in knobs:
            walk(knob)
        moved = T.best(slo) != start


def exhaustive_search(T: Trials) -> None:
    """Every point of the space (when it fits the budget: the exact optimum)."""
    T.run([T.row(T.space.config(p), "exhaustive") for p in T.space.points()])


def _knobs(cfg: ServingConfig) -> dict:
    return {k: getattr(cfg, k) for k in KNOBS}

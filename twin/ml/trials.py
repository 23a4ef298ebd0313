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


def r_full(r: dict) -> bool:
    """A run that simulated the whole window (the early exit's probe has no p99 to judge)."""
    return bool(r.get("full", False))


def nan_inf(x) -> float:
    return float("inf") if x is None or not np.isfinite(x) else float(x)


def slo_rank(r: dict, slo: dict) -> tuple:
    """How good a twin run is for the goodput objective, larger is better: one that does
    not start or keeps not up < one that misses the SLOs (less violation better) < one that
    meets them (more goodput better, then lower p99 TTFT)."""
    if not r["starts"] or r["starving"] or not r_full(r):
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


class Trials:
    """The candidate table ``cand`` (one row per configuration: features, the model's
    predictions where it made them, ``search`` = which search added it), ``results``
    ({row: the twin run's figures}, shared with the caller), ``order`` (rows in the order
    they were run) and the budget of ``max_runs`` twin runs."""

    def __init__(self, cand: pd.DataFrame, results: dict, space: SearchSpace, ver,
                 max_runs: int, profile=None):
        cand = cand.copy()
        if "search" not in cand.columns:
            cand["search"] = "max_loras"
        for k in KNOBS[1:]:
            cand[k] = [getattr(c, k) for c in cand["_config"]]
        cand["pred_ok"] = cand["pred_ok"].astype(object)   # None for the model-blind rows
        self.cand, self.results, self.space, self.ver = cand, results, space, ver
        self.max_runs, self.profile = max_runs, profile
        self.index = {space.point(c): i for i, c in cand["_config"].items()}
        self.order = list(results)

    def budget(self) -> int:
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
        for i, out in self.ver.run([(i, self.cand.at[i, "_config"]) for i in todo]):
            self.results[i] = out
            self.order.append(i)
        return todo

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

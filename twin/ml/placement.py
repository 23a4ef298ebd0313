"""Place a trace's adapters on the fewest GPUs, with no GPU starving.

:func:`place` looks for the fewest groups whose ML-estimated best configuration keeps up
(load-balanced greedy partition, one more GPU at a time; an adapter whose traffic alone
would starve a GPU split into replicas), each group then verified by
:func:`twin.ml.recommend.recommend`; a failed verification adds a GPU (or a replica), and
a verified placement is then tried with one GPU fewer while the twin still verifies it (the
model errs on the safe side, so this recovers GPUs it over-provisioned). The steps are the
methods of :class:`_Search`, in that order; what it returns is
:class:`twin.ml.report.Placement`.

With ``slo`` (``objective="goodput"``) a GPU verifies only when its recommendation meets the
SLOs in its own twin run (p99 TTFT/TPOT, :func:`twin.ml.recommend.recommend`): the fewest
GPUs that meet them at the trace's load. The model's keep-up prediction still prunes GPU
counts (meeting an SLO needs keeping up), so the twin decides every count it accepts. Two
steps exist for the SLO alone (issue 16: ``place`` gave 3-4 GPUs, or none within 4, where
an even 2-way split of the requests met the SLO): the partition is balanced with replicas
(:func:`_balanced`: the busiest GPU sets the p99), and a failed count is tried once more as
a split of the requests, every adapter on every GPU (:meth:`_Search.request_split`),
before a GPU is added. Under an SLO (the goodput objective) each GPU's search stops at its
first configuration that meets it (``recommend(first_met=True)``; ``search_kw=
{"first_met": False}`` searches each GPU's best goodput): whether a GPU count verifies is
the same, in fewer twin runs, and a run that is proven to miss the SLO stops early
(:mod:`twin.ml.slo_stop`); the GPUs of a count are verified side by side
(:meth:`_Search.side_by_side`).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.costs.gpus import gpus_per_replica
from twin.ml.features import workload_features
from twin.ml.inputs import prepare_inputs, runs_to_completion
from twin.ml.recommend import check_slo, recommend
from twin.ml.recommender import Recommender, candidate_table, catalog_max_rank
from twin.ml.report import GPUPlan, Placement, Recommendation
from twin.ml.sweep import EarlyExit
from twin.ml.units import BASE_UNIT, Units, routing_table

def _partition(U: Units, rank: dict, k: int) -> list[list]:
    """Longest-processing-time partition of the units into ``k`` groups: each unit goes to
    the least loaded group, never beside another replica of its adapter when avoidable,
    and, between equally loaded groups, where its rank is already covered (less padding)."""
    groups = [[] for _ in range(k)]
    tot = [0] * k
    mx = [0] * k
    has = [set() for _ in range(k)]
    for u in U.units:
        a = U.adapter_of[u]
        r = rank.get(a, 0)
        g = min(range(k), key=lambda j: (a in has[j], tot[j], max(0, r - mx[j]), j))
        groups[g].append(u)
        tot[g] += U.load[u]
        mx[g] = max(mx[g], r)
        has[g].add(a)
    return [g for g in groups if g]


#: Under an SLO, the most a GPU's offered tokens may exceed an even share (total / k) before
#: the hottest adapter on the busiest GPU gets a replica more (:func:`_balanced`).
BALANCE_TOL = 0.05


def _balanced(U: Units, rank: dict, k: int, tol: float = BALANCE_TOL) -> list[list]:
    """:func:`_partition` into ``k`` groups, hot adapters given replicas until no group's
    offered tokens exceed an even share by more than ``tol`` (or every adapter on the
    busiest group already has ``k`` replicas). Why: a p99 latency SLO is set by the busiest
    GPU; a partition of whole adapters by offered tokens cannot balance a workload whose
    hottest adapter carries more than 1/k of the load, while an even split of the requests
    (every GPU serving every adapter) can. Replicas go only where the balance needs them,
    so each GPU still serves as few adapters as it can."""
    while True:
        groups = _partition(U, rank, k)
        loads = [sum(U.load[u] for u in g) for g in groups]
        busiest = int(np.argmax(loads))
        if loads[busiest] <= (1 + tol) * sum(loads) / k:
            return groups
        hot = [u for u in groups[busiest]
               if U.adapter_of[u] != BASE_UNIT and U.replicas[U.adapter_of[u]] < k]
        if not hot:
            return groups
        a = U.adapter_of[max(hot, key=lambda u: (U.load[u], u))]
        U.split(a, U.replicas[a] + 1)


class _Search:
    """One placement search over the units ``U``: the model's and the twin's verdicts on
    groups of units (each group verified once, by :func:`recommend`), the twin runs spent
    and the log of attempts."""

    def __init__(self, U: Units, rank: dict, *, profile, model: Recommender,
                 base: ServingConfig, window: float, max_gpus: int, max_runs: int | None,
                 workers: int, early_exit: EarlyExit, objective: str = "throughput",
                 slo: dict | None = None, search_kw: dict | None = None,
                 to_completion: bool = False):
        self.U, self.rank = U, rank
        self.profile, self.model, self.base, self.window = profile, model, base, window
        self.to_completion = to_completion   # each GPU's runs (recommend's to_completion)
        self.max_gpus, self.max_runs, self.workers = max_gpus, max_runs, workers
        self.early_exit = early_exit
        self.objective, self.slo = objective, slo
        self.search_kw = dict(search_kw or {})
        self.curve: dict[int, dict] = {}   # GPU count -> the worst verified p99s seen
        self.runs = 0
        self.verified: dict[tuple, Recommendation] = {}
        self.attempts: list[str] = []
        self.hot: set = set()      # adapters split because their traffic starves one GPU
        self.spread = False        # every adapter on every GPU (request_split) verified

    def partition(self, k: int) -> list[list]:
        """The units in ``k`` groups: balanced with replicas under an SLO (the busiest GPU
        sets the p99), by whole adapters otherwise (keeping up is about capacity)."""
        if self.slo:
            return _balanced(self.U, self.rank, k)
        return _partition(self.U, self.rank, k)

    def predicted_ok(self, units) -> bool:
        t, cat = self.U.sub(units)
        if not len(cat):
            return True
        wf = workload_features(t, cat, self.window)
        c = candidate_table(self.model, wf, self.base, self.profile,
                            catalog_max_rank(cat, self.base.max_lora_rank))
        return bool(c["pred_ok"].any())

    def recommend(self, units, workers: int) -> Recommendation:
        """One group's verification: :func:`recommend` on its share of the trace (the
        goodput objective under an SLO stopping at its first configuration meeting it:
        ``first_met``; the throughput objective ranks by throughput, so searches on)."""
        t, cat = self.U.sub(units)
        first_met = bool(self.slo) and self.objective == "goodput"
        return recommend(t, cat, profile=self.profile, model=self.model, base=self.base,
                         window_s=self.window, to_completion=self.to_completion,
                         max_runs=self.max_runs, workers=workers,
                         early_exit=self.early_exit, objective=self.objective, slo=self.slo,
                         **{"first_met": first_met, **self.search_kw})

    def verified_ok(self, units) -> bool:
        key = tuple(sorted(units))
        if key not in self.verified:
            self.verified[key] = self.recommend(units, self.workers)
            self.runs += self.verified[key].runs
        return self.verified[key].ok

    def side_by_side(self, groups) -> None:
        """Under an SLO, the groups not verified yet verified at once, one forked process
        each (``workers`` at a time, one twin run at a time each), instead of one group
        after another with ``workers`` runs each: a group whose first run meets the SLO
        (``first_met``) then costs one run, not a round of ``workers``, and the GPUs of a
        count take one round together. The verdicts are the same (twin runs are
        deterministic); a count whose first group fails verifies the others too."""
        todo = [g for g in groups if self.U.adapters(g) and tuple(sorted(g)) not in self.verified]
        if (not self.slo or self.workers <= 1 or len(todo) <= 1
                or "fork" not in mp.get_all_start_methods()):
            return
        _FORKED["search"] = self
        try:
            with ProcessPoolExecutor(min(self.workers, len(todo)),
                                     mp_context=mp.get_context("fork")) as pool:
                for g, rec in zip(todo, pool.map(_recommend_alone, todo)):
                    self.verified[tuple(sorted(g))] = rec
                    self.runs += rec.runs
        finally:
            _FORKED.clear()

    def first_failing(self, groups) -> list | None:
        """Twin-verify every group (recommend: runs + local search; under an SLO side by
        side first); the first failing group, or None."""
        self.side_by_side(groups)
        for g in groups:
            if not self.U.adapters(g):  # base-model traffic only: not a LoRA server
                continue
            ok = self.verified_ok(g)
            self._chart(len(groups), tuple(sorted(g)), ok)
            if not ok:
                return g
        return None

    def _chart(self, k: int, key: tuple, ok: bool) -> None:
        """The cost curve's point for ``k`` GPUs: the worst p99s among its GPUs verified so
        far (a GPU that misses the SLOs: its best achievable p99s; starving: infinite), and
        whether every GPU verified (a failed count stops at its first failing GPU)."""
        pt = self.curve.setdefault(k, {"gpus": k, "ttft_p99": 0.0, "tpot_p99": 0.0,
                                       "met": True, "gpus_verified": 0, "_seen": set()})
        if key in pt["_seen"]:
            return
        pt["_seen"].add(key)
        for m in ("ttft_p99", "tpot_p99"):
            pt[m] = max(pt[m], _p99(self.verified[key], m))
        pt["met"] = pt["met"] and ok
        pt["gpus_verified"] = len(pt["_seen"])

    def split_hot(self) -> int:
        """Hot adapters (by load, hottest first): one the model doubts fits a GPU alone is run
        alone on the twin; if it starves, it gets replicas until one replica's share keeps up.
        The first adapter that fits alone ends the scan: the rest are lighter. Returns the
        most GPUs worth predicting for: the model may be pessimistic out of its training
        range (e.g. one very hot adapter share), so never start above the GPU count that
        loads of verified size would need."""
        U = self.U
        known_ok_load = 0  # the largest load a twin run has seen one GPU keep up with
        for a in [u for u in U.units if u != BASE_UNIT]:
            if self.predicted_ok([a]):
                break
            if self.verified_ok([a]):
                known_ok_load = max(known_ok_load, U.load[a])
                break
            r = 1
            while r < self.max_gpus and not self.verified_ok([U.unit_of(a)]):
                r += 1
                U.split(a, r)
            known_ok_load = max(known_ok_load, U.load[U.unit_of(a)])
            self.hot.add(a)
            self.attempts.append(f"{a} alone starves a GPU: {r} replicas")
        total_load = sum(U.load.values())
        return (max(1, math.ceil(total_load / known_ok_load)) if known_ok_load
                else len(U.units))

    def grow(self, k_cap: int) -> tuple[list, bool, int]:
        """Up: one GPU more at a time, the first partition predicted to keep up (always
        below ``k_cap``), then verified; a hot unit that fails alone gets a replica more.
        Returns (the last partition, verified?, its GPU count)."""
        U = self.U
        groups: list = [U.units]
        k = 1
        heaviest = max(U.load.values()) if U.load else 0
        while k <= self.max_gpus:
            groups = self.partition(k)
            if (k < min(k_cap, len(U.units), self.max_gpus)   # the last count is verified
                    and not all(self.predicted_ok(g) for g in groups)):
                self.attempts.append(f"{k} GPU(s): predicted to starve")
                k += 1
                continue
            failed = self.first_failing(groups)
            if failed is None:
                self.attempts.append(f"{k} GPU(s): verified")
                return groups, True, k
            self.attempts.append(f"{k} GPU(s): verification failed")
            split = self.request_split(k) if self.slo and k > 1 else None
            if split is not None:
                return split, True, k
            alone = [u for u in failed if u != BASE_UNIT]
            if len(alone) == 1 and U.load[alone[0]] >= 0.5 * heaviest:
                a = U.adapter_of[alone[0]]  # a hot adapter (share) alone starves: a replica more
                U.split(a, U.replicas[a] + 1)
                self.hot.add(a)
                self.attempts.append(f"{a}: {U.replicas[a]} replicas")
            k += 1
        return groups, False, k

    def request_split(self, k: int) -> list | None:
        """Under an SLO, before one GPU more: every adapter on every one of the ``k`` GPUs,
        each taking every k-th of its requests (data parallelism, what a deployment with
        all adapters loaded everywhere does). At light load a GPU's p99 TTFT is set by the
        few longest prompts it gets, not by its load, so a placement of whole adapters can
        miss where a split of the requests meets the SLO. Its groups if every GPU verifies,
        else None (replicas as before)."""
        saved = dict(self.U.replicas)
        for a in self.U.by_adapter:
            if a != BASE_UNIT:
                self.U.split(a, k)
        groups = _partition(self.U, self.rank, k)
        if self.first_failing(groups) is None:
            self.attempts.append(f"{k} GPU(s): every adapter on every GPU, verified")
            self.spread = True
            return groups
        self.attempts.append(f"{k} GPU(s): every adapter on every GPU, verification failed")
        self.U.restore(saved)
        return None

    def shrink(self, groups: list, k: int) -> list:
        """Down, from a verified partition on ``k`` GPUs: the model may be pessimistic; one
        GPU fewer at a time while the twin still verifies it. Returns the last verified."""
        U = self.U
        while k > 1:
            saved = dict(U.replicas)
            for a, r in saved.items():
                if r > k - 1:
                    U.split(a, k - 1)
            fewer = self.partition(k - 1)
            if self.first_failing(fewer) is not None:
                self.attempts.append(f"{k - 1} GPU(s): verification failed")
                U.restore(saved)
                break
            k -= 1
            groups = fewer
            self.attempts.append(f"{k} GPU(s): verified")
        return groups


_FORKED: dict = {}   # the search the forked processes of side_by_side inherit


def _recommend_alone(units) -> Recommendation:
    """:meth:`_Search.recommend` of one group in a forked process, one twin run at a time."""
    return _FORKED["search"].recommend(units, 1)


def place(trace: pd.DataFrame, catalog=None, *, profile=None, model: Recommender | None = None,
          base: ServingConfig | None = None, window_s: float | None = None,
          max_gpus: int = 64, max_runs: int | None = None, workers: int = 2,
          early_exit: EarlyExit = EarlyExit(), objective: str = "throughput",
          slo: dict | None = None, known: Recommendation | None = None,
          search_kw: dict | None = None) -> Placement:
    """The fewest GPUs, and an adapter -> GPU assignment, with no GPU starving (and, for
    ``objective="goodput"``, every GPU meeting ``slo`` in its twin run). ``max_runs``: twin
    runs per GPU (default as :func:`twin.ml.recommend.recommend`'s). ``known``: the
    recommendation already made for the whole trace on one GPU (same objective and SLOs),
    taken as the one-GPU verdict instead of searching again. ``search_kw``: more keywords
    for each GPU's :func:`recommend` (``optimizer``, ``seed``).

    An adapter whose traffic alone is predicted (or verified) to starve one GPU is split
    into replicas, each taking every r-th of its requests (the routing table's weights)."""
    t0 = time.perf_counter()
    if slo is not None:
        check_slo(slo)   # before any twin run, not in the first GPU's recommend
    profile, model, base, window, trace, catalog = prepare_inputs(
        trace, profile, model, base, window_s, catalog)
    U = Units(trace, catalog)
    rank = {a: catalog.rank(a) for a in catalog.adapters}
    s = _Search(U, rank, profile=profile, model=model, base=base, window=window,
                max_gpus=max_gpus, max_runs=max_runs, workers=workers, early_exit=early_exit,
                objective=objective, slo=slo, search_kw=search_kw,
                to_completion=runs_to_completion(window, window_s))
    whole = tuple(sorted(U.units))
    if known is not None:
        s.verified[whole] = known
    k_cap = s.split_hot()
    groups, ok, k = s.grow(k_cap)
    if known is not None and 1 not in s.curve:   # the one-GPU verdict, for the cost curve
        s._chart(1, whole, known.ok)
    if ok:
        groups = s.shrink(groups, k)
    else:  # report the last partition tried, consistent with the units
        groups = s.partition(min(k, max_gpus))
    plans = [GPUPlan(i, g, U.adapters(g), s.verified.get(tuple(sorted(g))))
             for i, g in enumerate(groups)]
    # a partition never verified (no count up to max_gpus was) is not a placement
    ok = ok and all(p.recommendation is None or p.recommendation.ok for p in plans)
    return Placement(plans, routing_table(U, plans, rank, window), ok, time.perf_counter() - t0,
                     s.runs, s.attempts, dict(U.replicas),
                     curve=[{n: v for n, v in s.curve[k].items() if n != "_seen"}
                            for k in sorted(s.curve)],
                     gpus_per_server=gpus_per_replica(profile.hardware),
                     split_why={a: _split_why(s, a) for a, r in U.replicas.items() if r > 1})


def _split_why(s: _Search, adapter: str) -> str:
    """Why a placement split ``adapter``'s requests over GPUs (``Placement.split_why``)."""
    if adapter in s.hot:
        return "traffic"      # alone, it starves (or misses the SLOs on) one GPU
    if s.spread:
        return "spread"       # every adapter on every GPU: it met the SLOs, whole ones did not
    return "balance"          # to even the GPUs' offered tokens under the SLOs


def _p99(rec: Recommendation, m: str) -> float:
    """A GPU's verified p99 (its pick's run), else its best achievable one, else inf."""
    if rec.ok and rec.verified:
        return float(rec.verified[m])
    best = ((rec.slo_verdict or {}).get("best") or {}).get(m)
    return float(best["value"]) if best else float("inf")

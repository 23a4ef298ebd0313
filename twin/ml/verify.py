"""Twin runs that verify the recommender's predictions: one configuration of one trace per
run (:func:`twin.ml.sweep.simulate_point`, with its early exit for clearly starving runs),
several in parallel in forked workers that inherit the trace instead of pickling it.
:func:`goodput` scores a run against latency SLOs.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from twin.errors import ConfigError
from twin.ml.sweep import EarlyExit, simulate_point

_CTX: dict = {}   # what the forked workers inherit: the trace, catalog, profile, ...


def request_latencies(requests: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per finished request: TTFT and TPOT (ms) and tokens (prompt + generated), what
    goodput counts; kept by :class:`Verifier` (``keep_latencies``) so that a run can be
    scored later against SLOs chosen after it (:func:`goodput_of`)."""
    d = requests[requests["status"] == "finished"]
    g = d["generated_tokens"].to_numpy()
    tpot = np.where(g > 1, (d["finish_s"] - d["first_token_s"]).to_numpy()
                    / np.maximum(g - 1, 1), 0.0) * 1000
    return {"ttft_ms": (d["first_token_s"] - d["arrival_s"]).to_numpy() * 1000,
            "tpot_ms": tpot, "tokens": d["prompt_tokens"].to_numpy() + g}


def goodput_of(lat: dict, duration_s: float, slo: dict | None) -> float:
    """Tokens/s of the requests of :func:`request_latencies` meeting the SLOs (ms)."""
    ok = np.ones(len(lat["tokens"]), dtype=bool)
    if slo and slo.get("ttft"):
        ok &= lat["ttft_ms"] <= slo["ttft"]
    if slo and slo.get("tpot"):
        ok &= lat["tpot_ms"] <= slo["tpot"]
    return float(lat["tokens"][ok].sum() / max(duration_s, 1e-9))


def goodput(requests: pd.DataFrame, duration_s: float, slo: dict | None) -> float:
    """Tokens/s of completed requests meeting the SLOs (TTFT and TPOT in ms)."""
    return goodput_of(request_latencies(requests), duration_s, slo)


def _verify(item):
    """One twin run, in a worker: ``item`` = (candidate index, configuration[, in full])
    -> (index, the run's figures; ``starts`` False for a configuration vLLM would not
    start). With SLOs the run stops once it is proven to miss them (:func:`_stopped`)
    unless the Verifier's ``slo_stop`` is off or the item asks for the full window."""
    i, cfg = item[:2]
    trace, catalog, profile, window_s, slo, ee = (_CTX[k] for k in (
        "trace", "catalog", "profile", "window_s", "slo", "early_exit"))
    stop_at = slo if (_CTX.get("slo_stop") and not item[2:]) else None
    t0 = time.perf_counter()
    try:
        s, full, sim_s, res = simulate_point(trace, catalog, cfg, profile, window_s, ee,
                                             slo=stop_at)
    except ConfigError:
        return i, {"starts": False, "starving": True, "wall_s": time.perf_counter() - t0}
    if "slo_stop" in res.meta:
        return i, _stopped(res, slo, t0)
    out = {"starts": True, "full": full, "simulated_s": float(sim_s),
           "starving": bool(s["starving"]),
           "starving_reason": s["starving_reason"],
           "throughput": float(s["total_throughput"]),
           "offered": float(s["offered_total_throughput"]),
           "achieved": float(s["achieved_over_offered"]),
           "ttft_p50": s["ttft_ms"]["median"], "ttft_p99": s["ttft_ms"]["p99"],
           "tpot_p50": s["tpot_ms"]["median"], "tpot_p99": s["tpot_ms"]["p99"],
           "e2e_p50": s["e2e_ms"]["median"], "preemptions": int(s["preemptions"])}
    if "extrapolated" in s:   # priced past the profile's calibration (twin.results.extrapolation)
        out["extrapolated"] = s["extrapolated"]
    if "prefix_cache_hit_rate" in s:   # a trace with hash_ids: vLLM's prefix-cache counters
        out.update(enable_prefix_caching=bool(s["enable_prefix_caching"]),
                   prefix_cache_hit_rate=float(s["prefix_cache_hit_rate"]),
                   prefix_cache_hits=int(s["prefix_cache_hits"]))
    # with SLOs, the tokens of requests meeting them per second of the window; a starving
    # run stopped after the early exit's probe: those it finished in the probe, per second
    # of the whole window (what it proves at least, as a run stopped on the SLOs)
    out["goodput"] = (goodput(res.requests, sim_s if full else window_s, slo) if slo
                      else out["throughput"])
    if full and _CTX.get("keep_latencies"):
        out["latencies"], out["duration_s"] = request_latencies(res.requests), sim_s
    out["wall_s"] = time.perf_counter() - t0
    return i, out


def _stopped(res, slo: dict, t0: float) -> dict:
    """A run stopped once proven to miss the SLOs (:mod:`twin.ml.slo_stop`): what was
    proven and when, the p99s' proven lower bounds (``p99_lower_bounds``; a p99 that had not
    enough finished requests: None) and the worst as a ratio to its SLO
    (``slo_violation_lower_bound``); no p99 and no throughput of a full run (NaN).
    ``starving_at_stop``: the starvation rule on the run so far (a hint, not a verdict).
    ``goodput`` too is what the run proves at least: the tokens of the requests finished by
    the stop within the SLOs, per second of the whole window (a run without a window: NaN,
    not known: its length is not known at the stop, and per second of the run so far
    would overstate it); ``starving`` None: not known."""
    stop = res.meta["slo_stop"]
    window = res.meta["window_s"]
    nan = float("nan")
    return {"starts": True, "full": False, "starving": None,
            "starving_reason": "not known: stopped once the SLOs were proven missed",
            "slo_violated_early": True, "stopped_s": float(stop["stopped_s"]),
            "slo_proven": stop["line"], "p99_lower_bounds": stop["lower_bounds"],
            "slo_violation_lower_bound": float(stop["violation_lower_bound"]),
            "starving_at_stop": bool(res.summary["starving"]),
            "throughput": nan, "offered": float(res.summary["offered_total_throughput"]),
            "achieved": nan, "ttft_p50": nan, "ttft_p99": nan, "tpot_p50": nan,
            "tpot_p99": nan, "e2e_p50": nan, "preemptions": int(res.summary["preemptions"]),
            "goodput": goodput(res.requests, window, slo) if window else nan,
            "wall_s": time.perf_counter() - t0}


class Verifier:
    """Runs twin verifications, in parallel (forked workers inherit the trace)."""

    def __init__(self, trace, catalog, profile, window_s, slo, early_exit: EarlyExit,
                 workers: int, keep_latencies: bool = False, slo_stop: bool = True):
        """``keep_latencies``: full runs also return their requests' ``latencies``
        (:func:`request_latencies`) and ``duration_s``, to score other SLOs later.
        ``slo_stop``: with ``slo``, stop a run once it is proven to miss them
        (:mod:`twin.ml.slo_stop`); :meth:`run_full` runs the whole window anyway."""
        _CTX.update(trace=trace, catalog=catalog, profile=profile, window_s=window_s, slo=slo,
                    early_exit=early_exit, keep_latencies=keep_latencies,
                    slo_stop=bool(slo_stop and slo))
        self.workers = max(1, int(workers))
        self.pool = None

    def run(self, items):
        if self.workers <= 1 or len(items) <= 1:
            return [_verify(it) for it in items]
        if self.pool is None:
            if "fork" not in mp.get_all_start_methods():
                return [_verify(it) for it in items]
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"))
        return list(self.pool.map(_verify, items))

    def run_full(self, items):
        """:meth:`run` without the SLO early exit: every run over the whole window."""
        return self.run([(i, cfg, True) for i, cfg in items])

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        _CTX.clear()

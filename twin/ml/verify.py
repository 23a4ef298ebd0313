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
    """One twin run, in a worker: ``item`` = (candidate index, configuration) -> (index, the
    run's figures; ``starts`` False for a configuration vLLM would not start)."""
    i, cfg = item
    trace, catalog, profile, window_s, slo, ee = (_CTX[k] for k in (
        "trace", "catalog", "profile", "window_s", "slo", "early_exit"))
    t0 = time.perf_counter()
    try:
        s, full, sim_s, res = simulate_point(trace, catalog, cfg, profile, window_s, ee)
    except ConfigError:
        return i, {"starts": False, "starving": True, "wall_s": time.perf_counter() - t0}
    out = {"starts": True, "full": full, "starving": bool(s["starving"]),
           "starving_reason": s["starving_reason"],
           "throughput": float(s["total_throughput"]),
           "offered": float(s["offered_total_throughput"]),
           "achieved": float(s["achieved_over_offered"]),
           "ttft_p50": s["ttft_ms"]["median"], "ttft_p99": s["ttft_ms"]["p99"],
           "tpot_p50": s["tpot_ms"]["median"], "tpot_p99": s["tpot_ms"]["p99"],
           "e2e_p50": s["e2e_ms"]["median"], "preemptions": int(s["preemptions"])}
    if "prefix_cache_hit_rate" in s:   # a trace with hash_ids: vLLM's prefix-cache counters
        out.update(enable_prefix_caching=bool(s["enable_prefix_caching"]),
                   prefix_cache_hit_rate=float(s["prefix_cache_hit_rate"]),
                   prefix_cache_hits=int(s["prefix_cache_hits"]))
    out["goodput"] = goodput(res.requests, sim_s, slo) if (full and slo) else out["throughput"]
    if full and _CTX.get("keep_latencies"):
        out["latencies"], out["duration_s"] = request_latencies(res.requests), sim_s
    out["wall_s"] = time.perf_counter() - t0
    return i, out


class Verifier:
    """Runs twin verifications, in parallel (forked workers inherit the trace)."""

    def __init__(self, trace, catalog, profile, window_s, slo, early_exit: EarlyExit,
                 workers: int, keep_latencies: bool = False):
        """``keep_latencies``: full runs also return their requests' ``latencies``
        (:func:`request_latencies`) and ``duration_s``, to score other SLOs later."""
        _CTX.update(trace=trace, catalog=catalog, profile=profile, window_s=window_s, slo=slo,
                    early_exit=early_exit, keep_latencies=keep_latencies)
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

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        _CTX.clear()

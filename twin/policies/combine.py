"""One ``RunResult`` from the runs of a deployment's servers (or a fleet's replicas).

Requests go back in trace order (those routed to no server marked ``unserved``); the
summary is recomputed from all of them, with the starvation rule per server and for the
whole; ITL percentiles are read over every server's decode tokens (their histograms
summed); timelines are summed on one grid; the ``deployment`` section lists each server.
Nothing here runs a server (nor imports the module that does: the annotations name its
types): the runs arrive as ``twin.policies.deployment.ServerRun``
(``spec``, ``rows``, ``result``, ``busy_fraction``, ``slowdown``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.results.itl_histogram import weights_percentile
from twin.results.recorder import server_stalls_in_means, server_tallies
from twin.results.results import (PREFIX_COLUMNS, STARVATION_THRESHOLD, RunResult, load_spans,
                                  prefix_cache_summary, summarize, waiting_growth)


def _deployment_summary(dep: Deployment, runs: list[ServerRun], starving=None) -> dict:
    """``starving``: labels of starving servers (default: each server's own verdict)."""
    unserved_rows = int((dep.route < 0).sum())
    return {
        "policy": dep.policy, "gpus": dep.gpus, "servers": len(dep.servers),
        "replicas_per_gpu": dep.replicas_per_gpu,
        "served_adapters": len({a for s in dep.servers for a in s.adapters if a is not None}),
        "unserved_adapters": len(dep.unserved), "unserved_requests": unserved_rows,
        "unserved_adapter_names": [str(a) for a in dep.unserved[:20]],
        "per_server": [{
            "label": r.spec.label, "kind": r.spec.kind, "gpu": r.spec.gpu,
            "share": r.spec.share, "adapters": len(r.spec.adapters),
            "requests": int(len(r.rows)), "slowdown": r.slowdown,
            "busy_fraction": r.busy_fraction,
            "starving": (r.spec.label in starving if starving is not None else
                         bool(r.result.summary["starving"]) if r.result is not None else False),
        } for r in runs],
        **dep.notes,
    }


def annotate(result: RunResult, dep: Deployment, runs: list[ServerRun], starving=None) -> None:
    result.summary["deployment"] = _deployment_summary(dep, runs, starving)
    result.meta["policy"] = dep.policy


def combine(dep: Deployment, trace: pd.DataFrame, runs: list[ServerRun], config, profile,
            window_s, idle_kv_tokens: int = 0) -> RunResult:
    """One RunResult for the deployment: requests put back in trace order, unserved ones
    marked ``unserved``, timelines summed on a common grid. The KV cache: every server's
    capacity (``idle_kv_tokens``: that of the servers that got no request, which have no
    result), the mean usage over all of it, the fullest server's peak. The queue-growth
    rule is each server's (its own queue, its own threshold): summed over servers, a few
    requests each that every server keeps up with read as a growing queue."""
    n = len(trace)
    cols = {
        "output_tokens": trace["output_tokens"].to_numpy(np.int64).copy(),
        "generated_tokens": np.zeros(n, dtype=np.int64),
        "first_scheduled_s": np.full(n, np.nan), "first_token_s": np.full(n, np.nan),
        "finish_s": np.full(n, np.nan), "preemptions": np.zeros(n, dtype=np.int64),
        "status": np.array(["unserved"] * n, dtype=object),
    }
    live = [r for r in runs if r.result is not None]
    for r in live:
        rq = r.result.requests
        for col, arr in cols.items():
            arr[r.rows] = rq[col].to_numpy()
    req = pd.DataFrame({
        "request_id": trace["request_id"].to_numpy(), "arrival_s": trace["arrival_s"].to_numpy(),
        "adapter": trace["adapter"].to_numpy(), "prompt_tokens": trace["prompt_tokens"].to_numpy(),
        **cols})
    req["server"] = dep.route
    durations = [r.result.summary["duration_s"] for r in live]
    duration = window_s if window_s is not None else max(durations, default=0.0)
    timeline = _combine_timelines(live, duration)
    growth = waiting_growth(timeline, req, window_s)
    itl_p50, itl_p99, itl_bins = _combined_itl([r.result for r in live])

    caps = np.array([r.result.summary["kv_cache"]["capacity_tokens"] for r in live], dtype=float)
    cap = caps.sum() + idle_kv_tokens
    use = np.array([r.result.summary["kv_cache"]["usage_mean"] for r in live], dtype=float)
    peak = max((r.result.summary["kv_cache"]["usage_max"] for r in live), default=0.0)

    loads = {k: sum(r.result.summary["adapter_loads"][k] for r in live)
             for k in ("from_disk", "from_host", "time_s")}
    summary = summarize(
        req, duration_s=duration, window_s=window_s,
        itl_p50_s=itl_p50, itl_p99_s=itl_p99, loads=loads,
        preemptions=sum(r.result.summary["preemptions"] for r in live),
        kv={"capacity_tokens": int(cap),
            "usage_mean": float((use * caps).sum() / cap) if cap else 0.0,
            "usage_max": float(peak)},
        waiting_growth=growth, max_model_len=config.max_model_len)
    if summary["starving_reason"] == "queue growth" and len(live) > 1:
        # the summed queue of several servers: each server's own rule decides, below
        summary["starving"], summary["starving_reason"] = False, None
    summary.update(server_tallies([r.result.summary for r in live]))
    server_stalls_in_means(summary, [r.result for r in live])
    _combine_prefix_cache(req, summary, live)
    summary["unserved"] = int((dep.route < 0).sum())
    starving_servers = [r.spec.label for r in live
                        if _server_starving(r, req, duration, window_s,
                                            config.max_model_len)]
    if starving_servers and not summary["starving"]:
        summary["starving"] = True
        summary["starving_reason"] = f"server(s) {', '.join(starving_servers[:3])} starving"
    if summary["unserved"] and summary["starving_reason"] == "throughput":
        summary["starving_reason"] = "throughput (adapters without a server)"
    steps = None
    if live and all(r.result.steps is not None for r in live):
        steps = pd.concat([r.result.steps.assign(server=r.spec.label) for r in live],
                          ignore_index=True)
    meta = {"config": config.to_dict(), "profile": profile.name, "window_s": window_s,
            "policy": dep.policy, "twin_version": __import__("twin").__version__}
    result = RunResult(requests=req, summary=summary, timeline=timeline, steps=steps, meta=meta,
                       itl_bins=itl_bins)
    annotate(result, dep, runs, set(starving_servers))
    return result


def _combined_itl(results: list[RunResult]) -> tuple[float, float, np.ndarray | None]:
    """The ITL median and p99 (seconds) over every server's decode tokens, read from their
    histograms summed (``RunResult.itl_bins``; returned too). Results without one (read
    from disk): the servers' medians weighted by completed requests and the largest
    server p99 (an upper bound), and no histogram."""
    if results and all(r.itl_bins is not None for r in results):
        bins = np.sum([r.itl_bins for r in results], axis=0)
        return weights_percentile(bins, 50), weights_percentile(bins, 99), bins
    w = np.array([r.summary["completed"] for r in results], dtype=float)
    p50 = np.array([r.summary["itl_ms"]["median"] for r in results], dtype=float)
    p99 = np.array([r.summary["itl_ms"]["p99"] for r in results], dtype=float)
    ok = ~np.isnan(p50) & ~np.isnan(p99) & (w > 0)
    if not ok.any():
        return float("nan"), float("nan"), None
    return (float(np.average(p50[ok], weights=w[ok])) / 1000, float(p99[ok].max()) / 1000,
            None)


def _combine_prefix_cache(req: pd.DataFrame, summary: dict, live: list[ServerRun]) -> None:
    """The servers' prefix-cache columns and figures, when the trace named its tokens."""
    if not live or not all("prefix_cache_queries" in r.result.requests for r in live):
        return
    for col in PREFIX_COLUMNS:
        arr = np.zeros(len(req), dtype=np.int64)
        for r in live:
            arr[r.rows] = r.result.requests[col].to_numpy()
        req[col] = arr
    summary.update(prefix_cache_summary(
        req, any(r.result.summary["enable_prefix_caching"] for r in live)))


def _server_starving(r: ServerRun, req: pd.DataFrame, duration: float, window_s,
                     max_model_len: int) -> bool:
    """The starvation rule (``load_spans``) on one server's requests, over the deployment's
    window (its own run may end earlier or later), or its queue grows."""
    if r.result.summary.get("starving_reason") == "queue growth":
        return True
    load = load_spans(req.iloc[r.rows], duration_s=duration, window_s=window_s,
                      max_model_len=max_model_len)
    return load["offered_tps"] > 0 and load["achieved_over_offered"] < STARVATION_THRESHOLD


_SUM_COLS = ("running", "waiting", "tokens", "adapter_loads", "preemptions")
_COLS = ["time_s", "running", "waiting", "kv_usage", "tokens", "adapter_loads", "preemptions"]


def _combine_timelines(live: list[ServerRun], duration: float, points: int = 2000) -> pd.DataFrame:
    if len(live) == 1:   # its own samples: one server's deployment (a fleet of one) is its run
        return live[0].result.timeline[_COLS].copy()
    grid = np.linspace(0.0, max(duration, 1e-9), points)
    out = {"time_s": grid}
    for c in _SUM_COLS:
        out[c] = np.zeros(points)
    kv = np.zeros(points)
    cap_total = 0.0
    for r in live:
        tl = r.result.timeline
        t = tl["time_s"].to_numpy()
        if not len(t):
            continue
        at = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 1)
        before = grid < t[0]
        for c in _SUM_COLS:
            v = tl[c].to_numpy(dtype=float)[at]
            v[before] = 0.0
            out[c] += v
        cap = float(r.result.summary["kv_cache"]["capacity_tokens"])
        kv += tl["kv_usage"].to_numpy(dtype=float)[at] * cap
        cap_total += cap
    out["kv_usage"] = kv / cap_total if cap_total else kv
    df = pd.DataFrame(out)
    for c in ("running", "waiting", "adapter_loads", "preemptions"):
        df[c] = df[c].round().astype(np.int64)
    return df[_COLS]

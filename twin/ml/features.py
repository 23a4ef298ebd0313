"""Workload and configuration features for the recommender.

The paper's eight (arXiv 2508.08343): max/min/mean/std of the per-adapter request rates and
of the adapter ranks. Added here, because the paper's workloads never varied them: adapter
count, aggregate rate and offered token load, prompt/output length means and p90s,
burstiness (CV of the aggregate gaps, request-weighted CV of each adapter's gaps, index of
dispersion of 10-s counts), popularity skew (Gini of per-adapter counts, share of the top
10 % of adapters) and the base-model share. Configuration features: ``max_loras``, the
padded rank, ``max_loras`` / adapters, the request share covered by the ``max_loras``
busiest adapters and the KV capacity the profile's memory model gives the configuration.

Prefix caching (issue 17): :func:`prefix_features` gives the shared-prefix fraction and the
sessions per adapter. They are NOT in :data:`WORKLOAD_FEATURES` yet: the shipped recommender
(``twin/ml/recommender.json``) refuses a feature list other than the one it was trained on,
so they join the model's features when it is retrained with caching-on sweeps.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.workload.prefix_stats import prefix_share

PAPER_FEATURES = ("rate_max", "rate_min", "rate_mean", "rate_std",
                  "rank_max", "rank_min", "rank_mean", "rank_std")
WORKLOAD_FEATURES = PAPER_FEATURES + (
    "n_adapters", "total_rate", "offered_tps", "base_share",
    "prompt_mean", "prompt_p90", "output_mean", "output_p90",
    "arrival_cv", "adapter_cv", "dispersion_10s", "gini", "top10_share")
#: prefix-caching workload features (not yet model features; see the module doc)
PREFIX_FEATURES = ("prefix_share", "sessions_per_adapter")
CONFIG_FEATURES = ("max_loras", "max_lora_rank", "slots_frac", "cover_share", "kv_tokens")
ROW_FEATURES = WORKLOAD_FEATURES + CONFIG_FEATURES


def _gini(x: np.ndarray) -> float:
    x = np.sort(np.asarray(x, dtype=np.float64))
    n, s = len(x), x.sum()
    if n < 2 or s <= 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * s))


def _cv(gaps: np.ndarray) -> float:
    if len(gaps) < 2:
        return 1.0
    m = gaps.mean()
    return float(gaps.std() / m) if m > 0 else 1.0


def workload_features(trace: pd.DataFrame, catalog=None, duration_s: float | None = None,
                      default_rank: int = 16) -> dict:
    """Features of ``trace`` (adapters = the catalog's, else the trace's) over
    ``duration_s`` (default: the last arrival)."""
    arrival = trace["arrival_s"].to_numpy(dtype=np.float64)
    if duration_s is None:
        duration_s = float(arrival[-1]) if len(arrival) else 1.0
    dur = max(float(duration_s), 1e-9)
    adapter = trace["adapter"]
    has = adapter.notna().to_numpy()
    codes, uniq = pd.factorize(adapter[has])
    counts_seen = np.bincount(codes, minlength=len(uniq)).astype(np.float64)
    if catalog is not None:
        names = list(catalog.adapters)
        pos = {a: i for i, a in enumerate(names)}
        counts = np.zeros(len(names))
        for a, c in zip(uniq, counts_seen):
            if a in pos:
                counts[pos[a]] = c
        ranks = np.array([catalog.rank(a) for a in names], dtype=np.float64)
    else:
        names, counts = list(uniq), counts_seen
        ranks = np.full(len(names), float(default_rank))
    n = max(len(names), 1)
    rates = counts / dur if len(counts) else np.zeros(1)
    if not len(ranks):
        ranks = np.array([float(default_rank)])
    prompt = trace["prompt_tokens"].to_numpy(dtype=np.float64)
    output = trace["output_tokens"].to_numpy(dtype=np.float64)
    nreq = len(trace)
    # burstiness: aggregate gaps, per-adapter gaps (request-weighted), 10-s counts
    agg_cv = _cv(np.diff(arrival)) if nreq > 2 else 1.0
    ad_cv, w = 0.0, 0.0
    if has.sum() > 2:
        a_arr = arrival[has]
        order = np.argsort(codes, kind="stable")
        c_sorted, t_sorted = codes[order], a_arr[order]
        gaps = np.diff(t_sorted)
        same = c_sorted[1:] == c_sorted[:-1]
        g, gc = gaps[same], c_sorted[1:][same]
        k = np.bincount(gc, minlength=len(uniq)).astype(np.float64)
        s1 = np.bincount(gc, weights=g, minlength=len(uniq))
        s2 = np.bincount(gc, weights=g * g, minlength=len(uniq))
        ok = k >= 2
        if ok.any():
            mean = s1[ok] / k[ok]
            var = np.maximum(s2[ok] / k[ok] - mean ** 2, 0.0)
            cvs = np.sqrt(var) / np.maximum(mean, 1e-12)
            ad_cv = float(np.average(cvs, weights=k[ok] + 1))
            w = 1.0
    if not w:
        ad_cv = 1.0
    bins = np.bincount((arrival // 10.0).astype(np.int64),
                       minlength=int(np.ceil(dur / 10.0))) if nreq else np.zeros(1)
    disp = float(bins.var() / bins.mean()) if bins.mean() > 0 else 1.0
    srt = np.sort(counts)[::-1]
    top = max(1, int(np.ceil(0.1 * n)))
    total_ad = counts.sum()
    return {
        "rate_max": float(rates.max()), "rate_min": float(rates.min()),
        "rate_mean": float(rates.mean()), "rate_std": float(rates.std()),
        "rank_max": float(ranks.max()), "rank_min": float(ranks.min()),
        "rank_mean": float(ranks.mean()), "rank_std": float(ranks.std()),
        "n_adapters": float(len(names)),
        "total_rate": nreq / dur,
        "offered_tps": float((prompt.sum() + output.sum()) / dur),
        "base_share": float((~has).sum() / nreq) if nreq else 0.0,
        "prompt_mean": float(prompt.mean()) if nreq else 0.0,
        "prompt_p90": float(np.percentile(prompt, 90)) if nreq else 0.0,
        "prompt_p99": float(np.percentile(prompt, 99)) if nreq else 0.0,
        "output_mean": float(output.mean()) if nreq else 0.0,
        "output_p90": float(np.percentile(output, 90)) if nreq else 0.0,
        "arrival_cv": agg_cv, "adapter_cv": ad_cv, "dispersion_10s": disp,
        "n_requests": float(nreq),
        "gini": _gini(counts),
        "top10_share": float(srt[:top].sum() / total_ad) if total_ad else 0.0,
        # not model features: kept for config features and placement
        "_counts_sorted": srt,
    }


def prefix_features(trace: pd.DataFrame) -> dict:
    """``prefix_share``: the ideal per-adapter prefix-cache hit share of the prompt tokens
    (:func:`twin.workload.prefix_stats.prefix_share`; 0 without ``hash_ids``, nothing known
    to be shared). ``sessions_per_adapter``: distinct sessions per adapter, on average; a
    request without ``session_id`` is a session of its own (base model: one more group)."""
    share = prefix_share(trace) if "hash_ids" in trace.columns and len(trace) else 0.0
    if not len(trace):
        return {"prefix_share": 0.0, "sessions_per_adapter": 0.0}
    if "session_id" in trace.columns:
        session = trace["session_id"].to_numpy()
    else:
        session = np.arange(len(trace))
    per = pd.Series(session).groupby(trace["adapter"].fillna("").to_numpy()).nunique()
    return {"prefix_share": float(share), "sessions_per_adapter": float(per.mean())}


def config_features(wf: dict, max_loras: int, max_lora_rank: int, kv_tokens: int) -> dict:
    srt = wf.get("_counts_sorted")
    n = max(wf["n_adapters"], 1.0)
    if srt is not None and srt.sum() > 0:
        cover = float(srt[:int(max_loras)].sum() / srt.sum())
    else:
        cover = min(1.0, max_loras / n)
    return {"max_loras": float(max_loras), "max_lora_rank": float(max_lora_rank),
            "slots_frac": float(min(1.0, max_loras / n)), "cover_share": cover,
            "kv_tokens": float(kv_tokens)}


def public(wf: dict) -> dict:
    """The features without the private helpers (for tables)."""
    return {k: v for k, v in wf.items() if not k.startswith("_")}

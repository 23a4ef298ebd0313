"""The comparison table of ``twin validate``: two runs' summaries side by side in
``vllm bench serve`` terms (throughput, TTFT / TPOT / ITL / E2E mean and p99, adapter loads,
preemptions), each metric with its SMAPE = 2|a - b| / (|a| + |b|); the median of several
runs and their own spread. :mod:`twin.validate.run` produces the runs.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from twin.results import smape   # re-exported for callers

# (label, summary path, format)
METRICS = (
    ("total throughput (tok/s)", ("total_throughput",), "{:.1f}"),
    ("output throughput (tok/s)", ("output_throughput",), "{:.1f}"),
    ("request throughput (req/s)", ("request_throughput",), "{:.3f}"),
    ("completed requests", ("completed",), "{:.0f}"),
    ("TTFT mean (ms)", ("ttft_ms", "mean"), "{:.1f}"),
    ("TTFT p99 (ms)", ("ttft_ms", "p99"), "{:.1f}"),
    ("TPOT mean (ms)", ("tpot_ms", "mean"), "{:.2f}"),
    ("TPOT p99 (ms)", ("tpot_ms", "p99"), "{:.2f}"),
    ("ITL mean (ms)", ("itl_ms", "mean"), "{:.2f}"),
    ("ITL p99 (ms)", ("itl_ms", "p99"), "{:.2f}"),
    ("E2E mean (ms)", ("e2e_ms", "mean"), "{:.1f}"),
    ("E2E p99 (ms)", ("e2e_ms", "p99"), "{:.1f}"),
    ("adapter loads from disk", ("adapter_loads", "from_disk"), "{:.0f}"),
    ("adapter loads from host", ("adapter_loads", "from_host"), "{:.0f}"),
    ("adapter load time (s)", ("adapter_loads", "time_s"), "{:.3f}"),
    ("preemptions", ("preemptions",), "{:.0f}"),
    ("duration (s)", ("duration_s",), "{:.2f}"),
)
# short keys for JSON / the experiment table
KEYS = {
    "total throughput (tok/s)": "throughput", "TTFT mean (ms)": "ttft_mean",
    "TTFT p99 (ms)": "ttft_p99", "TPOT mean (ms)": "tpot_mean", "TPOT p99 (ms)": "tpot_p99",
    "ITL mean (ms)": "itl_mean", "ITL p99 (ms)": "itl_p99", "E2E mean (ms)": "e2e_mean",
    "E2E p99 (ms)": "e2e_p99", "adapter loads from disk": "loads_disk",
    "adapter loads from host": "loads_host", "preemptions": "preemptions",
}


def _get(summary: dict, path):
    v = summary
    for k in path:
        v = v[k]
    return float(v)


def compare(executor: dict, twin: dict, raw: dict | None = None) -> pd.DataFrame:
    """Side-by-side table of two summaries (``RunResult.summary``) with SMAPE per metric;
    ``raw``: the twin priced as calibrated when ``twin`` is priced at the speed anchor's
    (``twin_raw`` / ``smape_raw`` columns, equal to ``twin`` / ``smape`` without one)."""
    rows = []
    for label, path, fmt in METRICS:
        a, b = _get(executor, path), _get(twin, path)
        c = b if raw is None else _get(raw, path)
        rows.append({"metric": label, "key": KEYS.get(label, label), "executor": a, "twin": b,
                     "smape": smape(a, b), "twin_raw": c, "smape_raw": smape(a, c),
                     "fmt": fmt})
    return pd.DataFrame(rows)


def median_summary(summaries: list[dict]) -> dict:
    """Per metric (``METRICS``) the median over several runs' summaries, in the same nested
    form, so ``compare`` can set the twin against the executor's typical run."""
    if len(summaries) == 1:
        return summaries[0]
    out: dict = {}
    for _, path, _ in METRICS:
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = float(np.median([_get(s, path) for s in summaries]))
    return out


def run_spread(summaries: list[dict]) -> dict:
    """The executor's own noise: per metric key, the median pairwise SMAPE between runs."""
    out = {}
    for label, path, _ in METRICS:
        vals = [_get(s, path) for s in summaries]
        pairs = [smape(a, b) for a, b in itertools.combinations(vals, 2)]
        out[KEYS.get(label, label)] = float(np.median(pairs)) if pairs else float("nan")
    return out


def format_table(table: pd.DataFrame, title: str = "", raw: bool = False) -> str:
    """The table as text; ``raw``: with the unanchored twin's columns beside."""
    w = (30, 12, 12, 8) + ((12, 8) if raw else ())
    lines = []
    if title:
        lines.append(title)
    head = f"{'metric':<{w[0]}}{'executor':>{w[1]}}{'twin':>{w[2]}}{'SMAPE':>{w[3]}}"
    lines.append(head + (f"{'twin raw':>{w[4]}}{'SMAPE':>{w[5]}}" if raw else ""))
    lines.append("-" * sum(w))
    pct = lambda x: "" if np.isnan(x) else f"{100 * x:.1f}%"   # noqa: E731
    for r in table.itertuples():
        line = (f"{r.metric:<{w[0]}}{r.fmt.format(r.executor):>{w[1]}}"
                f"{r.fmt.format(r.twin):>{w[2]}}{pct(r.smape):>{w[3]}}")
        if raw:
            line += f"{r.fmt.format(r.twin_raw):>{w[4]}}{pct(r.smape_raw):>{w[5]}}"
        lines.append(line)
    return "\n".join(lines)

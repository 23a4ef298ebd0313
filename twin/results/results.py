"""RunResult: per-request table, summary in ``vllm bench serve`` terms, timeline.

Metric definitions follow ``vllm bench serve``: throughput over the measured window counts
completed requests only; TTFT = first token − arrival; TPOT = (E2E − TTFT)/(output − 1)
over requests with more than one output token; ITL = gaps between consecutive tokens.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from twin.outputs import json_document, staged_dir
from twin.results import plot as plots   # looked up at call time (tests replace it)
from twin.results.extrapolation import describe
from twin.results.fairness import held_back_note, slowest_adapter
from twin.results.notes import (STARVATION_THRESHOLD, late_start, slot_bound_note,
                                spans_note, stalls_note, window_edge_note)
from twin.results.queue_head import LIMITS, main_limit
from twin.results.spread import spread_percentiles
from twin.sched.request import exceeds_max_model_len


def crop_window(trace: pd.DataFrame, window_s: float | None) -> pd.DataFrame:
    """The requests of ``trace`` that arrive within a measured window of ``window_s``
    seconds (``vllm bench serve`` with a time limit: later arrivals are never sent), rows
    renumbered; ``None``: the whole trace, as is."""
    if window_s is None:
        return trace
    return trace[trace["arrival_s"] <= window_s].reset_index(drop=True)


def smape(a, b, *, percent: bool = False):
    """Symmetric absolute percentage error 2|a − b| / (|a| + |b|), elementwise: 0 where
    both are 0, NaN where either is NaN (an unknown value has no error to report). A float
    for scalars, an array otherwise; ``percent``: times 100. The one definition every
    comparison uses (validation, calibration, the recommender's models)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = np.abs(a) + np.abs(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(den > 0, (200.0 if percent else 2) * np.abs(a - b)
                       / np.where(den > 0, den, 1), 0.0)
    err = np.where(np.isnan(den), np.nan, err)
    return float(err) if err.ndim == 0 else err


@dataclass
class RunResult:
    """What one run (twin or executor) gives: ``requests`` (one row per request: the
    trace's columns, ``generated_tokens``, ``first_scheduled_s``, ``first_token_s``,
    ``finish_s`` (NaN = never), ``preemptions``, ``status``), ``summary`` (the metrics of
    ``vllm bench serve`` plus adapter loads, preemptions, KV usage and the starvation
    verdict; times in ms), ``timeline`` (running, waiting, KV usage, tokens, adapter loads
    and preemptions over time), ``steps`` (the step log, when recorded) and ``meta``
    (config, profile, window, twin version; the trace file when read from one), ``itl_bins``
    (the ITL histogram, in memory only). ``repr`` is one line of headline figures; ``format_summary()`` is the full report. ``extras``: a
    strategy's own tables (split mode: ``base_batches``, ``client_steps``), each
    DataFrame saved as ``<name>.parquet``."""

    requests: pd.DataFrame
    summary: dict
    timeline: pd.DataFrame
    steps: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    #: the run's token-weighted ITL histogram (``twin.results.itl_histogram`` bins, as its
    #: percentiles were read), kept in memory so a deployment or fleet reads its ITL
    #: percentiles over all its servers' tokens; None when not recorded or read from disk
    itl_bins: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        # the tables are summarised by their shape: a notebook cell shows one line, not 10^5 rows
        s = self.summary
        figures = ", ".join(f"{k}={s[k]:.6g}" if isinstance(s[k], float) else f"{k}={s[k]!r}"
                            for k in ("completed", "num_requests", "total_throughput",
                                      "starving") if k in s)
        steps = "None" if self.steps is None else f"<{len(self.steps)} rows>"
        return (f"RunResult({figures}, requests=<{len(self.requests)} rows>, "
                f"timeline=<{len(self.timeline)} rows>, steps={steps})")

    # -- persistence -----------------------------------------------------------------------
    def save(self, out_dir: str | Path, plot: bool = False, *, kind: str = "run") -> Path:
        """Write requests.parquet, summary.json, timeline.parquet (+ steps, plot) atomically
        through :mod:`twin.outputs`: into a temporary sibling directory renamed at the end;
        an existing ``out_dir`` is replaced only when it is a twin ``kind`` output."""
        with staged_dir(out_dir, kind) as tmp:
            self.write_into(tmp, plot=plot)
        return Path(out_dir)

    def write_into(self, directory: str | Path, plot: bool = False) -> None:
        """The result's files in ``directory`` (created; no checks: a staging directory)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.requests.to_parquet(d / "requests.parquet", index=False)
        self.timeline.to_parquet(d / "timeline.parquet", index=False)
        if self.steps is not None:
            self.steps.to_parquet(d / "steps.parquet", index=False)
        for name, table in self.extras.items():
            if isinstance(table, pd.DataFrame):
                table.to_parquet(d / f"{name}.parquet", index=False)
        (d / "summary.json").write_text(
            json_document({"summary": self.summary, "meta": self.meta}, indent=2) + "\n")
        if plot:
            plots.plot_timeline(self, d / "timeline.png")

    def format_summary(self) -> str:
        return format_summary(self.summary, measured=bool(self.meta.get("executor")))


def _stats(x: np.ndarray, scale: float = 1000.0) -> dict:
    if len(x) == 0:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {"mean": float(np.mean(x) * scale), "median": float(np.median(x) * scale),
            "p99": float(np.percentile(x, 99) * scale)}


def _spread_stats(x: np.ndarray, dispersion, autocorrelation, mean_step_s: float) -> dict:
    """``_stats`` with the median and p99 of ``x`` mixed with the step times' spread (the
    mean is the prices': the multipliers have mean 1)."""
    out = _stats(x)
    if len(x):
        out["median"], out["p99"] = (1000.0 * p for p in spread_percentiles(
            x, mean_step_s, dispersion, autocorrelation, (50, 99)))
    return out


def load_spans(req: pd.DataFrame, *, duration_s: float, window_s: float | None,
               max_model_len: int) -> dict:
    """Offered and achieved total throughput, each over its span (the starvation rule).

    Requests vLLM refuses (``exceeds_max_model_len``) are neither offered nor achieved.
    With ``window_s`` (``vllm bench serve`` with a time limit, the paper's rule): the
    tokens of the requests arriving in the window and the tokens completed in it, both per
    second of the window. Run to completion, both are measured from the first arrival:
    offered up to the moment a server that keeps up would be done, the latest arrival plus
    time in service (first scheduled to finish) over the requests; achieved up to the last
    completion. The difference is time spent waiting to be scheduled: a light trace (one
    request, a burst the server takes in at once) keeps up however short its arrival span,
    while the backlog of an overloaded one drains long after that moment. With a window,
    ``in_service_share`` too: the share of the offered tokens in requests admitted and still
    running at its end (neither served nor waiting: the window's edge).
    """
    arrival = req["arrival_s"].to_numpy()
    tokens = req["prompt_tokens"].to_numpy() + req["output_tokens"].to_numpy()
    status = req["status"].to_numpy()
    refused = (status == "rejected") & exceeds_max_model_len(
        req["prompt_tokens"].to_numpy(), req["output_tokens"].to_numpy(), max_model_len)
    offered_mask = ~refused   # a client-side failure (max_in_flight) was still offered
    done = status == "finished"
    achieved_tok = float((req["prompt_tokens"].to_numpy()[done]
                          + req["generated_tokens"].to_numpy()[done]).sum())
    in_service = None
    if window_s is not None:
        offered_mask &= arrival <= window_s
        offered_span, achieved_span = window_s, duration_s
        # admitted and not finished at the window's end: in flight, not unserved
        in_service = float(tokens[offered_mask & (status == "running")].sum())
    elif offered_mask.any():
        first = float(arrival[offered_mask].min())
        unqueued = (arrival + (req["finish_s"] - req["first_scheduled_s"]).to_numpy())[done]
        offered_span = max(float(arrival[offered_mask].max()),
                           float(unqueued.max()) if done.any() else 0.0) - first
        achieved_span = (float(req["finish_s"].to_numpy()[done].max()) if done.any()
                         else duration_s) - first
    else:
        offered_span = achieved_span = duration_s
    offered_span, achieved_span = max(offered_span, 1e-9), max(achieved_span, 1e-9)
    offered_tokens = float(tokens[offered_mask].sum())
    offered = offered_tokens / offered_span
    achieved = achieved_tok / achieved_span
    out = {"offered_tps": offered, "offered_span_s": offered_span,
           "achieved_span_s": achieved_span, "offered_requests": int(offered_mask.sum()),
           "refused": int(refused.sum()),
           "achieved_over_offered": achieved / offered if offered > 0 else 1.0}
    if in_service is not None:   # the window's edge (twin.results.notes.window_edge_note)
        out["in_service_share"] = in_service / offered_tokens if offered_tokens > 0 else 0.0
    return out


def decode_gaps(generated) -> int:
    """The inter-token gaps of finished requests that generated ``generated`` tokens each:
    what a mean ITL divides by (the first token opens no gap)."""
    return int((generated - 1).clip(min=0).sum())


def summarize(req: pd.DataFrame, *, duration_s: float, window_s: float | None,
              itl_p50_s: float, itl_p99_s: float, loads: dict, preemptions: int,
              kv: dict, waiting_growth: int, max_model_len: int,
              ttft_spread: tuple | None = None) -> dict:
    """Summary metrics of a run (times in ms, throughputs per second). ``ttft_spread``:
    (dispersion, autocorrelation, mean busy step s): the TTFT median and p99 of the mixture
    with the step times' spread (``twin.results.spread``; the twin's); None: as measured."""
    done = req["status"].to_numpy() == "finished"
    # the completed requests' columns, not a copy of the whole table (10^5 rows of strings)
    arrival, first_token, finish, generated = (
        req[c].to_numpy()[done] for c in ("arrival_s", "first_token_s", "finish_s",
                                          "generated_tokens"))
    load = load_spans(req, duration_s=duration_s, window_s=window_s,
                      max_model_len=max_model_len)
    offered_tps = load["offered_tps"]
    in_tok = int(req["prompt_tokens"].to_numpy()[done].sum())
    out_tok = int(generated.sum())
    dur = max(duration_s, 1e-9)
    ttft = first_token - arrival
    e2e = finish - arrival
    multi = generated > 1
    decode_span = finish - first_token
    tpot = decode_span[multi] / (generated[multi] - 1)
    gaps = decode_gaps(generated)
    total_tps = (in_tok + out_tok) / dur
    achieved = load["achieved_over_offered"]
    starving_throughput = achieved < STARVATION_THRESHOLD
    starving_queue = waiting_growth > max(50, 0.02 * load["offered_requests"])
    return {
        "duration_s": float(duration_s),
        "first_arrival_s": float(req["arrival_s"].min()) if len(req) else 0.0,
        "num_requests": int(len(req)),
        "completed": int(done.sum()),
        "unfinished": int((req["status"] != "finished").sum() - (req["status"] == "rejected").sum()),
        "rejected": int((req["status"] == "rejected").sum()),
        "request_throughput": float(done.sum() / dur),
        "input_throughput": in_tok / dur,
        "output_throughput": out_tok / dur,
        "total_throughput": total_tps,
        "offered_total_throughput": offered_tps,
        "achieved_over_offered": float(achieved),
        "offered_span_s": load["offered_span_s"],
        "achieved_span_s": load["achieved_span_s"],
        "rejected_requests": load["refused"],
        **({"in_service_share": load["in_service_share"]} if "in_service_share" in load
           else {}),
        "ttft_ms": _stats(ttft) if ttft_spread is None else _spread_stats(ttft, *ttft_spread),
        "tpot_ms": _stats(tpot),
        "itl_ms": {"mean": float(decode_span.sum() / gaps * 1000) if gaps else float("nan"),
                   "median": itl_p50_s * 1000, "p99": itl_p99_s * 1000},
        "e2e_ms": _stats(e2e),
        "adapter_loads": loads,
        "preemptions": int(preemptions),
        "kv_cache": kv,
        "waiting_growth": int(waiting_growth),
        "starving": bool(starving_throughput or starving_queue),
        "starving_reason": ("throughput" if starving_throughput else
                            "queue growth" if starving_queue else None),
        "slowest_adapter": slowest_adapter(req, float(duration_s)),
    }


#: a run's per-request prefix-cache columns (a trace with hash_ids)
PREFIX_COLUMNS = ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_preempted_hits")


def prefix_cache_summary(req: pd.DataFrame, enabled: bool) -> dict:
    """Prefix-cache figures of a run whose trace names its tokens (``hash_ids``), from the
    per-request ``PREFIX_COLUMNS``: vLLM's counters (``vllm:prefix_cache_queries`` /
    ``_hits``: tokens looked up and found when a request is first admitted; its lookups
    after a preemption are counted apart, as vLLM's ``PrefixCacheStats`` does, so a request
    finding its own blocks again does not raise the hit rate), the hit rate overall and
    per adapter ("base": no adapter), and the prefill tokens every hit saved (those after
    preemptions too). ``enabled``: the server's ``enable_prefix_caching``."""
    q, h = req["prefix_cache_queries"], req["prefix_cache_hits"]
    rehits = int(req["prefix_cache_preempted_hits"].sum()) \
        if "prefix_cache_preempted_hits" in req else 0
    by = {}
    names = req["adapter"].astype(object).where(req["adapter"].notna(), "base")
    for name, g in pd.DataFrame({"a": names, "q": q, "h": h}).groupby("a", sort=True):
        gq, gh = int(g["q"].sum()), int(g["h"].sum())
        by[str(name)] = {"prefix_cache_queries": gq, "prefix_cache_hits": gh,
                         "hit_rate": gh / gq if gq else 0.0}
    queries, hits = int(q.sum()), int(h.sum())
    return {"enable_prefix_caching": bool(enabled), "prefix_cache_queries": queries,
            "prefix_cache_hits": hits, "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "prefix_cache_preempted_hits": rehits, "prefill_tokens_saved": hits + rehits,
            "prefix_cache_by_adapter": by}


def format_summary(s: dict, *, measured: bool = False) -> str:
    """The summary as ``vllm bench serve`` prints it, plus twin's extras. ``measured``: the
    executor's run, not the twin's prediction (no note on the twin's known error)."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result (twin) ", n=w, c="=")]

    def row(k, v, fmt="{:<40}{:>10}"):
        lines.append(fmt.format(k, v))

    row("Successful requests:", s["completed"])
    row("Unfinished requests:", s["unfinished"])
    row("Rejected requests (> max_model_len):", s.get("rejected_requests", 0))
    dep = s.get("deployment")
    if dep:   # a strategy's GPUs: merged takes one per adapter, hybrid several
        row("Deployment (policy, GPUs, servers):",
            f"{dep['policy']}, {dep['gpus']}, {dep['servers']}", "{:<36}{:>14}")
    row("Benchmark duration (s):", f"{s['duration_s']:.2f}")
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    row("Input token throughput (tok/s):", f"{s['input_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{s['total_throughput']:.2f}")
    row("Offered total throughput (tok/s):", f"{s['offered_total_throughput']:.2f}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms",
                       "Time per Output Token (excl. 1st token)"), ("itl_ms", "Inter-token Latency"),
                       ("e2e_ms", "End-to-end Latency")):
        lines.append("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        short = key.split("_")[0].upper()
        row(f"Mean {short} (ms):", f"{s[key]['mean']:.2f}")
        row(f"Median {short} (ms):", f"{s[key]['median']:.2f}")
        row(f"P99 {short} (ms):", f"{s[key]['p99']:.2f}")
    lines.append("{s:{c}^{n}}".format(s="Adapters, memory, verdict", n=w, c="-"))
    la = s["adapter_loads"]
    row("Adapter loads from disk:", la["from_disk"])
    row("Adapter loads from host:", la["from_host"])
    row("Adapter load time (s):", f"{la['time_s']:.2f}")
    row("Preemptions:", s["preemptions"])
    row("KV cache tokens:", s["kv_cache"]["capacity_tokens"])
    row("KV usage mean / max (%):",
        f"{100 * s['kv_cache']['usage_mean']:.1f} / {100 * s['kv_cache']['usage_max']:.1f}")
    if "prefix_cache_queries" in s:   # the trace named its tokens (hash_ids)
        row("Prefix caching:", "on" if s["enable_prefix_caching"] else "off")
        row("Prefix cache hit rate (%):", f"{100 * s['prefix_cache_hit_rate']:.1f}")
        row("Prefix cache hits / queries (tok):",
            f"{s['prefix_cache_hits']}/{s['prefix_cache_queries']}", "{:<30}{:>20}")
        row("Prefill tokens saved:", s["prefill_tokens_saved"])
        for name, a in s["prefix_cache_by_adapter"].items():
            row(f"  hit rate, {name[:24]} (%):", f"{100 * a['hit_rate']:.1f}")
    held = s.get("waiting_held_by")
    if held:   # what held the oldest waiting request, as a share of the busy time
        for k in LIMITS:
            row(f"Held by {k} (% busy):", f"{100 * held[k]:.1f}")
    if s["offered_total_throughput"] == 0:   # a ratio of nothing to nothing says nothing
        verdict = "no load offered (every request rejected or outside the window)"
    elif s["starving"]:
        limit = main_limit(held)
        verdict = (f"STARVING ({s['starving_reason']}; {100 * s['achieved_over_offered']:.1f}% "
                   "of offered" + (f"; queue held by {limit}" if limit else "") + ")")
    else:
        verdict = f"keeps up ({100 * s['achieved_over_offered']:.1f}% of offered)"
    lines.append(f"Verdict: {verdict}")
    notes = [describe(s.get("extrapolated")), held_back_note(s), window_edge_note(s),
             None if measured else slot_bound_note(s),
             late_start(s) or spans_note(s), stalls_note(s)]
    for note in filter(None, notes):
        lines += textwrap.wrap(f"Note: {note}", w, subsequent_indent="  ")
    lines.append("=" * w)
    return "\n".join(lines)


def waiting_growth(timeline: pd.DataFrame, req: pd.DataFrame, window_s) -> int:
    """Growth of the waiting queue over the second half of the arrival span (one of the
    two starvation signals: a queue that keeps growing does not keep up). The span is the
    window, or run to completion, first to last arrival (as in ``load_spans``)."""
    if len(req) == 0 or len(timeline) < 2:
        return 0
    start = 0.0 if window_s is not None else float(req["arrival_s"].min())
    end = window_s if window_s is not None else float(req["arrival_s"].max())
    t = timeline["time_s"].to_numpy()
    w = timeline["waiting"].to_numpy()
    at_end = w[min(np.searchsorted(t, end, side="right") - 1, len(w) - 1)]
    at_mid = w[max(np.searchsorted(t, (start + end) / 2, side="right") - 1, 0)]
    return int(at_end - at_mid)


def request_table(trace: pd.DataFrame, out, status) -> pd.DataFrame:
    """The per-request result table (both clocks): the trace's columns plus what happened.

    ``out`` holds per-request arrays ``output``, ``generated``, ``first_scheduled``,
    ``first_token``, ``finish``, ``preemptions`` (times < 0 = never); ``status``: the status
    names, an array. Each column is made once, as the table's own array, and taken without
    a second copy: built at the end of a run, beside all the run still holds, the table is
    where a starving hour's memory peaks."""
    return pd.DataFrame({
        "request_id": trace["request_id"].to_numpy(copy=True),
        "arrival_s": trace["arrival_s"].to_numpy(copy=True),
        "adapter": trace["adapter"].array.copy(),   # (Arrow) string storage, shared, not copied
        "prompt_tokens": trace["prompt_tokens"].to_numpy(copy=True),
        "output_tokens": out.output.astype(np.int64),
        "generated_tokens": out.generated.astype(np.int64),
        "first_scheduled_s": _never_nan(out.first_scheduled),
        "first_token_s": _never_nan(out.first_token),
        "finish_s": _never_nan(out.finish),
        "preemptions": out.preemptions.astype(np.int64),
        "status": status,
    }, copy=False)


def _never_nan(t: np.ndarray) -> np.ndarray:
    """Times with "never" (< 0) as NaN, a new array."""
    return np.where(t < 0, np.nan, t)

"""What a run records as it goes, and the result built from it: one recorder for both clocks.

The twin (``twin.sim``, simulated time) and the executor (``twin.executor``, wall time) step
the same scheduler; they record requests, the timeline, the step log and the summary the same
way here, so their results line up column for column and a metric is defined once.

Per-request outcomes are numpy columns written when a request leaves the run (not the
``Request`` objects: a starving hour ends with ~10^5 of them), the timeline and step log are
tuples turned into tables once at the end.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pyarrow as pa

from twin.results.itl_histogram import ITLHistogram, weights_percentile
from twin.results import extrapolation, queue_head
from twin.results.queue_head import held_seconds, waiting_held_by
from twin.results.results import (RunResult, decode_gaps, prefix_cache_summary,
                                  request_table, summarize, waiting_growth)
from twin.sched.adapter_cache import AdapterCache
from twin.sched.request import Request, RequestStatus

TIMELINE_COLUMNS = ["time_s", "running", "waiting", "kv_usage", "tokens", "adapter_loads",
                    "preemptions"]
# with a trace that names its tokens (hash_ids): the blocks cached and evictable (free for
# vLLM, reusable by a hit), beside kv_usage (blocks running requests hold)
PREFIX_TIMELINE_COLUMNS = TIMELINE_COLUMNS + ["kv_cached"]
# the step log both clocks write (the executor appends its own columns after these)
STEP_COLUMNS = ["start_s", "duration_s", "steps", "prefill_tokens", "decode_seqs",
                "explicit_seqs", "adapters", "loads", "preempted", "blocked", "held", "after_idle"]
# blocked: where the step's waiting phase stopped; held: what kept the oldest waiting request
# out (twin.results.queue_head)


def _resized(old: np.ndarray, n: int, fill) -> np.ndarray:
    """``old`` cut or grown to ``n`` rows, new rows ``fill``."""
    new = np.full(n, fill, dtype=old.dtype)
    k = min(n, len(old))
    new[:k] = old[:k]
    return new


class Outcomes:
    """Per-request results, written when a request leaves the run.

    Times are -1 until they happen (NaN in the table); ``status`` holds
    ``RequestStatus`` codes (a request that never arrived in the window stays waiting).
    ``failures``: keep an ``error`` message per request (the executor: an adapter that
    cannot be loaded fails its requests); ``keep_tokens``: keep the generated token ids;
    ``prefix``: keep each request's prefix-cache queries and hits (tokens, summed over its
    admissions)."""

    STATUS = np.array([RequestStatus.NAMES[s] for s in range(len(RequestStatus.NAMES))])

    def __init__(self, output, *, failures: bool = False, keep_tokens: bool = False,
                 prefix: bool = False):
        # counts as int32 (token counts are the trace's int32) and status codes as int8: held
        # for the whole run, they are widened to the table's int64 only at its end
        self.output = np.array(output, dtype=np.int32)
        n = len(self.output)
        self.generated = np.zeros(n, dtype=np.int32)
        self.first_scheduled = np.full(n, -1.0)
        self.first_token = np.full(n, -1.0)
        self.finish = np.full(n, -1.0)
        self.preemptions = np.zeros(n, dtype=np.int32)
        self.status = np.zeros(n, dtype=np.int8)   # never arrived (window) = waiting
        self.error = np.full(n, None, dtype=object) if failures else None
        self.tokens = np.full(n, None, dtype=object) if keep_tokens else None
        # queries, hits, and the hits of its admissions after a preemption
        self.prefix = tuple(np.zeros(n, dtype=np.int64) for _ in range(3)) if prefix else None

    _FILL = {"output": 0, "generated": 0, "first_scheduled": -1.0, "first_token": -1.0,
             "finish": -1.0, "preemptions": 0, "status": 0}

    def resize(self, n: int) -> None:
        """Hold ``n`` requests: rows kept, new ones as never arrived (a clock fed its
        requests one at a time by a router grows it, then cuts it to what it was fed)."""
        for name, fill in self._FILL.items():
            setattr(self, name, _resized(getattr(self, name), n, fill))
        if self.prefix is not None:
            self.prefix = tuple(_resized(a, n, 0) for a in self.prefix)

    def take(self, rows) -> "Outcomes":
        """The outcomes of ``rows`` only, in that order (an executor replica of a fleet
        records by the fleet trace's row; its result holds the rows it was fed)."""
        new = copy.copy(self)
        for name in (*self._FILL, "error", "tokens"):
            col = getattr(self, name)
            if col is not None:
                setattr(new, name, col[rows])
        if self.prefix is not None:
            new.prefix = tuple(a[rows] for a in self.prefix)
        return new

    def record(self, r: Request, tokens: list[int] | None = None) -> None:
        """``tokens``: the request's prompt + generated ids (kept with ``keep_tokens``)."""
        i = r.idx
        self.output[i] = r.output
        self.generated[i] = r.generated
        self.first_scheduled[i] = r.first_scheduled
        self.first_token[i] = r.first_token
        self.finish[i] = r.finish
        self.preemptions[i] = r.preemptions
        self.status[i] = r.status
        if self.tokens is not None and tokens is not None:
            self.tokens[i] = list(tokens[r.prompt:])
        if self.prefix is not None and r.prefix is not None:
            self.prefix[0][i] = r.prefix.queried
            self.prefix[1][i] = r.prefix.hit
            self.prefix[2][i] = r.prefix.rehit

    def fail(self, r: Request, now: float, message: str) -> None:
        """End ``r`` at ``now`` as failed (answered with an error), with ``message``."""
        r.status = RequestStatus.ABORTED
        r.finish = now
        self.record(r)
        self.error[r.idx] = message

    def table(self, trace: pd.DataFrame) -> pd.DataFrame:
        """The per-request result table (``request_table``, plus ``error`` and
        ``output_token_ids`` where kept)."""
        # the names through Arrow: a column of 10^5 strings, not a numpy array of them
        names = pa.array(self.STATUS).take(self.status).to_pandas().array
        req = request_table(trace, self, names)
        if self.error is not None:
            req["error"] = pd.array(self.error, dtype="string")
        if self.tokens is not None:
            req["output_token_ids"] = self.tokens
        if self.prefix is not None:
            (req["prefix_cache_queries"], req["prefix_cache_hits"],
             req["prefix_cache_preempted_hits"]) = self.prefix
        return req


class Recorder:
    """Cheap per-step bookkeeping: timeline samples, KV integral, ITL histogram, loads,
    the step log (``record_steps``)."""

    __slots__ = ("sample_dt", "num_blocks", "next_sample", "rows", "itl", "kv_integral", "kv_max",
                 "load_time", "tokens", "loads", "steps", "busy", "held", "adapters_max",
                 "step_rows", "prefix")

    def __init__(self, sample_dt: float, num_blocks: int, record_steps: bool = True,
                 prefix: bool = False):
        self.sample_dt = sample_dt
        self.num_blocks = num_blocks
        self.next_sample = 0.0
        self.rows: list[tuple] = []
        self.itl = ITLHistogram()
        self.kv_integral = 0.0
        self.kv_max = 0.0
        self.load_time = 0.0
        self.tokens = 0
        self.loads = 0
        self.steps = 0
        self.busy = 0.0   # seconds of steps (a TTFT's steps: twin.results.spread)
        self.held = held_seconds()   # the same by what kept the oldest waiting request out
        self.adapters_max = 0   # the most distinct adapters in one step (twin.results.extrapolation)
        self.step_rows: list[tuple] | None = [] if record_steps else None
        self.prefix = prefix    # sample the cached blocks too (PREFIX_TIMELINE_COLUMNS)

    def sample(self, t: float, sched) -> None:
        """A timeline row at ``t`` (``sched``: the scheduler); the next one is due
        ``sample_dt`` later."""
        row = (t, sched.num_running, sched.num_waiting,
               sched.kv_used_blocks() / sched.pool.num_blocks, self.tokens, self.loads,
               sched.num_preemptions)
        if self.prefix:
            row += (sched.kv_cached_blocks() / sched.pool.num_blocks,)
        self.rows.append(row)
        self.next_sample = t + self.sample_dt

    def load(self, n: int, seconds: float) -> None:
        """``n`` adapter loads taking ``seconds`` in a step."""
        self.load_time += seconds
        self.loads += n

    def step(self, plan, start: float, dur: float, steps: int, after_idle: bool,
             extra: tuple = ()) -> None:
        """``plan`` ran from ``start`` for ``dur`` seconds (``steps`` identical decode steps
        in one jump for the twin); ``extra``: the clock's own step-log columns."""
        frac = plan.kv_blocks / self.num_blocks
        self.kv_integral += frac * dur
        if frac > self.kv_max:
            self.kv_max = frac
        self.tokens += plan.prefill_tokens + plan.decode_n * steps
        self.steps += steps
        self.busy += dur
        self.held[plan.held] += dur
        if plan.adapters > self.adapters_max:
            self.adapters_max = plan.adapters
        if self.step_rows is not None:
            self.step_rows.append((start, dur, steps, plan.prefill_tokens, plan.decode_n,
                                   len(plan.explicit), plan.adapters, len(plan.loads),
                                   len(plan.preempted), plan.blocked, plan.held, after_idle,
                                   *extra))


def default_sample_dt(horizon_s: float) -> float:
    """The timeline's step when none is given: the run's span (its window, else its last
    arrival) over 2000 samples, at least 50 ms."""
    return max(horizon_s / 2000.0, 0.05)


def trace_horizon(trace: pd.DataFrame, window_s: float | None) -> float:
    """A run's span for its timeline: the window, else the trace's last arrival."""
    if window_s is not None:
        return window_s
    return float(trace["arrival_s"].iloc[-1]) if len(trace) else 0.0


def build_result(trace: pd.DataFrame, out: Outcomes, rec: Recorder, sched, cache, *,
                 kv_tokens: int, duration: float, window_s: float | None, max_model_len: int,
                 meta: dict, step_columns: list[str] = STEP_COLUMNS,
                 dispersion=None, autocorrelation=None, frontend=None) -> RunResult:
    """The run's :class:`RunResult` from what ``out`` and ``rec`` recorded (``sched`` and
    ``cache``: the server's scheduler and adapter cache, for their counters).
    ``dispersion``: the twin's ITL percentiles from its prices mixed with the profile's
    step-time spread (``ITLHistogram.percentile``), and with ``autocorrelation`` too its TTFT
    median and p99 (``twin.results.spread``); None (the executor's measured steps, a
    profile without them): as recorded. ``frontend`` (``twin.costs.frontend.Frontend``):
    the times a client sees (its per-request delay,
    :meth:`~twin.costs.frontend.Frontend.client_times`) and, with metrics scrapes, the mean
    ITL a streaming client times (:meth:`~twin.costs.frontend.Frontend.itl_scale`)."""
    req = out.table(trace)
    if frontend is not None:   # the table is this run's own: shifted in place
        frontend.client_times(req)
        if window_s is None and len(req):
            # run to completion, a run lasts until the client gets the last response, as
            # vllm bench serve's duration does (the engine's end is a delay earlier)
            last = np.nanmax(req["finish_s"].to_numpy(dtype=float), initial=0.0)
            duration = max(duration, float(last))
    timeline = pd.DataFrame(rec.rows, columns=PREFIX_TIMELINE_COLUMNS if rec.prefix
                            else TIMELINE_COLUMNS)
    timeline = timeline.drop_duplicates("time_s", keep="last").reset_index(drop=True)
    growth = waiting_growth(timeline, req, window_s)
    total_time = max(duration, 1e-9)
    itl_bins = rec.itl.bins(dispersion)
    summary = summarize(
        req, duration_s=duration, window_s=window_s,
        itl_p50_s=weights_percentile(itl_bins, 50),
        itl_p99_s=weights_percentile(itl_bins, 99),
        ttft_spread=None if dispersion is None or autocorrelation is None else
        (dispersion, autocorrelation, rec.busy / max(rec.steps, 1)),
        loads={"from_disk": cache.loads_from_disk, "from_host": cache.loads_from_host,
               "time_s": rec.load_time},
        preemptions=sched.num_preemptions,
        kv={"capacity_tokens": int(kv_tokens), "usage_mean": rec.kv_integral / total_time,
            "usage_max": rec.kv_max},
        waiting_growth=growth, max_model_len=max_model_len)
    if out.error is not None:   # requests can fail: they are answered, not unfinished
        summary["failed"] = int((req["status"] == "failed").sum())
        summary["unfinished"] -= summary["failed"]
    summary["steps"] = rec.steps
    summary["waiting_held_by"] = waiting_held_by(rec.held, rec.busy)
    summary["step_adapters_max"] = rec.adapters_max
    if isinstance(cache, AdapterCache) and getattr(sched, "enable_lora", False):
        # vLLM's slots: the trace's adapters that share each one (notes.slot_bound_note)
        summary["adapters_per_slot"] = trace["adapter"].nunique() / cache.max_loras
    if getattr(cache, "running_sets", None) is not None:
        # the distinct (running, waiting) adapter-set labels its steps ran with (vLLM's
        # lora_requests_info series; 1 with no adapter: the empty pair)
        summary["lora_running_sets"] = n_sets = len(cache.running_sets)
        if frontend is not None and frontend.scrapes:
            # what a streaming client times: the scrapes merge tokens into chunks and hold
            # requests and first tokens (means only)
            itl = summary["itl_ms"]
            scale = frontend.itl_scale(n_sets, duration, itl["mean"] / 1000)
            wait_ms = 1000 * frontend.ttft_wait_s(n_sets, duration)
            itl["mean"] *= scale
            summary["ttft_ms"]["mean"] += wait_ms
            # kept for a result that combines servers (server_stalls_in_means)
            summary["frontend_stalls"] = {"itl_scale": scale, "ttft_wait_ms": wait_ms}
    if out.prefix is not None:
        summary.update(prefix_cache_summary(req, sched.prefix is not None))
    steps_df = None
    if rec.step_rows is not None:
        steps_df = pd.DataFrame(rec.step_rows, columns=step_columns)
    return RunResult(requests=req, summary=summary, timeline=timeline, steps=steps_df,
                     meta=meta, itl_bins=itl_bins)


def server_tallies(summaries: list[dict]) -> dict:
    """The recorder's tallies of several servers as one (a deployment's or a fleet's
    summary, ``twin.policies.combine.combine``): steps summed, what held the queues
    weighted by busy time, the largest step and how far past its calibration each went."""
    out = {"steps": sum(s.get("steps", 0) for s in summaries),
           "step_adapters_max": max((s.get("step_adapters_max", 0) for s in summaries),
                                    default=0)}
    held = [s.get("waiting_held_by") for s in summaries]
    if held and all(held):
        out["waiting_held_by"] = queue_head.combined(held)
    beyond = extrapolation.combined([s.get("extrapolated") for s in summaries])
    if beyond is not None:
        out["extrapolated"] = beyond
    return out


def server_stalls_in_means(summary: dict, servers: list) -> None:
    """Put each server's frontend stalls into a combined result's mean ITL and TTFT.

    A deployment's or a fleet's summary is recomputed from the requests of all its servers
    (``twin.policies.combine.combine``): the engines' times, without the stalls each
    server's metrics scrapes add to what its clients measure (``summary["frontend_stalls"]``,
    recorded above). Each server's decode gaps count at its own scale and each of its
    completed requests waits its own mean wait; ``servers``: the servers' RunResults."""
    if not any("frontend_stalls" in r.summary for r in servers):
        return
    gaps_all, extra_itl, extra_ttft = 0, 0.0, 0.0
    for r in servers:
        req = r.requests
        done = req["status"].to_numpy() == "finished"
        gaps = decode_gaps(req["generated_tokens"].to_numpy()[done])
        gaps_all += gaps
        stall = r.summary.get("frontend_stalls")
        if stall is None:
            continue
        itl = r.summary["itl_ms"]["mean"]
        if gaps:   # its engine's gaps, and the share the stalls add to them
            extra_itl += gaps * itl * (1 - 1 / stall["itl_scale"])
        extra_ttft += int(done.sum()) * stall["ttft_wait_ms"]
    done_all = summary["completed"]
    itl0, ttft0 = summary["itl_ms"]["mean"], summary["ttft_ms"]["mean"]
    if gaps_all:
        summary["itl_ms"]["mean"] = itl0 + extra_itl / gaps_all
    if done_all:
        summary["ttft_ms"]["mean"] = ttft0 + extra_ttft / done_all
    summary["frontend_stalls"] = {
        "itl_scale": summary["itl_ms"]["mean"] / itl0 if gaps_all and itl0 else 1.0,
        "ttft_wait_ms": extra_ttft / done_all if done_all else 0.0}

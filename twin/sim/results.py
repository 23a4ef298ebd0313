"""RunResult: per-request table, summary in ``vllm bench serve`` terms, timeline.

Metric definitions follow ``vllm bench serve``: throughput over the measured window counts
completed requests only; TTFT = first token − arrival; TPOT = (E2E − TTFT)/(output − 1)
over requests with more than one output token; ITL = gaps between consecutive tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

STARVATION_THRESHOLD = 0.9   # achieved / offered total throughput (arXiv 2508.08343)


@dataclass
class RunResult:
    requests: pd.DataFrame
    summary: dict
    timeline: pd.DataFrame
    steps: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)

    # -- persistence -----------------------------------------------------------------------
    def save(self, out_dir: str | Path, plot: bool = False, *, kind: str = "run") -> Path:
        """Write requests.parquet, summary.json, timeline.parquet (+ steps, plot) atomically
        through :mod:`twin.outputs`: into a temporary sibling directory renamed at the end;
        an existing ``out_dir`` is replaced only when it is a twin ``kind`` output."""
        from twin.outputs import staged_dir

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
        (d / "summary.json").write_text(
            json.dumps({"summary": self.summary, "meta": self.meta}, indent=2,
                       default=_json_default) + "\n")
        if plot:
            from twin.sim.plot import plot_timeline

            plot_timeline(self, d / "timeline.png")

    def format_summary(self) -> str:
        return format_summary(self.summary)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o))


def _stats(x: np.ndarray, scale: float = 1000.0) -> dict:
    if len(x) == 0:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {"mean": float(np.mean(x) * scale), "median": float(np.median(x) * scale),
            "p99": float(np.percentile(x, 99) * scale)}


def summarize(req: pd.DataFrame, *, duration_s: float, window_s: float | None,
              itl_p50_s: float, itl_p99_s: float, loads: dict, preemptions: int,
              kv: dict, waiting_growth: int) -> dict:
    """Summary metrics of a run (times in ms, throughputs per second)."""
    done = req["status"].to_numpy() == "finished"
    d = req[done]
    arrival_limit = window_s if window_s is not None else np.inf
    offered_mask = req["arrival_s"].to_numpy() <= arrival_limit
    offered_span = window_s if window_s is not None else max(
        float(req["arrival_s"].max()) if len(req) else 0.0, 1e-9)
    offered_tps = float((req["prompt_tokens"][offered_mask].sum()
                         + req["output_tokens"][offered_mask].sum()) / offered_span)
    in_tok = int(d["prompt_tokens"].sum())
    out_tok = int(d["generated_tokens"].sum())
    dur = max(duration_s, 1e-9)
    ttft = (d["first_token_s"] - d["arrival_s"]).to_numpy()
    e2e = (d["finish_s"] - d["arrival_s"]).to_numpy()
    multi = d["generated_tokens"].to_numpy() > 1
    decode_span = (d["finish_s"] - d["first_token_s"]).to_numpy()
    tpot = decode_span[multi] / (d["generated_tokens"].to_numpy()[multi] - 1)
    gaps = int((d["generated_tokens"].to_numpy() - 1).clip(min=0).sum())
    total_tps = (in_tok + out_tok) / dur
    achieved = total_tps / offered_tps if offered_tps > 0 else 1.0
    starving_throughput = achieved < STARVATION_THRESHOLD
    starving_queue = waiting_growth > max(50, 0.02 * int(offered_mask.sum()))
    return {
        "duration_s": float(duration_s),
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
        "ttft_ms": _stats(ttft),
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
    }


def format_summary(s: dict) -> str:
    """The summary as ``vllm bench serve`` prints it, plus twin's extras."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result (twin) ", n=w, c="=")]

    def row(k, v, fmt="{:<40}{:>10}"):
        lines.append(fmt.format(k, v))

    row("Successful requests:", s["completed"])
    row("Unfinished requests:", s["unfinished"])
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
    verdict = (f"STARVING ({s['starving_reason']}; {100 * s['achieved_over_offered']:.1f}% "
               "of offered)" if s["starving"] else
               f"keeps up ({100 * s['achieved_over_offered']:.1f}% of offered)")
    lines.append(f"Verdict: {verdict}")
    lines.append("=" * w)
    return "\n".join(lines)


def waiting_growth(timeline: pd.DataFrame, req: pd.DataFrame, window_s) -> int:
    """Growth of the waiting queue over the second half of the arrival span (one of the
    two starvation signals: a queue that keeps growing does not keep up)."""
    if len(req) == 0 or len(timeline) < 2:
        return 0
    end = window_s if window_s is not None else float(req["arrival_s"].max())
    t = timeline["time_s"].to_numpy()
    w = timeline["waiting"].to_numpy()
    at_end = w[min(np.searchsorted(t, end, side="right") - 1, len(w) - 1)]
    at_mid = w[max(np.searchsorted(t, end / 2, side="right") - 1, 0)]
    return int(at_end - at_mid)


def request_table(trace: pd.DataFrame, out, status) -> pd.DataFrame:
    """The per-request result table (both clocks): the trace's columns plus what happened.

    ``out`` holds per-request arrays ``output``, ``generated``, ``first_scheduled``,
    ``first_token``, ``finish``, ``preemptions`` (times < 0 = never); ``status`` names."""
    df = pd.DataFrame({
        "request_id": trace["request_id"].to_numpy(),
        "arrival_s": trace["arrival_s"].to_numpy(),
        "adapter": trace["adapter"].array,   # its own (string) storage, not 10^5 objects
        "prompt_tokens": trace["prompt_tokens"].to_numpy(),
        "output_tokens": out.output,
        "generated_tokens": out.generated,
        "first_scheduled_s": out.first_scheduled,
        "first_token_s": out.first_token,
        "finish_s": out.finish,
        "preemptions": out.preemptions,
        "status": status,
    })
    for col in ("first_scheduled_s", "first_token_s", "finish_s"):
        df.loc[df[col] < 0, col] = np.nan
    return df

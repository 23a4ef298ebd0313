"""One :class:`RunResult` from a split run's processes: the clients' requests in trace
order (with a ``client`` column), their step logs and timelines stacked (with
``client``), the summary recomputed over all requests (``twin.results.summarize``), and
the contract's tables in ``extras``: ``base_batches`` and ``client_steps``.

Clocks: every client's logical clock starts when the barrier releases the processes, so
request times of different clients are on one axis; base batch instants are taken on the
same monotonic clock (``time.perf_counter``, system-wide on Linux) and given relative to
the earliest client start.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.executor.split.base import BATCH_COLUMNS
from twin.executor.split.client import SPLIT_STEP_COLUMNS
from twin.results.itl_histogram import ITLHistogram
from twin.results.recorder import server_tallies
from twin.results.results import RunResult, summarize

CLIENT_STEP_COLUMNS = ["client", "step", "t_start", "t_end", "num_tokens", "num_decode",
                       "num_prefill_tokens", "context_tokens", "transfer_s", "base_wait_s",
                       "local_s"]


def _requests(trace: pd.DataFrame, who: np.ndarray, payloads: list[dict]) -> pd.DataFrame:
    """The clients' request tables back in trace order, with their client; prompts as the
    trace gives them, an adapter's virtual tokens (prompt/prefix tuning) apart."""
    parts = []
    for c, p in enumerate(payloads):
        req = p["result"].requests.copy()
        req.insert(0, "client", c)
        req.index = np.nonzero(who == c)[0]
        parts.append(req)
    req = pd.concat(parts).sort_index().reset_index(drop=True)
    prompt = trace["prompt_tokens"].to_numpy(np.int64)
    req["virtual_tokens"] = req["prompt_tokens"].to_numpy(np.int64) - prompt
    req["prompt_tokens"] = prompt
    return req


def _steps(payloads: list[dict]) -> pd.DataFrame:
    """The clients' step logs stacked, with ``client`` and the split counters."""
    parts = []
    for c, p in enumerate(payloads):
        steps = p["result"].steps.copy()
        split = pd.DataFrame(p["split_rows"], columns=SPLIT_STEP_COLUMNS)
        steps = pd.concat([steps.reset_index(drop=True), split], axis=1)
        steps.insert(0, "client", c)
        steps.insert(1, "step", np.arange(len(steps)))
        parts.append(steps)
    return pd.concat(parts, ignore_index=True)


def client_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """The contract's per-client-step table from the stacked step log."""
    return pd.DataFrame({
        "client": steps["client"], "step": steps["step"], "t_start": steps["start_s"],
        "t_end": steps["start_s"] + steps["duration_s"], "num_tokens": steps["num_tokens"],
        "num_decode": steps["decode_seqs"], "num_prefill_tokens": steps["prefill_tokens"],
        "context_tokens": steps["context_tokens"], "transfer_s": steps["transfer_s"],
        "base_wait_s": steps["base_wait_s"], "local_s": steps["local_s"]},
        columns=CLIENT_STEP_COLUMNS)


def _summary(req: pd.DataFrame, steps: pd.DataFrame, payloads: list[dict],
             config: ServingConfig) -> dict:
    """``summarize`` over every client's requests; ITL percentiles from every decode step
    (weighted by its decodes, as the executor's recorder does); loads, preemptions and KV
    figures summed (usage: capacity-weighted)."""
    itl = ITLHistogram()
    for d, n in zip(steps["duration_s"], steps["decode_seqs"]):
        if n:
            itl.add(float(d), float(n))
    sums = [p["result"].summary for p in payloads]
    cap = [s["kv_cache"]["capacity_tokens"] for s in sums]
    duration = max(s["duration_s"] for s in sums)
    summary = summarize(
        req, duration_s=duration, window_s=None,
        itl_p50_s=itl.percentile(50), itl_p99_s=itl.percentile(99),
        loads={k: sum(s["adapter_loads"][k] for s in sums)
               for k in ("from_disk", "from_host", "time_s")},
        preemptions=sum(s["preemptions"] for s in sums),
        kv={"capacity_tokens": int(sum(cap)),
            "usage_mean": float(np.average([s["kv_cache"]["usage_mean"] for s in sums],
                                           weights=cap)),
            "usage_max": max(s["kv_cache"]["usage_max"] for s in sums)},
        waiting_growth=max(s["waiting_growth"] for s in sums),
        max_model_len=config.max_model_len)
    if "failed" in sums[0]:
        summary["failed"] = int((req["status"] == "failed").sum())
        summary["unfinished"] -= summary["failed"]
    summary.update(server_tallies(sums))   # steps, what held the queues, the largest step
    return summary


def merge_results(trace: pd.DataFrame, who: np.ndarray, payloads: list[dict], base: dict,
                  trainer: dict | None, config: ServingConfig, meta: dict) -> RunResult:
    """The run's :class:`RunResult` (see the module docstring)."""
    req = _requests(trace, who, payloads)
    steps = _steps(payloads)
    t0 = min(p["t0"] for p in payloads)
    batches = pd.DataFrame(base["batches"], columns=BATCH_COLUMNS)
    batches["t_start"] -= t0
    timeline = pd.concat([p["result"].timeline.assign(client=c)
                          for c, p in enumerate(payloads)], ignore_index=True)
    summary = _summary(req, steps, payloads, config)
    lin = batches[batches["kind"] == "lin"]
    summary["split"] = {
        "clients": len(payloads), "base_bytes": base["report"]["bytes"],
        "base_batches": len(batches),
        "mean_clients_per_batch": float(lin["clients"].mean()) if len(lin) else 0.0,
        "batches_with_several_clients": int((lin["clients"] > 1).sum()),
        "transfer_s": float(steps["transfer_s"].sum()),
        "base_wait_s": float(steps["base_wait_s"].sum()),
        "local_s": float(steps["local_s"].sum()),
    }
    trainer_steps = None
    if trainer is not None:
        summary["trainer"] = {k: v for k, v in trainer.items()
                              if k not in ("losses", "steps", "columns")}
        trainer_steps = pd.DataFrame(trainer["steps"], columns=trainer["columns"])
        trainer_steps[["t_start", "t_end"]] -= t0
    meta = {**meta, "config": config.to_dict(), "profile": "executor", "executor": True,
            "policy": "split", "device": "cpu",
            "client_meta": [p["result"].meta for p in payloads]}
    extras = {"base_batches": batches, "client_steps": client_steps(steps),
              "base_report": base["report"], "base_sha256_after": base["sha256_after"],
              "clients": [{"adapters": p["adapters"], "tensors": p["tensors"]}
                          for p in payloads],
              "trainer_steps": trainer_steps}
    return RunResult(requests=req, summary=summary, timeline=timeline, steps=steps,
                     meta=meta, extras=extras)

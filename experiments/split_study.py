"""Where split execution (Symbiosis, ``twin.policies.split``) wins and loses against vLLM's
slots, on the H100 profile (issue 19): ``compare_policies.py --split`` runs it.

- **A. few clients, short contexts** (S-LoRA's workload, 8 adapters, 10 req/s): vLLM on
  one GPU; split with 4 clients on the base's GPU; split with 4 clients on GPUs of their own.
- **B. long contexts** (16 adapters, 4 req/s, prompts 2000-6000, outputs 200-600): vLLM
  on one and three GPUs; split with 8 clients on the base's GPU; split with 3 clients, one
  on the base's GPU and two on GPUs that hold no weights (all their memory is KV); split
  with 8 CPU clients (KV in host memory, one GPU).
- **C. heterogeneous clients** (A's workload): 8 clients on the GPU, against half of them
  on the CPU.
- **D. mixed PEFT** (8 adapters: 4 LoRA, 2 IA³, 2 prefix tuning with 16 virtual tokens):
  split serves all; vLLM serves the LoRA ones only.
- **E. fine-tuning beside inference** (A's workload, split with 4 clients): a LoRA
  fine-tuning job of 2048-token steps at 2k and 8k tokens/s on the same base.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.policies import get_policy
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import powerlaw_trace

RANK = 8


def _config(n: int, max_model_len: int = 1024) -> ServingConfig:
    return ServingConfig(max_loras=n, max_cpu_loras=n, max_lora_rank=RANK,
                         max_model_len=max_model_len, preload_adapters=True)


def _row(study: str, label: str, run, offered: float) -> dict:
    s = run.result.summary
    sp = s.get("split", {})
    mem = run.memory_split()["per_gpu"]
    return {"study": study, "setup": label, "gpus": int(run.gpus),
            "pct_offered": 100 * s["total_throughput"] / offered if offered else np.nan,
            "req_per_s": s["request_throughput"], "ttft_p50_ms": s["ttft_ms"]["median"],
            "ttft_p99_ms": s["ttft_ms"]["p99"], "tpot_p50_ms": s["tpot_ms"]["median"],
            "tpot_p99_ms": s["tpot_ms"]["p99"], "starving": bool(s["starving"]),
            "preemptions": s["preemptions"], "kv_gib_per_gpu": mem["kv_gib"],
            "transfer_share": sp.get("transfer_share", np.nan),
            "base_queue_share": sp.get("base_queue_share", np.nan),
            "base_busy": sp.get("base_busy_fraction", np.nan),
            "clients_per_batch": sp.get("mean_clients_per_batch", np.nan),
            "finetune_tok_s": sp.get("finetune_tokens_per_s", np.nan)}


def _offered(trace: pd.DataFrame, duration: float) -> float:
    return float((trace["prompt_tokens"] + trace["output_tokens"]).sum() / duration)


def _runs(study, trace, cat, cfg, profile, duration, setups, offered=None, log=print):
    rows = []
    offered = _offered(trace, duration) if offered is None else offered
    for label, policy, gpus, opts in setups:
        t0 = time.time()
        run = get_policy(policy, **opts).simulate(trace, cfg.replace(policy=policy), profile,
                                                  cat, gpus=gpus, window_s=duration)
        rows.append(_row(study, label, run, offered))
        log(f"  {study} {label}: {rows[-1]['pct_offered']:.0f}% of offered, TPOT p50 "
            f"{rows[-1]['tpot_p50_ms']:.1f} ms ({time.time() - t0:.0f} s)")
    return rows


def _long(rng: np.random.Generator, n: int) -> np.ndarray:
    """B's lengths: prompts 2000-6000, outputs 200-600 (uniform)."""
    return np.column_stack([rng.integers(2000, 6000, n), rng.integers(200, 600, n)])


def study(profile, duration: float = 300.0, log=print) -> pd.DataFrame:
    """Every row of the module docstring, one DataFrame."""
    rows = []
    a = powerlaw_trace(8, 10.0, alpha=1.0, duration_s=duration, seed=0)
    cat_a = AdapterCatalog.uniform(sorted(a["adapter"].dropna().unique()), RANK)
    cfg = _config(8)
    rows += _runs("A few clients, short", a, cat_a, cfg, profile, duration, [
        ("vllm, 1 GPU", "vllm", None, {}),
        ("split, 4 clients on the base's GPU", "split", None, {"clients": 4}),
        ("split, 4 clients on own GPUs", "split", None, {"clients": 4, "devices": "gpu"})],
        log=log)
    b = powerlaw_trace(16, 4.0, alpha=1.0, duration_s=duration, seed=1,
                       lengths=_long)
    cat_b = AdapterCatalog.uniform(sorted(b["adapter"].dropna().unique()), RANK)
    rows += _runs("B long contexts", b, cat_b, _config(16, 8192), profile, duration, [
        ("vllm, 1 GPU", "vllm", None, {}), ("vllm, 3 GPUs", "vllm", 3, {}),
        ("split, 8 clients on the base's GPU", "split", None, {"clients": 8}),
        ("split, 3 clients: base's GPU + 2 GPUs without weights", "split", None,
         {"clients": 3, "devices": "same,gpu,gpu"}),
        ("split, 8 CPU clients (KV in host memory)", "split", None,
         {"clients": 8, "devices": "cpu"})], log=log)
    rows += _runs("C heterogeneous clients", a, cat_a, cfg, profile, duration, [
        ("split, 8 clients on the GPU", "split", None, {"clients": 8}),
        ("split, 4 on the GPU + 4 on the CPU", "split", None,
         {"clients": 8, "devices": "same,cpu"})], log=log)
    rows += mixed_peft(a, profile, duration, log)
    rows += _runs("E fine-tuning beside inference", a, cat_a, cfg, profile, duration, [
        (f"split, 4 clients + job at {r // 1000}k tok/s", "split", None,
         {"clients": 4, "finetune_tokens_per_s": float(r), "finetune_tokens_per_step": 2048})
        for r in (2000, 8000)], log=log)
    return pd.DataFrame(rows)


def mixed_peft(trace: pd.DataFrame, profile, duration: float, log=print) -> list[dict]:
    """D: split serves LoRA, IA³ and prefix-tuning adapters side by side; vLLM only the
    LoRA ones (the rest of the offered load is unserved)."""
    names = sorted(trace["adapter"].dropna().unique())
    kinds = ["LORA"] * 4 + ["IA3"] * 2 + ["PREFIX_TUNING"] * 2
    cat = AdapterCatalog(pd.DataFrame({
        "adapter": names, "rank": RANK, "kind": kinds[:len(names)],
        "virtual_tokens": [16 if k == "PREFIX_TUNING" else 0 for k in kinds[:len(names)]]}))
    offered = _offered(trace, duration)
    lora = [a for a, k in zip(names, kinds) if k == "LORA"]
    sub = trace[trace["adapter"].isin(lora) | trace["adapter"].isna()].reset_index(drop=True)
    sub["request_id"] = np.arange(len(sub))
    rows = _runs("D mixed PEFT", sub, AdapterCatalog.uniform(lora, RANK), _config(8),
                 profile, duration, [("vllm, 1 GPU (LoRA adapters only)", "vllm", None, {})],
                 offered=offered, log=log)
    rows += _runs("D mixed PEFT", trace, cat, _config(8), profile, duration, [
        ("split, 4 clients (LoRA + IA3 + prefix)", "split", None, {"clients": 4})],
        offered=offered, log=log)
    return rows


COLUMNS = [("setup", "setup", "{}"), ("gpus", "GPUs", "{:d}"),
           ("pct_offered", "% offered", "{:.0f}"), ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
           ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"), ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
           ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"), ("kv_gib_per_gpu", "KV GiB/GPU", "{:.1f}"),
           ("transfer_share", "transfer", "{:.0%}"), ("base_queue_share", "base queue", "{:.0%}"),
           ("clients_per_batch", "per batch", "{:.2f}"),
           ("finetune_tok_s", "job tok/s", "{:.0f}")]


def markdown(df: pd.DataFrame) -> str:
    """One table per study."""
    out = []
    for name, part in df.groupby("study", sort=False):
        out.append(f"**{name}**\n")
        out.append("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
        out.append("|" + "|".join("---" if k == "setup" else "---:" for k, _, _ in COLUMNS) + "|")
        for _, r in part.iterrows():
            cells = []
            for k, _, fmt in COLUMNS:
                v = r[k]
                ok = not (isinstance(v, float) and np.isnan(v))
                cells.append(fmt.format(int(v) if fmt == "{:d}" else v) if ok else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)

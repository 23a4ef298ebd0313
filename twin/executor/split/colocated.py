"""What co-located fine-tuning costs inference: the same split run without and with a
training client sharing the base executor.

:func:`finetune_interference` serves one workload twice (same trace, adapters, clients)
and reports the inference clients' mean/median ITL and mean TTFT each time, the
slowdowns in percent, and the trainer's tokens/s and losses. On a CPU box the figure
mixes two effects: the trainer's GEMMs queue at the base (what Symbiosis measures) and
its processes take CPU from the others (what a GPU would not); the base log's
``t_queue_s`` separates the first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.executor.split.driver import execute_split
from twin.executor.split.trainer import TrainerSpec


def _latency(result) -> dict:
    s = result.summary
    batches = result.extras["base_batches"]
    return {"itl_mean_ms": s["itl_ms"]["mean"], "itl_median_ms": s["itl_ms"]["median"],
            "ttft_mean_ms": s["ttft_ms"]["mean"], "completed": s["completed"],
            "total_throughput": s["total_throughput"],
            "base_queue_ms_mean": float(batches["t_queue_s"].mean() * 1000)
            if len(batches) else float("nan")}


def _pct(new: float, old: float) -> float:
    return float(100.0 * (new / old - 1.0)) if old and np.isfinite(old) else float("nan")


def finetune_interference(trace: pd.DataFrame, config: ServingConfig, model, adapters=None,
                          *, clients: int = 2, trainer: TrainerSpec | None = None,
                          seed: int = 0, **kwargs) -> dict:
    """Inference latency without and with a training client (see the module docstring).
    ``kwargs`` go to :func:`execute_split` (``dtype``, ``timeout_s``, ...)."""
    trainer = trainer or TrainerSpec(seed=seed)
    alone = execute_split(trace, config, model, adapters, clients=clients, seed=seed,
                          **kwargs)
    shared = execute_split(trace, config, model, adapters, clients=clients, seed=seed,
                           trainer=trainer, **kwargs)
    a, b = _latency(alone), _latency(shared)
    t = shared.summary["trainer"]
    same = bool((alone.requests["generated_tokens"].to_numpy()
                 == shared.requests["generated_tokens"].to_numpy()).all())
    return {
        "clients": clients, "requests": int(len(trace)),
        "without_trainer": a, "with_trainer": b,
        "itl_slowdown_pct": _pct(b["itl_mean_ms"], a["itl_mean_ms"]),
        "ttft_slowdown_pct": _pct(b["ttft_mean_ms"], a["ttft_mean_ms"]),
        "train_tokens_per_s": float(t["train_tokens_per_s"]),
        "train_steps": int(t["train_steps"]),
        "train_first_loss": float(t["first_loss"]), "train_last_loss": float(t["last_loss"]),
        "same_generated_tokens": same,
        "base_unchanged": shared.extras["base_report"]["sha256"]
        == shared.extras["base_sha256_after"],
    }

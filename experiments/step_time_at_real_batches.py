"""Which step-time terms the real H100 runs want, at the real runs' own batches.

The vLLM calibration (``twin.calibrate.step_fit``) fits the step-time model with the twin
in the loop: each run's batches are the twin's, so a term the model lacks shows up as a
wrong batch that feeds back on itself (a step 5% too slow near the saturation frontier
makes the twin's batch 20% too large). This script asks the same question without the
loop, from what every real run measured (``real_runs_llama31_8b.csv``): its mean step time
(mean TPOT), and by Little's law its mean batch, decode sequences = output tokens/s x TPOT
and prefill tokens = input tokens/s x TPOT per step. The distinct adapters in a step are
the expected number of adapters with a running request among that many, each adapter's
share its request rate (Poisson occupancy), capped at ``max_loras``.

Each term set is fitted (non-negative least squares on relative errors) on the
``digital_twin_modelling`` runs with the KV read held at its physical value (a 16-bit
Llama-3.1-8B token's K and V over 2 TB/s) and one cost per token, prefill and decode
alike; then the held-out ``ml_modelling_test`` runs' mean TPOT is predicted at their
measured batches. SMAPE median (all, keep-up, starved), and the median signed error of
the runs that keep up by batch size. ``waiting_skipped`` is each run's mean waiting queue,
which vLLM's waiting loop walks every step once the step's adapters fill ``max_loras``.

    python experiments/step_time_at_real_batches.py     # a second; needs ../shared data

The last line is one JSON object: each term set's held-out SMAPE median.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import nnls

RUNS = Path(__file__).resolve().parents[2] / "shared" / "data" / "vllm-h100" / \
    "real_runs_llama31_8b.csv"
KV_READ_S = 6.5536e-8    # 131,072 bytes of K and V per token at 2 TB/s
BASE = ("const", "tokens", "adapters", "lora_slots", "lora_token_rank", "decode_context")
TERM_SETS = {
    "linear": BASE,
    "adapters_squared": BASE + ("adapters_squared",),
    "adapter_tokens_capped": BASE + ("adapter_tokens_capped",),
    "lora_slot_tokens": BASE + ("lora_slot_tokens",),
    "tokens_past_ridge": BASE + ("tokens_past_ridge",),
    "adapters_squared_waiting": BASE + ("adapters_squared", "waiting_skipped"),
}
BATCH_BINS = [0, 16, 32, 64, 128, 10_000]


def distinct_adapters(rates: str, counts: str, running: float, max_loras: int) -> float:
    w = np.repeat(np.array(rates.split(), float), np.array(counts.split(), int))
    return min(float(np.sum(1 - np.exp(-running * w / w.sum()))), max_loras)


def compositions(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's mean step: its time and features at its measured batch."""
    t = runs["mean_tpot_ms"].to_numpy() / 1000
    dec = runs["output_throughput_tps"].to_numpy() * t
    tok = dec + runs["input_throughput_tps"].to_numpy() * t
    a = np.array([distinct_adapters(r.rate_values_rps, r.rate_counts, n, r.max_loras)
                  for r, n in zip(runs.itertuples(), dec)])
    ctx = dec * (runs["pool_mean_input_tokens"] + runs["pool_mean_output_tokens"] / 2)
    return pd.DataFrame({
        "set": runs["experiment_set"].to_numpy(), "step_s": t, "decode_seqs": dec,
        "keeps_up": (runs["achieved_over_offered"] > 0.9).to_numpy(),
        "const": 1.0, "tokens": tok, "adapters": a, "lora_slots": runs["max_loras"],
        "lora_token_rank": tok * runs["max_lora_rank"], "decode_context": ctx,
        "adapters_squared": a * a, "adapter_tokens_capped": a * np.minimum(tok, 1024),
        "lora_slot_tokens": tok * runs["max_loras"],
        "tokens_past_ridge": np.maximum(tok - 512, 0),
        # the requests vLLM's waiting loop visits each step: the run's mean waiting queue
        # (a scrape of vllm:num_requests_waiting; where the step's adapters fill max_loras
        # the loop passes over every one of them)
        "waiting_skipped": runs["num_waiting_mean"].fillna(0).to_numpy()})


def fit(df: pd.DataFrame, terms) -> dict:
    free = [k for k in terms if k != "decode_context"]
    y = 1 - df["decode_context"].to_numpy() * KV_READ_S / df["step_s"].to_numpy()
    coef, _ = nnls(df[free].to_numpy() / df["step_s"].to_numpy()[:, None], y)
    return {**dict(zip(free, coef)), "decode_context": KV_READ_S}


def report(df: pd.DataFrame, coef: dict) -> dict:
    pred = sum(df[k].to_numpy() * v for k, v in coef.items())
    real = df["step_s"].to_numpy()
    smape = 200 * np.abs(pred - real) / (pred + real)
    keep = df["keeps_up"].to_numpy()
    err = pd.Series((pred / real - 1) * 100, index=df.index)[keep]
    bias = err.groupby(pd.cut(df["decode_seqs"][keep], BATCH_BINS), observed=True).median()
    return {"smape_median": float(np.median(smape)),
            "keep_up": float(np.median(smape[keep])), "starved": float(np.median(smape[~keep])),
            "keep_up_bias_by_batch": {str(k): round(float(v), 1) for k, v in bias.items()}}


def main() -> None:
    if not RUNS.exists():
        sys.exit(f"needs {RUNS} (the shared real-run data)")
    runs = pd.read_csv(RUNS)
    runs = runs[(runs["status"] == "ok") & runs["anomaly"].isna()]
    df = compositions(runs)
    fit_set, test = df[df["set"] == "digital_twin_modelling"], df[df["set"] != "digital_twin_modelling"]
    print(f"{len(fit_set)} fit runs, {len(test)} held out; mean TPOT at the measured batches")
    out = {}
    for name, terms in TERM_SETS.items():
        coef = fit(fit_set, terms)
        f, h = report(fit_set, coef), report(test, coef)
        out[f"{name}_tpot_smape_median"] = round(h["smape_median"], 2)
        print(f"{name:22s} fit {f['smape_median']:5.2f}%  held out {h['smape_median']:5.2f}% "
              f"(keep up {h['keep_up']:5.2f}, starved {h['starved']:5.2f}); keep-up bias by "
              f"batch {h['keep_up_bias_by_batch']}")
        print("    " + ", ".join(f"{k} {v:.3g}" for k, v in coef.items()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Queueing features of the latency heads: what a (workload, configuration) point asks of
the server, priced with the profile's own step-time model.

Why: p99 TTFT is a queueing quantity. At light load it is the prefill of the longest
prompts (chunked by ``max_num_batched_tokens``); near the capacity knee it grows like
1/(1 - utilisation); with fewer LoRA slots than adapters in flight, requests wait for a slot
(seconds to minutes). Trees on workload statistics alone must learn the step time and these
laws from a few hundred runs (held-out p99 TTFT SMAPE ~32 %); given them as features, the
trees learn the residual. Each is a first-order estimate, not a simulation:

- ``prefill_p99_ms``: one step-time-model pass over the p99 prompt in chunks of
  ``max_num_batched_tokens`` (its own adapter, an otherwise empty batch): the light-load
  floor of p99 TTFT.
- ``decode_batch``: the running batch B of the fluid fixed point B = rate x (time a request
  is in the batch), capped by ``max_num_seqs``; a request is in the batch for its prefill
  plus ``output_mean`` decode steps of batch B.
- ``utilisation``: offered tokens/s over the configuration's capacity, the tokens/s of its
  largest batch (``max_num_seqs``, or the sequences the KV cache holds at prompt + output
  mean length) with the workload's prefill share per step: the rho of a 1/(1 - rho) queue
  (>= 1: it cannot keep up).
- ``busy_adapters``: the adapters with a request in flight, sum over adapters of
  1 - exp(-rate_a x time in the batch) (each adapter's requests as a Poisson stream:
  M/G/inf occupancy), and ``slot_pressure`` = that over ``max_loras``: above 1, requests
  wait for a LoRA slot.
- ``prefill_p99_loaded_ms``: the p99 prompt's prefill beside the running batch: each step's
  ``max_num_batched_tokens`` budget goes to the batch's decodes first, the prompt gets the
  rest (:func:`loaded_prefill_s`): how the token budget and the batch (``max_num_seqs``)
  trade against each other at load, where ``prefill_p99_ms`` is the empty server's floor.

The latency knobs are priced as given within the range the model's training sweep varied
them over, and held at its ends outside it (:func:`within_trained`; the model records the
range as ``trained_knobs``): priced beyond it the features leave the region the trees were
fitted on. A model trained on the recommender's sweep alone saw the paper's 2048 / 2048
only (its features then ignore the knobs: SLO evaluation p99 TTFT SMAPE 35.7 % with them
priced as given, the same with them held); the latency sweep
(:mod:`twin.ml.latency_sweep`) spans the goodput search's grids, so the knobs now move the
features (and the predictions) wherever the search goes.

Inputs: :func:`twin.ml.features.workload_features` (with its per-adapter counts) and a
configuration; the same function serves the training rows (:mod:`twin.ml.latency`) and
the candidates predicted (:func:`twin.ml.recommender.candidate_table`).
"""

from __future__ import annotations

import math

import numpy as np

from twin.costs.step_time import StepFeatures, derived_features

QUEUE_FEATURES = ("prefill_p99_ms", "decode_batch", "utilisation", "busy_adapters",
                  "slot_pressure", "prefill_p99_loaded_ms")
#: the latency knobs the features price; held within the training's range for prediction
KNOBS = ("max_num_batched_tokens", "max_num_seqs")
#: the features the latency heads see beyond :data:`twin.ml.features.ROW_FEATURES`.
#: Tried and left out: the workload's prompt p99, max and 10-s peak (held-out p99 TTFT
#: SMAPE 36.3 -> 36.5 %); the requests in the window, a proxy of its length (SLO evaluation
#: 27.6 -> 33.2 % on a partial latency sweep); ``seq_pressure`` = rate x time in a full
#: batch / ``max_num_seqs`` (held-out families 22.2 -> 21.9 % alone, 22.2 % beside
#: ``prefill_p99_loaded_ms``, which alone gives 21.2 %)
LATENCY_EXTRA = QUEUE_FEATURES
_ITER = 40
#: the least share of a step's token budget a waiting prefill gets beside a full batch
MIN_PREFILL_SHARE = 1 / 16


def _step(profile, *, prefill=0, decode=0, ctx=0.0, prefill_ctx=0.0, rank=16, adapters=1,
          slots=1) -> float:
    """Seconds of one step of the profile's step-time model."""
    tokens = prefill + decode
    return float(profile.step_time(StepFeatures(
        const=1.0, prefill_tokens=int(prefill), decode_tokens=int(decode),
        decode_context=int(ctx), prefill_context=int(prefill_ctx),
        lora_token_rank=tokens * rank, adapters=adapters, adapter_rank=adapters * rank,
        lora_slots=slots, lora_active=1 if tokens else 0, prefill_seqs=1 if prefill else 0,
        after_idle=0.0, **derived_features(tokens, slots, adapters))))


def tpot_floor_ms(profile) -> float:
    """A lower bound of any request's TPOT on this GPU, whatever the configuration, the
    adapter or the GPU count: a decode step of one sequence, alone, at no context, with no
    LoRA work (a base-model request's; an adapter's costs more, every coefficient being
    >= 0): an SLO below it is out of reach of every knob and of more GPUs."""
    return 1000.0 * float(profile.step_time(StepFeatures(
        const=1.0, decode_tokens=1, prefill_tokens=0, decode_context=0, prefill_context=0,
        lora_token_rank=0, adapters=0, adapter_rank=0, lora_slots=0, lora_active=0,
        prefill_seqs=0, after_idle=0.0, **derived_features(1, 0, 0))))


def prefill_s(profile, prompt: float, chunk: int, rank: int, slots: int) -> float:
    """Seconds to prefill one ``prompt`` alone, in chunks of at most ``chunk`` tokens."""
    t, done, p = 0.0, 0, int(max(prompt, 1))
    while done < p:
        n = min(chunk, p - done)
        t += _step(profile, prefill=n, prefill_ctx=n * (done + n), rank=rank, slots=slots)
        done += n
    return t


def loaded_prefill_s(profile, prompt: float, chunk: int, batch: float, ctx: float, rank: int,
                     slots: int) -> float:
    """Seconds to prefill one ``prompt`` beside a running batch of ``batch`` decodes: each
    step's ``chunk`` token budget goes to the decodes first (vLLM's chunked prefill), the
    prompt gets the rest (at least :data:`MIN_PREFILL_SHARE` of the budget, as decodes
    finish), and every such step takes the batch's step time."""
    b = max(int(round(batch)), 0)
    free = max(chunk - b, int(MIN_PREFILL_SHARE * chunk), 1)
    steps = math.ceil(max(prompt, 1.0) / free)
    return steps * _step(profile, prefill=min(free, int(max(prompt, 1))), decode=b,
                         ctx=b * ctx, prefill_ctx=free * max(prompt, 1.0) / 2, rank=rank,
                         adapters=min(b + 1, slots), slots=slots)


def queue_features(wf: dict, cfg, profile) -> dict:
    """:data:`LATENCY_EXTRA` of one (workload, configuration) point (see the module doc).
    ``wf``: :func:`twin.ml.features.workload_features` of the trace (``_counts_sorted``:
    its per-adapter request counts; without them the adapters count as equally busy)."""
    rank, slots = int(cfg.max_lora_rank), int(cfg.max_loras)
    chunk = max(int(cfg.max_num_batched_tokens), 1)
    rate = float(wf["total_rate"])
    p_mean, o_mean = float(wf["prompt_mean"]), max(float(wf["output_mean"]), 1.0)
    pre_mean = prefill_s(profile, p_mean, chunk, rank, slots)
    ctx = p_mean + o_mean / 2                     # a decoding sequence's mean context
    cap = max(int(cfg.max_num_seqs), 1)

    def in_batch(b: float) -> float:              # seconds a request spends in the batch
        bi = max(int(round(b)), 1)
        return pre_mean + o_mean * _step(profile, decode=bi, ctx=bi * ctx, rank=rank,
                                         adapters=min(bi, slots), slots=slots)

    b = 1.0
    for _ in range(_ITER):                        # damped fluid fixed point, capped
        b = min(cap, 0.5 * b + 0.5 * max(rate * in_batch(b), 1.0))
    # capacity: the largest batch, each step with its share of prefill tokens (P per B)
    b_max = max(1, min(cap, int(profile.memory.kv_tokens(cfg) / max(p_mean + o_mean, 1.0))))
    pre = min(chunk, int(round(b_max * p_mean / o_mean)))
    t_max = _step(profile, decode=b_max, prefill=pre, ctx=b_max * ctx,
                  prefill_ctx=pre * p_mean, rank=rank, adapters=min(b_max, slots), slots=slots)
    busy = float(wf["offered_tps"]) * t_max / (b_max + pre)
    t_req = in_batch(b)
    counts = wf.get("_counts_sorted")
    dur = max(float(wf["n_requests"]), 1.0) / max(rate, 1e-9) if wf.get("n_requests") else 1.0
    if counts is not None and len(counts) and np.sum(counts) > 0:
        rates = np.asarray(counts, dtype=np.float64) / dur
    else:
        n = max(int(wf["n_adapters"]), 1)
        rates = np.full(n, rate * (1 - float(wf.get("base_share", 0.0))) / n)
    busy_ad = float(np.sum(1.0 - np.exp(-rates * t_req)))
    p99 = float(wf["prompt_p99"])
    out = dict(prefill_p99_ms=1000 * prefill_s(profile, p99, chunk, rank, slots),
               decode_batch=float(b), utilisation=float(busy), busy_adapters=busy_ad,
               slot_pressure=busy_ad / max(slots, 1),
               prefill_p99_loaded_ms=1000 * loaded_prefill_s(profile, p99, chunk, b, ctx,
                                                             rank, slots))
    return {k: (v if math.isfinite(v) else 1e9) for k, v in out.items()}


def within_trained(cfg, trained: dict | None):
    """``cfg`` with :data:`KNOBS` clamped into ``trained`` ({knob: [lo, hi]}; None: as
    given): what the queueing features of a prediction are priced at."""
    if not trained:
        return cfg
    return cfg.replace(**{k: int(min(max(getattr(cfg, k), lo), hi))
                          for k, (lo, hi) in trained.items() if k in KNOBS})

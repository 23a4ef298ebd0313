"""A machine-speed anchor: a short fixed benchmark of the executor's own hot path.

Why. On a shared CPU the box's speed moves between calibration and validation (drift of
+-10% over seconds, a ~1.8x slower state that lasts minutes), so the twin's error against
the executor measures the box as much as the model. The anchor measures the box's speed
with the executor's own code at both times: ``twin calibrate --executor`` records it
interleaved with its cells (``speed_anchor_s`` in the profile's provenance) and ``twin
validate`` measures it again around every executor run; the twin is then priced at the
box's speed during the run, step times x (anchor during / anchor at calibration), one
scalar that is never fitted on the validated run's own steps.

What. Forward steps of the model (``LlamaModel.step``, the path every executor step takes:
batch tensors, the layers, paged attention, the grouped LoRA delta, the logits' argmax) at
three fixed batch shapes: a prefill chunk, a decode batch and a mixed one, half of the rows
with an adapter. The shapes are visited in turn (round-robin) so that a drift during the
measurement touches each alike; the result is the sum over shapes of each shape's median
step time. Rounds continue until ``budget_s`` (at least ``min_rounds``), so the anchor costs
~0.3-0.5 s; the medians do not depend on the count. Threads are the caller's (pin them as
the profile's calibration did, or pass ``threads``).

What it cannot do: noise *within* a run (a lost time slice in one step, a speed flip in the
middle of a trace) is not corrected by one scalar taken before and after the run.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from twin.executor.anchor_spec import (ANCHOR_SHAPES, ANCHOR_VERSION, anchor_spread,
                                       anchor_summary)
from twin.executor.lora import GroupedLoRASlots
from twin.executor.model import LlamaModel, SeqChunk

__all__ = ["ANCHOR_SHAPES", "ANCHOR_VERSION", "anchor_spread", "anchor_summary",
           "measure_speed_anchor"]

BLOCK = 16


def _batches(model: LlamaModel) -> list[list[SeqChunk]]:
    """The shapes as ``SeqChunk`` lists over disjoint KV blocks (fixed token ids)."""
    out, next_block = [], 0
    rng = np.random.default_rng(0)
    for _, seqs in ANCHOR_SHAPES:
        chunks = []
        for n, start, lora in seqs:
            nb = -(-(start + n) // BLOCK)
            ids = rng.integers(1, model.shape.vocab, n).tolist()
            chunks.append(SeqChunk(ids, start, list(range(next_block, next_block + nb)),
                                   0 if lora else -1))
            next_block += nb
        out.append(chunks)
    return out


def measure_speed_anchor(model: LlamaModel, *, budget_s: float = 0.4, min_rounds: int = 5,
                         max_rounds: int = 60, threads: int | None = None) -> dict:
    """Time the anchor's shapes on ``model``; returns ``{"anchor_s": sum of the shapes'
    median step seconds, "per_shape_s": {...}, "rounds": n, "wall_s": ...}``."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        batches = _batches(model)
        blocks = max(b for chunks in batches for c in chunks for b in c.block_table) + 1
        kv = model.allocate_kv_cache(blocks, BLOCK)
        slots = GroupedLoRASlots(model.shape, 1, 8, dtype=model.dtype, device=model.device)
        sync = (torch.cuda.synchronize if model.device.type == "cuda" else lambda: None)

        def step(chunks) -> float:
            t = time.perf_counter()
            model.step(chunks, kv, slots).argmax(-1).tolist()   # sampling syncs the device
            sync()
            return time.perf_counter() - t

        for chunks in batches:   # warm-up: first calls allocate and pick kernels
            step(chunks)
        times: list[list[float]] = [[] for _ in batches]
        t0 = time.perf_counter()
        rounds = 0
        while rounds < max_rounds and (rounds < min_rounds
                                       or time.perf_counter() - t0 < budget_s):
            for i, chunks in enumerate(batches):
                times[i].append(step(chunks))
            rounds += 1
        per = {name: statistics.median(ts) for (name, _), ts in zip(ANCHOR_SHAPES, times)}
        return {"anchor_s": float(sum(per.values())), "per_shape_s": per, "rounds": rounds,
                "wall_s": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(old)

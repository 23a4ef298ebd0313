"""The microbenchmark design of ``twin calibrate --executor``: which cells to serve.

A *cell* is a burst of requests arriving at t = 0 served by the executor with one
configuration. The cells vary the prefill tokens per step (chunk budget, prompt length),
the decode batch (request count, staggered output lengths so the batch shrinks), the
attended context (prompt length), the distinct adapters (0 = base model, up to 32), the
padded rank (``max_lora_rank`` 8..64), ``max_loras`` (1..32), and requests spaced apart so
each meets an idle engine (the after-idle step). No torch here: the design is data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from twin.config import ServingConfig

__all__ = ["Cell", "design", "DESIGN_VERSION"]

DESIGN_VERSION = 3   # measurements of another version are not reused (3: the executor makes
#                      token ids before its clock starts, no longer in the step after arrival)


@dataclass(frozen=True)
class Cell:
    """One microbenchmark: ``n`` requests at t = 0, prompt ``prompt`` tokens, outputs
    staggered over ``output * (1, 2/3, 1/3)``, adapters round-robin over ``adapters``
    distinct ones (0: base model), served with ``max_loras``, ``max_lora_rank`` and a
    chunk budget ``budget`` (max_num_batched_tokens).

    ``gap`` > 0 spaces the arrivals ``gap`` seconds apart instead: long enough for each
    request to finish before the next, every request meets an idle engine, which measures
    the after-idle step (``after_idle`` feature); shorter (0.02 s), each new prompt meets
    the earlier requests' running decodes.

    ``base_every`` > 0 sends every ``base_every``-th request to the base model: batches mix
    rows with and without an adapter (issue 15: the worst validation workload was such a
    mix). ``adapters`` > ``max_loras`` swaps adapters into slots mid-run, beside running
    decodes (loads outside the first, after-idle step).

    ``poisson``: the arrivals are a Poisson process of mean gap ``gap`` instead, and the
    prompts vary uniformly over ``prompt`` x (1/2 .. 3/2) (seeded): requests overlap at
    times and the engine waits idle between bursts of them, as it does in served light
    traffic. Its after-idle steps ran ~1.8x the regularly spaced cells'
    (``experiments/after_idle_probe.py``; README_validate, "the first step after idle").

    ``cached`` > 0 (a multiple of 16): every prompt opens with the same ``cached`` tokens
    (``hash_ids``, 16-token blocks), so with the prefix cache on a later request of an
    adapter computes only its suffix over a long cached context (issue 17: the fit sees
    attention over cached tokens priced as context, ``prefill_context``)."""

    n: int
    prompt: int
    output: int
    adapters: int
    max_loras: int
    rank: int
    budget: int
    gap: float = 0.0
    base_every: int = 0
    cached: int = 0
    poisson: bool = False

    def __post_init__(self):
        if self.poisson and self.cached:   # the hash ids follow ``prompt``, the prompts vary
            raise ValueError(f"a Poisson cell has no cached prefix (cached={self.cached})")

    @property
    def key(self) -> str:
        return (f"n{self.n}-p{self.prompt}-o{self.output}-a{self.adapters}-m{self.max_loras}"
                f"-r{self.rank}-b{self.budget}" + (f"-g{self.gap:g}" if self.gap else "")
                + (f"-base{self.base_every}" if self.base_every else "")
                + (f"-c{self.cached}" if self.cached else "") + ("-poi" if self.poisson else ""))

    def trace(self) -> pd.DataFrame:
        i = np.arange(self.n)
        out = np.maximum(1, (self.output * (3 - i % 3)) // 3)
        base = (i % self.base_every == 0) if self.base_every else np.zeros(self.n, bool)
        k = np.cumsum(~base) - 1   # adapter rows round-robin over the adapters
        names = [f"lora-{j % self.adapters:04d}" if self.adapters and not b else None
                 for j, b in zip(k, base)]
        arrival, prompt = i * self.gap, np.full(self.n, self.prompt)
        if self.poisson:   # the first at t = 0, then exponential gaps of mean ``gap``
            rng = np.random.default_rng(self.n)
            arrival = np.r_[0.0, np.cumsum(rng.exponential(self.gap, self.n)[1:])]
            prompt = rng.integers(self.prompt // 2, self.prompt * 3 // 2 + 1, self.n)
        df = pd.DataFrame({"request_id": i.astype(np.int64), "arrival_s": arrival,
                           "adapter": pd.array(names, dtype="string"),
                           "prompt_tokens": prompt.astype(np.int32),
                           "output_tokens": out.astype(np.int32)})
        if self.cached:   # the shared prefix's ids, then ids of each request's own
            shared, own = self.cached // 16, -(-self.prompt // 16) - self.cached // 16
            df["hash_ids"] = [tuple(range(shared)) + tuple(range(1000 * (j + 1),
                                                                 1000 * (j + 1) + own))
                              for j in range(self.n)]
            df.attrs["hash_block_size"] = 16
        return df

    def config(self, max_model_len: int, policy: str = "vllm"):
        return ServingConfig(enable_lora=True, max_loras=self.max_loras,
                             max_cpu_loras=max(self.max_loras, self.adapters, 1),
                             max_lora_rank=self.rank, max_num_seqs=256,
                             max_num_batched_tokens=self.budget, max_model_len=max_model_len,
                             policy=policy)


def design(scale: str = "tiny", policy: str = "vllm") -> list[Cell]:
    """The cells, most informative first (a small ``--budget`` still spans the features).

    ``scale``: ``tiny`` for models whose step takes milliseconds, ``small`` for ~100M
    parameter models on a CPU (fewer, shorter requests). ``policy="slora"``: the same
    batches on S-LoRA's layout, which has no slots and no padded rank, so cells differing
    only in ``max_loras`` / ``max_lora_rank`` collapse into one (its adapters' own ranks,
    8 to 64, vary instead).
    """
    if scale == "tiny":
        N, P, O, B, gap = (2, 8, 24, 48), (32, 128, 384), 48, (64, 256, 1024), 0.1
    else:
        N, P, O, B, gap = (2, 6, 12), (32, 96), 12, (64, 256), 0.6
    cells = []
    # the core: decode batch x context x adapters (prefill in chunks of the budget)
    for a in (0, 4):
        for n in N:
            for p in P:
                cells.append(Cell(n, p, O, min(a, n), 8, 16, B[1]))
    # slots: max_loras from 1 to 32 at small and large decode batches. The LoRA kernels'
    # cost grows with the slots they span, and a design where max_loras is mostly 8
    # confounds that slope with the fixed cost of running LoRA at all (measured: a 1-slot
    # decode step was predicted 25% short until these cells were added).
    for m in (1, 2, 4, 16, 32):
        for n in (N[0], N[2]):
            cells.append(Cell(n, P[0], O, min(2, m), m, 16, B[1]))
    # after idle: requests one at a time, each arriving to an idle engine
    for p in P[:2]:
        cells.append(Cell(N[1], p, 4, 2, 8, 16, B[1], gap))
    # ... and as served light traffic meets it: Poisson arrivals (3 per second), answers
    # of tens of tokens, so requests overlap at times and the waits fall between bursts
    # (the validation's light workload: its after-idle steps ran ~1.8x the spaced cells')
    if scale == "tiny":
        for p in P[:2]:
            cells.append(Cell(N[2], p, 2 * O, 4, 4, 16, B[1], 0.33, poisson=True))
    # adapters and slots: distinct adapters, max_loras (kernel span), padded rank
    n = N[-1]
    for a, m in ((1, 1), (2, 32), (8, 8), (8, 32), (n // 2, 32), (n, 32)):
        cells.append(Cell(n, P[0], O, min(a, n), m, 16, B[1]))
    for r in (8, 32, 64):
        cells.append(Cell(n, P[0], O, min(8, n), 8, r, B[1]))
    # issue 15: base-model and adapter rows in one batch (every 2nd / 4th request base),
    # and adapter swaps mid-run (more adapters than slots: loads beside running decodes)
    for k in (2, 4):
        cells.append(Cell(N[2], P[1], O, 4, 4, 16, B[1], base_every=k))
    for a, m in ((8, 2), (16, 4)):
        cells.append(Cell(N[2], P[0], O, a, m, 16, B[1]))
    # issue 17: a short suffix over a long cached prefix (requests spaced so each finds
    # the prefix cached by an earlier one of its adapter)
    for p in P[-2:]:
        cells.append(Cell(N[1], p + 32, 4, 2, 8, 16, B[1], gap, cached=p))
    # ... and one at a time beside running decodes (20 ms apart, answers of O tokens): a
    # short chunk beside decodes, fresh (causal attention) or a suffix over a cached
    # prefix (gathered, masked: prefill_ctx_seqs), the step a hit becomes in served traffic
    for c in (0, P[1]):
        cells.append(Cell(N[1], P[0] + c, O, 2, 8, 16, B[1], 0.02, cached=c))
    # prefill: chunk budget x prompt length (long prompts, short outputs)
    for b in B:
        for p in P[-2:]:
            cells.append(Cell(N[1], p * 2, 4, min(4, N[1]), 8, 16, b))
    out, seen = [], set()
    for c in cells:
        if c.cached and policy == "slora":   # S-LoRA has no prefix cache
            continue
        m, r = (8, 16) if policy == "slora" else (c.max_loras, c.rank)
        c = Cell(c.n, c.prompt, c.output, min(c.adapters, 32), m, r, c.budget, c.gap,
                 c.base_every, c.cached, c.poisson)
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out

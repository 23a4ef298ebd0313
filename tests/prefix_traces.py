"""Traces with a ``hash_ids`` column, built for the prefix-cache tests (the trace branch
builds the real loaders and generators; these only follow the contract): multi-turn
conversations per adapter, each turn's prompt holding the previous turn's prompt and
output, every adapter's conversations opening with its own system prompt."""

from __future__ import annotations

import numpy as np
import pandas as pd


def conversations(seed: int, n_conv: int, turns: int, adapters: list, *, hbs: int = 32,
                  system_blocks: int = 2, new_blocks=(1, 4), output=(4, 60),
                  gap_s=(0.5, 3.0), base_every: int = 0) -> pd.DataFrame:
    """``n_conv`` conversations of ``turns`` turns each (adapter: round robin over
    ``adapters``, every ``base_every``-th conversation on the base model); ids name blocks
    of ``hbs`` tokens (``df.attrs["hash_block_size"]``)."""
    rng = np.random.default_rng(seed)
    rows, fresh = [], [10**6]

    def new(k):
        fresh[0] += k
        return list(range(fresh[0] - k, fresh[0]))

    systems = {a: new(system_blocks) for a in adapters + [None]}
    for c in range(n_conv):
        adapter = None if base_every and c % base_every == 0 else adapters[c % len(adapters)]
        ids = list(systems[adapter])
        t = float(rng.uniform(0, 5))
        for _ in range(turns):
            ids = ids + new(int(rng.integers(*new_blocks)))
            prompt = len(ids) * hbs - int(rng.integers(0, hbs))
            out = int(rng.integers(*output))
            rows.append((t, adapter, prompt, out, tuple(ids)))
            # the next turn's prompt holds this one's output (its blocks: fresh ids)
            ids = ids + new(-(-out // hbs))
            t += float(rng.uniform(*gap_s))
    rows.sort(key=lambda r: r[0])
    df = pd.DataFrame(rows, columns=["arrival_s", "adapter", "prompt_tokens", "output_tokens",
                                     "hash_ids"])
    df["adapter"] = pd.array(df["adapter"], dtype="string")
    df.attrs["hash_block_size"] = hbs
    return df

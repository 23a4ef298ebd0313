"""A small trace of bursts separated by idle gaps, for the executor-vs-twin differential
tests of both memory layouts."""

from __future__ import annotations

import numpy as np
import pandas as pd


def make_trace(seed, n, bursts, adapters, base_every=5, prompt=(3, 70), output=(1, 40)):
    """``n`` requests spread over ``bursts`` (start, width) after a lone short request at
    t = 0 (so the engine idles until the first burst); every ``base_every``-th request is
    for the base model, the others for a random adapter of ``adapters``."""
    rng = np.random.default_rng(seed)
    per = n // len(bursts)
    arr = np.concatenate([t0 + np.sort(rng.uniform(0, width, per)) for t0, width in bursts])
    arr = np.concatenate([[0.0], arr])
    n = len(arr)
    names = [None if k % base_every == 0 else adapters[int(rng.integers(len(adapters)))]
             for k in range(n)]
    return pd.DataFrame({"request_id": np.arange(n) + 7, "arrival_s": arr,
                         "adapter": pd.array(names, dtype="string"),
                         "prompt_tokens": np.r_[5, rng.integers(*prompt, n - 1)],
                         "output_tokens": np.r_[2, rng.integers(*output, n - 1)]})

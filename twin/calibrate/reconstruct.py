"""A measured run's workload, rebuilt as the paper's client generated it.

Adapters cycle through the rank list and are shuffled, rates go round-robin over the
adapters and the (adapter, rate) pairs are shuffled, each adapter is an independent Poisson
process over the window, and lengths are drawn from the ShareGPT pool under vLLM's
benchmark filter rescaled to the run's pool means
(:func:`twin.workload.public.sharegpt_length_pool`). Deterministic by seed.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from twin.calibrate.run_spec import RunSpec
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import adapter_names, renewal_arrivals
from twin.workload.public import SHAREGPT_FILE, shared_trace_path, sharegpt_length_pool
from twin.workload.schema import validate_trace

__all__ = ["reconstruct", "length_pool"]


@functools.lru_cache(maxsize=256)
def _pool_cached(path: str, mean_in: float, mean_out: float) -> np.ndarray:
    pool = sharegpt_length_pool(path, target_means=(mean_in, mean_out))
    pool.setflags(write=False)
    return pool


def length_pool(pool_means: tuple, path: str | Path | None = None) -> np.ndarray:
    """ShareGPT (prompt, output) pool under vLLM's benchmark filter (prompt 4..1024,
    prompt + output <= 2048), rescaled to ``pool_means`` (cached per means)."""
    if path is None:
        path = shared_trace_path(SHAREGPT_FILE)
    return _pool_cached(str(path), round(float(pool_means[0]), 2),
                        round(float(pool_means[1]), 2))


def _adapter_ranks(spec: RunSpec, rng: np.random.Generator) -> np.ndarray:
    """Ranks per adapter: the rank cycle over the adapters (as the fork's server builds
    them), then shuffled; the counts are the run's."""
    ranks = np.concatenate([np.full(c, r, dtype=np.int64)
                            for r, c in sorted(spec.ranks.items())])
    return rng.permutation(ranks)


def _adapter_rates(spec: RunSpec, rng: np.random.Generator) -> np.ndarray:
    rates = np.concatenate([np.full(c, r, dtype=np.float64)
                            for r, c in sorted(spec.rates.items())])
    return rng.permutation(rates)


def reconstruct(spec: RunSpec, *, seed: int = 0, window_s: float | None = None,
                pool: np.ndarray | None = None, sharegpt_path: str | Path | None = None):
    """The run's workload: (trace, catalog).

    ``window_s`` (default: the run's duration, floored to whole seconds as the client's time
    limit) bounds the Poisson arrivals. Rank and rate assignment are shuffled independently,
    so rank and rate are associated at random as in the real client.
    """
    window = float(window_s if window_s is not None else math.floor(spec.duration_s))
    rng = np.random.default_rng([seed, 0x7A11])
    n = spec.n_adapters
    names = adapter_names(n, prefix="lora")
    ranks = _adapter_ranks(spec, rng)
    rates = _adapter_rates(spec, rng)
    t, idx = renewal_arrivals(rates, window, rng=rng)
    if pool is None:
        pool = length_pool(spec.pool_means, sharegpt_path)
    lens = pool[rng.integers(0, len(pool), size=len(t))]
    trace = pd.DataFrame({"request_id": np.arange(len(t), dtype=np.int64), "arrival_s": t,
                          "adapter": pd.array(names[idx], dtype="string"),
                          "prompt_tokens": lens[:, 0].astype(np.int32),
                          "output_tokens": lens[:, 1].astype(np.int32)})
    trace = validate_trace(trace, source=f"reconstruct({spec.key})")
    catalog = AdapterCatalog(pd.DataFrame({"adapter": names, "rank": ranks}),
                             source=f"reconstruct({spec.key})")
    return trace, catalog


"""Adapter popularity: how the requests of a trace are spread over its adapters.

The uniform model and S-LoRA's power law, shared by the generators
(:mod:`twin.workload.generate`) and by :func:`assign_adapters`, which tags a public trace
that names no adapter (Azure 2023, Mooncake).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.workload.schema import validate_trace

def powerlaw_shares(n_adapters: int, alpha: float) -> np.ndarray:
    """P(adapter i) under ``floor(n * X)``, ``X ~ power(alpha)``: ((i+1)/n)^a - (i/n)^a."""
    edges = (np.arange(n_adapters + 1) / n_adapters) ** alpha
    return np.diff(edges)


def powerlaw_index(rng: np.random.Generator, n_adapters: int, alpha: float,
                    size: int) -> np.ndarray:
    x = rng.power(alpha, size=size)
    return np.minimum((n_adapters * x).astype(np.int64), n_adapters - 1)


def assign_adapters(df: pd.DataFrame, n_adapters: int, *, popularity: str = "uniform",
                    alpha: float = 1.0, seed: int = 0, prefix: str = "lora",
                    groups: np.ndarray | None = None) -> pd.DataFrame:
    """Tag each request of a trace with one of ``n_adapters`` adapters ``{prefix}-{i}``.

    ``uniform``: every adapter equally likely. ``powerlaw`` (S-LoRA's popularity model):
    adapter = floor(n * X) with X ~ power(alpha), so adapter 0 is the hottest and
    P(i) = ((i+1)/n)^alpha - (i/n)^alpha; alpha = 1 is uniform, smaller alpha is more skewed.
    Arrivals and lengths are untouched, so the aggregate load stays the real trace's.
    ``groups`` (an int code per request, e.g.
    :func:`twin.workload.prefix_stats.prefix_groups`): one draw per group instead of per
    request, so that requests of one group (a conversation) share their adapter.
    """
    if n_adapters < 1:
        raise TwinInputError(f"need at least one adapter, got {n_adapters}", field="n_adapters")
    if popularity not in ("uniform", "powerlaw"):
        raise TwinInputError(f"popularity must be 'uniform' or 'powerlaw', got {popularity!r}",
                             field="popularity")
    if popularity == "powerlaw" and not alpha > 0:
        raise TwinInputError(f"alpha must be > 0, got {alpha}", field="alpha")
    rng = np.random.default_rng(seed)
    n = len(df)
    if groups is not None:
        codes, uniq = pd.factorize(np.asarray(groups))
        n = len(uniq)
    idx = (rng.integers(0, n_adapters, size=n) if popularity == "uniform"
           else powerlaw_index(rng, n_adapters, alpha, n))
    if groups is not None:
        idx = idx[codes]
    names = np.array([f"{prefix}-{i}" for i in range(n_adapters)], dtype=object)
    out = df.copy()
    out["adapter"] = pd.array(names[idx], dtype="string")
    return validate_trace(out, source="assign_adapters")

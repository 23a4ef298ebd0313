"""Synthetic multi-adapter workloads, deterministic by seed and vectorised.

Two popularity models from the literature:

- *rate classes* (arXiv 2508.08343, the vLLM-H100 runs): every adapter is an independent
  Poisson (or Gamma) process whose rate is one of a few classes, e.g. 1.6/0.8/0.4 req/s,
  assigned round-robin over the adapters and then shuffled;
- *power law* (S-LoRA): one aggregate Gamma process (shape 1/cv^2), each request's adapter
  floor(n X) with X ~ power(alpha).

Lengths come from a :data:`LengthSampler`: a pool of (prompt, output) pairs drawn with
replacement (e.g. :func:`twin.workload.public.sharegpt_length_pool`) or a distribution
(:func:`uniform_lengths`, S-LoRA's U[8, 512)).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.workload.popularity import powerlaw_index, powerlaw_shares
from twin.workload.schema import validate_trace

__all__ = ["LengthSampler", "uniform_lengths", "pool_lengths", "as_length_sampler",
           "renewal_arrivals", "rate_class_trace", "powerlaw_trace", "adapter_names",
           "tenant_copies"]

#: ``sampler(rng, n) -> int array (n, 2)`` of (prompt_tokens, output_tokens), each >= 1.
LengthSampler = Callable[[np.random.Generator, int], np.ndarray]

# gaps drawn up front per stream: mean + _MARGIN_SD standard deviations + _MARGIN_N
_MARGIN_SD, _MARGIN_N = 8.0, 16


def uniform_lengths(lo: int = 8, hi: int = 512) -> LengthSampler:
    """Prompt and output lengths independent and uniform on the integers ``[lo, hi)``
    (S-LoRA's synthetic workload uses [8, 512))."""
    if not 1 <= lo < hi:
        raise TwinInputError(f"need 1 <= lo < hi, got lo={lo}, hi={hi}", field="lengths")

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(lo, hi, size=(n, 2))
    sample.__doc__ = f"uniform lengths in [{lo}, {hi})"
    return sample


def pool_lengths(pool: np.ndarray) -> LengthSampler:
    """Draw (prompt, output) pairs from ``pool`` (n, 2) with replacement, pairs kept together
    (as vLLM's benchmark client samples ShareGPT)."""
    pool = np.asarray(pool)
    if pool.ndim != 2 or pool.shape[1] != 2 or not len(pool):
        raise TwinInputError(f"a length pool is a non-empty (n, 2) array, got shape "
                             f"{pool.shape}", field="lengths")
    if not np.issubdtype(pool.dtype, np.integer) or (pool < 1).any():
        raise TwinInputError("a length pool holds integer token counts >= 1",
                             field="lengths")

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return pool[rng.integers(0, len(pool), size=n)]
    sample.__doc__ = f"pool of {len(pool)} (prompt, output) pairs"
    return sample


def as_length_sampler(lengths) -> LengthSampler:
    """A pool array becomes :func:`pool_lengths`; a callable is used as is; None is S-LoRA's
    uniform [8, 512)."""
    if lengths is None:
        return uniform_lengths()
    if callable(lengths):
        return lengths
    return pool_lengths(lengths)


def adapter_names(n_adapters: int, prefix: str = "lora") -> np.ndarray:
    """``{prefix}-0 .. {prefix}-(n-1)`` as an object array (index = adapter number)."""
    return np.array([f"{prefix}-{i}" for i in range(n_adapters)], dtype=object)


def renewal_arrivals(rates: Sequence[float], duration_s: float, *, cv: float = 1.0,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times in ``[0, duration_s)`` of independent renewal processes, one per rate.

    Gaps are Gamma(shape 1/cv^2, mean 1/rate): cv = 1 is Poisson. Each stream draws a
    generous block of gaps at once (mean + 8 sd + 16) and is topped up in the rare case
    it falls short, so the work is a few numpy calls whatever the number of requests.
    Returns (times, stream index), sorted by time (ties keep stream order).
    """
    rates = np.asarray(rates, dtype=np.float64)
    k = 1.0 / cv**2
    mean = rates * duration_s
    n = np.ceil(mean + _MARGIN_SD * cv * np.sqrt(mean) + _MARGIN_N).astype(np.int64)
    n[rates <= 0] = 0
    stream = np.repeat(np.arange(len(rates)), n)
    gaps = rng.gamma(k, 1.0, size=len(stream)) / (k * np.repeat(rates, n))
    first = np.r_[0, np.cumsum(n)[:-1]]
    csum = np.cumsum(gaps)
    t = csum - np.repeat(np.r_[0.0, csum][first], n)
    last = np.full(len(rates), np.inf)
    last[n > 0] = t[(first + n - 1)[n > 0]]
    extra_t, extra_s = [], []
    for s in np.flatnonzero(last < duration_s):  # rare: a stream ran short; top it up
        tail = last[s]
        while tail < duration_s:
            more = tail + np.cumsum(rng.gamma(k, 1.0, size=max(n[s], 16)) / (k * rates[s]))
            extra_t.append(more)
            extra_s.append(np.full(len(more), s))
            tail = more[-1]
    if extra_t:
        t = np.concatenate([t, *extra_t])
        stream = np.concatenate([stream, *extra_s])
    keep = t < duration_s
    t, stream = t[keep], stream[keep]
    order = np.lexsort((stream, t))
    return t[order], stream[order]


MAX_ADAPTERS = 10_000_000     # one name and one rate per adapter, held in memory
# A generated trace is held in memory (~60 bytes a request, several arrays while drawn):
# past this size a generator would exhaust memory or run for hours, not make a trace.
MAX_REQUESTS = 50_000_000


def _check(n_adapters: int, duration_s: float, cv: float, total_rate: float = 0.0) -> None:
    """Refuse what the generators cannot make: no adapters, a non-finite or non-positive
    duration/CV, or a trace too large to hold (``total_rate`` x ``duration_s`` requests)."""
    if int(n_adapters) < 1:
        raise TwinInputError(f"need at least one adapter, got {n_adapters}", field="n_adapters")
    if int(n_adapters) > MAX_ADAPTERS:
        raise TwinInputError(f"at most {MAX_ADAPTERS:,} adapters, got {n_adapters}",
                             field="n_adapters")
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise TwinInputError(f"duration must be a finite number > 0 s, got {duration_s}",
                             field="duration_s")
    if not (cv > 0 and math.isfinite(cv)):
        raise TwinInputError(f"cv must be a finite number > 0, got {cv}", field="cv")
    if total_rate * duration_s > MAX_REQUESTS:
        raise TwinInputError(f"{total_rate:g} req/s over {duration_s:g} s is "
                             f"{total_rate * duration_s:.3g} requests; at most "
                             f"{MAX_REQUESTS:,} fit in memory (lower the rate or the duration)",
                             field="duration_s")


def _frame(t: np.ndarray, idx: np.ndarray, names: np.ndarray, lens: np.ndarray,
           rate_rps: np.ndarray, source: str) -> pd.DataFrame:
    df = pd.DataFrame({
        "arrival_s": t,
        "adapter": pd.array(names[idx], dtype="string"),
        "prompt_tokens": lens[:, 0],
        "output_tokens": lens[:, 1],
        "rate_rps": rate_rps[idx],
    })
    return validate_trace(df, source=source)


def rate_class_trace(n_adapters: int, rates: Sequence[float] = (1.6, 0.8, 0.4), *,
                     duration_s: float = 3600, lengths=None, arrival: str = "poisson",
                     cv: float = 1.0, seed: int = 0, prefix: str = "lora") -> pd.DataFrame:
    """Each adapter an independent arrival process with one of the class ``rates`` (req/s).

    As in arXiv 2508.08343's client: rates go round-robin over the adapters (adapter i gets
    ``rates[i % len(rates)]``), then the (adapter, rate) pairs are shuffled; arrivals stop at
    ``duration_s``. ``arrival='poisson'`` (exponential gaps) or ``'gamma'`` (gap CV ``cv``).
    Lengths are drawn independently per request from ``lengths`` (a pool array or a
    :data:`LengthSampler`; default U[8, 512)). Column ``rate_rps`` is the adapter's rate.
    """
    if arrival not in ("poisson", "gamma"):
        raise TwinInputError(f"arrival must be 'poisson' or 'gamma', got {arrival!r}",
                             field="arrival")
    cv = 1.0 if arrival == "poisson" else float(cv)
    rates = np.asarray(rates, dtype=np.float64)
    if not len(rates) or not ((rates > 0) & np.isfinite(rates)).all():
        raise TwinInputError(f"rates must be finite numbers > 0 req/s, got {list(rates)}",
                             field="rates")
    full, rest = divmod(max(int(n_adapters), 0), len(rates))   # adapter i: rates[i % len]
    _check(n_adapters, duration_s, cv, float(full * rates.sum() + rates[:rest].sum()))
    sampler = as_length_sampler(lengths)
    rng = np.random.default_rng(seed)
    per_adapter = rng.permutation(rates[np.arange(n_adapters) % len(rates)])
    t, idx = renewal_arrivals(per_adapter, duration_s, cv=cv, rng=rng)
    lens = sampler(rng, len(t))
    return _frame(t, idx, adapter_names(n_adapters, prefix), lens, per_adapter,
                  "rate_class_trace")


def powerlaw_trace(n_adapters: int, total_rate: float, *, alpha: float = 1.0,
                   duration_s: float = 3600, cv: float = 1.0, lengths=None, seed: int = 0,
                   prefix: str = "lora") -> pd.DataFrame:
    """S-LoRA's synthetic workload: one Gamma arrival process of ``total_rate`` req/s
    (shape 1/cv^2; cv = 1 is Poisson), each request's adapter floor(n X), X ~ power(alpha).

    Adapter 0 is the hottest; alpha = 1 is uniform. Column ``rate_rps`` is the adapter's
    expected rate, ``total_rate * P(adapter)`` (see
    :func:`twin.workload.popularity.powerlaw_shares`).
    """
    if not (total_rate > 0 and math.isfinite(total_rate)):
        raise TwinInputError(f"total_rate must be a finite number > 0 req/s, got {total_rate}",
                             field="total_rate")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise TwinInputError(f"alpha must be a finite number > 0, got {alpha}", field="alpha")
    _check(n_adapters, duration_s, cv, total_rate)
    sampler = as_length_sampler(lengths)
    rng = np.random.default_rng(seed)
    t, _ = renewal_arrivals([total_rate], duration_s, cv=cv, rng=rng)
    idx = powerlaw_index(rng, n_adapters, alpha, len(t))
    lens = sampler(rng, len(t))
    return _frame(t, idx, adapter_names(n_adapters, prefix), lens,
                  total_rate * powerlaw_shares(n_adapters, alpha), "powerlaw_trace")


def tenant_copies(trace: pd.DataFrame, n_tenants: int, *, span_s: float | None = None,
                  seed: int = 0, prefix: str = "tenant") -> pd.DataFrame:
    """A real trace's traffic for each of ``n_tenants`` tenants, one adapter each
    (``{prefix}-{k}``): every tenant sends the trace's requests, its arrivals shifted
    circularly by its own uniform offset within ``span_s`` (default: the trace's last
    arrival), so the tenants' bursts do not coincide. The fleet workload: e.g. the Azure
    conversation hour x 64 tenants is 1.24 M requests."""
    if n_tenants < 1:
        raise TwinInputError(f"need at least one tenant, got {n_tenants}", field="n_tenants")
    arrival = trace["arrival_s"].to_numpy(np.float64)
    span = float(span_s if span_s is not None else arrival.max())
    if not span > 0:
        raise TwinInputError(f"span_s must be > 0, got {span}", field="span_s")
    offsets = np.random.default_rng(seed).uniform(0.0, span, n_tenants)
    t = np.concatenate([(arrival + o) % span for o in offsets])
    k = np.repeat(np.arange(n_tenants), len(arrival))
    order = np.argsort(t, kind="stable")
    lens = np.column_stack([np.tile(trace["prompt_tokens"].to_numpy(), n_tenants),
                            np.tile(trace["output_tokens"].to_numpy(), n_tenants)])
    names = adapter_names(n_tenants, prefix)
    out = pd.DataFrame({"request_id": np.arange(len(t), dtype=np.int64),
                        "arrival_s": t[order],
                        "adapter": pd.array(names[k[order]], dtype="string"),
                        "prompt_tokens": lens[order, 0].astype(np.int32),
                        "output_tokens": lens[order, 1].astype(np.int32)})
    return validate_trace(out, source="tenant_copies")

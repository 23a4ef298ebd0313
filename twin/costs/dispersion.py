"""Step-time dispersion: how measured step times spread around the step-time model's price.

The twin prices every step deterministically. A real engine's steps of one batch spread
(OS scheduling, the allocator, caches; on the shared 2-core CPU box a speed that flips
between states): measured / predicted over an executor calibration's steps has a log
standard deviation of ~0.22. Means are unaffected, but a tail percentile of inter-token
latency is a quantile of that noisy distribution, not of the prices: the deterministic twin
put p99 ITL 5-55% under the executor's in every one of the 16 vLLM-layout workloads of the
issue-15 run (``experiments/p99_sources.py``; README_validate, "Issue 15: the p99s").

A calibration keeps the spread as ``LEVELS`` equally likely multipliers: the quantiles of
measured / predicted over its step measurements (every repeat of every step), scaled to
mean 1 so that the mixture's mean is the price's. The twin reads its ITL percentiles from
the mixture of each priced step with them (``twin.results.itl_histogram``); no random draw,
so a run stays deterministic, and nothing else (the schedule, every mean) moves.
"""

from __future__ import annotations

import math

import numpy as np

#: multipliers a profile keeps: the 0.5th, 1.5th, ..., 99.5th percentiles of the ratio
LEVELS = 100


def fit_dispersion(measured, predicted, levels: int = LEVELS) -> list[float]:
    """``levels`` equally likely multipliers of a price: the quantiles of ``measured /
    predicted`` at (i + 0.5) / levels over the pairs with a positive, finite ratio, scaled to
    mean 1 (the ratios' mean; a fit of the means leaves it near 1 anyway)."""
    m, p = np.asarray(measured, float), np.asarray(predicted, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = m / p
    r = r[np.isfinite(r) & (r > 0)]
    if not len(r):
        raise ValueError("no step with a positive measured / predicted time to fit a "
                         "dispersion on")
    q = np.quantile(r / r.mean(), (np.arange(levels) + 0.5) / levels)
    return [float(x) for x in q]


def check_dispersion(values) -> tuple[float, ...]:
    """``values`` as a tuple of positive finite multipliers in increasing order (a
    profile's ``step_time.dispersion``); ValueError otherwise."""
    v = tuple(float(x) for x in values)
    if not v:
        raise ValueError("a step-time dispersion needs at least one multiplier")
    if not all(math.isfinite(x) and x > 0 for x in v):
        raise ValueError("step-time dispersion multipliers must be positive and finite")
    if any(b < a for a, b in zip(v, v[1:])):
        raise ValueError("step-time dispersion multipliers must not decrease (quantiles)")
    return v


def quantile(values, q: float) -> float:
    """The ``q`` quantile (0..1) of the multipliers ``values`` (each the quantile at
    (i + 0.5) / len), interpolated between them."""
    v = np.asarray(values, float)
    return float(np.interp(q, (np.arange(len(v)) + 0.5) / len(v), v))


def log_sd(values) -> float:
    """The multipliers' standard deviation of the log: the spread in one number (provenance,
    reports)."""
    return float(np.std(np.log(np.asarray(values, float))))

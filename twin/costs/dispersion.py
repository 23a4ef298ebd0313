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

A TTFT spans several steps whose spreads are correlated (the box's speed holds for a few
steps: lag-1 correlation ~0.6 on the tiny model) but average out over hundreds: the
calibration also keeps the correlation of log(measured / predicted) between a step and the
steps after it (:func:`fit_autocorrelation`), and a request's TTFT is mixed with the
multipliers shrunk to the steps it spans (``twin.results.spread``).
"""

from __future__ import annotations

import math

import numpy as np

#: multipliers a profile keeps: the 0.5th, 1.5th, ..., 99.5th percentiles of the ratio
LEVELS = 100
#: lags of the step-to-step correlation a profile keeps (the tiny model's falls to ~0.1 by 10)
MAX_LAG = 30


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


def check_autocorrelation(values) -> tuple[float, ...]:
    """``values`` as a tuple of correlations in [-1, 1] (a profile's
    ``step_time.autocorrelation``); ValueError otherwise."""
    v = tuple(float(x) for x in values)
    if not all(math.isfinite(x) and -1.0 <= x <= 1.0 for x in v):
        raise ValueError("step-time autocorrelations must lie in [-1, 1]")
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


def fit_autocorrelation(runs, max_lag: int = MAX_LAG) -> list[float]:
    """rho_1 .. rho_max_lag of the log ratio along consecutive steps, each run (an array of
    log(measured / predicted), in step order) less its own mean, pooled over runs: the
    correlation within a run. Lags no run is long enough for are 0."""
    num, cnt = np.zeros(max_lag), np.zeros(max_lag)
    var = n = 0.0
    for x in runs:
        x = np.asarray(x, float)
        x = x[np.isfinite(x)]
        x = x - x.mean() if len(x) else x
        var, n = var + float(x @ x), n + len(x)
        for k in range(1, min(max_lag, len(x) - 1) + 1):
            num[k - 1] += float(x[:-k] @ x[k:])
            cnt[k - 1] += len(x) - k
    if var <= 0:
        return [0.0] * max_lag
    rho = np.divide(num, cnt, out=np.zeros(max_lag), where=cnt > 0) / (var / n)
    return [float(r) for r in np.clip(rho, -1.0, 1.0)]

"""TTFT percentiles with the step times' measured spread (issue 15's p99 TTFT).

A TTFT is the steps a request waits through and is prefilled in: one to a few on a light
engine, hundreds behind a queue. The twin prices them deterministically; the executor's
steps spread around those prices with a correlation that holds for a few steps
(``twin.costs.dispersion``). So one request's TTFT is its price times the spread of the mean
over the steps it spans: the whole spread for one step, nearly none for hundreds. The
number of steps is the TTFT over the run's mean busy step (a light request's wait and
prefill, a queued one's queue). The percentile is read from the mixture, binned as ITL is
(0.5% log bins, ``twin.results.itl_histogram``), requests grouped by how far their spread
is shrunk (``SHRINK_LEVELS`` groups).
"""

from __future__ import annotations

import numpy as np

from twin.results.itl_histogram import NBINS, bin_index, mixed, weights_percentile

SHRINK_LEVELS = 64   # groups of sqrt(share) in [0, 1]: 1.6% steps of the log spread


def spread_percentiles(values_s, mean_step_s: float, dispersion, autocorrelation,
                       qs=(50, 99)) -> list[float]:
    """Percentiles ``qs`` (seconds) of ``values_s`` (TTFTs) each mixed with ``dispersion``
    shrunk to the steps it spans (``values_s / mean_step_s``; ``autocorrelation``: the
    step-to-step correlation). NaN for no value."""
    v = np.asarray(values_s, float)
    v = v[np.isfinite(v)]
    if not len(v):
        return [float("nan")] * len(qs)
    steps = v / max(mean_step_s, 1e-12)
    level = np.rint(np.sqrt(mean_share(steps, autocorrelation)) * SHRINK_LEVELS)
    idx = bin_index(v)
    w = np.zeros(NBINS)
    for g in np.unique(level):
        counts = np.bincount(idx[level == g], minlength=NBINS).astype(float)
        w += mixed(counts, shrunk(dispersion, (g / SHRINK_LEVELS) ** 2))
    return [weights_percentile(w, q) for q in qs]


def mean_share(steps, autocorrelation) -> np.ndarray:
    """Per element of ``steps``: the variance of the mean log spread over that many
    consecutive steps, as a share of one step's (1 for one step; ~(1 + 2 sum rho) / n for
    many), from the correlations ``autocorrelation`` (0 beyond them), within [0, 1]."""
    rho = np.asarray(autocorrelation, float)
    n = np.maximum(np.rint(np.asarray(steps, float)), 1.0)
    # sum over lags k < n of (1 - k / n) rho_k, from running sums of rho_k and k rho_k
    c1 = np.r_[0.0, np.cumsum(rho)]
    c2 = np.r_[0.0, np.cumsum(np.arange(1, len(rho) + 1) * rho)]
    j = np.minimum(n - 1, len(rho)).astype(np.int64)
    return np.clip((1 + 2 * (c1[j] - c2[j] / n)) / n, 0.0, 1.0)


def shrunk(dispersion, share: float) -> np.ndarray:
    """The multipliers of a mean over steps whose log spread has ``share`` of one step's
    variance: each log multiplier x sqrt(share), scaled back to mean 1."""
    m = np.exp(np.log(np.asarray(dispersion, float)) * np.sqrt(share))
    return m / m.mean()

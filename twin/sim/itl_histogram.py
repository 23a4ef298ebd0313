"""Token-weighted histogram of inter-token latencies on log-spaced bins.

Percentiles of ITL need every decode token's gap; a run has millions of them but only as
many distinct step durations as steps, and a jump over k steps spans a linear range. Bins
0.5% wide keep p50/p99 within 0.5% at O(1) memory.
"""

from __future__ import annotations

import math

import numpy as np

LO, HI, RATIO = 1e-5, 1e3, 1.005
NBINS = int(math.log(HI / LO) / math.log(RATIO)) + 2
_LOG_RATIO = math.log(RATIO)


class ITLHistogram:
    def __init__(self):
        self.w = np.zeros(NBINS)
        self.total = 0.0

    @staticmethod
    def _bin(d: float) -> int:
        if d <= LO:
            return 0
        return min(NBINS - 1, int(math.log(d / LO) / _LOG_RATIO) + 1)

    def add(self, d: float, weight: float) -> None:
        self.w[self._bin(d)] += weight
        self.total += weight

    def add_range(self, first: float, last: float, steps: int, per_step: float) -> None:
        """``steps`` durations spread linearly from ``first`` to ``last``."""
        if steps <= 0:
            return
        if steps == 1 or abs(last - first) <= 1e-3 * first:
            self.add((first + last) / 2, per_step * steps)
            return
        parts = min(steps, 16)
        for j in range(parts):
            self.add(first + (last - first) * (j + 0.5) / parts, per_step * steps / parts)

    def percentile(self, q: float) -> float:
        if self.total <= 0:
            return float("nan")
        c = np.cumsum(self.w)
        i = int(np.searchsorted(c, q / 100.0 * self.total))
        i = min(i, NBINS - 1)
        return LO * RATIO ** (i - 0.5) if i > 0 else LO

"""Token-weighted inter-token latencies, binned at the end on log-spaced bins.

Percentiles of ITL need every decode token's gap; a run has millions of them but only as
many distinct step durations as steps, and a jump over k steps spans a linear range. The
run appends (first, last, steps, tokens per step) per step or jump — cheap in the hot
loop — and the percentiles are read from a histogram with 0.5%-wide bins. The twin's
percentiles may be read from the mixture of every duration with the step times' measured
spread (:func:`mixed`): its prices are deterministic, a real engine's steps are not.
"""

from __future__ import annotations

from array import array

import numpy as np

LO, HI, RATIO = 1e-5, 1e3, 1.005
NBINS = int(np.log(HI / LO) / np.log(RATIO)) + 2
PARTS = 16   # a jump's linear range of durations is spread over this many points


class ITLHistogram:
    CHUNK = 1 << 15

    def __init__(self):
        self._cols = tuple(array("d") for _ in range(4))   # first, last, steps, per step
        self._w = np.zeros(NBINS)
        self._done = 0

    def add(self, d: float, weight: float) -> None:
        self.add_range(d, d, 1, weight)

    def add_range(self, first: float, last: float, steps: int, per_step: float) -> None:
        """``steps`` durations spread linearly from ``first`` to ``last``."""
        if steps > 0:
            f, l, k, p = self._cols
            if len(f) >= self.CHUNK:   # bin a full chunk and drop it: memory stays bounded
                self._compact()
            f.append(first)
            l.append(last)
            k.append(steps)
            p.append(per_step)

    def _compact(self) -> None:
        """Bin every range added so far and forget them (the same chunks in the same order
        as one binning at the end: the same weights). The last range stays until the next
        is added, so :meth:`replace_last` can still replace it."""
        self._weights()
        for c in self._cols:
            del c[:]
        self._done = 0

    def replace_last(self, first: float, last: float, steps: int, per_step: float) -> None:
        """Replace the last range added (a run cut short after it was priced: a router
        fed its clock an arrival that changes the schedule, ``twin.sim.fed``)."""
        for c in self._cols:
            c.pop()
        self.add_range(first, last, steps, per_step)

    def _weights(self) -> np.ndarray:
        """Bin what was added since the last call, a chunk at a time (bounded memory)."""
        n = len(self._cols[0])
        w = self._w
        for lo in range(self._done, n, self.CHUNK):
            hi = min(lo + self.CHUNK, n)
            first, last, steps, per = (np.frombuffer(c, dtype=np.float64)[lo:hi] for c in self._cols)
            parts = np.minimum(steps, PARTS)
            j = np.arange(PARTS)[None, :]
            d = first[:, None] + (last - first)[:, None] * ((j + 0.5) / parts[:, None])
            wt = np.where(j < parts[:, None], (per * steps / parts)[:, None], 0.0)
            np.add.at(w, bin_index(d).ravel(), wt.ravel())
        self._done = n
        return w

    @property
    def total(self) -> float:
        return float(self._weights().sum())

    def percentile(self, q: float, dispersion=None) -> float:
        """The ``q``-th percentile of the token-weighted durations; ``dispersion``: equally
        likely multipliers of every duration (``twin.costs.dispersion``, a profile's
        ``step_time.dispersion``): the percentile of the mixture, as a run whose steps spread
        so around their prices would show it. None: of the durations as recorded."""
        return weights_percentile(self.bins(dispersion), q)

    def bins(self, dispersion=None) -> np.ndarray:
        """The token weights per bin (mixed with ``dispersion`` as :meth:`percentile`
        reads them): what a deployment or fleet sums over its servers to read its
        percentiles over all their tokens (a copy)."""
        w = self._weights()
        return w.copy() if dispersion is None else mixed(w, dispersion)


def bin_index(d: np.ndarray) -> np.ndarray:
    """The 0.5%-wide log bin of each duration ``d`` (seconds; clipped to the range)."""
    return np.clip(np.floor(np.log(np.maximum(d, LO) / LO) / np.log(RATIO)) + 1,
                   0, NBINS - 1).astype(np.int64)


def weights_percentile(w: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of bin weights ``w`` (the bin's centre; NaN when empty)."""
    total = w.sum()
    if total <= 0:
        return float("nan")
    i = min(int(np.searchsorted(np.cumsum(w), q / 100.0 * total)), NBINS - 1)
    return LO * RATIO ** (i - 0.5) if i > 0 else LO


def mixed(w: np.ndarray, dispersion) -> np.ndarray:
    """Bin weights ``w`` with every duration spread over the equally likely multipliers
    ``dispersion``: each multiplier moves a copy of the histogram by its log (whole bins,
    within half a bin's 0.25%), each copy weighing 1 / len(dispersion). The same total."""
    shifts = np.rint(np.log(np.asarray(dispersion, float)) / np.log(RATIO)).astype(np.int64)
    nz = np.flatnonzero(w)
    idx = np.clip(nz[None, :] + shifts[:, None], 0, NBINS - 1)
    wt = np.broadcast_to(w[nz] / len(shifts), idx.shape)
    return np.bincount(idx.ravel(), weights=wt.ravel(), minlength=NBINS)

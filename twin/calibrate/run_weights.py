"""How a step-time fit weighs its runs: by the regime each was measured in.

A grid of real runs is rarely balanced: the H100 fit set holds 85 overloaded runs of 131
and four light ones at >= 64 slots. Weighing each cell of runs alike (:func:`cell_weights`)
keeps the many of one regime from setting costs the few of another depend on; the fit's
score then takes weighted medians (:func:`weighted_median`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["cell_weights", "regime", "weighted_median"]


def cell_weights(runs, by_slots: bool = False) -> np.ndarray:
    """Per-run weights (mean 1) under which each cell of runs counts alike: a cell is the
    runs in one measured regime (no queue: ``num_waiting_mean`` < 1; a queue; overloaded:
    > 1000 waiting), or with ``by_slots`` those of one ``max_loras`` in one regime.
    Residuals are multiplied by the square root, so a cell's share of the squared loss is
    the same whatever its size."""
    cells = [(r.config.max_loras if by_slots else 0,
              regime(r.metrics.get("num_waiting_mean", 0.0))) for r in runs]
    size = {c: cells.count(c) for c in set(cells)}
    w = np.array([1.0 / size[c] for c in cells])
    return w * len(runs) / w.sum()


def regime(waiting_mean: float) -> str:
    """A run's measured regime from its mean waiting queue (the fit's thresholds)."""
    return "light" if waiting_mean < 1.0 else ("queue" if waiting_mean <= 1000 else "overloaded")


def weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    """The weighted median (the plain median when the weights are equal)."""
    if np.allclose(w, w[0]):
        return float(np.median(x))
    o = np.argsort(x)
    c = np.cumsum(w[o])
    return float(x[o][np.searchsorted(c, 0.5 * c[-1])])

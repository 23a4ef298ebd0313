"""GEMM efficiency by size: a measured table of matmul rates, and a step's dense time from it.

One flat FLOP rate (``dense_s_per_flop``) fitted on one model's matrices does not carry to
another model's on a CPU: a 576x1536 GEMM and a 896x4864 one run at different FLOP rates, and
a 1-token GEMM is a weight read, a 256-token one compute-bound. Following the kernel databases
of AIConfigurator/Vidur, :class:`GemmTable` holds the time of ``y = x @ W^T`` (``x``: m x k,
``W``: n x k) measured on the machine (``twin.calibrate.gemm_bench``) at a grid of m, k, n,
and interpolates its FLOP rate trilinearly in (log m, log k, log n), clamped at the grid's
edges (a rate that has saturated stays there: the vocabulary GEMM beyond the largest n runs at
the largest n's rate). A step's dense time is then the sum over its GEMMs of
``flops / rate(m, k, n)`` (:func:`dense_curves`): per layer qkv, o, gate_up and down at the
step's token count, the lm_head at its logits rows. The hardware model
(``twin.costs.hardware``) keeps one multiplier, ``gemm_scale``, on that sum.
"""

from __future__ import annotations

import numpy as np

#: the step-feature sums a dense curve is a function of: the decoder layers' GEMMs run on every
#: token of the step, the lm_head on one row per sequence (decode token or prefill chunk)
TOKENS = ("prefill_tokens", "decode_tokens")
LOGIT_ROWS = ("decode_tokens", "prefill_seqs")


class GemmTable:
    """Measured seconds of ``x[m, k] @ W[n, k]^T`` on a grid; ``seconds(m, k, n)`` at any size.

    ``m``, ``k``, ``n``: increasing grid values; ``s``: array ``[len(m), len(k), len(n)]`` of
    seconds per GEMM; ``info``: what it was measured with (threads, dtype, torch version)."""

    def __init__(self, m, k, n, s, info: dict | None = None):
        self.m, self.k, self.n = (np.asarray(v, float) for v in (m, k, n))
        self.s = np.asarray(s, float)
        want = (len(self.m), len(self.k), len(self.n))
        if self.s.shape != want:
            raise ValueError(f"GEMM table seconds have shape {self.s.shape}, expected {want}")
        for name, v in (("m", self.m), ("k", self.k), ("n", self.n)):
            if len(v) < 1 or (v <= 0).any() or (np.diff(v) <= 0).any():
                raise ValueError(f"GEMM table grid {name} must be positive and increasing")
        if not (self.s > 0).all():
            raise ValueError("GEMM table seconds must be positive")
        self.info = dict(info or {})
        M, K, N = np.meshgrid(self.m, self.k, self.n, indexing="ij")
        self._log_rate = np.log(2.0 * M * K * N / self.s)

    def rate(self, m, k: float, n: float) -> np.ndarray:
        """FLOP/s at token counts ``m`` (array) for a ``k`` x ``n`` weight: trilinear in the
        logs of the grid, clamped at its edges."""
        m = np.atleast_1d(np.asarray(m, float))
        (k0, k1, wk), (n0, n1, wn) = _bracket(self.k, k), _bracket(self.n, n)
        lr = self._log_rate        # the k-n plane first (one column per grid m), then m
        col = ((1 - wk) * ((1 - wn) * lr[:, k0, n0] + wn * lr[:, k0, n1])
               + wk * ((1 - wn) * lr[:, k1, n0] + wn * lr[:, k1, n1]))
        lm = np.log(np.clip(m, self.m[0], self.m[-1]))
        return np.exp(np.interp(lm, np.log(self.m), col))

    def seconds(self, m, k: float, n: float) -> np.ndarray:
        """Seconds of one GEMM at token counts ``m`` (0 tokens: 0 s)."""
        m = np.atleast_1d(np.asarray(m, float))
        return np.where(m > 0, 2.0 * m * k * n / self.rate(np.maximum(m, 1.0), k, n), 0.0)

    def to_dict(self) -> dict:
        return {"m": self.m.tolist(), "k": self.k.tolist(), "n": self.n.tolist(),
                "seconds": self.s.tolist(), **({"info": self.info} if self.info else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "GemmTable":
        return cls(d["m"], d["k"], d["n"], d["seconds"], d.get("info"))


def _bracket(grid: np.ndarray, x: float) -> tuple[int, int, float]:
    """(lower index, upper index, weight of the upper point) of ``x`` on ``grid`` in log
    space, clamped to the grid."""
    if len(grid) == 1:
        return 0, 0, 0.0
    lx, lg = np.log(np.clip(x, grid[0], grid[-1])), np.log(grid)
    i = int(np.clip(np.searchsorted(lg, lx, side="right") - 1, 0, len(grid) - 2))
    return i, i + 1, float((lx - lg[i]) / (lg[i + 1] - lg[i]))


def dense_curves(table: GemmTable, layer: list, layers: int, head: tuple, m=None) -> list[dict]:
    """A step's dense time as curves of its features (the
    :class:`twin.costs.step_time.StepTimeModel` ``curves`` form): ``layers`` x the GEMMs
    ``layer`` ((k, n) pairs) as a function of the step's tokens, the lm_head ``head`` (k, n)
    of its logits rows; each sampled at ``m`` (default: the table's m grid)."""
    m = table.m if m is None else np.asarray(m, float)
    body = sum(table.seconds(m, k, n) for k, n in layer) * layers
    return [{"features": list(TOKENS), "x": m.tolist(), "s": body.tolist()},
            {"features": list(LOGIT_ROWS), "x": m.tolist(), "s": table.seconds(m, *head).tolist()}]

"""The machine-speed anchor's definition and statistics, without torch.

:mod:`twin.executor.speed_anchor` measures the anchor (torch forward steps at the shapes
below); what the calibration records and the validation compares — the shapes' version,
the median and the spread of samples — is plain arithmetic that callers above the executor
(``twin.calibrate``, ``twin.validate``) use without loading torch.
"""

from __future__ import annotations

import statistics

__all__ = ["ANCHOR_SHAPES", "ANCHOR_VERSION", "anchor_spread", "anchor_summary"]

ANCHOR_VERSION = 1   # bump when the shapes change: anchors of two versions do not compare
# (name, [(new tokens, start position, with adapter)]): a prefill chunk, a decode batch,
# a decode batch beside a prefill chunk
ANCHOR_SHAPES = (
    ("prefill", [(96, 0, True)]),
    ("decode", [(1, 127, i % 2 == 0) for i in range(8)]),
    ("mixed", [(1, 63, i % 2 == 0) for i in range(4)] + [(32, 0, False)]),
)


def anchor_spread(samples) -> float:
    """(max - min) / median of anchor samples."""
    s = [float(x) for x in samples]
    return (max(s) - min(s)) / statistics.median(s)


def anchor_summary(samples) -> dict:
    """Median and relative spread (:func:`anchor_spread`) of anchor samples (seconds)."""
    s = [float(x) for x in samples]
    med = statistics.median(s)
    return {"speed_anchor_s": med, "speed_anchor_spread": anchor_spread(s),
            "speed_anchor_samples": len(s), "speed_anchor_version": ANCHOR_VERSION}

"""Ties between verified configurations: how close two throughputs must be for the twin
to call them a tie (its own measured error, :func:`tie_band`), which configurations are
that close to the best (:func:`declared_tie`), and the report's line naming them
(:func:`tie_text`). Ranking closer than the twin's error would claim a precision it has
not shown; the recommendation names the tie instead of picking one silently.
"""

from __future__ import annotations

import numpy as np

#: The twin's throughput error when a profile records none of its own: its held-out median
#: throughput SMAPE against real vLLM runs (``experiments/reproduce_vllm_h100.py``, 1.3 %).
DEFAULT_TIE_BAND = 0.013


def tie_band(profile) -> tuple[float, str]:
    """How close two throughputs must be for the twin to call them a tie, and where that
    figure comes from. It is the twin's own measured throughput error: the median SMAPE that
    the profile's calibration records on its fit runs
    (``provenance.step_time.throughput_smape_median``), else :data:`DEFAULT_TIE_BAND`.
    Ranking two configurations closer than this would claim a precision the twin has not
    shown, so they are reported as a tie, both named, rather than one picked silently."""
    st = ((getattr(profile, "provenance", None) or {}).get("step_time") or {})
    e = st.get("throughput_smape_median") if isinstance(st, dict) else None
    if isinstance(e, (int, float)) and np.isfinite(e) and e > 0:
        return float(e) / 100.0, (f"profile {profile.name}: median throughput SMAPE on its "
                                  "fit runs")
    return DEFAULT_TIE_BAND, "default: the twin's held-out throughput SMAPE vs real vLLM runs"


def within_band(values: dict, band: float) -> list:
    """The keys whose value is within ``band`` (relative) of the largest, best first."""
    if not values:
        return []
    top = max(values.values())
    near = [k for k, v in values.items() if v >= top * (1 - band)]
    return sorted(near, key=lambda k: -values[k])


def declared_tie(values: dict, band: float, source: str, picked,
                 ttft_p99: dict | None = None) -> dict | None:
    """A tie among verified configurations ({max_loras: objective}) within ``band`` of the
    best, or None when only one is that close. ``picked`` is the one recommended;
    ``ttft_p99`` ({max_loras: ms}): the tied runs' p99 TTFT, kept so that the report does
    not call a configuration as good whose queue is far longer (a tie is on throughput)."""
    near = within_band(values, band)
    if len(near) < 2:
        return None
    top = max(values[k] for k in near)
    spread = 1.0 - min(values[k] for k in near) / top if top > 0 else 0.0
    tie = {"max_loras": sorted(int(k) for k in near), "band": band, "band_source": source,
           "spread": spread, "picked": int(picked)}
    if ttft_p99:
        tie["ttft_p99_ms"] = {int(k): float(ttft_p99[k]) for k in near if k in ttft_p99}
    return tie


#: tied configurations whose p99 TTFTs differ more than this factor are said to differ
TTFT_APART = 1.5


def tie_text(tie: dict) -> str:
    """"tie: max_loras=8 and 16 within 3.8% ..." for the report."""
    ml = [str(m) for m in tie["max_loras"]]
    names = ", ".join(ml[:-1]) + " and " + ml[-1]
    text = (f"tie: max_loras={names} within {100 * tie['band']:.1f}% (the twin's throughput "
            f"error; {tie['band_source']}): they differ by {100 * tie['spread']:.2f}%, which "
            f"the twin cannot resolve; max_loras={tie['picked']} is the one recommended, "
            f"{'the others are' if len(ml) > 2 else 'the other is'} as good on throughput "
            "within that error")
    p99 = {k: v for k, v in (tie.get("ttft_p99_ms") or {}).items() if v == v and v > 0}
    if len(p99) > 1 and max(p99.values()) > TTFT_APART * min(p99.values()):
        text += ", not on latency: TTFT p99 " + ", ".join(
            f"{v:,.0f} ms at max_loras={k}" for k, v in sorted(p99.items()))
    return text

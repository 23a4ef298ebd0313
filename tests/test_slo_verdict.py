"""The goodput objective's verdict when no configuration meets the SLOs: what it may say
is achievable, and what no knob and no GPU count reaches (``twin.ml.slo_verdict``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.costs.profile import load_profile
from twin.ml.queueing import tpot_floor_ms
from twin.ml.slo_verdict import slo_verdict, verdict_lines

KNOBS = ("max_loras",)


def _case(runs: list[dict]):
    cand = pd.DataFrame({"max_loras": [r["max_loras"] for r in runs],
                         "_config": [ServingConfig(max_loras=r["max_loras"]) for r in runs]})
    base = {"starts": True, "full": True, "ttft_p99": np.nan, "tpot_p99": np.nan}
    return cand, {i: {**base, **{k: v for k, v in r.items() if k != "max_loras"}}
                  for i, r in enumerate(runs)}


def test_when_nothing_keeps_up_no_p99_is_called_achievable():
    """Every run starves: the report promised "the best achievable p99s below" and listed
    none; it now says none is achievable on this GPU and where to go."""
    cand, results = _case([{"max_loras": 8, "starving": True, "ttft_p99": 9e4,
                            "tpot_p99": 120.0},
                           {"max_loras": 16, "full": False, "starving": None,
                            "slo_violated_early": True, "slo_violation_lower_bound": 2.5,
                            "p99_lower_bounds": {"ttft_p99": 1250.0, "tpot_p99": None}}])
    v = slo_verdict(cand, results, {"ttft": 500.0, "tpot": 50.0}, [], KNOBS)
    assert v["keeping_up"] == 0 and v["best"] == {}
    text = "\n".join(verdict_lines(v))
    assert "best achievable p99s below" not in text
    assert "no configuration tried keeps up" in text and "twin place --slo" in text


def test_a_tpot_slo_under_one_lone_decode_step_is_out_of_reach():
    """A TPOT SLO below the step of one request decoding alone: no knob and no number of
    GPUs reaches it, so the report says so instead of "spread the adapters over more
    GPUs" (and a TPOT SLO above that floor keeps the old advice)."""
    profile = load_profile("llama31-8b-h100-64gb")
    floor = tpot_floor_ms(profile)
    assert 0 < floor <= 1000 * profile.step_time.base["const"] + 1.0
    cand, results = _case([{"max_loras": 8, "starving": False, "ttft_p99": 900.0,
                            "tpot_p99": 38.0},
                           {"max_loras": 16, "starving": False, "ttft_p99": 700.0,
                            "tpot_p99": 40.0}])
    low = slo_verdict(cand, results, {"ttft": 100.0, "tpot": floor / 2}, [], KNOBS,
                      tpot_floor_ms=floor)
    assert low["out_of_reach"] == {"tpot_p99": {"floor": floor, "slo": floor / 2}}
    text = "\n".join(verdict_lines(low))
    assert "p99 TPOT" in text and "out of reach" in text and f"{floor:.1f} ms a token" in text
    tpot_lines = [x for x in text.splitlines() if "TPOT" in x and "spread" in x]
    assert tpot_lines == []
    ok = slo_verdict(cand, results, {"ttft": 100.0, "tpot": 30.0}, [], KNOBS,
                     tpot_floor_ms=floor)
    assert floor < 30.0 and ok["out_of_reach"] == {}
    assert "spread the adapters over more GPUs" in "\n".join(verdict_lines(ok))

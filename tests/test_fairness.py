"""One adapter held back while the run keeps up in total (``twin.results.fairness``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twin.config import ServingConfig
from twin.results.fairness import slowest_adapter
from twin.sim import simulate
from twin.workload.generate import rate_class_trace, uniform_lengths

PROFILE = "llama31-8b-h100-64gb-first-principles"


def test_the_adapter_max_loras_holds_back_is_named_though_the_run_keeps_up():
    """Two busy adapters hold both max_loras=2 slots: the third's requests wait ~a minute
    (vLLM skips a request whose adapter needs a slot none frees) while the whole load is
    served; with a slot for each adapter nothing is held back."""
    tr = rate_class_trace(3, (4.0, 4.0, 0.2), duration_s=120,
                          lengths=uniform_lengths(64, 1024), seed=3)
    slow = simulate(tr, ServingConfig(max_loras=2, max_cpu_loras=3), PROFILE)
    s = slow.summary
    assert not s["starving"]
    held = s["slowest_adapter"]
    rare = tr["adapter"].value_counts().idxmin()
    assert held["adapter"] == rare and held["held_back"]
    assert held["requests"] == int((tr["adapter"] == rare).sum())
    rq = slow.requests
    mine = (rq["first_scheduled_s"] - rq["arrival_s"])[rq["adapter"] == rare]
    assert np.isclose(held["wait_mean_s"], mine.mean()) and held["wait_mean_s"] > 10
    text = slow.format_summary()
    assert "Verdict: keeps up" in text and f"adapter {rare}'s" in text.replace("\n  ", " ")
    fair = simulate(tr, ServingConfig(max_loras=3, max_cpu_loras=3), PROFILE).summary
    assert not fair["slowest_adapter"]["held_back"]
    assert "held back" not in simulate(tr, ServingConfig(max_loras=3, max_cpu_loras=3),
                                       PROFILE).format_summary()


def test_slowest_adapter_by_hand():
    """Waits to first scheduling, the run's end for one never scheduled, rejected requests
    left out, the base model a group of its own, groups under 3 requests not ranked."""
    nan = np.nan
    req = pd.DataFrame({
        "adapter": ["a", "a", "a", None, None, None, "b", "b", "c"],
        "arrival_s": [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 0.5, 0.0],
        "first_scheduled_s": [0.1, 1.1, nan, 0.2, 1.2, 2.2, 50.0, 50.0, 90.0],
        "status": ["finished", "finished", "unfinished", "finished", "finished", "finished",
                   "finished", "finished", "rejected"],
    })
    got = slowest_adapter(req, end_s=20.0)
    # a: (0.1 + 0.1 + 18) / 3; base: 0.2; b (2 requests) and c (rejected) not ranked, but
    # b's waits count among the others'
    assert got["adapter"] == "a" and got["requests"] == 3
    assert np.isclose(got["wait_mean_s"], 18.2 / 3)
    assert np.isclose(got["others_wait_mean_s"], (0.6 + 50.0 + 49.5) / 5)
    assert not got["held_back"]           # b's long waits make the others' mean long too
    assert slowest_adapter(req.iloc[:3], end_s=20.0) is None   # one group: nothing to compare


def test_requests_no_server_received_are_not_held_back():
    """A deployment's unserved requests (an adapter without a server) never queued: they
    are not an adapter held back (one read 29.9 s 'waiting' behind max_loras), and a
    starving run's summary adds no held-back note to its verdict."""
    req = pd.DataFrame({
        "adapter": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
        "arrival_s": [0.0, 1.0, 2.0] * 3,
        "first_scheduled_s": [0.1, 1.1, 2.1, 0.1, 1.1, 2.1, np.nan, np.nan, np.nan],
        "status": ["finished"] * 6 + ["unserved"] * 3,
    })
    got = slowest_adapter(req, end_s=60.0)
    assert got["adapter"] in ("a", "b") and not got["held_back"]
    from twin.results.fairness import held_back_note
    held = {"slowest_adapter": {"adapter": "c", "requests": 3, "wait_mean_s": 50.0,
                                "others_wait_mean_s": 0.1, "held_back": True}}
    assert held_back_note({**held, "starving": False}).startswith("adapter c's 3 requests")
    assert held_back_note({**held, "starving": True}) is None


def test_no_adapter_may_take_the_base_models_name():
    from twin.errors import TwinInputError
    from twin.sched.request import BASE_MODEL
    from twin.workload.schema import validate_trace

    tr = rate_class_trace(2, (1.0,), duration_s=10, lengths=uniform_lengths(8, 64), seed=1)
    tr["adapter"] = tr["adapter"].astype(object)
    tr.loc[3, "adapter"] = BASE_MODEL
    with pytest.raises(TwinInputError, match="how twin names the base model"):
        validate_trace(tr)

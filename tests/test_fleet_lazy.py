"""The lazy exact loop (``twin.fleet.lazy``): the same routes and runs as the heap-driven
exact loop, replica for replica and request for request."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from twin.config import ServingConfig
from twin.costs.step_time import StepTimeModel
from twin.fleet import lazy, loop, simulate_fleet
from twin.fleet.routers import AdapterAffinity
from twin.workload.generate import rate_class_trace, uniform_lengths

PROFILE = "llama31-8b-h100-64gb"   # linear, every term >= 0: a step-time floor


@pytest.mark.parametrize("n,slack", [(3, 16), (5, 2)])
def test_lazy_loop_routes_and_runs_as_the_exact_loop(n, slack, monkeypatch):
    trace = rate_class_trace(12, (6.0, 3.0, 1.5), duration_s=40,
                             lengths=uniform_lengths(8, 512), seed=3)
    config = ServingConfig(max_loras=2, max_cpu_loras=4, max_num_seqs=32)
    advanced = []
    refine = lazy.Lagging.refine
    monkeypatch.setattr(lazy.Lagging, "refine",
                        lambda self, k, j, a: (advanced.append(j), refine(self, k, j, a)))
    runs = []
    for on in (True, False):
        monkeypatch.setattr(loop, "LAZY", on)
        runs.append(simulate_fleet(trace, n, AdapterAffinity(slack=slack), config=config,
                                   profile=PROFILE))
    a, b = runs
    assert advanced and len(set(advanced)) < len(trace)   # lagged: not advanced every arrival
    pd.testing.assert_frame_equal(a.result.requests, b.result.requests, check_exact=True)
    assert _timeless(a.summary) == _timeless(b.summary)
    for x, y in zip(a.replicas, b.replicas):
        pd.testing.assert_frame_equal(x.timeline, y.timeline, check_exact=True)


def _timeless(summary) -> str:
    """The summary without the run's own wall time."""
    fleet = {k: v for k, v in summary["fleet"].items() if k != "wall_s"}
    return json.dumps({**summary, "fleet": fleet}, sort_keys=True)


def test_step_floor_only_without_negative_terms():
    assert StepTimeModel({"const": 0.01, "decode_tokens": 1e-4}).min_step_s() == 0.01
    assert StepTimeModel({"const": 0.01, "decode_tokens": -1e-4}).min_step_s() == 0.0

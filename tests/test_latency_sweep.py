"""The latency heads' training sweep (``twin.ml.latency_sweep``): it spans the knobs the
goodput search and the SLO evaluation vary, at the evaluation's short window and the
training's own, deterministically, without repeating the recommender sweep's points and
without any held-out workload."""

from __future__ import annotations

import pytest

from twin.costs.profile import load_profile
from twin.ml.latency_sweep import WINDOWS, latency_plan
from twin.ml.search_space import LATENCY_GRID, LATENCY_KNOBS, space_configs
from twin.ml.spec import paper_base
from twin.ml.sweep import EarlyExit, plan
from twin.ml.train import sample_workloads

UNIFORM = ({"kind": "uniform", "lo": 8, "hi": 512},)


@pytest.fixture(scope="module")
def setup():
    profile = load_profile(None)
    specs = sample_workloads(6, seed=0, window_s=600.0, lengths=UNIFORM)
    return profile, specs, latency_plan(specs, profile=profile)


def test_points_span_the_latency_knobs_at_both_windows(setup):
    profile, specs, tasks = setup
    assert {t.window_s for t in tasks} == set(WINDOWS)
    for knob, grid in LATENCY_GRID.items():
        seen = {getattr(t.config, knob) for t in tasks}
        assert len(seen) >= 3 and seen <= set(grid) | {getattr(paper_base(), knob)}, knob
    for spec in specs:   # each workload: its quota per window, configurations that start
        mine = [t for t in tasks if t.spec.key == spec.key]
        n = spec.params["n_adapters"]
        space = space_configs(n, max(spec.params["ranks"]), paper_base(), profile,
                              LATENCY_KNOBS)
        for w, k in WINDOWS.items():
            at = [t.config for t in mine if t.window_s == w]
            assert len(at) == min(k, len(space)) and len(set(at)) == len(at)
            assert all(c in space for c in at)


def test_design_is_deterministic_and_new_to_the_recommender_sweep(setup):
    profile, specs, tasks = setup
    again = latency_plan(specs, profile=profile)
    assert [t.key for t in again] == [t.key for t in tasks]
    paper = {t.key for t in plan(specs, window_s=600.0, profile=profile,
                                 early_exit=EarlyExit())}
    assert paper.isdisjoint(t.key for t in tasks)
    other = latency_plan(specs, profile=profile, seed=1)
    assert [t.key for t in other] != [t.key for t in tasks]


def test_windows_longer_than_the_training_window_are_not_drawn(setup):
    profile, specs, _ = setup
    short = latency_plan(specs[:2], profile=profile, paper_window_s=120.0)
    assert {t.window_s for t in short} == {120.0}
    # at its own window the paper's knobs are the recommender sweep's points: not drawn
    base = paper_base()
    assert not any(all(getattr(t.config, k) == getattr(base, k) for k in LATENCY_GRID)
                   for t in short)


def test_held_out_workloads_are_not_in_the_design(setup):
    profile, specs, tasks = setup
    held = sample_workloads(3, seed=1000, window_s=600.0, lengths=UNIFORM)
    assert {t.spec.key for t in tasks}.isdisjoint(s.key for s in held)

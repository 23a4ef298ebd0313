"""Executor replicas in processes of their own, routed in real time
(``twin validate --replicas N --replica-processes``; ``twin.validate.fleet_live``,
``twin.executor.live``, ``twin.fleet.view.PublishedView``)."""

from __future__ import annotations

import numpy as np
import pytest

from twin.errors import TwinInputError
from twin.fleet.view import GPU, HOST, NONE, PublishedView

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.test_fleet_executor import CFG, assert_replays_alone, trace_of  # noqa: E402
from twin.cli import main  # noqa: E402
from twin.validate.fleet import validate_fleet  # noqa: E402


def test_published_view_counts_what_was_sent_since_the_last_report():
    """A request sent after a replica's last report counts on top of it until a report
    says it was received; residency tiers are the last report's."""
    v = PublishedView(2)
    for _ in range(5):
        v.sent(0)
    assert v.outstanding_all() == [5, 0]
    v.update(0, 3, 5, (7,), (7, 8))           # all 5 received, 2 finished
    v.update(1, 0, 0, (), None)
    assert v.outstanding_all() == [3, 0]
    v.sent(1)
    v.sent(1)
    assert v.outstanding_all() == [3, 2]      # sent, not yet reported: counted
    v.update(1, 1, 1, (9,), None)             # got one of the two, in flight
    assert v.outstanding_all() == [3, 2]      # 1 in flight + 1 still on its way
    v.update(1, 0, 2, (9,), None)             # both received, both finished
    assert v.outstanding_all() == [3, 0]
    assert [v.tier(0, a) for a in (7, 8, 9, -1)] == [GPU, HOST, NONE, GPU]
    assert v.tier(1, 4) == HOST               # S-LoRA: every adapter in host memory
    assert v.best_holder([0, 1], 7) == (GPU, 3, 0)
    assert v.preloaded(8) == [0, 1]


def _trace(n=24, seed=5):
    rng = np.random.default_rng(seed)
    tr = trace_of([f"a{i}" for i in rng.integers(0, 4, n)], output=8)
    tr["arrival_s"] = np.sort(np.concatenate([np.zeros(n // 3), rng.uniform(0.2, 0.5, n // 3),
                                              rng.uniform(0.9, 1.2, n - 2 * (n // 3))]))
    tr["output_tokens"] = rng.integers(2, 16, n)
    return tr


def test_replica_processes_serve_as_lone_executors(tiny_profile):
    """Round robin over 2 replica processes: the routes are round robin's, every request is
    served, and each replica's run, replayed by the twin on its share with its own measured
    step durations, is a lone executor's run (same steps, idle wakes, loads, request
    times): a replica fed over its socket in real time schedules as ``execute`` does."""
    from twin.executor.weights import resolve_model
    from twin.validate.run import _catalogs

    tr = _trace()
    v = validate_fleet(tr, 2, tiny_profile, "round_robin", "tiny", config=CFG,
                       replica_processes=True, warmup=False)
    ex = v.executor
    assert ex.route.tolist() == [j % 2 for j in range(len(tr))]
    assert v.route_agreement == 1.0
    assert (ex.result.requests["status"] == "finished").all()
    assert ex.summary["fleet"]["per_replica"][0]["requests"] == len(tr) // 2
    _, twin_catalog = _catalogs(tr, CFG, None, resolve_model("tiny"), adapter_ranks=(8, 16),
                                seed=0)
    for k in (0, 1):
        sub = tr.iloc[np.flatnonzero(ex.route == k)].reset_index(drop=True)
        assert_replays_alone(ex.replicas[k], sub, twin_catalog)
    # each serves its half of the burst at t = 0 from logical 0, its clock its own
    assert [float(ex.replicas[k].steps["start_s"].iloc[0]) for k in (0, 1)] == [0.0, 0.0]


def test_state_reading_router_reads_the_processes_reports(tiny_profile):
    """Least outstanding requests over 2 replica processes: a burst of 6 at t = 0 is split
    3 / 3 (the router counts what it sent before any report), later requests all served."""
    tr = trace_of(["a0", "a1", "a2", "a3", "a0", "a1", "a2", "a3"], output=6)
    tr["arrival_s"] = [0.0] * 6 + [0.8, 0.9]
    v = validate_fleet(tr, 2, tiny_profile, "least_outstanding_requests", "tiny", config=CFG,
                       replica_processes=True, warmup=False)
    route = v.executor.route
    assert sorted(route[:6].tolist()) == [0, 0, 0, 1, 1, 1]
    assert (v.executor.result.requests["status"] == "finished").all()


def test_replica_processes_refuse_what_they_cannot_do(monkeypatch, tiny_profile):
    """A refreshed view and a model given loaded are refused before anything is loaded;
    the CLI refuses --replica-processes without a fleet; a replica that fails raises here
    with its traceback."""
    def refuse(*a, **k):
        raise AssertionError("validate_fleet reached the executor before refusing its input")

    tr = trace_of(["a0", "a1"], gap=0.1)
    with monkeypatch.context() as mp:
        mp.setattr("twin.validate.fleet._executor_model", refuse)
        with pytest.raises(TwinInputError, match="refresh"):
            validate_fleet(tr, 2, "cpu-tiny", "adapter_affinity", "tiny", refresh_s=0.5,
                           replica_processes=True)
        with pytest.raises(TwinInputError, match="model"):
            validate_fleet(tr, 2, "cpu-tiny", "round_robin", object(), replica_processes=True)
    assert main(["validate", "--trace", "x.csv", "--profile", "cpu-tiny",
                 "--replica-processes"]) == 2
    from twin.validate.fleet_live import _Replicas

    spec = {"threads": 1, "model_dir": str(tiny_profile.parent / "no-such-model"),
            "dtype": "float32"}
    with pytest.raises(RuntimeError, match="replica 0 failed(.|\n)*no-such-model"):
        with _Replicas([spec]):
            pass

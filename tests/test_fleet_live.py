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
            "dtype": "float32", "device": "cpu"}
    with pytest.raises(RuntimeError, match="replica 0 failed(.|\n)*no-such-model"):
        with _Replicas([spec]):
            pass


# -- the parent's side of the sockets, with replicas played by threads ----------------------
def _replicas_over_threads(*replicas):
    """A ``_Replicas`` over socket pairs whose other ends are served by the given functions
    (each called with its end, on a thread of its own); no process is started."""
    import socket
    import threading
    from multiprocessing.connection import Connection

    from twin.validate.fleet_live import _Replicas

    procs = _Replicas.__new__(_Replicas)
    procs.conns, procs.procs, threads = [], [], []
    for fn in replicas:
        mine, theirs = socket.socketpair()
        procs.conns.append(Connection(mine.detach()))
        threads.append(threading.Thread(target=fn, args=(Connection(theirs.detach()),),
                                        daemon=True))
    procs.view = PublishedView(len(replicas))
    procs._results, procs._done = [None] * len(replicas), [False] * len(replicas)
    for t in threads:
        t.start()
    return procs, threads


def test_parent_reads_every_replica_while_it_waits_for_the_results():
    """A replica publishes its state after every step until it ends; while the parent
    waits for one replica's result it keeps reading every other replica's reports, so a
    replica that publishes more than a socket's buffer holds (~300 small messages) is
    never held in ``send`` (its clock would count the wait as a step) until a slower one
    ends. Replica 0 here ends only once replica 1 has sent all its reports (or 5 s on)."""
    import threading

    sent_all = threading.Event()

    def slow(conn):
        conn.recv()   # close
        conn.send(("result", "r0" if sent_all.wait(timeout=5) else "r0, replica 1 held"))

    def busy(conn):
        conn.recv()
        for i in range(3000):
            conn.send(("state", i % 7, 0, (1, 2), (1, 2, 3)))
        sent_all.set()
        conn.send(("result", "r1"))

    procs, threads = _replicas_over_threads(slow, busy)
    assert procs.results() == ["r0", "r1"]
    assert procs.view.outstanding_all()[1] == 2999 % 7   # its last report read
    for t in threads:
        t.join(timeout=5)


def test_a_replica_that_failed_and_exited_raises_its_traceback():
    """A replica that failed sends its traceback and exits: the parent raises it, not the
    broken pipe of the close (or the row) it sends to the exited replica; a replica that
    ended without a word (killed) is named."""
    def failed(conn):
        conn.send(("error", "Traceback: boom in replica"))
        conn.close()

    def fine(conn):
        try:
            conn.recv()
            conn.send(("result", "r1"))
        except (EOFError, OSError):   # the parent gave up on the fleet
            pass

    procs, threads = _replicas_over_threads(failed, fine)
    threads[0].join(timeout=5)
    with pytest.raises(RuntimeError, match="replica 0 failed(.|\n)*boom in replica"):
        procs.results()
    procs.__exit__(RuntimeError, None, None)
    procs, threads = _replicas_over_threads(failed, fine)
    threads[0].join(timeout=5)
    with pytest.raises(RuntimeError, match="replica 0 failed(.|\n)*boom in replica"):
        procs.send(0, ("row", 3))
    procs.__exit__(RuntimeError, None, None)
    procs, threads = _replicas_over_threads(lambda conn: conn.close(), fine)
    threads[0].join(timeout=5)
    with pytest.raises(RuntimeError, match="replica 0 exited"):
        procs.results()
    procs.__exit__(RuntimeError, None, None)
    for t in threads:
        t.join(timeout=5)


def test_no_replica_process_outlives_a_failed_start(monkeypatch, tiny_profile):
    """Replica 0 fails to load its model while replica 1 loads and waits for its start:
    the parent raises replica 0's traceback and ends replica 1 too, at once (it would wait
    for a start that never comes while the parent lives on)."""
    import subprocess

    from twin.validate import fleet_live

    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            started.append(self)

    def broken_first(self, specs, _init=fleet_live._Replicas.__init__):
        _init(self, [dict(specs[0], model_dir=str(tiny_profile.parent / "no-model")),
                     *specs[1:]])

    monkeypatch.setattr(fleet_live.subprocess, "Popen", Recorded)
    monkeypatch.setattr(fleet_live._Replicas, "__init__", broken_first)
    tr = trace_of(["a0", "a1"], gap=0.1)
    with pytest.raises(RuntimeError, match="replica 0 failed") as failed:
        validate_fleet(tr, 2, tiny_profile, "round_robin", "tiny", config=CFG,
                       replica_processes=True, warmup=False)
    assert len(started) == 2 and failed.value is not None   # the parent's frames kept
    for p in started:
        p.wait(timeout=20)   # TimeoutExpired: a replica left running

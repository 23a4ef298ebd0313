"""One executor replica process's loop (``twin.validate.fleet_live.replica_main``,
``twin.executor.live.LiveEngine.serve``), run here on a thread with this test as its
parent: what its clock counts as a step."""

from __future__ import annotations

import os
import socket
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from multiprocessing.connection import Connection  # noqa: E402

from tests.test_fed_engine import CFG, pytestmark  # noqa: E402,F401 - one torch thread
from twin.executor.adapters import write_synthetic_adapters  # noqa: E402
from twin.executor.engine import _Engine  # noqa: E402
from twin.executor.inputs import checked_inputs  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402
from twin.validate.fleet_live import replica_main  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    make_tiny_llama(root / "model", seed=0)
    return root


def _spec(root, n):
    cat = AdapterCatalog(write_synthetic_adapters(root / "model", root / "ad", 2, ranks=(8,)))
    tr = pd.DataFrame({"request_id": np.arange(n), "arrival_s": np.zeros(n),
                       "adapter": pd.array([cat.adapters[i % 2] for i in range(n)],
                                           dtype="string"),
                       "prompt_tokens": np.full(n, 12), "output_tokens": np.full(n, 3)})
    tr, xcat = checked_inputs(tr, CFG, cat)
    return dict(trace=tr, config=CFG, model_dir=str(root / "model"), dtype="float32", device="cpu",
                catalog=xcat, num_gpu_blocks=64, window_s=None, sample_dt=0.05, seed=0,
                meta={}, threads=0, warmup=False)


class _Replica:
    """``replica_main`` on a thread, this object its parent's end of the socket."""

    def __init__(self, spec):
        mine, theirs = socket.socketpair()
        self.conn = Connection(mine.detach())
        self.thread = threading.Thread(target=replica_main,
                                       args=(Connection(theirs.detach()), spec), daemon=True)
        self.thread.start()
        self.last = self.until("ready")

    def until(self, kind: str, test=lambda msg: True):
        """Read the replica's messages up to one of ``kind`` that passes ``test``."""
        while True:
            msg = self.conn.recv()
            assert msg[0] != "error", msg[1]
            if msg[0] == "state":
                self.last = msg
            if msg[0] == kind and test(msg):
                return msg

    def result(self):
        self.conn.send(("close",))
        res = self.until("result")[1]
        self.thread.join(timeout=30)
        return res


def test_token_ids_are_made_outside_the_replica_clock(model_dir, monkeypatch):
    """A request's token ids (~0.1-0.3 ms each; 0.1 s here) are made before the replica's
    clock starts, as a lone executor makes them (vLLM's engine gets prompts tokenized),
    not at delivery: neither the rows given with the start (made after the start instant,
    they delayed the first step) nor those sent while it runs land in a step."""
    made = _Engine._token_ids

    def slow(self, i):
        time.sleep(0.1)
        return made(self, i)

    monkeypatch.setattr(_Engine, "_token_ids", slow)
    r = _Replica(_spec(model_dir, 10))
    start = time.perf_counter() + 0.05
    r.conn.send(("start", start, list(range(6)), True))
    time.sleep(max(start + 0.01 - time.perf_counter(), 0.0))
    for j in range(6, 10):
        r.conn.send(("row", j))
    res = r.result()
    assert (res.requests["status"] == "finished").all() and len(res.requests) == 10
    assert res.steps["duration_s"].max() < 0.3, res.steps[["start_s", "duration_s"]]


def test_an_idle_wait_for_a_late_row_is_no_step(model_dir):
    """A row that arrives while the replica waits idle, already due (the parent sent it
    late: a loaded box), starts an after-idle step that counts none of the wait (the
    replica's clock stood at its last step's end, the wait fell into the next step)."""
    r = _Replica(_spec(model_dir, 2))
    r.conn.send(("start", time.perf_counter() + 0.05, [0], True))
    r.until("state", lambda m: m[1] == 0 and m[2] == 1)   # row 0 finished: idle
    time.sleep(0.4)
    r.conn.send(("row", 1))   # its arrival (0 s) is long past
    res = r.result()
    assert (res.requests["status"] == "finished").all()
    late = res.steps[[1 in ids for ids in res.steps["batch_request_ids"]]]
    assert late["duration_s"].max() < 0.3, res.steps[["start_s", "duration_s"]]
    assert bool(late["after_idle"].iloc[0])


def test_a_start_taken_late_is_no_step(model_dir):
    """The start instant is named by the parent (~50 ms ahead); a replica that takes its
    start message after that instant (a loaded box) starts its clock when it starts, as
    a lone executor's clock starts when it starts: its first step does not count the
    lateness."""
    r = _Replica(_spec(model_dir, 2))
    r.conn.send(("start", time.perf_counter() - 0.4, [0, 1], True))
    res = r.result()
    assert (res.requests["status"] == "finished").all()
    assert res.steps["duration_s"].max() < 0.3, res.steps[["start_s", "duration_s"]]


def test_a_replica_leaves_the_collector_as_it_found_it(model_dir):
    """A replica serves with its start-up heap frozen (``twin.executor.gc_heap``) and its
    result says so; run here on a thread of this process, it thaws the heap when it
    returns, as any library call does (a process frozen for good would run every later
    test with ~10^5 objects out of the collector)."""
    import gc

    gc.unfreeze()
    r = _Replica(_spec(model_dir, 2))
    r.conn.send(("start", time.perf_counter() + 0.05, [0, 1], True))
    res = r.result()
    assert not r.thread.is_alive()
    assert res.meta["gc_frozen"] is True
    assert gc.get_freeze_count() == 0

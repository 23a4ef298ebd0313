"""An executor replica of a fleet (``twin.executor.fed.FedEngine``) driven by the fleet's
event loop is a lone executor (``execute``) serving the requests routed to it: the same
batches, failures, statuses and window cut; its steps' durations count what the replica
did and nothing the other replicas did."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twin.config import ServingConfig  # noqa: E402
from twin.executor import engine as engine_mod  # noqa: E402
from twin.executor.adapters import write_synthetic_adapters  # noqa: E402
from twin.executor.engine import execute  # noqa: E402
from twin.executor.fed import FedEngine  # noqa: E402
from twin.executor.inputs import checked_inputs  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402
from twin.fleet import simulate_fleet  # noqa: E402
from twin.fleet.loop import run_loop  # noqa: E402
from twin.fleet.routers import make_router  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

CFG = ServingConfig(max_loras=1, max_cpu_loras=2, max_lora_rank=16, max_num_seqs=4,
                    max_num_batched_tokens=32, max_model_len=64)
BLOCKS = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, catalog): the tiny Llama, 3 good adapters and one whose weights are corrupt
    (found only when a step loads it)."""
    root = tmp_path_factory.mktemp("fed")
    make_tiny_llama(root / "model", seed=0)
    cat = AdapterCatalog(write_synthetic_adapters(root / "model", root / "ad", 3,
                                                  ranks=(8, 16)))
    bad = root / "corrupt"
    bad.mkdir()
    src = cat.table["path"].iloc[0]
    (bad / "adapter_config.json").write_text(open(f"{src}/adapter_config.json").read())
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{x")
    table = pd.concat([cat.table[["adapter", "rank", "path"]],
                       pd.DataFrame({"adapter": ["corrupt"], "rank": [8], "path": [str(bad)]})],
                      ignore_index=True)
    return LlamaModel.from_pretrained(root / "model"), AdapterCatalog(table)


def trace_of(rows):
    """rows: (arrival_s, adapter or None, prompt, output)."""
    return pd.DataFrame({"request_id": np.arange(len(rows)) + 100,
                         "arrival_s": [float(r[0]) for r in rows],
                         "adapter": pd.array([r[1] for r in rows], dtype="string"),
                         "prompt_tokens": [r[2] for r in rows],
                         "output_tokens": [r[3] for r in rows]})


def fleet(trace, config, model, catalog, n, *, window_s=None, refresh_s=0.0, keep_tokens=False,
          engines_out=None):
    """(each replica's RunResult or None, the route): ``n`` FedEngines behind round robin
    (``refresh_s`` > 0: the event loop that runs each replica alone between refreshes)."""
    trace, xcat = checked_inputs(trace, config, catalog)
    engines = [FedEngine(trace, config, model, xcat, num_gpu_blocks=BLOCKS,
                         window_s=window_s, sample_dt=0.05, keep_tokens=keep_tokens)
               for _ in range(n)]
    if engines_out is not None:
        engines_out.extend(engines)
    aid = pd.Categorical(trace["adapter"], categories=xcat.adapters).codes.tolist()
    router = make_router("round_robin").bind(n, xcat.adapters)
    route = np.asarray(run_loop(engines, trace["arrival_s"].tolist(), aid, router,
                                refresh_s=refresh_s))
    return [e.result() if len(e.rows) else None for e in engines], route


def lone(trace, config, model, catalog, *, window_s=None, keep_tokens=False):
    return execute(trace, config, model, catalog, num_gpu_blocks=BLOCKS, window_s=window_s,
                   sample_dt=0.05, keep_tokens=keep_tokens)


def same_run(fed, alone):
    """The same batches in the same order, and the same per-request outcome."""
    assert fed.steps["batch_request_ids"].tolist() == alone.steps["batch_request_ids"].tolist()
    assert fed.steps["batch_tokens"].tolist() == alone.steps["batch_tokens"].tolist()
    assert fed.steps["failed"].tolist() == alone.steps["failed"].tolist()
    cols = ["request_id", "status", "generated_tokens", "error"]
    pd.testing.assert_frame_equal(fed.requests[cols].reset_index(drop=True),
                                  alone.requests[cols].reset_index(drop=True))
    for key in ("from_disk", "from_host"):
        assert fed.summary["adapter_loads"][key] == alone.summary["adapter_loads"][key]


BURST = [(0.0, "lora-0000", 12, 6), (0.0, None, 9, 5), (0.0, "corrupt", 8, 4),
         (0.0, "lora-0001", 10, 7), (0.0, "corrupt", 6, 3), (0.0, "lora-0002", 7, 5),
         (0.0, None, 11, 4), (0.0, "lora-0000", 5, 6)]


@pytest.mark.parametrize("policy, refresh_s", [("vllm", 0.0), ("slora", 0.0), ("vllm", 0.5)])
def test_fed_replica_is_a_lone_executor(tiny, policy, refresh_s):
    """A burst at t = 0 (so batches do not depend on step times) with base-model requests
    and an adapter whose load fails, on 3 replicas: each replica's run is the lone
    executor's run of its share, for vLLM's slots and S-LoRA's unified pool, under either
    event loop."""
    model, cat = tiny
    cfg = CFG.replace(policy=policy)
    tr = trace_of(BURST)
    results, route = fleet(tr, cfg, model, cat, 3, refresh_s=refresh_s)
    assert route.tolist() == [0, 1, 2] * 2 + [0, 1]
    for k, res in enumerate(results):
        sub = tr.iloc[np.flatnonzero(route == k)].reset_index(drop=True)
        same_run(res, lone(sub, cfg, model, cat))
    failed = pd.concat([r.requests for r in results]).query("status == 'failed'")
    assert sorted(failed["request_id"]) == [102, 104]


def test_fed_replica_makes_token_ids_of_its_own_rows_only(tiny):
    """A replica makes the token ids of the rows delivered to it, not the whole fleet
    trace's (N replicas would hold N copies), and serves the same tokens as a lone executor
    of its share: the generated ids are equal request for request."""
    model, cat = tiny
    tr = trace_of(BURST)
    engines = []
    results, route = fleet(tr, CFG, model, cat, 3, keep_tokens=True, engines_out=engines)
    for k, (e, res) in enumerate(zip(engines, results)):
        mine = set(np.flatnonzero(route == k).tolist())
        made = {i for i, ids in enumerate(e.prompt_ids) if ids is not None}
        assert not made - mine   # undelivered rows: no ids (delivered ones: used, released)
        sub = tr.iloc[sorted(mine)].reset_index(drop=True)
        alone = lone(sub, CFG, model, cat, keep_tokens=True)
        a = res.requests.set_index("request_id")["output_token_ids"]
        b = alone.requests.set_index("request_id")["output_token_ids"]
        ids = sub["request_id"]
        assert ([None if a[i] is None else list(a[i]) for i in ids]
                == [None if b[i] is None else list(b[i]) for i in ids])
        assert sum(len(x) for x in a if x is not None) > 0


def test_fed_replica_without_requests_and_window_cut(tiny):
    """4 replicas, 2 requests: two replicas get nothing (no result). A window that ends
    after the first step cuts each replica where a lone executor's window cuts it."""
    model, cat = tiny
    tr = trace_of(BURST[:2])
    results, route = fleet(tr, CFG, model, cat, 4)
    assert results[2] is None and results[3] is None
    tr = trace_of(BURST)
    results, route = fleet(tr, CFG, model, cat, 2, window_s=1e-6)
    for k, res in enumerate(results):
        sub = tr.iloc[np.flatnonzero(route == k)].reset_index(drop=True)
        alone = lone(sub, CFG, model, cat, window_s=1e-6)
        assert len(res.steps) == len(alone.steps) == 1
        same_run(res, alone)
        assert (res.requests["status"] != "finished").any()


def test_fed_step_counts_its_own_work_after_the_previous_step(tiny, monkeypatch):
    """What a replica does after its step's end (here: recording the step, made 100 ms
    slow) belongs to its next step, as in a lone executor, whose ``Clock`` only restarts
    at the next step's end; only the other replicas' time in between is left out."""
    model, cat = tiny
    slow = 0.1
    record = engine_mod._Engine._record_step

    def slow_record(self, step, dur):
        record(self, step, dur)
        engine_mod.time.sleep(slow)

    monkeypatch.setattr(engine_mod._Engine, "_record_step", slow_record)
    tr = trace_of([(0.0, "lora-0000", 8, 5), (0.0, "lora-0001", 8, 5)])
    alone = lone(tr.iloc[:1], CFG, model, cat)
    results, _ = fleet(tr, CFG, model, cat, 2)
    assert (alone.steps["duration_s"].iloc[1:] >= slow).all()
    for res in results:
        assert len(res.steps) == len(alone.steps) > 1
        assert (res.steps["duration_s"].iloc[1:] >= slow).all()
        # and not the other replica's steps (each also slow): less than two sleeps a step
        assert np.median(res.steps["duration_s"].iloc[1:]) < 1.9 * slow


def test_router_reads_a_replica_as_it_is_during_its_step(tiny):
    """A request arriving while a replica's step runs (in logical time) sees the requests
    of that step still in flight, as the twin's router does (the twin commits a step at
    its end) and a real server would: not the step's outcome, which the executor computed
    when the loop resumed the replica at the step's start. Here B (one output token)
    finishes in replica 1's first step, which ends well after C arrives (10 us): least
    outstanding requests sees replicas 0 and 1 at one request each and picks 0, where a
    view from the step's end would see replica 1 empty and pick 1."""
    model, cat = tiny
    tr = trace_of([(0.0, "lora-0000", 32, 8), (0.0, "lora-0001", 32, 1),
                   (1e-5, "lora-0002", 8, 2)])
    trace, xcat = checked_inputs(tr, CFG, cat)
    engines = [FedEngine(trace, CFG, model, xcat, num_gpu_blocks=BLOCKS, window_s=None,
                         sample_dt=0.05) for _ in range(2)]
    aid = pd.Categorical(trace["adapter"], categories=xcat.adapters).codes.tolist()
    router = make_router("least_outstanding_requests").bind(2, xcat.adapters)
    route = run_loop(engines, trace["arrival_s"].tolist(), aid, router)
    first_end = [float(e.result().steps["duration_s"].iloc[0]) for e in engines]
    assert min(first_end) > 1e-5   # C arrived during both replicas' first steps
    assert route == [0, 1, 0]
    twin = simulate_fleet(tr, 2, "least_outstanding_requests", config=CFG, profile="cpu-tiny")
    assert twin.route.tolist() == route   # the twin's view during a step, the same

"""Executor vs twin, with the twin replaying the executor's measured step durations.

DESIGN §1: the two differ only in how long a step takes. Given the executor's durations
(adapter loads folded in, ``twin.sim.replay``) the twin must schedule the very same batches:
per step the same requests with the same token counts (the twin's jumps over quiet decode
runs expanded into steps), the same adapter loads, preemptions, finish order and times.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from bursty_trace import make_trace  # noqa: E402
import twin.servers as servers  # noqa: E402
from twin.config import ServingConfig  # noqa: E402
from twin.executor.adapters import write_synthetic_adapters  # noqa: E402
from twin.executor.engine import execute  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402
from twin.sched import Scheduler  # noqa: E402
from twin.sim.replay import ReplayExhausted, ReplayStepTime, replay  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    make_tiny_llama(root / "model", seed=1)
    cat = AdapterCatalog(write_synthetic_adapters(root / "model", root / "adapters", 6,
                                                  ranks=(8, 16)))
    return LlamaModel.from_pretrained(root / "model"), cat


class RecordingScheduler(Scheduler):
    """The twin's scheduler, logging each step's batch and loads (jumps expanded)."""

    log: list

    def finish_step(self, plan, now, steps=1):
        items = [(r.request_id, n) for r, n in self.batch(plan)]
        loads = [(ld.adapter, ld.from_disk) for ld in plan.loads]
        self.log.append((items, loads))
        for _ in range(steps - 1):
            self.log.append((items, []))
        return super().finish_step(plan, now, steps)


def twin_replay(result, trace, catalog, monkeypatch):
    log = []
    monkeypatch.setattr(RecordingScheduler, "log", log, raising=False)
    monkeypatch.setattr(servers, "Scheduler", RecordingScheduler)
    tw = replay(result, trace, catalog, record_steps=True)
    return tw, log


SCENARIOS = {
    # tiny KV pool (preemptions), chunked prefill, LoRA skip rule, host-cache evictions,
    # bursts separated by idle gaps
    "preempt-chunk-skip": dict(
        config=ServingConfig(max_loras=2, max_cpu_loras=3, max_num_seqs=10,
                             max_num_batched_tokens=48, max_model_len=128),
        blocks=12, trace=dict(seed=1, n=60, bursts=[(0.2, 0.0), (0.35, 0.2), (0.8, 0.1)])),
    # preloaded adapters, max_num_seqs as the limit, long decodes: the twin jumps over
    # quiet decode runs and arrivals cut them
    "preload-seqs-jumps": dict(
        config=ServingConfig(max_loras=3, max_cpu_loras=6, max_num_seqs=6,
                             max_num_batched_tokens=96, max_model_len=256,
                             preload_adapters=True),
        blocks=64, trace=dict(seed=2, n=40, bursts=[(0.2, 0.05), (0.5, 0.3)],
                              output=(20, 80))),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_twin_replaying_executor_durations_batches_identically(setup, name, monkeypatch):
    model, cat = setup
    sc = SCENARIOS[name]
    trace = make_trace(adapters=cat.adapters, **sc["trace"])
    ex = execute(trace, sc["config"], model, cat, num_gpu_blocks=sc["blocks"])
    tw, log = twin_replay(ex, trace, cat, monkeypatch)

    assert (ex.requests["status"] == "finished").all()
    # the engine idled until the bursts: a step starts exactly at an arrival, and both
    # engines mark the same steps as after-idle (a step-time feature)
    assert ex.steps["start_s"].isin(trace["arrival_s"]).sum() >= 2
    idle_ex = ex.steps.loc[ex.steps["after_idle"], "start_s"].to_numpy()
    idle_tw = tw.steps.loc[tw.steps["after_idle"], "start_s"].to_numpy()
    assert len(idle_ex) >= 1
    np.testing.assert_allclose(idle_tw, idle_ex, rtol=0, atol=1e-9)
    ex_batches = [list(zip(ids, ks)) for ids, ks in zip(ex.steps["batch_request_ids"],
                                                        ex.steps["batch_tokens"])]
    tw_batches = [items for items, _ in log]
    assert len(tw_batches) == len(ex_batches) == tw.summary["steps"]
    for k, (a, b) in enumerate(zip(ex_batches, tw_batches)):
        assert a == b, f"step {k}: executor {a} != twin {b}"
    # adapter loads: per step and in total
    assert [len(loads) for _, loads in log] == ex.steps["loads"].tolist()
    assert [sum(d for _, d in loads) for _, loads in log] == ex.steps["loads_from_disk"].tolist()
    for key in ("from_disk", "from_host"):
        assert tw.summary["adapter_loads"][key] == ex.summary["adapter_loads"][key]
    assert tw.summary["preemptions"] == ex.summary["preemptions"]
    assert (tw.requests["preemptions"] == ex.requests["preemptions"]).all()
    # finish order and the times themselves (the twin's clock follows the recording)
    order = lambda r: r.sort_values(["finish_s", "request_id"])["request_id"].tolist()  # noqa: E731
    assert order(tw.requests) == order(ex.requests)
    for col in ("first_scheduled_s", "first_token_s", "finish_s"):
        np.testing.assert_allclose(tw.requests[col], ex.requests[col], rtol=0, atol=1e-9)
    assert tw.summary["completed"] == ex.summary["completed"]
    assert tw.summary["total_throughput"] == pytest.approx(ex.summary["total_throughput"],
                                                           rel=1e-9)
    if name == "preempt-chunk-skip":
        assert ex.summary["preemptions"] > 0
        assert (ex.steps["blocked"] == "lora").any()
        assert ex.summary["adapter_loads"]["from_disk"] > 6       # host evictions happened
    else:
        assert len(tw.steps) < len(ex.steps)                       # the twin jumped
        assert ex.summary["adapter_loads"]["from_disk"] == 0       # preloaded


def test_replay_step_time_model_contract():
    rt = ReplayStepTime([0.1, 0.2, 0.3, 0.4, 0.5], starts=[0.0, 0.1, 0.3, 0.6, 1.0])
    assert rt(object()) == 0.1
    f = (1.0, 0.0)
    total, first, last = rt.decode_run(f, 1, 3)          # steps 1..3
    assert (total, first, last) == pytest.approx((0.9, 0.2, 0.4))
    assert rt.steps_within(f, 1, 3, 0.45) == 2           # 0.2 + 0.3 >= 0.45
    assert rt.steps_within(f, 1, 3, 5.0) == 3
    assert rt.decode_run(f, 1, 2)[0] == pytest.approx(0.5)   # the run was cut to 2 steps
    assert rt(object()) == 0.4                           # the cut run consumed 2 steps
    assert rt(object()) == 0.5
    with pytest.raises(ReplayExhausted):
        rt(object())

"""The executor's S-LoRA layout (twin.executor.slora) on the tiny model.

- The unified page pool: KV blocks and adapter pages come from one free list; the pool
  never holds more than its pages; the executor's count equals the scheduler's each step.
- Exact-rank LoRA compute equals vLLM's padded slots on the same adapters.
- ``policy="slora"`` generates the same tokens as ``policy="vllm"`` for every request of a
  mixed multi-adapter trace (different batches, same greedy outputs).
- Differential: the twin (``policy="slora"``) replaying the executor's measured step
  durations schedules the very same batches, loads, finish order and times.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from bursty_trace import make_trace  # noqa: E402
import twin.policies.slora as slora_policy  # noqa: E402
import twin.servers as servers  # noqa: E402
from twin.config import ServingConfig  # noqa: E402
from twin.errors import TwinInputError  # noqa: E402
from twin.executor.adapters import load_adapter  # noqa: E402
from twin.executor.engine import execute  # noqa: E402
from twin.executor.lora import LoRASlots  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.slora import (ExactRankLoRA, UnifiedPagePool, _Resident,  # noqa: E402
                                 adapter_pages_for)
from tiny_llama import tiny_with_adapters  # noqa: E402
from twin.sched.unified_pool import SLoRAScheduler  # noqa: E402
from twin.sim.replay import replay  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_adapters(tmp_path_factory.mktemp("slora"), 6)


# ---------------------------------------------------------------------------------------------
# the pool
# ---------------------------------------------------------------------------------------------
def test_unified_pool_shares_one_free_list():
    p = UnifiedPagePool(10, 4)
    assert p.ensure(1, 9) == [0, 1, 2]
    assert p.alloc_adapter(5, 4) == [3, 4, 5, 6]
    assert p.used == 7 and p.kv_blocks == 3 and p.adapter_pages == 4
    assert p.ensure(2, 12) == [7, 8, 9] and p.free == 0
    with pytest.raises(AssertionError, match="disagree"):
        p.alloc_adapter(6, 1)                    # full: a KV block and a page are the same
    assert p.free_adapter(5) == 4
    assert p.ensure(3, 5) == [3, 4]              # the adapter's pages serve as KV blocks
    assert p.alloc_adapter(6, 2) == [5, 6]
    assert p.max_used == 10 and p.used == 10


def test_adapter_pages_match_the_twin_policy(tiny):
    model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir)
    from twin.executor.slora import executor_profile

    cfg = ServingConfig(policy="slora")
    prof = executor_profile(model, 100, cfg)
    pol = slora_policy.SLoRAPolicy()
    for r in (1, 8, 16, 64):
        assert adapter_pages_for(model, cfg, [r]) == [pol.adapter_pages(r, cfg, prof)]
    # tiny model, fp32, block 16: a page is 16 KiB, an adapter of rank r takes r pages
    assert adapter_pages_for(model, cfg, [8, 16]) == [8, 16]


def test_exact_rank_lora_equals_padded_slots(tiny):
    model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float64)
    packed = [load_adapter(p, model, 64, adapter_id=a, dtype=torch.float64)
              for a, p in zip(cat.adapters[:3], cat.table["path"][:3])]
    slots = LoRASlots(model.shape, 3, 32, dtype=torch.float64)
    exact = ExactRankLoRA(model, 3)
    for i, p in enumerate(packed):
        slots.load_slot(i, p)
        exact.resident[i] = _Resident(p, model.device, False)
    assert {w.rank for w in exact.resident.values()} == {8, 16}    # no padding to 32
    segs = [(0, 0, 3), (2, 3, 5), (1, 5, 9)]     # ranks 8, 8 (one grouped run), 16
    g = torch.Generator().manual_seed(0)
    for group, (inn, out) in {"qkv": (64, 128), "o": (64, 64), "gate_up": (64, 256),
                              "down": (128, 64)}.items():
        x = torch.randn(11, inn, generator=g, dtype=torch.float64)
        y0 = torch.randn(11, out, generator=g, dtype=torch.float64)
        ya = y0.clone()
        slots.apply(1, group, x, ya, segs)
        for grouped in (True, False):    # grouped-by-rank kernel and the segment loop
            exact.grouped, exact._key = grouped and exact._grouped_ok(), None
            yb = y0.clone()
            exact.apply(1, group, x, yb, segs)
            torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
            assert torch.equal(yb[9:], y0[9:])          # base-model rows untouched


# ---------------------------------------------------------------------------------------------
# end to end: same tokens as the vllm layout
# ---------------------------------------------------------------------------------------------
def test_slora_tokens_equal_vllm_tokens(tiny):
    model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float64)
    trace = make_trace(3, 30, [(0.0, 0.05), (0.15, 0.1)], cat.adapters, output=(4, 30))
    cfg = ServingConfig(max_loras=2, max_cpu_loras=4, max_num_seqs=8,
                        max_num_batched_tokens=64, max_model_len=128)
    blocks = 48
    vl = execute(trace, cfg, model, cat, num_gpu_blocks=blocks, keep_tokens=True)
    sl = execute(trace, cfg.replace(policy="slora"), model, cat, num_gpu_blocks=blocks,
                 keep_tokens=True)
    for r in (vl, sl):
        assert (r.requests["status"] == "finished").all(), r.requests[["status", "error"]]
    # not the same schedule (no slots, conservative admission, adapter pages) ...
    assert vl.steps["batch_request_ids"].tolist() != sl.steps["batch_request_ids"].tolist()
    # ... the same tokens
    for i in range(len(trace)):
        a = list(vl.requests["output_token_ids"].iloc[i])
        b = list(sl.requests["output_token_ids"].iloc[i])
        assert a == b, f"request {i} ({trace['adapter'].iloc[i]}): vllm {a} != slora {b}"
    pool = sl.summary["adapter_pool"]
    assert pool["adapter_loads"] > len(set(trace["adapter"].dropna()))   # dropped, refetched
    assert pool["adapter_drops"] > 0
    assert sl.summary["adapter_loads"]["from_disk"] == 0
    assert sl.summary["adapter_loads"]["from_host"] == pool["adapter_loads"]
    # the budget: KV blocks + adapter pages never exceed the pool, per step and at peak
    assert pool["pages"] == blocks and pool["max_used_pages"] <= blocks
    assert (sl.steps["kv_blocks"] <= blocks).all()
    assert pool["max_adapter_pages"] > 0
    assert sl.meta["config"]["policy"] == "slora"


def test_slora_has_no_rank_ceiling_and_executor_refuses_other_policies(tiny):
    model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir)
    trace = make_trace(4, 6, [(0.0, 0.01)], cat.adapters[:2], base_every=100, output=(2, 4))
    cfg = ServingConfig(max_lora_rank=8, max_model_len=128)   # lora-0001 has rank 16
    vl = execute(trace, cfg, model, cat, num_gpu_blocks=64)
    sl = execute(trace, cfg.replace(policy="slora"), model, cat, num_gpu_blocks=64)
    assert (vl.requests["status"] == "failed").any()            # rank 16 > max_lora_rank
    assert (sl.requests["status"] == "finished").all()          # exact rank, no slots
    with pytest.raises(TwinInputError, match="vllm and slora"):
        execute(trace, cfg.replace(policy="merged"), model, cat, num_gpu_blocks=64)


# ---------------------------------------------------------------------------------------------
# differential: the twin replaying the executor's durations
# ---------------------------------------------------------------------------------------------
class RecordingSLoRAScheduler(SLoRAScheduler):
    log: list

    def finish_step(self, plan, now, steps=1):
        items = [(r.request_id, n) for r, n in self.batch(plan)]
        loads = [(ld.adapter, ld.from_disk) for ld in plan.loads]
        done = super().finish_step(plan, now, steps)
        # pages in use as the step ends (None inside a jump over decode steps)
        self.log.append((items, loads, plan.kv_blocks if steps == 1 else None))
        for _ in range(steps - 1):
            self.log.append((items, [], None))
        return done


SCENARIOS = {
    # a tight pool: adapter pages and conservative reservations block the queue (kv),
    # adapters dropped when idle and fetched again; chunked prefill
    "tight-pool": dict(
        config=ServingConfig(policy="slora", max_num_seqs=10, max_num_batched_tokens=48,
                             max_model_len=128),
        blocks=40, trace=dict(seed=1, n=40, bursts=[(0.2, 0.0), (0.35, 0.2), (0.8, 0.1)])),
    # a roomy pool, long decodes: the twin jumps over quiet decode runs
    "roomy-jumps": dict(
        config=ServingConfig(policy="slora", max_num_seqs=6, max_num_batched_tokens=96,
                             max_model_len=256),
        blocks=160, trace=dict(seed=2, n=30, bursts=[(0.2, 0.05), (0.5, 0.3)],
                               output=(20, 60))),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_twin_slora_replaying_executor_batches_identically(tiny, name, monkeypatch):
    model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir)
    sc = SCENARIOS[name]
    trace = make_trace(adapters=cat.adapters, **sc["trace"])
    ex = execute(trace, sc["config"], model, cat, num_gpu_blocks=sc["blocks"])
    log = []
    monkeypatch.setattr(RecordingSLoRAScheduler, "log", log, raising=False)
    monkeypatch.setattr(servers, "SLoRAScheduler", RecordingSLoRAScheduler)
    tw = replay(ex, trace, cat, record_steps=True)
    assert tw.meta.get("policy") == "slora"

    assert (ex.requests["status"] == "finished").all()
    ex_batches = [list(zip(ids, ks)) for ids, ks in zip(ex.steps["batch_request_ids"],
                                                        ex.steps["batch_tokens"])]
    tw_batches = [items for items, _, _ in log]
    assert len(tw_batches) == len(ex_batches)
    for k, (a, b) in enumerate(zip(ex_batches, tw_batches)):
        assert a == b, f"step {k}: executor {a} != twin {b}"
    assert [len(loads) for _, loads, _ in log] == ex.steps["loads"].tolist()
    # pool accounting (KV blocks + adapter pages) step by step, and within the budget
    kv = [(k, v) for k, (_, _, v) in enumerate(log) if v is not None]
    assert len(kv) >= 20
    assert [v for _, v in kv] == ex.steps["kv_blocks"].iloc[[k for k, _ in kv]].tolist()
    assert ex.steps["kv_blocks"].max() <= sc["blocks"]
    for key in ("from_disk", "from_host"):
        assert tw.summary["adapter_loads"][key] == ex.summary["adapter_loads"][key]
    assert tw.summary["preemptions"] == ex.summary["preemptions"] == 0   # conservative
    order = lambda r: r.sort_values(["finish_s", "request_id"])["request_id"].tolist()  # noqa: E731
    assert order(tw.requests) == order(ex.requests)
    for col in ("first_scheduled_s", "first_token_s", "finish_s"):
        np.testing.assert_allclose(tw.requests[col], ex.requests[col], rtol=0, atol=1e-9)
    assert tw.summary["total_throughput"] == pytest.approx(ex.summary["total_throughput"],
                                                           rel=1e-9)
    assert (tw.summary["adapter_pool"]["max_gib"]
            == pytest.approx(ex.summary["adapter_pool"]["max_gib"]))
    if name == "tight-pool":
        assert (ex.steps["blocked"] == "kv").any()
        assert ex.summary["adapter_pool"]["adapter_drops"] > 0
        assert ex.summary["adapter_loads"]["from_host"] > 6
    else:
        assert len(tw.steps) < len(ex.steps)                         # the twin jumped


def test_slora_bad_adapter_fails_only_its_requests(tiny, tmp_path):
    import shutil

    model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir)
    bad_dir = tmp_path / "lora-bad"
    shutil.copytree(cat.table["path"].iloc[0], bad_dir)
    (bad_dir / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    table = pd.concat([cat.table.iloc[:2],
                       pd.DataFrame({"adapter": ["lora-bad"], "rank": [8],
                                     "path": [str(bad_dir)]})], ignore_index=True)
    bcat = AdapterCatalog(table[["adapter", "rank", "path"]])
    trace = make_trace(5, 9, [(0.0, 0.02)], ["lora-0000", "lora-0001", "lora-bad"],
                       base_every=4, output=(2, 6))
    res = execute(trace, ServingConfig(policy="slora", max_model_len=128), model, bcat,
                  num_gpu_blocks=64)
    st = res.requests.set_index("request_id")["status"]
    is_bad = (trace["adapter"] == "lora-bad").fillna(False).to_numpy(bool)
    assert is_bad.any() and (~is_bad).any()
    assert (st.to_numpy()[is_bad] == "failed").all()
    assert (st.to_numpy()[~is_bad] == "finished").all()
    assert "lora-bad" in res.meta["bad_adapters"]

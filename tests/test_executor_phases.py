"""The executor's serving loop as phases (load / forward / commit), its state, and its layers.

- Every phase at once (chunked prefills sharing steps with decodes, preemptions and
  recomputes, an adapter whose weights are corrupt, a request over max_model_len) under
  both memory layouts: the surviving requests' tokens equal HF PEFT greedy-decoding each request
  on its own, a reference computed without the executor's code.
- The loop's state (``twin.executor.loop_state``): the logical clock and the arrivals.
- Both adapter stores offer the loop the same hooks, so the loop has no layout branches.
- The executor's import graph: no cycle inside it (model -> lora -> adapters -> shape), and
  nothing from the twin's clock (twin.sim) or the command line (twin.cli).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

from test_import_graph import ROOT, cycles, import_graphs
from twin.config import ServingConfig

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

# a random tiny Llama whose greedy continuations depend on the context (as in
# test_executor_engine), so a wrong KV block or adapter slot changes the tokens
TINY = dict(seed=0, initializer_range=0.2, tie_word_embeddings=False,
            max_position_embeddings=512)


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
def test_executor_has_no_module_cycle_and_imports_neither_sim_nor_cli():
    packages, inside = import_graphs(ROOT)
    assert cycles(inside["twin.executor"]) == set()
    # the torch side runs one way: the model composes LoRA slots, never the reverse
    assert "twin.executor.model" not in inside["twin.executor"].get("twin.executor.lora", ())
    assert "twin.executor.model" not in inside["twin.executor"].get("twin.executor.adapters",
                                                                    ())
    assert not packages["twin.executor"] & {"twin.sim", "twin.cli"}, packages["twin.executor"]


def test_both_adapter_stores_offer_the_loop_the_same_hooks():
    """The loop calls these on whichever store the layout built (no ``if paged``)."""
    pytest.importorskip("torch")
    from twin.executor.adapter_store import SlotAdapterStore
    from twin.executor.slora import SLoRAAdapterStore

    hooks = ["before_schedule", "apply", "evict", "forget", "slot", "summary"]
    for cls in (SlotAdapterStore, SLoRAAdapterStore):
        missing = [h for h in hooks if not callable(getattr(cls, h, None))]
        assert not missing, (cls.__name__, missing)


# ---------------------------------------------------------------------------------------------
# the loop's state
# ---------------------------------------------------------------------------------------------
def test_clock_jumps_to_arrivals_and_advances_by_steps():
    from twin.executor.loop_state import Clock

    c = Clock()
    assert (c.now, c.idle) == (0.0, False)
    wall0 = c.wall
    c.wait_until(0.01)                       # idle: the logical clock lands on the arrival
    assert c.now == 0.01 and c.idle and c.wall - wall0 >= 0.01 - 1e-3
    c.step_ended(0.25, c.wall + 0.2)         # a step: the clock moves to where it ended
    assert (c.now, c.idle) == (0.25, False)
    before = time.perf_counter()
    c.wait_until(0.1)                        # an arrival already past: no sleep, no going back
    assert c.now == 0.1 and c.idle and c.wall >= before


def test_arrivals_release_each_request_once_in_order_when_due():
    from twin.executor.loop_state import Arrivals

    trace = pd.DataFrame({"request_id": [7, 8, 9], "arrival_s": [0.0, 0.5, 0.5],
                          "adapter": pd.array(["b", None, "a"], dtype="string"),
                          "prompt_tokens": [3, 4, 5], "output_tokens": [6, 7, 8]})
    arr = Arrivals(trace, {"a": 0, "b": 1}, enable_lora=True)
    assert [r.request_id for r in arr.due(0.4)] == [7] and arr.left == 2
    assert arr.next_s == 0.5
    assert list(arr.due(0.4)) == []
    got = list(arr.due(0.5))
    assert [(r.idx, r.request_id, r.adapter, r.prompt, r.output) for r in got] == [
        (1, 8, -1, 4, 7), (2, 9, 0, 5, 8)]
    assert arr.left == 0
    no_lora = Arrivals(trace, {"a": 0, "b": 1}, enable_lora=False)
    assert [r.adapter for r in no_lora.due(1.0)] == [-1, -1, -1]
    r = arr.request(2)   # a request by its row, as released (token ids are made from it)
    assert (r.idx, r.request_id, r.adapter, r.prompt, r.output) == (2, 9, 0, 5, 8)


def test_token_ids_are_made_before_the_clock_starts(monkeypatch):
    """Issue 17: every request's token ids are made before the clock starts (vLLM's engine
    gets prompts tokenized), not when it arrives: made at arrival they landed in the next
    step's time, beside running decodes a cost no step feature sees."""
    import twin.executor.engine as eng
    from twin.executor.inputs import request_token_ids
    from twin.executor.weights import resolve_model

    started, made = [], []

    class Clock(eng.Clock):
        def __init__(self):
            super().__init__()
            started.append(True)

    def tokens(r, *a, **k):
        made.append((r.idx, bool(started)))
        return request_token_ids(r, *a, **k)

    monkeypatch.setattr(eng, "Clock", Clock)
    monkeypatch.setattr(eng, "request_token_ids", tokens)
    n = 5
    trace = pd.DataFrame({"request_id": np.arange(n) + 40, "arrival_s": 0.01 * np.arange(n),
                          "adapter": pd.array([None] * n, dtype="string"),
                          "prompt_tokens": [9, 17, 3, 30, 12], "output_tokens": [8] * n})
    cfg = ServingConfig(enable_lora=False, max_num_batched_tokens=64, max_model_len=128)
    res = eng.execute(trace, cfg, resolve_model("tiny"), None, num_gpu_blocks=64)
    assert sorted(i for i, _ in made) == list(range(n))       # each request once
    assert not any(after for _, after in made)                 # all before the clock
    assert started == [True]
    assert (res.requests["status"] == "finished").all()


# ---------------------------------------------------------------------------------------------
# all phases vs an independent reference
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from twin.executor.adapters import write_synthetic_adapters
    from twin.executor.weights import make_tiny_llama
    from twin.workload.catalog import AdapterCatalog

    root = tmp_path_factory.mktemp("phases")
    make_tiny_llama(root / "model", **TINY)
    cat = write_synthetic_adapters(root / "model", root / "adapters", 4, ranks=(8, 16))
    # the last adapter's weights are corrupt: found only when the load phase reads them
    Path(cat["path"].iloc[3], "adapter_model.safetensors").write_bytes(b"not safetensors")
    return root / "model", AdapterCatalog(cat)


def _trace(names):
    rng = np.random.default_rng(11)
    rows = [(0.0, names[0], 70, 20)]      # over max_model_len: rejected on arrival
    for k in range(12):
        adapter = None if k % 4 == 2 else names[k % len(names)]
        rows.append((0.0 if k < 8 else 0.01 * k, adapter, int(rng.integers(5, 36)),
                     int(rng.integers(6, 24))))
    return pd.DataFrame({"request_id": np.arange(len(rows)) + 500,
                         "arrival_s": [r[0] for r in rows],
                         "adapter": pd.array([r[1] for r in rows], dtype="string"),
                         "prompt_tokens": [r[2] for r in rows],
                         "output_tokens": [r[3] for r in rows]})


@pytest.mark.parametrize("policy,blocks", [("vllm", 12), ("slora", 64)])
def test_every_phase_matches_peft_greedy_decoding(tiny, policy, blocks):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from twin.executor.engine import execute
    from twin.executor.inputs import prompt_token_ids
    from twin.executor.model import LlamaModel

    model_dir, cat = tiny
    names = cat.adapters
    trace = _trace(names)
    cfg = ServingConfig(policy=policy, max_loras=2, max_cpu_loras=3, max_num_seqs=6,
                        max_num_batched_tokens=24, block_size=8, max_model_len=80)
    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float64)
    res = execute(trace, cfg, model, cat, num_gpu_blocks=blocks, keep_tokens=True)
    req, steps = res.requests, res.steps
    status = dict(zip(req["request_id"], req["status"]))
    bad = trace["adapter"] == names[3]
    assert all(status[r] == "failed" for r in trace["request_id"][bad])
    assert status[trace["request_id"].iloc[0]] == "rejected"
    assert ((steps["prefill_tokens"] > 0) & (steps["decode_seqs"] > 0)).any()
    assert ("adapter_pool" in res.summary) == (policy == "slora")
    if policy == "vllm":   # read from disk inside the step: fails there, then on arrival
        assert steps["failed"].sum() >= 1 and res.summary["preemptions"] >= 1
    else:                  # S-LoRA packs every adapter at start-up: fails on arrival
        assert res.summary["adapter_pool"]["adapter_loads"] >= 1

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    paths = dict(zip(cat.table["adapter"], cat.table["path"]))
    peft = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for a in names[1:3]:
        peft.load_adapter(paths[a], adapter_name=a)
    peft = peft.eval()
    checked = 0
    for i, row in enumerate(trace.itertuples()):
        if req["status"].iloc[i] != "finished":
            continue
        p, o = int(row.prompt_tokens), int(row.output_tokens)
        ids = prompt_token_ids(int(row.request_id), p, base.config.vocab_size, seed=0)
        adapter = None if pd.isna(row.adapter) else row.adapter
        with torch.no_grad():
            out = peft.generate(torch.tensor([ids]), max_new_tokens=o, min_new_tokens=o,
                                do_sample=False, eos_token_id=None, pad_token_id=0,
                                adapter_names=[adapter or "__base__"])
        assert list(req["output_token_ids"].iloc[i]) == out[0, p:].tolist(), (
            f"request {row.request_id} ({adapter}, {policy})")
        checked += 1
    assert checked >= 8

"""The executor's KV auto-sizing (no ``num_gpu_blocks``), ``--time-scale`` and ``--window-s``.

Every other executor test passes ``num_gpu_blocks``; these check the capacity the executor
picks on its own (vLLM's formula on CUDA, a budget on CPU) against the twin's memory
model, and that scaled arrivals and a measurement window change what they should.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twin.cli import main  # noqa: E402
from twin.config import ServingConfig  # noqa: E402
from twin.errors import ConfigError, TwinInputError  # noqa: E402
from twin.executor.engine import execute  # noqa: E402
from twin.executor.kv_memory import DEFAULT_CPU_KV_GIB, choose_num_blocks  # noqa: E402
from twin.executor.lora import LoRASlots  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402
from twin.calibrate.executor import memory_model  # noqa: E402
from twin.costs.memory import GIB  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_llama(tmp_path_factory.mktemp("more") / "model", max_position_embeddings=512)
    return d, LlamaModel.from_pretrained(d)


def trace_of(rows):
    """rows: (arrival_s, prompt, output); base model only."""
    return pd.DataFrame({"request_id": np.arange(len(rows)),
                         "arrival_s": [float(r[0]) for r in rows],
                         "adapter": pd.array([None] * len(rows), dtype="string"),
                         "prompt_tokens": [r[1] for r in rows],
                         "output_tokens": [r[2] for r in rows]})


def block_bytes_by_hand(model, block_size):
    """K and V of every layer for ``block_size`` tokens, from the model's config."""
    s = model.shape
    return 2 * s.layers * block_size * s.kv_heads * s.head_dim * model.dtype.itemsize


def cfg(**kw):
    base = dict(enable_lora=False, max_model_len=256, max_num_seqs=8,
                max_num_batched_tokens=64, block_size=16)
    base.update(kw)
    return ServingConfig(**base)


# -- KV auto-sizing ---------------------------------------------------------------------------
def test_cpu_blocks_from_the_budget_capped_by_what_the_trace_can_use(tiny):
    _, m = tiny
    per = block_bytes_by_hand(m, 16)
    many = trace_of([(0, 200, 100)] * 300)   # could use 300 x 16 blocks
    c = cfg()
    for n in (20, 37, 100):   # a budget of exactly n blocks and a bit
        assert choose_num_blocks(m, c, many, kv_cache_gib=(n * per + per // 2) / GIB) == n
    # default budget: DEFAULT_CPU_KV_GIB
    assert choose_num_blocks(m, c, many) == min(int(DEFAULT_CPU_KV_GIB * GIB // per), 300 * 16 + 1)
    # never more than the trace could hold at once (lengths capped at max_model_len, one
    # spare), and at least one max_model_len request
    few = trace_of([(0, 20, 10), (0, 300, 300), (0, 1, 1)])
    assert choose_num_blocks(m, c, few, kv_cache_gib=1.0) == 2 + 16 + 1 + 1
    assert choose_num_blocks(m, c, few.iloc[:1], kv_cache_gib=1.0) == 16
    # a budget below one max_model_len request: vLLM refuses to start
    with pytest.raises(ConfigError, match="max_model_len"):
        choose_num_blocks(m, c, many, kv_cache_gib=15 * per / GIB)


def fake_cuda(model, monkeypatch, *, total, in_use):
    """``model`` as if on a CUDA device with ``total`` bytes of which ``in_use`` are taken
    (``torch.cuda.mem_get_info`` answers accordingly)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - in_use, total))
    return types.SimpleNamespace(shape=model.shape, embed=model.embed,
                                 device=torch.device("cuda"), dtype=model.dtype)


@pytest.mark.parametrize("util", [0.5, 0.9])
@pytest.mark.parametrize("max_loras,rank", [(1, 8), (4, 16), (16, 64)])
def test_cuda_blocks_match_the_twins_memory_model(tiny, monkeypatch, util, max_loras, rank):
    """On CUDA the executor sizes its KV cache as vLLM does: util x total - memory in use
    (weights, LoRA slots) - activations. With the weights and slots in use, that is the
    twin's memory model of the same model (``calibrate_executor.memory_model``) to the
    block: more utilisation or fewer slots, more blocks."""
    _, m = tiny
    total = 0.05 * GIB
    slots = LoRASlots(m.shape, max_loras, rank, dtype=m.dtype).nbytes
    c = cfg(enable_lora=True, max_loras=max_loras, max_lora_rank=rank, max_cpu_loras=max_loras,
            gpu_memory_utilization=util)
    huge = trace_of([(0, 256, 256)] * 20000)   # the trace cap never binds
    got = choose_num_blocks(fake_cuda(m, monkeypatch, total=total, in_use=m.weight_bytes + slots),
                            c, huge)
    want = memory_model(m, total / GIB).kv_tokens(c) // c.block_size
    assert got == want
    assert got > 16   # the config starts


def test_cuda_blocks_grow_with_utilisation_and_shrink_with_slots(tiny, monkeypatch):
    _, m = tiny
    total, per = 0.05 * GIB, block_bytes_by_hand(m, 16)
    huge = trace_of([(0, 256, 256)] * 20000)

    def blocks(util, max_loras, rank=16):
        slots = LoRASlots(m.shape, max_loras, rank, dtype=m.dtype).nbytes
        fake = fake_cuda(m, monkeypatch, total=total, in_use=m.weight_bytes + slots)
        return choose_num_blocks(fake, cfg(gpu_memory_utilization=util), huge), slots

    b5, s1 = blocks(0.5, 1)
    b9, _ = blocks(0.9, 1)
    assert abs((b9 - b5) - 0.4 * total / per) <= 1
    b9_16, s16 = blocks(0.9, 16)
    assert b9_16 < b9 and abs((b9 - b9_16) - (s16 - s1) / per) <= 1


def test_auto_sized_run_reports_its_blocks_and_preempts_only_when_small(tiny):
    """``execute`` without ``num_gpu_blocks``: the budget decides the blocks the run uses
    (meta, KV capacity) and so whether the batch must preempt."""
    d, m = tiny
    trace = trace_of([(0, 60, 40)] * 6)        # 6 x 7 blocks at the end
    per = block_bytes_by_hand(m, 16)
    small = execute(trace, cfg(max_model_len=128), m, kv_cache_gib=10 * per / GIB)
    big = execute(trace, cfg(max_model_len=128), m)
    assert small.meta["num_gpu_blocks"] == 10
    assert big.meta["num_gpu_blocks"] == 6 * 7 + 1   # the trace's cap
    assert small.summary["kv_cache"]["capacity_tokens"] == 10 * 16
    assert small.summary["preemptions"] > 0 and big.summary["preemptions"] == 0
    assert small.summary["completed"] == big.summary["completed"] == 6


# -- --time-scale -------------------------------------------------------------------------------
def test_time_scale_scales_arrivals_and_queueing(tiny):
    """Arrivals 10 ms apart, one sequence at a time: squeezed (x0.01) the requests queue
    behind each other; stretched (x30, 0.3 s apart) each finds the engine idle."""
    _, m = tiny
    trace = trace_of([(0.01 * i, 24, 4) for i in range(4)])
    one = cfg(max_num_seqs=1)
    fast = execute(trace, one, m, time_scale=0.01).requests
    slow = execute(trace, one, m, time_scale=30.0).requests
    np.testing.assert_allclose(fast["arrival_s"], trace["arrival_s"] * 0.01)
    np.testing.assert_allclose(slow["arrival_s"], trace["arrival_s"] * 30.0)
    wait_fast = fast["first_scheduled_s"] - fast["arrival_s"]
    wait_slow = slow["first_scheduled_s"] - slow["arrival_s"]
    # squeezed: each waits for the one before to finish (max_num_seqs=1)
    assert (fast["first_scheduled_s"].to_numpy()[1:] >= fast["finish_s"].to_numpy()[:-1]).all()
    assert wait_fast.iloc[-1] > wait_fast.iloc[0] and wait_fast.iloc[-1] > wait_slow.max()
    # stretched: each one had finished before the next arrived
    assert (slow["finish_s"].to_numpy()[:-1] < slow["arrival_s"].to_numpy()[1:]).all()
    with pytest.raises(TwinInputError, match="time_scale"):
        execute(trace, one, m, time_scale=0.0)


# -- --window-s ---------------------------------------------------------------------------------
def test_window_drops_later_arrivals_from_the_run_and_its_figures(tiny, tmp_path, capsys):
    d, _ = tiny
    # seconds of slack after the last arrival inside the window, so that a loaded machine
    # still finishes those requests inside it
    trace = trace_of([(0.0, 16, 3), (0.05, 16, 3), (0.1, 16, 3), (3.0, 16, 3), (4.0, 16, 3)])
    trace.to_csv(tmp_path / "t.csv", index=False)
    args = ["execute", "--trace", str(tmp_path / "t.csv"), "--model", str(d),
            "--max-model-len", "64", "--no-progress", "--json"]
    assert main(args + ["--window-s", "1.5"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_requests"] == 3 and s["completed"] == 3 and s["duration_s"] == 1.5
    # the window applies to scaled arrivals: x0.25 brings all five inside it
    assert main(args + ["--window-s", "1.5", "--time-scale", "0.25"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_requests"] == 5 and s["completed"] == 5
    assert main(args + ["--time-scale", "0"]) == 2
    assert "time_scale" in capsys.readouterr().err

"""The executor on CUDA, in fp32, bf16 and fp16 (skipped without a GPU).

``experiments/gpu_check.sh`` runs these on a lent GPU machine. ``TWIN_TEST_DEVICE=cpu``
runs the same code on the CPU instead (a dry run of the script: the comparisons are then
CPU against CPU, the memory test skips). fp32 on CUDA must give the
CPU's and HF's logits and the CPU engine's tokens; bf16/fp16 must stay close to fp32 (a
wrong cast, a dtype mix in the KV cache or the LoRA slots shows up far beyond rounding);
the KV cache is sized from free GPU memory as vLLM does.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DEVICE = os.environ.get("TWIN_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

from twin.config import ServingConfig  # noqa: E402
from twin.executor.adapters import load_adapter, write_synthetic_adapters  # noqa: E402
from twin.executor.engine import choose_num_blocks, execute  # noqa: E402
from twin.executor.lora import LoRASlots  # noqa: E402
from twin.executor.model import LlamaModel, SeqChunk  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402

# context-sensitive logits (larger init than HF's default, untied head)
TINY = dict(seed=0, initializer_range=0.2, tie_word_embeddings=False,
            max_position_embeddings=512)
#: max |logit error| / max |logit| and the lowest cosine similarity per row allowed vs fp32
TOL = {"bfloat16": (0.06, 0.995), "float16": (0.01, 0.9999)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    make_tiny_llama(root / "model", **TINY)
    cat = write_synthetic_adapters(root / "model", root / "adapters", 3, ranks=(8, 16))
    return root / "model", AdapterCatalog(cat)


def mixed_step_logits(model_dir, cat, device, dtype):
    """Logits of one mixed step (two prefills, one base and two adapters) and then one
    decode step on top of the same KV cache."""
    model = LlamaModel.from_pretrained(model_dir, device=device, dtype=dtype)
    lora = model.make_lora_slots(max_loras=2, max_lora_rank=16)
    for slot, path in enumerate(cat.table["path"][:2]):
        lora.load_slot(slot, load_adapter(path, model, 16))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.shape.vocab, (n,), generator=g).tolist()
               for n in (13, 5, 21)]
    kv = model.allocate_kv_cache(num_blocks=24, block_size=4)
    tables = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    slots = (0, -1, 1)
    first = model.step([SeqChunk(p, 0, t, s) for p, t, s in zip(prompts, tables, slots)], kv,
                       lora)
    nxt = first.argmax(-1).tolist()
    second = model.step([SeqChunk([n], len(p), t, s)
                         for n, p, t, s in zip(nxt, prompts, tables, slots)], kv, lora)
    return torch.cat([first, second]).float().cpu(), prompts


def test_fp32_on_cuda_equals_cpu_and_hf(tiny):
    model_dir, cat = tiny
    cuda, prompts = mixed_step_logits(model_dir, cat, DEVICE, torch.float32)
    cpu, _ = mixed_step_logits(model_dir, cat, "cpu", torch.float32)
    torch.testing.assert_close(cuda, cpu, atol=2e-4, rtol=1e-4)
    # the base-model request against HF's own forward (row 1: prefill; row 4: its decode)
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompts[1] + [int(cpu[1].argmax())]])
        ref = hf(ids).logits[0]
    torch.testing.assert_close(cuda[1], ref[-2], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(cuda[4], ref[-1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_close_to_fp32(tiny, dtype):
    model_dir, cat = tiny
    ref, _ = mixed_step_logits(model_dir, cat, DEVICE, torch.float32)
    got, _ = mixed_step_logits(model_dir, cat, DEVICE, getattr(torch, dtype))
    assert torch.isfinite(got).all()
    rel_max, cos_min = TOL[dtype]
    err = (got - ref).abs().max() / ref.abs().max()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert err < rel_max and cos.min() > cos_min, (float(err), cos.tolist())
    # and not trivially so: half precision does round
    assert err > 0


def small_trace(n=10, span_s=0.2):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"request_id": np.arange(n),
                         "arrival_s": np.sort(rng.uniform(0, span_s, n)),
                         "adapter": pd.array([["lora-0000", "lora-0001", "lora-0002", None][i % 4]
                                              for i in range(n)], dtype="string"),
                         "prompt_tokens": rng.integers(4, 60, n),
                         "output_tokens": rng.integers(2, 20, n)})


def test_engine_on_cuda_fp32_gives_the_cpu_tokens(tiny):
    model_dir, cat = tiny
    cfg = ServingConfig(max_loras=2, max_cpu_loras=3, max_lora_rank=16, max_num_seqs=4,
                        max_num_batched_tokens=32, max_model_len=128)
    trace = small_trace(span_s=0.0)   # all at once: the same schedule on both devices
    runs = [execute(trace, cfg, model_dir, cat, device=d, num_gpu_blocks=10, keep_tokens=True)
            for d in ("cpu", DEVICE)]
    a, b = (r.requests for r in runs)
    assert (a["status"] == "finished").all() and (b["status"] == "finished").all()
    assert runs[0].summary["preemptions"] > 0   # the small pool preempts and recomputes
    assert runs[1].summary["preemptions"] == runs[0].summary["preemptions"]
    assert a["output_token_ids"].map(list).tolist() == b["output_token_ids"].map(list).tolist()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_engine_runs_in_half_precision_on_cuda(tiny, dtype):
    model_dir, cat = tiny
    cfg = ServingConfig(max_loras=2, max_cpu_loras=3, max_lora_rank=16, max_num_seqs=8,
                        max_num_batched_tokens=64, max_model_len=128)
    res = execute(small_trace(), cfg, model_dir, cat, device=DEVICE,
                  dtype=getattr(torch, dtype), keep_tokens=True)
    r = res.requests
    assert (r["status"] == "finished").all()
    assert (r["output_token_ids"].map(len) == r["output_tokens"]).all()
    assert res.meta["num_gpu_blocks"] > 0


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU memory")
def test_kv_auto_sizing_follows_free_gpu_memory(tiny):
    """vLLM's formula on the real device: util x total - in use - activations. Higher
    utilisation adds its share of the GPU in blocks; LoRA slots held on the device take
    their bytes out of the cache."""
    model_dir, _ = tiny
    m = LlamaModel.from_pretrained(model_dir, device="cuda")
    _, total = torch.cuda.mem_get_info()
    huge = pd.DataFrame({"prompt_tokens": np.full(2_000_000, 512),
                         "output_tokens": np.full(2_000_000, 512)})   # the cap never binds
    cfg = ServingConfig(enable_lora=False, max_model_len=512)
    per = 2 * m.shape.layers * cfg.block_size * m.shape.kv_size * 4

    def blocks(util):
        return choose_num_blocks(m, cfg.replace(gpu_memory_utilization=util), huge)

    torch.cuda.synchronize()
    b3, b4 = blocks(0.3), blocks(0.4)
    assert abs((b4 - b3) - 0.1 * total / per) <= 2
    slots = LoRASlots(m.shape, 64, 64, dtype=m.dtype, device="cuda")   # held while sizing
    torch.cuda.synchronize()
    b4_slots = blocks(0.4)
    alloc_slack = 2 * 2**20 // per + 2   # the caching allocator rounds segments to 2 MiB
    assert abs((b4 - b4_slots) - slots.nbytes / per) <= alloc_slack + 0.01 * slots.nbytes / per
    del slots
    assert b3 * per < 0.3 * total   # the weights and the CUDA context are in use

"""Mixed PEFT methods (LoRA, IA³, prefix tuning, prompt tuning) against PEFT + transformers.

Adapters are written by PEFT itself (``get_peft_model(...).save_pretrained``), read back by
``load_peft`` and run through ``reference_forward`` over the executor's ``LlamaModel``
weights; every logit is compared with ``PeftModel.from_pretrained(...)`` on the HF model.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from twin.executor.adapters import AdapterError  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.peft_methods import (OPS, PEFT_KINDS, load_peft, peft_kind,  # noqa: E402
                                        reference_forward, reference_forward_batch,
                                        write_synthetic_peft_adapters)
from twin.executor.weights import make_tiny_llama  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]
transformers.logging.set_verbosity_error()
ATOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
PROMPTS = [[3, 17, 99, 4, 200, 31, 7], [1, 5, 250, 9], [42], [8, 8, 8, 100, 2, 77, 13, 6, 91]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny GQA Llama (llama3 RoPE) + one PEFT-written adapter of each kind, and a prefix
    adapter trained with ``prefix_projection=True``."""
    root = tmp_path_factory.mktemp("peft")
    model_dir = make_tiny_llama(root / "model", seed=0, rope_scaling=dict(LLAMA3_ROPE),
                                max_position_embeddings=256)
    cat = write_synthetic_peft_adapters(model_dir, root / "adapters", virtual_tokens=5, seed=1)
    proj = write_synthetic_peft_adapters(model_dir, root / "proj", kinds=["PREFIX_TUNING"],
                                         virtual_tokens=3, prefix_projection=True, seed=2)
    paths = dict(zip(cat.kind, cat.path))
    paths["PREFIX_PROJECTION"] = proj.path[0]
    return model_dir, LlamaModel.from_pretrained(model_dir), paths


def peft_logits(model_dir, adapter_dir, ids):
    """PEFT's logits of the real tokens (prompt tuning's virtual positions dropped)."""
    from peft import PeftModel

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = base if adapter_dir is None else PeftModel.from_pretrained(base, str(adapter_dir))
    with torch.no_grad():
        return hf.eval()(torch.tensor([ids])).logits[0, -len(ids):]


# ---------------------------------------------------------------------------------------------
# each kind equals PEFT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [*PEFT_KINDS, "PREFIX_PROJECTION"])
def test_each_kind_matches_peft(tiny, kind):
    model_dir, model, paths = tiny
    adapter = load_peft(paths[kind], model.shape)
    assert adapter.kind == peft_kind(paths[kind]) == kind.replace("PREFIX_PROJECTION",
                                                                  "PREFIX_TUNING")
    base = reference_forward(model, None, PROMPTS[0])
    torch.testing.assert_close(base, peft_logits(model_dir, None, PROMPTS[0]), atol=ATOL, rtol=0)
    for ids in PROMPTS[:2]:
        got = reference_forward(model, adapter, ids)
        assert got.shape == (len(ids), model.shape.vocab)
        torch.testing.assert_close(got, peft_logits(model_dir, paths[kind], ids), atol=ATOL,
                                   rtol=0)
    # the adapter really changes the outputs (the comparison would be empty otherwise)
    assert float((reference_forward(model, adapter, PROMPTS[0]) - base).abs().max()) > 0.05


def test_kinds_report_their_virtual_tokens_and_tensors(tiny):
    _, model, paths = tiny
    s = model.shape
    ad = {k: load_peft(paths[k], s) for k in PEFT_KINDS}
    assert {k: a.virtual_tokens for k, a in ad.items()} == {
        "LORA": 0, "IA3": 0, "PREFIX_TUNING": 5, "PROMPT_TUNING": 5}
    assert ad["PROMPT_TUNING"].prompt_embeddings().shape == (5, s.hidden)
    k, v = ad["PREFIX_TUNING"].prefix_kv(1)
    assert k.shape == v.shape == (5, s.kv_heads, s.head_dim)
    assert ad["LORA"].prefix_kv(0) is None and ad["LORA"].prompt_embeddings() is None
    # IA³ holds per layer the scale of the whole packed qkv output (ones on q: k and v
    # are targeted) and of the down input
    assert ad["IA3"].nbytes == 4 * s.layers * (s.q_size + 2 * s.kv_size + s.intermediate)
    assert ad["PREFIX_TUNING"].nbytes == 4 * 5 * s.layers * 2 * s.kv_size
    assert ad["LORA"].nbytes > ad["IA3"].nbytes
    assert set(ad["IA3"].in_scale) == {(i, "down") for i in range(s.layers)}


def test_hooks_leave_their_arguments_alone(tiny):
    """A client's activations may sit in shared buffers: hooks return new tensors."""
    _, model, paths = tiny
    s = model.shape
    g = torch.Generator().manual_seed(0)
    for kind in PEFT_KINDS:
        a = load_peft(paths[kind], s)
        for op in OPS:
            in_f = {"qkv": s.hidden, "o": s.q_size, "gate_up": s.hidden, "down": s.intermediate}[op]
            x = torch.randn(3, in_f, generator=g)
            y = torch.randn(3, {"qkv": s.q_size + 2 * s.kv_size, "o": s.hidden,
                                "gate_up": 2 * s.intermediate, "down": s.hidden}[op], generator=g)
            x0, y0 = x.clone(), y.clone()
            x1 = a.before_linear(1, op, x)
            y1 = a.after_linear(1, op, x1, y)
            assert torch.equal(x, x0) and torch.equal(y, y0)
            changed = (kind == "LORA" or (kind == "IA3" and op in ("qkv", "down")))
            assert (not torch.equal(y1, y0) or not torch.equal(x1, x0)) == changed, (kind, op)


# ---------------------------------------------------------------------------------------------
# several kinds side by side
# ---------------------------------------------------------------------------------------------
def test_kinds_served_side_by_side_each_get_their_peft_result(tiny):
    """One batch: every kind, the base model and a repeated adapter; one GEMM per op over
    all of them; each sequence gets what PEFT gives it alone."""
    model_dir, model, paths = tiny
    ad = {k: load_peft(paths[k], model.shape) for k in PEFT_KINDS}
    items = [(ad["PROMPT_TUNING"], PROMPTS[0]), (None, PROMPTS[1]), (ad["IA3"], PROMPTS[2]),
             (ad["LORA"], PROMPTS[3]), (ad["PREFIX_TUNING"], PROMPTS[1]),
             (ad["LORA"], PROMPTS[0]), (ad["PREFIX_TUNING"], PROMPTS[2])]
    got = reference_forward_batch(model, items)
    kinds = set()
    for (a, ids), lg in zip(items, got):
        want = peft_logits(model_dir, None if a is None else paths[a.kind], ids)
        torch.testing.assert_close(lg, want, atol=ATOL, rtol=0)
        kinds.add(a.kind if a is not None else "BASE")
    assert len(kinds - {"BASE"}) >= 3


def test_changing_one_ia3_vector_changes_only_that_adapter(tiny, tmp_path):
    model_dir, model, paths = tiny
    mut = tmp_path / "ia3-mut"
    shutil.copytree(paths["IA3"], mut)
    w = load_file(str(mut / "adapter_model.safetensors"))
    key = next(k for k in sorted(w) if "layers.1.self_attn.v_proj" in k)
    w[key] = w[key].clone()
    w[key][3] *= 1.5
    save_file(w, str(mut / "adapter_model.safetensors"))
    ad = {k: load_peft(paths[k], model.shape) for k in PEFT_KINDS}
    ia3_mut = load_peft(mut, model.shape)
    others = [(ad[k], PROMPTS[i]) for i, k in enumerate(PEFT_KINDS)]
    before = reference_forward_batch(model, others + [(ad["IA3"], PROMPTS[3])])
    after = reference_forward_batch(model, others + [(ia3_mut, PROMPTS[3])])
    for b, a in zip(before[:-1], after[:-1]):
        assert torch.equal(a, b)
    assert float((after[-1] - before[-1]).abs().max()) > 1e-4
    torch.testing.assert_close(after[-1], peft_logits(model_dir, mut, PROMPTS[3]), atol=ATOL,
                               rtol=0)

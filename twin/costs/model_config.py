"""A model's shape from its Hugging Face ``config.json``, a directory holding one, or a short
name of the built-in table (shapes only: no weights, no download).

Why here and not in the executor: the twin prices memory and step time from the shape alone,
and ``twin profile`` must not import torch. The executor's ``LlamaShape.from_config`` reads
the same dictionaries, so :func:`load_config` (file / dir / short name → config dict) is the
one entry point for both; :func:`model_shape` turns that dict into a :class:`ModelShape`.

Supported architectures (``model_type``) and what vLLM (0.8.x, the measured version) does
with them under LoRA:

- ``llama``, ``mistral`` (vLLM runs both through ``LlamaForCausalLM``), ``phi3`` (a Llama
  subclass): the model class declares ``embedding_modules``, so vLLM also allocates LoRA
  buffers for ``embed_tokens`` and ``lm_head`` and 256 extra-vocabulary rows;
- ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3`` / ``gemma3_text``: ``embedding_modules`` is
  empty: LoRA buffers on the linear layers only;
- Llama, Qwen, Gemma and Mistral checkpoints hold q/k/v and gate/up separately and vLLM packs
  them (``packed_modules_mapping``) into one layer with one LoRA *slice* per projection
  (three A matrices for qkv_proj, two for gate_up_proj); Phi-3's checkpoint is already fused,
  its mapping lists one module per packed layer, so vLLM wraps them as single-slice layers
  (one A for qkv_proj, one for gate_up_proj): ``ModelShape.lora_fused_modules``.

A checkpoint's ``quantization_config`` is read as vLLM reads it (:func:`load_model`): an FP8
checkpoint (``quant_method: fp8``) is served as ``--quantization fp8``; other methods (AWQ,
GPTQ, bitsandbytes, ...) are refused, since the twin models no 4-bit weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from twin.costs.profile import ModelShape
from twin.errors import TwinInputError

# model_type -> (norms per decoder layer, q/k norms, q/k/v bias always, fused modules,
#                LoRA on embeddings)
_ARCH = {
    "llama": (2, False, False, False, True),
    "mistral": (2, False, False, False, True),
    "phi3": (2, False, False, True, True),
    "qwen2": (2, False, True, False, False),
    "qwen3": (2, True, False, False, False),
    "gemma2": (4, False, False, False, False),
    "gemma3_text": (4, True, False, False, False),
}
SUPPORTED = tuple(sorted(_ARCH)) + ("gemma3",)

#: vLLM's LogitsProcessorWithLoRA refuses larger vocabularies (0.8.x)
LORA_MAX_VOCAB = 257024

# The built-in table: the fields of public config.json files that decide size, memory and
# compute (facts about the architectures, as in shared/data/model-configs; no weights).
_L31 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072,
            tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
BUILTIN: dict[str, dict] = {
    "llama-3.1-8b": dict(_L31, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=32),
    "llama-3.1-70b": dict(_L31, hidden_size=8192, intermediate_size=28672,
                          num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80),
    "llama-3.2-1b": dict(_L31, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, num_hidden_layers=16,
                         tie_word_embeddings=True,
                         rope_scaling=dict(_L31["rope_scaling"], factor=32.0)),
    "llama-3.2-3b": dict(_L31, hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, num_hidden_layers=28,
                         tie_word_embeddings=True,
                         rope_scaling=dict(_L31["rope_scaling"], factor=32.0)),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24,
                         vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_attention_heads=12, num_key_value_heads=2, num_hidden_layers=28,
                         vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28,
                       vocab_size=152064, max_position_embeddings=32768,
                       tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824,
                        num_attention_heads=40, num_key_value_heads=8, num_hidden_layers=48,
                        vocab_size=152064, max_position_embeddings=32768,
                        tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     num_hidden_layers=36, vocab_size=151936, max_position_embeddings=40960,
                     tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                       vocab_size=32768, max_position_embeddings=32768,
                       tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-5),
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       num_hidden_layers=42, vocab_size=256000, max_position_embeddings=8192,
                       tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                       hidden_act="gelu_pytorch_tanh"),
    "phi-3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192,
                       num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32,
                       vocab_size=32064, max_position_embeddings=4096,
                       tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560,
                         num_attention_heads=15, num_key_value_heads=5, num_hidden_layers=32,
                         vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
}
# the names the models are published under (Hugging Face ids, lower case, without owner)
_ALIASES = {
    "llama-3.1-8b-instruct": "llama-3.1-8b", "meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama31-8b": "llama-3.1-8b", "llama-3.1-70b-instruct": "llama-3.1-70b",
    "llama-3.2-1b-instruct": "llama-3.2-1b", "llama-3.2-3b-instruct": "llama-3.2-3b",
    "qwen2.5-0.5b-instruct": "qwen2.5-0.5b", "qwen2.5-1.5b-instruct": "qwen2.5-1.5b",
    "qwen2.5-7b-instruct": "qwen2.5-7b", "qwen2.5-14b-instruct": "qwen2.5-14b",
    "mistral-7b-instruct-v0.3": "mistral-7b", "mistral-7b-v0.3": "mistral-7b",
    "gemma-2-9b-it": "gemma-2-9b", "phi-3-mini-4k-instruct": "phi-3-mini",
    "smollm2-360m-instruct": "smollm2-360m",
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN)


def load_config(src: str | Path) -> tuple[dict, str]:
    """``(config dict, source)`` from a ``config.json``, a directory holding one, or a short
    name (``qwen2.5-7b``, ``Qwen/Qwen2.5-7B-Instruct``; see :func:`builtin_names`)."""
    path = Path(src)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise TwinInputError("the model directory holds no config.json", file=str(src))
    if path.is_file():
        try:
            cfg = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise TwinInputError(f"not a JSON config.json: {exc}", file=str(path)) from None
        except OSError as exc:
            raise TwinInputError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
        if not isinstance(cfg, dict):
            raise TwinInputError("expected a JSON object (a Hugging Face config.json)",
                                 file=str(path))
        return cfg, str(path)
    key = str(src).strip().lower().rsplit("/", 1)[-1]
    key = _ALIASES.get(key, key)
    if key in BUILTIN:
        return dict(BUILTIN[key]), f"built-in:{key}"
    raise TwinInputError(f"no config.json, model directory or built-in model named {str(src)!r}; "
                         f"built-in: {', '.join(builtin_names())}", file=str(src),
                         field="--model")


def _int(cfg: dict, key: str, source: str, default=None) -> int:
    v = cfg.get(key, default)
    if v is None and default is None:
        raise TwinInputError("missing (needed for the model's shape)", file=source, field=key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
        raise TwinInputError(f"expected a positive integer, got {v!r}", file=source, field=key)
    return int(v)


#: RoPE scalings whose max_position_embeddings already is the scaled context (vLLM)
_ROPE_UNSCALED = ("su", "longrope", "llama3")


def derived_context(cfg: dict, max_pos: int, source: str = "config.json") -> int:
    """The context vLLM derives from a config (``_get_and_verify_max_len``): the
    ``max_position_embeddings`` times a RoPE scaling's ``factor`` (YaRN: from its
    ``original_max_position_embeddings``), except for the scalings whose
    ``max_position_embeddings`` is already the scaled one (llama3, longrope) and for
    Gemma 3. It bounds ``max_model_len`` and sizes the rotary cache."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not isinstance(rope, dict) or str(cfg.get("model_type", "")).startswith("gemma3"):
        return max_pos
    kind = rope.get("rope_type", rope.get("type"))
    if kind in _ROPE_UNSCALED or kind is None:
        return max_pos
    factor = rope.get("factor", 1.0)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise TwinInputError(f"expected a positive number, got {factor!r}", file=source,
                             field="rope_scaling.factor")
    if kind == "yarn":
        max_pos = _int(rope, "original_max_position_embeddings", source, max_pos)
    return int(max_pos * factor)


def model_shape(cfg: dict, source: str = "config.json", name: str | None = None,
                dtype_bytes: int = 2) -> ModelShape:
    """The :class:`ModelShape` of a config dict (see the module docstring for the
    architectures); parameters are counted from the shapes: embeddings, an untied lm_head,
    q/k/v/o, gate/up/down, their biases where the architecture has them, every norm."""
    mt = cfg.get("model_type")
    if mt == "gemma3" and isinstance(cfg.get("text_config"), dict):
        # the multimodal Gemma 3 checkpoints: the language model's shape (the vision tower
        # is not served by the LoRA path and is not counted)
        cfg = dict(cfg["text_config"], model_type="gemma3_text",
                   tie_word_embeddings=cfg.get("tie_word_embeddings", True))
        mt = "gemma3_text"
    if mt not in _ARCH:
        raise TwinInputError(f"unsupported architecture {mt!r}; supported: "
                             f"{', '.join(SUPPORTED)} (dense decoder models)",
                             file=source, field="model_type")
    norms, qk_norm, qkv_bias_always, fused, lora_emb = _ARCH[mt]
    hidden = _int(cfg, "hidden_size", source)
    heads = _int(cfg, "num_attention_heads", source)
    kv_heads = _int(cfg, "num_key_value_heads", source, heads)
    layers = _int(cfg, "num_hidden_layers", source)
    inter = _int(cfg, "intermediate_size", source)
    vocab = _int(cfg, "vocab_size", source)
    head_dim = cfg.get("head_dim")
    head_dim = _int(cfg, "head_dim", source) if head_dim is not None else hidden // heads
    if head_dim * heads != hidden and cfg.get("head_dim") is None:
        raise TwinInputError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                             f"{heads}: give head_dim", file=source, field="head_dim")
    if heads % kv_heads:
        raise TwinInputError(f"num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}", file=source,
                             field="num_key_value_heads")
    max_pos = cfg.get("max_position_embeddings")
    max_pos = (derived_context(cfg, _int(cfg, "max_position_embeddings", source), source)
               if max_pos is not None else None)
    tie = cfg.get("tie_word_embeddings", mt.startswith("gemma"))
    if not isinstance(tie, bool):
        raise TwinInputError(f"expected true or false, got {tie!r}", file=source,
                             field="tie_word_embeddings")
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = (hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + norms * hidden
                 + (2 * head_dim if qk_norm else 0))
    if qkv_bias_always or attn_bias:
        per_layer += q + 2 * kv
    if attn_bias:          # Llama's attention_bias covers o_proj as well
        per_layer += hidden
    if mlp_bias:
        per_layer += 2 * inter + hidden
    params = vocab * hidden * (1 if tie else 2) + layers * per_layer + hidden
    return ModelShape(name=name or str(cfg.get("_name_or_path") or Path(source).stem),
                      layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, intermediate=inter, vocab=vocab,
                      dtype_bytes=dtype_bytes, params=float(params), tie_word_embeddings=tie,
                      max_position_embeddings=max_pos, lora_fused_modules=fused,
                      lora_embeddings=lora_emb)


#: checkpoint quantizations (config.json ``quantization_config.quant_method``) the twin
#: prices, as the ``--quantization`` they amount to: vLLM detects a checkpoint's method itself
CHECKPOINT_QUANTIZATIONS = {"fp8": "fp8", "fbgemm_fp8": "fp8"}


def _fp8_compressed(qc: dict) -> bool:
    """A ``compressed-tensors`` checkpoint whose every weight group is 8-bit float (the
    ``*-FP8`` / ``FP8-dynamic`` checkpoints vLLM serves as FP8); other schemes (int4/int8
    weights) are not."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return False
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)]
    return bool(weights) and all(isinstance(w, dict) and w.get("num_bits") == 8
                                 and str(w.get("type", "")).lower() == "float" for w in weights)


def checkpoint_quantization(cfg: dict, source: str = "config.json") -> str | None:
    """The quantization vLLM detects from a config's ``quantization_config`` (None: none):
    ``fp8`` checkpoints store their linear layers in FP8, as ``--quantization fp8`` would.
    So are ``fbgemm_fp8`` and ``compressed-tensors`` ones whose weights are all 8-bit
    floats. Other methods (AWQ, GPTQ, bitsandbytes, int compressed-tensors ...) are refused: the
    memory and step-time models know 16-bit and FP8 weights only, and pricing a 4-bit
    checkpoint as 16-bit would overstate its weights ~3.5x."""
    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise TwinInputError(f"expected an object with a quant_method, got {qc!r}",
                             file=source, field="quantization_config")
    method = qc.get("quant_method")
    if not isinstance(method, str) or not method.strip():
        raise TwinInputError(f"expected the checkpoint's quantization method (a string), "
                             f"got {method!r}", file=source,
                             field="quantization_config.quant_method")
    found = CHECKPOINT_QUANTIZATIONS.get(method.strip().lower())
    if found is None and method.strip().lower() == "compressed-tensors" and _fp8_compressed(qc):
        found = "fp8"
    if found is None:
        raise TwinInputError(
            f"a {method!r} checkpoint is not supported: the twin prices 16-bit weights and "
            f"FP8 linear layers only (supported: {', '.join(CHECKPOINT_QUANTIZATIONS)}, "
            "compressed-tensors with 8-bit float weights, or no "
            "quantization_config); use the unquantized checkpoint's config.json",
            file=source, field="quantization_config.quant_method")
    return found


def load_model(src: str | Path, quantization: str | None = None,
               dtype_bytes: int = 2) -> tuple[ModelShape, str | None]:
    """``(shape, quantization)`` of a model (:func:`load_model_shape`): ``quantization`` as
    given (vLLM's ``--quantization``; None: not given), else the checkpoint's own
    (:func:`checkpoint_quantization`), as vLLM detects it; a given one that differs from
    the checkpoint's is refused (vLLM refuses it)."""
    cfg, source = load_config(src)
    found = checkpoint_quantization(cfg, source)
    if found is not None and quantization not in (None, found):
        raise TwinInputError(f"the checkpoint is quantized with {found!r} (its "
                             f"quantization_config.quant_method), not {quantization!r}: vLLM "
                             "refuses the mix; drop --quantization", file=source,
                             field="--quantization")
    return _shape(cfg, source, dtype_bytes), found or quantization


def load_model_shape(src: str | Path, dtype_bytes: int = 2) -> ModelShape:
    """:func:`model_shape` of :func:`load_config` (a file, a directory or a short name); a
    checkpoint quantized with a method the twin does not price is refused
    (:func:`checkpoint_quantization`; :func:`load_model` also says which one it is)."""
    return load_model(src, dtype_bytes=dtype_bytes)[0]


def _shape(cfg: dict, source: str, dtype_bytes: int) -> ModelShape:
    name = source[len("built-in:"):] if source.startswith("built-in:") else None
    if name is None:
        name = Path(source).parent.name if Path(source).name == "config.json" else Path(source).stem
    shape = model_shape(cfg, source, name=name, dtype_bytes=dtype_bytes)
    # only models with embedding LoRA wrap lm_head in LogitsProcessorWithLoRA, which checks
    if shape.lora_embeddings and shape.vocab + 256 > LORA_MAX_VOCAB:
        raise TwinInputError(f"vocab_size {shape.vocab} is beyond what vLLM's LoRA logits "
                             f"processor accepts ({LORA_MAX_VOCAB}): vLLM refuses LoRA on this "
                             f"model", file=source, field="vocab_size")
    return shape


__all__ = ["BUILTIN", "CHECKPOINT_QUANTIZATIONS", "SUPPORTED", "builtin_names",
           "checkpoint_quantization", "load_config", "load_model", "load_model_shape",
           "model_shape"]

"""Read a PEFT directory of any supported kind into a :class:`ClientAdapter`.

``adapter_config.json`` + ``adapter_model.safetensors`` as ``PeftModel.save_pretrained``
writes them (safetensors only, never pickle). LoRA goes through the executor's own reader
and packer (``adapters.py``, the same checks as vLLM); IA³, prefix tuning and prompt
tuning are checked here against the model. Anything PEFT would compute differently from
the hooks raises :class:`AdapterError` naming the file and the field or tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from twin.executor.adapters import (CONFIG_NAME, WEIGHTS_NAME, AdapterError, _as_shape,
                                    pack_adapter, read_adapter, read_adapter_config,
                                    read_weights)
from twin.executor.peft_methods.kinds import (IA3, LORA, PEFT_KINDS, PREFIX_TUNING,
                                              PROMPT_TUNING, ClientAdapter, IA3ClientAdapter,
                                              LoraClientAdapter, PrefixClientAdapter,
                                              PromptClientAdapter)
from twin.executor.shape import LORA_GROUPS, MODULE_GROUP, MODULE_PARENT, LlamaShape

_IA3_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
    r"\.ia3_l(?:\.[\w-]+)?$")
PROMPT_KEY = "prompt_embeddings"


def peft_kind(path, adapter_id: str | None = None) -> str:
    """The ``peft_type`` of a PEFT directory (upper case; LORA when the field is absent)."""
    path = Path(path)
    return _kind(read_adapter_config(path, adapter_id or path.name, lora_only=False))


def _kind(cfg: dict) -> str:
    return str(cfg.get("peft_type") or LORA).upper()


def load_peft(path, shape, dtype: torch.dtype = torch.float32, *,
              adapter_id: str | None = None) -> ClientAdapter:
    """The adapter in the PEFT directory ``path`` as a :class:`ClientAdapter` of its kind.

    ``shape``: the base model's :class:`LlamaShape` (or a ``LlamaModel``, or an HF model
    directory); tensors are cast to ``dtype``. Raises AdapterError for a kind or a config
    the hooks cannot serve exactly as PEFT does.
    """
    path = Path(path)
    aid = adapter_id or path.name
    shape = _as_shape(shape)
    cfg = read_adapter_config(path, aid, lora_only=False)
    kind = _kind(cfg)
    if kind not in PEFT_KINDS:
        raise AdapterError(aid, f"{path / CONFIG_NAME}: peft_type {cfg.get('peft_type')!r} is "
                                f"not supported (supported: {', '.join(PEFT_KINDS)})")
    if kind == LORA:   # the executor's own reader and packer: vLLM's checks, same math
        raw = read_adapter(path, aid)
        return LoraClientAdapter(pack_adapter(raw, shape, raw.rank, dtype=dtype), dtype)
    if cfg.get("modules_to_save"):
        raise AdapterError(aid, f"{path / CONFIG_NAME}: modules_to_save "
                                f"{cfg['modules_to_save']} is not supported")
    tensors, _ = read_weights(path, aid)
    for key, t in tensors.items():
        _check_tensor(aid, path, key, t)
    if kind == IA3:
        return _ia3(aid, path, cfg, tensors, shape, dtype)
    return _prompt_learning(aid, path, cfg, tensors, shape, dtype, kind)


def _check_tensor(aid: str, path: Path, key: str, t: torch.Tensor) -> None:
    """Floating point and finite: NaN/inf would poison every token of the adapter."""
    if not t.is_floating_point():
        raise AdapterError(aid, f"{path / WEIGHTS_NAME}: {key!r} has dtype {t.dtype}, "
                                "expected floating point")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        raise AdapterError(aid, f"{path / WEIGHTS_NAME}: {key!r} holds "
                                f"{int((~finite).sum())} non-finite value(s) of {t.numel()}")


# ---------------------------------------------------------------------------------------------
# IA³
# ---------------------------------------------------------------------------------------------
def _ia3(aid, path, cfg, tensors, shape: LlamaShape, dtype) -> IA3ClientAdapter:
    """Group PEFT's ``ia3_l`` vectors by (layer, packed op). A vector shaped ``(out, 1)``
    scales the module's output, ``(1, in)`` its input (PEFT's ``is_feedforward``)."""
    wfile = path / WEIGHTS_NAME
    ff_cfg = cfg.get("feedforward_modules")
    out_parts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    in_scale: dict[tuple[int, str], torch.Tensor] = {}
    for key, t in sorted(tensors.items()):
        m = _IA3_KEY.match(key)
        if m is None:
            raise AdapterError(aid, f"{wfile}: unexpected tensor {key!r}: IA³ target modules "
                                    f"must be among {list(MODULE_GROUP)} of the decoder layers")
        layer, parent, module = int(m[1]), m[2], m[3]
        if module not in MODULE_GROUP or MODULE_PARENT[module] != parent:
            raise AdapterError(aid, f"{wfile}: {key!r}: IA³ target module {parent}.{module} is "
                                    f"not one of the packed ops' modules {list(MODULE_GROUP)}")
        if layer >= shape.layers:
            raise AdapterError(aid, f"{wfile}: {key!r}: layer {layer} but the model has "
                                    f"{shape.layers} layers")
        in_f, out_f = shape.module_dims(module)
        op, i = MODULE_GROUP[module]
        feedforward = tuple(t.shape) == (1, in_f)
        if not feedforward and tuple(t.shape) != (out_f, 1):
            raise AdapterError(aid, f"{wfile}: {key!r} has shape {tuple(t.shape)}, expected "
                                    f"({out_f}, 1) or, for a feedforward module, (1, {in_f}): "
                                    "adapter does not match this model")
        if isinstance(ff_cfg, list) and feedforward != (module in ff_cfg):
            raise AdapterError(aid, f"{wfile}: {key!r} has shape {tuple(t.shape)} but "
                                    f"feedforward_modules={ff_cfg} in {CONFIG_NAME}")
        if feedforward:
            if len(LORA_GROUPS[op]) > 1:
                raise AdapterError(aid, f"{CONFIG_NAME}: feedforward_modules: IA³ would scale "
                                        f"the input of {module}, which shares it with "
                                        f"{[x for x in LORA_GROUPS[op] if x != module]} in the "
                                        f"packed {op!r} op; only o_proj and down_proj can be "
                                        "feedforward modules")
            in_scale[(layer, op)] = t.reshape(-1).to(dtype)
        else:
            out_parts.setdefault((layer, op), {})[i] = t.reshape(-1).to(dtype)
    if not tensors:
        raise AdapterError(aid, f"{wfile}: no IA³ vectors (ia3_l)")
    out_scale = {}
    for (layer, op), parts in out_parts.items():
        mods = LORA_GROUPS[op]
        out_scale[(layer, op)] = torch.cat([
            parts[i] if i in parts else torch.ones(shape.module_dims(m)[1], dtype=dtype)
            for i, m in enumerate(mods)])
    return IA3ClientAdapter(adapter_id=aid, shape=shape, out_scale=out_scale,
                            in_scale=in_scale)


# ---------------------------------------------------------------------------------------------
# Prefix tuning and prompt tuning
# ---------------------------------------------------------------------------------------------
def _prompt_learning(aid, path, cfg, tensors, shape: LlamaShape, dtype, kind):
    """Prefix tuning: ``prompt_embeddings`` [n, layers * 2 * kv_heads * head_dim], per
    virtual token the keys and values of each layer (PEFT saves the prefix encoder's output,
    so ``prefix_projection=True`` adapters are served too: the MLP was applied before
    saving). Prompt tuning: ``prompt_embeddings`` [n, hidden]."""
    cfile, wfile = path / CONFIG_NAME, path / WEIGHTS_NAME
    n = _int_field(aid, cfile, cfg, "num_virtual_tokens")
    if str(cfg.get("task_type") or "").upper() != "CAUSAL_LM":
        raise AdapterError(aid, f"{cfile}: task_type {cfg.get('task_type')!r}: prompt "
                                "learning adapters are served for task_type CAUSAL_LM only")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise AdapterError(aid, f"{cfile}: num_transformer_submodules="
                                f"{cfg['num_transformer_submodules']} (encoder-decoder); a "
                                "decoder-only Llama needs 1")
    if kind == PREFIX_TUNING:
        want = {"num_layers": shape.layers, "num_attention_heads": shape.kv_heads,
                "token_dim": shape.kv_size}
        cols = shape.layers * 2 * shape.kv_size
    else:
        want = {"token_dim": shape.hidden}
        cols = shape.hidden
    for f, v in want.items():
        if f in cfg and cfg[f] is not None and cfg[f] != v:
            raise AdapterError(aid, f"{cfile}: {f}={cfg[f]!r} but the model needs {v} "
                                    "(adapter does not match this model)")
    extra = sorted(set(tensors) - {PROMPT_KEY})
    if extra or PROMPT_KEY not in tensors:
        raise AdapterError(aid, f"{wfile}: expected exactly one tensor {PROMPT_KEY!r}, got "
                                f"{sorted(tensors)}")
    t = tensors[PROMPT_KEY]
    if tuple(t.shape) != (n, cols):
        raise AdapterError(aid, f"{wfile}: {PROMPT_KEY!r} has shape {tuple(t.shape)}, expected "
                                f"({n}, {cols}) for num_virtual_tokens={n} on this model")
    t = t.to(dtype)
    if kind == PROMPT_TUNING:
        return PromptClientAdapter(adapter_id=aid, shape=shape, embeddings=t.contiguous())
    kv = t.view(n, shape.layers, 2, shape.kv_heads, shape.head_dim).permute(1, 2, 0, 3, 4)
    return PrefixClientAdapter(adapter_id=aid, shape=shape, kv=kv.contiguous())


def _int_field(aid, cfile, cfg, name) -> int:
    v = cfg.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise AdapterError(aid, f"{cfile}: {name!r} must be a positive integer, got {v!r}")
    return v

"""The shape of a Llama model and its LoRA-able modules, as read from an HF ``config.json``.

Apart from the forward pass (``model.py``) because the adapter I/O (``adapters.py``) and the
LoRA compute (``lora.py``) need the shape and the module groups but not the model: with the
shape here, model -> lora -> adapters -> shape runs one way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twin.costs.model_config import model_shape

# LoRA-able linear layers, grouped as the model fuses them (vLLM's packed modules).
# group -> the HF module names (slices) it packs, in output order.
LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
LORA_MODULES: tuple[str, ...] = tuple(m for g in LORA_GROUPS.values() for m in g)
MODULE_GROUP: dict[str, tuple[str, int]] = {
    m: (g, i) for g, ms in LORA_GROUPS.items() for i, m in enumerate(ms)}
MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                 "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


# ---------------------------------------------------------------------------------------------
# Shape
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama model, read from an HF ``config.json``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", ...}; None = default
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "LlamaShape":
        if cfg.get("model_type", "llama") != "llama":
            raise ValueError(f"not a Llama-architecture config (model_type={cfg.get('model_type')!r})")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r} (Llama uses silu)")
        # transformers >= 5 writes rope_parameters (theta + scaling together); older configs
        # write rope_theta and rope_scaling.
        rp = dict(cfg.get("rope_parameters") or {})
        theta = float(rp.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = rp if rp else (dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None)
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = dict(scaling, rope_type=rtype)
            scaling.pop("type", None)
            if rtype == "default":
                scaling = None
            elif rtype not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope scaling {rtype!r} (supported: default, "
                                 "linear, llama3)")
        # the dimensions as the cost models read them (one reader of config.json)
        dims = model_shape(dict(cfg, model_type="llama"))
        return cls(
            hidden=dims.hidden, layers=dims.layers, heads=dims.heads, kv_heads=dims.kv_heads,
            head_dim=dims.head_dim, intermediate=dims.intermediate, vocab=dims.vocab,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=dims.tie_word_embeddings,
            max_position_embeddings=dims.max_position_embeddings or 2048,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)))

    @classmethod
    def from_dir(cls, model_dir) -> "LlamaShape":
        path = Path(model_dir) / "config.json"
        return cls.from_config(json.loads(path.read_text()))

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA-able linear layer."""
        h, q, kv, i = self.hidden, self.q_size, self.kv_size, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[module]

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_size * dtype_bytes

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies (fp32), with linear or llama3 scaling applied as HF does."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        s = self.rope_scaling
        if s is None:
            return inv
        factor = float(s["factor"])
        if s["rope_type"] == "linear":
            return inv / factor
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s.get("original_max_position_embeddings", self.max_position_embeddings))
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, inv_l)

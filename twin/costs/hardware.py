"""Step time in hardware terms: hardware coefficients x counts derived from the model shape.

The twin's :class:`~twin.costs.step_time.StepTimeModel` prices a step as ``sum_k c_k f_k``
over batch features ``f`` (``FEATURES``). Fitted directly, its coefficients ``c`` are
per-model constants: SmolLM2's cost per decode token says nothing about Qwen2.5's. Here each
``c_k`` is instead written as ``c_k = sum_j h_j * N_jk(shape)``: ``h_j`` is a property of the
*machine and serving software* (seconds per byte of weights read, per FLOP of dense matmul,
per kernel launch of a layer, ...; ``HW_TERMS``) and ``N_jk`` is a count derived from the
model's shape (bytes of weights, FLOPs per token, layers, LoRA elements per rank, ...;
:func:`counts`). Hardware coefficients fitted on model A (``twin.calibrate.hardware``) then
give the step-time model of model B on the same machine with no run of B
(:func:`step_time_model`).

The model stays linear in ``h`` (a sum, not a roofline's max), so a non-negative least-squares
fit of ``h`` is exact and the twin's closed-form decode runs are unchanged. What each term
stands for (its counts per batch feature, per tensor-parallel rank of ``tp``):

========================  =============================================================
step_s                    per step: scheduler, input preparation, sampler launch (CPU)
layer_s                   per step and layer: kernel launches / per-layer interpreter work
weight_s_per_byte         per byte of weights read once per step (1 / effective bandwidth)
dense_s_per_flop          per FLOP of the linear layers (2 x params per token) and of the
                          lm_head (one logits row per sequence)
act_s_per_byte            per byte of activations a token moves through the elementwise ops
                          (norms, RoPE, SiLU, residuals) of every layer
attn_s_per_flop           per FLOP of attention (QK^T and PV) over the attended context
kv_s_per_byte             per byte of KV cache read by decode attention
decode_seq_layer_s        per decode sequence and layer (per-sequence attention metadata,
                          KV gather)
prefill_seq_layer_s       per prefill chunk and layer (a chunk's own attention call)
sample_s_per_vocab        per sequence and vocabulary entry (softmax / sampling of a row)
lora_s_per_flop           per FLOP of the LoRA shrink+expand matmuls (padded rank x token)
adapter_s_per_byte        per byte of a distinct adapter's slot weights read
adapter_call_s            per distinct adapter and LoRA kernel call (4 per layer: qkv, o,
                          gate_up, down as vLLM packs them)
slot_call_s               per adapter slot (max_loras) and LoRA kernel call (grid span)
lora_call_s               per LoRA kernel call when any token has an adapter (launches)
idle_s, idle_s_per_byte   first step after an idle wait: constant + weights re-read cold
allreduce_s_per_byte      tensor parallel: all-reduce bytes per token (2 per layer)
allreduce_call_s          tensor parallel: all-reduce launches (2 per layer and step)
========================  =============================================================

Counts use :class:`twin.costs.profile.ModelShape` only (``dtype_bytes`` is the weight and
KV dtype); a hardware dict names its terms as above, missing ones are 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from twin.costs.step_time import FEATURES, StepTimeModel

HW_TERMS = (
    "step_s", "layer_s", "weight_s_per_byte", "dense_s_per_flop", "act_s_per_byte",
    "attn_s_per_flop", "kv_s_per_byte", "decode_seq_layer_s", "prefill_seq_layer_s",
    "sample_s_per_vocab", "lora_s_per_flop", "adapter_s_per_byte", "adapter_call_s",
    "slot_call_s", "lora_call_s", "idle_s", "idle_s_per_byte", "allreduce_s_per_byte",
    "allreduce_call_s",
)
LORA_CALLS_PER_LAYER = 4   # qkv, o, gate_up, down: vLLM's packed LoRA modules
_F = {k: i for i, k in enumerate(FEATURES)}


def linear_params(shape) -> float:
    """Parameters of the linear layers of all decoder layers (no embeddings, no lm_head)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    h, i = shape.hidden, shape.intermediate
    return float(shape.layers * (h * (q + 2 * kv) + q * h + 3 * h * i))


def counts(shape, tp: int = 1) -> np.ndarray:
    """``N[j, k]``: units of hardware term ``HW_TERMS[j]`` per unit of step feature
    ``FEATURES[k]`` for a model of ``shape`` on ``tp`` tensor-parallel ranks (weights,
    heads, FLOPs and KV split evenly as vLLM's column/row-parallel layers do)."""
    tp = int(tp)
    N = np.zeros((len(HW_TERMS), len(FEATURES)))
    L, h, v, db = shape.layers, shape.hidden, shape.vocab, shape.dtype_bytes
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lin = linear_params(shape) / tp
    head_flops = 2.0 * v * h / tp                     # lm_head: one logits row
    weights = (shape.params or (linear_params(shape) + v * h * (1 if shape.tie_word_embeddings else 2))) * db / tp
    calls = LORA_CALLS_PER_LAYER * L

    def put(term, feature, value):
        N[HW_TERMS.index(term), _F[feature]] += value

    put("step_s", "const", 1.0)
    put("layer_s", "const", L)
    put("weight_s_per_byte", "const", weights)
    for f in ("prefill_tokens", "decode_tokens"):
        put("dense_s_per_flop", f, 2.0 * lin)
        put("act_s_per_byte", f, L * (6 * h + q + 2 * kv + 3 * shape.intermediate) * db / tp)
    put("dense_s_per_flop", "decode_tokens", head_flops)
    put("dense_s_per_flop", "prefill_seqs", head_flops)
    put("attn_s_per_flop", "decode_context", 4.0 * L * q / tp)
    put("attn_s_per_flop", "prefill_context", 2.0 * L * q / tp)
    put("kv_s_per_byte", "decode_context", 2.0 * L * kv * db / tp)
    put("decode_seq_layer_s", "decode_tokens", L)
    put("prefill_seq_layer_s", "prefill_seqs", L)
    put("sample_s_per_vocab", "decode_tokens", v)
    put("sample_s_per_vocab", "prefill_seqs", v)
    put("lora_s_per_flop", "lora_token_rank", 2.0 * shape.lora_elems_per_rank / tp)
    put("adapter_s_per_byte", "adapter_rank", shape.lora_elems_per_rank * db / tp)
    put("adapter_call_s", "adapters", calls)
    put("slot_call_s", "lora_slots", calls)
    put("lora_call_s", "lora_active", calls)
    put("idle_s", "after_idle", 1.0)
    put("idle_s_per_byte", "after_idle", weights)
    if tp > 1:
        for f in ("prefill_tokens", "decode_tokens"):
            put("allreduce_s_per_byte", f, 2.0 * L * h * db * (tp - 1) / tp)
        put("allreduce_call_s", "const", 2.0 * L)
    return N


def as_vector(hw: dict) -> np.ndarray:
    unknown = set(hw) - set(HW_TERMS)
    if unknown:
        raise ValueError(f"unknown hardware term(s) {sorted(unknown)}; known: {HW_TERMS}")
    return np.array([float(hw.get(k, 0.0)) for k in HW_TERMS])


def coefficients(hw: dict, shape, tp: int = 1) -> dict:
    """Step-time coefficients (by feature) of ``shape`` on the machine ``hw`` describes."""
    c = as_vector(hw) @ counts(shape, tp)
    return {k: float(v) for k, v in zip(FEATURES, c) if v}


def step_time_model(hw: dict, shape, tp: int = 1) -> StepTimeModel:
    """The linear StepTimeModel of ``shape`` from hardware coefficients ``hw``."""
    return StepTimeModel(base={"const": 0.0, **coefficients(hw, shape, tp)})


def design(F, shape, tp: int = 1) -> np.ndarray:
    """Step features ``F`` (rows x ``FEATURES``) -> the hardware design matrix (rows x
    ``HW_TERMS``): step time = design @ h."""
    return np.asarray(F, float) @ counts(shape, tp).T


# -- a GPU prior from datasheet numbers ---------------------------------------------------------
#: Software constants of vLLM V1 (0.8.x) on a datacentre GPU, not fitted to any run: per-step
#: CPU work (scheduler, input preparation, sampler; vLLM's own profiles put it at 2-5 ms with
#: a few hundred sequences), a kernel launch (~5 us; a layer launches ~10 kernels without
#: CUDA graphs) and the Triton LoRA kernels' cost per active adapter and call (~2.5 us: a
#: program wave per adapter; NOTE: of the same order as, and chosen knowing, the 2.4 us that
#: the Llama-3.1-8B/H100 calibration implies, the only GPU LoRA measurement we have; a prior
#: for that model is not independent of it in this one term, see experiments/README_generality.md).
GPU_SOFTWARE = {
    "step_s": 3.0e-3,
    "layer_s": 10 * 5.0e-6,
    "decode_seq_layer_s": 0.0,
    "prefill_seq_layer_s": 0.0,
    "sample_s_per_vocab": 0.0,
    "lora_call_s": 2 * 5.0e-6,          # shrink + expand launch per packed module
    "slot_call_s": 0.0,
    "adapter_call_s": 2.5e-6,
    "idle_s": 0.0,
}


def gpu_prior(gpu: dict, *, bandwidth_efficiency: float = 0.8, flops_efficiency: float = 0.6,
              software: dict | None = None) -> dict:
    """Hardware coefficients from a GPU's datasheet numbers (``hbm_bytes_per_s`` and
    ``flops_per_s`` peak, ``interconnect_bytes_per_s`` optional) times typical achieved
    fractions, plus the software constants ``GPU_SOFTWARE``. No run of any model."""
    bw = float(gpu["hbm_bytes_per_s"]) * bandwidth_efficiency
    fl = float(gpu["flops_per_s"]) * flops_efficiency
    hw = dict(GPU_SOFTWARE if software is None else software)
    hw.update(weight_s_per_byte=1 / bw, kv_s_per_byte=1 / bw, adapter_s_per_byte=1 / bw,
              act_s_per_byte=1 / bw, dense_s_per_flop=1 / fl, attn_s_per_flop=1 / fl,
              lora_s_per_flop=1 / fl)
    if gpu.get("interconnect_bytes_per_s"):
        hw["allreduce_s_per_byte"] = 1 / (0.7 * float(gpu["interconnect_bytes_per_s"]))
        hw["allreduce_call_s"] = 10e-6
    return hw


def save_calibration(hw: dict, path, **info) -> Path:
    """A GPU/CPU calibration file: ``{"schema": "twin.hardware/1", "hardware": {...}, ...}``."""
    path = Path(path)
    path.write_text(json.dumps({"schema": "twin.hardware/1", "hardware": dict(hw), **info},
                               indent=2) + "\n")
    return path


def load_calibration(path) -> dict:
    """The hardware coefficients of a calibration file written by :func:`save_calibration`."""
    from twin.errors import TwinInputError

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TwinInputError(f"cannot read a hardware calibration: {exc}", file=str(path)) from None
    if not isinstance(d, dict) or d.get("schema") != "twin.hardware/1":
        raise TwinInputError("expected schema 'twin.hardware/1'", file=str(path), field="schema")
    hw = d.get("hardware")
    if not isinstance(hw, dict):
        raise TwinInputError("expected an object of hardware coefficients", file=str(path),
                             field="hardware")
    for k, v in hw.items():
        if k not in HW_TERMS:
            raise TwinInputError(f"unknown hardware term; known: {', '.join(HW_TERMS)}",
                                 file=str(path), field=f"hardware.{k}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            raise TwinInputError(f"expected a non-negative number, got {v!r}", file=str(path),
                                 field=f"hardware.{k}")
    return {k: float(v) for k, v in hw.items()}


def shape_from_hf_config(cfg, name: str | None = None, dtype_bytes: int = 2):
    """A ModelShape from an HF ``config.json`` (dict or path) of a dense decoder (Llama,
    Qwen2, Mistral: GQA, tied or untied embeddings, q/k/v biases counted when the
    architecture has them). Interim helper of the hardware experiments; ``twin profile``'s
    model-config parser replaces it."""
    from twin.costs.profile import ModelShape

    if not isinstance(cfg, dict):
        p = Path(cfg)
        name = name or p.stem
        cfg = json.loads(p.read_text())
    h, L = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kvh = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    i, v = int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    q, kv = heads * hd, kvh * hd
    bias = (q + 2 * kv) if (cfg.get("attention_bias") or cfg.get("model_type") == "qwen2") else 0
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + bias
    params = L * per_layer + v * h * (1 if tied else 2) + h
    return ModelShape(name=name or cfg.get("_name_or_path", "model"), layers=L, hidden=h,
                      heads=heads, kv_heads=kvh, head_dim=hd, intermediate=i, vocab=v,
                      dtype_bytes=dtype_bytes, params=float(params), tie_word_embeddings=tied,
                      max_position_embeddings=cfg.get("max_position_embeddings"))

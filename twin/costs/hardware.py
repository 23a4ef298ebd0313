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
allreduce_s_per_byte      tensor parallel: bytes a ring all-reduce sends per token (2 per
                          layer, 2(N-1)/N of the hidden state each)
allreduce_call_s          tensor parallel: all-reduce launches (2 per layer and step)
gemm_scale                a multiplier on the dense GEMM time of a measured GEMM table
                          (``twin.costs.gemm``: per layer qkv, o, gate_up, down at the
                          step's tokens, the lm_head at its logits rows, each at the rate
                          the machine reaches at that size); with a table the fit uses it
                          instead of the flat ``dense_s_per_flop``; without one it is 0
========================  =============================================================

Counts use :class:`twin.costs.profile.ModelShape` only (``dtype_bytes`` is the weight and
KV dtype); a hardware dict names its terms as above, missing ones are 0.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from twin.costs.gemm import GemmTable, dense_curves
from twin.costs.gpus import effective, get_gpu
from twin.costs.memory import GIB
from twin.costs.profile import Profile
from twin.costs.step_time import FEATURES, Curve, StepTimeModel
from twin.errors import TwinInputError
from twin.outputs import json_document, staged_file

HW_TERMS = (
    "step_s", "layer_s", "weight_s_per_byte", "dense_s_per_flop", "act_s_per_byte",
    "attn_s_per_flop", "kv_s_per_byte", "decode_seq_layer_s", "prefill_seq_layer_s",
    "sample_s_per_vocab", "lora_s_per_flop", "adapter_s_per_byte", "adapter_call_s",
    "slot_call_s", "lora_call_s", "idle_s", "idle_s_per_byte", "allreduce_s_per_byte",
    "allreduce_call_s", "gemm_scale",
)
LORA_CALLS_PER_LAYER = 4   # qkv, o, gate_up, down: vLLM's packed LoRA modules
_F = {k: i for i, k in enumerate(FEATURES)}


def per_rank(shape, tp: int = 1) -> dict:
    """Widths on one of ``tp`` tensor-parallel ranks: q, KV and intermediate outputs. vLLM's
    QKVParallelLinear splits KV heads when there are at least ``tp`` of them and otherwise
    gives every rank one replicated head (``num_kv_heads = 1``, ``num_kv_head_replicas =
    tp // total_num_kv_heads``); its KV cache holds ``max(1, kv_heads // tp)`` heads a rank
    (``ModelConfig.get_num_kv_heads``)."""
    return dict(q=shape.heads // tp * shape.head_dim,
                kv=max(1, shape.kv_heads // tp) * shape.head_dim,
                inter=shape.intermediate // tp)


def linear_params(shape, tp: int = 1) -> float:
    """Parameters of the linear layers of all decoder layers (no embeddings, no lm_head) on
    one of ``tp`` ranks (KV heads replicated when fewer than ``tp``: :func:`per_rank`)."""
    w, h = per_rank(shape, tp), shape.hidden
    return float(shape.layers * (h * (w["q"] + 2 * w["kv"]) + w["q"] * h + 3 * h * w["inter"]))


def layer_gemms(shape, tp: int = 1) -> list[tuple[int, float]]:
    """(k, n) of one decoder layer's GEMMs on one of ``tp`` ranks as the executor and vLLM
    pack them: qkv, o, gate_up, down (column-parallel ones split n, row-parallel ones k)."""
    w, h = per_rank(shape, tp), shape.hidden
    return [(h, w["q"] + 2 * w["kv"]), (w["q"], h), (h, 2 * w["inter"]), (w["inter"], h)]


def gemm_curves(table: GemmTable, shape, tp: int = 1, scale: float = 1.0) -> list[Curve]:
    """The dense GEMM time of a step of ``shape`` from ``table``, times ``scale``, as
    StepTimeModel curves: the layers' GEMMs at the step's tokens, the lm_head's at its
    logits rows (:func:`twin.costs.gemm.dense_curves`)."""
    curves = dense_curves(table, layer_gemms(shape, tp), shape.layers,
                          (shape.hidden, shape.vocab / tp))
    return [Curve(c["features"], c["x"], [scale * v for v in c["s"]]) for c in curves]


def rank_weight_bytes(shape, tp: int = 1, quantization: str | None = None) -> float:
    """Bytes of weights on one of ``tp`` ranks: its linear layers (:func:`linear_params`;
    one byte each with ``quantization="fp8"``) and ``1/tp`` of the rest (embeddings,
    lm_head, norms) in the model dtype."""
    rest = (shape.params - linear_params(shape)) if shape.params else \
        shape.vocab * shape.hidden * (1 if shape.tie_word_embeddings else 2)
    lin_b = 1 if quantization == "fp8" else shape.dtype_bytes
    return linear_params(shape, tp) * lin_b + rest / tp * shape.dtype_bytes


def counts(shape, tp: int = 1, *, weight_bytes: float | None = None,
           kv_dtype_bytes: int | None = None) -> np.ndarray:
    """``N[j, k]``: units of hardware term ``HW_TERMS[j]`` per unit of step feature
    ``FEATURES[k]`` for a model of ``shape`` on ``tp`` tensor-parallel ranks (weights,
    heads, FLOPs and KV split as vLLM's column/row-parallel layers split them: KV heads
    evenly, or one replicated head a rank when there are fewer than ``tp``).
    ``weight_bytes``: the bytes of weights on one rank when they are not the linear layers
    on a rank plus ``1/tp`` of the rest (FP8 linear layers:
    ``twin.costs.first_principles.weight_bytes``);
    ``kv_dtype_bytes``: the KV cache's element size when it is not the model's (FP8 KV)."""
    tp = int(tp)
    N = np.zeros((len(HW_TERMS), len(FEATURES)))
    L, h, v, db = shape.layers, shape.hidden, shape.vocab, shape.dtype_bytes
    w = per_rank(shape, tp)
    q, kv = w["q"], w["kv"]
    lin = linear_params(shape, tp)
    head_flops = 2.0 * v * h / tp                     # lm_head: one logits row
    weights = weight_bytes if weight_bytes is not None else rank_weight_bytes(shape, tp)
    calls = LORA_CALLS_PER_LAYER * L

    def put(term, feature, value):
        N[HW_TERMS.index(term), _F[feature]] += value

    put("step_s", "const", 1.0)
    put("layer_s", "const", L)
    put("weight_s_per_byte", "const", weights)
    for f in ("prefill_tokens", "decode_tokens"):
        put("dense_s_per_flop", f, 2.0 * lin)
        put("act_s_per_byte", f, L * (6 * h / tp + q + 2 * kv + 3 * w["inter"]) * db)
    put("dense_s_per_flop", "decode_tokens", head_flops)
    put("dense_s_per_flop", "prefill_seqs", head_flops)
    put("attn_s_per_flop", "decode_context", 4.0 * L * q)
    put("attn_s_per_flop", "prefill_context", 2.0 * L * q)
    put("kv_s_per_byte", "decode_context", 2.0 * L * kv * (kv_dtype_bytes or db))
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
            put("allreduce_s_per_byte", f, 2.0 * L * 2.0 * (tp - 1) / tp * h * db)
        put("allreduce_call_s", "const", 2.0 * L)
    return N


def as_vector(hw: dict) -> np.ndarray:
    unknown = set(hw) - set(HW_TERMS)
    if unknown:
        raise ValueError(f"unknown hardware term(s) {sorted(unknown)}; known: {HW_TERMS}")
    return np.array([float(hw.get(k, 0.0)) for k in HW_TERMS])


def coefficients(hw: dict, shape, tp: int = 1, **kw) -> dict:
    """Step-time coefficients (by feature) of ``shape`` on the machine ``hw`` describes
    (``kw``: :func:`counts`' overrides); the linear part: ``gemm_scale`` prices curves
    (:func:`step_time_model`)."""
    c = as_vector(hw) @ counts(shape, tp, **kw)
    return {k: float(v) for k, v in zip(FEATURES, c) if v}


def step_time_model(hw: dict, shape, tp: int = 1, gemm: GemmTable | None = None,
                    **kw) -> StepTimeModel:
    """The StepTimeModel of ``shape`` from hardware coefficients ``hw``: linear, plus the
    dense GEMM curves of ``gemm`` times ``hw["gemm_scale"]`` when both are given."""
    scale = float(hw.get("gemm_scale", 0.0))
    curves = gemm_curves(gemm, shape, tp, scale) if gemm is not None and scale > 0 else None
    return StepTimeModel(base={"const": 0.0, **coefficients(hw, shape, tp, **kw)}, curves=curves)


def design(F, shape, tp: int = 1, gemm: GemmTable | None = None) -> np.ndarray:
    """Step features ``F`` (rows x ``FEATURES``) -> the hardware design matrix (rows x
    ``HW_TERMS``): step time = design @ h. With a GEMM table the ``gemm_scale`` column is
    each step's dense GEMM seconds from it (else 0)."""
    F = np.asarray(F, float)
    X = F @ counts(shape, tp).T
    if gemm is not None:
        curves = gemm_curves(gemm, shape, tp)
        X[:, HW_TERMS.index("gemm_scale")] = [sum(c(f) for c in curves) for f in F]
    return X


# -- a GPU prior from the catalogue's datasheet numbers ---------------------------------------
#: Software constants of vLLM V1 (0.8.x) on a datacentre GPU, not fitted to any run: per-step
#: CPU work (scheduler, input preparation, sampler; vLLM's own profiles put it at 2-5 ms with
#: a few hundred sequences), a kernel launch (~5 us; a layer launches ~10 kernels without
#: CUDA graphs) and one all-reduce's latency (NCCL / vLLM's custom all-reduce on NVLink, small
#: messages). LoRA (vLLM's source, ``lora/ops/triton_ops``): every packed module (qkv, o,
#: gate_up, down) runs two Triton kernels, ``lora_shrink`` then ``lora_expand``, whose grids
#: give each active adapter its own programs; ``lora_call_s`` is their two launches a module,
#: ``adapter_call_s`` an active adapter's programs in both (2 x ~2.5 us a kernel: a program
#: wave per adapter). NOTE: 2.5 us per adapter and kernel is of the same order as, and was
#: chosen knowing, the 2.4 us that the Llama-3.1-8B/H100 calibration (fitted on the
#: digital_twin_modelling runs) implies, the only GPU LoRA measurement we have; a prior for that
#: model is not independent of it in this one term (experiments/README_generality.md reports
#: the prior without it). Until issue 14's follow-up the code counted one kernel per module
#: (2.5 us a module, half the cost the comment above describes).
GPU_SOFTWARE = {
    "step_s": 3.0e-3,
    "layer_s": 10 * 5.0e-6,
    "decode_seq_layer_s": 0.0,
    "prefill_seq_layer_s": 0.0,
    "sample_s_per_vocab": 0.0,
    "lora_call_s": 2 * 5.0e-6,          # shrink + expand launch per packed module
    "slot_call_s": 0.0,
    "adapter_call_s": 2 * 2.5e-6,       # shrink + expand programs per adapter and module
    "idle_s": 0.0,
    "allreduce_call_s": 1.0e-5,
}

#: Throughput of vLLM with LoRA enabled over without, saturated, one adapter: 3656.98 /
#: 5509.93 total tokens/s (Llama-2-7B, 1 x A100, ShareGPT, ``benchmark_throughput.py``, rank 8,
#: max_loras 1; 3664.67 with max_loras 4), measured by a vLLM maintainer in vLLM PR #11267
#: (github.com/vllm-project/vllm/pull/11267, Dec 2024). At saturation a step is its token
#: work, so the LoRA-wrapped layers (the base GEMM, then shrink/expand reading the input and
#: read-modify-writing the output of every linear layer) do a token's dense work at 0.664 of
#: the base efficiency: the prior's FLOP rate for LoRA serving. Caveats: another GPU and
#: model, vLLM 0.6-era Triton kernels (0.8's V1 kernels are their successors); the measured
#: slowdown includes the per-step LoRA launches and one adapter's kernel cost (a few percent
#: of a saturated step), not subtracted. Not fitted to any run in shared/data.
LORA_TOKEN_EFFICIENCY = 3656.98 / 5509.93


def gpu_prior(gpu, *, fp8: bool = False, software: dict | None = None,
              lora: bool = True) -> dict:
    """Hardware coefficients of ``gpu`` (a :mod:`twin.costs.gpus` catalogue name or an entry
    of its form) with no run of any model: the catalogue's one derating rule
    (:func:`twin.costs.gpus.effective`: effective HBM bandwidth, FLOP rate at the weights'
    dtype, link bandwidth) for the byte, FLOP and all-reduce terms, plus the software
    constants ``GPU_SOFTWARE``; ``lora`` (a server with ``enable_lora``, the twin's case):
    dense FLOPs at ``LORA_TOKEN_EFFICIENCY`` of that rate. ``fp8`` weights speed up the
    dense GEMMs only: attention (over a bf16 KV cache) and the LoRA kernels (bf16 adapter
    weights) run at the bf16 rate, as in vLLM."""
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    bw, fl, link = effective(gpu, fp8=fp8)
    fl16 = effective(gpu, fp8=False)[1] if fp8 else fl
    hw = dict(GPU_SOFTWARE if software is None else software)
    dense = fl * (LORA_TOKEN_EFFICIENCY if lora else 1.0)
    hw.update(weight_s_per_byte=1 / bw, kv_s_per_byte=1 / bw, adapter_s_per_byte=1 / bw,
              act_s_per_byte=1 / bw, dense_s_per_flop=1 / dense, attn_s_per_flop=1 / fl16,
              lora_s_per_flop=1 / fl16, allreduce_s_per_byte=1 / link)
    return hw


def calibration_path(profile_path) -> Path:
    """Where ``twin calibrate --executor --out P.json`` writes its machine's hardware
    coefficients: ``P.hardware.json`` next to the profile."""
    profile_path = Path(profile_path)
    stem = profile_path.name[:-5] if profile_path.name.endswith(".json") else profile_path.name
    return profile_path.with_name(stem + ".hardware.json")


def save_calibration(hw: dict, path, gemm: GemmTable | None = None, **info) -> Path:
    """A GPU/CPU calibration file: ``{"schema": "twin.hardware/1", "hardware": {...}, ...}``
    (``gemm``: the machine's measured GEMM table, which ``gemm_scale`` multiplies; ``info``:
    what it was fitted on; ``profile``: the profile written with it, relative to the file,
    which ``twin profile --gpu-calibration`` takes memory and load times from; ``machine``:
    that profile's hardware section, by which it checks flags naming another machine)."""
    path = Path(path)
    extra = {"gemm": gemm.to_dict()} if gemm is not None else {}
    # atomically, and only over a previous calibration file (twin.outputs' rule for --out)
    with staged_file(path, "hardware") as tmp:
        tmp.write_text(json_document({"schema": "twin.hardware/1", "hardware": dict(hw),
                                      **extra, **info}, indent=2) + "\n")
    return path


def read_calibration(path) -> tuple[dict, dict]:
    """``(hardware coefficients, the file's other fields)`` of a calibration file written by
    :func:`save_calibration`; a malformed one is a TwinInputError naming the field."""
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
    info = {k: v for k, v in d.items() if k not in ("schema", "hardware")}
    if "gemm" in info:
        try:
            info["gemm"] = GemmTable.from_dict(info["gemm"])
        except (TypeError, ValueError, KeyError) as exc:
            raise TwinInputError(f"expected a GEMM table {{m, k, n, seconds}}: {exc}",
                                 file=str(path), field="gemm") from None
    elif hw.get("gemm_scale"):
        raise TwinInputError("gemm_scale multiplies a GEMM table; the file has none",
                             file=str(path), field="hardware.gemm_scale")
    return {k: float(v) for k, v in hw.items()}, info


def load_calibration(path) -> dict:
    """The hardware coefficients of a calibration file (:func:`read_calibration`)."""
    return read_calibration(path)[0]


#: :func:`derive_profile`'s default engine dtypes: the base profile's
SAME = "same as the base profile"


def derive_profile(base, shape, hw: dict, *, name: str | None = None, memory=None, tp: int = 1,
                   provenance: dict | None = None, gemm: GemmTable | None = None,
                   quantization: str | None = SAME, kv_cache_dtype: str = SAME,
                   lora_buffers: dict | None = None):
    """A Profile of ``shape`` on ``base``'s machine: step time from the hardware coefficients
    ``hw`` (and the machine's GEMM table ``gemm``, if it has one) with the weights and KV
    bytes of ``quantization`` / ``kv_cache_dtype`` ("fp8": one byte; the FLOP rate stays
    the calibrated one; ``SAME``: the base profile's); load time per byte from ``base``
    (adapter bytes come from the new shape); ``memory`` as given, else ``base``'s rescaled to the new shape on ``tp`` ranks:
    weights, KV bytes per token, LoRA slot buffers (``lora_buffers``, this shape's as
    ``twin.costs.first_principles.lora_buffers`` lists them; None: the base's bytes per
    slot and rank rescaled, the linear form) and sampler bytes."""
    if quantization == SAME:
        quantization = base.hardware.get("quantization")
    if kv_cache_dtype == SAME:
        kv_cache_dtype = base.hardware.get("kv_cache_dtype") or "auto"
    wbytes = rank_weight_bytes(shape, tp, quantization)
    kv_b = 1 if kv_cache_dtype == "fp8" else shape.dtype_bytes
    if memory is None:
        b = base.memory
        ratio = shape.lora_elems_per_rank / max(base.model.lora_elems_per_rank, 1)
        dtype = shape.dtype_bytes / base.model.dtype_bytes / tp
        memory = replace(b, weights_gib=wbytes / GIB,
                         kv_bytes_per_token=2 * shape.layers * per_rank(shape, tp)["kv"] * kv_b,
                         lora_bytes_per_slot_rank=b.lora_bytes_per_slot_rank * ratio * dtype,
                         lora_bytes_per_slot=b.lora_bytes_per_slot * shape.hidden
                         / base.model.hidden * dtype, lora_buffers=lora_buffers,
                         activation_bytes_per_seq=b.activation_bytes_per_seq
                         * shape.vocab / base.model.vocab)
    prov = {"method": "hardware coefficients x model-shape counts (twin.costs.hardware)",
            "hardware_profile": base.name, "hardware": dict(hw), "fitted": False,
            "tensor_parallel_size": tp, **(provenance or {})}
    hardware = dict(base.hardware, tensor_parallel_size=tp, quantization=quantization,
                    kv_cache_dtype=kv_cache_dtype)
    step = step_time_model(hw, shape, tp, gemm, weight_bytes=wbytes, kv_dtype_bytes=kv_b)
    return Profile(name=name or f"{shape.name}-from-{base.name}", hardware=hardware,
                   model=shape, memory=memory, step_time=step, load_time=base.load_time,
                   provenance=prov, frontend=base.frontend)

"""A profile from first principles, so the twin runs before any calibration — for any model
shape (:mod:`twin.costs.model_config`), GPU (:mod:`twin.costs.gpus`), tensor-parallel size
and dtype. ``twin profile`` is the command; the shipped
``llama31-8b-h100-64gb-first-principles`` profile is this module's memory model for
Llama-3.1-8B on the 64 GB H100 with the roofline step time it used before the hardware prior
(kept: other tests pin its verdicts; experiments/README_generality.md compares the two).

Memory, per GPU, as vLLM 0.8.x sizes it at start-up:

- weights: the linear layers split across the tensor-parallel group (q/k/v, gate/up column
  parallel, o/down row parallel; with fewer KV heads than GPUs each GPU holds one replicated
  KV head), embeddings and lm_head split over the vocabulary, norms and biases replicated;
  FP8 (``quantization="fp8"``) stores the linear layers in one byte, the rest in 16 bits;
  plus the rotary cos/sin cache (``max_position_embeddings × head_dim`` in the model dtype)
  and, for models with embedding LoRA, the 256 extra-vocabulary rows;
- LoRA slot buffers tensor by tensor (:func:`lora_buffers`) as vLLM allocates them, with
  A of a column-parallel layer and B of a row-parallel layer whole on every GPU and the other
  side split (vLLM's default ``fully_sharded_loras=False``); the caching allocator's segments
  are replayed over them (:func:`twin.costs.memory.reserved_bytes`);
- the start-up profile's peak: non-torch memory (CUDA context, cuBLAS workspace) — the one
  *fitted* memory constant, ``NON_TORCH_GIB``, fitted on the measured H100 Llama-3.1-8B table
  — plus the sampler's fp32 logits/probabilities/log-probabilities per sequence and forward
  activations per batched token (first principles);
- KV cache per token: ``2 × layers × KV heads per GPU × head_dim × KV dtype bytes``.

Step time: the hardware prior (:func:`twin.costs.hardware.gpu_prior`: the catalogue's rates
derated by :func:`twin.costs.gpus.effective`, dense FLOPs at vLLM's measured LoRA efficiency
(:data:`twin.costs.hardware.LORA_TOKEN_EFFICIENCY`), plus vLLM's software constants per step,
layer and LoRA kernel call) times the counts of this shape (:func:`twin.costs.hardware.counts`:
weights, KV and adapter bytes read, dense/attention/LoRA FLOPs, layers, LoRA calls and, with
tensor parallelism, two ring all-reduces of the hidden state per decoder layer), summed
rather than a roofline's max. On the held-out H100 runs it is closer to vLLM than the
roofline it replaced (experiments/README_generality.md). They are assumptions written into
the profile's provenance and replaced by ``twin calibrate``.
"""

from __future__ import annotations

import sys

from twin.costs.gpus import effective, get_gpu, tp_link
from twin.costs.hardware import gpu_prior, per_rank, step_time_model
from twin.costs.load_time import LoadTimeModel
from twin.costs.memory import GIB, MemoryModel
from twin.costs.model_config import BUILTIN, model_shape
from twin.costs.profile import ModelShape, Profile
from twin.errors import TwinInputError

LLAMA31_8B = model_shape(BUILTIN["llama-3.1-8b"], "built-in:llama-3.1-8b",
                         name="Llama-3.1-8B-Instruct")

LORA_EXTRA_VOCAB = 256      # vLLM's lora_extra_vocab_size default
LORA_VOCAB_PADDING = 256    # vLLM's lora_vocab_padding_size

# fitted on shared/data/vllm-h100/kv_cache_tokens_llama31_8b.csv (the only measured table):
# the start-up peak left after the first-principles terms (the probes' max_num_seqs and
# max_num_batched_tokens taken as 2048, as twin calibrate assumes). Over the 36 probes it
# lies in 1.260-1.292 GiB; 1.278 minimises the worst relative KV-capacity error (0.09%).
# Before the allocator was modelled, the same constant absorbed 0.43 GiB swings.
NON_TORCH_GIB = 1.278
# assumptions (not fitted): load bandwidths (the step time's are twin.costs.hardware's)
HOST_TO_GPU_BYTES_PER_S = 2.5e10
DISK_BYTES_PER_S = 1.5e9

DTYPES = {"auto": 2, "bfloat16": 2, "float16": 2, "half": 2}
KV_CACHE_DTYPES = {"auto": None, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
QUANTIZATIONS = (None, "fp8")


def check_tensor_parallel(model: ModelShape, tp: int) -> None:
    """vLLM's own checks: attention heads (and the intermediate size) divide across the
    group; KV heads divide it or it divides them (then heads are replicated)."""
    if tp < 1:
        raise TwinInputError(f"expected a positive integer, got {tp}",
                             field="--tensor-parallel-size")
    for what, n in (("num_attention_heads", model.heads), ("intermediate_size", model.intermediate)):
        if n % tp:
            raise TwinInputError(f"{what} ({n}) must be divisible by tensor_parallel_size ({tp}) "
                                 f"(vLLM refuses it)", field="--tensor-parallel-size")
    if model.kv_heads % tp and tp % model.kv_heads:
        raise TwinInputError(f"num_key_value_heads ({model.kv_heads}) and tensor_parallel_size "
                             f"({tp}) must divide one another", field="--tensor-parallel-size")


def lora_buffers(model: ModelShape, tp: int = 1) -> dict:
    """vLLM's LoRA slot buffers on one GPU, in allocation order, each as (bytes per slot per
    unit of max_lora_rank, bytes per slot): embed_tokens (extra-vocab embeddings, A over the
    vocabulary, B), per layer qkv_proj (A slices, then B slices), o_proj, gate_up_proj,
    down_proj, then lm_head's (A, B over the padded vocabulary, extra-vocab logits in fp32:
    LogitsProcessorWithLoRA fills its -inf tensor without a dtype)."""
    b, h = model.dtype_bytes, model.hidden
    w = per_rank(model, tp)
    q, kv, i = w["q"], w["kv"], w["inter"]
    r = lambda n: [float(n * b), 0.0]   # noqa: E731 - n elements per unit of rank
    if model.lora_fused_modules:        # Phi-3: one slice for qkv_proj and for gate_up_proj
        layer = [r(h), r(q + 2 * kv), r(q), r(h),
                 r(h), r(2 * i), r(i), r(h)]
    else:
        layer = [r(h), r(h), r(h), r(q), r(kv), r(kv), r(q), r(h),
                 r(h), r(h), r(i), r(i), r(i), r(h)]
    head, tail = [], []
    if model.lora_embeddings:
        vocab = model.vocab + LORA_EXTRA_VOCAB
        padded = -(-vocab // LORA_VOCAB_PADDING) * LORA_VOCAB_PADDING
        head = [[0.0, float(LORA_EXTRA_VOCAB * h * b)], r(vocab), r(h)]
        tail = [r(h), r(padded), [0.0, float(LORA_EXTRA_VOCAB * h * 4)]]
    return {"head": head, "layer": layer, "layers": model.layers, "tail": tail}


def weight_bytes(model: ModelShape, tp: int = 1, quantization: str | None = None) -> float:
    """Bytes of weights on one GPU (see the module docstring)."""
    b, h, L = model.dtype_bytes, model.hidden, model.layers
    full_q = model.heads * model.head_dim
    full_kv = model.kv_heads * model.head_dim
    linear_full = L * (h * (full_q + 2 * full_kv) + full_q * h + 3 * h * model.intermediate)
    emb = model.vocab * h * (1 if model.tie_word_embeddings else 2)
    other = max(0.0, model.params - linear_full - emb)      # norms, biases: replicated
    w = per_rank(model, tp)
    linear = L * (h * (w["q"] + 2 * w["kv"]) + w["q"] * h + 3 * h * w["inter"])
    lin_b = 1 if quantization == "fp8" else b
    extra = LORA_EXTRA_VOCAB * h * (1 if model.tie_word_embeddings else 2) \
        if model.lora_embeddings else 0
    rope = (model.max_position_embeddings or 0) * model.head_dim * b
    return linear * lin_b + (emb + extra) / tp * b + other * b + rope


def build_profile(model: ModelShape = LLAMA31_8B, gpu: dict | str = "h100-64gb", *,
                  tensor_parallel_size: int = 1, quantization: str | None = None,
                  kv_cache_dtype: str = "auto", name: str | None = None) -> Profile:
    """The first-principles profile of ``model`` on one GPU of a ``tensor_parallel_size``
    group of ``gpu`` (a catalogue name or an entry of :data:`twin.costs.gpus.GPUS`' form)."""
    tp = int(tensor_parallel_size)
    hw = tp_link(get_gpu(gpu) if isinstance(gpu, str) else dict(gpu), tp)
    check_tensor_parallel(model, tp)
    if quantization not in QUANTIZATIONS:
        raise TwinInputError(f"unsupported quantization {quantization!r}; supported: fp8",
                             field="--quantization")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise TwinInputError(f"unsupported kv_cache_dtype {kv_cache_dtype!r}; supported: "
                             f"{', '.join(KV_CACHE_DTYPES)}", field="--kv-cache-dtype")
    kv_b = KV_CACHE_DTYPES[kv_cache_dtype] or model.dtype_bytes
    w = per_rank(model, tp)
    h, L = model.hidden, model.layers
    buffers = lora_buffers(model, tp)
    lora_per_rank = sum(a for part in ("head", "tail") for a, _ in buffers[part]) + \
        L * sum(a for a, _ in buffers["layer"])
    per_slot = sum(s for part in ("head", "tail") for _, s in buffers[part]) + \
        L * sum(s for _, s in buffers["layer"])
    wbytes = weight_bytes(model, tp, quantization)
    kv_per_token = 2 * L * w["kv"] * kv_b
    act_per_token = (h * 3 + w["q"] + 2 * w["kv"] + 3 * w["inter"]) * model.dtype_bytes
    memory = MemoryModel(
        gpu_memory_gib=hw["memory_gib"], weights_gib=wbytes / GIB,
        kv_bytes_per_token=kv_per_token, lora_bytes_per_slot_rank=lora_per_rank,
        lora_bytes_per_slot=per_slot, activation_gib=NON_TORCH_GIB,
        activation_bytes_per_seq=3 * model.vocab * 4, activation_bytes_per_token=act_per_token,
        lora_buffers=buffers)

    fp8 = quantization == "fp8"
    bw, fl, link = effective(hw, fp8=fp8)
    prior = gpu_prior(hw, fp8=fp8)
    step = step_time_model(prior, model, tp, weight_bytes=wbytes, kv_dtype_bytes=kv_b)
    load = LoadTimeModel(disk_s=0.03, disk_s_per_byte=1 / DISK_BYTES_PER_S,
                         host_to_gpu_s=3.0e-3, host_to_gpu_s_per_byte=1 / HOST_TO_GPU_BYTES_PER_S)
    hardware = dict(hw, tensor_parallel_size=tp, quantization=quantization,
                    kv_cache_dtype=kv_cache_dtype, effective_hbm_bytes_per_s=bw,
                    effective_flops_per_s=fl, effective_link_bytes_per_s=link,
                    step_time_prior=prior, non_torch_gib=NON_TORCH_GIB,
                    host_to_gpu_bytes_per_s=HOST_TO_GPU_BYTES_PER_S,
                    disk_bytes_per_s=DISK_BYTES_PER_S)
    if name is None:
        name = "-".join([model.name.lower(), hw.get("key", "gpu")]
                        + ([f"tp{tp}"] if tp > 1 else []) + (["fp8"] if quantization else [])
                        + (["kv-fp8"] if kv_b == 1 else []) + ["first-principles"])
    return Profile(name=name, hardware=hardware, model=model, memory=memory, step_time=step,
                   load_time=load, provenance={
                       "method": "first principles (twin.costs.first_principles)",
                       "fitted": False,
                       "assumptions": "step time = hardware prior (hardware.step_time_prior: "
                                      "datasheet peak x twin.costs.gpus.DERATE, software "
                                      "constants twin.costs.hardware.GPU_SOFTWARE) x the "
                                      "shape's counts; load bandwidths as in 'hardware'",
                       "fitted_constants": {"non_torch_gib": "fitted to vLLM's start-up KV "
                                            "capacity of Llama-3.1-8B on the 64 GB H100 "
                                            "(shared/data/vllm-h100/kv_cache_tokens_llama31_8b.csv)"}})


if __name__ == "__main__":  # python -m twin.costs.first_principles OUT.json
    out = sys.argv[1] if len(sys.argv) > 1 else "llama31-8b-h100-64gb-first-principles.json"
    print(build_profile(name="llama31-8b-h100-64gb-first-principles").save(out))

"""A profile from first principles, so the twin runs before any calibration.

Memory: weights = params × dtype bytes; LoRA slot buffers as vLLM allocates them (A and B
padded to ``max_lora_rank`` on q,k,v,o,gate,up,down, plus embedding and lm_head buffers
over the vocabulary, plus the extra-vocabulary embeddings); activation peak of the
profiling run = CUDA context and graphs (a constant) + sampler tensors (fp32 logits,
probabilities and log-probabilities per scheduled sequence) + forward activations per
batched token. Step time: a roofline — weights, KV and adapter weights read from HBM vs
dense and attention FLOPs — plus a fixed per-step CPU overhead.

The hardware numbers are effective rates, not datasheet peaks; they are assumptions
written into the profile's provenance and replaced by ``twin calibrate``.
"""

from __future__ import annotations

from twin.costs.load_time import LoadTimeModel
from twin.costs.memory import GIB, MemoryModel
from twin.costs.profile import ModelShape, Profile
from twin.costs.step_time import StepTimeModel

LLAMA31_8B = ModelShape(name="Llama-3.1-8B-Instruct", layers=32, hidden=4096, heads=32,
                        kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                        dtype_bytes=2, params=8.030261248e9, tie_word_embeddings=False)

H100_64GB = {
    "name": "H100 64 GB (HBM2e, SXM class)",
    "memory_gib": 63.43,            # what torch reports on the GPU of the vLLM runs
    "hbm_bytes_per_s": 1.6e12,      # effective, ~80% of peak
    "flops_per_s": 6.0e14,          # effective dense bf16
    "step_overhead_s": 3.0e-3,      # scheduler, sampler, launches per step
    "host_to_gpu_bytes_per_s": 2.5e10,
    "disk_bytes_per_s": 1.5e9,
    "non_torch_gib": 1.3,           # CUDA context, cuBLAS workspace, CUDA graphs
}

LORA_EXTRA_VOCAB = 256  # vLLM's lora_extra_vocab_size default


def lora_slot_bytes(model: ModelShape) -> tuple[float, float]:
    """(bytes per slot per unit of max_lora_rank, rank-independent bytes per slot)."""
    vocab = model.vocab + LORA_EXTRA_VOCAB
    per_rank = (model.lora_elems_per_rank + 2 * vocab + 2 * model.hidden) * model.dtype_bytes
    # extra-vocabulary embeddings: the embedding's in the model dtype, lm_head's in fp32
    # (LogitsProcessorWithLoRA fills its -inf tensor without a dtype)
    per_slot = LORA_EXTRA_VOCAB * model.hidden * (model.dtype_bytes + 4)
    return float(per_rank), float(per_slot)


def build_profile(model: ModelShape = LLAMA31_8B, hw: dict = H100_64GB,
                  name: str = "llama31-8b-h100-64gb-first-principles") -> Profile:
    per_rank, per_slot = lora_slot_bytes(model)
    weight_bytes = model.params * model.dtype_bytes
    act_per_token = (model.hidden * 3 + (model.heads + 2 * model.kv_heads) * model.head_dim
                     + 3 * model.intermediate) * model.dtype_bytes
    memory = MemoryModel(
        gpu_memory_gib=hw["memory_gib"], weights_gib=weight_bytes / GIB,
        kv_bytes_per_token=model.kv_bytes_per_token, lora_bytes_per_slot_rank=per_rank,
        lora_bytes_per_slot=per_slot, activation_gib=hw["non_torch_gib"],
        activation_bytes_per_seq=3 * model.vocab * 4, activation_bytes_per_token=act_per_token)
    bw, fl = hw["hbm_bytes_per_s"], hw["flops_per_s"]
    dense_flops = 2 * (model.params - model.vocab * model.hidden)   # per token
    attn_flops = 4 * model.layers * model.heads * model.head_dim    # per (query, key) pair
    lora_flops = 2 * model.lora_elems_per_rank                      # per token per rank
    step = StepTimeModel(
        base={"const": hw["step_overhead_s"]},
        memory={"const": weight_bytes / bw,
                "decode_context": model.kv_bytes_per_token / bw,
                "adapter_rank": per_rank / bw},
        compute={"prefill_tokens": dense_flops / fl, "decode_tokens": dense_flops / fl,
                 "decode_context": attn_flops / fl, "prefill_context": attn_flops / 2 / fl,
                 "lora_token_rank": lora_flops / fl},
    )
    load = LoadTimeModel(disk_s=0.03, disk_s_per_byte=1 / hw["disk_bytes_per_s"],
                         host_to_gpu_s=3.0e-3, host_to_gpu_s_per_byte=1 / hw["host_to_gpu_bytes_per_s"])
    return Profile(name=name, hardware=dict(hw), model=model, memory=memory, step_time=step,
                   load_time=load, provenance={
                       "method": "first principles (twin.costs.first_principles)",
                       "assumptions": "effective HBM bandwidth, FLOP rate, per-step overhead, "
                                      "non-torch memory and load bandwidths as in 'hardware'",
                       "fitted": False})


if __name__ == "__main__":  # python -m twin.costs.first_principles OUT.json
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "twin/profiles/llama31-8b-h100-64gb-first-principles.json"
    print(build_profile().save(out))

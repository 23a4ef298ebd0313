"""``twin profile``: a first-principles profile for any supported model, GPU and
tensor-parallel size (:mod:`twin.costs.first_principles`), with no run and no torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twin.argtypes import positive_float, positive_int
from twin.config import ServingConfig
from twin.costs.first_principles import DTYPES, KV_CACHE_DTYPES, build_profile, lora_buffers
from twin.costs.gpus import effective, get_gpu, gpu_key_of, gpu_names, tp_link
from twin.costs.hardware import derive_profile, gpu_prior, read_calibration
from twin.costs.memory import GIB
from twin.costs.model_config import builtin_names, load_model
from twin.costs.profile import load_profile
from twin.errors import TwinInputError
from twin.outputs import input_paths, prepare

_DESCRIPTION = """\
Build a twin profile from first principles: the model's shape (a Hugging Face config.json, a
model directory holding one, or a built-in short name), a GPU of the catalogue (or explicit
numbers), the tensor-parallel size and the dtypes. The profile gives `twin simulate
--profile P.json` vLLM's start-up KV capacity for every max_loras x max_lora_rank (within
0.11% of vLLM 0.8.5 on the measured Llama-3.1-8B/H100 table: weights, LoRA slot buffers as
vLLM allocates them and as PyTorch's caching allocator reserves them, one fitted non-torch
constant) and a step time from the GPU's effective (derated datasheet) rates, the LoRA
slowdown vLLM measured (PR #11267) and vLLM's software constants times the model's counts
(twin.costs.hardware; accuracy: experiments/README_generality.md), plus two all-reduces per
decoder layer priced from the interconnect when --tensor-parallel-size > 1.

With --gpu-calibration HW.json (written by `twin calibrate --executor` next to its profile)
the step time comes from that machine's fitted hardware coefficients instead: a model you
never ran, priced on a machine you calibrated on another model. When the calibration carries
the machine's measured GEMM table (`twin calibrate --executor --gemm`), --model's GEMMs are
priced at the rates that machine reaches at their sizes. The calibration describes the
machine it was measured on (the profile written with it): --gpu must name that GPU (or be left
out: memory and load times from its profile), the rates (--hbm-bandwidth, --flops,
--link-bandwidth) are refused (the fitted coefficients price the step), and other weights than
the calibration's (--quantization fp8, an FP8 checkpoint) rescale its dense FLOP term by the
catalogue's ratio of that GPU's rates (refused on a CPU or a GPU outside the catalogue).

A config.json with a quantization_config is read as vLLM reads it: quant_method fp8 is
--quantization fp8; other methods (AWQ, GPTQ, ...) are refused.

The step time is a prior, not a measurement: calibrate it on your own runs with
`twin calibrate` before trusting latencies.

Models (--model): a config.json, a directory, or one of
  {models}
  (Llama 2/3.x, Mistral, Qwen2/2.5/3 dense, Gemma 2/3, Phi-3 configs are read.)
GPUs (--gpu): {gpus}
  Explicit numbers (--gpu-memory-gib, --hbm-bandwidth, --flops, --link-bandwidth) are
  datasheet peaks, derated like the catalogue's; with all of the first three, --gpu may be
  left out.

examples:
  twin profile --model qwen2.5-7b --gpu a100-80gb --out qwen7b-a100.json
  twin profile --model /models/Llama-3.1-70B-Instruct --gpu h100 --tensor-parallel-size 4 \\
      --quantization fp8 --kv-cache-dtype fp8 --out llama70b-h100x4.json
  twin simulate --profile qwen7b-a100.json --trace my_trace.parquet --max-loras 8 --out runs/q
  twin profile --model qwen2.5-0.5b --gpu-calibration cpu.hardware.json --gpu-memory-gib 8 \\
      --out qwen-cpu.json
"""


def _in_range(low: float, high: float, unit: str, example: str):
    """An argparse ``type=``: a number in [low, high] of ``unit``. The explicit GPU numbers
    are plain bytes, FLOP/s and GiB: a value typed in TB/s, TFLOP/s or bytes is orders of
    magnitude off (``--hbm-bandwidth 3.35`` priced a step at 6e9 s) and refused here."""

    def parse(text: str) -> float:
        v = positive_float(text)
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(
                f"expected {unit} between {low:g} and {high:g} (e.g. {example}), got {text!r}: "
                f"is it in another unit?")
        return v

    return parse


#: the explicit GPU numbers' plausible ranges (CPU budgets to the largest boards)
MEMORY_GIB = _in_range(0.1, 4096, "GiB", "80 for an 80 GB board")
HBM_BYTES_PER_S = _in_range(1e9, 1e14, "bytes/s", "3.35e12 for 3.35 TB/s")
FLOP_PER_S = _in_range(1e10, 1e17, "FLOP/s", "9.89e14 for 989 TFLOP/s")
LINK_BYTES_PER_S = _in_range(1e9, 1e13, "bytes/s", "4.5e11 for 450 GB/s")


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="build a first-principles profile for a model, GPU and TP size",
        description=_DESCRIPTION.format(models=", ".join(builtin_names()),
                                        gpus=", ".join(gpu_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="CONFIG|DIR|NAME",
                   help="config.json, model directory or built-in name (see above)")
    p.add_argument("--gpu", metavar="NAME", help="GPU of the catalogue (see above)")
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="GPUs the model is split across (default: %(default)s); the profile "
                        "describes one of them")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                   help="model dtype (default: %(default)s = the 16-bit dtype)")
    p.add_argument("--quantization", choices=["fp8"],
                   help="fp8: linear-layer weights in FP8 (vLLM --quantization fp8)")
    p.add_argument("--kv-cache-dtype", choices=sorted(KV_CACHE_DTYPES), default="auto",
                   help="KV-cache dtype (default: %(default)s = the model dtype)")
    p.add_argument("--gpu-memory-gib", type=MEMORY_GIB, metavar="GIB",
                   help="GPU memory as the runtime reports it, GiB, 0.1-4096 (overrides the "
                        "catalogue)")
    p.add_argument("--hbm-bandwidth", type=HBM_BYTES_PER_S, metavar="BYTES_PER_S",
                   help="peak memory bandwidth, bytes/s (1e9-1e14), e.g. 3.35e12")
    p.add_argument("--flops", type=FLOP_PER_S, metavar="FLOP_PER_S",
                   help="peak dense tensor FLOP/s at the weights' dtype (1e10-1e17), e.g. 9.89e14")
    p.add_argument("--link-bandwidth", type=LINK_BYTES_PER_S, metavar="BYTES_PER_S",
                   help="GPU-to-GPU bandwidth per direction, bytes/s (1e9-1e13; tensor "
                        "parallelism)")
    p.add_argument("--gpu-calibration", type=Path, metavar="HW.json",
                   help="hardware coefficients of a calibrated machine (written by `twin "
                        "calibrate --executor` next to its profile): the step time of --model "
                        "on that machine, with no run of it (its GEMM table too, if it has one)")
    p.add_argument("--base-profile", metavar="PROFILE",
                   help="with --gpu-calibration and no --gpu: the calibrated machine's profile "
                        "(memory and load times, rescaled to --model; default: the profile "
                        "the calibration was written with)")
    p.add_argument("--name", help="profile name (default: MODEL-GPU[-tpN][-fp8]-first-principles)")
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    p.set_defaults(func=run)
    return p


def _hardware(args) -> dict:
    explicit = (args.gpu_memory_gib, args.hbm_bandwidth, args.flops)
    if args.gpu is None:
        if None in explicit:
            raise TwinInputError("give --gpu NAME, or all of --gpu-memory-gib, --hbm-bandwidth "
                                 "and --flops", field="--gpu")
        gpu = dict(key="custom", name="custom GPU", pcie_bytes_per_s=32e9,
                   link_bytes_per_s=32e9, link="PCIe (assumed)", fp8_flops=None)
    else:
        gpu = get_gpu(args.gpu)
    if args.gpu_memory_gib is not None:
        gpu["memory_gib"] = args.gpu_memory_gib
    if args.hbm_bandwidth is not None:
        gpu["hbm_bytes_per_s"] = args.hbm_bandwidth
    if args.flops is not None:   # the rate of the weights' dtype, whichever it is
        gpu["bf16_flops"] = args.flops
        if args.quantization == "fp8":
            gpu["fp8_flops"] = args.flops
    if args.link_bandwidth is not None:
        gpu["link_bytes_per_s"] = args.link_bandwidth
    if any(v is not None for v in explicit + (args.link_bandwidth,)):
        gpu["overridden"] = [f for f, v in (("memory_gib", args.gpu_memory_gib),
                                            ("hbm_bytes_per_s", args.hbm_bandwidth),
                                            ("flops", args.flops),
                                            ("link_bytes_per_s", args.link_bandwidth))
                             if v is not None]
    return gpu


def _gpu_given(args) -> bool:
    return args.gpu is not None or None not in (args.gpu_memory_gib, args.hbm_bandwidth,
                                                 args.flops)


def _model(args, dtype_bytes: int = 2):
    """--model's shape; ``args.quantization`` becomes the checkpoint's own when its
    config.json has a quantization_config (vLLM detects it: twin.costs.model_config)."""
    shape, args.quantization = load_model(args.model, args.quantization, dtype_bytes)
    return shape


def _is_cpu(machine: dict) -> bool:
    return (str(machine.get("device", "")).startswith("cpu")
            or str(machine.get("name", "")).upper().startswith("CPU"))


def _identity(machine: dict):
    """What two hardware records must share to be one machine: a GPU's catalogue key (else
    its name); any CPU (its thread count may differ between an executor's runs)."""
    return "cpu" if _is_cpu(machine) else gpu_key_of(machine) or machine.get("name")


def _calibrated_machine(args, info: dict) -> tuple[dict | None, str]:
    """(the hardware record of the machine --gpu-calibration was measured on, where it was
    read): the file's ``machine`` where it records one, else the hardware of the profile it
    was written with (its ``profile``, relative to it); (None, "") when it says nothing, or
    names a GPU by a name the catalogue does not know (the executor on CUDA records torch's
    name, "NVIDIA H100 80GB HBM3"): then --gpu says which board it is, as for no record."""
    machine, where = None, ""
    ref = info.get("profile")
    path = Path(args.gpu_calibration).parent / str(ref) if isinstance(ref, str) and ref else None
    if isinstance(info.get("machine"), dict):
        machine, where = info["machine"], str(args.gpu_calibration)
    elif path is not None and path.is_file():
        machine, where = dict(load_profile(path).hardware), str(path)
    if machine is not None and not _is_cpu(machine) and gpu_key_of(machine) is None:
        return None, ""
    return machine, where


def _check_calibration(args, machine: dict | None, where: str) -> None:
    """Refuse the flags that describe another machine than the calibration's: its fitted
    coefficients give the step time, so a profile naming another GPU (or rates it does not
    read) would contradict itself."""
    for flag, v in (("--hbm-bandwidth", args.hbm_bandwidth), ("--flops", args.flops),
                    ("--link-bandwidth", args.link_bandwidth)):
        if v is not None:
            raise TwinInputError(
                f"--gpu-calibration's fitted coefficients give the step time"
                + (f" (machine: {machine.get('name')})" if machine else "") + f"; {flag} would "
                "be recorded in the profile's hardware and price nothing: drop it, or drop "
                "--gpu-calibration to price the step time from the rates",
                file=str(args.gpu_calibration), field=flag)
    if args.gpu is None or machine is None:   # no machine recorded: --gpu says which it is
        return
    gpu, name = get_gpu(args.gpu), machine.get("name", "an unnamed machine")
    if _is_cpu(machine) or gpu_key_of(machine) != gpu["key"]:
        key = gpu_key_of(machine)
        raise TwinInputError(
            f"the calibration was measured on {name}" + (f" ({key})" if key else "")
            + f" ({where}), not on {gpu['name']}: its coefficients price that machine's "
            + "steps, and a profile of --gpu with them would contradict itself; "
            + (f"give --gpu {key} or " if key else "") + "leave --gpu out (--gpu-memory-gib "
            "sets the memory), or calibrate on that GPU", file=str(args.gpu_calibration),
            field="--gpu")


def _requantize(args, hw: dict, machine: dict | None, info: dict, prov: dict) -> dict:
    """``hw`` for --quantization on the calibration's machine: the dense FLOP term rescaled
    by the catalogue's ratio of its FLOP rates at the two weight dtypes (the rule of
    twin.costs.gpus.effective and the GPU prior; 1 on GPUs without FP8 tensor cores, whose
    FP8 weights run at the 16-bit rate); refused where there is no such ratio."""
    was = machine.get("quantization") if machine else None
    if args.quantization == was:
        return hw
    key = gpu_key_of(machine) if machine else (get_gpu(args.gpu)["key"] if args.gpu else None)
    label = (machine or {}).get("name", "its machine")
    if key is None:   # a CPU, a GPU the catalogue does not name, a custom one
        raise TwinInputError(
            f"the calibration was fitted with {was or '16-bit'} weights on {label}, which the "
            f"GPU catalogue does not describe: the twin has no ratio of its FLOP rates to "
            f"price {args.quantization or '16-bit'} weights with (vLLM's FP8 is a GPU "
            "kernel); drop --quantization (or a quantized --model), or calibrate with "
            f"{args.quantization or '16-bit'} weights", file=str(args.gpu_calibration),
            field="--quantization")
    gpu = get_gpu(key)
    factor = effective(gpu, fp8=was == "fp8")[1] / effective(gpu, fp8=args.quantization == "fp8")[1]
    if factor != 1.0 and info.get("gemm") is not None:
        raise TwinInputError(
            f"the calibration's GEMM table was measured with {was or '16-bit'} weights on "
            f"{gpu['name']}: it does not price {args.quantization or '16-bit'} GEMMs; drop "
            "--quantization, or calibrate with those weights", file=str(args.gpu_calibration),
            field="--quantization")
    prov["dense_rate_rescaled"] = {"from": was or "16-bit", "to": args.quantization or "16-bit",
                                   "dense_s_per_flop_factor": factor, "gpu": key}
    return dict(hw, dense_s_per_flop=hw.get("dense_s_per_flop", 0.0) * factor)


def _tp_terms(args, hw: dict, machine: dict | None, prov: dict) -> dict:
    """``hw`` at --tensor-parallel-size > 1 when the calibration measured no all-reduce (one
    GPU: its all-reduce terms 0, which priced every all-reduce as free): those terms from
    the catalogue's link of its GPU (the prior's rule, with :func:`tp_link` for boards that
    bridge only pairs); refused where the machine is no catalogue GPU."""
    tp = args.tensor_parallel_size
    missing = [k for k in ("allreduce_s_per_byte", "allreduce_call_s") if not hw.get(k)]
    if tp <= 1 or not missing:
        return hw
    key = None if machine is None or _is_cpu(machine) else gpu_key_of(machine)
    if key is None:
        raise TwinInputError(
            f"the calibration measured no all-reduce (one device) on "
            f"{(machine or {}).get('name', 'a machine the GPU catalogue does not name')}: "
            f"there is no link to price --tensor-parallel-size {tp} with; calibrate at that "
            "size, or leave it out", file=str(args.gpu_calibration),
            field="--tensor-parallel-size")
    prior = gpu_prior(tp_link(get_gpu(key), tp), fp8=args.quantization == "fp8")
    filled = {k: prior[k] for k in missing}
    prov["allreduce_from_catalogue"] = {"gpu": key, **filled}
    return dict(hw, **filled)


def _from_calibration(args):
    """(profile, machine name) of --model on the machine of --gpu-calibration: step time from
    its hardware coefficients (twin.costs.hardware.derive_profile); memory from --gpu
    (first principles) when given, else from the calibrated machine's own profile."""
    hw, info = read_calibration(args.gpu_calibration)
    machine, where = _calibrated_machine(args, info)
    _check_calibration(args, machine, where)
    tp = args.tensor_parallel_size
    prov = {"gpu_calibration": str(args.gpu_calibration)}
    if machine is None and args.gpu is not None:
        prov["gpu_calibration_machine"] = ("not recorded as a catalogue GPU: taken to be "
                                           f"--gpu {args.gpu} with 16-bit weights")
    if args.gpu is not None:
        shape = _model(args)
        hw = _requantize(args, hw, machine, info, prov)
        gpu = _hardware(args)
        hw = _tp_terms(args, hw, machine or gpu, prov)
        fp = build_profile(shape, gpu, tensor_parallel_size=tp, quantization=args.quantization,
                           kv_cache_dtype=args.kv_cache_dtype)
        name = args.name or f"{shape.name.lower()}-{gpu.get('key', 'gpu')}-calibrated"
        return derive_profile(fp, shape, hw, name=name, memory=fp.memory, tp=tp,
                              provenance=prov, gemm=info.get("gemm"),
                              quantization=args.quantization,
                              kv_cache_dtype=args.kv_cache_dtype), gpu["name"]
    ref = args.base_profile
    if ref is None and info.get("profile"):
        ref = str(Path(args.gpu_calibration).parent / str(info["profile"]))
    if ref is None:
        raise TwinInputError("the calibration names no profile of its machine: give "
                             "--base-profile PROFILE (or --gpu)", field="--base-profile")
    base = load_profile(ref)
    if machine is not None and _identity(machine) != _identity(base.hardware):
        raise TwinInputError(f"--base-profile {base.name} describes {base.hardware.get('name')}"
                             f", the calibration {machine.get('name')} ({where}): give a "
                             "profile of the calibrated machine, or leave --base-profile out",
                             file=str(args.gpu_calibration), field="--base-profile")
    shape = _model(args, dtype_bytes=base.model.dtype_bytes)
    hw = _requantize(args, hw, machine or base.hardware, info, prov)
    hw = _tp_terms(args, hw, machine or base.hardware, prov)
    # a base that lists its model's LoRA slot buffers (first principles): this model's
    buffers = lora_buffers(shape, tp) if base.memory.lora_buffers is not None else None
    prof = derive_profile(base, shape, hw, name=args.name, tp=tp, provenance=prov,
                          gemm=info.get("gemm"), quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype, lora_buffers=buffers)
    if args.gpu_memory_gib is not None:   # e.g. a CPU's memory budget for a larger model
        prof.memory.gpu_memory_gib = args.gpu_memory_gib
    return prof, base.name


def run(args) -> int:
    if args.name is not None and not args.name.strip():
        raise TwinInputError("a profile needs a name (or leave --name out for the default)",
                             field="--name")
    if args.base_profile is not None and (args.gpu_calibration is None or _gpu_given(args)):
        raise TwinInputError("--base-profile is read only with --gpu-calibration and no --gpu "
                             "(the machine's memory and load times); drop it, or give the "
                             "calibration", field="--base-profile")
    with prepare(args.out, "profile", inputs=input_paths(args), file=True):
        if args.gpu_calibration is not None:
            prof, machine = _from_calibration(args)
        else:
            shape = _model(args)
            gpu = _hardware(args)
            prof = build_profile(shape, gpu,
                                 tensor_parallel_size=args.tensor_parallel_size,
                                 quantization=args.quantization,
                                 kv_cache_dtype=args.kv_cache_dtype, name=args.name)
            machine = gpu["name"]
        shape = prof.model
        prof.hardware["dtype"] = args.dtype
        m = prof.memory
        cfg = ServingConfig()
        kv = m.kv_tokens(cfg)
        if kv <= 0:
            raise TwinInputError(
                f"{shape.name} does not fit on {machine} with tensor_parallel_size "
                f"{args.tensor_parallel_size}: {m.weights_gib:.1f} GiB of weights per GPU, "
                f"{m.lora_bytes(cfg.max_loras, cfg.max_lora_rank) / GIB:.1f} GiB of LoRA slots "
                f"(max_loras {cfg.max_loras}, max_lora_rank {cfg.max_lora_rank}), "
                f"{m.activation_bytes(cfg.max_num_seqs, cfg.max_num_batched_tokens) / GIB:.1f} "
                f"GiB of activations (max_num_seqs {cfg.max_num_seqs}) of "
                f"{cfg.gpu_memory_utilization * m.gpu_memory_gib:.1f} GiB: raise "
                "--tensor-parallel-size, "
                + ("" if args.quantization == "fp8" else "use --quantization fp8 ")
                + "or give --gpu-memory-gib",
                field="--model")
        out = prof.save(args.out)
    print(f"wrote {out}: {shape.name} ({shape.params / 1e9:.2f}B parameters) on "
          f"{args.tensor_parallel_size} x {machine}: {m.weights_gib:.2f} GiB weights/GPU, "
          f"{m.kv_bytes_per_token} KV bytes/token/GPU, {kv} KV tokens at max_loras "
          f"{cfg.max_loras}, max_lora_rank {cfg.max_lora_rank}, max_num_seqs "
          f"{cfg.max_num_seqs}")
    ctx = shape.max_position_embeddings
    if ctx and kv < ctx:   # vLLM checks at start-up that one max_model_len request fits
        print(f"note: {kv} KV tokens hold less than one request of the model's context "
              f"({ctx}): vLLM refuses to start at the default max_model_len; serve with "
              f"max_model_len <= {kv}, or raise --tensor-parallel-size", file=sys.stderr)
    if ctx is not None and ctx < cfg.max_model_len:
        print(f"note: the model's context is {ctx} tokens: twin simulate derives max_model_len "
              f"{ctx} from it as vLLM does; elsewhere (twin recommend --base-config) give "
              f"--max-model-len {ctx} or less")
    return 0

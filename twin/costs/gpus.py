"""The GPU catalogue of ``twin profile``: datasheet peaks, and the one derating rule that turns
them into the effective rates a first-principles step time uses.

``memory_gib`` is what the runtime reports (``torch.cuda.mem_get_info()[1] / 2**30``, which
vLLM multiplies by ``gpu_memory_utilization``): a few percent below the marketing "GB"
(GB = 10^9 bytes, and the driver keeps some). The H100 64 GB figure is measured (the GPU of
the shared vLLM runs); the others are torch's totals for those boards as commonly reported
in vLLM logs (``nvidia-smi``'s total less the driver's ~0.5-1 GiB reserve), approximate to a
few tenths of a GiB: give ``--gpu-memory-gib`` with your board's figure when it matters. Bandwidths are bytes/s; FLOP rates are *dense* (no 2:4
sparsity) tensor-core rates; ``fp8_flops`` is None on GPUs without FP8 tensor cores (vLLM
then runs FP8 weights through a weight-only kernel at the 16-bit rate). ``link_bytes_per_s``
is what one GPU can send per direction to its tensor-parallel peers (NVLink / Infinity
Fabric; PCIe where the board has no GPU-to-GPU link); ``pcie_bytes_per_s`` per direction.

Derating (one rule, :func:`effective`): effective = peak × ``DERATE``: 0.8 of HBM bandwidth
(what a well-tuned GEMV/attention kernel streams), 0.6 of the dense FLOP rate (large GEMMs
with vLLM's shapes), 0.7 of link bandwidth (NCCL ring bus bandwidth). These are first
principles' assumptions, not fits: they reproduce the constants the shipped
``llama31-8b-h100-64gb-first-principles`` profile always used (1.6 TB/s, ~6e14 FLOP/s).
What *is* fitted to data is in :mod:`twin.costs.first_principles` (``NON_TORCH_GIB``) and
everything a ``twin calibrate`` run writes; the step time's software constants
(:data:`twin.costs.hardware.GPU_SOFTWARE`) are assumptions.

Prices (:data:`GPU_PRICES`, :func:`list_price`): public on-demand list prices per GPU-hour,
each with its provider and date, the cost objective's default when no price is given.
"""

from __future__ import annotations

from twin.errors import TwinInputError

DERATE = {"hbm": 0.8, "flops": 0.6, "link": 0.7}

GPUS: dict[str, dict] = {
    # NVIDIA A10G (AWS G5): 24 GB GDDR6, 600 GB/s; GA102 like the A10, clocked lower. AWS
    # publishes no tensor rate: 70 TFLOPS dense FP16/BF16 is the AWS G5 figure, the A10
    # datasheet's 125 TFLOPS is the ceiling. PCIe Gen4 x16. (aws.amazon.com/ec2/instance-types/g5)
    "a10g": dict(name="NVIDIA A10G 24 GB", memory_gib=22.3, hbm_bytes_per_s=600e9,
                 bf16_flops=70e12, fp8_flops=None, pcie_bytes_per_s=32e9,
                 link_bytes_per_s=32e9, link="PCIe Gen4"),
    # NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, BF16 242 TFLOPS with sparsity (121 dense),
    # FP8 485 with sparsity (242.5 dense), PCIe Gen4 x16 64 GB/s bidirectional.
    "l4": dict(name="NVIDIA L4 24 GB", memory_gib=22.0, hbm_bytes_per_s=300e9,
               bf16_flops=121e12, fp8_flops=242.5e12, pcie_bytes_per_s=32e9,
               link_bytes_per_s=32e9, link="PCIe Gen4"),
    # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 733 TFLOPS with sparsity (366 dense),
    # FP8 1466 with sparsity (733 dense), PCIe Gen4 x16, no NVLink.
    "l40s": dict(name="NVIDIA L40S 48 GB", memory_gib=44.4, hbm_bytes_per_s=864e9,
                 bf16_flops=366e12, fp8_flops=733e12, pcie_bytes_per_s=32e9,
                 link_bytes_per_s=32e9, link="PCIe Gen4"),
    # NVIDIA A100 datasheet (SXM4): 40 GB HBM2 1555 GB/s / 80 GB HBM2e 2039 GB/s, BF16 312
    # TFLOPS dense, no FP8, NVLink 3 600 GB/s (300 per direction), PCIe Gen4.
    "a100-40gb": dict(name="NVIDIA A100 40 GB SXM", memory_gib=39.4, hbm_bytes_per_s=1555e9,
                      bf16_flops=312e12, fp8_flops=None, pcie_bytes_per_s=32e9,
                      link_bytes_per_s=300e9, link="NVLink 3"),
    "a100-80gb": dict(name="NVIDIA A100 80 GB SXM", memory_gib=79.1, hbm_bytes_per_s=2039e9,
                      bf16_flops=312e12, fp8_flops=None, pcie_bytes_per_s=32e9,
                      link_bytes_per_s=300e9, link="NVLink 3"),
    # The GPU of the shared vLLM runs: an H100 SXM-class board with 64 GB HBM2e; torch
    # reports 63.43 GiB (measured). Its peak bandwidth is taken as 2.0 TB/s (four HBM2e
    # stacks; the 1.6 TB/s effective rate the shipped profile always assumed), compute as the
    # H100 SXM's (989 TFLOPS BF16, 1979 FP8 dense), NVLink 4.
    "h100-64gb": dict(name="H100 64 GB (HBM2e, SXM class)", memory_gib=63.43,
                      hbm_bytes_per_s=2.0e12, bf16_flops=989.4e12, fp8_flops=1978.9e12,
                      pcie_bytes_per_s=64e9, link_bytes_per_s=450e9, link="NVLink 4"),
    # NVIDIA H100 datasheet: SXM 80 GB HBM3 3.35 TB/s, BF16 1979 TFLOPS with sparsity (989.4
    # dense), FP8 3958 (1979 dense), NVLink 900 GB/s (450 per direction), PCIe Gen5 128 GB/s
    # bidirectional. PCIe card: 80 GB HBM2e 2.0 TB/s, BF16 756 dense, FP8 1513 dense, NVLink
    # bridge 600 GB/s for pairs (``link_group``: TP > 2 goes over PCIe, :func:`tp_link`).
    "h100-80gb": dict(name="NVIDIA H100 80 GB SXM", memory_gib=79.2, hbm_bytes_per_s=3.35e12,
                      bf16_flops=989.4e12, fp8_flops=1978.9e12, pcie_bytes_per_s=64e9,
                      link_bytes_per_s=450e9, link="NVLink 4"),
    "h100-pcie": dict(name="NVIDIA H100 80 GB PCIe", memory_gib=79.2, hbm_bytes_per_s=2.0e12,
                      bf16_flops=756e12, fp8_flops=1513e12, pcie_bytes_per_s=64e9,
                      link_bytes_per_s=300e9, link="NVLink bridge (pairs)", link_group=2),
    # NVIDIA H200 datasheet (SXM): 141 GB HBM3e 4.8 TB/s, compute as H100 SXM, NVLink 900 GB/s.
    "h200": dict(name="NVIDIA H200 141 GB SXM", memory_gib=139.8, hbm_bytes_per_s=4.8e12,
                 bf16_flops=989.4e12, fp8_flops=1978.9e12, pcie_bytes_per_s=64e9,
                 link_bytes_per_s=450e9, link="NVLink 4"),
    # NVIDIA HGX B200 datasheet (per GPU): 180 GB HBM3e ~7.7 TB/s, FP16/BF16 4.5 PFLOPS with
    # sparsity (2.25 dense), FP8 9 with sparsity (4.5 dense), NVLink 5 1.8 TB/s (900 per
    # direction), PCIe Gen5.
    "b200": dict(name="NVIDIA B200 180 GB", memory_gib=178.4, hbm_bytes_per_s=7.7e12,
                 bf16_flops=2.25e15, fp8_flops=4.5e15, pcie_bytes_per_s=64e9,
                 link_bytes_per_s=900e9, link="NVLink 5"),
    # AMD Instinct MI300X datasheet: 192 GB HBM3 5.3 TB/s, BF16 1307.4 TFLOPS dense, FP8
    # 2614.9 dense, 7 Infinity Fabric links of 64 GB/s per direction (448), PCIe Gen5.
    "mi300x": dict(name="AMD Instinct MI300X 192 GB", memory_gib=191.5, hbm_bytes_per_s=5.3e12,
                   bf16_flops=1307.4e12, fp8_flops=2614.9e12, pcie_bytes_per_s=64e9,
                   link_bytes_per_s=448e9, link="Infinity Fabric"),
}
_ALIASES = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "h100-80gb-sxm": "h100-80gb",
            "h100-80gb-pcie": "h100-pcie", "a100": "a100-80gb", "a100-80gb-sxm": "a100-80gb",
            "a100-40gb-sxm": "a100-40gb", "h200-sxm": "h200", "h100-64gb-sxm": "h100-64gb"}


def gpu_names() -> list[str]:
    return sorted(GPUS)


def get_gpu(name: str) -> dict:
    """A copy of the catalogue entry ``name`` (case-insensitive; ``h100`` is the 80 GB SXM)."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise TwinInputError(f"unknown GPU {name!r}; the catalogue has {', '.join(gpu_names())} "
                             f"(or give --gpu-memory-gib, --hbm-bandwidth and --flops)",
                             field="--gpu")
    return dict(GPUS[key], key=key)


def effective(gpu: dict, fp8: bool = False) -> tuple[float, float, float]:
    """(HBM bytes/s, FLOP/s, link bytes/s) a step-time roofline uses: peak × ``DERATE``. FP8
    matmuls use the FP8 rate where the GPU has one."""
    flops = gpu["fp8_flops"] if fp8 and gpu.get("fp8_flops") else gpu["bf16_flops"]
    return (gpu["hbm_bytes_per_s"] * DERATE["hbm"], flops * DERATE["flops"],
            gpu["link_bytes_per_s"] * DERATE["link"])


# -- prices -------------------------------------------------------------------------------------
#: Public list prices, US dollars per GPU-hour, ON-DEMAND (no commitment, no spot), each of one
#: named provider on one stated date: a default for ``twin recommend --objective cost`` when no
#: ``--gpu-price`` is given, never what a fleet pays (reserved, committed-use and spot prices
#: are 30-90 % lower; regions and providers differ by 2-3x). Where no price could be cited the
#: GPU is absent: give ``--gpu-price``. Sources, as read from stored copies of public pages
#: (no provider page could be opened from this machine, so each figure is as quoted there):
#:  - Lambda on-demand instances (1x H100 SXM $3.78, 1x H100 PCIe $2.86, 1x A100 40 GB $1.48)
#:    and Modal's per-second GPU prices (A100 80 GB $2.4984/h = $0.000694/s, L40S $1.9512/h,
#:    L4 $0.7992/h): techbytes.app/posts/serverless-gpu-pricing-matrix-modal-replicate-lambda-
#:    2026, "prices verified on May 7, 2026 from official vendor pricing". Modal bills only
#:    running containers per second; an always-on replica pays that rate every hour.
#:  - AWS g5.xlarge (1x A10G) on-demand, us-east-1, Linux: $1.006/h
#:    (factualminds.com/blog/amazon-ec2-on-demand-pricing-instance-families-2026, 2026-06-17;
#:    the instance's 4 vCPUs and 16 GiB are included).
#: Not cited (absent): H200, B200, MI300X. The 64 GB H100 of the shared vLLM runs is not a
#: cloud product: it is priced as the H100 SXM it is built like, and says so.
GPU_PRICES: dict[str, dict] = {
    "h100-80gb": dict(usd_per_hour=3.78, source="Lambda on-demand, 1x H100 SXM",
                      as_of="2026-05-07"),
    "h100-pcie": dict(usd_per_hour=2.86, source="Lambda on-demand, 1x H100 PCIe",
                      as_of="2026-05-07"),
    "a100-40gb": dict(usd_per_hour=1.48, source="Lambda on-demand, 1x A100 40 GB",
                      as_of="2026-05-07"),
    "a100-80gb": dict(usd_per_hour=2.4984, source="Modal per-second price, A100 80 GB",
                      as_of="2026-05-07"),
    "l40s": dict(usd_per_hour=1.9512, source="Modal per-second price, L40S", as_of="2026-05-07"),
    "l4": dict(usd_per_hour=0.7992, source="Modal per-second price, L4", as_of="2026-05-07"),
    "a10g": dict(usd_per_hour=1.006, source="AWS EC2 g5.xlarge on-demand, us-east-1",
                 as_of="2026-06-17"),
    "h100-64gb": dict(usd_per_hour=3.78, source="no public price for this board: priced as "
                      "Lambda on-demand 1x H100 SXM", as_of="2026-05-07"),
}


def gpu_key_of(hardware: dict) -> str | None:
    """The catalogue key of a profile's ``hardware`` section: its ``key`` (first-principles
    profiles), else the catalogue entry whose ``name`` it carries (calibrated profiles keep
    the name); None for a CPU or an unknown board."""
    key = hardware.get("key")
    if key in GPUS:
        return key
    name = hardware.get("name")
    return next((k for k, g in GPUS.items() if g["name"] == name), None)


def tp_link(hw: dict, tp: int) -> dict:
    """``hw`` with the link a ``tp``-GPU all-reduce crosses: a board whose GPU link joins
    only ``link_group`` of them (the H100 PCIe's NVLink bridge: pairs) reduces over PCIe
    beyond that, unless the link bandwidth was given (``overridden``)."""
    group = hw.get("link_group")
    if group is None or tp <= group or "link_bytes_per_s" in hw.get("overridden", ()):
        return hw
    return dict(hw, link_bytes_per_s=hw["pcie_bytes_per_s"],
                link=f"PCIe (its {hw['link']} joins {group} GPUs; tensor_parallel_size {tp})")


def gpus_per_replica(hardware: dict) -> int:
    """The GPUs one server of a profile spans (its ``tensor_parallel_size``; 1 unsaid)."""
    return int(hardware.get("tensor_parallel_size") or 1)


def list_price(hardware: dict) -> dict | None:
    """The on-demand list price per GPU-hour of a profile's GPU (``GPU_PRICES``):
    {'usd_per_hour', 'source', 'as_of', 'gpu'}; None when the catalogue has no cited price
    for it. A server spans :func:`gpus_per_replica` of them."""
    key = gpu_key_of(hardware)
    if key not in GPU_PRICES:
        return None
    p = GPU_PRICES[key]
    return {"usd_per_hour": p["usd_per_hour"], "source": p["source"], "as_of": p["as_of"],
            "gpu": key}

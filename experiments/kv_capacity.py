"""vLLM's start-up KV capacity vs ``twin profile``'s first-principles memory model (issue 14).

For every (max_loras, max_lora_rank) of ``shared/data/vllm-h100/kv_cache_tokens_llama31_8b.csv``
(Llama-3.1-8B, 64 GB H100, vLLM 0.8.5): the KV tokens vLLM reported (started runs) or that
its failure message implies (failed start-ups), against

- the first-principles profile (``twin profile --model llama-3.1-8b --gpu h100-64gb``: LoRA
  slot buffers replayed through PyTorch's caching allocator, one fitted non-torch constant);
- the same without the allocator replay (the linear ``max_loras·(rank·a + b)`` form);
- the shipped calibrated profile (all memory constants fitted to this table).

Rows where vLLM found no room for a KV cache must get none. Then the wall time of the
command itself (a fresh ``python -m twin.cli profile`` process, median of 3) and of building
and writing the profile in-process.

    python experiments/kv_capacity.py

The last line printed is one JSON object (``kv_capacity_err_max_pct``, ``profile_wall_s``...).

Measured here (2 shared CPUs, load average ~12): KV capacity error max 0.112% / median
0.032% over the 36 probes with a capacity, the 6 without one given none; without the
allocator replay 1.41% max (the three max_loras x rank = 1024 probes); the calibrated profile
0.99%. ``twin profile``: 0.92 s CPU per process, of which ~0.9 s is ``twin``'s parser
importing every subcommand module (``twin --help`` costs the same); 34 ms to build and write
the profile; 7.1 s wall under that load.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from twin.config import ServingConfig
from twin.costs.first_principles import build_profile
from twin.costs.memory import MemoryModel
from twin.costs.model_config import load_model_shape
from twin.costs.profile import load_profile
from twin.workload.public import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]


def errors(memory: MemoryModel, kv: pd.DataFrame) -> tuple[list[float], int]:
    """Relative KV-token errors on the rows with a capacity; rows without one that the
    model wrongly gives a KV cache."""
    rel, wrong_start = [], 0
    for row in kv.itertuples():
        cfg = ServingConfig(max_loras=row.max_loras, max_lora_rank=row.max_lora_rank,
                            max_num_seqs=2048, max_num_batched_tokens=2048,
                            gpu_memory_utilization=row.gpu_memory_utilization)
        got = memory.kv_tokens(cfg)
        if pd.isna(row.kv_cache_tokens):
            wrong_start += got > 0
        else:
            rel.append(abs(got / row.kv_cache_tokens - 1))
    return rel, wrong_start


def wall_time(runs: int = 3) -> tuple[float, float, float]:
    """(median wall s, mean CPU s of the process, in-process build+write s)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    walls = []
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as d:
        for i in range(runs):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "twin.cli", "profile", "--model",
                            "llama-3.1-8b", "--gpu", "h100-64gb", "--out", f"{d}/p{i}.json"],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        build_profile(load_model_shape("llama-3.1-8b"), "h100-64gb").save(f"{d}/in.json")
        inproc = time.perf_counter() - t
    cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / runs
    return statistics.median(walls), cpu, inproc


def measure(log=print) -> dict:
    """Every figure of this script; the headline keys (``kv_capacity_err_max_pct``,
    ``profile_wall_s``, ...) are also part of ``generality.py``'s JSON."""
    kv = pd.read_csv(shared_data_dir() / "vllm-h100" / "kv_cache_tokens_llama31_8b.csv")
    fp = build_profile(load_model_shape("llama-3.1-8b"), "h100-64gb").memory
    linear = MemoryModel(**{k: v for k, v in fp.to_dict().items() if k != "lora_buffers"})
    calibrated = load_profile("llama31-8b-h100-64gb").memory
    out = {}
    for label, mem in (("first_principles", fp), ("no_allocator", linear),
                       ("calibrated", calibrated)):
        rel, wrong = errors(mem, kv)
        out[label] = {"err_max_pct": 100 * max(rel), "err_median_pct": 100 * statistics.median(rel),
                      "rows": len(rel), "no_kv_rows_given_kv": wrong}
        log(f"{label:17s} KV capacity error max {100 * max(rel):.3f}%  median "
            f"{100 * statistics.median(rel):.3f}% over {len(rel)} probes; rows without a KV "
            f"cache given one: {wrong} of {int(kv['kv_cache_tokens'].isna().sum())}")
    wall, cpu, inproc = wall_time()
    log(f"twin profile: {wall:.2f} s wall (median of 3 processes), {cpu:.2f} s CPU per "
        f"process, {inproc * 1e3:.0f} ms to build and write in-process; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    fp_err = out["first_principles"]
    return {"kv_capacity_err_max_pct": fp_err["err_max_pct"],
            "kv_capacity_err_median_pct": fp_err["err_median_pct"],
            "kv_capacity_no_kv_rows_given_kv": fp_err["no_kv_rows_given_kv"],
            "kv_capacity_err_max_pct_no_allocator": out["no_allocator"]["err_max_pct"],
            "kv_capacity_err_max_pct_calibrated": out["calibrated"]["err_max_pct"],
            "profile_wall_s": wall, "profile_cpu_s": cpu, "profile_build_in_process_s": inproc}


def main() -> int:
    print(json.dumps(measure()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the bundled traces in this folder from the shared public data, deterministically.

    .venv/bin/python traces/build.py            # from the repository root
    TWIN_SHARED_DATA=/path/to/shared/data .venv/bin/python traces/build.py

Every file is rebuilt with fixed seeds, so a rerun reproduces it bit for bit (same numpy).
Sources, licences and attribution: ``traces/README.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from twin.workload import (generate, popularity, prefix_stats, public, servegen,  # noqa: E402
                           sessions)
from twin.workload.schema import write_trace  # noqa: E402


def build_all(out_dir: Path = HERE) -> dict[str, Path]:
    """Write every bundled trace into ``out_dir``; returns name -> path."""
    tr = public.shared_trace_path
    azure = public.load_azure2023(tr(public.AZURE_FILES["conv"]))
    pool = public.sharegpt_length_pool(tr(public.SHAREGPT_FILE), max_prompt=1024,
                                       max_total=2048, target_means=public.VLLM_H100_POOL_MEANS)
    mooncake = public.load_mooncake(tr(public.MOONCAKE_FILES["conversation"]), limit_s=300,
                                    hash_ids=True)
    traces = {
        # the whole Azure conversation hour, base model only
        "azure_conv_1h.parquet": azure,
        # the same requests over 32 adapters, S-LoRA power law alpha 0.5 (hottest 17.7%,
        # coldest 1.6% of requests)
        "azure_conv_1h_32lora.parquet": popularity.assign_adapters(
            azure, 32, popularity="powerlaw", alpha=0.5, seed=0),
        # ServeGen m-large, its 32 busiest clients in the model's busiest 10 minutes,
        # rates scaled to 30 req/s in aggregate (one H100-class GPU's worth)
        "servegen_32tenants_10min.parquet": servegen.servegen_tenants(
            tr(public.SERVEGEN_RATE_FILE), tr(public.SERVEGEN_LENGTH_FILE), model="m-large",
            n_tenants=32, duration_s=600, total_rate=30.0, seed=0),
        # the vLLM-H100 runs' heavy workload: 32 adapters at 1.6/0.8/0.4 req/s (Poisson),
        # ShareGPT lengths rescaled to the runs' pool means 223/196
        "rate_classes_32_heavy_10min.parquet": generate.rate_class_trace(
            32, (1.6, 0.8, 0.4), duration_s=600, lengths=pool, arrival="poisson", seed=0),
        # prefix caching: 16 adapters, 8 chat sessions each (mean 5 turns, 10-s think
        # time), a 512-token system prompt per adapter, ShareGPT turns, 16-token blocks
        "sessions_16lora_10min.parquet": sessions.session_trace(
            16, 8, turns_mean=5, think_s=10, duration_s=600, system_tokens=512,
            lengths=pool, block_size=16, max_model_len=8192, seed=0),
        # the first 5 minutes of Kimi's conversation trace with its 512-token block ids,
        # 8 adapters drawn per conversation (requests agreeing on their first 2 blocks)
        "mooncake_conv_5min_8lora.parquet": popularity.assign_adapters(
            mooncake, 8, seed=0, groups=prefix_stats.prefix_groups(mooncake, 2)),
    }
    out = {}
    for name, df in traces.items():
        out[name] = write_trace(df, out_dir / name)
    return out


if __name__ == "__main__":
    for name, path in build_all().items():
        import pandas as pd
        df = pd.read_parquet(path)
        print(f"{name}: {len(df)} rows, {path.stat().st_size / 1e3:.0f} kB, "
              f"{df['adapter'].nunique()} adapters")

"""One measured vLLM run (:class:`RunSpec`): what was served, what was offered, what the
``vllm bench serve`` client measured. The run readers (:mod:`twin.calibrate.run_table`,
:mod:`twin.calibrate.bench_json`) build it; :mod:`twin.calibrate.reconstruct` rebuilds its
workload; :mod:`twin.calibrate.step_fit` fits the twin to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twin.config import ServingConfig

__all__ = ["RunSpec", "paper_server_defaults"]


def paper_server_defaults() -> dict:
    """Server settings every run of arXiv 2508.08343 shared (its README's "Setting")."""
    return {"max_num_seqs": 2048, "max_num_batched_tokens": 2048, "max_model_len": 131072,
            "gpu_memory_utilization": 0.9, "block_size": 16, "enable_chunked_prefill": True}


@dataclass
class RunSpec:
    """One measured run: what was served, what was offered, what the client measured."""

    key: str                       # unique name (source path or file name)
    config: ServingConfig
    ranks: dict                    # adapter rank -> number of adapters
    rates: dict                    # per-adapter rate (req/s) -> number of adapters
    pool_means: tuple              # (prompt, output) mean tokens of the request pool
    duration_s: float = 3600.0
    metrics: dict = field(default_factory=dict)   # vllm bench serve names (run_table._METRICS)
    extra: dict = field(default_factory=dict)     # anything else of the source row
    rank_cycle: tuple | None = None               # --dummy-lora-modules rank list, if known
    source: str = ""
    row: int | None = None

    @property
    def n_adapters(self) -> int:
        return int(sum(self.ranks.values()))

    @property
    def aggregate_rate(self) -> float:
        return float(sum(r * n for r, n in self.rates.items()))

    @property
    def offered_tps(self) -> float:
        """Expected offered token load: total rate x pool mean tokens per request."""
        return self.aggregate_rate * float(sum(self.pool_means))

    def workload_key(self) -> tuple:
        """Same adapters, rates and pool: the runs of one workload differ only in config."""
        return (tuple(sorted(self.ranks.items())), tuple(sorted(self.rates.items())),
                self.extra.get("workload_dir"))



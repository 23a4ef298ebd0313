"""Real vLLM benchmark runs, and the workloads they measured: where runs come from.

A *run* is one ``vllm serve`` configuration measured by one ``vllm bench serve`` client for a
fixed window: its serving settings, its adapters (ranks) and their Poisson rates, the length
pool its prompts came from, and the aggregate metrics the client printed
(:class:`~twin.calibrate.run_spec.RunSpec`). Two sources map onto it:

- the run table of ``shared/data/vllm-h100/real_runs_*.csv`` (the real runs of arXiv
  2508.08343), read by :func:`~twin.calibrate.run_table.read_run_table`;
- the JSON that ``vllm bench serve --save-result`` writes, read by
  :func:`~twin.calibrate.bench_json.read_bench_results`.

:func:`~twin.calibrate.reconstruct.reconstruct` rebuilds a run's workload as the paper's
client generated it. This module loads runs from any mix of the two sources
(:func:`load_runs`), picks a spread of them (:func:`spread`) and names the pieces' public
functions, so callers need one import.
"""

from __future__ import annotations

from pathlib import Path

from twin.calibrate.bench_json import BENCH_SIDECAR_KEYS, SIDECAR_KEYS, read_bench_results
from twin.calibrate.reconstruct import length_pool, reconstruct
from twin.calibrate.run_spec import RunSpec, paper_server_defaults
from twin.calibrate.run_table import RUN_CONFIG_COLUMNS, RUN_METRIC_COLUMNS, read_run_table
from twin.errors import TwinInputError

__all__ = ["RunSpec", "read_run_table", "read_bench_results", "reconstruct", "length_pool",
           "RUN_CONFIG_COLUMNS", "RUN_METRIC_COLUMNS", "paper_server_defaults",
           "BENCH_SIDECAR_KEYS", "SIDECAR_KEYS", "load_runs", "spread"]


def load_runs(paths, bench_config=None, experiment_sets=None):
    """Runs from a run table (CSV) and/or bench JSON files."""
    csvs = [p for p in paths if Path(p).suffix.lower() in (".csv", ".gz")]
    jsons = [p for p in paths if p not in csvs]
    runs = []
    for p in csvs:
        runs += read_run_table(p)
    if jsons:
        runs += read_bench_results(jsons, bench_config)
    if experiment_sets:
        runs = [r for r in runs if r.extra.get("experiment_set") in set(experiment_sets)]
        if not runs:
            raise TwinInputError(f"no run of experiment_set {experiment_sets}",
                                 file=str(paths[0]), field="experiment_set")
    if not runs:
        raise TwinInputError("no usable run (status ok, no anomaly)", file=str(paths[0]))
    return runs


def spread(runs, n: int):
    """``n`` runs evenly spread over the offered load (deterministic)."""
    if n is None or n >= len(runs):
        return runs
    order = sorted(runs, key=lambda r: (r.aggregate_rate, r.key))
    pick = sorted({round(i * (len(order) - 1) / max(n - 1, 1)) for i in range(n)})
    return [order[i] for i in pick]

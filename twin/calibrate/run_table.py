"""The run table of ``shared/data/vllm-h100/real_runs_*.csv`` (the real runs of arXiv
2508.08343, one row per run; its README says what each column means) as :class:`RunSpec`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from twin.calibrate.run_spec import RunSpec, paper_server_defaults
from twin.calibrate.tables import POSITIVE_METRICS, numeric_column, read_csv_table
from twin.config import ServingConfig
from twin.errors import TwinInputError

__all__ = ["read_run_table", "RUN_CONFIG_COLUMNS", "RUN_METRIC_COLUMNS"]

#: Columns a run table needs to rebuild a run's workload and configuration.
RUN_CONFIG_COLUMNS = ("max_loras", "max_cpu_loras", "max_lora_rank", "n_adapters_rank8",
                      "n_adapters_rank16", "n_adapters_rank32", "rate_values_rps", "rate_counts",
                      "pool_mean_input_tokens", "pool_mean_output_tokens")
#: Columns a run table needs to calibrate against (``vllm bench serve`` metrics).
RUN_METRIC_COLUMNS = ("status", "duration_s", "total_throughput_tps", "mean_ttft_ms",
                      "mean_itl_ms", "mean_tpot_ms")
_TABLE_RANKS = (8, 16, 32)
_OPTIONAL = ("model", "experiment_set", "workload_dir", "run_dir", "source_path", "anomaly",
             "offered_total_tps_est", "meets_90pct_of_offered", "num_running_mean",
             "num_waiting_mean", "num_waiting_max", "num_running_max", "kv_usage_mean_frac",
             "preemptions_total", "requests_sent_from_twin_replay", "max_num_seqs",
             "max_num_batched_tokens", "completed_requests", "median_ttft_ms",
             "median_tpot_ms", "median_itl_ms", "p99_ttft_ms", "p99_itl_ms", "rate_set_arg",
             "adapter_module_ranks_cycle", "ts_samples", "ts_span_s")


# metric name in RunSpec.metrics -> run-table column
_METRICS = {"total_throughput": "total_throughput_tps", "mean_ttft_ms": "mean_ttft_ms",
            "mean_itl_ms": "mean_itl_ms", "mean_tpot_ms": "mean_tpot_ms",
            "median_ttft_ms": "median_ttft_ms", "median_itl_ms": "median_itl_ms",
            "median_tpot_ms": "median_tpot_ms", "p99_ttft_ms": "p99_ttft_ms",
            "p99_itl_ms": "p99_itl_ms", "completed": "completed_requests",
            "num_running_mean": "num_running_mean", "num_waiting_mean": "num_waiting_mean",
            "num_waiting_max": "num_waiting_max", "num_running_max": "num_running_max",
            "kv_usage_mean": "kv_usage_mean_frac", "preemptions": "preemptions_total",
            "requests_sent": "requests_sent_from_twin_replay"}


def read_run_table(path: str | Path, *, ok_only: bool = True, need_metrics: bool = True,
                   seed_defaults: dict | None = None) -> list[RunSpec]:
    """Runs of a ``real_runs_*.csv`` table (one row per run) as :class:`RunSpec`.

    ``ok_only`` keeps rows whose ``status`` is ``ok`` and that carry no ``anomaly``. Row
    numbers in errors are the file's 0-based data rows. Server settings absent from the
    table take the paper's values (:func:`paper_server_defaults`).
    """
    file = str(path)
    need = RUN_CONFIG_COLUMNS + (RUN_METRIC_COLUMNS if need_metrics else ())
    df = read_csv_table(path, need, "run", hint=" (see shared/data/vllm-h100/README.md)",
                        missing="run table not found", low_memory=False)
    keep = np.ones(len(df), bool)
    if ok_only and "status" in df.columns:
        keep &= (df["status"].astype(str) == "ok").to_numpy()
    if ok_only and "anomaly" in df.columns:
        keep &= df["anomaly"].isna().to_numpy()
    ints = {c: numeric_column(df, c, file, keep, integer=True) for c in
            ("max_loras", "max_cpu_loras", "max_lora_rank", "n_adapters_rank8",
             "n_adapters_rank16", "n_adapters_rank32")}
    pin = numeric_column(df, "pool_mean_input_tokens", file, keep, positive=True)
    pout = numeric_column(df, "pool_mean_output_tokens", file, keep, positive=True)
    if need_metrics:
        mets = {c: numeric_column(df, c, file, keep, positive=True,
                                  why=POSITIVE_METRICS[m]) for c, m in
                (("duration_s", "duration"), ("total_throughput_tps", "total_throughput"),
                 ("mean_ttft_ms", "mean_ttft_ms"), ("mean_itl_ms", "mean_itl_ms"),
                 ("mean_tpot_ms", "mean_tpot_ms"))}
    defaults = paper_server_defaults() | (seed_defaults or {})
    runs = []
    for row in np.flatnonzero(keep):
        row = int(row)
        r = df.iloc[row]
        rates = _row_rates(r, file, row)
        ranks = {k: int(ints[f"n_adapters_rank{k}"][row]) for k in _TABLE_RANKS
                 if ints[f"n_adapters_rank{k}"][row] > 0}
        n = int(ints["max_cpu_loras"][row])
        if sum(ranks.values()) != n:
            raise TwinInputError(f"n_adapters_rank8/16/32 sum to {sum(ranks.values())}, "
                                 f"max_cpu_loras is {n}", file=file, row=row,
                                 field="n_adapters_rank8")
        if sum(rates.values()) != n:
            raise TwinInputError(f"rate_counts sum to {sum(rates.values())}, max_cpu_loras is "
                                 f"{n}", file=file, row=row, field="rate_counts")
        cfg = _row_config(r, df.columns, defaults, int(ints["max_loras"][row]), n,
                          int(ints["max_lora_rank"][row]), file, row)
        cycle = None
        if "adapter_module_ranks_cycle" in df.columns and pd.notna(r["adapter_module_ranks_cycle"]):
            cycle = tuple(int(x) for x in _floats(r["adapter_module_ranks_cycle"], file, row,
                                                  "adapter_module_ranks_cycle"))
        key = str(r["source_path"]) if "source_path" in df.columns and pd.notna(
            r.get("source_path")) else f"{Path(file).name}:{row}"
        runs.append(RunSpec(key=key, config=cfg, ranks=ranks, rates=rates,
                            pool_means=(float(pin[row]), float(pout[row])),
                            duration_s=float(mets["duration_s"][row]) if need_metrics else 3600.0,
                            metrics=_row_metrics(r, df.columns),
                            extra={c: r[c] for c in _OPTIONAL
                                   if c in df.columns and pd.notna(r[c])},
                            rank_cycle=cycle, source=file, row=row))
    return runs


def _floats(text, file, row, col) -> list[float]:
    try:
        vals = [float(x) for x in str(text).replace(",", " ").split()]
    except ValueError:
        raise TwinInputError(f"expected space-separated numbers, got {text!r}", file=file,
                             row=row, field=col) from None
    if not vals:
        raise TwinInputError("empty list", file=file, row=row, field=col)
    return vals


def _row_rates(r: pd.Series, file: str, row: int) -> dict:
    """{per-adapter rate (req/s): number of adapters} of one row."""
    values = _floats(r["rate_values_rps"], file, row, "rate_values_rps")
    counts = _floats(r["rate_counts"], file, row, "rate_counts")
    if len(values) != len(counts) or any(c < 0 or c != int(c) for c in counts):
        raise TwinInputError(f"rate_counts {r['rate_counts']!r} must be one non-negative "
                             f"integer per value of rate_values_rps {r['rate_values_rps']!r}",
                             file=file, row=row, field="rate_counts")
    if any(v <= 0 for v in values):
        raise TwinInputError(f"rates must be > 0 req/s, got {r['rate_values_rps']!r}",
                             file=file, row=row, field="rate_values_rps")
    return {float(v): int(c) for v, c in zip(values, counts) if c}


def _row_config(r: pd.Series, columns, defaults: dict, max_loras: int, max_cpu_loras: int,
                max_lora_rank: int, file: str, row: int) -> ServingConfig:
    """The row's server settings (the table's where it has them, else ``defaults``)."""
    settings = dict(defaults)
    for c in ("max_num_seqs", "max_num_batched_tokens"):
        if c in columns and pd.notna(r[c]):
            settings[c] = int(r[c])
    try:
        return ServingConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                             max_lora_rank=max_lora_rank, preload_adapters=True, **settings)
    except TwinInputError as exc:
        raise TwinInputError(exc.detail, file=file, row=row, field=exc.field) from None


def _row_metrics(r: pd.Series, columns) -> dict:
    """The row's ``vllm bench serve`` metrics that are numbers (``_METRICS`` names)."""
    metrics = {}
    for name, col in _METRICS.items():
        if col in columns and pd.notna(r[col]):
            v = pd.to_numeric(r[col], errors="coerce")
            if pd.notna(v):
                metrics[name] = float(v)
    return metrics

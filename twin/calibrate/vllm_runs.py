"""Summaries of real vLLM benchmark runs, and the workloads they measured.

A *run* is one ``vllm serve`` configuration measured by one ``vllm bench serve`` client for a
fixed window: its serving settings, its adapters (ranks) and their Poisson rates, the length
pool its prompts came from, and the aggregate metrics the client printed. Two sources map
onto :class:`RunSpec`:

- the run table of ``shared/data/vllm-h100/real_runs_*.csv`` (the real runs of arXiv
  2508.08343; its README says what each column means), read by :func:`read_run_table`;
- the JSON that ``vllm bench serve --save-result`` writes, read by :func:`read_bench_results`.
  That JSON holds the metrics but not the server's settings nor the per-adapter rates; they
  come from the JSON's own top-level keys (``vllm bench serve --metadata max_loras=8 ...``
  puts them there) or from a YAML sidecar (see :func:`read_bench_results`).

:func:`reconstruct` rebuilds a run's workload as the paper's client generated it: adapters
cycle through the rank list and are shuffled, rates go round-robin over the adapters and the
(adapter, rate) pairs are shuffled, each adapter is an independent Poisson process over the
window, and lengths are drawn from the ShareGPT pool under vLLM's benchmark filter rescaled
to the run's pool means (:func:`twin.workload.public.sharegpt_length_pool`). Deterministic by
seed.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.errors import TwinInputError
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import adapter_names, renewal_arrivals
from twin.workload.schema import validate_trace

__all__ = ["RunSpec", "read_run_table", "read_bench_results", "reconstruct", "length_pool",
           "RUN_CONFIG_COLUMNS", "RUN_METRIC_COLUMNS", "paper_server_defaults"]

#: Columns a run table needs to rebuild a run's workload and configuration.
RUN_CONFIG_COLUMNS = ("max_loras", "max_cpu_loras", "max_lora_rank", "n_adapters_rank8",
                      "n_adapters_rank16", "n_adapters_rank32", "rate_values_rps", "rate_counts",
                      "pool_mean_input_tokens", "pool_mean_output_tokens")
#: Columns a run table needs to calibrate against (``vllm bench serve`` metrics).
RUN_METRIC_COLUMNS = ("status", "duration_s", "total_throughput_tps", "mean_ttft_ms",
                      "mean_itl_ms", "mean_tpot_ms")
_TABLE_RANKS = (8, 16, 32)
_OPTIONAL = ("experiment_set", "workload_dir", "run_dir", "source_path", "anomaly",
             "offered_total_tps_est", "meets_90pct_of_offered", "num_running_mean",
             "num_waiting_mean", "num_waiting_max", "num_running_max", "kv_usage_mean_frac",
             "preemptions_total", "requests_sent_from_twin_replay", "max_num_seqs",
             "max_num_batched_tokens", "completed_requests", "median_ttft_ms",
             "median_tpot_ms", "median_itl_ms", "p99_ttft_ms", "p99_itl_ms", "rate_set_arg",
             "adapter_module_ranks_cycle")


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
    metrics: dict = field(default_factory=dict)   # vllm bench serve names, see _METRICS
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


# -- the run table ---------------------------------------------------------------------------

def _floats(text, file, row, col) -> list[float]:
    try:
        vals = [float(x) for x in str(text).replace(",", " ").split()]
    except ValueError:
        raise TwinInputError(f"expected space-separated numbers, got {text!r}", file=file,
                             row=row, field=col) from None
    if not vals:
        raise TwinInputError("empty list", file=file, row=row, field=col)
    return vals


def _num(df: pd.DataFrame, col: str, file: str, *, integer=False, positive=False,
         rows=None) -> np.ndarray:
    vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    check = np.ones(len(df), bool) if rows is None else rows
    bad = check & (~np.isfinite(vals) | ((vals != np.floor(vals)) if integer else False)
                   | ((vals <= 0) if positive else (vals < 0)))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        what = "a positive" if positive else "a non-negative"
        raise TwinInputError(f"expected {what} {'integer' if integer else 'number'}, got "
                             f"{df[col].iloc[row]!r}", file=file, row=row, field=col)
    return vals


def read_run_table(path: str | Path, *, ok_only: bool = True, need_metrics: bool = True,
                   seed_defaults: dict | None = None) -> list[RunSpec]:
    """Runs of a ``real_runs_*.csv`` table (one row per run) as :class:`RunSpec`.

    ``ok_only`` keeps rows whose ``status`` is ``ok`` and that carry no ``anomaly``. Row
    numbers in errors are the file's 0-based data rows. Server settings absent from the
    table take the paper's values (:func:`paper_server_defaults`).
    """
    file = str(path)
    if not Path(path).exists():
        raise TwinInputError("run table not found", file=file)
    try:
        df = pd.read_csv(path, low_memory=False)
    except Exception as exc:
        raise TwinInputError(f"cannot be read as CSV: {exc}", file=file) from exc
    need = RUN_CONFIG_COLUMNS + (RUN_METRIC_COLUMNS if need_metrics else ())
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise TwinInputError(f"missing column(s) {missing}; a run table needs "
                             f"{list(need)} (see shared/data/vllm-h100/README.md)",
                             file=file, field=missing[0])
    keep = np.ones(len(df), bool)
    if ok_only and "status" in df.columns:
        keep &= (df["status"].astype(str) == "ok").to_numpy()
    if ok_only and "anomaly" in df.columns:
        keep &= df["anomaly"].isna().to_numpy()
    ints = {c: _num(df, c, file, integer=True, rows=keep) for c in
            ("max_loras", "max_cpu_loras", "max_lora_rank", "n_adapters_rank8",
             "n_adapters_rank16", "n_adapters_rank32")}
    pin = _num(df, "pool_mean_input_tokens", file, positive=True, rows=keep)
    pout = _num(df, "pool_mean_output_tokens", file, positive=True, rows=keep)
    if need_metrics:
        mets = {c: _num(df, c, file, rows=keep) for c in
                ("duration_s", "total_throughput_tps", "mean_ttft_ms", "mean_itl_ms",
                 "mean_tpot_ms")}
    defaults = paper_server_defaults() | (seed_defaults or {})
    runs = []
    for row in np.flatnonzero(keep):
        row = int(row)
        r = df.iloc[row]
        values = _floats(r["rate_values_rps"], file, row, "rate_values_rps")
        counts = _floats(r["rate_counts"], file, row, "rate_counts")
        if len(values) != len(counts) or any(c < 0 or c != int(c) for c in counts):
            raise TwinInputError(f"rate_counts {r['rate_counts']!r} must be one non-negative "
                                 f"integer per value of rate_values_rps {r['rate_values_rps']!r}",
                                 file=file, row=row, field="rate_counts")
        if any(v <= 0 for v in values):
            raise TwinInputError(f"rates must be > 0 req/s, got {r['rate_values_rps']!r}",
                                 file=file, row=row, field="rate_values_rps")
        rates = {float(v): int(c) for v, c in zip(values, counts) if c}
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
        settings = dict(defaults)
        for c in ("max_num_seqs", "max_num_batched_tokens"):
            if c in df.columns and pd.notna(r[c]):
                settings[c] = int(r[c])
        try:
            cfg = ServingConfig(max_loras=int(ints["max_loras"][row]), max_cpu_loras=n,
                                max_lora_rank=int(ints["max_lora_rank"][row]),
                                preload_adapters=True, **settings)
        except TwinInputError as exc:
            raise TwinInputError(exc.detail, file=file, row=row, field=exc.field) from None
        cycle = None
        if "adapter_module_ranks_cycle" in df.columns and pd.notna(r["adapter_module_ranks_cycle"]):
            cycle = tuple(int(x) for x in _floats(r["adapter_module_ranks_cycle"], file, row,
                                                  "adapter_module_ranks_cycle"))
        metrics = {}
        for name, col in _METRICS.items():
            if col in df.columns and pd.notna(r[col]):
                v = pd.to_numeric(r[col], errors="coerce")
                if pd.notna(v):
                    metrics[name] = float(v)
        extra = {c: r[c] for c in _OPTIONAL if c in df.columns and pd.notna(r[c])}
        key = str(r["source_path"]) if "source_path" in df.columns and pd.notna(
            r.get("source_path")) else f"{Path(file).name}:{row}"
        runs.append(RunSpec(key=key, config=cfg, ranks=ranks, rates=rates,
                            pool_means=(float(pin[row]), float(pout[row])),
                            duration_s=float(mets["duration_s"][row]) if need_metrics else 3600.0,
                            metrics=metrics, extra=extra, rank_cycle=cycle, source=file,
                            row=row))
    return runs


# -- vllm bench serve --save-result JSON -------------------------------------------------------

_BENCH_REQUIRED = ("completed", "total_input_tokens", "total_output_tokens", "duration",
                   "mean_ttft_ms", "mean_itl_ms", "mean_tpot_ms")
#: What a bench JSON cannot tell and the user must give (JSON metadata or sidecar YAML).
BENCH_SIDECAR_KEYS = {
    "max_loras": "GPU adapter slots (vllm serve --max-loras)",
    "max_cpu_loras": "adapters served, all receiving traffic (--max-cpu-loras)",
    "max_lora_rank": "--max-lora-rank",
    "adapter_ranks": "ranks of the served adapters: a list, or {rank: count}",
    "adapter_rates_rps": "per-adapter Poisson rates: a list, or {rate: count}; default: "
                         "request_rate split evenly over the adapters",
    "pool_mean_input_tokens": "mean prompt tokens of the request pool (default: "
                              "total_input_tokens / completed)",
    "pool_mean_output_tokens": "mean output tokens of the request pool (default: "
                               "total_output_tokens / completed)",
    "max_num_seqs / max_num_batched_tokens / gpu_memory_utilization / max_model_len":
        "server settings (default: vLLM's, see twin.config.ServingConfig)",
}


def _as_counts(value, what: str, file: str) -> dict:
    out = _parse_counts(value, what, file)
    bad = [k for k, c in out.items() if not (math.isfinite(k) and k > 0) or c < 0]
    if bad:
        raise TwinInputError(f"expected positive finite values and non-negative counts, got "
                             f"{value!r}", file=file, field=what)
    return out


def _parse_counts(value, what: str, file: str) -> dict:
    if isinstance(value, dict):
        try:
            return {float(k): int(v) for k, v in value.items() if int(v)}
        except (TypeError, ValueError, OverflowError):
            raise TwinInputError(f"expected {{value: count}}, got {value!r}", file=file,
                                 field=what) from None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if isinstance(value, (list, tuple)):
        out: dict = {}
        try:
            for v in value:
                out[float(v)] = out.get(float(v), 0) + 1
        except (TypeError, ValueError):
            raise TwinInputError(f"expected a list of numbers, got {value!r}", file=file,
                                 field=what) from None
        return out
    raise TwinInputError(f"expected a list or a {{value: count}} mapping, got {value!r}",
                         file=file, field=what)


def read_bench_results(paths, sidecar: str | Path | dict | None = None) -> list[RunSpec]:
    """Runs from ``vllm bench serve --save-result`` JSON files (one run per file).

    The JSON gives the metrics (``completed``, ``total_input_tokens``, ``total_output_tokens``,
    ``duration``, ``mean_ttft_ms``, ``mean_tpot_ms``, ``mean_itl_ms``, ``request_rate``, ...)
    but not the server's LoRA settings nor the adapters' ranks and rates; those are read from
    the JSON's top level (``vllm bench serve --metadata max_loras=8 max_cpu_loras=32
    max_lora_rank=16 adapter_ranks=8,16 ...``) and then from ``sidecar``: a YAML (or dict)
    with the same keys, either flat (applies to every file) or under ``runs: {file name:
    {...}}``. Keys: :data:`BENCH_SIDECAR_KEYS`.
    """
    side = _load_sidecar(sidecar)
    runs = []
    for p in ([paths] if isinstance(paths, (str, Path)) else list(paths)):
        file = str(p)
        if not Path(p).exists():
            raise TwinInputError("bench result file not found", file=file)
        try:
            d = json.loads(Path(p).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TwinInputError(f"not valid JSON (expected a `vllm bench serve "
                                 f"--save-result` file): {exc}", file=file) from None
        if not isinstance(d, dict):
            raise TwinInputError("expected a JSON object", file=file)
        missing = [k for k in _BENCH_REQUIRED if k not in d]
        if missing:
            raise TwinInputError(f"missing key(s) {missing}; is this a `vllm bench serve "
                                 f"--save-result` file?", file=file, field=missing[0])
        info = {k: v for k, v in d.items() if not isinstance(v, (list, dict))}
        info.update({k: v for k, v in side.items() if k != "runs"})
        info.update((side.get("runs") or {}).get(Path(p).name) or {})
        runs.append(_bench_run(d, info, file))
    return runs


#: keys a sidecar may give (flat, or per file under ``runs``); values are checked where they
#: are read (numbers by ``num``, server settings by ServingConfig's schema)
SIDECAR_KEYS = ("max_loras", "max_cpu_loras", "max_lora_rank", "adapter_ranks",
                "adapter_rates_rps", "pool_mean_input_tokens", "pool_mean_output_tokens",
                "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
                "max_model_len", "block_size", "preload_adapters", "request_rate", "duration",
                "completed", "experiment_set")


def _sidecar_schemas():
    from pydantic import create_model

    from twin.schemas import Schema

    fields = {k: (Any, None) for k in SIDECAR_KEYS}
    run = create_model("SidecarRun", __base__=Schema, **fields)
    return create_model("Sidecar", __base__=Schema, runs=(dict[str, run] | None, None),
                        **fields)


def _load_sidecar(sidecar) -> dict:
    """The sidecar's mapping: an unknown key (a typo would silently leave a setting at its
    default) or ``runs`` that is not ``{file name: {key: value}}`` raises ``TwinInputError``."""
    if sidecar is None:
        return {}
    from twin.config import read_yaml_mapping
    from twin.schemas import validate

    source = "sidecar" if isinstance(sidecar, dict) else str(sidecar)
    data = sidecar if isinstance(sidecar, dict) else read_yaml_mapping(
        sidecar, missing="sidecar file not found")
    validate(_sidecar_schemas(), {str(k): v for k, v in data.items()}, source)
    return data


def _bench_run(d: dict, info: dict, file: str) -> RunSpec:
    def num(key, default=None, *, positive=False):
        v = info.get(key, d.get(key, default))
        if v is None:
            raise TwinInputError(f"needs {key!r} ({BENCH_SIDECAR_KEYS.get(key, key)}): give it "
                                 "with `vllm bench serve --metadata` or in the sidecar YAML",
                                 file=file, field=key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise TwinInputError(f"expected a number, got {v!r}", file=file, field=key) from None
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise TwinInputError(f"expected a {'positive' if positive else 'non-negative'} "
                                 f"number, got {v!r}", file=file, field=key)
        return v

    completed = num("completed", positive=True)
    settings = {}
    for k in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_num_seqs",
              "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization",
              "block_size"):
        if k in info:
            settings[k] = info[k]
    for k in ("max_loras", "max_lora_rank"):
        if k not in settings:
            num(k)  # raises with the hint
    settings["preload_adapters"] = info.get("preload_adapters", True)   # "false" is false
    try:
        cfg = ServingConfig.from_dict(settings, source=file)
    except TwinInputError as exc:
        raise TwinInputError(exc.detail, file=file, field=exc.field) from None
    if "adapter_ranks" in info:
        ranks = _as_counts(info["adapter_ranks"], "adapter_ranks", file)
        if any(not k.is_integer() for k in ranks):
            raise TwinInputError(f"ranks are integers, got {info['adapter_ranks']!r}",
                                 file=file, field="adapter_ranks")
        ranks = {int(k): v for k, v in ranks.items()}
    else:
        ranks = {cfg.max_lora_rank: cfg.max_cpu_loras}
    n = sum(ranks.values())
    if n != cfg.max_cpu_loras:
        raise TwinInputError(f"adapter_ranks name {n} adapters, max_cpu_loras is "
                             f"{cfg.max_cpu_loras}", file=file, field="adapter_ranks")
    if "adapter_rates_rps" in info:
        rates = _as_counts(info["adapter_rates_rps"], "adapter_rates_rps", file)
    else:
        rate = num("request_rate", positive=True)
        if not math.isfinite(rate):
            raise TwinInputError("request_rate is inf: the twin needs Poisson rates; give "
                                 "adapter_rates_rps", file=file, field="request_rate")
        rates = {rate / n: n}
    if sum(rates.values()) != n:
        raise TwinInputError(f"adapter_rates_rps name {sum(rates.values())} adapters, "
                             f"max_cpu_loras is {n}", file=file, field="adapter_rates_rps")
    duration = num("duration", positive=True)
    tin, tout = num("total_input_tokens"), num("total_output_tokens")
    pin = num("pool_mean_input_tokens", tin / completed, positive=True)
    pout = num("pool_mean_output_tokens", tout / completed, positive=True)
    total = num("total_token_throughput", (tin + tout) / duration)
    metrics = {"total_throughput": total, "completed": completed}
    for k in ("mean_ttft_ms", "mean_itl_ms", "mean_tpot_ms", "median_ttft_ms",
              "median_itl_ms", "median_tpot_ms", "p99_ttft_ms", "p99_itl_ms"):
        if d.get(k) is not None:
            metrics[k] = num(k)
    return RunSpec(key=Path(file).name, config=cfg, ranks=ranks, rates=rates,
                   pool_means=(pin, pout), duration_s=duration, metrics=metrics,
                   extra={"experiment_set": info.get("experiment_set", "bench")},
                   source=file)


# -- workload reconstruction ------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _pool_cached(path: str, mean_in: float, mean_out: float) -> np.ndarray:
    from twin.workload.public import sharegpt_length_pool

    pool = sharegpt_length_pool(path, target_means=(mean_in, mean_out))
    pool.setflags(write=False)
    return pool


def length_pool(pool_means: tuple, path: str | Path | None = None) -> np.ndarray:
    """ShareGPT (prompt, output) pool under vLLM's benchmark filter (prompt 4..1024,
    prompt + output <= 2048), rescaled to ``pool_means`` (cached per means)."""
    if path is None:
        from twin.workload.public import SHAREGPT_FILE, shared_trace_path

        path = shared_trace_path(SHAREGPT_FILE)
    return _pool_cached(str(path), round(float(pool_means[0]), 2),
                        round(float(pool_means[1]), 2))


def _adapter_ranks(spec: RunSpec, rng: np.random.Generator) -> np.ndarray:
    """Ranks per adapter: the rank cycle over the adapters (as the fork's server builds
    them), then shuffled; the counts are the run's."""
    ranks = np.concatenate([np.full(c, r, dtype=np.int64)
                            for r, c in sorted(spec.ranks.items())])
    return rng.permutation(ranks)


def _adapter_rates(spec: RunSpec, rng: np.random.Generator) -> np.ndarray:
    rates = np.concatenate([np.full(c, r, dtype=np.float64)
                            for r, c in sorted(spec.rates.items())])
    return rng.permutation(rates)


def reconstruct(spec: RunSpec, *, seed: int = 0, window_s: float | None = None,
                pool: np.ndarray | None = None, sharegpt_path: str | Path | None = None):
    """The run's workload: (trace, catalog).

    ``window_s`` (default: the run's duration, floored to whole seconds as the client's time
    limit) bounds the Poisson arrivals. Rank and rate assignment are shuffled independently,
    so rank and rate are associated at random as in the real client.
    """
    window = float(window_s if window_s is not None else math.floor(spec.duration_s))
    rng = np.random.default_rng([seed, 0x7A11])
    n = spec.n_adapters
    names = adapter_names(n, prefix="lora")
    ranks = _adapter_ranks(spec, rng)
    rates = _adapter_rates(spec, rng)
    t, idx = renewal_arrivals(rates, window, rng=rng)
    if pool is None:
        pool = length_pool(spec.pool_means, sharegpt_path)
    lens = pool[rng.integers(0, len(pool), size=len(t))]
    trace = pd.DataFrame({"request_id": np.arange(len(t), dtype=np.int64), "arrival_s": t,
                          "adapter": pd.array(names[idx], dtype="string"),
                          "prompt_tokens": lens[:, 0].astype(np.int32),
                          "output_tokens": lens[:, 1].astype(np.int32)})
    trace = validate_trace(trace, source=f"reconstruct({spec.key})")
    catalog = AdapterCatalog(pd.DataFrame({"adapter": names, "rank": ranks}),
                             source=f"reconstruct({spec.key})")
    return trace, catalog


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

"""Runs from the JSON that ``vllm bench serve --save-result`` writes, as :class:`RunSpec`.

That JSON holds the metrics but not the server's settings nor the per-adapter rates; they
come from the JSON's own top-level keys (``vllm bench serve --metadata max_loras=8 ...``
puts them there) or from a YAML sidecar (see :func:`read_bench_results`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from pydantic import create_model

from twin.calibrate.run_spec import RunSpec
from twin.calibrate.tables import POSITIVE_METRICS
from twin.config import ServingConfig, read_yaml_mapping
from twin.errors import TwinInputError
from twin.schemas import Schema, validate

__all__ = ["read_bench_results", "BENCH_SIDECAR_KEYS", "SIDECAR_KEYS"]

_BENCH_REQUIRED = ("completed", "total_input_tokens", "total_output_tokens", "duration",
                   "mean_ttft_ms", "mean_itl_ms", "mean_tpot_ms")
#: What a bench JSON cannot tell and the user must give (JSON metadata or sidecar YAML).
BENCH_SIDECAR_KEYS = {
    "max_loras": "GPU adapter slots (vllm serve --max-loras)",
    "max_cpu_loras": "adapters served, all receiving traffic (--max-cpu-loras)",
    "max_lora_rank": "--max-lora-rank",
    "adapter_ranks": "ranks of the served adapters: a list (one per adapter), or {rank: "
                     "count} (--metadata: RANK:COUNT,...)",
    "adapter_rates_rps": "per-adapter Poisson rates: a list, or {rate: count} (RATE:COUNT,"
                         "...); default: "
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
    if isinstance(value, str) and ":" in value:   # --metadata adapter_ranks=8:16,16:16
        try:
            pairs = [kv.split(":") for kv in value.replace(",", " ").split()]
            return {float(k): int(c) for k, c in pairs if int(c)}
        except ValueError:
            raise TwinInputError(f"expected VALUE:COUNT[,VALUE:COUNT...] or a list of "
                                 f"numbers, got {value!r}", file=file, field=what) from None
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
    max_lora_rank=16 adapter_ranks=8:16,16:16``: 16 adapters of rank 8 and 16 of rank 16;
    a list names one rank per adapter, ``adapter_ranks=8,8,16,16`` with
    ``max_cpu_loras=4``) and then from ``sidecar``: a YAML (or dict) with the same keys,
    either flat (applies to every file) or under ``runs: {file: {...}}``, the file named by
    its name or its path as given (a key that names no given file is refused). Keys:
    :data:`BENCH_SIDECAR_KEYS`. Runs measured with ``--max-concurrency`` or
    ``--burstiness`` other than 1 are refused: the twin replays open-loop Poisson arrivals.
    """
    side = _load_sidecar(sidecar)
    side_file = "sidecar" if sidecar is None or isinstance(sidecar, dict) else str(sidecar)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    runs, used = [], set()
    for p in paths:
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
        info = _top_level(d, file)
        info.update({k: v for k, v in side.items() if k != "runs"})
        info.update(_per_file(side.get("runs") or {}, p, used))
        _check_client(d, file)
        runs.append(_bench_run(d, info, file))
    unused = sorted(set(side.get("runs") or {}) - used)
    if unused:
        raise TwinInputError(f"runs: {unused} name(s) no given bench file (given: "
                             f"{[str(p) for p in paths]}); key the runs by the file's name "
                             "or its path as given", file=side_file, field=f"runs.{unused[0]}")
    return runs


#: the per-adapter keys a bench JSON's top level may hold as a list or {value: count}
_COUNT_KEYS = ("adapter_ranks", "adapter_rates_rps")


def _top_level(d: dict, file: str) -> dict:
    """The JSON's own settings (``--metadata``): its scalars and the adapters' lists or
    mappings. vLLM's per-request arrays (``ttfts``, ``itls``, ...) are not settings; a list
    under another settings key is refused, never dropped."""
    for k in SIDECAR_KEYS:
        if k not in _COUNT_KEYS and isinstance(d.get(k), (list, dict)):
            raise TwinInputError(f"expected one value, got {d[k]!r}", file=file, field=k)
    return {k: v for k, v in d.items() if k in _COUNT_KEYS or not isinstance(v, (list, dict))}


def _per_file(runs: dict, p, used: set) -> dict:
    """The sidecar's ``runs:`` entry of bench file ``p``: keyed by its name or its path as
    given (or the same file by another path); two keys for one file are refused."""
    keys = [k for k in runs if str(k) in (Path(p).name, str(p))
            or Path(str(k)).expanduser().resolve() == Path(p).resolve()]
    if len(keys) > 1:
        raise TwinInputError(f"runs: {keys} all name this file; give its settings once",
                             file=str(p), field=f"runs.{keys[1]}")
    used.update(keys)
    return dict(runs[keys[0]] or {}) if keys else {}


def _check_client(d: dict, file: str) -> None:
    """Client settings that make the measured workload other than the one the twin replays
    (open-loop Poisson arrivals at ``request_rate``) are refused; failed requests and a
    request rate the run's own completions contradict are warned about."""
    why = ("the twin replays open-loop Poisson arrivals; a run measured otherwise is "
           "another workload: calibrate on runs without it")
    if d.get("max_concurrency") is not None:
        raise TwinInputError(f"max_concurrency {d['max_concurrency']!r} caps the requests in "
                             f"flight (a closed loop): {why}", file=file,
                             field="max_concurrency")
    burst = d.get("burstiness", 1.0)
    if burst is not None and _number(burst) != 1.0:
        raise TwinInputError(f"burstiness {burst!r} (gamma arrivals; 1 is Poisson): {why}",
                             file=file, field="burstiness")
    if _number(d.get("failed", 0)) > 0:
        print(f"warning: {file}: {d['failed']} request(s) failed; the metrics cover the "
              "completed ones only", file=sys.stderr)
    rate, done, dur = (_number(d.get(k)) for k in ("request_rate", "completed", "duration"))
    if math.isfinite(rate) and rate > 0 and dur > 0 and done / dur > 1.25 * rate:
        print(f"warning: {file}: {done / dur:.3g} requests/s completed, more than the "
              f"request_rate {rate:g} sent: is request_rate this run's?", file=sys.stderr)


def _number(v) -> float:
    """``v`` as a float, NaN when it is none (the checks that use it then pass)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


#: keys a sidecar may give (flat, or per file under ``runs``); values are checked where they
#: are read (numbers by ``num``, server settings by ServingConfig's schema)
SIDECAR_KEYS = ("max_loras", "max_cpu_loras", "max_lora_rank", "adapter_ranks",
                "adapter_rates_rps", "pool_mean_input_tokens", "pool_mean_output_tokens",
                "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
                "max_model_len", "block_size", "preload_adapters", "request_rate", "duration",
                "completed", "experiment_set")


def _sidecar_schemas():
    fields = {k: (Any, None) for k in SIDECAR_KEYS}
    run = create_model("SidecarRun", __base__=Schema, **fields)
    return create_model("Sidecar", __base__=Schema, runs=(dict[str, run] | None, None),
                        **fields)


def _load_sidecar(sidecar) -> dict:
    """The sidecar's mapping: an unknown key (a typo would silently leave a setting at its
    default) or ``runs`` that is not ``{file name: {key: value}}`` raises ``TwinInputError``."""
    if sidecar is None:
        return {}
    source = "sidecar" if isinstance(sidecar, dict) else str(sidecar)
    data = sidecar if isinstance(sidecar, dict) else read_yaml_mapping(
        sidecar, missing="sidecar file not found")
    validate(_sidecar_schemas(), {str(k): v for k, v in data.items()}, source)
    return data


class _Fields:
    """One bench run's values: the sidecar's / metadata's (``info``) over the JSON's (``d``)."""

    def __init__(self, d: dict, info: dict, file: str):
        self.d, self.info, self.file = d, info, file

    def num(self, key, default=None, *, positive=False, why: str = "") -> float:
        """``key`` as a finite non-negative (``positive``: > 0) number; a missing one
        without ``default`` is refused with a hint where to give it (``why``: the message
        for a 0)."""
        v = self.info.get(key, self.d.get(key, default))
        if v is None:
            raise TwinInputError(f"needs {key!r} ({BENCH_SIDECAR_KEYS.get(key, key)}): give it "
                                 "with `vllm bench serve --metadata` or in the sidecar YAML",
                                 file=self.file, field=key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise TwinInputError(f"expected a number, got {v!r}", file=self.file,
                                 field=key) from None
        if why and v == 0:
            raise TwinInputError(f"{why} (got {v!r})", file=self.file, field=key)
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise TwinInputError(f"expected a {'positive' if positive else 'non-negative'} "
                                 f"number, got {v!r}", file=self.file, field=key)
        return v


def _bench_run(d: dict, info: dict, file: str) -> RunSpec:
    f = _Fields(d, info, file)
    completed = f.num("completed", positive=True)
    cfg = _bench_config(f)
    ranks, rates = _bench_adapters(f, cfg)
    duration = f.num("duration", positive=True, why=POSITIVE_METRICS["duration"])
    tin, tout = f.num("total_input_tokens"), f.num("total_output_tokens")
    pin = f.num("pool_mean_input_tokens", tin / completed, positive=True)
    pout = f.num("pool_mean_output_tokens", tout / completed, positive=True)
    total = f.num("total_token_throughput", (tin + tout) / duration, positive=True,
                  why=POSITIVE_METRICS["total_throughput"])
    metrics = {"total_throughput": total, "completed": completed}
    for k in ("mean_ttft_ms", "mean_itl_ms", "mean_tpot_ms", "median_ttft_ms",
              "median_itl_ms", "median_tpot_ms", "p99_ttft_ms", "p99_itl_ms"):
        if d.get(k) is not None or k in POSITIVE_METRICS:   # the fit's logs: > 0
            metrics[k] = f.num(k, positive=k in POSITIVE_METRICS,
                               why=POSITIVE_METRICS.get(k, ""))
    return RunSpec(key=Path(file).name, config=cfg, ranks=ranks, rates=rates,
                   pool_means=(pin, pout), duration_s=duration, metrics=metrics,
                   extra={"experiment_set": info.get("experiment_set", "bench"),
                          **{k: d[k] for k in ("model_id", "model") if d.get(k)}},
                   source=file)


def _bench_config(f: _Fields) -> ServingConfig:
    """The server's settings the run names (vLLM's defaults for the others)."""
    settings = {}
    for k in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_num_seqs",
              "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization",
              "block_size"):
        if k in f.info:
            settings[k] = f.info[k]
    for k in ("max_loras", "max_lora_rank"):
        if k not in settings:
            f.num(k)  # raises with the hint
    settings["preload_adapters"] = f.info.get("preload_adapters", True)   # "false" is false
    try:
        return ServingConfig.from_dict(settings, source=f.file)
    except TwinInputError as exc:
        raise TwinInputError(exc.detail, file=f.file, field=exc.field) from None


def _bench_adapters(f: _Fields, cfg: ServingConfig) -> tuple[dict, dict]:
    """({rank: adapters}, {per-adapter rate: adapters}), both naming every served adapter
    (default: all at ``max_lora_rank``, ``request_rate`` split evenly)."""
    info, file = f.info, f.file
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
        raw = f.info.get("request_rate", f.d.get("request_rate"))
        if str(raw).strip().lower() in ("inf", "infinity"):   # vllm bench serve's default
            raise TwinInputError("request_rate is inf (vllm bench serve's default: every "
                                 "request sent at once): the twin replays Poisson rates; give "
                                 "adapter_rates_rps (or --request-rate) in the sidecar",
                                 file=file, field="request_rate")
        rates = {f.num("request_rate", positive=True) / n: n}
    if sum(rates.values()) != n:
        raise TwinInputError(f"adapter_rates_rps name {sum(rates.values())} adapters, "
                             f"max_cpu_loras is {n}", file=file, field="adapter_rates_rps")
    return ranks, rates

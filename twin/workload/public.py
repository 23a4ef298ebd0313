"""Loaders that map the public traces in ``shared/data/traces/`` onto the trace contract.

Each loader returns a validated trace (:func:`twin.workload.schema.validate_trace`) and raises
:class:`~twin.errors.TwinInputError` naming the file, the 0-based data row and the *source*
column on bad input, so a user can open the file and find the problem. Sources, licences and
provenance: ``shared/data/traces/README.md``; bundled derivatives: ``traces/README.md``.

None of Azure 2023 or Mooncake names a tenant or adapter, so their traces come back with
``adapter`` null (base model); :func:`twin.workload.popularity.assign_adapters` tags them.
ServeGen's per-client statistics carry real tenants and are synthesised per tenant by
:func:`twin.workload.servegen.servegen_tenants` (its files are named here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.workload.schema import validate_trace
from twin.workload.values import INT32_MAX, exact_ints, require_columns

__all__ = [
    "shared_data_dir", "shared_trace_path", "load_azure2023", "load_mooncake",
    "sharegpt_length_pool",
    "AZURE_FILES", "MOONCAKE_FILES", "MOONCAKE_BLOCK_SIZE", "SERVEGEN_RATE_FILE",
    "SERVEGEN_LENGTH_FILE",
    "SHAREGPT_FILE", "VLLM_H100_POOL_MEANS",
]

AZURE_FILES = {"conv": "azure2023_conv.csv", "code": "azure2023_code.csv"}
MOONCAKE_FILES = {"conversation": "mooncake_conversation_trace.jsonl",
                  "synthetic": "mooncake_synthetic_trace.jsonl"}
#: tokens per Mooncake hash id (FAST'25 traces)
MOONCAKE_BLOCK_SIZE = 512
SERVEGEN_RATE_FILE = "servegen_client_rate_windows.csv.gz"
SERVEGEN_LENGTH_FILE = "servegen_client_length_quantiles.csv.gz"
SHAREGPT_FILE = "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
#: ShareGPT pool means (prompt, output) of the real vLLM-H100 runs of arXiv 2508.08343
#: (Llama-3.1-8B tokenizer; ``shared/data/vllm-h100/lengths_summary.csv``).
VLLM_H100_POOL_MEANS = (223.0, 196.0)


# -- locating the shared data ----------------------------------------------------------------

def shared_data_dir() -> Path:
    """The shared data folder (holding ``traces/`` and ``vllm-h100/``).

    ``$TWIN_SHARED_DATA`` if set, else ``../shared/data`` next to the repository root. The
    public traces are not part of the package (licences, size), hence the lookup.
    """
    env = os.environ.get("TWIN_SHARED_DATA")
    if env:
        path = Path(env).expanduser()
        hint = "$TWIN_SHARED_DATA points there"
    else:
        path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
        hint = "set TWIN_SHARED_DATA to the folder holding traces/ (e.g. shared/data)"
    if not path.is_dir():
        raise TwinInputError(f"shared data folder not found ({hint})", file=str(path))
    return path


def shared_trace_path(name: str) -> Path:
    """Path of one public trace file under ``<shared data>/traces/``; clear error if absent."""
    path = shared_data_dir() / "traces" / name
    if not path.exists():
        raise TwinInputError("public trace file not found (see shared/data/traces/README.md)",
                             file=str(path))
    return path


# -- checks that name the source file, row and column ------------------------------------------

def _tokens(df: pd.DataFrame, col: str, file: str) -> tuple[np.ndarray, int]:
    """A token-count column as exact int64 (never through float64; booleans, fractions,
    negatives and counts above int32 refused, naming the original value).

    Zeros are clipped to 1 (a request still takes one step); returns (values, n_clipped).
    """
    vals = exact_ints(df[col], file, col, 0, INT32_MAX, unit="token")
    zero = vals < 1
    return np.maximum(vals, 1), int(zero.sum())


def _check_arrivals(t: np.ndarray, file: str, field: str) -> None:
    """Non-negative, finite, non-decreasing: checked before any ``limit_s`` cut so that row
    numbers are the file's own."""
    bad = ~np.isfinite(t)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TwinInputError("missing or unparsable timestamp", file=file, row=row, field=field)
    if len(t) and (t < 0).any():
        row = int(np.flatnonzero(t < 0)[0])
        raise TwinInputError(f"timestamp must be >= 0, got {t[row]}", file=file, row=row,
                             field=field)
    if len(t) > 1 and (np.diff(t) < 0).any():
        row = int(np.flatnonzero(np.diff(t) < 0)[0]) + 1
        raise TwinInputError("timestamps must be non-decreasing (this row is earlier than the "
                             "one before it; sort the file by time)", file=file, row=row,
                             field=field)


def _finish(df: pd.DataFrame, file: str, limit_s: float | None) -> pd.DataFrame:
    if limit_s is not None:
        df = df[df["arrival_s"].to_numpy() < float(limit_s)].reset_index(drop=True)
    return validate_trace(df, source=file)


# -- Azure 2023 -------------------------------------------------------------------------------

def load_azure2023(path: str | Path, *, limit_s: float | None = None) -> pd.DataFrame:
    """Azure LLM inference trace 2023 (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``).

    ``arrival_s`` is seconds since the first timestamp; ``adapter`` is null (the trace names
    no tenant). Token counts of 0 are clipped to 1 (the shared copies of conv and code have
    none; a zero-token request still costs one step, and the contract needs >= 1); negative
    or fractional counts are errors. ``limit_s`` keeps arrivals in ``[0, limit_s)``.
    """
    file = str(path)
    if not Path(path).exists():
        raise TwinInputError("trace file not found", file=file)
    try:
        raw = pd.read_csv(path, dtype={"TIMESTAMP": "string"})
    except Exception as exc:
        raise TwinInputError(f"cannot be read as CSV: {exc}", file=file) from exc
    require_columns(raw, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), file)
    ts = pd.to_datetime(raw["TIMESTAMP"], errors="coerce", format="ISO8601")
    nat = ts.isna().to_numpy()
    if nat.any():
        row = int(np.flatnonzero(nat)[0])
        raise TwinInputError(f"cannot parse timestamp {raw['TIMESTAMP'].iloc[row]!r}",
                             file=file, row=row, field="TIMESTAMP")
    ns = ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    t = (ns - ns[0]) / 1e9 if len(ns) else np.zeros(0)
    _check_arrivals(t, file, "TIMESTAMP")
    prompt, _ = _tokens(raw, "ContextTokens", file)
    output, _ = _tokens(raw, "GeneratedTokens", file)
    df = pd.DataFrame({"arrival_s": t, "prompt_tokens": prompt, "output_tokens": output})
    return _finish(df, file, limit_s)


# -- Mooncake ---------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> pd.DataFrame:
    """Fast path via pandas; on failure, find the bad line so the error can name it."""
    try:
        return pd.read_json(path, lines=True, dtype=False)
    except ValueError as exc:
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TwinInputError(f"not valid JSON: {e.msg}", file=str(path),
                                         row=i) from exc
                if not isinstance(obj, dict):
                    raise TwinInputError("expected a JSON object per line", file=str(path),
                                         row=i) from exc
        raise TwinInputError(f"cannot be read as JSON lines: {exc}", file=str(path)) from exc


def load_mooncake(path: str | Path, *, limit_s: float | None = None,
                  hash_ids: bool = False) -> pd.DataFrame:
    """Mooncake (FAST'25) JSONL trace: ``timestamp`` (ms), ``input_length``, ``output_length``.

    ``arrival_s`` is seconds since the first timestamp (the conversation trace is bucketed to
    3 s ticks, so many arrivals tie). ``hash_ids=True`` keeps the ids of the requests'
    512-token blocks (column ``hash_ids``, block size in ``df.attrs["hash_block_size"]``: the
    prefix-caching contract of :mod:`twin.workload.prefix_columns`); off by default to keep
    traces small. Zero token counts are clipped to 1 as in :func:`load_azure2023`.
    """
    file = str(path)
    if not Path(path).exists():
        raise TwinInputError("trace file not found", file=file)
    raw = _read_jsonl(Path(path))
    need = ("timestamp", "input_length", "output_length") + (("hash_ids",) if hash_ids else ())
    require_columns(raw, need, file)
    ms = pd.to_numeric(raw["timestamp"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(ms)
    if bad.any():  # report the raw value, not the shifted one
        row = int(np.flatnonzero(bad)[0])
        raise TwinInputError(f"expected milliseconds, got {raw['timestamp'].iloc[row]!r}",
                             file=file, row=row, field="timestamp")
    if len(ms) and (ms < 0).any():
        row = int(np.flatnonzero(ms < 0)[0])
        raise TwinInputError(f"timestamp must be >= 0, got {ms[row]}", file=file, row=row,
                             field="timestamp")
    t = (ms - ms[0]) / 1000.0 if len(ms) else ms
    _check_arrivals(t, file, "timestamp")
    prompt, _ = _tokens(raw, "input_length", file)
    output, _ = _tokens(raw, "output_length", file)
    df = pd.DataFrame({"arrival_s": t, "prompt_tokens": prompt, "output_tokens": output})
    if hash_ids:
        df["hash_ids"] = raw["hash_ids"].to_numpy()
        df.attrs["hash_block_size"] = MOONCAKE_BLOCK_SIZE
    return _finish(df, file, limit_s)


# -- ShareGPT length pool ---------------------------------------------------------------------

def _clip_pool(p: np.ndarray, o: np.ndarray, max_prompt: int, max_total: int):
    p = np.clip(p, 4, max_prompt)
    o = np.clip(o, 4, np.maximum(max_total - p, 4))
    return p, o


def sharegpt_length_pool(path: str | Path, *, max_prompt: int = 1024, max_total: int = 2048,
                         target_means: tuple[float, float] | None = None) -> np.ndarray:
    """ShareGPT (prompt, output) pairs under vLLM's benchmark filter, as an int array (n, 2).

    Filter (vLLM ``benchmark_serving`` ShareGPT): 4 <= prompt <= ``max_prompt``,
    output >= 4, prompt + output <= ``max_total``. The shared stats file is whole
    conversations in the Llama-2 tokenizer (the filter leaves 11,035 pairs averaging
    378 / 419 tokens), while the vLLM-H100 runs used first-two-turn pools in the Llama-3
    tokenizer averaging 223 / 196 (:data:`VLLM_H100_POOL_MEANS`). ``target_means=(p, o)``
    keeps the file's *shape* and moves its means: each column is multiplied by one factor,
    rounded and clipped back into the filter (prompt in [4, max_prompt], output in
    [4, max_total - prompt]); since clipping moves the mean, the factors are refined by a few
    fixed-point steps (factor *= target / achieved) until both means are within 0.5 token.
    Row order is the file's, so pools are deterministic.
    """
    file = str(path)
    if not Path(path).exists():
        raise TwinInputError("ShareGPT stats file not found", file=file)
    raw = pd.read_csv(path)
    require_columns(raw, ("num_prefill_tokens", "num_decode_tokens"), file)
    p, _ = _tokens(raw, "num_prefill_tokens", file)
    o, _ = _tokens(raw, "num_decode_tokens", file)
    keep = (p >= 4) & (p <= max_prompt) & (o >= 4) & (p + o <= max_total)
    p, o = p[keep].astype(np.float64), o[keep].astype(np.float64)
    if not len(p):
        raise TwinInputError("no request survives the length filter", file=file)
    if target_means is not None:
        tp, to = map(float, target_means)
        if not (4 <= tp <= max_prompt and 4 <= to <= max_total - 4):
            raise TwinInputError(f"target means {target_means} outside the filter's range",
                                 field="target_means")
        sp, so = tp / p.mean(), to / o.mean()
        for _ in range(50):
            pp, oo = _clip_pool(np.rint(p * sp), np.rint(o * so), max_prompt, max_total)
            ep, eo = tp / pp.mean(), to / oo.mean()
            if abs(pp.mean() - tp) < 0.5 and abs(oo.mean() - to) < 0.5:
                break
            sp, so = sp * ep, so * eo
        p, o = pp, oo
    return np.column_stack([p, o]).astype(np.int64)

"""The executor's inputs, resolved and checked before anything runs: the trace (validated,
scaled, cropped), the adapter catalog (with each adapter's PEFT directory), adapters the
trace names but the catalog lacks, each adapter's directory, and the synthetic prompt of
each request.

Apart from the serving loop (``engine.py``) because these run once, up front, and are used
by callers that never serve (``twin validate`` resolves the catalog the same way).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from twin.config import ServingConfig, refuse_unserved_adapters
from twin.errors import TwinInputError
from twin.executor.adapters import (CONFIG_NAME, AdapterError, adapter_catalog,
                                    read_adapter_config, weights_path)
from twin.results.results import crop_window
from twin.workload.catalog import AdapterCatalog
from twin.workload.schema import validate_trace


def prompt_token_ids(request_id: int, length: int, vocab: int, seed: int = 0) -> list[int]:
    """Deterministic synthetic prompt of ``length`` ids for a request (the trace holds
    lengths only). Ids avoid 0..2 (usual pad/bos/eos) when the vocabulary allows."""
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, int(request_id) & 0x7FFFFFFFFFFFFFFF])
    low = 3 if vocab > 16 else 0
    return rng.integers(low, vocab, size=int(length)).tolist()


def request_token_ids(r, vocab: int, seed: int = 0, memo: dict | None = None) -> list[int]:
    """The token ids request ``r`` is known to hold: its prompt, and, where its
    ``hash_ids`` name them, its output tokens too (a multi-turn trace names a turn's output
    as part of the next turn's prompt). Tokens named by hash ids come from the hash id and
    the offset in its block only, so equal hash prefixes are equal tokens, whatever the
    adapter (the prefix cache keeps adapters apart, not the tokens); the rest of the prompt
    is :func:`prompt_token_ids`. ``memo``: hash id -> its block's tokens, for a run."""
    toks = prompt_token_ids(r.request_id, r.prompt, vocab, seed)
    if r.hash_ids is None:
        return toks
    size, memo = r.hash_block_size, {} if memo is None else memo
    n = min(len(r.hash_ids) * size, r.prompt + r.output)
    named = []
    for h in r.hash_ids[:-(-n // size)]:
        block = memo.get(h)
        if block is None:
            block = memo[h] = prompt_token_ids(h, size, vocab, seed + 1)
        named += block
    return named[:n] + toks[n:]


def checked_inputs(trace: pd.DataFrame, config: ServingConfig, catalog, *,
                   time_scale: float = 1.0, window_s: float | None = None,
                   trace_source: str = "trace") -> tuple[pd.DataFrame, AdapterCatalog]:
    """The trace and catalog an executor run serves, refused before anything is built if
    they cannot be served: the trace validated, its arrivals scaled by ``time_scale`` and
    cropped to the window; the catalog resolved (:func:`resolve_catalog`) and covering
    every adapter the trace names (a base-model server refuses adapter requests, as
    vLLM answers them 404)."""
    if config.policy not in ("vllm", "slora"):   # slora: twin.executor.slora (issue 7)
        raise TwinInputError(f"the executor serves the vllm and slora policies only, not "
                             f"{config.policy!r} (other policies run in the twin)",
                             file="config", field="policy")
    trace = validate_trace(trace, source=trace_source)
    if time_scale != 1.0:
        if not time_scale > 0:
            raise TwinInputError(f"time_scale must be > 0, got {time_scale}", field="time_scale")
        trace = trace.assign(arrival_s=trace["arrival_s"] * float(time_scale))
    trace = crop_window(trace, window_s)
    if config.enable_lora:
        catalog = resolve_catalog(catalog, trace)
        check_unknown_adapters(trace, catalog, trace_source)
    else:
        refuse_unserved_adapters(config, trace, trace_source)
        catalog = resolve_catalog(None)
    return trace, catalog


def resolve_catalog(catalog, trace: pd.DataFrame | None = None) -> AdapterCatalog:
    """An :class:`AdapterCatalog` with a ``path`` per adapter, from an AdapterCatalog, a
    DataFrame (adapter, rank, path), a catalog file (CSV/Parquet) or a directory of PEFT
    adapters (its ``catalog.csv`` if present, else every sub-directory with a config).

    Relative paths are resolved against the catalog file's directory when they do not
    exist relative to the working directory.
    """
    base = None
    if catalog is None:
        if trace is not None and trace["adapter"].notna().any():
            raise TwinInputError("the trace names adapters but no adapters were given: pass "
                                 "a directory of PEFT adapters or a catalog with a 'path' "
                                 "column (or make synthetic ones: twin make-adapters)",
                                 field="adapters")
        return AdapterCatalog(pd.DataFrame({"adapter": pd.Series([], dtype="string"),
                                            "rank": pd.Series([], dtype="int64"),
                                            "path": pd.Series([], dtype="string")}),
                              source="none")
    if isinstance(catalog, (str, Path)):
        p = Path(catalog)
        if p.is_dir():
            if (p / "catalog.csv").is_file():
                base, catalog = p, AdapterCatalog.read(p / "catalog.csv")
            else:
                try:
                    df = adapter_catalog(p)
                except AdapterError as exc:
                    raise TwinInputError(str(exc), file=str(p)) from None
                if not len(df):
                    raise TwinInputError("no PEFT adapters (sub-directories with "
                                         f"{CONFIG_NAME}) and no catalog.csv", file=str(p))
                catalog = AdapterCatalog(df, source=str(p))
        else:
            base, catalog = p.parent, AdapterCatalog.read(p)
    elif isinstance(catalog, pd.DataFrame):
        catalog = AdapterCatalog(catalog)
    if not isinstance(catalog, AdapterCatalog):
        raise TypeError(f"catalog: expected an AdapterCatalog, DataFrame or path, got "
                        f"{type(catalog).__name__}")
    if len(catalog) and "path" not in catalog.table.columns:
        raise TwinInputError("the executor needs each adapter's PEFT directory: the catalog "
                             "has no 'path' column", file=catalog.source, field="path")
    if base is not None and len(catalog):
        t = catalog.table
        paths = []
        for v in t["path"]:
            if isinstance(v, str) and not Path(v).is_absolute() and not Path(v).exists() \
                    and (base / v).exists():
                v = str(base / v)
            paths.append(v)
        t["path"] = pd.array(paths, dtype="string")
    return catalog


def check_unknown_adapters(trace: pd.DataFrame, catalog: AdapterCatalog,
                           trace_source: str = "trace") -> None:
    """Refuse a trace that names an adapter the catalog lacks (before anything runs)."""
    names = trace["adapter"].dropna().unique()
    unknown = [a for a in names if a not in catalog]
    if unknown:
        row = int((trace["adapter"] == unknown[0]).fillna(False).to_numpy(bool).nonzero()[0][0])
        known = catalog.adapters
        hint = f"; the catalog has {known[:4]}{' ...' if len(known) > 4 else ''}"
        raise TwinInputError(f"unknown adapter {unknown[0]!r} ({len(unknown)} unknown in all, "
                             f"not in {catalog.source}){hint}", file=trace_source, row=row,
                             field="adapter")


def check_adapter_dir(path, adapter_id: str, max_lora_rank: int) -> str | None:
    """Cheap up-front check of a PEFT adapter (config and file presence, no weights read).
    Returns the error message, or None if the adapter looks servable."""
    try:
        if path is None or (isinstance(path, float) and math.isnan(path)) or pd.isna(path):
            raise AdapterError(adapter_id, "the catalog gives no path")
        p = Path(str(path))
        try:
            cfg = read_adapter_config(p, adapter_id)
        except OSError as exc:
            raise AdapterError(adapter_id, f"{p / CONFIG_NAME} is not valid JSON: "
                                           f"{exc}") from None
        if cfg["r"] > max_lora_rank:
            raise AdapterError(adapter_id, f"rank {cfg['r']} > max_lora_rank {max_lora_rank}; "
                                           f"raise --max-lora-rank to at least {cfg['r']}")
        weights_path(p, adapter_id)
    except AdapterError as exc:
        return str(exc)
    return None

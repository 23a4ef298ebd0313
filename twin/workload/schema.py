"""The trace contract (DESIGN §3) and its validation.

A trace is one row per request: ``request_id`` int64, ``arrival_s`` float64 (non-decreasing
seconds from the trace start), ``adapter`` string (null = base model), ``prompt_tokens``
int32 >= 1, ``output_tokens`` int32 >= 1. Parquet on disk; CSV accepted. Every check names
the file, the row (0-based data row) and the field. Optional prefix-caching columns
(``hash_ids`` with the block size in ``df.attrs``, ``session_id``, ``turn``):
:mod:`twin.workload.prefix_columns`; the block size travels in the Parquet file's
key-value metadata (``twin_trace_attrs``, JSON).
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from twin.argtypes import is_positive_number
from twin.errors import TwinInputError
from twin.outputs import staged_file, write_parquet
from twin.sched.request import BASE_MODEL
from twin.workload.prefix_columns import BLOCK_SIZE_ATTR, PREFIX_COLUMNS, check_prefix_columns
from twin.workload.values import (INT32_MAX, INT64_RANGE, exact_ints, exact_seconds,
                                  exact_strings)

TRACE_COLUMNS = {
    "request_id": "int64",
    "arrival_s": "float64",
    "adapter": "string",
    "prompt_tokens": "int32",
    "output_tokens": "int32",
}
#: Parquet key-value metadata key holding the trace's ``df.attrs`` that twin keeps (JSON)
ATTRS_META_KEY = "twin_trace_attrs"


def read_trace(path: str | Path) -> pd.DataFrame:
    """Read a Parquet or CSV trace and validate it; an empty trace (no requests) is refused,
    since every command that reads one would have nothing to serve."""
    path = Path(path)
    df = read_table(path, "trace", str_columns=tuple(TRACE_COLUMNS))
    out = validate_trace(df, source=str(path))
    if len(out) == 0:
        raise TwinInputError("the trace has no requests (0 rows); a trace "
                             "needs at least one request", file=str(path))
    return out


def read_table(path: Path, what: str, str_columns: tuple[str, ...]) -> pd.DataFrame:
    """A Parquet or CSV table read without any lossy conversion, for the validators.

    CSV: the ``str_columns`` are read as text (only an empty field is missing), so that
    integers are parsed exactly later (never through float64) and an adapter named "NA"
    stays "NA"; other columns (annotations) are read as pandas infers them. Parquet:
    integer columns with nulls stay integers (pandas would make them float64). Anything
    unreadable (missing, a directory, 0 bytes, not UTF-8, corrupt) raises TwinInputError.
    """
    if not path.exists():
        raise TwinInputError(f"{what} file not found", file=str(path))
    if path.is_dir():
        raise TwinInputError(f"is a directory; expected a {what} file (.parquet or .csv)",
                             file=str(path))
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv", ".gz"):
        raise TwinInputError(f"expected a .parquet or .csv {what}", file=str(path))
    try:
        if path.stat().st_size == 0:
            raise TwinInputError(f"the file is empty (0 bytes); expected a {what}",
                                 file=str(path))
        if suffix in (".parquet", ".pq"):
            return _read_parquet(path, str_columns)
        return _read_csv(path, str_columns)
    except TwinInputError:
        raise
    except UnicodeDecodeError:
        raise TwinInputError(f"is not UTF-8 text ({_first_non_utf8(path)}); save the {what} "
                             "as UTF-8", file=str(path)) from None
    except Exception as exc:  # pyarrow/pandas parse errors, unreadable files
        msg = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise TwinInputError(f"cannot be read as a {what}: {msg}", file=str(path)) from None


def _first_non_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 is (pandas reports it relative to a chunk)."""
    data = (gzip.open if path.suffix.lower() == ".gz" else open)(path, "rb").read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"byte {data[exc.start]:#04x} at offset {exc.start}, line {line}"
    return "undecodable bytes"


def _read_parquet(path: Path, exact_columns) -> pd.DataFrame:
    import pyarrow.parquet as pq   # lazy: +5 MB RSS, only for a Parquet file read

    table, pandas_attrs = _without_pandas_index(pq.read_table(path, use_pandas_metadata=True))
    meta = table.schema.metadata or {}

    def nullable(t):   # integers and booleans keep their type when the column has nulls
        if pa.types.is_integer(t):
            return pd.api.types.pandas_dtype(str(t).replace("int", "Int").replace("uInt", "UInt"))
        if pa.types.is_boolean(t):
            return pd.BooleanDtype()
        return None
    names = table.column_names
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TwinInputError("column appears twice", file=str(path), field=dup)
    exact = [c for c in names if c in exact_columns]
    df = table.select(exact).to_pandas(types_mapper=nullable)
    rest = [c for c in names if c not in exact_columns]
    if rest:
        other = table.select(rest).to_pandas()
        for c in rest:
            df[c] = other[c].to_numpy()
    out = df[names] if names else df
    out.attrs.update(pandas_attrs)   # pandas' to_parquet keeps df.attrs there
    attrs = meta.get(ATTRS_META_KEY.encode())
    if attrs:
        out.attrs.update(json.loads(attrs))
    return out


def _without_pandas_index(table: pa.Table) -> tuple[pa.Table, dict]:
    """A table that pandas wrote, its index as pandas saved it read as what it is, and the
    frame's ``attrs`` pandas kept: an unnamed index (``df[mask].to_parquet``) is no trace
    column and is dropped (its metadata named a column that a selection of the others
    then missed: a KeyError); a named one (``set_index("request_id")``) is a column, also
    when pandas kept only its range."""
    meta = table.schema.metadata or {}
    if b"pandas" not in meta:
        return table, {}
    pandas_meta = json.loads(meta[b"pandas"])
    for ix in pandas_meta.get("index_columns", []):
        if isinstance(ix, dict) and ix.get("kind") == "range" and ix.get("name") \
                and ix["name"] not in table.column_names:
            values = np.arange(ix["start"], ix["stop"], ix["step"], dtype=np.int64)
            table = table.append_column(str(ix["name"]), pa.array(values))
    table = table.drop_columns([n for n in table.column_names
                                if n.startswith("__index_level_")])
    table = table.replace_schema_metadata({k: v for k, v in meta.items() if k != b"pandas"})
    return table, dict(pandas_meta.get("attributes") or {})


def _read_csv(path: Path, text_columns) -> pd.DataFrame:
    header = pd.read_csv(path, nrows=0, encoding="utf-8").columns
    text = [c for c in header if c in text_columns]
    df = pd.read_csv(path, usecols=text, dtype=str, keep_default_na=False, encoding="utf-8",
                     encoding_errors="strict")
    rest = [c for c in header if c not in text_columns]
    if rest:
        other = pd.read_csv(path, usecols=rest, encoding="utf-8")
        for c in rest:
            df[c] = other[c].to_numpy()
    return df[list(header)]


def check_trace_name(path: str | Path, *, csv: bool) -> Path:
    """``path`` as a Path when its ending is one twin reads a trace back from (``.parquet``,
    ``.pq``; ``.csv`` where the writer offers CSV), else an error before anything is built
    or written (Parquet under ``t.json`` was written, then refused by every reader)."""
    path = Path(path)
    endings = (".parquet", ".pq", ".csv") if csv else (".parquet", ".pq")
    if path.suffix.lower() not in endings:
        kinds = "Parquet (.parquet) or CSV (.csv)" if csv else "Parquet (.parquet)"
        raise TwinInputError(f"a trace is written as {kinds}: give a name with that ending, "
                             "so that twin can read it back", file=str(path), field="--out")
    return path


def write_trace(df: pd.DataFrame, path: str | Path) -> Path:
    """Validate and write a trace as Parquet through :mod:`twin.outputs` (temp file, then
    rename; an existing ``path`` is replaced only when twin wrote it as a trace: the
    Parquet key-value metadata ``twin_output`` says so)."""
    path = check_trace_name(path, csv=False)
    df = validate_trace(df, source=str(path))
    keep = {k: df.attrs[k] for k in (BLOCK_SIZE_ATTR,) if k in df.attrs and "hash_ids" in df}
    meta = {ATTRS_META_KEY: json.dumps(keep)} if keep else None
    with staged_file(path, "trace") as tmp:
        write_parquet(df, tmp, "trace", metadata=meta)
    return path


def refuse_empty_window(trace: pd.DataFrame, window_s: float | None,
                        source: str = "trace") -> float | None:
    """A user's ``--window-s`` that ends before the first arrival sends nothing (``vllm bench
    serve`` with a time limit) and would report an empty run as a result: refused. So is
    one that runs far past the last arrival (:func:`window_runs_past`: more than
    :data:`WINDOW_PAST_TRACE_S` or 10% of the window): a window's rates are per second of
    the window, so the idle time dilutes the offered load and a backlog drains inside it (a
    server 3x too slow for a 300-s trace read "keeps up, 100%" over 3600 s). The engines
    crop with :func:`twin.results.crop_window` and accept any window (a probe's, a
    share's). Returns the window as a float (None: none), so a numpy scalar's type goes no
    further."""
    if window_s is None:
        return None
    if not is_positive_number(window_s):   # the API's; the CLI's flag checks its own
        raise TwinInputError(f"window_s must be a number of seconds > 0, got {window_s!r}",
                             file=source, field="window_s")
    window_s = float(window_s)
    first = float(trace["arrival_s"].min()) if len(trace) else 0.0
    if first > window_s:
        raise TwinInputError(f"the window ({window_s:g} s) ends before the first arrival "
                             f"({first:g} s): no request would be sent; give a window longer "
                             f"than {first:g} s, or none", file=source, field="window_s")
    last = float(trace["arrival_s"].max()) if len(trace) else 0.0
    if window_runs_past(window_s, last):
        raise TwinInputError(
            f"the window ({window_s:g} s) runs {window_s - last:.0f} s past the trace's last "
            f"arrival ({last:g} s): its rates are per second of the window, so that idle time "
            "dilutes the offered load and a backlog drains inside it (a server falling "
            f"behind would read 'keeps up'); give a window of at most {math.ceil(last):d} s, "
            "or none (the run goes on to the last request)", file=source, field="window_s")
    return window_s


#: how far past a trace's last arrival a window may run (or 10% of the window, if more)
WINDOW_PAST_TRACE_S = 60.0


def window_runs_past(window_s: float, last_arrival_s: float) -> bool:
    """Does a window run further past the last arrival than :data:`WINDOW_PAST_TRACE_S`
    or 10% of the window (whichever is more)? Then its per-window rates dilute the load."""
    return window_s > last_arrival_s + max(WINDOW_PAST_TRACE_S, 0.1 * window_s)


def validate_trace(df: pd.DataFrame, source: str = "trace") -> pd.DataFrame:
    """Check a trace against the contract and return it with canonical dtypes.

    ``request_id`` may be missing (then 0..n-1 is used). Raises :class:`TwinInputError`
    at the first bad row.
    """
    twice = df.columns[df.columns.duplicated()].unique().tolist()
    if twice:   # df[name] would be a frame, not a column
        raise TwinInputError(f"column(s) {twice} appear more than once; keep one of each",
                             file=source, field=str(twice[0]))
    if _canonical(df) and not any(c in df.columns for c in PREFIX_COLUMNS):
        _check_values(df, source)
        return df   # already in canonical dtypes: checked without a copy
    df = df.copy()
    if "request_id" not in df.columns:
        df.insert(0, "request_id", np.arange(len(df), dtype=np.int64))
    if "adapter" not in df.columns:
        df["adapter"] = pd.NA
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise TwinInputError(
            f"missing column(s) {missing}; a trace needs {list(TRACE_COLUMNS)}",
            file=source, field=missing[0])
    df["request_id"] = exact_ints(df["request_id"], source, "request_id", *INT64_RANGE)
    df["arrival_s"] = exact_seconds(df["arrival_s"], source, "arrival_s")
    for col in ("prompt_tokens", "output_tokens"):
        df[col] = exact_ints(df[col], source, col, 1, INT32_MAX, unit="token")
    arr = df["arrival_s"].to_numpy()
    if len(arr) and (arr < 0).any():
        row = int(np.flatnonzero(arr < 0)[0])
        raise TwinInputError(f"must be >= 0 seconds, got {arr[row]}", file=source, row=row,
                             field="arrival_s")
    if len(arr) > 1 and (np.diff(arr) < 0).any():
        row = int(np.flatnonzero(np.diff(arr) < 0)[0]) + 1
        raise TwinInputError(
            f"arrivals must be non-decreasing: {arr[row]} comes after {arr[row - 1]} "
            "(sort the trace by arrival_s)", file=source, row=row, field="arrival_s")
    _check_unique_ids(df["request_id"].to_numpy(), source)
    adapter = exact_strings(df["adapter"], source, "adapter")
    empty = (adapter.str.len() == 0).fillna(False).to_numpy()
    adapter[empty] = pd.NA
    blank = adapter.str.isspace().fillna(False).to_numpy()
    if blank.any():   # no model has such a name; the catalog would report its own row
        row = int(np.flatnonzero(blank)[0])
        raise TwinInputError(f"adapter id {adapter.iloc[row]!r} is only whitespace; leave "
                             "the cell empty for a base-model request", file=source, row=row,
                             field="adapter")
    named_base = (adapter == BASE_MODEL).fillna(False).to_numpy()
    if named_base.any():   # routing tables and reports would take it for base-model traffic
        row = int(np.flatnonzero(named_base)[0])
        raise TwinInputError(f"adapter id {BASE_MODEL!r} is how twin names the base model; "
                             "leave the cell empty for a base-model request, or rename the "
                             "adapter", file=source, row=row, field="adapter")
    out = pd.DataFrame({
        "request_id": df["request_id"].astype(np.int64).to_numpy(),
        "arrival_s": df["arrival_s"].astype(np.float64).to_numpy(),
        "adapter": adapter.to_numpy(),
        "prompt_tokens": df["prompt_tokens"].to_numpy().astype(np.int32),   # range checked
        "output_tokens": df["output_tokens"].to_numpy().astype(np.int32),
    })
    out["adapter"] = out["adapter"].astype("string")
    check_prefix_columns(df, out, source)   # hash_ids, session_id, turn: canonical forms
    extra = [c for c in df.columns if c not in TRACE_COLUMNS and c not in out.columns]
    for c in extra:  # keep annotations (e.g. tenant, rate class) untouched
        out[c] = df[c].to_numpy()
    out.attrs.update(df.attrs)   # trace metadata (e.g. the hash_ids' hash_block_size)
    return out


def _check_unique_ids(ids: np.ndarray, source: str) -> None:
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero(ids == ids[row])[0])
        raise TwinInputError(f"duplicate request_id {int(ids[row])} (also at row {first})",
                             file=source, row=row, field="request_id")


def _canonical(df: pd.DataFrame) -> bool:
    return all(c in df.columns and str(df[c].dtype) == t for c, t in TRACE_COLUMNS.items())


def _check_values(df: pd.DataFrame, source: str) -> None:
    """The value checks of validate_trace for a frame whose dtypes are already canonical."""
    def fail(mask, col, msg):
        row = int(np.flatnonzero(mask)[0])
        raise TwinInputError(msg.format(v=df[col].iloc[row]), file=source, row=row, field=col)

    arr = df["arrival_s"].to_numpy()
    if not np.isfinite(arr).all():
        fail(~np.isfinite(arr), "arrival_s", "expected a finite number, got {v}")
    for col in ("prompt_tokens", "output_tokens"):
        v = df[col].to_numpy()
        if (v < 1).any():
            fail(v < 1, col, "must be >= 1 token, got {v}")
    if (arr < 0).any():
        fail(arr < 0, "arrival_s", "must be >= 0 seconds, got {v}")
    if len(arr) > 1 and (np.diff(arr) < 0).any():
        mask = np.concatenate([[False], np.diff(arr) < 0])
        fail(mask, "arrival_s", "arrivals must be non-decreasing: {v} comes after an earlier "
             "larger value (sort the trace by arrival_s)")
    _check_unique_ids(df["request_id"].to_numpy(), source)
    if (df["adapter"].str.len() == 0).fillna(False).any():
        fail((df["adapter"].str.len() == 0).fillna(False).to_numpy(), "adapter",
             "empty adapter id (use null for the base model), got {v!r}")

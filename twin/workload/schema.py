"""The trace contract (DESIGN §3) and its validation.

A trace is one row per request: ``request_id`` int64, ``arrival_s`` float64 (non-decreasing
seconds from the trace start), ``adapter`` string (null = base model), ``prompt_tokens``
int32 >= 1, ``output_tokens`` int32 >= 1. Parquet on disk; CSV accepted. Every check names
the file, the row (0-based data row) and the field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from twin.errors import TwinInputError

TRACE_COLUMNS = {
    "request_id": "int64",
    "arrival_s": "float64",
    "adapter": "string",
    "prompt_tokens": "int32",
    "output_tokens": "int32",
}


def read_trace(path: str | Path) -> pd.DataFrame:
    """Read a Parquet or CSV trace and validate it."""
    path = Path(path)
    if not path.exists():
        raise TwinInputError("trace file not found", file=str(path))
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".gz"):
            df = pd.read_csv(path, dtype={"adapter": "string"}, keep_default_na=True)
        else:
            raise TwinInputError("expected a .parquet or .csv trace", file=str(path))
    except TwinInputError:
        raise
    except Exception as exc:  # pyarrow/pandas parse errors
        raise TwinInputError(f"cannot be read as a trace: {exc}", file=str(path)) from exc
    return validate_trace(df, source=str(path))


def write_trace(df: pd.DataFrame, path: str | Path) -> Path:
    """Validate and write a trace as Parquet through :mod:`twin.outputs` (temp file, then
    rename; an existing ``path`` is replaced only when twin wrote it as a trace: the
    Parquet key-value metadata ``twin_output`` says so)."""
    from twin.outputs import staged_file, write_parquet

    path = Path(path)
    df = validate_trace(df, source=str(path))
    with staged_file(path, "trace") as tmp:
        write_parquet(df, tmp, "trace")
    return path


def validate_trace(df: pd.DataFrame, source: str = "trace") -> pd.DataFrame:
    """Check a trace against the contract and return it with canonical dtypes.

    ``request_id`` may be missing (then 0..n-1 is used). Raises :class:`TwinInputError`
    at the first bad row.
    """
    if _canonical(df):
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
    for col in ("request_id", "arrival_s", "prompt_tokens", "output_tokens"):
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = vals.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise TwinInputError(f"expected a number, got {df[col].iloc[row]!r}",
                                 file=source, row=row, field=col)
        arr = vals.to_numpy(dtype=np.float64)
        if not np.isfinite(arr).all():
            row = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise TwinInputError(f"expected a finite number, got {arr[row]}",
                                 file=source, row=row, field=col)
        if col != "arrival_s":
            frac = arr != np.floor(arr)
            if frac.any():
                row = int(np.flatnonzero(frac)[0])
                raise TwinInputError(f"expected an integer, got {arr[row]}",
                                     file=source, row=row, field=col)
        df[col] = arr
    for col in ("prompt_tokens", "output_tokens"):
        arr = df[col].to_numpy()
        if (arr < 1).any():
            row = int(np.flatnonzero(arr < 1)[0])
            raise TwinInputError(f"must be >= 1 token, got {int(arr[row])}",
                                 file=source, row=row, field=col)
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
    ids = df["request_id"].to_numpy()
    if len(ids) != len(np.unique(ids)):
        dup = pd.Series(ids).duplicated().to_numpy()
        row = int(np.flatnonzero(dup)[0])
        raise TwinInputError(f"duplicate request_id {int(ids[row])}", file=source, row=row,
                             field="request_id")
    adapter = df["adapter"].astype("string")
    empty = (adapter.str.len() == 0).fillna(False).to_numpy()
    adapter[empty] = pd.NA
    out = pd.DataFrame({
        "request_id": df["request_id"].astype(np.int64).to_numpy(),
        "arrival_s": df["arrival_s"].astype(np.float64).to_numpy(),
        "adapter": adapter.to_numpy(),
        "prompt_tokens": df["prompt_tokens"].astype(np.int32).to_numpy(),
        "output_tokens": df["output_tokens"].astype(np.int32).to_numpy(),
    })
    out["adapter"] = out["adapter"].astype("string")
    extra = [c for c in df.columns if c not in TRACE_COLUMNS]
    for c in extra:  # keep annotations (e.g. tenant, rate class) untouched
        out[c] = df[c].to_numpy()
    return out


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
    ids = df["request_id"].to_numpy()
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        fail(dup, "request_id", "duplicate request_id {v}")
    if (df["adapter"].str.len() == 0).fillna(False).any():
        fail((df["adapter"].str.len() == 0).fillna(False).to_numpy(), "adapter",
             "empty adapter id (use null for the base model), got {v!r}")

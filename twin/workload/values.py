"""Exact values of the columns the twin reads: integers, seconds and ids, each checked
value by value where it must be, never through float64.

Every reader of a table (traces, the adapter catalog, the public traces) parses its columns
here, so a refusal names the file, the 0-based data row, the field and the ORIGINAL value
(booleans, dates, fractions, NaN/inf, text that is not a number, values out of range).
"""

from __future__ import annotations

import datetime as _dt
from decimal import Decimal, InvalidOperation

import numpy as np
import pandas as pd
import pyarrow as pa

from twin.errors import TwinInputError

INT64_RANGE = (-(2 ** 63), 2 ** 63 - 1)
INT32_MAX = 2 ** 31 - 1
_FLOAT_EXACT = 2 ** 53   # above this a float64 cannot hold every integer


def require_columns(df: pd.DataFrame, cols, file: str) -> None:
    """A table read from ``file`` has every column of ``cols``; else the first missing one is
    named."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise TwinInputError(f"missing column(s) {missing}; expected {list(cols)}",
                             file=file, field=missing[0])


def _kind(v) -> str | None:
    """Why a single value is not a number, or None when it may be one."""
    if v is None or v is pd.NA or v is pd.NaT:
        return "a missing value"
    if isinstance(v, (bool, np.bool_)):
        return f"a boolean ({v})"
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time, np.datetime64)):
        return f"a date/time ({v})"
    if isinstance(v, (_dt.timedelta, np.timedelta64)):
        return f"a duration ({v})"
    return None


def _column_kind(s: pd.Series) -> str | None:
    """Why a whole column cannot hold numbers, from its dtype (None: check the values)."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return "booleans"
    if pd.api.types.is_datetime64_any_dtype(s.dtype) or isinstance(s.dtype, pd.PeriodDtype):
        return "dates/times"
    if pd.api.types.is_timedelta64_dtype(s.dtype):
        return "durations"
    return None


def exact_ints(s: pd.Series, source: str, col: str, lo: int, hi: int,
               unit: str | None = None) -> np.ndarray:
    """A column as exact int64 values in [lo, hi], never through float64.

    Accepted: integers, integral floats up to 2**53, and text that is an exact integer
    ("12", "12.0", "1e3"). Refused, naming the row and the ORIGINAL value: missing values,
    booleans, dates, durations, fractions, NaN/inf, and values out of range.
    """
    def fail(row, why):
        raise TwinInputError(why, file=source, row=int(row), field=col)

    expected = f"an integer{' count of ' + unit + 's' if unit else ''}"
    why = _column_kind(s)
    if why is not None and len(s):
        fail(0, f"expected {expected}, got {why} (e.g. {s.iloc[0]})")
    if why is not None:
        return np.zeros(0, np.int64)
    if pd.api.types.is_integer_dtype(s.dtype) and not s.hasnans:
        vals = s.to_numpy()
        if vals.dtype == np.uint64:
            big = vals > np.uint64(hi)
            if big.any():
                row = int(np.flatnonzero(big)[0])
                fail(row, _range_msg(int(vals[row]), lo, hi, unit))
        vals = vals.astype(np.int64)
        bad = (vals < lo) | (vals > hi)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            fail(row, _range_msg(int(vals[row]), lo, hi, unit))
        return vals
    if pd.api.types.is_float_dtype(s.dtype) and isinstance(s.dtype, np.dtype):
        vals = s.to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(vals) | (vals != np.floor(vals)) | (np.abs(vals) > _FLOAT_EXACT)
        if not bad.any():
            ints = vals.astype(np.int64)
            out = (ints < lo) | (ints > hi)
            if out.any():
                row = int(np.flatnonzero(out)[0])
                fail(row, _range_msg(vals[row], lo, hi, unit))
            return ints
    fast = _parse_text(s, "int64")
    if fast is not None:
        bad = (fast < lo) | (fast > hi)
        if not bad.any():
            return fast
    # the general case (text, objects, nullable dtypes, suspicious floats): value by value
    out = np.empty(len(s), dtype=np.int64)
    for row, v in enumerate(s.to_numpy(dtype=object)):
        n = _exact_int(v)
        if isinstance(n, str):
            fail(row, f"expected {expected}, got {n}")
        if not lo <= n <= hi:
            fail(row, _range_msg(v, lo, hi, unit))
        out[row] = n
    return out


def _parse_text(s: pd.Series, to: str) -> np.ndarray | None:
    """A column of plain text parsed by Arrow in one go (strict: "12" for int64, correctly
    rounded decimals for float64), or None when any value is not plain text of that type --
    then the caller goes value by value and names the bad row. Keeps a million-row CSV
    trace at about a second."""
    if not (pd.api.types.is_string_dtype(s.dtype) or pd.api.types.is_object_dtype(s.dtype)):
        return None
    try:
        arr = pa.array(s, from_pandas=True)
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) \
                or arr.null_count:
            return None
        out = arr.cast(getattr(pa, to)()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError,
            ValueError):
        return None
    return out


def _range_msg(v, lo, hi, unit) -> str:
    if unit and lo == 1 and _num(v) < 1:
        return f"must be >= 1 {unit}, got {v}"
    if _num(v) < lo:
        return f"must be >= {lo}, got {v}"
    return f"is too large: got {v}, at most {hi} ({'int32' if hi == INT32_MAX else 'int64'})"


def _num(v):
    return Decimal(str(v).strip()) if isinstance(v, str) else v


def _exact_int(v):
    """``v`` as a Python int, or a description of why it is not an exact integer."""
    why = _kind(v)
    if why is not None:
        return why
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return f"{v}"
        if v != np.floor(v):
            return f"a fraction ({v!r})"
        if abs(v) > _FLOAT_EXACT:
            return (f"{v!r}, a float too large to hold an exact integer (above 2**53); store "
                    "it as an integer")
        return int(v)
    if isinstance(v, Decimal):
        d = v
    elif isinstance(v, str):
        t = v.strip()
        if not t:
            return "an empty field"
        try:
            return int(t, 10)
        except ValueError:
            pass
        try:
            d = Decimal(t)
        except InvalidOperation:
            return repr(v)
    else:
        return f"{v!r} ({type(v).__name__})"
    if not d.is_finite():
        return repr(v)
    if d != d.to_integral_value():
        return f"a fraction ({v!r})"
    return int(d)


def exact_seconds(s: pd.Series, source: str, col: str) -> np.ndarray:
    """Arrival times as float64 seconds from the trace start; dates, durations, booleans,
    text that is not a number, NaN and inf are refused."""
    def fail(row, why):
        raise TwinInputError(f"expected seconds from the trace start (a number), got {why}",
                             file=source, row=int(row), field=col)

    why = _column_kind(s)
    if why is not None:
        if len(s):
            fail(0, f"{why} (e.g. {s.iloc[0]}); convert to seconds since the first request")
        return np.zeros(0, np.float64)
    if (pd.api.types.is_float_dtype(s.dtype) or pd.api.types.is_integer_dtype(s.dtype)) \
            and not s.hasnans and isinstance(s.dtype, np.dtype):
        vals = s.to_numpy(dtype=np.float64)
    elif (vals := _parse_text(s, "float64")) is not None:
        pass
    else:
        vals = np.empty(len(s), dtype=np.float64)
        for row, v in enumerate(s.to_numpy(dtype=object)):
            why = _kind(v)
            if why is not None:
                fail(row, why)
            if isinstance(v, str):
                try:
                    v = float(v.strip())
                except ValueError:
                    fail(row, repr(v))
            elif not isinstance(v, (int, float, np.integer, np.floating, Decimal)):
                fail(row, f"{v!r} ({type(v).__name__})")
            try:
                vals[row] = float(v)
            except OverflowError:
                fail(row, f"{v!r}, too large for a float64")
    bad = ~np.isfinite(vals)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TwinInputError(f"expected a finite number of seconds, got {vals[row]}",
                             file=source, row=row, field=col)
    return vals


def exact_strings(s: pd.Series, source: str, col: str) -> pd.Series:
    """A column of ids as pandas strings: text as it is, integers as their digits, missing as
    NA; booleans, floats, dates and other objects are refused (they would be renamed)."""
    if pd.api.types.is_string_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype):
        return s.astype("string")
    if pd.api.types.is_integer_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("string")
    vals = s.to_numpy(dtype=object)
    out = []
    for row, v in enumerate(vals):
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            out.append(pd.NA)
        elif isinstance(v, str):
            out.append(v)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            out.append(str(int(v)))
        else:
            raise TwinInputError(f"expected a text id (or null), got {v!r} "
                                 f"({type(v).__name__})", file=source, row=row, field=col)
    return pd.Series(out, index=s.index, dtype="string")

"""Reading the measurement tables a calibration starts from (CSV files a user brings).

One reader and one numeric-column check serve every table (runs, KV capacities, adapter
loads), so each bad input is refused alike: ``TwinInputError`` naming the file, the 0-based
data row and the column, and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from twin.errors import TwinInputError

#: a run's metrics that the step-time fits take logs of (twin.calibrate.step_fit, fewrun):
#: each must be > 0, and a run that has a 0 cannot be fitted at all, so it is refused when
#: read (file, row, field) rather than dropped from one residual: it is the user's to drop
POSITIVE_METRICS = {
    "mean_itl_ms": "must be > 0 ms: a run whose requests generate one token has no ITL; "
                   "drop it",
    "mean_tpot_ms": "must be > 0 ms: a run whose requests generate one token has no TPOT; "
                    "drop it",
    "mean_ttft_ms": "must be > 0 ms: a first token takes time; is the run complete?",
    "total_throughput": "must be > 0 tokens/s: a run that served nothing cannot be fitted; "
                        "drop it",
    "duration": "must be > 0 s: a run of no time measured nothing; drop it",
}


def read_csv_table(path, need, what: str, *, hint: str = "", missing: str | None = None,
                   **read_kw) -> pd.DataFrame:
    """The CSV at ``path`` with at least the columns ``need`` (a ``what`` table; ``hint``
    is appended to the missing-column message, e.g. where the columns are documented;
    ``missing`` replaces the message for an absent file)."""
    file = str(path)
    if not Path(path).exists():
        raise TwinInputError(missing or f"{what} file not found", file=file)
    try:
        df = pd.read_csv(path, **read_kw)
    except Exception as exc:
        raise TwinInputError(f"cannot be read as CSV: {exc}", file=file) from exc
    absent = [c for c in need if c not in df.columns]
    if absent:
        raise TwinInputError(f"missing column(s) {absent}; a {what} table needs "
                             f"{list(need)}{hint}", file=file, field=absent[0])
    return df


def numeric_column(df: pd.DataFrame, col: str, file: str, rows=None, *, integer: bool = False,
                   positive: bool = False, why: str = "") -> np.ndarray:
    """Column ``col`` as float64; on the rows ``rows`` (a mask, default all) every value must
    be a finite non-negative (``positive``: > 0) number, a whole one with ``integer``
    (``why``: the message for a finite value out of range)."""
    vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    check = np.ones(len(df), bool) if rows is None else rows
    bad = check & (~np.isfinite(vals) | ((vals != np.floor(vals)) if integer else False)
                   | ((vals <= 0) if positive else (vals < 0)))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        what = "a positive" if positive else "a non-negative"
        if why and np.isfinite(vals[row]):
            raise TwinInputError(f"{why} (got {df[col].iloc[row]!r})", file=file, row=row,
                                 field=col)
        raise TwinInputError(f"expected {what} {'integer' if integer else 'number'}, got "
                             f"{df[col].iloc[row]!r}", file=file, row=row, field=col)
    return vals

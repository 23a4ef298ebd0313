"""The trace contract's optional prefix-caching columns (issue 17) and their checks.

A trace may carry, besides the five columns of :mod:`twin.workload.schema`:

- ``hash_ids``: per request, a list of integer ids of its token blocks in order, prompt first
  (Mooncake's form). Equal ids mean equal block content; a block past the prompt names the
  output tokens' block, so a multi-turn trace can say that turn k's prompt re-sends turn
  k-1's answer. The tokens per id are trace metadata, ``df.attrs["hash_block_size"]`` (512
  for Mooncake), kept in the Parquet file's key-value metadata: a trace with ``hash_ids``
  and no block size is refused, since nothing could tell which tokens an id covers. The ids
  must cover the prompt (``len * block >= prompt_tokens``) and no more than prompt and
  output (``len <= ceil((prompt + output) / block)``). A last, partial block holds the first
  tokens of the full block with the same id. A null row (None) is a request whose content is
  unknown: it shares nothing with anyone (the scheduler's contract). A block is reused only
  after the same preceding ids and for the same adapter: vLLM hashes blocks as a chain
  including the adapter (:mod:`twin.workload.prefix_stats`).
- ``session_id`` (int64) and ``turn`` (int32 >= 0): a multi-turn conversation's requests,
  turns numbered in arrival order. Both or neither.

Canonical forms: ``hash_ids`` a column of Python lists of ints (what Parquet, JSON and the
generators give, converted once here), the two ints as numpy int64 / int32. Every refusal
names the file, the 0-based row and the field.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.workload.values import INT32_MAX, INT64_RANGE, exact_ints

#: ``df.attrs`` key: tokens per hash id
BLOCK_SIZE_ATTR = "hash_block_size"
PREFIX_COLUMNS = ("hash_ids", "session_id", "turn")


def block_size(df: pd.DataFrame, source: str = "trace") -> int:
    """The trace's tokens per hash id, checked (a positive int)."""
    b = df.attrs.get(BLOCK_SIZE_ATTR)
    if b is None:
        raise TwinInputError(
            f"the trace has hash_ids but no block size: set df.attrs[{BLOCK_SIZE_ATTR!r}] "
            "to the tokens per hash id (512 for Mooncake); a Parquet trace written by twin "
            "keeps it", file=source, field=BLOCK_SIZE_ATTR)
    if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)) or b < 1:
        raise TwinInputError(f"must be a positive integer (tokens per hash id), got {b!r}",
                             file=source, field=BLOCK_SIZE_ATTR)
    return int(b)


def _as_lists(col: pd.Series, source: str) -> list:
    """Each row a Python list (tuples and numpy arrays converted) or None (null, NaN, NA);
    anything else refused."""
    out = []
    for i, v in enumerate(col.tolist()):
        if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
        elif isinstance(v, list):
            out.append(v)
        elif isinstance(v, np.ndarray) and v.ndim == 1:
            out.append(v.tolist())
        elif isinstance(v, tuple):
            out.append(list(v))
        else:
            raise TwinInputError(f"expected a list of integer block ids, got {str(v)[:60]!r}",
                                 file=source, row=i, field="hash_ids")
    return out


#: the block ids the prefix cache keys exactly: Python hashes an int n >= 0 as n modulo
#: 2^61 - 1 (and -1 as -2), so ids outside [0, 2^61 - 2] could name two prompts' blocks alike
HASH_ID_RANGE = (0, 2 ** 61 - 2)


def _first_bad_id(lists: list, source: str) -> None:
    lo, hi = HASH_ID_RANGE
    for i, ids in enumerate(lists):
        for x in ids or ():
            ok = isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
            if not ok or not lo <= int(x) <= hi:
                raise TwinInputError(f"block ids must be integers from 0 to 2^61 - 2, got "
                                     f"{str(x)[:40]!r}", file=source, row=i, field="hash_ids")


def check_hash_ids(df: pd.DataFrame, source: str) -> list:
    """``df["hash_ids"]`` in canonical form (lists of ints), checked against the prompt and
    output lengths and the block size."""
    block = block_size(df, source)
    lists = _as_lists(df["hash_ids"], source)
    null = np.fromiter((x is None for x in lists), dtype=bool, count=len(lists))
    flat = list(chain.from_iterable(ids for ids in lists if ids is not None))
    kinds = set(map(type, flat))
    if not kinds <= {int}:
        if not kinds <= {int, np.int64, np.int32, np.uint32, np.int16, np.int8}:
            _first_bad_id(lists, source)
        lists = [None if ids is None else [int(x) for x in ids] for ids in lists]
    try:   # the range, in one numpy pass
        ids = np.asarray(flat, dtype=np.int64)
        if ids.size and (ids.min() < HASH_ID_RANGE[0] or ids.max() > HASH_ID_RANGE[1]):
            _first_bad_id(lists, source)
    except OverflowError:
        _first_bad_id(lists, source)
    n = np.fromiter((len(x) if x is not None else 0 for x in lists), dtype=np.int64,
                    count=len(lists))
    prompt = df["prompt_tokens"].to_numpy(np.int64)
    total = prompt + df["output_tokens"].to_numpy(np.int64)
    short = (n * block < prompt) & ~null
    if short.any():
        r = int(np.flatnonzero(short)[0])
        raise TwinInputError(f"{n[r]} block ids of {block} tokens do not cover the prompt's "
                             f"{prompt[r]} tokens (need {-(-prompt[r] // block)})",
                             file=source, row=r, field="hash_ids")
    long = n > -(-total // block)
    if long.any():
        r = int(np.flatnonzero(long)[0])
        raise TwinInputError(f"{n[r]} block ids of {block} tokens are more than the prompt "
                             f"and output's {total[r]} tokens need ({-(-total[r] // block)})",
                             file=source, row=r, field="hash_ids")
    return lists


def check_sessions(df: pd.DataFrame, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``session_id`` (int64) and ``turn`` (int32 >= 0), both present, each session's turns
    strictly increasing in row (arrival) order."""
    have = [c for c in ("session_id", "turn") if c in df.columns]
    if len(have) == 1:
        miss = "turn" if have == ["session_id"] else "session_id"
        raise TwinInputError(f"column {have[0]!r} needs {miss!r} too (a multi-turn trace "
                             "names both)", file=source, field=miss)
    sid = exact_ints(df["session_id"], source, "session_id", *INT64_RANGE)
    turn = exact_ints(df["turn"], source, "turn", 0, INT32_MAX)
    order = np.lexsort((np.arange(len(sid)), sid))
    s, t = sid[order], turn[order]
    bad = (s[1:] == s[:-1]) & (t[1:] <= t[:-1])
    if bad.any():
        r = int(order[1:][bad][0])
        raise TwinInputError(f"session {sid[r]}: turn {turn[r]} does not come after the "
                             "session's earlier turns (turns must increase with arrival)",
                             file=source, row=r, field="turn")
    return sid.astype(np.int64), turn.astype(np.int32)


def check_prefix_columns(df: pd.DataFrame, out: pd.DataFrame, source: str) -> None:
    """Check the optional columns of ``df`` and write their canonical form into ``out``
    (the validated trace, same rows); copies the block size into ``out.attrs``."""
    if "hash_ids" in df.columns:
        lists = check_hash_ids(df, source)
        out.attrs[BLOCK_SIZE_ATTR] = block_size(df, source)
        out["hash_ids"] = pd.Series(lists, index=out.index, dtype=object)
    if "session_id" in df.columns or "turn" in df.columns:
        sid, turn = check_sessions(df, source)
        out["session_id"], out["turn"] = sid, turn

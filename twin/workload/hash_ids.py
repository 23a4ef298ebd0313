"""A trace's prefix annotation as the scheduler reads it: per request, the ids of its
consecutive ``hash_block_size``-token blocks (``Request.hash_ids``), prompt first.

Optional and backward compatible: a trace without a ``hash_ids`` column (or a row whose
value is missing) shares no prefix with anyone. The block size is trace metadata,
``df.attrs["hash_block_size"]`` (Mooncake's 512 tokens when absent). Both clocks build
their requests through :func:`request_hashes`.
"""

from __future__ import annotations

import pandas as pd

#: Mooncake's block of prompt tokens per hash id (its traces' metadata default)
DEFAULT_HASH_BLOCK_SIZE = 512


def request_hashes(trace: pd.DataFrame) -> tuple[list | None, int]:
    """(per row: a tuple of int hash ids or None; the hash block size in tokens).
    ``None`` for the list when the trace has no ``hash_ids`` column."""
    size = int(trace.attrs.get("hash_block_size", DEFAULT_HASH_BLOCK_SIZE))
    if "hash_ids" not in trace.columns:
        return None, size
    return [_ids(v) for v in trace["hash_ids"]], size


def _ids(v) -> tuple[int, ...] | None:
    if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
        return None
    return tuple(int(x) for x in v)

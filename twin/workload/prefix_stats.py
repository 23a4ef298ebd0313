"""How much of a trace an ideal prefix cache would serve, and how its sessions look.

:func:`prefix_share` is the trace's *shared-prefix fraction*: the share of prompt tokens
whose block an infinite prefix cache would already hold when the request arrives, under
vLLM V1's rules (``vllm/v1/core/kv_cache_manager.py`` ``get_computed_blocks``,
``kv_cache_utils.py`` ``hash_block_tokens``): blocks are hashed as a chain (a block hits
only if every block before it hits too), only full blocks are cached, a request can reuse at
most ``prompt_tokens - 1`` tokens (the last one is recomputed for its logits), and the hash
includes the adapter, so a block never hits across adapters (the base model, ``adapter``
null, is one more namespace). An earlier request leaves cached the full blocks of the
tokens it computed, its output included: ``prompt + output - 1`` tokens (vLLM caches decode
blocks as they fill; the last sampled token is never fed back, so never computed). A block
it held only in part is not cached, even if a later request holds all of it. "Earlier" is
the trace's row order, so a real server, whose cache is finite and which may not have
finished the earlier request, hits at most this often, counted in hash blocks. With hash
blocks larger than the KV block (Mooncake's 512 tokens against vLLM's 16), a server can also
reuse the leading KV blocks of a hash block an earlier request computed in part, which this
count leaves out. It is the ideal-cache hit rate, a workload feature that does not depend on
the server.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.workload.prefix_columns import block_size

__all__ = ["prefix_hit_tokens", "prefix_share", "prefix_groups", "session_summary"]


def _flat(lists: list, limit: int | None = None):
    """(ids, row, position) of every element of ``lists`` (None = no ids), at most
    ``limit`` leading ids per row, and the ids per row."""
    n = np.fromiter((0 if x is None else len(x) for x in lists), dtype=np.int64,
                    count=len(lists))
    if limit is not None:
        n = np.minimum(n, int(limit))
    rows = (x[:k] for x, k in zip(lists, n.tolist()) if k)
    ids = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(n.sum()))
    row = np.repeat(np.arange(len(n)), n)
    pos = np.arange(len(ids)) - np.repeat(np.cumsum(n) - n, n)
    return ids, row, pos, n


def _chain_keys(ids: np.ndarray, row: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """A dense id per element for the chain (its row's ids up to and including it): equal
    keys iff equal prefixes. One pass per block position, exact (no hashing)."""
    dense, uniq = pd.factorize(ids)
    n_ids = max(len(uniq), 1)
    key = np.empty(len(ids), dtype=np.int64)
    order = np.argsort(pos, kind="stable")
    bounds = np.searchsorted(pos[order], np.arange(int(pos.max(initial=-1)) + 2))
    next_key = 0
    for p in range(len(bounds) - 1):
        e = order[bounds[p]:bounds[p + 1]]
        parent = key[e - 1] if p else np.zeros(len(e), dtype=np.int64)
        codes, found = pd.factorize(parent * n_ids + dense[e])
        key[e] = codes + next_key
        next_key += len(found)
    return key


def prefix_hit_tokens(df: pd.DataFrame) -> np.ndarray:
    """Per request, the prompt tokens an ideal per-adapter prefix cache would serve (see
    the module doc); needs ``hash_ids`` and ``df.attrs["hash_block_size"]``."""
    if "hash_ids" not in df.columns:
        raise TwinInputError("the trace has no hash_ids column: nothing says which prompts "
                             "share tokens", field="hash_ids")
    block = block_size(df)
    ids, row, pos, n = _flat(df["hash_ids"].tolist())
    key = _chain_keys(ids, row, pos)
    adapter = pd.factorize(df["adapter"], use_na_sentinel=True)[0].astype(np.int64) + 1
    group = pd.factorize(adapter[row] * (int(key.max(initial=0)) + 1) + key)[0]
    prompt = df["prompt_tokens"].to_numpy(np.int64)
    computed = prompt + df["output_tokens"].to_numpy(np.int64) - 1
    full = (pos + 1) * block <= computed[row]      # what each request leaves cached
    first = np.full(int(group.max(initial=-1)) + 1, np.iinfo(np.int64).max)
    g, r = group[full], row[full]                  # rows ascend: the first is the earliest
    new = ~pd.Series(g).duplicated().to_numpy()
    first[g[new]] = r[new]
    hit = (first[group] < row) & (pos < ((prompt - 1) // block)[row])
    return np.bincount(row[hit], minlength=len(n)) * block


def prefix_share(df: pd.DataFrame) -> float:
    """The shared-prefix fraction: ideal-cache hit tokens / prompt tokens (0 for an empty
    trace). The recommender's workload feature and ``twin trace``'s summary use it."""
    prompt = df["prompt_tokens"].to_numpy(np.int64).sum()
    return float(prefix_hit_tokens(df).sum() / prompt) if prompt else 0.0


def session_summary(df: pd.DataFrame) -> dict:
    """Sessions, sessions per adapter (mean, max) and turns per session (mean, max) of a
    multi-turn trace; empty when the trace has no ``session_id``."""
    if "session_id" not in df.columns or not len(df):
        return {}
    sid = df["session_id"]
    turns = sid.value_counts()
    per_adapter = df.groupby(df["adapter"].fillna(""), sort=False)["session_id"].nunique()
    return {"sessions": int(len(turns)),
            "sessions_per_adapter_mean": float(per_adapter.mean()),
            "sessions_per_adapter_max": int(per_adapter.max()),
            "turns_mean": float(turns.mean()), "turns_max": int(turns.max())}


def prefix_groups(df: pd.DataFrame, blocks: int) -> np.ndarray:
    """A group code per request: equal iff the requests' first ``blocks`` hash ids are equal
    (a request with fewer ids is grouped by all of them, one without ids is alone).
    Tagging adapters per group keeps a conversation's turns, which re-send the same
    opening, on one adapter."""
    if "hash_ids" not in df.columns:
        raise TwinInputError("grouping by prefix needs a hash_ids column", field="hash_ids")
    if int(blocks) < 1:
        raise TwinInputError(f"need at least 1 block to group by, got {blocks}",
                             field="blocks")
    ids, row, pos, k = _flat(df["hash_ids"].tolist(), blocks)
    key = _chain_keys(ids, row, pos)
    last = key[np.maximum(np.cumsum(k) - 1, 0)] if len(key) else np.zeros(len(k), np.int64)
    return np.where(k > 0, last, -1 - np.arange(len(k)))   # no ids: a group of its own

"""Prompt-learning adapters in a paged KV cache: where a serving engine puts the virtual
tokens so that its outputs are PEFT's.

Both kinds make a sequence's context ``virtual_tokens`` longer, at its start, and its
real tokens take positions ``virtual_tokens, virtual_tokens + 1, ...``:

- prefix tuning: :func:`write_prefix_kv` writes the virtual keys/values into the
  sequence's first ``virtual_tokens`` cache slots once, before its first prefill chunk,
  which then starts at ``start_pos = virtual_tokens`` (nothing is computed for them; the
  keys are stored as given, unrotated, as transformers stores past keys);
- prompt tuning: the engine schedules :func:`scheduled_token_ids` (placeholders ahead of
  the prompt: ``virtual_tokens`` more prefill tokens) and the client replaces the
  placeholders' embeddings with ``ClientAdapter.after_embedding`` before the first layer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from twin.executor.peft_methods.kinds import VIRTUAL_TOKEN_ID, ClientAdapter


def prefix_tokens(adapter: ClientAdapter | None) -> int:
    """Cache slots a sequence's prefix (prefix tuning) takes: ``start_pos`` of its first
    real token. 0 for every other kind."""
    return adapter.virtual_tokens if adapter is not None and adapter.prefix_kv(0) is not None \
        else 0


def scheduled_token_ids(adapter: ClientAdapter | None, token_ids: Sequence[int]) -> list[int]:
    """The tokens an engine prefills for a prompt: with prompt tuning, ``virtual_tokens``
    placeholders first (their embeddings are replaced by ``after_embedding``)."""
    n = adapter.virtual_tokens if adapter is not None and \
        adapter.prompt_embeddings() is not None else 0
    return [VIRTUAL_TOKEN_ID] * n + list(token_ids)


def write_prefix_kv(adapter: ClientAdapter | None, kv_cache, block_table: Sequence[int]) -> int:
    """Write the adapter's prefix keys/values into positions ``0 .. n-1`` of the sequence
    whose KV blocks are ``block_table`` (``kv_cache``: ``twin.executor.model.KVCache``);
    returns ``n`` (:func:`prefix_tokens`), the ``start_pos`` of the first real token."""
    n = prefix_tokens(adapter)
    if n == 0:
        return 0
    bs = kv_cache.block_size
    need = -(-n // bs)
    if len(block_table) < need:
        raise ValueError(f"block table has {len(block_table)} blocks, {need} needed for "
                         f"{n} prefix tokens")
    blocks = torch.as_tensor(list(block_table[:need]), dtype=torch.int64)
    pos = torch.arange(n)
    slots = (blocks[pos // bs] * bs + pos % bs).to(kv_cache.k[0].device)
    for li, (kc, vc) in enumerate(zip(kv_cache.k, kv_cache.v)):
        k, v = adapter.prefix_kv(li)
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k.to(device=kc.device, dtype=kc.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v.to(device=vc.device, dtype=vc.dtype))
    return n

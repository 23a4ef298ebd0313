"""A plain forward pass over ``LlamaModel`` weights that brings adapters in through the
:class:`ClientAdapter` hooks: the reference the split executor's clients and the tests
against PEFT + transformers share.

No paging, no KV cache: each sequence is run whole. Several sequences (each with its own
adapter, of any kind) run side by side as the base executor runs them: every packed linear
op is one GEMM over the rows of all sequences, with each sequence's hooks around its own
rows; norms, RoPE and attention are per sequence, as a client does them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from twin.executor.model import LlamaModel, _rotate_half, rms_norm
from twin.executor.peft_methods.kinds import BASE_ADAPTER, ClientAdapter
from twin.executor.peft_methods.paged import prefix_tokens, scheduled_token_ids


@dataclass
class _Seq:
    """One sequence's rows: ``n_prompt`` virtual rows (prompt tuning) ahead of its tokens,
    ``n_past`` virtual keys/values (prefix tuning) ahead of its context."""

    adapter: ClientAdapter
    x: torch.Tensor              # [n_prompt + n, hidden]
    n_prompt: int
    n_past: int
    cos: torch.Tensor            # [rows, 1, head_dim]
    sin: torch.Tensor


def _sequence(model: LlamaModel, adapter: ClientAdapter | None, token_ids) -> _Seq:
    adapter = adapter or BASE_ADAPTER
    if len(token_ids) < 1:
        raise ValueError("reference_forward needs at least one token")
    # prompt tuning: placeholders ahead of the prompt, their embeddings replaced
    ids = scheduled_token_ids(adapter, token_ids)
    n_prompt, n_past = len(ids) - len(token_ids), prefix_tokens(adapter)
    ids = torch.as_tensor(ids, dtype=torch.int64, device=model.device)
    # positions as transformers gives them: prefix keys count as past tokens; prompt
    # embeddings are the first inputs
    positions = torch.arange(n_past, n_past + ids.shape[0], device=ids.device)
    x = adapter.after_embedding(positions, F.embedding(ids, model.embed))
    freqs = positions.to(torch.float32)[:, None] * model.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return _Seq(adapter, x, n_prompt, n_past, emb.cos().to(model.dtype)[:, None, :],
                emb.sin().to(model.dtype)[:, None, :])


def _linear(layer: int, op: str, weight, bias, xs: list[torch.Tensor],
            seqs: list[_Seq]) -> list[torch.Tensor]:
    """One base GEMM over every sequence's rows, each sequence's hooks around its rows."""
    ins = [s.adapter.before_linear(layer, op, x) for s, x in zip(seqs, xs)]
    y = F.linear(torch.cat(ins), weight, bias)
    ys = y.split([x.shape[0] for x in ins])
    return [s.adapter.after_linear(layer, op, x, yy) for s, x, yy in zip(seqs, ins, ys)]


def _attention(model: LlamaModel, layer: int, seq: _Seq, qkv: torch.Tensor) -> torch.Tensor:
    s = model.shape
    T = qkv.shape[0]
    q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
    q = q.reshape(T, s.heads, s.head_dim)
    k = k.reshape(T, s.kv_heads, s.head_dim)
    v = v.reshape(T, s.kv_heads, s.head_dim)
    q = q * seq.cos + _rotate_half(q) * seq.sin
    k = k * seq.cos + _rotate_half(k) * seq.sin
    mask = None
    if seq.n_past:  # the prefix, as past keys/values: not rotated, seen by every token
        pk, pv = seq.adapter.prefix_kv(layer)
        k = torch.cat([pk.to(k.dtype), k])
        v = torch.cat([pv.to(v.dtype), v])
        j = torch.arange(seq.n_past + T, device=q.device)
        mask = j[None, :] <= (torch.arange(T, device=q.device) + seq.n_past)[:, None]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=s.head_dim ** -0.5, enable_gqa=True)
    return o[0].transpose(0, 1).reshape(T, s.q_size)


@torch.inference_mode()
def reference_forward_batch(model: LlamaModel, items: Sequence[tuple[ClientAdapter | None,
                                                                     Sequence[int]]]
                            ) -> list[torch.Tensor]:
    """Logits ``[len(token_ids), vocab]`` of every real token of each ``(adapter,
    token_ids)`` (adapter None: the base model), the sequences run side by side."""
    if not items:
        return []
    s = model.shape
    seqs = [_sequence(model, a, ids) for a, ids in items]
    xs = [q.x for q in seqs]
    for li, w in enumerate(model.layers):
        h = [rms_norm(x, w.input_norm, s.rms_eps) for x in xs]
        qkv = _linear(li, "qkv", w.qkv, w.qkv_bias, h, seqs)
        attn = [_attention(model, li, q, y) for q, y in zip(seqs, qkv)]
        o = _linear(li, "o", w.o, w.o_bias, attn, seqs)
        xs = [x + y for x, y in zip(xs, o)]
        h = [rms_norm(x, w.post_norm, s.rms_eps) for x in xs]
        gu = _linear(li, "gate_up", w.gate_up, w.gate_up_bias, h, seqs)
        act = [F.silu(g) * u for g, u in (y.split([s.intermediate] * 2, dim=-1) for y in gu)]
        d = _linear(li, "down", w.down, w.down_bias, act, seqs)
        xs = [x + y for x, y in zip(xs, d)]
    return [F.linear(rms_norm(x[q.n_prompt:], model.norm, s.rms_eps), model.lm_head)
            for q, x in zip(seqs, xs)]


def reference_forward(model: LlamaModel, adapter: ClientAdapter | None,
                      token_ids: Sequence[int]) -> torch.Tensor:
    """Logits ``[len(token_ids), vocab]`` of one sequence under ``adapter`` (None: base)."""
    return reference_forward_batch(model, [(adapter, token_ids)])[0]

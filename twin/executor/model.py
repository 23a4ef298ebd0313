"""A Llama-architecture forward pass over a paged KV cache, with batched multi-LoRA.

One call per engine step: :meth:`LlamaModel.step` takes the step's sequences (each a chunk
of new tokens: a prefill chunk or one decode token), writes their keys and values into the
paged cache through their block tables, attends each over its cached + new tokens, and
returns the logits of each sequence's last token. The LoRA delta of every linear layer is
added segment by segment (sequences are grouped by slot), as vLLM's punica kernels do.

Weights are read from an HF directory (``config.json`` + safetensors) with safetensors only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from twin.costs.profile import ModelShape
from twin.executor.lora import LoRASlots
from twin.executor.shape import LlamaShape


# ---------------------------------------------------------------------------------------------
# Per-step batch
# ---------------------------------------------------------------------------------------------
@dataclass
class SeqChunk:
    """One sequence's share of an engine step.

    ``token_ids``: the new tokens this step (a prefill chunk, or the one token sampled last
    step); ``start_pos``: how many of the sequence's tokens are already in its KV cache;
    ``block_table``: its KV block ids, covering at least ``start_pos + len(token_ids)``
    tokens; ``lora_slot``: the GPU slot of its adapter, -1 for the base model.
    """

    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    lora_slot: int = -1


@dataclass
class BatchInput:
    """A step's sequences flattened into token tensors (built by :meth:`build`).

    Sequences are reordered by LoRA slot so that each slot's tokens form one contiguous
    segment; ``inverse_order`` maps the logits back to the caller's order.
    """

    input_ids: torch.Tensor        # [T] int64
    positions: torch.Tensor        # [T] int64
    slot_mapping: torch.Tensor     # [T] int64: flat KV index (block * block_size + offset)
    last_token_idx: torch.Tensor   # [S] int64, sorted order
    inverse_order: torch.Tensor    # [S] int64: caller's i -> sorted row
    lora_segments: list[tuple[int, int, int]]  # (slot, tok_start, tok_end), slot >= 0 only
    # attention plan: K/V are gathered from the cache slot by slot (see context_slots)
    decode_tok_idx: torch.Tensor | None = None   # [B] tokens of 1-token sequences
    decode_slots: torch.Tensor | None = None     # [B, nb_max*block_size] flat cache slots
    decode_mask: torch.Tensor | None = None      # [B, 1, 1, nb_max*block_size] bool or None
    prefills: list[tuple[int, int, Any, Any]] = field(default_factory=list)
    # (tok_start, tok_end, slots [nb*block_size] or None when the chunk is the whole
    #  context, mask [n, nb*block_size])
    num_seqs: int = 0
    num_tokens: int = 0

    @classmethod
    def build(cls, seqs: Sequence[SeqChunk], block_size: int,
              device: torch.device | str = "cpu") -> "BatchInput":
        if not seqs:
            raise ValueError("empty batch")
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].lora_slot)
        ids, pos, slots, last = [], [], [], []
        segments: list[list[int]] = []
        dec_tok, dec_bt, dec_len = [], [], []
        prefills = []
        t = 0
        for i in order:
            s = seqs[i]
            n = len(s.token_ids)
            if n < 1:
                raise ValueError(f"sequence {i}: no new tokens")
            start = int(s.start_pos)
            ctx = start + n
            bt = np.asarray(s.block_table, dtype=np.int64)
            need = -(-ctx // block_size)
            if bt.shape[0] < need:
                raise ValueError(f"sequence {i}: block table has {bt.shape[0]} blocks, "
                                 f"{need} needed for {ctx} tokens")
            p_new = np.arange(start, ctx, dtype=np.int64)
            ids.append(np.asarray(s.token_ids, dtype=np.int64).reshape(-1))
            pos.append(p_new)
            slots.append(bt[p_new // block_size] * block_size + p_new % block_size)
            last.append(t + n - 1)
            if s.lora_slot >= 0:
                if segments and segments[-1][0] == s.lora_slot:
                    segments[-1][2] = t + n
                else:
                    segments.append([int(s.lora_slot), t, t + n])
            if n == 1:
                dec_tok.append(t)
                dec_bt.append(bt[:need])
                dec_len.append(ctx)
            elif start == 0:
                prefills.append((t, t + n, None, None))
            else:
                mask = (torch.arange(need * block_size)[None, :]
                        <= torch.arange(start, ctx)[:, None]).to(device)
                cs = context_slots(bt[None, :need], np.asarray([ctx]), block_size)[0]
                prefills.append((t, t + n, torch.from_numpy(cs).to(device), mask))
            t += n
        b = cls(
            input_ids=torch.from_numpy(np.concatenate(ids)).to(device),
            positions=torch.from_numpy(np.concatenate(pos)).to(device),
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
            last_token_idx=torch.tensor(last, dtype=torch.int64, device=device),
            inverse_order=torch.from_numpy(np.argsort(np.asarray(order))).to(device),
            lora_segments=[tuple(x) for x in segments], prefills=prefills,
            num_seqs=len(seqs), num_tokens=t)
        if dec_tok:
            nb = max(len(x) for x in dec_bt)
            blocks = np.zeros((len(dec_bt), nb), dtype=np.int64)
            for j, x in enumerate(dec_bt):
                blocks[j, :len(x)] = x
            b.decode_tok_idx = torch.tensor(dec_tok, dtype=torch.int64, device=device)
            lens = np.asarray(dec_len)
            b.decode_slots = torch.from_numpy(context_slots(blocks, lens, block_size)).to(device)
            if (lens != nb * block_size).any():
                m = np.arange(nb * block_size)[None, :] < lens[:, None]
                b.decode_mask = torch.from_numpy(m).to(device)[:, None, None, :]
        return b


def context_slots(blocks: np.ndarray, lens: np.ndarray, block_size: int) -> np.ndarray:
    """The flat KV-cache slots attention reads for each sequence: ``blocks`` [R, nb] (block
    tables, padded), ``lens`` [R] context lengths -> [R, nb * block_size].

    Slots at or past a sequence's length (the tail of its last block, padding blocks)
    point at the sequence's own first slot instead. The attention mask gives them weight
    0, but 0 x NaN is NaN: what a freed or never-written block holds (another request's
    NaN, garbage) must never be read, so only the sequence's own computed slots are.
    """
    L = blocks.shape[1] * block_size
    slots = (blocks[:, :, None] * block_size + np.arange(block_size)).reshape(len(blocks), L)
    if (lens < L).any():
        slots = np.where(np.arange(L)[None, :] < lens[:, None], slots, slots[:, :1])
    return slots


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Paged KV cache: per layer, K and V of shape [num_blocks, block_size, kv_heads, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor               # [q + 2 kv, hidden]  (q_proj, k_proj, v_proj fused)
    o: torch.Tensor                 # [hidden, q]
    gate_up: torch.Tensor           # [2 intermediate, hidden]
    down: torch.Tensor              # [hidden, intermediate]
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaModel:
    """Llama forward (RMSNorm, RoPE, GQA, SwiGLU) over a paged KV cache with multi-LoRA.

    Use :meth:`from_pretrained`, :meth:`allocate_kv_cache`, then one :meth:`step` per engine
    step. ``lora`` arguments are :class:`twin.executor.lora.LoRASlots` (or anything with its
    ``apply(layer, group, x, y, segments)`` method).
    """

    def __init__(self, shape: LlamaShape, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor):
        self.shape = shape
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.dtype = embed.dtype
        self.device = embed.device
        self.inv_freq = shape.inv_freq().to(self.device)

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "LlamaModel":
        model_dir = Path(model_dir)
        cfg_path = model_dir / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path}: no config.json (expected an HF model directory)")
        shape = LlamaShape.from_config(json.loads(cfg_path.read_text()))
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{model_dir}: no model.safetensors (pickle checkpoints are "
                                    "not read)")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            for k, v in load_file(str(model_dir / f)).items():
                sd[k[len("model."):] if k.startswith("model.") else k] = v

        def get(name, required=True):
            t = sd.pop(name, None)
            if t is None:
                if required:
                    raise KeyError(f"{model_dir}: weight {name!r} missing")
                return None
            return t.to(device=device, dtype=dtype)

        def cat(names, required=True):
            ts = [sd.pop(n, None) for n in names]
            if any(t is None for t in ts):
                if required:
                    raise KeyError(f"{model_dir}: weights {names} missing")
                return None
            return torch.cat(ts, 0).to(device=device, dtype=dtype).contiguous()

        layers = []
        for i in range(shape.layers):
            p = f"layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            layers.append(LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                post_norm=get(p + "post_attention_layernorm.weight"),
                qkv=cat([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]),
                o=get(a + "o_proj.weight"),
                gate_up=cat([m + "gate_proj.weight", m + "up_proj.weight"]),
                down=get(m + "down_proj.weight"),
                qkv_bias=cat([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], False),
                o_bias=get(a + "o_proj.bias", False),
                gate_up_bias=cat([m + "gate_proj.bias", m + "up_proj.bias"], False),
                down_bias=get(m + "down_proj.bias", False)))
        embed = get("embed_tokens.weight")
        norm = get("norm.weight")
        lm_head = get("lm_head.weight", required=not shape.tie_word_embeddings)
        if lm_head is None:
            lm_head = embed
        return cls(shape, embed, layers, norm, lm_head)

    @property
    def weight_bytes(self) -> int:
        ts = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for lw in self.layers:
            ts += [t for t in vars(lw).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def cost_shape(self, name: str = "executor") -> ModelShape:
        """This model as the twin's cost models see it (dtype bytes and parameters as
        loaded), the one shape both the S-LoRA page sizes and calibration use."""
        s, db = self.shape, self.embed.element_size()
        return ModelShape(name=name, layers=s.layers, hidden=s.hidden, heads=s.heads,
                          kv_heads=s.kv_heads, head_dim=s.head_dim, intermediate=s.intermediate,
                          vocab=s.vocab, dtype_bytes=db, params=float(self.weight_bytes / db),
                          tie_word_embeddings=bool(s.tie_word_embeddings))

    # -- KV cache -----------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        """Zero-filled paged cache. Attention does not rely on it (it never reads a slot
        outside a sequence's context, see :func:`context_slots`)."""
        s = self.shape
        shp = (num_blocks, block_size, s.kv_heads, s.head_dim)
        mk = lambda: torch.zeros(shp, dtype=self.dtype, device=self.device)  # noqa: E731
        return KVCache([mk() for _ in range(s.layers)], [mk() for _ in range(s.layers)], block_size)

    def make_lora_slots(self, max_loras: int, max_lora_rank: int) -> LoRASlots:
        return LoRASlots(self.shape, max_loras, max_lora_rank, dtype=self.dtype, device=self.device)

    # -- forward ------------------------------------------------------------------------------
    def step(self, seqs: Sequence[SeqChunk], kv_cache: KVCache, lora=None,
             timing: dict | None = None) -> torch.Tensor:
        """One engine step: logits [len(seqs), vocab] of each sequence's last new token,
        in the order of ``seqs``. Writes the new tokens' K/V into ``kv_cache``.
        ``timing``: gets ``inputs_s``, the seconds spent building the batch's tensors."""
        t = time.perf_counter()
        batch = BatchInput.build(seqs, kv_cache.block_size, self.device)
        if timing is not None:
            timing["inputs_s"] = time.perf_counter() - t
        return self.forward(batch, kv_cache, lora)

    @torch.inference_mode()
    def forward(self, batch: BatchInput, kv_cache: KVCache, lora=None) -> torch.Tensor:
        s = self.shape
        T = batch.num_tokens
        segs = batch.lora_segments
        if segs:
            if lora is None:
                raise ValueError(f"the batch uses LoRA slots {[x[0] for x in segs]} but no "
                                 "LoRA slots were given")
            if segs[-1][0] >= lora.max_loras:
                raise ValueError(f"LoRA slot {segs[-1][0]} out of range: max_loras is "
                                 f"{lora.max_loras}")
        x = self._embed(batch.input_ids)
        freqs = batch.positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().to(self.dtype)[:, None, :]
        sin = emb.sin().to(self.dtype)[:, None, :]
        for li, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, s.rms_eps)
            qkv = self._linear(li, "qkv", h, lora, segs)
            q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
            q = q.reshape(T, s.heads, s.head_dim)
            k = k.reshape(T, s.kv_heads, s.head_dim)
            v = v.reshape(T, s.kv_heads, s.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            attn = self._attention(li, q, k, v, batch, kv_cache)
            x = x + self._linear(li, "o", attn, lora, segs)
            h = rms_norm(x, w.post_norm, s.rms_eps)
            gu = self._linear(li, "gate_up", h, lora, segs)
            g, u = gu.split([s.intermediate, s.intermediate], dim=-1)
            x = x + self._linear(li, "down", F.silu(g) * u, lora, segs)
        last = rms_norm(x[batch.last_token_idx], self.norm, s.rms_eps)
        logits = self._head(last)
        return logits[batch.inverse_order]

    # -- the base model's ops: overridden where the base weights live elsewhere ---------------
    # (twin.executor.split: a client sends these to the base-executor process)
    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed)

    def _linear(self, li: int, op: str, x: torch.Tensor, lora, segs) -> torch.Tensor:
        """Packed linear ``op`` (qkv, o, gate_up, down) of layer ``li`` on ``x``, plus the
        LoRA delta of the batch's segments."""
        w = self.layers[li]
        y = F.linear(x, getattr(w, op), getattr(w, op + "_bias"))
        if segs:
            lora.apply(li, op, x, y, segs)
        return y

    def _head(self, last: torch.Tensor) -> torch.Tensor:
        return F.linear(last, self.lm_head)

    def _attention(self, li: int, q, k, v, b: BatchInput, kv: KVCache) -> torch.Tensor:
        s = self.shape
        kb, vb = kv.k[li], kv.v[li]                               # [blocks, bs, KVH, D]
        kb.view(-1, s.kv_heads, s.head_dim).index_copy_(0, b.slot_mapping, k)
        vb.view(-1, s.kv_heads, s.head_dim).index_copy_(0, b.slot_mapping, v)
        scale = s.head_dim ** -0.5
        out = torch.empty_like(q)

        def gather(cache, slots):                                 # -> [..., KVH, L, D]
            # slot by slot, never outside the sequence's context (see context_slots)
            g = cache.view(-1, s.kv_heads, s.head_dim).index_select(0, slots.reshape(-1))
            return g.view(*slots.shape[:-1], -1, s.kv_heads, s.head_dim).transpose(-3, -2)

        if b.decode_tok_idx is not None:
            qd = q[b.decode_tok_idx].unsqueeze(2)                 # [B, H, 1, D]
            kd = gather(kb, b.decode_slots)                       # [B, KVH, L, D]
            vd = gather(vb, b.decode_slots)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=b.decode_mask,
                                                scale=scale, enable_gqa=True)
            out[b.decode_tok_idx] = od.squeeze(2)
        for t0, t1, slots, mask in b.prefills:
            qp = q[t0:t1].transpose(0, 1).unsqueeze(0)            # [1, H, n, D]
            if slots is None:  # the chunk is the whole context: plain causal
                kp = k[t0:t1].transpose(0, 1).unsqueeze(0)
                vp = v[t0:t1].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                                    enable_gqa=True)
            else:
                kp = gather(kb, slots).unsqueeze(0)               # [1, KVH, nb*bs, D]
                vp = gather(vb, slots).unsqueeze(0)
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale,
                                                    enable_gqa=True)
            out[t0:t1] = op.squeeze(0).transpose(0, 1)
        return out.reshape(q.shape[0], s.heads * s.head_dim)

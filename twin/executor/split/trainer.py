"""A training client: fine-tunes its own LoRA adapter through the frozen base executor,
beside the inference clients (Symbiosis's co-located fine-tuning).

Forward: the same Llama as ``SplitModel`` (embedding, linears and lm_head in the base;
norms, RoPE and causal attention local), over a fixed batch of ``batch x seq_len``
tokens, next-token cross-entropy. Every base linear is a :class:`RemoteLinear` autograd
op: its backward asks the base for the *input gradient* (``dy @ W``, kind ``grad``), so
the base stays frozen and never sees the adapter. The adapter is the client's: one LoRA
pair per packed op of each layer (``A [r, in]``, ``B [out, r]``; B starts at zero, as
PEFT's), trained with Adam. The toy task (memorise a fixed random batch) makes the loss
fall in a few steps, which the tests check.

The loop runs at least ``min_steps`` steps, then until the driver says inference is over
(or ``max_steps``); it reports its steps' times and losses and its tokens/s.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twin.executor.model import _rotate_half, rms_norm
from twin.executor.split.client import SplitModel
from twin.executor.split.exchange import LINEAR_OPS, Exchange, op_dims
from twin.executor.gc_heap import freeze_startup_heap

TRAIN_STEP_COLUMNS = ["step", "t_start", "t_end", "tokens", "loss", "base_wait_s",
                      "transfer_s"]


@dataclass
class TrainerSpec:
    """A training client's job."""

    batch: int = 2
    seq_len: int = 32
    rank: int = 8
    lr: float = 1e-2
    min_steps: int = 1
    max_steps: int | None = None
    seed: int = 0
    start_timeout_s: float = 120.0


class RemoteLinear(torch.autograd.Function):
    """``y = x W^T (+ b)`` computed by the base; backward ``dx = dy W`` by the base too."""

    @staticmethod
    def forward(ctx, x, ex: Exchange, kind: str, layer: int, op: str):
        ctx.ex, ctx.layer, ctx.op = ex, layer, op
        return ex.call(kind, layer, op, x.detach())

    @staticmethod
    def backward(ctx, dy):
        return ctx.ex.call("grad", ctx.layer, ctx.op, dy.contiguous()), None, None, None, None


class LoRATrainer:
    """The trainable adapter and the training step (see the module docstring)."""

    def __init__(self, model: SplitModel, spec: TrainerSpec):
        self.m, self.spec = model, spec
        s = model.shape
        g = torch.Generator().manual_seed(spec.seed)
        self.params: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for li in range(s.layers):
            for op in LINEAR_OPS:
                d_in, d_out = op_dims(s, op)
                a = (torch.randn((spec.rank, d_in), generator=g) / d_in ** 0.5).to(model.dtype)
                b = torch.zeros((d_out, spec.rank), dtype=model.dtype)
                self.params[li, op] = (a.requires_grad_(), b.requires_grad_())
        self.opt = torch.optim.Adam([t for p in self.params.values() for t in p], lr=spec.lr)
        low = 3 if s.vocab > 16 else 0
        self.data = torch.randint(low, s.vocab, (spec.batch, spec.seq_len), generator=g)

    def _lin(self, li: int, op: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.params[li, op]
        return RemoteLinear.apply(x, self.m.ex, "lin", li, op) + (x @ a.t()) @ b.t()

    def loss(self) -> torch.Tensor:
        """Next-token cross-entropy of the adapted model on the fixed batch."""
        m, s = self.m, self.m.shape
        B, S = self.data.shape
        x = m.ex.call("embed", -1, "embed", self.data.reshape(-1))
        freqs = torch.arange(S, dtype=torch.float32)[:, None] * m.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(m.dtype)[:, None, :], emb.sin().to(m.dtype)[:, None, :]

        def heads(t, n):   # [B*S, n*D] -> [B, n, S, D] with RoPE
            t = t.reshape(B, S, n, s.head_dim)
            return (t * cos + _rotate_half(t) * sin).transpose(1, 2)

        for li, w in enumerate(m.layers):
            qkv = self._lin(li, "qkv", rms_norm(x, w.input_norm, s.rms_eps))
            q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
            v = v.reshape(B, S, s.kv_heads, s.head_dim).transpose(1, 2)
            att = F.scaled_dot_product_attention(heads(q, s.heads), heads(k, s.kv_heads), v,
                                                 is_causal=True, enable_gqa=True)
            x = x + self._lin(li, "o", att.transpose(1, 2).reshape(B * S, s.q_size))
            gu = self._lin(li, "gate_up", rms_norm(x, w.post_norm, s.rms_eps))
            g, u = gu.split([s.intermediate, s.intermediate], dim=-1)
            x = x + self._lin(li, "down", F.silu(g) * u)
        h = rms_norm(x, m.norm, s.rms_eps)
        logits = RemoteLinear.apply(h, m.ex, "head", -1, "head").reshape(B, S, s.vocab)
        return F.cross_entropy(logits[:, :-1].reshape(-1, s.vocab).float(),
                               self.data[:, 1:].reshape(-1))

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def _train(trainer: LoRATrainer, spec: TrainerSpec, done) -> list[tuple]:
    """The training loop: at least ``min_steps``, then until ``done`` or ``max_steps``."""
    rows = []
    tokens = spec.batch * (spec.seq_len - 1)
    while len(rows) < spec.min_steps or (
            not done.is_set() and (spec.max_steps is None or len(rows) < spec.max_steps)):
        trainer.m.ex.reset()
        t = time.perf_counter()
        loss = trainer.step()
        transfer, wait, _ = trainer.m.ex.reset()
        rows.append((len(rows), t, time.perf_counter(), tokens, loss, wait, transfer))
    return rows


def trainer_main(spec: TrainerSpec, model_dir: str, dtype: torch.dtype, conn, buffers, ready,
                 done, results, gc_freeze: bool = True) -> None:
    """The training client's process: build, wait for everyone, train, report
    (``gc_freeze``: ``twin.executor.split.probe``)."""
    torch.set_num_threads(1)
    torch.manual_seed(spec.seed)
    ex = None
    try:
        ex = Exchange(conn, buffers, None)
        model = SplitModel(model_dir, dtype, ex)
        ex.shape = model.shape
        trainer = LoRATrainer(model, spec)
        if gc_freeze:
            freeze_startup_heap()
        ready.wait(spec.start_timeout_s)
        rows = _train(trainer, spec, done)
        span = rows[-1][2] - rows[0][1]
        tokens = sum(r[3] for r in rows)
        results.put(("trainer", {
            "steps": rows, "columns": TRAIN_STEP_COLUMNS, "train_steps": len(rows),
            "train_tokens": tokens, "train_tokens_per_s": tokens / max(span, 1e-9),
            "first_loss": rows[0][4], "last_loss": rows[-1][4],
            "losses": [r[4] for r in rows],
            "adapter_bytes": sum(t.numel() * t.element_size()
                                 for p in trainer.params.values() for t in p)}))
    except BaseException:   # noqa: BLE001 - any failure goes to the driver, which stops all
        results.put(("error", "trainer", traceback.format_exc()))
    finally:
        if ex is not None:
            ex.close()

"""The activation exchange between a client and the base executor: preallocated
shared-memory tensors for the rows, a pipe for the control messages.

Each client owns one :class:`ClientBuffers` (created by the driver before the processes
start, shared with both sides by ``torch.multiprocessing``): ``inp`` carries the rows the
client sends (activations, or output gradients for a backward op), ``ids`` the token ids of
an embedding request, ``out`` the base's answer, ``logits`` the lm_head's output (and a
trainer's logit gradients, which are as wide). A request is one small message
``(kind, layer, op, rows, t_sent)`` on the client's end of a pipe; the base answers
``(batch_id,)`` once the rows are in ``out``/``logits``. An op larger than the buffers
goes in chunks of ``rows`` (``logit_rows`` for the head).

Kinds: ``lin`` (packed linear ``op`` of ``layer``, bias included), ``grad`` (the input
gradient of that linear: ``dy @ W``; ``op="head"`` for the lm_head), ``embed`` (token
ids -> embeddings), ``head`` (final hidden rows -> logits), ``bye`` (the client is done).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from twin.executor.shape import LlamaShape

KINDS = ("lin", "grad", "embed", "head")
LINEAR_OPS = ("qkv", "o", "gate_up", "down")


def op_dims(shape: LlamaShape, op: str) -> tuple[int, int]:
    """(in, out) features of a packed linear op of ``shape`` (``head``: the lm_head)."""
    s = shape
    return {"qkv": (s.hidden, s.q_size + 2 * s.kv_size), "o": (s.q_size, s.hidden),
            "gate_up": (s.hidden, 2 * s.intermediate), "down": (s.intermediate, s.hidden),
            "head": (s.hidden, s.vocab)}[op]


@dataclass
class ClientBuffers:
    """One client's shared-memory exchange tensors (see the module docstring)."""

    inp: torch.Tensor      # [rows, width]
    out: torch.Tensor      # [rows, width]
    logits: torch.Tensor   # [logit_rows, vocab]
    ids: torch.Tensor      # [rows] int64: token ids of an embed request

    @classmethod
    def allocate(cls, shape: LlamaShape, rows: int, logit_rows: int,
                 dtype: torch.dtype) -> "ClientBuffers":
        width = max(max(op_dims(shape, op)) for op in LINEAR_OPS)
        width = max(width, shape.hidden)
        mk = lambda r, w: torch.zeros((r, w), dtype=dtype).share_memory_()  # noqa: E731
        return cls(mk(rows, width), mk(rows, width), mk(logit_rows, shape.vocab),
                   torch.zeros(rows, dtype=torch.int64).share_memory_())

    @property
    def rows(self) -> int:
        return self.inp.shape[0]

    @property
    def logit_rows(self) -> int:
        return self.logits.shape[0]


class Exchange:
    """The client's side: send rows to the base, wait, read the answer. Times each call
    into ``transfer_s`` (copies in and out of the shared buffers) and ``base_wait_s``
    (from the message to the answer: the base's queueing and compute)."""

    def __init__(self, conn, buffers: ClientBuffers, shape: LlamaShape,
                 timeout_s: float = 60.0):
        self.conn, self.buf, self.shape = conn, buffers, shape
        self.timeout_s = timeout_s
        self.transfer_s = 0.0
        self.base_wait_s = 0.0
        self.calls = 0
        self.calls_log: list | None = None   # a list: one row per call (twin...probe)

    def reset(self) -> tuple[float, float, int]:
        """The counters since the last reset (transfer_s, base_wait_s, calls), zeroed."""
        c = (self.transfer_s, self.base_wait_s, self.calls)
        self.transfer_s = self.base_wait_s = 0.0
        self.calls = 0
        return c

    def _roundtrip(self, kind: str, layer: int, op: str, rows: int) -> tuple:
        """One message and its answer: (sent at, send returned, answer readable, read)."""
        perf = time.perf_counter
        t = perf()
        self.conn.send((kind, layer, op, rows, t))
        t_sent = perf()
        if not self.conn.poll(self.timeout_s):
            raise TimeoutError(f"the base executor did not answer {kind} {op} of layer "
                               f"{layer} within {self.timeout_s:g} s")
        t_ready = perf()
        self.conn.recv()
        t_recv = perf()
        self.base_wait_s += t_recv - t
        self.calls += 1
        return t, t_sent, t_ready, t_recv

    def call(self, kind: str, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        """The base's answer to ``kind`` of ``op`` (layer ``layer``) on the rows of ``x``."""
        if kind == "embed":
            d_in, d_out = 1, self.shape.hidden
        else:
            d_in, d_out = op_dims(self.shape, op)
            if kind == "grad":
                d_in, d_out = d_out, d_in
        src = (self.buf.logits if kind == "grad" and op == "head" else
               self.buf.ids[:, None] if kind == "embed" else self.buf.inp)
        dst = self.buf.logits if kind == "head" else self.buf.out
        step = min(src.shape[0], dst.shape[0])
        n = x.shape[0]
        y = torch.empty((n, d_out), dtype=dst.dtype)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            t = time.perf_counter()
            src[:r1 - r0, :d_in].copy_(x[r0:r1].reshape(r1 - r0, d_in))
            copy_in = time.perf_counter() - t
            times = self._roundtrip(kind, layer, op, r1 - r0)
            t = time.perf_counter()
            y[r0:r1].copy_(dst[:r1 - r0, :d_out])
            copy_out = time.perf_counter() - t
            self.transfer_s += copy_in + copy_out
            if self.calls_log is not None:
                self.calls_log.append((kind, layer, op, r1 - r0,
                                       (r1 - r0) * d_in * src.element_size(),
                                       (r1 - r0) * d_out * dst.element_size(), copy_in,
                                       *times, copy_out))
        return y

    def close(self) -> None:
        """Tell the base this client is done."""
        try:
            self.conn.send(("bye", -1, "", 0, time.perf_counter()))
        except (BrokenPipeError, OSError):
            pass


class LocalExchange:
    """:class:`Exchange`'s interface answered in-process by a ``BaseWeights`` (no pipes,
    no shared memory): for unit tests of the client side and its gradients."""

    def __init__(self, weights):
        self.w = weights
        self.transfer_s = self.base_wait_s = 0.0
        self.calls = 0

    def reset(self) -> tuple[float, float, int]:
        c, self.calls = self.calls, 0
        return 0.0, 0.0, c

    def call(self, kind: str, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.w.run(kind, layer, op, x).clone()

    def close(self) -> None:
        """Nothing to close."""

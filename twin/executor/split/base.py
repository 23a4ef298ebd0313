"""The base executor: the frozen base weights, once, served to every client.

It holds the embedding, each layer's packed linears (``qkv``, ``o``, ``gate_up``,
``down``, with their biases) and the lm_head; nothing else (no norms, no KV, never an
adapter tensor: :meth:`BaseWeights.report` lists what it holds, and the tests check it).
Requests arrive on the clients' pipes (``twin.executor.split.exchange``); when the base is
free it takes the *oldest* pending request and batches with it every other pending
request for the same ``(kind, layer, op)`` — whatever is queued, no waiting for more
(Symbiosis's opportunistic batching) — runs one GEMM over the clients' rows
concatenated, writes each client's rows back into its buffer and answers it. Every batch
is logged (``BATCH_COLUMNS``) for the twin to calibrate its per-layer queueing on.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.nn.functional as F

from twin.executor.model import LlamaModel
from twin.executor.split.exchange import LINEAR_OPS
from twin.executor.gc_heap import freeze_startup_heap
from twin.executor.split.probe import ProcessProbe

BATCH_COLUMNS = ["batch", "kind", "layer", "op", "rows", "clients", "t_start",
                 "t_queue_s", "compute_s"]


class BaseWeights:
    """The frozen base weights the base executor serves (see the module docstring)."""

    def __init__(self, model: LlamaModel):
        self.embed = model.embed
        self.lm_head = model.lm_head
        self.linears = [{op: (getattr(w, op), getattr(w, op + "_bias")) for op in LINEAR_OPS}
                        for w in model.layers]

    @classmethod
    def load(cls, model_dir, dtype: torch.dtype) -> "BaseWeights":
        return cls(LlamaModel.from_pretrained(model_dir, device="cpu", dtype=dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the base holds, by name (the lm_head once when tied)."""
        named = {"embed_tokens": self.embed}
        if self.lm_head is not self.embed:
            named["lm_head"] = self.lm_head
        for li, ops in enumerate(self.linears):
            for op, (w, b) in ops.items():
                named[f"layers.{li}.{op}"] = w
                if b is not None:
                    named[f"layers.{li}.{op}_bias"] = b
        return named

    def report(self) -> dict:
        """Names and bytes of what the base holds, and a digest of the bytes (equal before
        and after a fine-tuning run: the base is frozen)."""
        h = hashlib.sha256()
        sizes = {}
        for name, t in self.tensors().items():
            sizes[name] = t.numel() * t.element_size()
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return {"tensors": sizes, "bytes": sum(sizes.values()), "sha256": h.hexdigest()}

    def run(self, kind: str, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        """One op on ``x`` (rows of one or more clients)."""
        if kind == "lin":
            w, b = self.linears[layer][op]
            return F.linear(x, w, b)
        if kind == "grad":   # input gradient of the linear: dy @ W
            w = self.lm_head if op == "head" else self.linears[layer][op][0]
            return x @ w
        if kind == "embed":
            return F.embedding(x.reshape(-1), self.embed)
        if kind == "head":
            return F.linear(x, self.lm_head)
        raise ValueError(f"unknown request kind {kind!r}")


class BaseServer:
    """The serving loop over the clients' pipes (see the module docstring)."""

    def __init__(self, weights: BaseWeights, conns: list, buffers: list, stop,
                 idle_timeout_s: float = 0.5):
        self.w, self.conns, self.buffers, self.stop = weights, conns, buffers, stop
        self.idle_timeout_s = idle_timeout_s
        self.live = set(range(len(conns)))
        self.pending: list[tuple] = []   # (client, kind, layer, op, rows, t_sent, t_arrived)
        self.log: list[tuple] = []
        self.probe: list | None = None   # a list: one row per request answered (probe)

    def _receive(self, timeout: float) -> None:
        """Move every message that has arrived (waiting up to ``timeout`` for the first)
        to ``pending``; a client that said bye or whose pipe closed leaves."""
        by_conn = {id(self.conns[c]): c for c in self.live}
        ready = wait([self.conns[c] for c in self.live], timeout)
        for conn in ready:
            c = by_conn[id(conn)]
            try:
                while True:
                    msg = conn.recv()
                    if msg[0] == "bye":
                        self.live.discard(c)
                        break
                    self.pending.append((c, *msg, time.perf_counter()))
                    if not conn.poll():
                        break
            except (EOFError, OSError):
                self.live.discard(c)

    def serve(self) -> None:
        """Until every client has left (or ``stop`` is set): batch and answer."""
        while self.live or self.pending:
            if self.stop.is_set():
                return
            if not self.pending:
                self._receive(self.idle_timeout_s)
                continue
            self._run_batch()
            if self.live:
                self._receive(0)

    def _run_batch(self) -> None:
        """The oldest pending request and every pending one for the same op, as one GEMM."""
        first = min(self.pending, key=lambda m: m[5])
        key = first[1:4]
        group = [m for m in self.pending if m[1:4] == key]
        self.pending = [m for m in self.pending if m[1:4] != key]
        kind, layer, op = key
        t = time.perf_counter()
        xs = [self._source(m) for m in group]
        y = self.w.run(kind, layer, op, xs[0] if len(xs) == 1 else torch.cat(xs))
        r0 = 0
        for m in group:
            dst = self.buffers[m[0]].logits if kind == "head" else self.buffers[m[0]].out
            dst[:m[4], :y.shape[1]].copy_(y[r0:r0 + m[4]])
            r0 += m[4]
        compute_s = time.perf_counter() - t
        batch = len(self.log)
        for m in group:
            try:
                self.conns[m[0]].send((batch,))
            except (BrokenPipeError, OSError):
                self.live.discard(m[0])
            if self.probe is not None:
                self.probe.append((m[0], batch, m[5], m[6], t, t + compute_s,
                                   time.perf_counter()))
        self.log.append((batch, kind, layer, op, r0, len(group), t, t - first[5], compute_s))

    def _source(self, m: tuple) -> torch.Tensor:
        c, kind, layer, op, rows = m[:5]
        buf = self.buffers[c]
        if kind == "embed":
            return buf.ids[:rows]
        if kind == "grad":
            if op == "head":
                return buf.logits[:rows]
            return buf.inp[:rows, :self.w.linears[layer][op][0].shape[0]]
        width = (self.w.lm_head if kind == "head" else self.w.linears[layer][op][0]).shape[1]
        return buf.inp[:rows, :width]


def base_main(model_dir: str, dtype: torch.dtype, conns: list, buffers: list, stop,
              ready, results, gc_freeze: bool = True, probe: bool = False) -> None:
    """The base executor process: load the base weights, report them, serve until every
    client has left, send the batch log (or the error) to ``results``. ``gc_freeze``,
    ``probe``: ``twin.executor.split.probe``."""
    torch.set_num_threads(1)
    try:
        weights = BaseWeights.load(model_dir, dtype)
        before = weights.report()
        server = BaseServer(weights, conns, buffers, stop)
        if gc_freeze:
            freeze_startup_heap()
        watch = ProcessProbe() if probe else None
        server.probe = [] if probe else None
        ready.wait()
        if watch is not None:
            watch.start()
        server.serve()
        after = weights.report()
        results.put(("base", {"report": before, "sha256_after": after["sha256"],
                              "batches": server.log,
                              "probe": watch.report(calls=server.probe) if watch else None}))
    except BaseException:   # noqa: BLE001 - any failure goes to the driver, which stops all
        results.put(("error", "base", traceback.format_exc()))

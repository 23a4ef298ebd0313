"""A split client's adapters: always resident, private to the client, applied as hooks
around the base executor's linears.

An adapter is anything with the PEFT hook interface of the split contract
(``before_linear(layer, op, x) -> x``, ``after_linear(layer, op, x_in, y) -> y``,
``kind``, ``adapter_id``, ``nbytes``, ``virtual_tokens``). :func:`load_client_adapter`
reads a PEFT directory with ``twin.executor.peft_methods.load_peft`` when that module is
there (LoRA, IA³, prompt/prefix tuning), else with the executor's own LoRA reader wrapped
as :class:`LoRAClientAdapter`. Prompt/prefix tuning (virtual tokens) is not served in
split mode yet: such an adapter is refused when loaded.

:class:`ClientAdapters` is the ``lora`` argument the model's forward passes to its linears
(``apply`` per segment of the batch), :class:`ClientAdapterStore` the engine's adapter
store (``twin.executor.adapter_store``'s interface) with every adapter loaded at start-up.
"""

from __future__ import annotations

import importlib

import torch

from twin.executor.adapters import (AdapterError, PackedAdapter, load_error, pack_adapter,
                                    read_adapter)
from twin.executor.shape import LlamaShape

SPLIT_MAX_RANK = 1 << 30   # no slots: no rank ceiling


class LoRAClientAdapter:
    """A LoRA adapter (packed by ``twin.executor.adapters``, scaling folded into B) with
    the PEFT hook interface: ``y += (x A^T) B^T`` per slice of the packed op."""

    kind = "LORA"
    virtual_tokens = 0

    def __init__(self, packed: PackedAdapter):
        self.adapter_id = packed.adapter_id
        self.rank = packed.rank
        self.a, self.b = packed.a, packed.b   # a[op]: [L, S, r, in]; b[op]: [L, out, r]
        self.nbytes = packed.nbytes
        s = packed.shape   # each slice's output width (q, k, v; gate, up)
        self.slices = {"qkv": [s.q_size, s.kv_size, s.kv_size],
                       "gate_up": [s.intermediate, s.intermediate]}

    def prompt_embeddings(self):
        return None

    def prefix_kv(self, layer: int):
        return None

    def before_linear(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def after_linear(self, layer: int, op: str, x_in: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
        a, b = self.a[op][layer], self.b[op][layer]   # [S, r, in], [out, r]
        S, r = a.shape[0], a.shape[1]
        shrink = x_in @ a.reshape(S * r, -1).t()      # [t, S*r]
        if S == 1:
            return y + shrink @ b.t()
        parts, o0 = [], 0
        for i, n in enumerate(self.slices[op]):
            parts.append(shrink[:, i * r:(i + 1) * r] @ b[o0:o0 + n].t())
            o0 += n
        return y + torch.cat(parts, dim=1)


def _peft_loader():
    """``peft_methods.load_peft`` where the peft helper's module is present, else None."""
    try:
        return importlib.import_module("twin.executor.peft_methods").load_peft
    except (ImportError, AttributeError):
        return None


def load_client_adapter(path, adapter_id: str, shape: LlamaShape, dtype: torch.dtype):
    """A client's adapter from its PEFT directory (see the module docstring)."""
    load_peft = _peft_loader()
    if load_peft is not None:
        adapter = load_peft(path, shape, dtype)
        adapter.adapter_id = adapter_id
    else:
        raw = read_adapter(str(path), adapter_id)
        adapter = LoRAClientAdapter(pack_adapter(raw, shape, SPLIT_MAX_RANK, dtype=dtype))
    if getattr(adapter, "virtual_tokens", 0):
        raise AdapterError(adapter_id, f"{adapter.kind} adds virtual tokens, which split "
                                       "mode does not serve yet")
    return adapter


class ClientAdapters:
    """The client's adapter table as the model's ``lora`` argument: slot = table index."""

    def __init__(self):
        self.table: list = []

    @property
    def max_loras(self) -> int:
        return max(len(self.table), 1)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.table)

    def before(self, layer: int, op: str, x: torch.Tensor, segs) -> torch.Tensor:
        """``before_linear`` of each segment's adapter (a new tensor only if one changes)."""
        out = None
        for slot, t0, t1 in segs:
            xs = self.table[slot].before_linear(layer, op, x[t0:t1])
            if xs is not x[t0:t1] and not _same_view(xs, x, t0, t1):
                out = x.clone() if out is None else out
                out[t0:t1] = xs
        return x if out is None else out

    def apply(self, layer: int, op: str, x: torch.Tensor, y: torch.Tensor, segs) -> None:
        """``after_linear`` of each segment's adapter, written into ``y`` in place."""
        for slot, t0, t1 in segs:
            y[t0:t1] = self.table[slot].after_linear(layer, op, x[t0:t1], y[t0:t1])


def _same_view(xs: torch.Tensor, x: torch.Tensor, t0: int, t1: int) -> bool:
    return (xs.data_ptr() == x[t0:t1].data_ptr() and xs.shape == x[t0:t1].shape)


class ClientAdapterStore:
    """The engine's adapter store for a split client: every adapter of the client read at
    start-up (``preload``) and never evicted (the scheduler's caches hold them all)."""

    def __init__(self, shape: LlamaShape, dtype: torch.dtype, names: list[str], paths: list):
        self.shape, self.dtype, self.names, self.paths = shape, dtype, names, paths
        self.lora = ClientAdapters()
        self.slot_of: dict[int, int] = {}

    def preload(self, cache, bad: dict[int, str]) -> None:
        for a in list(cache.host.resident):
            try:
                adapter = load_client_adapter(self.paths[a], self.names[a], self.shape,
                                              self.dtype)
            except (AdapterError, OSError) as exc:
                bad[a] = load_error(self.names[a], exc)
                cache.drop(a)
                continue
            self.slot_of[a] = len(self.lora.table)
            self.lora.table.append(adapter)

    def slot(self, adapter: int) -> int:
        return -1 if adapter < 0 else self.slot_of[adapter]

    def before_schedule(self, cache) -> None:
        """Nothing: adapters stay resident."""

    def apply(self, ld) -> tuple[float, float, float]:
        raise AssertionError(f"split client: adapter {ld.adapter} should have been "
                             "preloaded (loads never happen)")

    def evict(self, ld) -> None:
        """Nothing to evict: every adapter stays resident."""

    def forget(self, a: int) -> None:
        self.slot_of.pop(a, None)

    def summary(self, cache) -> dict:
        return {"client_adapter_bytes": int(self.lora.nbytes),
                "client_adapter_kinds": sorted({a.kind for a in self.lora.table})}

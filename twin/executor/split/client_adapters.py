"""A split client's adapters: always resident, private to the client, applied as hooks
around the base executor's linears.

Adapters of any PEFT kind ``twin.executor.peft_methods.load_peft`` reads (LoRA, IA³,
prefix and prompt tuning) as ``ClientAdapter`` objects with the split contract's hooks
(``before_linear``, ``after_linear``, ``prefix_kv``, ``prompt_embeddings``).
:class:`ClientAdapters` is the ``lora`` argument the model's forward passes to its
linears (the hooks of each segment's adapter around the base's rows),
:class:`ClientAdapterStore` the engine's adapter store (``twin.executor.adapter_store``'s
interface) with every adapter read at start-up and never evicted, and
:func:`check_client_adapter` the engine's up-front check for any PEFT kind.
"""

from __future__ import annotations

from pathlib import Path

import torch

from twin.executor.adapters import AdapterError, load_error, weights_path
from twin.executor.inputs import check_adapter_dir
from twin.executor.peft_methods import LORA, load_peft, peft_kind
from twin.executor.shape import LlamaShape

SPLIT_MAX_RANK = 1 << 30   # no slots: no rank ceiling


def check_client_adapter(path, adapter_id: str, max_lora_rank: int) -> str | None:
    """The up-front check of an adapter of any PEFT kind (config and weights file present;
    LoRA: the executor's own checks, without a rank ceiling). The message, or None."""
    try:
        if peft_kind(Path(str(path)), adapter_id) == LORA:
            return check_adapter_dir(path, adapter_id, SPLIT_MAX_RANK)
        weights_path(Path(str(path)), adapter_id)
    except (AdapterError, OSError, TypeError, ValueError) as exc:
        return load_error(adapter_id, exc)
    return None


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
        out = x
        for slot, t0, t1 in segs:
            part = x[t0:t1]
            xs = self.table[slot].before_linear(layer, op, part)
            if xs is not part:
                out = x.clone() if out is x else out
                out[t0:t1] = xs
        return out

    def apply(self, layer: int, op: str, x: torch.Tensor, y: torch.Tensor, segs) -> None:
        """``after_linear`` of each segment's adapter, written into ``y`` in place."""
        for slot, t0, t1 in segs:
            part = y[t0:t1]
            ys = self.table[slot].after_linear(layer, op, x[t0:t1], part)
            if ys is not part:
                part.copy_(ys)

    def virtual_rows(self, positions: torch.Tensor, segs) -> list[tuple]:
        """The batch rows that are virtual tokens (prompt/prefix tuning): ``(adapter,
        rows, index into its virtual tokens)`` per segment that has some."""
        out = []
        for slot, t0, t1 in segs:
            ad = self.table[slot]
            if ad.virtual_tokens:
                idx = (positions[t0:t1] < ad.virtual_tokens).nonzero().flatten()
                if len(idx):
                    out.append((ad, idx + t0, positions[t0:t1][idx]))
        return out


class ClientAdapterStore:
    """The engine's adapter store for a split client: every adapter of the client read at
    start-up (:meth:`load_all`, before the server is sized: virtual tokens lengthen the
    prompts) and never evicted (the scheduler's caches hold them all)."""

    def __init__(self, shape: LlamaShape, dtype: torch.dtype, names: list[str], paths: list):
        self.shape, self.dtype, self.names, self.paths = shape, dtype, names, paths
        self.lora = ClientAdapters()
        self.slot_of: dict[int, int] = {}

    def load_all(self, bad: dict[int, str]) -> dict[int, int]:
        """Read every adapter not known bad (failures go to ``bad``); returns the virtual
        tokens of those that have some."""
        for a in range(len(self.names)):
            if a in bad or a in self.slot_of:
                continue
            try:
                adapter = load_peft(self.paths[a], self.shape, self.dtype,
                                    adapter_id=self.names[a])
            except (AdapterError, OSError) as exc:
                bad[a] = load_error(self.names[a], exc)
                continue
            self.slot_of[a] = len(self.lora.table)
            self.lora.table.append(adapter)
        return {a: self.lora.table[s].virtual_tokens for a, s in self.slot_of.items()
                if self.lora.table[s].virtual_tokens}

    def preload(self, cache, bad: dict[int, str]) -> None:
        """The scheduler's start-up loads: all read already; drop what failed."""
        for a in list(cache.host.resident):
            if a not in self.slot_of:
                cache.drop(a)

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

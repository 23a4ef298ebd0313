"""LoRA slot buffers and the batched LoRA delta, laid out as vLLM reserves them.

Every LoRA-able linear layer gets ``max_loras`` slots of A and B, zero-padded to
``max_lora_rank``, allocated once at start-up (they shrink the KV cache). Packed modules
share one buffer per layer, as in vLLM's ``MergedColumnParallelLinearWithLoRA`` /
``QKVParallelLinearWithLoRA``:

- A of group g: ``[layers, max_loras, n_slices, max_lora_rank, in]``; the A of one module
  (``lora_a(layer, "k_proj")``) is the view ``[max_loras, max_lora_rank, in]``.
- B of group g: ``[layers, max_loras, sum(out), max_lora_rank]``; one module's B
  (``lora_b(layer, "k_proj")``) is the view ``[max_loras, out, max_lora_rank]``.

The scaling alpha/r is folded into B when the adapter is packed (see ``adapters.py``).

The delta is computed segment-wise: the batch's tokens are grouped by slot (the model
orders sequences so that each slot's tokens are contiguous) and each segment does one
shrink matmul (x @ A^T, all slices at once) and one expand matmul per slice. Base-model
tokens (slot -1) are never touched. Padded ranks are computed, as vLLM's kernels do.
:class:`GroupedLoRASlots` computes the same delta as one grouped GEMM per module over all
slots (punica's shrink/expand), the engine's default.
"""

from __future__ import annotations

import time

import torch

from twin.executor.adapters import AdapterError, PackedAdapter
from twin.executor.shape import LORA_GROUPS, MODULE_GROUP, LlamaShape


class LoRASlots:
    """``max_loras`` GPU slots of LoRA weights for every target module of every layer."""

    def __init__(self, shape: LlamaShape, max_loras: int, max_lora_rank: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {max_loras}, "
                             f"{max_lora_rank}")
        self.shape = shape
        self.max_loras = int(max_loras)
        self.max_lora_rank = R = int(max_lora_rank)
        self.dtype, self.device = dtype, torch.device(device)
        L = shape.layers
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.out_ranges: dict[str, list[tuple[int, int]]] = {}
        for g, mods in LORA_GROUPS.items():
            in_f = shape.module_dims(mods[0])[0]
            outs = [shape.module_dims(m)[1] for m in mods]
            ranges, o = [], 0
            for n in outs:
                ranges.append((o, o + n))
                o += n
            self.out_ranges[g] = ranges
            self.a[g] = torch.zeros((L, self.max_loras, len(mods), R, in_f), dtype=dtype,
                                    device=self.device)
            self.b[g] = torch.zeros((L, self.max_loras, o, R), dtype=dtype, device=self.device)
        self.slot_adapter: list[str | None] = [None] * self.max_loras

    # -- views and sizes ----------------------------------------------------------------------
    def lora_a(self, layer: int, module: str) -> torch.Tensor:
        """A of one module: view [max_loras, max_lora_rank, in]."""
        g, i = MODULE_GROUP[module]
        return self.a[g][layer, :, i]

    def lora_b(self, layer: int, module: str) -> torch.Tensor:
        """B of one module (scaling folded in): view [max_loras, out, max_lora_rank]."""
        g, i = MODULE_GROUP[module]
        o0, o1 = self.out_ranges[g][i]
        return self.b[g][layer, :, o0:o1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot: max_lora_rank * layers * sum_modules(in + out) * dtype bytes."""
        return self.nbytes // self.max_loras

    # -- slot management ------------------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise IndexError(f"LoRA slot {slot} out of range [0, {self.max_loras})")

    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        for t in (*self.a.values(), *self.b.values()):
            t[:, slot].zero_()
        self.slot_adapter[slot] = None

    def load_slot(self, slot: int, adapter: PackedAdapter) -> float:
        """Zero ``slot`` on every module, then copy the packed adapter in (host -> device).

        Returns the seconds taken (device-synchronised), also stored in ``adapter.copy_s``.
        """
        self._check_slot(slot)
        r = adapter.rank
        if r > self.max_lora_rank:
            raise AdapterError(adapter.adapter_id,
                               f"rank {r} > max_lora_rank {self.max_lora_rank}")
        if adapter.shape != self.shape:
            raise AdapterError(adapter.adapter_id, "packed for a different model shape")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for t in (*self.a.values(), *self.b.values()):
            t[:, slot].zero_()
        nb = self.device.type == "cuda"
        for g, a in adapter.a.items():
            self.a[g][:, slot, :, :r].copy_(a, non_blocking=nb)
        for g, b in adapter.b.items():
            self.b[g][:, slot, :, :r].copy_(b, non_blocking=nb)
        sync()
        dt = time.perf_counter() - t0
        self.slot_adapter[slot] = adapter.adapter_id
        adapter.copy_s = dt
        return dt

    # -- compute ------------------------------------------------------------------------------
    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor,
              segments) -> None:
        """``y[t0:t1] += (x[t0:t1] @ A[slot]^T) @ B[slot]^T`` for each (slot, t0, t1) segment.

        ``x`` is the layer input [T, in], ``y`` its base output [T, sum(out)], updated in place.
        """
        A = self.a[group][layer]            # [M, S, R, in]
        B = self.b[group][layer]            # [M, out, R]
        S, R = A.shape[1], A.shape[2]
        ranges = self.out_ranges[group]
        for slot, t0, t1 in segments:
            xs = x[t0:t1]
            buf = torch.mm(xs, A[slot].reshape(S * R, -1).t())     # shrink: [t, S*R]
            bs = B[slot]
            if S == 1:
                y[t0:t1].addmm_(buf, bs.t())                         # expand
            else:
                ys = y[t0:t1]
                for i, (o0, o1) in enumerate(ranges):
                    ys[:, o0:o1].addmm_(buf[:, i * R:(i + 1) * R], bs[o0:o1].t())


# ---------------------------------------------------------------------------------------------
# LoRA compute: one grouped GEMM per module instead of one matmul per adapter segment
# ---------------------------------------------------------------------------------------------
class GroupedLoRASlots(LoRASlots):
    """``LoRASlots`` whose delta runs as segmented (grouped) GEMMs over all slots at once —
    punica's shrink/expand — with ``torch._grouped_mm``: the tokens of a batch are sorted
    by slot, so slot ``m``'s tokens are rows ``offs[m-1]:offs[m]`` and one call per
    shrink/expand slice covers every adapter of the batch (empty slots cost nothing). On
    a CPU with 16 adapters in a 16-sequence decode batch this halves the LoRA time of the
    per-segment loop. Falls back to that loop where the grouped kernel is unavailable
    (dtype/device/alignment), with the same results.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seg_key = None
        self._seg_val = None
        # the shrink weights as [L, M, S*R, in] views of the slot buffers (no copy)
        self._a_t = {g: a.flatten(2, 3) for g, a in self.a.items()}
        self._grouped = self._grouped_ok()

    def _grouped_ok(self) -> bool:
        """The grouped kernel needs 16-byte aligned strides; probe it once."""
        if not hasattr(torch, "_grouped_mm") or self.device.type != "cpu":
            return False
        per = 16 // torch.empty(0, dtype=self.dtype).element_size()
        dims = [self.max_lora_rank]
        for g, a in self.a.items():
            dims += [a.shape[-1], a.shape[2] * self.max_lora_rank]
            dims += [o for r in self.out_ranges[g] for o in r]
        if any(d % per for d in dims):
            return False
        try:
            x = torch.zeros((2, 4 * per), dtype=self.dtype, device=self.device)
            w = torch.zeros((2, 4 * per, per), dtype=self.dtype, device=self.device)
            torch._grouped_mm(x, w, offs=torch.tensor([1, 2], dtype=torch.int32))
        except (RuntimeError, NotImplementedError):
            return False
        return True

    def _offsets(self, segments):
        if self._seg_key is segments:
            return self._seg_val
        t0 = segments[0][1]
        t1 = segments[-1][2]
        counts = [0] * self.max_loras
        prev_slot, prev_end = -1, t0
        for slot, a, b in segments:
            if slot < prev_slot or a != prev_end:
                self._seg_key, self._seg_val = segments, None   # not slot-sorted: loop
                return None
            counts[slot] += b - a
            prev_slot, prev_end = slot, b
        offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
        self._seg_key, self._seg_val = segments, (t0, t1, offs)
        return self._seg_val

    def apply(self, layer, group, x, y, segments) -> None:
        if not self._grouped:
            return super().apply(layer, group, x, y, segments)
        seg = self._offsets(segments)
        if seg is None:
            return super().apply(layer, group, x, y, segments)
        t0, t1, offs = seg
        A = self._a_t[group][layer]                     # [M, S*R, in]
        B = self.b[group][layer]                        # [M, out, R]
        R = self.max_lora_rank
        buf = torch._grouped_mm(x[t0:t1], A.transpose(1, 2), offs=offs)       # shrink
        ys = y[t0:t1]
        ranges = self.out_ranges[group]
        if len(ranges) == 1:
            ys += torch._grouped_mm(buf, B.transpose(1, 2), offs=offs)        # expand
        else:
            for i, (o0, o1) in enumerate(ranges):
                ys[:, o0:o1] += torch._grouped_mm(buf[:, i * R:(i + 1) * R],
                                                  B[:, o0:o1].transpose(1, 2), offs=offs)

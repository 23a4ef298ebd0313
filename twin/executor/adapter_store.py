"""vLLM's layout of adapters in tensors: packed adapters in host memory and LoRA slots on
the device, kept in step with the scheduler's ``AdapterCache``.

The engine drives it (and S-LoRA's ``SLoRAAdapterStore``, same interface) without knowing
which layout it serves: ``before_schedule``, ``apply``/``evict``/``forget`` for a plan's
loads, ``slot`` for the forward pass, ``summary`` for the result.
"""

from __future__ import annotations

from twin.executor.adapters import (AdapterError, PackedAdapter, load_error, pack_adapter,
                                    read_adapter)
from twin.executor.model import LlamaModel
from twin.sched.adapter_cache import AdapterLoad


class SlotAdapterStore:
    """PackedAdapters in host memory and LoRA slots on the device, kept in step with the
    scheduler's ``AdapterCache`` by replaying its ``AdapterLoad`` records."""

    def __init__(self, model: LlamaModel, slots, names: list[str], paths: list, max_lora_rank: int):
        self.model, self.slots = model, slots
        self.names, self.paths = names, paths
        self.max_lora_rank = max_lora_rank
        self.host: dict[int, PackedAdapter] = {}
        self.slot_of: dict[int, int] = {}
        n = slots.max_loras if slots is not None else 0
        self.free_slots = list(range(n - 1, -1, -1))
        self.pin = model.device.type == "cuda"

    def preload(self, cache, bad: dict[int, str]) -> None:
        """Start-up loads (``preload_adapters``) of what ``cache`` preloaded: into host
        memory, and into a slot if on the GPU. Failures go to ``bad`` and leave the caches
        (their requests fail on arrival)."""
        for a in list(cache.host.resident):
            try:
                self.read_pack(a)
                if a in cache.gpu:
                    self.to_slot(a)
            except (AdapterError, OSError) as exc:
                bad[a] = load_error(self.names[a], exc)
                self.forget(a)
                cache.drop(a)

    def slot(self, adapter: int) -> int:
        return -1 if adapter < 0 else self.slot_of[adapter]

    def before_schedule(self, cache) -> None:
        """Nothing to give back before ``schedule``: slots are freed by the evictions a
        load records (S-LoRA's store frees idle adapters' pages here)."""

    def summary(self, cache) -> dict:
        """What this layout adds to the run's summary: nothing (vLLM's slots are fixed)."""
        return {}

    def read_pack(self, a: int) -> tuple[float, float]:
        raw = read_adapter(str(self.paths[a]), self.names[a])
        packed = pack_adapter(raw, self.model, self.max_lora_rank, dtype=self.model.dtype,
                              pin_memory=self.pin)
        self.host[a] = packed
        return packed.read_s, packed.pack_s

    def to_slot(self, a: int) -> float:
        slot = self.free_slots.pop()
        try:
            dt = self.slots.load_slot(slot, self.host[a])
        except Exception:
            self.free_slots.append(slot)
            raise
        self.slot_of[a] = slot
        return dt

    def evict(self, ld: AdapterLoad) -> None:
        """The evictions a load implies (host LRU entry, and its slot; the LRU slot)."""
        if ld.evicted_host >= 0:
            self.forget(ld.evicted_host)
        if ld.evicted_gpu >= 0:
            s = self.slot_of.pop(ld.evicted_gpu, None)
            if s is not None:
                self.free_slots.append(s)

    def apply(self, ld: AdapterLoad) -> tuple[float, float, float]:
        """Perform one load of the plan: evictions, then disk→host (read, pack) if needed,
        then host→device. Returns (read_s, pack_s, copy_s); raises AdapterError."""
        self.evict(ld)
        read_s = pack_s = 0.0
        if ld.from_disk or ld.adapter not in self.host:
            read_s, pack_s = self.read_pack(ld.adapter)
        try:
            copy_s = self.to_slot(ld.adapter)
        except AdapterError:
            self.host.pop(ld.adapter, None)
            raise
        return read_s, pack_s, copy_s

    def forget(self, a: int) -> None:
        self.host.pop(a, None)
        s = self.slot_of.pop(a, None)
        if s is not None:
            self.free_slots.append(s)

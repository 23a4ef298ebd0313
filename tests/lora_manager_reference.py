"""An independent, literal transcription of vLLM's LoRA adapter caches, for differential tests
of ``twin.sched.AdapterCache`` (which keeps recency with lazy heaps and in-use counts).

Transcribed from memory of vLLM's source around v0.8-v0.10 (V1 engine); the search tools of
this session did not reach vLLM's repository, so names follow these files as remembered:

- ``vllm/utils/__init__.py::LRUCache`` (over ``cachetools.LRUCache``): ``touch`` moves a key to
  the most-recent end (or inserts it), ``__getitem__``/``get`` also move it there,
  ``remove_oldest`` pops the least recent key that is not pinned, ``pop`` calls
  ``_on_remove``; ``pin`` marks a key that ``remove_oldest`` skips.
- ``vllm/adapter_commons/models.py::AdapterLRUCache`` (``LoRALRUCache``): ``_on_remove`` calls
  the manager's deactivate function for the key.
- ``vllm/lora/models.py::LRUCacheLoRAModelManager``: ``_registered_adapters`` (host, capacity
  ``max_cpu_loras``, removal deactivates the adapter) and ``_active_adapters`` (GPU, capacity
  ``lora_slots`` = ``max_loras``, removal frees the slot in ``lora_index_to_id``);
  ``activate_adapter`` (if not active and all slots taken, ``_active_adapters.remove_oldest()``;
  the base class then takes the first free slot and reads ``_registered_adapters[id]``; then
  ``_active_adapters.touch(id)``), ``add_adapter`` (register, or touch if registered),
  ``remove_oldest_adapter``, ``pin_adapter``.
- ``vllm/lora/worker_manager.py::LRUCacheWorkerLoRAManager``: ``_apply_adapters`` (for each
  adapter of the batch, ``add_adapter``), ``add_adapter`` (not registered: load from disk, if
  the host cache is full ``remove_oldest_adapter``, register; registered: ``get_adapter``,
  which touches; then ``activate_adapter``).

Everything is an ``OrderedDict`` (oldest first); nothing is shared with ``twin.sched``.

The order of a batch's adapters: vLLM's model runner passes ``set(lora_id_to_lora_request
.values())`` of the persistent input batch, so the true order is that of a Python set of
``LoRARequest`` (hashed by name: arbitrary). The callers here pass the insertion order of
``lora_id_to_lora_request`` instead (adapters already in the batch first, in the order they
entered it, then new ones in admission order), the order before the set scrambles it.

Nothing is pinned while a batch runs: vLLM keeps the batch's adapters resident only because
each is touched when ``_apply_adapters`` reaches it, and ``len(batch) <= max_loras``.
"""

from __future__ import annotations

from collections import OrderedDict


class LRUCache:
    """``vllm.utils.LRUCache``: an ordered dict, oldest first, with pinning."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.order: OrderedDict = OrderedDict()
        self.pinned_items: set = set()

    def __contains__(self, key) -> bool:
        return key in self.order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, key):
        value = self.order[key]
        self.order.move_to_end(key)   # cachetools.LRUCache.__getitem__ updates the order
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __setitem__(self, key, value) -> None:
        if key not in self.order:
            while len(self.order) + 1 > self.capacity:   # cachetools: popitem until it fits
                self.popitem()
        self.order[key] = value
        self.order.move_to_end(key)

    def touch(self, key) -> None:
        if key in self.order:
            self.order.move_to_end(key)
        else:
            self.order[key] = None

    def pin(self, key) -> None:
        if key not in self.order:
            raise ValueError(f"Cannot pin key: {key} not in cache.")
        self.pinned_items.add(key)

    def _unpin(self, key) -> None:
        self.pinned_items.remove(key)

    def _on_remove(self, key, value) -> None:
        pass

    def pop(self, key, default=None):
        run_on_remove = key in self
        value = self.order.pop(key, default)
        if key in self.pinned_items:
            self._unpin(key)
        if run_on_remove:
            self._on_remove(key, value)
        return value

    def popitem(self, remove_pinned: bool = False):
        if not remove_pinned:
            lru_key = next((k for k in self.order if k not in self.pinned_items), None)
            if lru_key is None:
                raise RuntimeError("All items are pinned, cannot remove oldest from the cache.")
        else:
            lru_key = next(iter(self.order))
        value = self.pop(lru_key)
        return lru_key, value

    def remove_oldest(self, *, remove_pinned: bool = False) -> None:
        if not len(self):
            return
        self.popitem(remove_pinned=remove_pinned)


class AdapterLRUCache(LRUCache):
    """``AdapterLRUCache``: removing an entry calls the manager's deactivate function."""

    def __init__(self, capacity: int, deactivate_fn):
        super().__init__(capacity)
        self.deactivate_fn = deactivate_fn

    def _on_remove(self, key, value) -> None:
        self.deactivate_fn(key)
        super()._on_remove(key, value)


class LRUCacheLoRAModelManager:
    """``LRUCacheLoRAModelManager`` (with the base ``LoRAModelManager`` methods it uses).

    ``events`` records what the real one does to memory: ("disk", a) read from disk into
    host memory, ("evict_host", a), ("activate", a, slot) a host→GPU copy into a slot,
    ("deactivate", a, slot) a slot freed.
    """

    def __init__(self, lora_slots: int, capacity: int):
        self.lora_slots = lora_slots
        self.capacity = capacity
        self.lora_index_to_id: list = [None] * lora_slots
        self.events: list = []
        self._registered_adapters = AdapterLRUCache(capacity, self.deactivate_adapter)
        self._active_adapters = AdapterLRUCache(lora_slots, self._deactivate_adapter)

    def __len__(self) -> int:
        return len(self._registered_adapters)

    def list_adapters(self) -> dict:
        return dict(self._registered_adapters.order)

    def get_adapter(self, adapter_id):
        return self._registered_adapters.get(adapter_id)

    # -- base LoRAModelManager ------------------------------------------------------------
    def _base_activate_adapter(self, lora_id) -> bool:
        if lora_id in self._active_adapters:
            return False
        first_free_slot = next(((i, x) for i, x in enumerate(self.lora_index_to_id)
                                if x is None), None)
        if first_free_slot is None:
            raise ValueError("No free lora slots")
        index, _ = first_free_slot
        self._active_adapters[lora_id] = None
        lora_model = self._registered_adapters[lora_id]   # touches the host entry
        self.lora_index_to_id[index] = lora_model
        self.events.append(("activate", lora_id, index))
        return True

    def _deactivate_adapter(self, lora_id) -> None:
        try:
            index = self.lora_index_to_id.index(lora_id)
            self.lora_index_to_id[index] = None
            self.events.append(("deactivate", lora_id, index))
        except ValueError:
            pass

    def deactivate_adapter(self, adapter_id) -> bool:
        # adapter_commons.utils.deactivate_adapter
        if adapter_id in self._active_adapters:
            self._deactivate_adapter(adapter_id)
            self._active_adapters.pop(adapter_id)
            return True
        return False

    def _add_adapter(self, lora) -> None:
        self._registered_adapters[lora] = lora

    # -- LRUCacheLoRAModelManager ---------------------------------------------------------
    def add_adapter(self, lora) -> bool:
        if lora not in self._registered_adapters:
            self._add_adapter(lora)
            was_added = True
        else:
            self._registered_adapters.touch(lora)
            was_added = False
        return was_added

    def activate_adapter(self, lora_id) -> bool:
        if lora_id not in self._active_adapters and len(
                self._active_adapters) >= self.lora_slots:
            self._active_adapters.remove_oldest()
        result = self._base_activate_adapter(lora_id)
        self._active_adapters.touch(lora_id)
        return result

    def remove_oldest_adapter(self) -> bool:
        if len(self._registered_adapters) > 0:
            oldest = next((k for k in self._registered_adapters.order
                           if k not in self._registered_adapters.pinned_items), None)
            if oldest is not None:   # logged before its deactivation (``_on_remove``)
                self.events.append(("evict_host", oldest))
            self._registered_adapters.remove_oldest()
            return True
        return False

    def pin_adapter(self, lora_id) -> bool:
        try:
            self._registered_adapters.pin(lora_id)
        except ValueError as err:
            raise ValueError(f"Pinning failed. LoRA {lora_id} is not registered.") from err
        if lora_id not in self._active_adapters:
            self.activate_adapter(lora_id)
        self._active_adapters.pin(lora_id)
        return True


class LRUCacheWorkerLoRAManager:
    """``LRUCacheWorkerLoRAManager``: the per-step entry point ``set_active_adapters``."""

    def __init__(self, max_loras: int, max_cpu_loras: int):
        self._adapter_manager = LRUCacheLoRAModelManager(max_loras, max_cpu_loras)

    @property
    def events(self) -> list:
        return self._adapter_manager.events

    def list_adapters(self) -> set:
        return set(self._adapter_manager.list_adapters())

    def active_adapters(self) -> set:
        return set(self._adapter_manager._active_adapters.order)

    def _load_adapter(self, lora) -> int:
        self._adapter_manager.events.append(("disk", lora))
        return lora

    def add_adapter(self, lora) -> bool:
        if lora not in self.list_adapters():
            lora_model = self._load_adapter(lora)
            if len(self._adapter_manager) + 1 > self._adapter_manager.capacity:
                self._adapter_manager.remove_oldest_adapter()
            loaded = self._adapter_manager.add_adapter(lora_model)
        else:
            loaded = self._adapter_manager.get_adapter(lora) is not None
        self._adapter_manager.activate_adapter(lora)
        return loaded

    def _apply_adapters(self, lora_requests) -> None:
        loras_map = {lora: lora for lora in lora_requests if lora is not None and lora >= 0}
        if len(loras_map) > self._adapter_manager.lora_slots:
            raise RuntimeError(
                f"Number of requested LoRAs ({len(loras_map)}) is greater than the number "
                f"of GPU LoRA slots ({self._adapter_manager.lora_slots}).")
        for lora in loras_map.values():
            self.add_adapter(lora)

    def set_active_adapters(self, lora_requests) -> list:
        """Apply one step's adapters (in the caller's order); returns that step's events."""
        start = len(self.events)
        self._apply_adapters(lora_requests)
        return self.events[start:]


def loads_of(events: list) -> list:
    """Group a step's events per host→GPU copy as twin's ``AdapterLoad`` fields:
    (adapter, from_disk, evicted_gpu, evicted_host), -1 for none.

    A disk read opens a load; its host eviction (if any) and the ``activate`` that follows
    close it. A ``deactivate`` caused by a host eviction is part of that eviction, not a
    GPU eviction; one right before an ``activate`` (``remove_oldest`` of the slots) is.
    """
    out = []
    disk = evicted_host = -1
    evicted_by_host: set = set()
    evicted_gpu = -1
    for ev in events:
        kind = ev[0]
        if kind == "disk":
            disk = ev[1]
        elif kind == "evict_host":
            evicted_host = ev[1]
            evicted_by_host.add(ev[1])
        elif kind == "deactivate":
            if ev[1] in evicted_by_host:
                evicted_by_host.discard(ev[1])
            else:
                evicted_gpu = ev[1]
        elif kind == "activate":
            a = ev[1]
            out.append((a, disk == a, evicted_gpu, evicted_host if disk == a else -1))
            disk = evicted_host = evicted_gpu = -1
            evicted_by_host.clear()
    return out

"""GPU adapter slots (``max_loras``) and the host adapter cache (``max_cpu_loras``), both LRU.

Mirrors vLLM's ``LRUCacheWorkerLoRAManager``: an adapter needed by the batch that is not in
host memory is read from disk (evicting the host LRU entry, which also frees its GPU slot);
one not in a GPU slot is copied host→GPU (evicting the LRU slot). Every adapter of a batch
is touched each step, so an adapter in use by a running request is never the LRU victim.

To keep a step O(changes) rather than O(adapters in the batch), recency is kept as follows:
an adapter with running requests is "in use" (implicitly most recent); when its last
running request leaves, it gets a use tick. Victims are the in-use-free adapters with the
oldest tick (lazy heaps). vLLM touches batch adapters in batch order; here resident ones
are touched before missing ones are loaded, which differs only when a load would evict an
adapter of the same batch (vLLM then reloads it; a real server rarely does that).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


#: mixed into each adapter's hash in a set key, ``hash((adapter, SET_SALT))``, of which the
#: key is the XOR over the set (``AdapterCache.running_key``, ``WaitingQueue.adapters_key``;
#: a tuple's hash is well mixed, where an int hashes to itself and XORs of small ints collide)
SET_SALT = 0x5BD1E995


@dataclass(frozen=True)
class AdapterLoad:
    """A load the step must pay for before its forward pass."""

    adapter: int
    from_disk: bool          # disk → host (read + pack) then host → GPU
    evicted_gpu: int = -1    # adapter whose slot was reused (-1: a free slot)
    evicted_host: int = -1   # adapter dropped from host memory (-1: none)


class _LRU:
    """Residency set with capacity; LRU among entries not in use."""

    __slots__ = ("capacity", "tick", "resident", "_heap")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.resident: dict[int, int] = {}  # adapter -> last-use tick (valid when idle)
        self._heap: list[tuple[int, int]] = []

    def __contains__(self, a: int) -> bool:
        return a in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def insert(self, a: int, tick: int) -> None:
        self.resident[a] = tick
        heapq.heappush(self._heap, (tick, a))

    def touch(self, a: int, tick: int) -> None:
        self.resident[a] = tick
        heapq.heappush(self._heap, (tick, a))
        if len(self._heap) > 8 * len(self.resident) + 1024:  # drop stale entries
            self._heap = [(t, x) for x, t in self.resident.items()]
            heapq.heapify(self._heap)

    def remove(self, a: int) -> None:
        del self.resident[a]

    def pop_victim(self, in_use: dict[int, int]) -> int:
        """Remove and return the least recently used adapter that is not in use."""
        heap, resident = self._heap, self.resident
        stash = []
        try:
            while heap:
                tick, a = heapq.heappop(heap)
                if resident.get(a) != tick:
                    continue  # stale entry
                if in_use.get(a, 0) > 0:
                    stash.append((tick, a))  # in use now; keep its entry for later
                    continue
                del resident[a]
                return a
        finally:
            for item in stash:
                heapq.heappush(heap, item)
        raise RuntimeError("adapter cache: every resident adapter is in use")  # pragma: no cover


class AdapterCache:
    """``max_loras`` GPU slots over a ``max_cpu_loras`` host cache.

    ``acquire`` is called when a request with an adapter joins the running batch and
    returns the load the step must do (or None); ``release`` when it leaves.
    """

    __slots__ = ("max_loras", "max_cpu_loras", "gpu", "host", "in_use", "_tick", "loads_from_disk",
                 "loads_from_host", "running_key", "running_sets")

    def __init__(self, max_loras: int, max_cpu_loras: int, preload: list[int] | tuple = ()):
        if max_cpu_loras < max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.gpu = _LRU(max_loras)
        self.host = _LRU(max_cpu_loras)
        self.in_use: dict[int, int] = {}   # adapter -> running requests using it
        # the set of adapters in use as one number (XOR of their hashes, kept as adapters
        # join and leave it), and every (running, waiting) pair of sets a step has run
        # with: vLLM's API server keeps one vllm:lora_requests_info series per label it has
        # seen, the running and the waiting adapters' names joined, and each /metrics
        # scrape renders them all (experiments/README_validate.md)
        self.running_key = 0
        self.running_sets: set[int] = set()
        self._tick = 0
        self.loads_from_disk = 0
        self.loads_from_host = 0
        for a in list(preload)[:max_cpu_loras]:  # start-up load, not charged to any step
            self._tick += 1
            self.host.insert(a, self._tick)
        for a in list(preload)[:max_loras]:
            self.gpu.insert(a, self.host.resident[a])

    @property
    def active(self) -> dict[int, int]:
        """Adapters with running requests (the scheduler's ``scheduled_loras``)."""
        return self.in_use

    def step_adapters(self) -> int:
        """The distinct adapters of the step being scheduled (in use now)."""
        return len(self.in_use)

    def note_label(self, waiting_key: int) -> None:
        """Note the label vLLM's API server sets after a step's outputs: the adapters
        running then (in use before the next step admits anyone) and those waiting
        (``waiting_key``, the waiting queue's ``adapters_key``: the requests not yet
        scheduled, those that arrived during the step among them), as one int."""
        self.running_sets.add(self.running_key + (waiting_key << 64))

    def is_resident(self, adapter: int) -> bool:
        return adapter in self.gpu

    def acquire(self, adapter: int) -> AdapterLoad | None:
        n = self.in_use.get(adapter, 0)
        self.in_use[adapter] = n + 1
        if n == 0:
            self.running_key ^= hash((adapter, SET_SALT))
        if n > 0 or adapter in self.gpu:
            return None
        evicted_host = -1
        from_disk = adapter not in self.host
        if from_disk:
            if len(self.host) >= self.max_cpu_loras:
                evicted_host = self.host.pop_victim(self.in_use)
                if evicted_host in self.gpu:
                    self.gpu.remove(evicted_host)
            self._tick += 1
            self.host.insert(adapter, self._tick)
            self.loads_from_disk += 1
        else:
            self.loads_from_host += 1
        evicted_gpu = -1
        if len(self.gpu) >= self.max_loras:
            evicted_gpu = self.gpu.pop_victim(self.in_use)
        self._tick += 1
        self.gpu.insert(adapter, self._tick)
        return AdapterLoad(adapter, from_disk, evicted_gpu, evicted_host)

    def drop(self, adapter: int) -> None:
        """Forget ``adapter`` (not in use): off its GPU slot and out of host memory. The
        executor calls this when an adapter failed to load, so the cache never claims a
        slot or host entry that holds nothing."""
        if self.in_use.get(adapter, 0):
            raise ValueError(f"adapter {adapter} is in use by running requests")
        if adapter in self.gpu:
            self.gpu.remove(adapter)
        if adapter in self.host:
            self.host.remove(adapter)

    def release(self, adapter: int) -> None:
        n = self.in_use[adapter] - 1
        if n:
            self.in_use[adapter] = n
            return
        del self.in_use[adapter]
        self.running_key ^= hash((adapter, SET_SALT))
        self._tick += 1
        self.gpu.touch(adapter, self._tick)
        self.host.touch(adapter, self._tick)


def residency(cache) -> tuple:
    """(adapters on the GPU, adapters in host memory or None: all of them) of a server's
    adapter cache, as live containers (membership tests): vLLM's slots over a host cache
    (:class:`AdapterCache`), or S-LoRA's pool (``resident``: every adapter is in host
    memory). What a router reads of a replica (``twin.fleet.view``, ``twin.executor.live``)."""
    gpu = getattr(cache, "gpu", None)
    if gpu is not None:
        return gpu.resident, cache.host.resident
    return cache.resident, None

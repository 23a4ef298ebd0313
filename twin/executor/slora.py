"""The executor's S-LoRA memory layout: KV blocks and exact-rank adapters in one page pool.

``execute(..., config with policy="slora")`` serves with this layout instead of vLLM's
fixed LoRA slots (``twin.executor.lora``). What it is made of:

- **The scheduler is the twin's.** :func:`build_slora` builds the server with
  ``twin.servers.build_server`` (layout ``slora``) from a profile describing the
  executor's own model and pool (:func:`executor_profile`), so the number of pages, the
  pages each adapter takes and the admission rule are computed by the very code the twin
  runs; the twin replaying this run (``twin.sim.replay``) builds the same scheduler.
- **One pool of pages** (:class:`UnifiedPagePool`). A page is a KV block
  (``block_size x kv_bytes_per_token`` bytes). KV block tables and adapter page tables
  take page ids from one free list, so a page held by an adapter is a KV block nobody else
  can use, and ``pool.used`` (KV + adapter pages) equals the scheduler's count every step.
  An adapter of rank ``r`` takes ``ceil(adapter_bytes(r) / page bytes)`` pages, exactly as
  the twin charges it (``ModelShape.adapter_bytes``: A and B of every LoRA-able module at
  exact rank).
- **Adapters at exact rank** (:class:`SLoRAAdapterStore`). Every adapter the trace uses is
  read and packed into host memory at start-up (S-LoRA loads all adapters at launch); a
  plan's load is a timed host→device copy of the exact-rank A/B into the adapter's
  freshly allocated pages' budget; an adapter the scheduler drops (``cache.idle``, dropped
  at the start of ``schedule``) gives its pages back before that call
  (:meth:`SLoRAAdapterStore.before_schedule`).
- **LoRA compute at exact rank** (:class:`ExactRankLoRA`): the model sorts a batch's
  sequences by ``lora_slot`` (here the adapter's position in (rank, id) order), so
  same-rank adapters' tokens are contiguous; each such run is one grouped GEMM per
  shrink / expand slice at that rank (``torch._grouped_mm``), else a loop over segments;
  no ``max_lora_rank`` padding, no slot buffers, no ``max_loras`` cap.

Simplification (documented, not hidden): the adapter's weights live in their own
contiguous device tensors whose size is charged to the pool as pages (the page ids are
reserved in the shared free list and recorded in the adapter's page table), rather than
being scattered row-wise into the KV tensor's pages as S-LoRA's MBGMM kernels read them.
Capacity, admission and eviction are identical; on a GPU the physical footprint is the
KV tensor plus the resident adapters' tensors (at most the reserved pages' bytes).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from twin.executor.adapters import (AdapterError, PackedAdapter, load_error, pack_adapter,
                                    read_adapter)
from twin.executor.block_tables import PagedBlockTables
from twin.executor.model import LlamaModel
from twin.executor.shape import LORA_GROUPS
from twin.costs.measured import exact_kv_memory, zero_load_time
from twin.costs.profile import Profile
from twin.sched.adapter_cache import AdapterLoad
from twin.servers import ServerParts, build_server

#: no rank ceiling under slora (there are no slots to pad to); the check of an adapter's
#: config uses this instead of ``max_lora_rank``
SLORA_MAX_RANK = 1 << 30


# ---------------------------------------------------------------------------------------------
# the pool
# ---------------------------------------------------------------------------------------------
class UnifiedPagePool(PagedBlockTables):
    """KV block tables and adapter page tables over one free list of ``num_blocks`` pages."""

    def __init__(self, num_blocks: int, block_size: int):
        super().__init__(num_blocks, block_size)
        self.adapter_tables: dict[int, list[int]] = {}
        self.max_used = 0

    @property
    def adapter_pages(self) -> int:
        return sum(len(t) for t in self.adapter_tables.values())

    @property
    def kv_blocks(self) -> int:
        return self.used - self.adapter_pages

    def ensure(self, key: int, tokens: int) -> list[int]:
        t = super().ensure(key, tokens)
        self.max_used = max(self.max_used, self.used)
        return t

    def alloc_adapter(self, adapter: int, pages: int) -> list[int]:
        assert adapter not in self.adapter_tables, f"adapter {adapter} already holds pages"
        assert pages <= len(self._free), (
            f"unified pool: adapter {adapter} needs {pages} pages but only {len(self._free)} "
            "are free; the scheduler's page count and the executor's pool disagree (a bug)")
        t = self._take(pages)
        self.adapter_tables[adapter] = t
        self.max_used = max(self.max_used, self.used)
        return t

    def free_adapter(self, adapter: int) -> int:
        return self._give(self.adapter_tables.pop(adapter, None))


# ---------------------------------------------------------------------------------------------
# exact-rank weights and compute
# ---------------------------------------------------------------------------------------------
class _Resident:
    """One adapter on the device: per group A as [L, S*r, in], B as [L, out, r]."""

    __slots__ = ("rank", "a", "b", "nbytes")

    def __init__(self, packed: PackedAdapter, device, non_blocking: bool):
        self.rank = r = packed.rank
        self.a = {g: a.reshape(a.shape[0], a.shape[1] * r, a.shape[3])
                  .to(device, non_blocking=non_blocking, copy=True) for g, a in packed.a.items()}
        self.b = {g: b.to(device, non_blocking=non_blocking, copy=True)
                  for g, b in packed.b.items()}
        self.nbytes = sum(t.numel() * t.element_size() for t in (*self.a.values(),
                                                                  *self.b.values()))


class ExactRankLoRA:
    """The ``lora`` argument of ``LlamaModel.forward`` for the S-LoRA layout: segment
    ``(slot, t0, t1)`` gets ``y += (x A^T) B^T`` at its adapter's own rank.

    Slot ids are the adapters' positions in (rank, adapter id) order (see
    :meth:`SLoRAAdapterStore.slot`), so the model's sort by slot puts the tokens of
    same-rank adapters next to each other; each run of same-rank segments is then one
    grouped GEMM per shrink/expand slice (``torch._grouped_mm``, S-LoRA's MBGMM at one
    rank) over the batch's adapters stacked once per batch composition (cached across the
    steps and layers that reuse it). Where the grouped kernel is unavailable, a loop over
    segments does the same at exact rank.
    """

    def __init__(self, model: LlamaModel, num_adapters: int):
        s = model.shape
        self.max_loras = max(int(num_adapters), 1)   # the model's range check on slot ids
        self.resident: dict[int, _Resident] = {}     # slot id -> weights
        self.out_ranges: dict[str, list[tuple[int, int]]] = {}
        self.in_dims: dict[str, int] = {}
        for g, mods in LORA_GROUPS.items():
            ranges, o = [], 0
            for m in mods:
                n = s.module_dims(m)[1]
                ranges.append((o, o + n))
                o += n
            self.out_ranges[g] = ranges
            self.in_dims[g] = s.module_dims(mods[0])[0]
        self.dtype, self.device = model.dtype, model.device
        self._key = None
        self._runs = None
        self.grouped = self._grouped_ok()

    def _grouped_ok(self) -> bool:
        if not hasattr(torch, "_grouped_mm") or self.device.type != "cpu":
            return False
        try:
            x = torch.zeros((2, 16), dtype=self.dtype)
            w = torch.zeros((2, 16, 16), dtype=self.dtype)
            torch._grouped_mm(x, w, offs=torch.tensor([1, 2], dtype=torch.int32))
        except (RuntimeError, NotImplementedError):
            return False
        return True

    def _plan(self, segments):
        """Runs of same-rank segments: (rank, t0, t1, offs, {group: (A [L,G,S*r,in],
        B [L,G,out,r])}); None where a run cannot use the grouped kernel."""
        if segments == self._key:
            return self._runs
        runs: list = []
        for slot, t0, t1 in segments:
            r = self.resident[slot].rank
            if runs and runs[-1][0] == r and runs[-1][2] == t0:
                runs[-1][2] = t1
                runs[-1][3].append((slot, t1 - t0))
            else:
                runs.append([r, t0, t1, [(slot, t1 - t0)]])
        per = 16 // torch.empty(0, dtype=self.dtype).element_size()
        out = []
        for r, t0, t1, members in runs:
            ok = self.grouped and r % per == 0 and all(
                d % per == 0 for g in LORA_GROUPS for d in
                (self.in_dims[g], *[o for rg in self.out_ranges[g] for o in rg]))
            if not ok:
                out.append((r, t0, t1, None, members))
                continue
            ws = {}
            for g, mods in LORA_GROUPS.items():
                As, Bs = [], []
                for slot, _ in members:
                    w = self.resident[slot]
                    A, B = w.a.get(g), w.b.get(g)
                    L = next(iter(w.a.values())).shape[0]
                    if A is None:     # not targeted: zeros at the adapter's rank
                        A = torch.zeros((L, len(mods) * r, self.in_dims[g]), dtype=self.dtype)
                        B = torch.zeros((L, self.out_ranges[g][-1][1], r), dtype=self.dtype)
                    As.append(A)
                    Bs.append(B)
                ws[g] = (torch.stack(As, 1).transpose(2, 3),     # [L, G, in, S*r]
                         torch.stack(Bs, 1).transpose(2, 3))     # [L, G, r, out]
            offs = torch.tensor([n for _, n in members], dtype=torch.int32).cumsum(0)
            out.append((r, t0, t1, (offs.to(torch.int32), ws), members))
        self._key, self._runs = list(segments), out
        return out

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor,
              segments) -> None:
        ranges = self.out_ranges[group]
        for r, t0, t1, grouped, members in self._plan(segments):
            if grouped is not None:
                offs, ws = grouped
                At, Bt = ws[group]
                buf = torch._grouped_mm(x[t0:t1], At[layer], offs=offs)     # shrink
                ys = y[t0:t1]
                if len(ranges) == 1:
                    ys += torch._grouped_mm(buf, Bt[layer], offs=offs)       # expand
                else:
                    for i, (o0, o1) in enumerate(ranges):
                        ys[:, o0:o1] += torch._grouped_mm(buf[:, i * r:(i + 1) * r],
                                                          Bt[layer][:, :, o0:o1], offs=offs)
                continue
            t = t0
            for slot, n in members:
                self._segment(layer, group, x, y, slot, t, t + n, ranges)
                t += n

    def _segment(self, layer, group, x, y, slot, t0, t1, ranges) -> None:
        w = self.resident[slot]
        A = w.a.get(group)
        if A is None:          # the adapter does not target this group: no work
            return
        r = w.rank
        buf = torch.mm(x[t0:t1], A[layer].t())              # shrink: [t, S*r]
        B = w.b[group][layer]                               # [out, r]
        if len(ranges) == 1:
            y[t0:t1].addmm_(buf, B.t())                     # expand
        else:
            ys = y[t0:t1]
            for i, (o0, o1) in enumerate(ranges):
                ys[:, o0:o1].addmm_(buf[:, i * r:(i + 1) * r], B[o0:o1].t())


class SLoRAAdapterStore:
    """Host copies of every adapter (packed at start-up) and the resident ones on the
    device, kept in step with the scheduler's ``UnifiedAdapterPool``; same interface as
    the engine's ``_AdapterStore`` (``slot``, ``apply``, ``evict``, ``forget``)."""

    def __init__(self, model: LlamaModel, names: list[str], paths: list, pages: list[int],
                 pool: UnifiedPagePool, lora: ExactRankLoRA):
        self.model, self.names, self.paths = model, names, paths
        self.pages, self.pool, self.lora = pages, pool, lora
        self.host: dict[int, PackedAdapter] = {}
        self.slot_of: dict[int, int] = {}     # adapter -> slot id, (rank, adapter) order
        self.pin = model.device.type == "cuda"
        self.read_s = self.pack_s = 0.0
        self.copy_s = 0.0
        self.loads = 0
        self.drops = 0

    def pack_all(self, ids, bad: dict[int, str]) -> None:
        """Start-up: read and pack each adapter of ``ids`` at its exact rank into host
        memory. Failures go to ``bad`` (their requests fail on arrival)."""
        for a in ids:
            if a in bad:
                continue
            try:
                raw = read_adapter(str(self.paths[a]), self.names[a])
                p = pack_adapter(raw, self.model, SLORA_MAX_RANK, dtype=self.model.dtype,
                                 pin_memory=self.pin)
            except (AdapterError, OSError) as exc:
                bad[a] = load_error(self.names[a], exc)
                continue
            if p.shape != self.model.shape:
                bad[a] = str(AdapterError(self.names[a], "packed for a different model shape"))
                continue
            self.host[a] = p
            self.read_s += p.read_s
            self.pack_s += p.pack_s

    # -- the engine's interface ----------------------------------------------------------------
    def slot(self, adapter: int) -> int:
        if adapter < 0:
            return -1
        s = self.slot_of[adapter]
        assert s in self.lora.resident, f"adapter {adapter} runs but is not resident"
        return s

    def before_schedule(self, cache) -> None:
        """Give back the pages of the adapters the scheduler is about to drop
        (``UnifiedAdapterPool.drop_idle`` runs at the start of ``schedule``)."""
        for a in cache.idle:
            self.forget(a)
            self.drops += 1

    def apply(self, ld: AdapterLoad) -> tuple[float, float, float]:
        """A plan's load: allocate the adapter's pages, copy its exact-rank A/B host→device.
        Returns (read_s, pack_s, copy_s): reads and packs happened at start-up."""
        a = ld.adapter
        if a not in self.host:
            raise AdapterError(self.names[a], "not in host memory (failed at start-up)")
        self.pool.alloc_adapter(a, self.pages[a])
        cuda = self.model.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        w = _Resident(self.host[a], self.model.device, cuda)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.lora.resident[self.slot_of[a]] = w
        self.copy_s += dt
        self.loads += 1
        return 0.0, 0.0, dt

    def summary(self, cache) -> dict:
        """The unified pool's use over the run (``summary["adapter_pool"]``); ``cache``:
        the scheduler's ``UnifiedAdapterPool``."""
        page = page_bytes(self.model, self.pool.block_size)
        return {"adapter_pool": {
            "pages": int(self.pool.num_blocks), "max_used_pages": int(self.pool.max_used),
            "max_adapter_pages": int(cache.max_resident_pages),
            "max_gib": cache.max_resident_pages * page / 2 ** 30,
            "adapter_loads": self.loads, "adapter_drops": self.drops, "copy_s": self.copy_s}}

    def evict(self, ld: AdapterLoad) -> None:
        """S-LoRA's loads evict nothing (idle adapters are dropped before scheduling)."""

    def forget(self, a: int) -> None:
        self.pool.free_adapter(a)
        if a in self.slot_of:
            self.lora.resident.pop(self.slot_of[a], None)


# ---------------------------------------------------------------------------------------------
# building the server
# ---------------------------------------------------------------------------------------------
def executor_profile(model: LlamaModel, num_blocks: int, config) -> Profile:
    """A profile describing the executor's model and a pool of exactly ``num_blocks``
    pages, for ``twin.servers.build_server`` (the same one ``twin.sim.replay`` builds from
    the run's meta, so both sides count pages identically)."""
    shape = model.cost_shape()
    return Profile(name="executor", hardware={"name": str(model.device)}, model=shape,
                   memory=exact_kv_memory(num_blocks, config.block_size,
                                          config.gpu_memory_utilization,
                                          kv_bytes_per_token=shape.kv_bytes_per_token),
                   step_time=None, load_time=zero_load_time())


def page_bytes(model: LlamaModel, block_size: int) -> int:
    """Bytes of one page of the unified pool: one KV block of the executor's model."""
    return model.cost_shape().kv_bytes_per_token * block_size


def adapter_pages_for(model: LlamaModel, config, ranks) -> list[int]:
    """Pages each adapter takes (``SLoRAPolicy.adapter_pages`` on the executor's shape)."""
    shape = model.cost_shape()
    page = page_bytes(model, config.block_size)
    return [-(-shape.adapter_bytes(int(r)) // page) for r in ranks]


class BuiltServer(NamedTuple):
    """An executor's server: the scheduler core both clocks build
    (``twin.servers.build_server``) and the torch side serving it."""

    server: ServerParts
    num_blocks: int
    kv: object            # the model's KV cache tensors
    tables: PagedBlockTables   # KV block tables (slora: and adapter page tables)
    lora: object          # LoRA compute: slots (vllm) or ExactRankLoRA (slora)
    store: object         # adapters in tensors, kept in step with the scheduler's cache
    meta: dict | None = None   # the run's ``meta["slora"]`` (slora)


def build_slora(model: LlamaModel, config, trace, catalog, bad: dict[int, str], *,
                num_gpu_blocks, kv_cache_gib, choose_num_blocks) -> BuiltServer:
    """The unified pool, the S-LoRA scheduler and the exact-rank adapter store (instead of
    LoRA slots, ``AdapterCache`` and ``Scheduler``). Adapters of the trace that cannot be
    read or packed go to ``bad`` (their requests fail on arrival)."""
    names = catalog.adapters
    ids = {a: i for i, a in enumerate(names)}
    ranks = [int(catalog.rank(a)) for a in names]
    pages = adapter_pages_for(model, config, ranks)
    used = sorted(ids[a] for a in trace["adapter"].dropna().unique())
    extra = sum(pages[a] for a in used)
    num_blocks = choose_num_blocks(model, config, trace, num_gpu_blocks=num_gpu_blocks,
                                   kv_cache_gib=kv_cache_gib, extra_blocks=extra)
    admission = "conservative"   # S-LoRA's own (twin.policies.slora's default)
    server = build_server(config, executor_profile(model, num_blocks, config), catalog,
                          layout="slora", admission=admission)
    sched = server.scheduler
    assert sched.pool.num_blocks == num_blocks
    assert list(sched.cache.pages) == pages, (sched.cache.pages, pages)
    tables = UnifiedPagePool(num_blocks, config.block_size)
    lora = ExactRankLoRA(model, len(names))
    store = SLoRAAdapterStore(model, names, list(catalog.table["path"]) if len(names) else [],
                              pages, tables, lora)
    store.slot_of = {a: i for i, a in enumerate(sorted(range(len(names)),
                                                       key=lambda a: (ranks[a], a)))}
    store.pack_all(used, bad)
    meta = {"admission": admission,
            "adapter_pages": {names[a]: pages[a] for a in used},
            "page_bytes": page_bytes(model, config.block_size),
            "host_pack_s": store.read_s + store.pack_s}
    return BuiltServer(server, num_blocks, model.allocate_kv_cache(num_blocks, config.block_size),
                      tables, lora, store, meta)


__all__ = ["UnifiedPagePool", "ExactRankLoRA", "SLoRAAdapterStore", "build_slora", "BuiltServer",
           "executor_profile", "adapter_pages_for", "page_bytes", "SLORA_MAX_RANK"]

"""The reference executor: continuous batching of a multi-LoRA Llama on a wall clock.

It drives the *same* ``Scheduler`` / ``KVBlockPool`` / ``AdapterCache`` objects as the twin
(DESIGN §1) with real tensors: each step asks the scheduler for a plan, performs the plan's
adapter loads (disk read, pack, host→device copy, vLLM-style, inside the step), extends the
requests' KV block tables, runs one forward pass over the mixed batch of prefill chunks and
decodes (``LlamaModel.step``), samples greedily and commits the step. Requests are released
when their arrival time has come; the engine sleeps when idle. Unlike the twin it never
jumps over runs of decode steps: every step is computed and timed.

Clock. The engine keeps a *logical* clock that advances by each step's measured wall
duration and, when idle, jumps to the next arrival (then sleeps until the wall clock has
caught up). Step ``i`` occupies ``[start_i, start_i + duration_i)`` and the next step starts
where it ended, so the twin, replaying the recorded durations (``twin.sim.replay``), sees
the very same instants and must produce the very same batches. The logical clock trails
the wall clock only by sleep overshoot.

Prompts. A trace holds lengths only; prompt token ids are synthetic and deterministic
(:func:`prompt_token_ids`). Generation is greedy and stops at the request's
``output_tokens`` (EOS is ignored), as ``vllm bench`` runs with ``ignore_eos`` do.

Bad adapters. Adapters the trace uses are checked up front from their configs (missing
directory, pickle-only weights, unsupported PEFT features, rank above ``max_lora_rank``);
their requests fail on arrival. Anything found only when the weights are read (corrupt
file, wrong shapes, NaN/inf weights) fails the requests that needed the load, in that step;
the adapter is then dropped from the caches. A request whose logits turn NaN/inf (finite
weights that overflow) is stopped after that step rather than emitting argmax-of-NaN tokens.
Either way the request's status is ``failed`` with the reason in ``error``, and every other
request runs normally: attention never reads KV slots outside a request's own context
(``twin.executor.model.context_slots``), so what a failed request leaves in freed blocks
cannot leak. A trace naming an adapter the catalog lacks is refused before the run starts
(:class:`TwinInputError`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from twin.config import ServingConfig, refuse_unserved_adapters
from twin.errors import ConfigError, TwinInputError
from twin.executor.adapters import (CONFIG_NAME, AdapterError, PackedAdapter,
                                    adapter_catalog, pack_adapter, read_adapter,
                                    read_adapter_config, weights_path)
from twin.executor.block_tables import PagedBlockTables
from twin.executor.lora import LoRASlots
from twin.executor.model import LlamaModel, SeqChunk
from twin.costs.step_time import after_idle
from twin.executor.slora import SLORA_MAX_RANK, BuiltServer, build_slora
from twin.sched import Request, RequestStatus
from twin.sched.adapter_cache import AdapterLoad
from twin.results.recorder import STEP_COLUMNS as TWIN_STEP_COLUMNS
from twin.results.recorder import Outcomes, Recorder, build_result
from twin.results.results import RunResult, crop_window
from twin.servers import build_server
from twin.workload.catalog import AdapterCatalog
from twin.workload.schema import validate_trace

GIB = 2 ** 30
DEFAULT_CPU_KV_GIB = 1.0   # CPU KV-cache budget when no block count is given (cf. vLLM's
                           # VLLM_CPU_KVCACHE_SPACE); capped by what the trace can use

STEP_COLUMNS = [
    *TWIN_STEP_COLUMNS,   # the twin's step-log columns (twin.results.recorder): logs line up
    # the executor's own
    "num_seqs", "num_tokens", "batch_adapters", "loads_from_disk", "kv_blocks", "failed",
    "schedule_s", "load_s", "read_s", "pack_s", "copy_s", "forward_s", "sample_s",
    "batch_request_ids", "batch_tokens",
    "features",   # the twin's step-time features of the step (its policy's featurizer)
]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def prompt_token_ids(request_id: int, length: int, vocab: int, seed: int = 0) -> list[int]:
    """Deterministic synthetic prompt of ``length`` ids for a request (the trace holds
    lengths only). Ids avoid 0..2 (usual pad/bos/eos) when the vocabulary allows."""
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, int(request_id) & 0x7FFFFFFFFFFFFFFF])
    low = 3 if vocab > 16 else 0
    return rng.integers(low, vocab, size=int(length)).tolist()


def resolve_catalog(catalog, trace: pd.DataFrame | None = None) -> AdapterCatalog:
    """An :class:`AdapterCatalog` with a ``path`` per adapter, from an AdapterCatalog, a
    DataFrame (adapter, rank, path), a catalog file (CSV/Parquet) or a directory of PEFT
    adapters (its ``catalog.csv`` if present, else every sub-directory with a config).

    Relative paths are resolved against the catalog file's directory when they do not
    exist relative to the working directory.
    """
    base = None
    if catalog is None:
        if trace is not None and trace["adapter"].notna().any():
            raise TwinInputError("the trace names adapters but no adapters were given: pass "
                                 "a directory of PEFT adapters or a catalog with a 'path' "
                                 "column (or make synthetic ones: twin make-adapters)",
                                 field="adapters")
        return AdapterCatalog(pd.DataFrame({"adapter": pd.Series([], dtype="string"),
                                            "rank": pd.Series([], dtype="int64"),
                                            "path": pd.Series([], dtype="string")}),
                              source="none")
    if isinstance(catalog, (str, Path)):
        p = Path(catalog)
        if p.is_dir():
            if (p / "catalog.csv").is_file():
                base, catalog = p, AdapterCatalog.read(p / "catalog.csv")
            else:
                try:
                    df = adapter_catalog(p)
                except AdapterError as exc:
                    raise TwinInputError(str(exc), file=str(p)) from None
                if not len(df):
                    raise TwinInputError("no PEFT adapters (sub-directories with "
                                         f"{CONFIG_NAME}) and no catalog.csv", file=str(p))
                catalog = AdapterCatalog(df, source=str(p))
        else:
            base, catalog = p.parent, AdapterCatalog.read(p)
    elif isinstance(catalog, pd.DataFrame):
        catalog = AdapterCatalog(catalog)
    if not isinstance(catalog, AdapterCatalog):
        raise TypeError(f"catalog: expected an AdapterCatalog, DataFrame or path, got "
                        f"{type(catalog).__name__}")
    if len(catalog) and "path" not in catalog.table.columns:
        raise TwinInputError("the executor needs each adapter's PEFT directory: the catalog "
                             "has no 'path' column", file=catalog.source, field="path")
    if base is not None and len(catalog):
        t = catalog.table
        paths = []
        for v in t["path"]:
            if isinstance(v, str) and not Path(v).is_absolute() and not Path(v).exists() \
                    and (base / v).exists():
                v = str(base / v)
            paths.append(v)
        t["path"] = pd.array(paths, dtype="string")
    return catalog


def check_unknown_adapters(trace: pd.DataFrame, catalog: AdapterCatalog,
                           trace_source: str = "trace") -> None:
    """Refuse a trace that names an adapter the catalog lacks (before anything runs)."""
    names = trace["adapter"].dropna().unique()
    unknown = [a for a in names if a not in catalog]
    if unknown:
        row = int((trace["adapter"] == unknown[0]).fillna(False).to_numpy(bool).nonzero()[0][0])
        known = catalog.adapters
        hint = f"; the catalog has {known[:4]}{' ...' if len(known) > 4 else ''}"
        raise TwinInputError(f"unknown adapter {unknown[0]!r} ({len(unknown)} unknown in all, "
                             f"not in {catalog.source}){hint}", file=trace_source, row=row,
                             field="adapter")


def check_adapter_dir(path, adapter_id: str, max_lora_rank: int) -> str | None:
    """Cheap up-front check of a PEFT adapter (config and file presence, no weights read).
    Returns the error message, or None if the adapter looks servable."""
    try:
        if path is None or (isinstance(path, float) and math.isnan(path)) or pd.isna(path):
            raise AdapterError(adapter_id, "the catalog gives no path")
        p = Path(str(path))
        try:
            cfg = read_adapter_config(p, adapter_id)
        except OSError as exc:
            raise AdapterError(adapter_id, f"{p / CONFIG_NAME} is not valid JSON: "
                                           f"{exc}") from None
        if cfg["r"] > max_lora_rank:
            raise AdapterError(adapter_id, f"rank {cfg['r']} > max_lora_rank {max_lora_rank}; "
                                           f"raise --max-lora-rank to at least {cfg['r']}")
        weights_path(p, adapter_id)
    except AdapterError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# KV capacity
# ---------------------------------------------------------------------------------------------
def kv_block_bytes(model: LlamaModel, block_size: int) -> int:
    s = model.shape
    return 2 * s.layers * block_size * s.kv_size * model.embed.element_size()


def choose_num_blocks(model: LlamaModel, config: ServingConfig, trace: pd.DataFrame, *,
                      num_gpu_blocks: int | None = None, kv_cache_gib: float | None = None,
                      lora_bytes: int = 0, extra_blocks: int = 0) -> int:
    """KV blocks for the run: ``num_gpu_blocks`` if given (vLLM's override); else on CUDA
    ``util x total - allocated - activation estimate`` as vLLM does, on CPU a budget of
    ``kv_cache_gib``; never more than the trace could ever use. Refuses (ConfigError), as
    vLLM does, a cache that cannot hold one ``max_model_len`` request.
    ``extra_blocks``: pages the trace may need besides KV (slora: its adapters' pages),
    added to the cap."""
    B = config.block_size
    per_block = kv_block_bytes(model, B)
    L = config.max_model_len
    if num_gpu_blocks is not None:
        nb = int(num_gpu_blocks)
        source = f"num_gpu_blocks={nb}"
    else:
        total = np.minimum(trace["prompt_tokens"].to_numpy(np.int64)
                           + trace["output_tokens"].to_numpy(np.int64), L)
        usable = int((-(-total // B)).sum()) + 1
        usable = max(usable, -(-L // B)) + int(extra_blocks)
        if model.device.type == "cuda":
            free, total_mem = torch.cuda.mem_get_info(model.device)
            s = model.shape
            act = (config.max_num_batched_tokens * (4 * s.hidden + s.q_size + 2 * s.kv_size
                                                    + 3 * s.intermediate)
                   * model.embed.element_size() * 2
                   + config.max_num_seqs * s.vocab * 4 * 2)
            avail = (config.gpu_memory_utilization * total_mem - (total_mem - free) - act)
            source = (f"{config.gpu_memory_utilization:.2f} x {total_mem / GIB:.1f} GiB minus "
                      f"{(total_mem - free) / GIB:.2f} GiB in use minus "
                      f"{act / GIB:.2f} GiB activations")
        else:
            gib = DEFAULT_CPU_KV_GIB if kv_cache_gib is None else float(kv_cache_gib)
            avail = gib * GIB
            source = f"kv_cache_gib={gib:g}"
        nb = min(int(max(avail, 0) // per_block), usable)
    if nb * B < L:
        raise ConfigError(
            f"the KV cache holds {nb * B} tokens ({source}, {per_block} bytes per block of "
            f"{B}), fewer than one max_model_len request ({L}); vLLM refuses to start. "
            "Lower max_model_len or give more KV blocks.", file="config", field="max_model_len")
    return nb


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


# ---------------------------------------------------------------------------------------------
# adapters in tensors: the host cache and the device slots mirroring AdapterCache
# ---------------------------------------------------------------------------------------------
class _AdapterStore:
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

    def slot(self, adapter: int) -> int:
        return -1 if adapter < 0 else self.slot_of[adapter]

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


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
def execute(trace: pd.DataFrame, config: ServingConfig, model, catalog=None, *,
            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            threads: int | None = None, window_s: float | None = None, progress: bool = False,
            seed: int = 0, num_gpu_blocks: int | None = None, kv_cache_gib: float | None = None,
            time_scale: float = 1.0, keep_tokens: bool = False, trace_source: str = "trace",
            sample_dt: float | None = None) -> RunResult:
    """Serve ``trace`` for real with ``config`` and return a :class:`RunResult` like the
    twin's, plus the per-step log in ``result.steps`` (see ``STEP_COLUMNS``).

    ``model``: an HF Llama directory or a loaded :class:`LlamaModel` (then ``device`` and
    ``dtype`` are the model's). ``catalog``: see :func:`resolve_catalog`; adapter ids are
    catalog order, as in the twin. ``threads``: torch CPU threads for the run.
    ``num_gpu_blocks`` / ``kv_cache_gib``: KV capacity (see :func:`choose_num_blocks`).
    ``time_scale``: multiplies arrival times (0.5 replays the trace twice as fast).
    ``keep_tokens``: add the generated token ids per request (column ``output_token_ids``).
    """
    if config.policy not in ("vllm", "slora"):   # slora: twin.executor.slora (issue 7)
        raise TwinInputError(f"the executor serves the vllm and slora policies only, not "
                             f"{config.policy!r} (other policies run in the twin)",
                             file="config", field="policy")
    trace = validate_trace(trace, source=trace_source)
    if time_scale != 1.0:
        if not time_scale > 0:
            raise TwinInputError(f"time_scale must be > 0, got {time_scale}", field="time_scale")
        trace = trace.assign(arrival_s=trace["arrival_s"] * float(time_scale))
    trace = crop_window(trace, window_s)
    if config.enable_lora:
        catalog = resolve_catalog(catalog, trace)
        check_unknown_adapters(trace, catalog, trace_source)
    else:   # a base-model server: vLLM answers adapter requests 404, so refuse them
        refuse_unserved_adapters(config, trace, trace_source)
        catalog = resolve_catalog(None)

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        if not isinstance(model, LlamaModel):
            model_name = str(model)
            model = LlamaModel.from_pretrained(model, device=device, dtype=dtype)
        else:
            model_name = getattr(model, "name", "LlamaModel")
        return _Engine(trace, config, model, catalog, window_s=window_s, progress=progress,
                       seed=seed, num_gpu_blocks=num_gpu_blocks, kv_cache_gib=kv_cache_gib,
                       keep_tokens=keep_tokens, sample_dt=sample_dt,
                       meta={"model": model_name, "time_scale": time_scale, "seed": seed,
                             "threads": torch.get_num_threads(), "trace": trace_source}).run()
    finally:
        torch.set_num_threads(old_threads)


class _Engine:
    def __init__(self, trace, config: ServingConfig, model: LlamaModel, catalog: AdapterCatalog,
                 *, window_s, progress, seed, num_gpu_blocks, kv_cache_gib, keep_tokens,
                 sample_dt, meta):
        self.trace, self.model, self.catalog = trace, model, catalog
        self.window_s, self.progress, self.seed = window_s, progress, seed
        self.keep_tokens, self.meta = keep_tokens, meta
        if config.max_model_len > model.shape.max_position_embeddings:
            # vLLM derives max_model_len from the model; it never serves beyond it
            config = config.replace(max_model_len=model.shape.max_position_embeddings)
        self.config = config
        names = catalog.adapters
        self.names = names
        self.ids = {a: i for i, a in enumerate(names)}
        paths = list(catalog.table["path"]) if len(catalog) else []
        # up-front checks of the adapters the trace (or the preload) needs
        used = set(trace["adapter"].dropna().unique()) if config.enable_lora else set()
        if config.enable_lora and config.preload_adapters:
            used |= set(names)
        self.bad: dict[int, str] = {}
        # -- slora hook (issue 7): no slots, so no max_lora_rank ceiling on adapters --------
        self.paged = config.policy == "slora" and config.enable_lora
        max_rank = SLORA_MAX_RANK if self.paged else config.max_lora_rank
        for a in sorted(used, key=self.ids.get):
            msg = check_adapter_dir(paths[self.ids[a]], a, max_rank)
            if msg is not None:
                self.bad[self.ids[a]] = msg
        # the server (twin.servers.build_server, as the twin builds it) and its torch side
        if self.paged:   # unified page pool, SLoRAScheduler, exact-rank store
            built = build_slora(model, config, trace, catalog, self.bad,
                                num_gpu_blocks=num_gpu_blocks, kv_cache_gib=kv_cache_gib,
                                choose_num_blocks=choose_num_blocks)
            self.meta["slora"] = built.meta
        else:
            built = self._build_vllm(config, model, catalog, trace, names, paths,
                                     num_gpu_blocks, kv_cache_gib)
        self.num_blocks, self.kv, self.tables = built.num_blocks, built.kv, built.tables
        self.slots, self.store = built.lora, built.store
        server = built.server
        self.sched, self.cache, self.featurize = server.scheduler, server.cache, server.featurize
        if not self.paged:
            self._preload()
        n = len(trace)
        horizon = window_s if window_s is not None else (
            float(trace["arrival_s"].iloc[-1]) if n else 0.0)
        self.sample_dt = sample_dt if sample_dt is not None else max(horizon / 2000.0, 0.05)

    def _build_vllm(self, config, model, catalog, trace, names, paths, num_gpu_blocks,
                    kv_cache_gib) -> BuiltServer:
        """vLLM's layout: LoRA slots, KV block tables, AdapterCache, Scheduler."""
        slots = None
        if config.enable_lora and len(catalog):
            slots = GroupedLoRASlots(model.shape, config.max_loras, config.max_lora_rank,
                                     dtype=model.dtype, device=model.device)
        num_blocks = choose_num_blocks(model, config, trace, num_gpu_blocks=num_gpu_blocks,
                                       kv_cache_gib=kv_cache_gib)
        preload = ([i for i in range(len(names)) if i not in self.bad]
                   if config.enable_lora and config.preload_adapters else [])
        server = build_server(config, None, catalog, layout="vllm", num_blocks=num_blocks,
                              preload=preload)
        return BuiltServer(server, num_blocks,
                           model.allocate_kv_cache(num_blocks, config.block_size),
                           PagedBlockTables(num_blocks, config.block_size), slots,
                           _AdapterStore(model, slots, names, paths, config.max_lora_rank))

    def _preload(self) -> None:
        """Start-up loads (``preload_adapters``), mirroring AdapterCache's preload."""
        for a in list(self.cache.host.resident):
            try:
                self.store.read_pack(a)
                if a in self.cache.gpu:
                    self.store.to_slot(a)
            except (AdapterError, OSError) as exc:
                self.bad[a] = (str(exc) if isinstance(exc, AdapterError) else
                               str(AdapterError(self.names[a], f"cannot be read: {exc}")))
                self.store.forget(a)
                self.cache.drop(a)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> RunResult:
        trace, sched, cache, model = self.trace, self.sched, self.cache, self.model
        tables, store, kv, lora = self.tables, self.store, self.kv, self.slots
        n = len(trace)
        arrival = trace["arrival_s"].to_numpy(np.float64).tolist()
        aid = [(-1 if pd.isna(a) or not self.config.enable_lora else self.ids[a])
               for a in trace["adapter"]]
        prompt = trace["prompt_tokens"].to_numpy(np.int64).tolist()
        output = trace["output_tokens"].to_numpy(np.int64).tolist()
        rid = trace["request_id"].to_numpy(np.int64).tolist()
        vocab = model.shape.vocab
        out = Outcomes(trace["output_tokens"].to_numpy(np.int64), failures=True,
                       keep_tokens=self.keep_tokens)
        seqs: dict[int, list[int]] = {}     # request idx -> prompt + generated token ids
        window_s = self.window_s
        cuda = model.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        rec = Recorder(self.sample_dt, self.num_blocks)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="req", desc=f"executing ({model.device.type})")

        def arrive(i: int, now: float) -> None:
            r = Request(i, rid[i], arrival[i], aid[i], prompt[i], output[i])
            if self.config.enable_lora and r.adapter in self.bad:
                out.fail(r, now, self.bad[r.adapter])
                if bar is not None:
                    bar.update(1)
                return
            if not sched.add_request(r):
                out.record(r)
                out.error[i] = (f"maximum context length is {self.config.max_model_len} "
                                f"tokens; requested {r.prompt + r.output} ({r.prompt} prompt, "
                                f"{r.output} output)")
                if bar is not None:
                    bar.update(1)
                return
            seqs[i] = prompt_token_ids(rid[i], prompt[i], vocab, self.seed)

        perf = time.perf_counter

        def wait_for(target: float, now: float, wall: float) -> float:
            """Sleep until the wall clock catches up with logical ``target``; returns the
            wall instant that now corresponds to it."""
            left = target - now - (perf() - wall)
            if left > 0:
                time.sleep(left)
            return perf()

        i = 0
        now = 0.0            # logical clock (seconds from the trace start)
        wall = perf()        # the wall instant that corresponds to ``now``
        idle = False         # waited for an arrival since the last step (as the twin marks it)
        while True:
            while i < n and arrival[i] <= now:
                arrive(i, now)
                i += 1
            if window_s is not None and now >= window_s:
                break
            if not sched.has_work():
                if i >= n:
                    break
                if now >= rec.next_sample:
                    rec.sample(now, sched)
                target = now + (arrival[i] - now)     # as the twin's clock computes it
                now, wall, idle = target, wait_for(target, now, wall), True
                continue
            t = perf()
            if self.paged:   # slora hook: free the pages of the adapters schedule() drops
                store.before_schedule(cache)
            plan = sched.schedule(now)
            t_sched = perf() - t
            if not plan.num_tokens and not plan.preempted:
                # nothing can run until something arrives (the twin waits the same way)
                if i >= n:
                    break
                target = now + (arrival[i] - now)
                now, wall, idle = target, wait_for(target, now, wall), True
                continue
            f = self.featurize(plan)   # as the twin prices this step
            if idle:
                f = after_idle(f)
            for r in plan.preempted:
                tables.release(r.idx)
            # adapter loads, inside the step (vLLM: set_active_loras before the forward)
            t_read = t_pack = t_copy = 0.0
            t = perf()
            failed: dict[int, str] = {}
            n_disk = 0
            for ld in plan.loads:
                n_disk += ld.from_disk
                known = self.bad.get(ld.adapter)
                if known is not None:   # failed before: no second attempt
                    store.evict(ld)
                    failed[ld.adapter] = known
                    continue
                try:
                    r_s, p_s, c_s = store.apply(ld)
                    t_read += r_s
                    t_pack += p_s
                    t_copy += c_s
                except AdapterError as exc:
                    failed[ld.adapter] = str(exc)
                except OSError as exc:          # unreadable file, vanished directory
                    failed[ld.adapter] = str(AdapterError(self.names[ld.adapter],
                                                          f"cannot be read: {exc}"))
            t_load = perf() - t if plan.loads else 0.0
            n_failed = 0
            if failed:
                victims = [r for r, _ in plan.explicit if r.adapter in failed]
                for r in victims:
                    sched.abort(r, plan)
                    tables.release(r.idx)
                    seqs.pop(r.idx, None)
                    out.fail(r, now, failed[r.adapter])
                    n_failed += 1
                    if bar is not None:
                        bar.update(1)
                for a, msg in failed.items():
                    self.bad[a] = msg
                    store.forget(a)
                    cache.drop(a)
            items = sched.batch(plan)
            chunks = []
            starts = []
            for r, k in items:
                start = sched.computed(r)
                toks = seqs[r.idx]
                chunks.append(SeqChunk(toks[start:start + k], start,
                                       tables.ensure(r.idx, start + k), store.slot(r.adapter)))
                starts.append(start)
            if not failed:
                assert tables.used == plan.kv_blocks, (
                    f"KV blocks: the executor's tables hold {tables.used}, the scheduler "
                    f"counts {plan.kv_blocks}")
            t_fwd = t_samp = 0.0
            nonfinite: list[int] = []      # rows of items whose logits were NaN/inf
            if chunks:
                t = perf()
                logits = model.step(chunks, kv, lora)
                sync()
                t_fwd = perf() - t
                t = perf()
                # one pass gives the greedy token and the check that the logits are finite
                top, next_ids = logits.max(dim=-1)
                next_ids = next_ids.tolist()
                for (r, k), start, tok in zip(items, starts, next_ids):
                    toks = seqs[r.idx]
                    if start + k == len(toks):   # end of prompt / recompute, or a decode
                        toks.append(tok)
                finite = torch.isfinite(top)
                if not bool(finite.all()):
                    nonfinite = (~finite).nonzero().flatten().tolist()
                t_samp = perf() - t
            end = perf()
            dur = end - wall
            t_end = now + dur
            done = sched.finish_step(plan, t_end)
            if nonfinite:
                n_failed += self._stop_nonfinite([items[j] for j in nonfinite],
                                                 [starts[j] for j in nonfinite], done, t_end,
                                                 seqs, out, bar)
            # -- bookkeeping (counts toward the next step's time) --
            if plan.decode_n:
                rec.itl.add(dur, plan.decode_n)
            rec.load(len(plan.loads), t_load)
            rec.step(plan, now, dur, 1, idle, extra=(
                len(items), sum(k for _, k in items),
                len({r.adapter for r, _ in items if r.adapter >= 0}), n_disk,
                plan.kv_blocks, n_failed, t_sched, t_load, t_read, t_pack, t_copy,
                t_fwd, t_samp, [r.request_id for r, _ in items], [k for _, k in items],
                list(f)))
            for r in done:
                tables.release(r.idx)
                toks = seqs.pop(r.idx)
                assert len(toks) - r.prompt == r.generated, (len(toks), r.prompt, r.generated)
                out.record(r, toks)
                if bar is not None:
                    bar.update(1)
            now, wall, idle = t_end, end, False
            if now >= rec.next_sample:
                rec.sample(now, sched)
        rec.sample(now, sched)
        if bar is not None:
            bar.close()
        for r in sched.running_in_order() + list(sched.waiting):
            if r.status == RequestStatus.DECODING:
                r.generated = sched.computed(r) - r.prompt + 1
            out.record(r, seqs.get(r.idx))
        duration = window_s if window_s is not None else now
        return self._result(out, rec, duration)

    def _stop_nonfinite(self, items, starts, done, now, seqs, out, bar) -> int:
        """Fail the requests whose logits were NaN/inf this step (already committed by
        ``finish_step``) instead of letting them emit argmax-of-NaN tokens as if finished:
        finished ones are recorded as failed, running ones are aborted and their KV blocks
        freed. Returns how many failed."""
        for (r, k), start in zip(items, starts):
            who = f"adapter {self.names[r.adapter]!r}" if r.adapter >= 0 else "the base model"
            msg = (f"non-finite logits (NaN/inf) at position {start + k - 1} of request "
                   f"{r.request_id} ({who}); the request was stopped")
            if r in done:
                done.remove(r)
            else:
                self.sched.abort(r)
            self.tables.release(r.idx)
            seqs.pop(r.idx, None)
            out.fail(r, now, msg)
            if bar is not None:
                bar.update(1)
        return len(items)

    # -- the result -------------------------------------------------------------------------
    def _result(self, out: Outcomes, rec: Recorder, duration: float) -> RunResult:
        config = self.config
        s = self.model.shape
        meta = dict(self.meta)
        meta.update({
            "config": config.to_dict(), "profile": "executor", "executor": True,
            "window_s": self.window_s, "device": str(self.model.device),
            "device_name": (torch.cuda.get_device_name(self.model.device)
                            if self.model.device.type == "cuda" else "cpu"),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "num_gpu_blocks": self.num_blocks, "block_size": config.block_size,
            "model_shape": {"layers": s.layers, "hidden": s.hidden, "heads": s.heads,
                            "kv_heads": s.kv_heads, "head_dim": s.head_dim,
                            "intermediate": s.intermediate, "vocab": s.vocab,
                            "dtype_bytes": self.model.embed.element_size(),
                            "tie_word_embeddings": s.tie_word_embeddings},
            "bad_adapters": {self.names[a]: m for a, m in self.bad.items()},
            "twin_version": __import__("twin").__version__,
        })
        result = build_result(self.trace, out, rec, self.sched, self.cache,
                              kv_tokens=self.num_blocks * config.block_size, duration=duration,
                              window_s=self.window_s, max_model_len=config.max_model_len,
                              meta=meta, step_columns=STEP_COLUMNS)
        summary = result.summary
        if self.paged:   # slora hook: the unified pool's use
            from twin.executor.slora import pool_summary
            summary["adapter_pool"] = pool_summary(self)
        phases = ["schedule_s", "load_s", "forward_s", "sample_s"]
        summary["executor_phases_s"] = {p: float(result.steps[p].sum()) for p in phases}
        return result

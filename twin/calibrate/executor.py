"""``twin calibrate --executor``: fit a Profile to microbenchmarks of the reference executor.

The loop a user runs on their own hardware: measure a little, fit the twin, check it with
``twin validate``. Three cost models are fitted, the same ones the vLLM calibration fits:

* **Step time** — a designed set of *cells*, each a burst of requests arriving at t = 0
  served by the executor (``twin.executor.execute``) with one configuration. The cells
  vary the prefill tokens per step (chunk budget, prompt length), the decode batch
  (request count, staggered output lengths so the batch shrinks), the attended context
  (prompt length), the distinct adapters (0 = base model, up to 32), the padded rank
  (``max_lora_rank`` 8..64), ``max_loras`` (1..32), and requests spaced apart so each
  meets an idle engine (the after-idle step). Every executor step is one measurement: its
  full wall-clock duration (scheduling, forward, sampling, bookkeeping — exactly what the
  twin must predict) minus its adapter-load time, against the twin's step features
  (``twin.costs.step_time.FEATURES``) as the executor logs them, computed by the same
  featurizer (vLLM's or S-LoRA's, ``policy``) the twin prices the step with. Each cell runs
  ``repeats`` times, interleaved (every cell once, then again); a burst schedules alike
  every time, so its steps line up and per step the mean (``statistic``) or median over
  the repeats is fitted. The mean is the default: on a shared CPU some steps lose a
  scheduler time slice (~4 ms) to other processes; the median drops those hits, a served
  trace pays them. The model is linear, ``t = sum_k c_k f_k`` with ``c >= 0``
  (non-negative least squares on relative errors: a served trace's time is mostly small
  decode steps, and an unweighted fit bends to the bursts' few large prefill steps —
  measured on seven served traces, the mean |error| of their summed step time fell from
  10.6% unweighted to 6.6% relative).
* **Load time** — adapters of ranks 8..64 are read + packed (disk → host) and copied into
  a slot (host → device) ``repeats`` times, each after a sweep that evicts the CPU caches
  as a served step does; medians are fitted affine in the adapter's bytes as the twin
  counts them (``ModelShape.adapter_bytes``), non-negative.
* **Memory** — measured, not fitted: weights, LoRA slot bytes per slot and rank, KV bytes
  per token from the executor's own tensors; the activation peak as the executor's
  estimate (per batched token and per sequence). On CUDA the device memory is the GPU's;
  on CPU it is a *budget* (``--device-memory-gib``, default 2 GiB): the KV cache gets
  ``util x budget - weights - LoRA slots - activations``, like vLLM's
  ``VLLM_CPU_KVCACHE_SPACE``.

Measurements go to ``PROFILE.measurements.parquet`` after every run; a re-run with the
same model, device and threads reuses every finished run (resumable), and ``--budget``
stops launching runs once the seconds are spent (the fit uses what was measured).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.costs.step_time import FEATURES

MEASUREMENT_SUFFIX = ".measurements.parquet"
DEFAULT_CPU_MEMORY_GIB = 2.0
LOAD_RANKS = (8, 16, 32, 64)
DESIGN_VERSION = 2   # measurements of another version are not reused


# ---------------------------------------------------------------------------------------------
# the design
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One microbenchmark: ``n`` requests at t = 0, prompt ``prompt`` tokens, outputs
    staggered over ``output * (1, 2/3, 1/3)``, adapters round-robin over ``adapters``
    distinct ones (0: base model), served with ``max_loras``, ``max_lora_rank`` and a
    chunk budget ``budget`` (max_num_batched_tokens).

    ``gap`` > 0 spaces the arrivals ``gap`` seconds apart instead, long enough for each
    request to finish before the next: every request then meets an idle engine, which
    measures the after-idle step (``after_idle`` feature)."""

    n: int
    prompt: int
    output: int
    adapters: int
    max_loras: int
    rank: int
    budget: int
    gap: float = 0.0

    @property
    def key(self) -> str:
        return (f"n{self.n}-p{self.prompt}-o{self.output}-a{self.adapters}-m{self.max_loras}"
                f"-r{self.rank}-b{self.budget}" + (f"-g{self.gap:g}" if self.gap else ""))

    def trace(self) -> pd.DataFrame:
        i = np.arange(self.n)
        out = np.maximum(1, (self.output * (3 - i % 3)) // 3)
        names = [f"lora-{k % self.adapters:04d}" if self.adapters else None for k in i]
        return pd.DataFrame({"request_id": i.astype(np.int64), "arrival_s": i * self.gap,
                             "adapter": pd.array(names, dtype="string"),
                             "prompt_tokens": np.full(self.n, self.prompt, dtype=np.int32),
                             "output_tokens": out.astype(np.int32)})

    def config(self, max_model_len: int, policy: str = "vllm"):
        from twin.config import ServingConfig

        return ServingConfig(enable_lora=True, max_loras=self.max_loras,
                             max_cpu_loras=max(self.max_loras, self.adapters, 1),
                             max_lora_rank=self.rank, max_num_seqs=256,
                             max_num_batched_tokens=self.budget, max_model_len=max_model_len,
                             policy=policy)


def design(scale: str = "tiny", policy: str = "vllm") -> list[Cell]:
    """The cells, most informative first (a small ``--budget`` still spans the features).

    ``scale``: ``tiny`` for models whose step takes milliseconds, ``small`` for ~100M
    parameter models on a CPU (fewer, shorter requests). ``policy="slora"``: the same
    batches on S-LoRA's layout, which has no slots and no padded rank, so cells differing
    only in ``max_loras`` / ``max_lora_rank`` collapse into one (its adapters' own ranks,
    8 to 64, vary instead).
    """
    if scale == "tiny":
        N, P, O, B, gap = (2, 8, 24, 48), (32, 128, 384), 48, (64, 256, 1024), 0.1
    else:
        N, P, O, B, gap = (2, 6, 12), (32, 96), 12, (64, 256), 0.6
    cells = []
    # the core: decode batch x context x adapters (prefill in chunks of the budget)
    for a in (0, 4):
        for n in N:
            for p in P:
                cells.append(Cell(n, p, O, min(a, n), 8, 16, B[1]))
    # slots: max_loras from 1 to 32 at small and large decode batches. The LoRA kernels'
    # cost grows with the slots they span, and a design where max_loras is mostly 8
    # confounds that slope with the fixed cost of running LoRA at all (measured: a 1-slot
    # decode step was predicted 25% short until these cells were added).
    for m in (1, 2, 4, 16, 32):
        for n in (N[0], N[2]):
            cells.append(Cell(n, P[0], O, min(2, m), m, 16, B[1]))
    # after idle: requests one at a time, each arriving to an idle engine
    for p in P[:2]:
        cells.append(Cell(N[1], p, 4, 2, 8, 16, B[1], gap))
    # adapters and slots: distinct adapters, max_loras (kernel span), padded rank
    n = N[-1]
    for a, m in ((1, 1), (2, 32), (8, 8), (8, 32), (n // 2, 32), (n, 32)):
        cells.append(Cell(n, P[0], O, min(a, n), m, 16, B[1]))
    for r in (8, 32, 64):
        cells.append(Cell(n, P[0], O, min(8, n), 8, r, B[1]))
    # prefill: chunk budget x prompt length (long prompts, short outputs)
    for b in B:
        for p in P[-2:]:
            cells.append(Cell(N[1], p * 2, 4, min(4, N[1]), 8, 16, b))
    out, seen = [], set()
    for c in cells:
        m, r = (8, 16) if policy == "slora" else (c.max_loras, c.rank)
        c = Cell(c.n, c.prompt, c.output, min(c.adapters, 32), m, r, c.budget, c.gap)
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# features from a step log
# ---------------------------------------------------------------------------------------------
def step_features(steps: pd.DataFrame, trace: pd.DataFrame, max_lora_rank: int,
                  max_loras: int) -> np.ndarray:
    """The twin's vLLM-layout step features (``FEATURES`` order) of every executor step,
    rebuilt from the step log's batches (request ids and token counts) and the trace.

    Calibration fits on the features the executor logs (its policy's own featurizer); this
    independent reconstruction checks them (tests) and analyses a log by hand. A sequence's
    tokens this step are a decode when everything before them is computed prompt (one
    token, start >= prompt), else a prefill chunk; the run must be free of preemptions
    (recompute resets progress).
    """
    prompt = dict(zip(trace["request_id"].tolist(), trace["prompt_tokens"].tolist()))
    lora = dict(zip(trace["request_id"].tolist(), trace["adapter"].notna().tolist()))
    if "after_idle" in steps.columns:
        idle = steps["after_idle"].to_numpy(bool)
    else:   # older logs: a gap before the step means the engine waited
        end = (steps["start_s"] + steps["duration_s"]).to_numpy()
        idle = np.r_[steps["start_s"].to_numpy()[:1] > 0,
                     steps["start_s"].to_numpy()[1:] > end[:-1] + 1e-9]
    computed: dict[int, int] = {}
    X = np.zeros((len(steps), len(FEATURES)))
    for j, (ids, toks) in enumerate(zip(steps["batch_request_ids"], steps["batch_tokens"])):
        pt = pn = dn = dctx = pctx = lt = 0
        for rid, k in zip(ids, toks):
            rid, k = int(rid), int(k)
            start = computed.get(rid, 0)
            if k == 1 and start >= prompt[rid]:
                dn += 1
                dctx += start + 1
            else:
                pt += k
                pn += 1
                pctx += k * (start + k)
            if lora[rid]:
                lt += k
            computed[rid] = start + k
        a = int(steps["batch_adapters"].iloc[j])
        X[j] = (1.0, pt, dn, dctx, pctx, lt * max_lora_rank, a, a * max_lora_rank,
                max_loras if lt else 0, 1 if lt else 0, pn, float(idle[j]))
    return X


# ---------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------
def fit_nnls(X: np.ndarray, y: np.ndarray, names, relative: bool = True) -> tuple[dict, dict]:
    """Non-negative least squares ``y ~ X c`` (rows weighted by 1/y when ``relative``).
    Returns (coefficients by name, residual statistics)."""
    from scipy.optimize import nnls

    X = np.asarray(X, float)
    y = np.asarray(y, float)
    w = 1.0 / np.maximum(y, 1e-9) if relative else np.ones_like(y)
    Xw = X * w[:, None]
    scale = np.abs(Xw).max(axis=0)
    scale[scale == 0] = 1.0
    c, _ = nnls(Xw / scale, y * w, maxiter=50 * X.shape[1])
    c = c / scale
    pred = X @ c
    coef = {n: float(v) for n, v in zip(names, c)}
    return coef, residual_stats(y, pred)


def residual_stats(y, pred) -> dict:
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if not len(y):
        return {"n": 0}
    rel = (pred - y) / np.maximum(np.abs(y), 1e-12)
    ss = float(((y - y.mean()) ** 2).sum())
    return {"n": int(len(y)), "rmse_s": float(np.sqrt(np.mean((pred - y) ** 2))),
            "r2": float(1 - ((pred - y) ** 2).sum() / ss) if ss > 0 else float("nan"),
            "rel_abs_median": float(np.median(np.abs(rel))),
            "rel_abs_p90": float(np.percentile(np.abs(rel), 90)),
            "rel_mean": float(rel.mean()),
            "sum_error": float(pred.sum() / y.sum() - 1) if y.sum() > 0 else float("nan")}


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
class _Cache:
    """Measurements on disk (Parquet), appended after every cell / load benchmark."""

    def __init__(self, path: Path, ident: dict):
        self.path, self.ident = path, ident
        self.df = pd.DataFrame()
        if path.exists():
            df = pd.read_parquet(path)
            mine = np.ones(len(df), bool)
            for k, v in ident.items():
                mine &= (df[k].astype(str) == str(v)).to_numpy() if k in df else False
            self.df = df[mine].reset_index(drop=True)
            self.other = df[~mine].reset_index(drop=True)
        else:
            self.other = pd.DataFrame()
        self.reused = len(self.df)
        self.new = 0

    def has(self, key: str, repeat: int | None = None) -> bool:
        if not len(self.df):
            return False
        hit = self.df["key"] == key
        if repeat is not None:
            hit &= self.df["repeat"] == repeat
        return bool(hit.any())

    def add(self, rows: pd.DataFrame) -> None:
        rows = rows.assign(**{k: str(v) for k, v in self.ident.items()})
        self.df = pd.concat([self.df, rows], ignore_index=True)
        self.new += len(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        pd.concat([self.other, self.df], ignore_index=True).to_parquet(tmp, index=False)
        tmp.replace(self.path)


def _measure_cell(cell: Cell, model, adapters_dir: Path, max_model_len: int,
                  repeat: int, policy: str = "vllm") -> pd.DataFrame:
    """Serve a cell once; one row per step with the twin's features of it (as the executor
    logged them with its policy's featurizer), duration and load time."""
    from twin.executor.engine import execute

    trace = cell.trace()
    cfg = cell.config(max_model_len, policy)
    catalog = adapters_dir if cell.adapters else None
    need = int(((trace["prompt_tokens"] + trace["output_tokens"] + 15) // 16).sum()) + 1
    blocks = max(need, -(-max_model_len // 16))
    if policy == "slora" and cell.adapters:   # the unified pool holds the adapters too
        from twin.executor.slora import adapter_pages_for

        cat = pd.read_csv(adapters_dir / "catalog.csv").set_index("adapter")
        pages = dict(zip(cat.index, adapter_pages_for(model, cfg, cat["rank"].tolist())))
        # S-LoRA serves only if one max_model_len request fits beside the largest adapter
        blocks = max(blocks, -(-max_model_len // 16) + max(pages.values()))
        blocks += sum(pages[a] for a in trace["adapter"].dropna().unique())
    st = execute(trace, cfg, model, catalog, num_gpu_blocks=blocks).steps
    if int(st["preempted"].sum()):
        raise RuntimeError(f"calibration cell {cell.key} preempted (KV too small)")
    rows = pd.DataFrame(np.array(st["features"].tolist(), float), columns=list(FEATURES))
    rows.insert(0, "kind", "step")
    rows.insert(1, "key", cell.key)
    rows["repeat"] = repeat
    rows["step"] = np.arange(len(st))
    rows["duration_s"] = st["duration_s"].to_numpy()
    rows["load_s"] = st["load_s"].to_numpy()
    rows["loads"] = st["loads"].to_numpy()
    return rows


def step_table(steps: pd.DataFrame, statistic: str = "mean") -> pd.DataFrame:
    """One row per distinct step of a cell (same key, step index and features): the
    ``statistic`` (mean or median) of its duration minus load time over the repeats, the
    repeats' relative spread and their count. A cell's bursts schedule alike run after run,
    so its steps line up across repeats; where timing made them differ they stay apart."""
    df = steps.assign(y=steps["duration_s"] - steps["load_s"])
    g = df.groupby(["key", "step", *FEATURES], sort=False)["y"]
    out = g.agg(y_mean="mean", y_median="median", y_std="std", repeats="size").reset_index()
    out["y"] = out["y_mean"] if statistic == "mean" else out["y_median"]
    out["spread"] = (out["y_std"].fillna(0.0) / out["y_median"].where(out["y_median"] > 0)).fillna(0.0)
    return out


def _measure_loads(model, adapters_dir: Path, repeats: int) -> pd.DataFrame:
    """Disk → host (read + pack) and host → device (slot copy) per rank, medians."""
    from twin.executor.adapters import pack_adapter, read_adapter
    from twin.executor.lora import LoRASlots

    import torch

    # A live load happens between forward passes that have evicted the CPU caches (loading
    # the same adapter in a tight loop measured 1.0 ms where a served trace paid 1.3-1.9 ms
    # on the tiny model), so each timed load follows a sweep over a buffer larger than
    # the last-level cache.
    flush = torch.ones(16 * 2 ** 20)   # 64 MB of float32
    rows = []
    for r in LOAD_RANKS:
        path = adapters_dir / f"rank-{r}"
        slots = LoRASlots(model.shape, 1, r, dtype=model.dtype, device=model.device)
        disk, copy = [], []
        for _ in range(repeats + 1):   # the first is a warm-up
            if model.device.type == "cpu":
                flush.add_(1.0)
            t = time.perf_counter()
            packed = pack_adapter(read_adapter(str(path), f"rank-{r}"), model, r,
                                  dtype=model.dtype, pin_memory=model.device.type == "cuda")
            disk.append(time.perf_counter() - t)
            t = time.perf_counter()
            slots.load_slot(0, packed)
            if model.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            copy.append(time.perf_counter() - t)
        rows.append({"kind": "load", "key": f"load-r{r}", "rank": r,
                     "disk_s": statistics.median(disk[1:]), "copy_s": statistics.median(copy[1:]),
                     "repeats": repeats})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# the profile
# ---------------------------------------------------------------------------------------------
def model_shape(model, name: str):
    from twin.costs.profile import ModelShape

    s = model.shape
    db = model.embed.element_size()
    return ModelShape(name=name, layers=s.layers, hidden=s.hidden, heads=s.heads,
                      kv_heads=s.kv_heads, head_dim=s.head_dim, intermediate=s.intermediate,
                      vocab=s.vocab, dtype_bytes=db, params=float(model.weight_bytes / db),
                      tie_word_embeddings=bool(s.tie_word_embeddings))


def memory_model(model, device_memory_gib: float):
    """Measured memory model (see the module docstring)."""
    from twin.executor.lora import LoRASlots
    from twin.costs.memory import GIB, MemoryModel

    s = model.shape
    db = model.embed.element_size()
    per_slot_rank = LoRASlots(s, 1, 1, dtype=model.dtype, device="cpu").nbytes
    act_tok = (4 * s.hidden + s.q_size + 2 * s.kv_size + 3 * s.intermediate) * db * 2
    return MemoryModel(gpu_memory_gib=float(device_memory_gib),
                       weights_gib=model.weight_bytes / GIB,
                       kv_bytes_per_token=2 * s.layers * s.kv_size * db,
                       lora_bytes_per_slot_rank=float(per_slot_rank), lora_bytes_per_slot=0.0,
                       activation_gib=0.0, activation_bytes_per_seq=float(s.vocab * 4 * 2),
                       activation_bytes_per_token=float(act_tok))


def calibrate_executor(model: str = "tiny", *, device: str = "cpu", out: str | Path,
                       budget_s: float | None = None, threads: int | None = 1,
                       repeats: int = 3, scale: str | None = None,
                       device_memory_gib: float | None = None, name: str | None = None,
                       statistic: str = "mean", max_cells: int | None = None,
                       policy: str = "vllm", cells: list | None = None,
                       dtype: str = "float32", progress: bool = True, log=print):
    """Measure, fit and write a Profile; returns (profile, info dict).

    ``threads``: torch threads, pinned for the run and recorded (validate with the same).
    ``max_cells``: only the first cells of the design (tests, quick looks); ``cells``: a
    design of one's own instead (``Cell`` objects).
    ``policy``: the executor's memory layout the cells run on, ``vllm`` (LoRA slots padded
    to ``max_lora_rank``) or ``slora`` (unified pages, LoRA at each adapter's own rank,
    grouped by rank); a profile describes one serving implementation on one machine, so
    validate each policy with its own.
    ``dtype``: model, KV-cache and LoRA dtype (``float32``, ``bfloat16``, ``float16``); a
    GPU serves in bf16/fp16, whose steps cost differently. Recorded in the provenance,
    where ``twin validate`` takes it from.
    """
    if policy not in ("vllm", "slora"):
        raise TwinInputError(f"the executor implements the vllm and slora layouts, not "
                             f"{policy!r}", field="--policy")
    import torch

    from twin.executor.model import LlamaModel
    from twin.executor.weights import resolve_model
    from twin.costs.load_time import LoadTimeModel
    from twin.costs.profile import Profile
    from twin.costs.step_time import StepTimeModel

    t0 = time.perf_counter()
    out = Path(out)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TwinInputError("CUDA is not available on this machine", field="--device")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    n_threads = torch.get_num_threads()
    try:
        model_dir = resolve_model(model)
        m = LlamaModel.from_pretrained(model_dir, device=dev, dtype=getattr(torch, dtype))
        if scale is None:
            scale = "tiny" if m.weight_bytes < 50e6 else "small"
        cells = (design(scale, policy) if cells is None else list(cells))[:max_cells]
        max_model_len = min(m.shape.max_position_embeddings, 2048)
        ident = {"model": str(model_dir), "device": str(dev), "threads": n_threads,
                 "torch": torch.__version__, "features": "|".join(FEATURES), "policy": policy,
                 "design": DESIGN_VERSION}
        if dtype != "float32":   # fp32 measurements keep their old identity (reused)
            ident["dtype"] = dtype
        cache = _Cache(out.with_name(out.name + MEASUREMENT_SUFFIX), ident)
        adapters_dir = out.with_name(out.name + ".adapters")
        _ensure_adapters(model_dir, adapters_dir)
        cell_adapters = adapters_dir / "mixed" if policy == "slora" else adapters_dir
        # Repeats are interleaved: every cell once, then every cell again, ... so a slow
        # drift of the machine (other tenants come and go over seconds) spreads over all
        # cells instead of biasing the few measured while it lasted (back-to-back repeats
        # left cell-level sum errors of +-15% on a shared 2-core box).
        todo = [(r, c) for r in range(repeats) for c in cells if not cache.has(c.key, r)]
        need_loads = not cache.has("load-r8")
        log(f"calibrating {model} on {dev} ({n_threads} thread(s)): {len(cells)} cells x "
            f"{repeats} repeats, {len(cells) * repeats - len(todo)} runs reused, {len(todo)} "
            "to measure" + (f", budget {budget_s:g} s" if budget_s else ""))
        if todo:   # warm-up: the first forwards of a process are slow
            _measure_cell(Cell(4, 32, 8, 2, 2, 16, 64), m, cell_adapters, max_model_len, -1,
                          policy)
        if need_loads:
            cache.add(_measure_loads(m, adapters_dir, repeats))
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), unit="run", desc="calibrating")
        skipped = 0
        run_times = []
        for r, c in todo:
            elapsed = time.perf_counter() - t0
            est = statistics.median(run_times) if run_times else 0.0
            have = len(cache.df) and bool((cache.df["kind"] == "step").any())
            if budget_s is not None and have and elapsed + est > budget_s:
                skipped += 1
                continue
            t = time.perf_counter()
            cache.add(_measure_cell(c, m, cell_adapters, max_model_len, r, policy))
            run_times.append(time.perf_counter() - t)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        df = cache.df
        measured = df[df["kind"] == "step"]
        loads = df[df["kind"] == "load"]
        if not len(measured):
            raise TwinInputError("no step measurement within the budget; raise --budget",
                                 field="--budget")
        # step time: duration minus the load work done inside the step
        steps = step_table(measured, statistic)
        y = steps["y"].to_numpy()
        X = steps[list(FEATURES)].to_numpy(float)
        # relative: every step weighs alike, small decode steps as much as big prefills
        coef, res = fit_nnls(X, y, FEATURES, relative=True)
        per_cell = {}
        pred = X @ np.array([coef[k] for k in FEATURES])
        for key, idx in steps.groupby("key").indices.items():
            per_cell[key] = float(pred[idx].sum() / y[idx].sum() - 1)
        shape = model_shape(m, m_name(model, model_dir))
        nbytes = np.array([shape.adapter_bytes(int(r)) for r in loads["rank"]], float)
        A = np.c_[np.ones(len(nbytes)), nbytes]
        dcoef, dres = fit_nnls(A, loads["disk_s"].to_numpy(float), ("s", "s_per_byte"))
        ccoef, cres = fit_nnls(A, loads["copy_s"].to_numpy(float), ("s", "s_per_byte"))
        load = LoadTimeModel(disk_s=dcoef["s"], disk_s_per_byte=dcoef["s_per_byte"],
                             host_to_gpu_s=ccoef["s"], host_to_gpu_s_per_byte=ccoef["s_per_byte"])
        if dev.type == "cuda":
            total = torch.cuda.mem_get_info(dev)[1] / 2 ** 30
            mem_gib = total if device_memory_gib is None else device_memory_gib
            hw_name = torch.cuda.get_device_name(dev)
        else:
            mem_gib = DEFAULT_CPU_MEMORY_GIB if device_memory_gib is None else device_memory_gib
            hw_name = f"CPU ({platform.processor() or platform.machine()}, {n_threads} thread(s))"
        memory = memory_model(m, mem_gib)
        pname = name or out.stem
        prof = Profile(
            name=pname,
            hardware={"name": hw_name, "device": str(dev), "memory_gib": mem_gib,
                      "memory_note": ("GPU memory" if dev.type == "cuda" else
                                      "CPU 'device memory' budget: the KV cache gets "
                                      "util x budget - weights - LoRA slots - activations"),
                      "threads": n_threads, "cpu_count": os.cpu_count()},
            model=shape, memory=memory, step_time=StepTimeModel(base=coef), load_time=load,
            provenance={
                "method": "twin calibrate --executor (twin.calibrate.executor)",
                "policy": policy,
                "fitted": True, "model": str(model), "model_dir": str(model_dir),
                "device": str(dev), "dtype": str(m.dtype).replace("torch.", ""),
                "torch": torch.__version__, "threads": n_threads,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "design": scale, "repeats": repeats,
                "repeats_interleaved": True,
                "cells": int(steps["key"].nunique()), "cells_designed": len(cells),
                "runs_skipped_budget": skipped,
                "n_measurements": int(len(measured) + len(loads)),
                "n_step_measurements": int(len(measured)), "n_load_measurements": int(len(loads)),
                "n_distinct_steps": int(len(steps)),
                "measurements": str(cache.path), "measurements_reused": cache.reused,
                "measurements_new": cache.new, "budget_s": budget_s,
                "step_time_fit": f"NNLS (relative errors) on the {statistic} over repeats of each "
                                 "step's duration minus its load time",
                "step_time_statistic": statistic,
                "step_time_mean_over_median": float(steps["y_mean"].sum()
                                                    / steps["y_median"].sum()),
                "step_time_residuals": res,
                "step_time_repeat_spread_median": float(steps["spread"].median()),
                "step_time_sum_error_per_cell": per_cell,
                "load_time_residuals": {"disk": dres, "host_to_gpu": cres},
                "calibration_s": round(time.perf_counter() - t0, 1)})
        prof.save(out)
        info = {"profile": prof, "new": cache.new, "reused": cache.reused,
                "seconds": time.perf_counter() - t0, "skipped": skipped}
        return prof, info
    finally:
        torch.set_num_threads(old_threads)


def m_name(model: str, model_dir: Path) -> str:
    return {"tiny": "tiny-llama", "smollm2": "SmolLM2-135M-Instruct"}.get(model, Path(model_dir).name)


def _ensure_adapters(model_dir: Path, adapters_dir: Path) -> None:
    """Synthetic rank-8 adapters lora-0000.. for the cells, the same with ranks 8..64 mixed
    under ``mixed/`` (slora cells), and rank-R ones for loads."""
    from twin.executor.adapters import write_synthetic_adapters

    done = adapters_dir / ".done"
    mark = f"{model_dir}\nranks {LOAD_RANKS} mixed"
    if done.exists() and done.read_text() == mark:
        return
    write_synthetic_adapters(model_dir, adapters_dir, 32, ranks=(8,))
    write_synthetic_adapters(model_dir, adapters_dir / "mixed", 32, ranks=LOAD_RANKS)
    for r in LOAD_RANKS:
        tmp = adapters_dir / f".r{r}"
        write_synthetic_adapters(model_dir, tmp, 1, ranks=(r,), catalog_csv=None)
        target = adapters_dir / f"rank-{r}"
        if target.exists():
            import shutil

            shutil.rmtree(target)
        (tmp / "lora-0000").rename(target)
        tmp.rmdir()
    done.write_text(mark)

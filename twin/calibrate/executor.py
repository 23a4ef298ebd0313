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
  10.6% unweighted to 6.6% relative). Relative to the fit's prediction, not to the
  measurement: measured errors weigh fast-running steps more, pulling the fit ~3% under
  the mean on a box that flips between a fast and a slow state (issue 15).
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

The parts: the cells (:mod:`twin.calibrate.executor_design`), measuring them
(:mod:`twin.calibrate.executor_measure`, the only part that needs torch), the fit of a
measurements log (:mod:`twin.calibrate.executor_fit`); this module runs them in turn and
writes the Profile, and names the parts' public functions, so callers need one import.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from twin.calibrate.executor_design import DESIGN_VERSION, Cell, design
from twin.calibrate.executor_fit import (ExecutorFit, fit_measurements, fit_nnls,
                                         residual_stats, step_features, step_table)
from twin.calibrate.executor_measure import (MeasurementCache, ensure_adapters, measure_cell,
                                             measure_cells, measure_loads)
from twin.costs.dispersion import log_sd
from twin.costs.machine import machine_record
from twin.costs.memory import GIB, MemoryModel
from twin.costs.profile import Profile
from twin.costs.step_time import FEATURES
from twin.executor.anchor_spec import anchor_summary
from twin.executor.device import torch_device
from twin.executor.gc_heap import frozen_heap
from twin.errors import TwinInputError

__all__ = ["calibrate_executor", "memory_model", "Cell", "design", "fit_nnls",
           "residual_stats", "step_features", "step_table", "MEASUREMENT_SUFFIX",
           "DEFAULT_CPU_MEMORY_GIB"]

MEASUREMENT_SUFFIX = ".measurements.parquet"
DEFAULT_CPU_MEMORY_GIB = 2.0


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
    ``dtype``: model, KV-cache and LoRA dtype (``float32``, ``bfloat16``, ``float16``;
    recorded in the provenance, where ``twin validate`` takes it from).
    """
    if policy not in ("vllm", "slora"):
        raise TwinInputError(f"the executor implements the vllm and slora layouts, not "
                             f"{policy!r}", field="--policy")
    import torch   # lazy: torch is an optional dependency, off `import twin`'s path

    t0 = time.perf_counter()
    out = Path(out)
    dev = torch_device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    n_threads = torch.get_num_threads()
    try:
        model_dir, m = _load_model(model, dev, dtype)
        if scale is None:
            scale = "tiny" if m.weight_bytes < 50e6 else "small"
        cells = (design(scale, policy) if cells is None else list(cells))[:max_cells]
        ident = {"model": str(model_dir), "device": str(dev), "threads": n_threads,
                 "torch": torch.__version__, "features": "|".join(FEATURES), "policy": policy,
                 "design": DESIGN_VERSION}
        if dtype != "float32":   # fp32 measurements keep their old identity (reused)
            ident["dtype"] = dtype
        cache = MeasurementCache(out.with_name(out.name + MEASUREMENT_SUFFIX), ident)
        skipped = _measure(m, model_dir, cells, cache, out.with_name(out.name + ".adapters"),
                           repeats=repeats, policy=policy, budget_s=budget_s, t0=t0,
                           progress=progress,
                           log=lambda s: log(f"calibrating {model} on {dev} ({n_threads} "
                                             f"thread(s)): {s}"))
        df = cache.df
        measured = df[df["kind"] == "step"]
        loads = df[df["kind"] == "load"]
        if not len(measured):
            raise TwinInputError("no step measurement within the budget; raise --budget",
                                 field="--budget")
        shape = m.cost_shape(m_name(model, model_dir))
        fit = fit_measurements(measured, loads, shape, statistic)
        mem_gib, hardware = _hardware(dev, device_memory_gib, n_threads)
        prov = {"method": "twin calibrate --executor (twin.calibrate.executor)",
                "policy": policy,
                "fitted": True, "model": str(model), "model_dir": str(model_dir),
                "device": str(dev), "dtype": str(m.dtype).replace("torch.", ""),
                "torch": torch.__version__, "threads": n_threads,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "design": scale, "repeats": repeats,
                "repeats_interleaved": True,   # where: simulate / validate warn elsewhere
                **machine_record(dev, hardware["name"] if dev.type == "cuda" else None),
                **_anchor_provenance(df, model_dir)}   # the box's speed while measuring
        prov.update(_fit_provenance(fit, cache, measured, loads, cells_designed=len(cells),
                                    skipped=skipped, budget_s=budget_s, statistic=statistic))
        prov["calibration_s"] = round(time.perf_counter() - t0, 1)
        prof = Profile(name=name or out.stem, hardware=hardware, model=shape,
                       memory=memory_model(m, mem_gib), step_time=fit.step_time_model(),
                       load_time=fit.load_time, provenance=prov)
        prof.save(out)
        info = {"profile": prof, "new": cache.new, "reused": cache.reused,
                "seconds": time.perf_counter() - t0, "skipped": skipped}
        return prof, info
    finally:
        torch.set_num_threads(old_threads)


def _load_model(model: str, dev, dtype: str):
    """(model directory, LlamaModel on ``dev`` in ``dtype``) of a model name or path."""
    import torch   # lazy: torch is an optional dependency, off `import twin`'s path

    from twin.executor.model import LlamaModel   # lazy: needs torch
    from twin.executor.weights import resolve_model   # lazy: needs torch

    model_dir = resolve_model(model)
    return model_dir, LlamaModel.from_pretrained(model_dir, device=dev,
                                                 dtype=getattr(torch, dtype))


def _measure(m, model_dir: Path, cells: list, cache: MeasurementCache, adapters_dir: Path, *,
             repeats: int, policy: str, budget_s, t0: float, progress: bool, log) -> int:
    """Measure what ``cache`` lacks: the adapter loads, then every (repeat, cell) within the
    budget; returns how many runs the budget skipped."""
    max_model_len = min(m.shape.max_position_embeddings, 2048)
    ensure_adapters(model_dir, adapters_dir)
    cell_adapters = adapters_dir / "mixed" if policy == "slora" else adapters_dir
    # Repeats are interleaved: every cell once, then every cell again, ... so a slow
    # drift of the machine (other tenants come and go over seconds) spreads over all
    # cells instead of biasing the few measured while it lasted (back-to-back repeats
    # left cell-level sum errors of +-15% on a shared 2-core box).
    todo = [(r, c) for r in range(repeats) for c in cells if not cache.has(c.key, r)]
    need_loads = not cache.has("load-r8")
    log(f"{len(cells)} cells x {repeats} repeats, {len(cells) * repeats - len(todo)} runs "
        f"reused, {len(todo)} to measure" + (f", budget {budget_s:g} s" if budget_s else ""))
    with frozen_heap():   # as validation serves (gc_heap); one collection, not one a cell
        if todo:   # warm-up: the first forwards of a process are slow
            measure_cell(Cell(4, 32, 8, 2, 2, 16, 64), m, cell_adapters, max_model_len, -1,
                         policy)
        if need_loads:
            cache.add(measure_loads(m, adapters_dir, repeats))
        return measure_cells(todo, cache, m, cell_adapters, max_model_len, policy,
                             budget_s=budget_s, t0=t0, progress=progress)


def _hardware(dev, device_memory_gib: float | None, n_threads: int) -> tuple[float, dict]:
    """(device memory in GiB for the memory model, the profile's hardware record): the
    GPU's memory on CUDA, a budget on CPU (``DEFAULT_CPU_MEMORY_GIB`` unless given)."""
    if dev.type == "cuda":
        import torch   # lazy: torch is an optional dependency, off `import twin`'s path

        total = torch.cuda.mem_get_info(dev)[1] / 2 ** 30
        mem_gib = total if device_memory_gib is None else device_memory_gib
        hw_name = torch.cuda.get_device_name(dev)
    else:
        mem_gib = DEFAULT_CPU_MEMORY_GIB if device_memory_gib is None else device_memory_gib
        hw_name = f"CPU ({platform.processor() or platform.machine()}, {n_threads} thread(s))"
    return mem_gib, {"name": hw_name, "device": str(dev), "memory_gib": mem_gib,
                     "memory_note": ("GPU memory" if dev.type == "cuda" else
                                     "CPU 'device memory' budget: the KV cache gets "
                                     "util x budget - weights - LoRA slots - activations"),
                     "threads": n_threads, "cpu_count": os.cpu_count()}


def _fit_provenance(fit: ExecutorFit, cache: MeasurementCache, measured, loads, *,
                    cells_designed: int, skipped: int, budget_s, statistic: str) -> dict:
    """What was measured and how well the fit matches it, for the profile's provenance."""
    steps = fit.steps
    return {
        "cells": int(steps["key"].nunique()), "cells_designed": cells_designed,
        "runs_skipped_budget": skipped,
        "n_measurements": int(len(measured) + len(loads)),
        "n_step_measurements": int(len(measured)), "n_load_measurements": int(len(loads)),
        "n_distinct_steps": int(len(steps)),
        "measurements": str(cache.path), "measurements_reused": cache.reused,
        "measurements_new": cache.new, "budget_s": budget_s,
        "step_time_fit": f"NNLS (errors relative to the prediction, reweighted) on the "
                         f"{statistic} over repeats of each step's duration minus its load time",
        "step_time_statistic": statistic,
        "step_time_mean_over_median": float(steps["y_mean"].sum() / steps["y_median"].sum()),
        "step_time_residuals": fit.residuals,
        "step_time_repeat_spread_median": float(steps["spread"].median()),
        # measured / predicted over every step measurement (the profile's dispersion)
        "step_time_dispersion_log_sd": log_sd(fit.dispersion),
        "step_time_sum_error_per_cell": fit.sum_error_per_cell,
        "load_time_residuals": fit.load_residuals,
        # the batches it was fitted on: a run past them says so (twin.results.extrapolation)
        "step_time": {"extent": {"adapters": int(measured["adapters"].max()),
                                 "max_loras": int(measured["lora_slots"].max())}}}


def _anchor_provenance(df, model_dir: Path) -> dict:
    """The box's speed during the calibration (``twin.executor.speed_anchor``): the median
    of the anchor samples interleaved with the cells (start, middle, end of every session
    that measured), their spread, and the model they ran on. Empty for a measurements log
    of a version without anchors (``twin validate`` then prices the twin unscaled)."""
    a = df[df["kind"] == "anchor"]["anchor_s"].dropna() if "anchor_s" in df else []
    if not len(a):
        return {}
    return {**anchor_summary(a), "speed_anchor_model": str(model_dir)}


def memory_model(model, device_memory_gib: float) -> MemoryModel:
    """Measured memory model (see the module docstring)."""
    from twin.executor.lora import LoRASlots   # lazy: needs torch

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


def m_name(model: str, model_dir: Path) -> str:
    """The model's name in a profile: the shipped models' own, else the directory's."""
    return {"tiny": "tiny-llama", "smollm2": "SmolLM2-135M-Instruct"}.get(model, Path(model_dir).name)

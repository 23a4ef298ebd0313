"""Measuring for ``twin calibrate --executor``: serve the design's cells on the executor and
time adapter loads, appending every run to a measurements log on disk (resumable).

Each cell runs ``repeats`` times, interleaved (every cell once, then again): a slow drift
of the machine then spreads over all cells. Adapters of ranks 8..64 are read + packed
(disk → host) and copied into a slot (host → device) ``repeats`` times, each after a sweep
that evicts the CPU caches as a served step does. The executor (torch) is imported only
when something is measured.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from twin.calibrate.executor_design import Cell
from twin.costs.step_time import FEATURES

__all__ = ["LOAD_RANKS", "MeasurementCache", "ensure_adapters", "measure_anchor",
           "measure_cell", "measure_cells", "measure_loads"]

LOAD_RANKS = (8, 16, 32, 64)


class MeasurementCache:
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



def measure_cell(cell: Cell, model, adapters_dir: Path, max_model_len: int,
                  repeat: int, policy: str = "vllm") -> pd.DataFrame:
    """Serve a cell once; one row per step with the twin's features of it (as the executor
    logged them with its policy's featurizer), duration and load time (a Poisson cell:
    its after-idle steps only)."""
    from twin.executor.engine import execute   # lazy: the executor needs torch

    trace = cell.trace()
    cfg = cell.config(max_model_len, policy)
    catalog = adapters_dir if cell.adapters else None
    need = int(((trace["prompt_tokens"] + trace["output_tokens"] + 15) // 16).sum()) + 1
    blocks = max(need, -(-max_model_len // 16))
    if policy == "slora" and cell.adapters:   # the unified pool holds the adapters too
        from twin.executor.slora import adapter_pages_for   # lazy: the executor needs torch

        cat = pd.read_csv(adapters_dir / "catalog.csv").set_index("adapter")
        pages = dict(zip(cat.index, adapter_pages_for(model, cfg, cat["rank"].tolist())))
        # S-LoRA serves only if one max_model_len request fits beside the largest adapter
        blocks = max(blocks, -(-max_model_len // 16) + max(pages.values()))
        blocks += sum(pages[a] for a in trace["adapter"].dropna().unique())
    st = execute(trace, cfg, model, catalog, num_gpu_blocks=blocks).steps
    if int(st["preempted"].sum()):
        raise RuntimeError(f"calibration cell {cell.key} preempted (KV too small)")
    if cell.poisson:   # it measures the after-idle step of served traffic, nothing else:
        # its ~5k other steps moved the decode terms (ITL median 7.5 -> 11.8% in one window)
        st = st[st["after_idle"].to_numpy(bool)].reset_index(drop=True)
    rows = pd.DataFrame(np.array(st["features"].tolist(), float), columns=list(FEATURES))
    rows.insert(0, "kind", "step")
    rows.insert(1, "key", cell.key)
    rows["repeat"] = repeat
    rows["step"] = np.arange(len(st))
    rows["duration_s"] = st["duration_s"].to_numpy()
    rows["load_s"] = st["load_s"].to_numpy()
    rows["loads"] = st["loads"].to_numpy()
    return rows



def measure_loads(model, adapters_dir: Path, repeats: int) -> pd.DataFrame:
    """Disk → host (read + pack) and host → device (slot copy) per rank, medians."""
    import torch   # lazy: torch is an optional dependency, off `import twin`'s path

    from twin.executor.adapters import pack_adapter, read_adapter   # lazy: needs torch
    from twin.executor.lora import LoRASlots   # lazy: needs torch

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
                torch.cuda.synchronize()
            copy.append(time.perf_counter() - t)
        rows.append({"kind": "load", "key": f"load-r{r}", "rank": r,
                     "disk_s": statistics.median(disk[1:]), "copy_s": statistics.median(copy[1:]),
                     "repeats": repeats})
    return pd.DataFrame(rows)



def ensure_adapters(model_dir: Path, adapters_dir: Path) -> None:
    """Synthetic rank-8 adapters lora-0000.. for the cells, the same with ranks 8..64 mixed
    under ``mixed/`` (slora cells), and rank-R ones for loads."""
    from twin.executor.adapters import write_synthetic_adapters   # lazy: needs torch

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
            shutil.rmtree(target)
        (tmp / "lora-0000").rename(target)
        tmp.rmdir()
    done.write_text(mark)



def measure_anchor(model, repeat: int, position: str) -> pd.DataFrame:
    """One speed-anchor sample (``twin.executor.speed_anchor``) as a measurements row (kind
    ``anchor``): the box's speed while the cells around it were measured."""
    from twin.executor.speed_anchor import measure_speed_anchor   # lazy: needs torch

    a = measure_speed_anchor(model)
    return pd.DataFrame([{"kind": "anchor", "key": f"anchor-{position}", "repeat": repeat,
                          "anchor_s": a["anchor_s"], "anchor_rounds": a["rounds"],
                          "anchor_time": time.time()}])


def measure_cells(todo, cache: MeasurementCache, model, adapters_dir: Path,
                  max_model_len: int, policy: str, *, budget_s: float | None, t0: float,
                  progress: bool, anchor: bool = True) -> int:
    """Serve each (repeat, cell) of ``todo`` into ``cache`` until ``budget_s`` seconds since
    ``t0`` would be exceeded by one more run (the median run so far; at least one cell is
    measured); returns how many runs the budget skipped. With ``anchor``, a speed-anchor
    sample is taken before the first run, after the middle one and after the last."""
    marks = {len(todo) // 2: "middle", 0: "start"} if anchor and todo else {}
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm   # lazy: tqdm is optional, loaded only for a progress bar

        bar = tqdm(total=len(todo), unit="run", desc="calibrating")
    skipped = 0
    run_times = []
    for i, (r, c) in enumerate(todo):
        if i in marks:
            cache.add(measure_anchor(model, r, marks[i]))
        elapsed = time.perf_counter() - t0
        est = statistics.median(run_times) if run_times else 0.0
        have = len(cache.df) and bool((cache.df["kind"] == "step").any())
        if budget_s is not None and have and elapsed + est > budget_s:
            skipped += 1
            continue
        t = time.perf_counter()
        cache.add(measure_cell(c, model, adapters_dir, max_model_len, r, policy))
        run_times.append(time.perf_counter() - t)
        if bar is not None:
            bar.update(1)
    if marks:
        cache.add(measure_anchor(model, todo[-1][0], "end"))
    if bar is not None:
        bar.close()
    return skipped

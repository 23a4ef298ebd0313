"""Measure a :class:`twin.costs.gemm.GemmTable` on this machine: torch's ``F.linear`` (the
executor's matmul) at a grid of token counts m and weight shapes k x n, on the calibration's
threads and dtype.

The weights cycle through enough copies to exceed the last-level cache (``cache_bytes``), as a
model's layers do when the executor runs them one after another: a 1-token GEMM then reads
its weight from memory as in a real step, not from a cache the previous repeat warmed.
Each point is the median over ``passes`` sweeps of the whole grid (one timed batch of at
least ``min_s`` seconds per point and sweep, alternate sweeps in reverse order): a busy spell
of a shared machine then spreads over the grid as noise instead of biasing the block of
shapes measured during it (which would bias the GEMM sums of the models whose shapes fall
there). The default grid covers the linear layers of models up to ~8k wide; the vocabulary
GEMM and wider ones take the rate at the grid's edge (``GemmTable`` clamps).
"""

from __future__ import annotations

import math
import statistics
import time

from twin.costs.gemm import GemmTable

M_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
KN_GRID = (256, 512, 1024, 2048, 4096, 8192)


def measure_gemm_table(m=M_GRID, k=KN_GRID, n=KN_GRID, *, threads: int = 1,
                       dtype: str = "float32", device: str = "cpu", min_s: float = 0.01,
                       passes: int = 3, cache_bytes: float = 64 * 2 ** 20,
                       progress: bool = False) -> GemmTable:
    """Seconds of ``F.linear(x[m, k], W[n, k])`` at every grid point (``progress``: a bar
    over the passes' k x n weights)."""
    import torch  # lazy: torch stays off twin.calibrate's import path

    torch.set_num_threads(int(threads))
    dt = getattr(torch, dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    times = [[[[] for _ in n] for _ in k] for _ in m]
    pairs = [(a, b) for a in range(len(k)) for b in range(len(n))]
    bar = None
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm is optional, loaded only for a progress bar
        bar = tqdm(total=passes * len(pairs), unit="shape", desc="GEMM table")
    with torch.inference_mode():
        for p in range(passes):
            for a, b in (pairs if p % 2 == 0 else pairs[::-1]):
                for i, t in enumerate(_time_shape(torch, m, int(k[a]), int(n[b]), dt, device,
                                                  sync, min_s, cache_bytes)):
                    times[i][a][b].append(t)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    s = [[[statistics.median(v) for v in row] for row in plane] for plane in times]
    info = {"threads": int(threads), "dtype": dtype, "device": str(device),
            "torch": torch.__version__, "op": "torch.nn.functional.linear",
            "cache_bytes": cache_bytes, "passes": passes, "min_s": min_s}
    return GemmTable(m, k, n, s, info)


def _time_shape(torch, m, k: int, n: int, dt, device, sync, min_s: float,
                cache_bytes: float) -> list[float]:
    """Seconds per call of ``F.linear`` at each of ``m`` tokens for one ``k`` x ``n`` weight
    (cycled through enough copies to miss the cache)."""
    F = torch.nn.functional
    size = k * n * torch.finfo(dt).bits // 8
    copies = max(1, min(64, math.ceil(cache_bytes / size)))
    ws = [torch.full((n, k), 0.01, dtype=dt, device=device) for _ in range(copies)]
    x_all = torch.full((int(max(m)), k), 0.5, dtype=dt, device=device)
    out = []
    for mm in m:
        x = x_all[:int(mm)]
        F.linear(x, ws[0])                               # warm-up (allocator, code paths)
        sync()
        reps, t0 = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - t0 < min_s:
            F.linear(x, ws[reps % copies])
            reps += 1
        sync()
        out.append((time.perf_counter() - t0) / reps)
    return out

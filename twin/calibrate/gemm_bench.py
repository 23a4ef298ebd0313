"""Measure a :class:`twin.costs.gemm.GemmTable` on this machine: torch's ``F.linear`` (the
executor's matmul) at a grid of token counts m and weight shapes k x n, on the calibration's
threads and dtype.

The weights cycle through enough copies to exceed the last-level cache (``cache_bytes``), as a
model's layers do when the executor runs them one after another: a 1-token GEMM then reads
its weight from memory as in a real step, not from a cache the previous repeat warmed.
Each point is the median of ``batches`` timed batches of at least ``min_s`` seconds each (a
shared machine's interruptions fall out of the median). The default grid covers the linear
layers of models up to ~8k wide; the vocabulary GEMM and wider ones take the rate at the
grid's edge (``GemmTable`` clamps).
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
                       batches: int = 3, cache_bytes: float = 64 * 2 ** 20,
                       progress: bool = False) -> GemmTable:
    """Seconds of ``F.linear(x[m, k], W[n, k])`` at every grid point (``progress``: a bar
    over the k x n weights)."""
    import torch  # lazy: torch stays off twin.calibrate's import path
    import torch.nn.functional as F  # lazy: as torch

    torch.set_num_threads(int(threads))
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    s = [[[0.0] * len(n) for _ in k] for _ in m]
    pairs = [(a, b) for a in range(len(k)) for b in range(len(n))]
    bar = None
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm is optional, loaded only for a progress bar
        bar = tqdm(total=len(pairs), unit="shape", desc="GEMM table")
    with torch.inference_mode():
        for a, b in pairs:
            kk, nn = int(k[a]), int(n[b])
            size = kk * nn * torch.finfo(dt).bits // 8
            copies = max(1, min(64, math.ceil(cache_bytes / size)))
            ws = [torch.randn(nn, kk, generator=g).to(device=device, dtype=dt)
                  for _ in range(copies)]
            x_all = torch.randn(int(max(m)), kk, generator=g).to(device=device, dtype=dt)
            for i, mm in enumerate(m):
                x = x_all[:int(mm)]
                F.linear(x, ws[0])                       # warm-up (allocator, code paths)
                s[i][a][b] = _median_time(lambda j: F.linear(x, ws[j % copies]), sync, min_s,
                                          batches)
            del ws
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    info = {"threads": int(threads), "dtype": dtype, "device": str(device),
            "torch": torch.__version__, "op": "torch.nn.functional.linear",
            "cache_bytes": cache_bytes}
    return GemmTable(m, k, n, s, info)


def _median_time(call, sync, min_s: float, batches: int) -> float:
    """Median over ``batches`` of a batch's seconds per call (each batch runs ``call`` until
    ``min_s`` seconds have passed, at least twice; ``sync`` waits for a device)."""
    out = []
    for _ in range(batches):
        reps, t0 = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - t0 < min_s:
            call(reps)
            reps += 1
            sync()
        out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out)

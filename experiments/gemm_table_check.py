"""How well the GEMM table (``twin.costs.gemm``) carries one model's GEMM time to another's:
two tables measured back to back (their point-by-point spread: the bench's noise on this box)
and the exact GEMMs of SmolLM2-135M, SmolLM2-360M and Qwen2.5-0.5B (fp32, 1 thread), each
model's GEMM sum per step (its layers' qkv, o, gate_up, down and the lm_head) from the
interpolated table over the exact one, and that ratio relative to SmolLM2-135M's: the error
the table adds to a transfer calibrated on SmolLM2-135M (the multiplier absorbs the rest).

    flock /work/timing.lock python experiments/gemm_table_check.py     # ~5 min on one core

The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from twin.calibrate.gemm_bench import measure_gemm_table

MODELS = {   # layers, the layer GEMMs (k, n), the lm_head (k, vocab)
    "SmolLM2-135M": (30, [(576, 960), (576, 576), (576, 3072), (1536, 576)], (576, 49152)),
    "SmolLM2-360M": (32, [(960, 1600), (960, 960), (960, 5120), (2560, 960)], (960, 49152)),
    "Qwen2.5-0.5B": (24, [(896, 1152), (896, 896), (896, 9728), (4864, 896)], (896, 151936)),
}
M = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def exact_sum(layers: int, gemms, head) -> np.ndarray:
    t = measure_gemm_table(m=M, k=(head[0],), n=(head[1],)).s[:, 0, 0]
    for k, n in gemms:
        t = t + layers * measure_gemm_table(m=M, k=(k,), n=(n,)).s[:, 0, 0]
    return t


def main() -> int:
    tables = [measure_gemm_table()]
    exact = {name: exact_sum(*spec) for name, spec in MODELS.items()}
    tables.append(measure_gemm_table())
    r = np.log(tables[1].s / tables[0].s)
    res = {"table_log_ratio_sd": float(r.std()),
           "table_ratio_p90": float(np.exp(np.percentile(np.abs(r), 90)))}
    print(f"table 2 / table 1 per point: sd of log ratio {r.std():.3f}, p90 |ratio| "
          f"{res['table_ratio_p90']:.2f}")
    for ti, t in enumerate(tables, 1):
        ratio = {name: (sum(layers * t.seconds(M, k, n) for k, n in gemms) + t.seconds(M, *head))
                 / exact[name] for name, (layers, gemms, head) in MODELS.items()}
        for name, v in ratio.items():
            rel = v / ratio["SmolLM2-135M"]
            print(f"table {ti}: {name:13s} interpolated/exact {np.round(v, 2).tolist()}; over "
                  f"SmolLM2-135M's: median {np.median(rel):.2f} ({rel.min():.2f}-{rel.max():.2f})")
            res[f"table{ti}_{name}_relative_median"] = float(np.median(rel))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

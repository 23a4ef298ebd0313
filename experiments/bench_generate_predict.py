#!/usr/bin/env python
"""Speed of two hot paths that tests used to time (a wall-clock limit inside a test flakes
on a loaded 2-core machine, so the measurement lives here):

- **generate**: one hour of the paper's heaviest rate classes (32 adapters at
  1.6/0.8/0.4 req/s, ~110k requests) built by ``rate_class_trace`` from a length pool;
  the old test's limit was 1 s.
- **predict**: the shipped recommender predicting a batch of 14 candidate rows (one
  ``recommend`` call predicts a grid of this order per workload); the old test's limit
  was 50 ms per batch.

Timings are medians of --repeats runs.

    .venv/bin/python experiments/bench_generate_predict.py [--repeats 5]

The last line is one JSON object: generate_hour_s, generate_requests, predict_ms_per_batch,
predict_us_per_row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def _median_s(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=14, help="rows per predict call (14)")
    args = ap.parse_args(argv)

    from twin.ml.recommender import MODEL_FEATURES, Recommender
    from twin.workload.generate import rate_class_trace

    pool = np.column_stack([np.arange(1, 1001), np.arange(1000, 0, -1)])
    n_req = len(rate_class_trace(32, (1.6, 0.8, 0.4), duration_s=3600, lengths=pool, seed=0))
    gen_s = _median_s(lambda: rate_class_trace(32, (1.6, 0.8, 0.4), duration_s=3600,
                                               lengths=pool, seed=0), args.repeats)
    print(f"generate: {n_req} requests (one hour, 32 adapters) in {gen_s:.3f} s "
          f"(median of {args.repeats})")

    import pandas as pd

    model = Recommender.load()
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.uniform(0.0, 10.0, size=(args.batch, len(MODEL_FEATURES))),
                     columns=list(MODEL_FEATURES))
    model.predict_rows(X)  # warm-up
    loops = 20
    pred_s = _median_s(lambda: [model.predict_rows(X) for _ in range(loops)],
                       args.repeats) / loops
    print(f"predict: {1e3 * pred_s:.2f} ms per batch of {args.batch} rows "
          f"({1e6 * pred_s / args.batch:.0f} us per row), shipped model")
    print(json.dumps({"generate_hour_s": round(gen_s, 4), "generate_requests": n_req,
                      "predict_ms_per_batch": round(1e3 * pred_s, 3),
                      "predict_us_per_row": round(1e6 * pred_s / args.batch, 1),
                      "batch_rows": args.batch, "repeats": args.repeats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

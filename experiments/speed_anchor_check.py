"""Does the speed anchor track the box? The anchor (``twin.executor.speed_anchor``) against
a served calibration cell, interleaved, in one process.

``--pairs`` times: an anchor sample, then one cell served by the executor (a burst of
decodes with adapters, the kind of run calibration measures; its summed step time), then
the next anchor sample. Each cell's time is predicted two ways from the others' (leave one
out): flat (the median cell time) and anchored (the median cell time x the anchor around
this cell / the median anchor), as ``twin validate`` prices the twin. If the anchor tracks
the box, the anchored prediction's error is smaller. Run it un-niced under the timing lock:

    flock /work/timing.lock .venv/bin/python experiments/speed_anchor_check.py

Last line: one JSON object (pearson_r, flat_error_median_pct, anchored_error_median_pct,
cell_cv_pct, anchor_cv_pct, pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args(argv)
    import torch

    from twin.calibrate.executor_design import Cell
    from twin.executor.engine import execute
    from twin.executor.model import LlamaModel
    from twin.executor.speed_anchor import measure_speed_anchor
    from twin.executor.weights import resolve_model

    torch.set_num_threads(1)
    m = LlamaModel.from_pretrained(resolve_model(args.model))
    cell = Cell(8, 64, 32, 0, 1, 8, 256)   # 8 requests, 64-token prompts, 32 outputs
    trace = cell.trace()
    cfg = cell.config(512)

    def serve() -> float:
        st = execute(trace, cfg, m, None, num_gpu_blocks=64).steps
        return float(st["duration_s"].sum())

    serve()   # warm-up
    anchors, cells = [measure_speed_anchor(m)["anchor_s"]], []
    t0 = time.perf_counter()
    for _ in range(args.pairs):
        cells.append(serve())
        anchors.append(measure_speed_anchor(m)["anchor_s"])
    a = np.asarray(anchors)
    around = (a[:-1] + a[1:]) / 2   # the two samples around each cell, as validate takes them
    c = np.asarray(cells)
    flat, anch = [], []
    for i in range(len(c)):
        rest = np.delete(np.arange(len(c)), i)
        med_c, med_a = np.median(c[rest]), np.median(around[rest])
        flat.append(abs(med_c - c[i]) / c[i])
        anch.append(abs(med_c * around[i] / med_a - c[i]) / c[i])
    r = float(np.corrcoef(around, c)[0, 1])
    print(f"{len(c)} pairs in {time.perf_counter() - t0:.0f} s; cell {1e3 * np.median(c):.1f} ms "
          f"(CV {100 * c.std() / c.mean():.1f}%), anchor {1e3 * np.median(a):.2f} ms (CV "
          f"{100 * a.std() / a.mean():.1f}%); Pearson r {r:.2f}; leave-one-out error of a "
          f"cell's time: flat {100 * np.median(flat):.1f}%, anchored {100 * np.median(anch):.1f}%")
    print(json.dumps({"pearson_r": round(r, 3),
                      "flat_error_median_pct": round(100 * float(np.median(flat)), 2),
                      "anchored_error_median_pct": round(100 * float(np.median(anch)), 2),
                      "flat_error_p90_pct": round(100 * float(np.quantile(flat, 0.9)), 2),
                      "anchored_error_p90_pct": round(100 * float(np.quantile(anch, 0.9)), 2),
                      "cell_cv_pct": round(100 * float(c.std() / c.mean()), 2),
                      "anchor_cv_pct": round(100 * float(a.std() / a.mean()), 2),
                      "cell_ms": [round(1e3 * x, 2) for x in c],
                      "anchor_ms": [round(1e3 * x, 3) for x in a], "pairs": len(c)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

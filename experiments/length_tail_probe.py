"""Probe: the H100 runs replayed with a length pool of the real pool's spread (issue 15,
README_validate "the client's ceiling": the output-length tail). Not the twin's default.

The reconstructed runs rescale the whole-conversation ShareGPT file to each run's pool means
(``twin.calibrate.reconstruct.length_pool``), which squeezes its spread. This probe keeps the
file's ranks but stretches its log-lengths by a power so that P25 / P75 over the mean match
the paper's log of the first-two-turn pool (Llama-2 tokenizer: prompt 23 / 423 at mean
250.9, output 27 / 359 at mean 231.5), then sets the run's means; it patches
``_pool_cached`` in this process (forked workers inherit it) and runs
``reproduce_vllm_h100.py`` for a given profile, or with ``--calibrate`` (``refit``: the
same protocol as ``twin calibrate``; the fitted profile is kept in the output folder).

    python experiments/length_tail_probe.py llama31-8b-h100-64gb runs/tail_shipped
    python experiments/length_tail_probe.py refit runs/tail_refit

The last line printed is ``reproduce_vllm_h100.py``'s JSON.
"""
import functools
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import twin.calibrate.reconstruct as rc
from twin.workload.public import sharegpt_length_pool

# Llama-2 tokenizer stats of the paper's ShareGPT pool: prompt mean 250.9, P25 23, P75 423;
# output mean 231.5, P25 27, P75 359. Quartile ratios kept, means set per run.
Q = {0: (23 / 250.9, 423 / 250.9), 1: (27 / 231.5, 359 / 231.5)}

def transform(x, mean, q25, q75, lo, hi):
    lx = np.log(x)
    b = math.log(q75 / q25) / (np.percentile(lx, 75) - np.percentile(lx, 25))
    y = np.exp(b * (lx - np.median(lx)))
    a = mean / y.mean()
    for _ in range(60):
        a *= mean / np.clip(np.round(a * y), lo, hi).mean()
    return np.clip(np.round(a * y), lo, hi)

@functools.lru_cache(maxsize=None)
def pool_cached(path, mean_in, mean_out):
    raw = sharegpt_length_pool(path).astype(float)   # vLLM's benchmark filter, unscaled
    p, o = raw[:, 0], raw[:, 1]
    P = transform(p, mean_in, mean_in * Q[0][0], mean_in * Q[0][1], 4, 1024)
    O = transform(o, mean_out, mean_out * Q[1][0], mean_out * Q[1][1], 4, 2044)
    O = np.maximum(np.minimum(O, 2048 - P), 4)
    pool = np.stack([P, O], 1).astype(np.int64); pool.setflags(write=False)
    return pool
rc._pool_cached = pool_cached

mode, out = sys.argv[1], sys.argv[2]
import reproduce_vllm_h100 as rep  # noqa: E402  (after the patch: its workers fork with it)
rep.main(["--calibrate", "--out", out] if mode == "refit" else ["--profile", mode, "--out", out])

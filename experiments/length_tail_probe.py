"""Probe: the H100 runs replayed with a length pool of the real pool's spread (issue 15,
README_validate "the client's ceiling": the output-length tail). Not the twin's default.

The reconstructed runs rescale the whole-conversation ShareGPT file to each run's pool means
(``twin.calibrate.reconstruct.length_pool``), which squeezes its spread. This probe keeps the
file's ranks but stretches its log-lengths by a power so that P25 / P75 over the mean match
the paper's log of the first-two-turn pool (Llama-2 tokenizer: prompt 23 / 423 at mean
250.9, output 27 / 359 at mean 231.5), then sets the run's means; it patches
``_pool_cached`` in this process (forked workers inherit it) and runs
``reproduce_vllm_h100.py``, after a refit with the same protocol as ``twin calibrate``
(``refit``) or for a given profile.

    python experiments/length_tail_probe.py llama31-8b-h100-64gb runs/tail_shipped
    python experiments/length_tail_probe.py refit runs/tail_refit    # + runs/tail_refit.json

The last line printed is ``reproduce_vllm_h100.py``'s JSON.
"""
import functools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import twin.calibrate.reconstruct as rc
from twin.workload.public import shared_data_dir

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
    raw = pd.read_csv(path)
    p = raw.num_prefill_tokens.to_numpy(float); o = raw.num_decode_tokens.to_numpy(float)
    keep = (p >= 4) & (p <= 1024) & (o >= 4) & (p + o <= 2048); p, o = p[keep], o[keep]
    P = transform(p, mean_in, mean_in * Q[0][0], mean_in * Q[0][1], 4, 1024)
    O = transform(o, mean_out, mean_out * Q[1][0], mean_out * Q[1][1], 4, 2044)
    O = np.maximum(np.minimum(O, 2048 - P), 4)
    pool = np.stack([P, O], 1).astype(np.int64); pool.setflags(write=False)
    return pool
rc._pool_cached = pool_cached

mode, out = sys.argv[1], sys.argv[2]
import reproduce_vllm_h100 as rep
if mode == "refit":
    from twin.calibrate.vllm import calibrate, read_kv_capacity, read_load_times
    from twin.calibrate.vllm_runs import read_run_table
    data = shared_data_dir() / "vllm-h100"
    runs = [r for r in read_run_table(data / "real_runs_llama31_8b.csv") if r.extra.get("experiment_set") == "digital_twin_modelling"]
    prof = calibrate(runs, kv=read_kv_capacity(data / "kv_cache_tokens_llama31_8b.csv"),
                     loads=read_load_times(data / "adapter_load_times_llama31_8b.csv"),
                     processes=2, window_s=1200.0, iterations=4,
                     sources={"runs": "shared/data/vllm-h100/real_runs_llama31_8b.csv", "experiment_sets": ["digital_twin_modelling"]})
    prof.save(out + ".json")
    rep.main(["--profile", out + ".json", "--out", out])
else:
    rep.main(["--profile", mode, "--out", out])

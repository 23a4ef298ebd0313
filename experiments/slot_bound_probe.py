"""Probe: what sets the batch of a real H100 run that starves at few adapter slots?

At ``max_loras`` 16 the runs that starve hold far fewer running requests than the twin does,
the more so the more adapters are served (held out, rates 3.2/1.6/0.025: real 774 -> 385
running from 32 to 384 served, the twin 780 -> 668), and the twin's ITL follows its batch
(+21% median over those 36 runs; README_validate, "the runs that starve at 16 slots"). This
replays one such run with the shipped profile under variants that each change one input of
the admission dynamics, and prints the twin's mean running requests, KV use, preemptions,
throughput and ITL against the real run's:

    python experiments/slot_bound_probe.py                    # fit run 16 / 384, rates 1.6/0.8/0.4
    python experiments/slot_bound_probe.py --set ml_modelling_test --rates 3.2-1.6-0.025_
    python experiments/slot_bound_probe.py --variants base step=0.9 cap=15000 budget=1024 hol

Variants: ``base``; ``step=F`` every step-time coefficient times F; ``cap=N`` the client's
ceiling of requests in flight; ``budget=N`` ``max_num_batched_tokens``; ``hol`` vLLM V1's
waiting loop as it was before March 2025 (it stopped at the first request whose adapter
would exceed ``max_loras`` instead of passing over it). Deterministic (seed 0). Last line:
one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from twin.calibrate.reconstruct import reconstruct  # noqa: E402
from twin.calibrate.vllm_runs import read_run_table  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402
from twin.costs.step_time import StepTimeModel  # noqa: E402
from twin.sched import scheduler as sched_mod  # noqa: E402
from twin.sim import simulate  # noqa: E402
from twin.workload.public import shared_data_dir  # noqa: E402

REAL_EXTRA = ("num_running_mean", "num_running_max", "kv_usage_mean_frac", "preemptions_total",
              "median_itl_ms", "num_waiting_mean")
REAL_METRICS = ("total_throughput", "mean_itl_ms")


def find_run(exp_set: str, max_loras: int, served: int, rates: str, rank: int):
    runs = read_run_table(shared_data_dir() / "vllm-h100" / "real_runs_llama31_8b.csv")
    hits = [r for r in runs if r.extra.get("experiment_set") == exp_set
            and r.config.max_loras == max_loras and r.config.max_cpu_loras == served
            and r.config.max_lora_rank == rank and rates in r.key]
    if not hits:
        raise SystemExit(f"no {exp_set} run with max_loras {max_loras}, {served} served, "
                         f"rank {rank} and {rates!r} in its key")
    return hits[0]


def _admit_head_of_line(self, plan, budget, now):
    """The waiting loop before vLLM's skip fix: a request whose adapter would exceed a full
    ``max_loras`` set stops the loop (nothing behind it is admitted)."""
    waiting, in_use = self.waiting, self.cache.in_use
    if self.enable_lora and waiting.n and len(in_use) >= self.max_loras:
        r = waiting.first()
        if r.adapter >= 0 and r.adapter not in in_use:
            if self.group.n + len(self.prefilling) >= self.max_num_seqs:
                return sched_mod.SEQS
            return sched_mod.BUDGET if budget <= 0 else sched_mod.LORA
    return _ADMIT(self, plan, budget, now)


_ADMIT = sched_mod.Scheduler.admit


def run_variant(spec, trace, catalog, variant: str, window_s: float) -> dict:
    """One variant's replay of ``spec``'s workload (``trace``, ``catalog``: rebuilt once)."""
    prof = load_profile("llama31-8b-h100-64gb")
    cap = prof.provenance["client"]["max_in_flight"]
    config = spec.config
    name, _, value = variant.partition("=")
    if name == "step":
        prof.step_time = StepTimeModel(base={k: v * float(value)
                                             for k, v in prof.step_time.base.items()})
    elif name == "cap":
        cap = int(value)
    elif name == "budget":
        config = dataclasses.replace(config, max_num_batched_tokens=int(value))
    elif name not in ("base", "hol"):
        raise SystemExit(f"unknown variant {variant!r}")
    sched_mod.Scheduler.admit = _admit_head_of_line if name == "hol" else _ADMIT
    t0 = time.perf_counter()
    try:
        res = simulate(trace, config, prof, catalog, window_s=window_s, max_in_flight=cap)
    finally:
        sched_mod.Scheduler.admit = _ADMIT
    s, tl = res.summary, res.timeline
    return {"variant": variant, "running_mean": round(float(tl["running"].mean()), 1),
            "running_max": int(tl["running"].max()),
            "kv_usage_mean": round(s["kv_cache"]["usage_mean"], 3),
            "preemptions": s["preemptions"], "throughput": round(s["total_throughput"], 1),
            "itl_ms_mean": round(s["itl_ms"]["mean"], 1),
            "itl_ms_median": round(s["itl_ms"]["median"], 1),
            "adapter_loads_per_s": round((s["adapter_loads"]["from_disk"]
                                          + s["adapter_loads"]["from_host"]) / window_s, 3),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="digital_twin_modelling")
    p.add_argument("--max-loras", type=int, default=16)
    p.add_argument("--served", type=int, default=384)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rates", default="rates_1.6_0.8_0.4",
                   help="a part of the run's key that names its rate set")
    p.add_argument("--window", type=float, default=3600.0)
    p.add_argument("--variants", nargs="+",
                   default=["base", "step=0.9", "step=1.1", "cap=15000", "budget=1024", "hol"])
    a = p.parse_args()
    spec = find_run(a.set, a.max_loras, a.served, a.rates, a.rank)
    real = {**{k: spec.extra.get(k) for k in REAL_EXTRA},
            **{k: spec.metrics.get(k) for k in REAL_METRICS}}
    print(f"{spec.key}\nreal: {real}")
    trace, catalog = reconstruct(spec, seed=0, window_s=a.window)
    rows = []
    for v in a.variants:
        rows.append(run_variant(spec, trace, catalog, v, a.window))
        print(rows[-1], flush=True)
    print(json.dumps({"run": spec.key, "window_s": a.window, "real": real, "twin": rows}))


if __name__ == "__main__":
    main()

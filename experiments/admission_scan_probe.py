"""Probe: is vLLM's O(waiting) admission scan what the twin misses in overloaded runs with
many adapters behind few slots? (issue 15, README_validate "the client's ceiling").

vLLM's waiting loop visits, every step, each waiting request ahead of the point where it
stops, and skips (one Python iteration each) those whose adapter is outside a full
``scheduled_loras`` set. The twin's queue (``twin.sched.waiting_queue``) finds the next
admissible request without visiting the others, so no step pays for them. This probe
counts the skips exactly (a Fenwick tree over the queue's first-come-first-served keys:
the skipped requests are the waiting ones ahead of the last request considered) and adds
``c`` seconds per skip to each step (``jump=False``: every step is scheduled and priced on
its own), then compares a real run's throughput, ITL, TTFT and mean running batch. It
patches the scheduler in this process only; nothing in the package changes.

    python experiments/admission_scan_probe.py --c-us 0 1 \\
        --run rate_3.2-1.6-0.025_size_16-16-16:16:384

The last line printed is one JSON object: a row per (run, c).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

from twin.calibrate.reconstruct import reconstruct
from twin.calibrate.vllm_runs import read_run_table
from twin.costs.profile import load_profile
from twin.costs.step_time import StepTimeModel
from twin.sched import scheduler as scheduler_mod
from twin.sched.step_plan import BUDGET, KV, LORA, SEQS
from twin.sched.waiting_queue import WaitingQueue
from twin.sim.engine import simulate
from twin.workload.public import shared_data_dir

FRONT = 1 << 20   # preempted requests get negative keys: shift every key by this


class Fenwick:
    """Counts of waiting requests by key, and how many have a key below a bound."""

    def __init__(self, n: int):
        self.n, self.t = n, [0] * (n + 1)

    def add(self, key: int, v: int) -> None:
        i = key + FRONT + 1
        while i <= self.n:
            self.t[i] += v
            i += i & -i

    def below(self, key: int) -> int:
        i, s = key + FRONT, 0
        while i > 0:
            s += self.t[i]
            i -= i & -i
        return s


STATE = {"tree": None, "skipped": 0}


def _patch() -> None:
    append, prepend, pop = WaitingQueue.append, WaitingQueue.prepend, WaitingQueue.pop

    def counted(method, v):
        def run(self, r):
            method(self, r)
            STATE["tree"].add(r.key, v)
        return run
    WaitingQueue.append, WaitingQueue.prepend = counted(append, 1), counted(prepend, 1)
    WaitingQueue.pop = counted(pop, -1)
    admit = scheduler_mod.Scheduler.admit

    def admit_counting(self, plan, budget, now):
        why = admit(self, plan, budget, now)
        skipped = 0
        if self.enable_lora and len(self.cache.in_use) >= self.max_loras:
            if why == LORA:        # nothing admissible left: every waiting request skipped
                skipped = self.waiting.n
            elif why == KV:        # stopped at the next admissible one
                r = self.waiting.first_among(self.cache.in_use)
                skipped = STATE["tree"].below(r.key) if r is not None else self.waiting.n
            elif why in (BUDGET, SEQS) and plan.admitted:   # stopped after the last admitted
                skipped = STATE["tree"].below(plan.admitted[-1].key)
        STATE["skipped"] = skipped
        return why
    scheduler_mod.Scheduler.admit = admit_counting


class ScanPriced(StepTimeModel):
    """The profile's step time plus ``c`` seconds per request the step's scan skipped."""

    c = 0.0

    def __call__(self, f):
        return super().__call__(f) + self.c * STATE["skipped"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--c-us", type=float, nargs="+", default=[0.0, 1.0],
                    help="microseconds per skipped waiting request")
    ap.add_argument("--run", nargs="+", required=True, metavar="WORKLOAD:SLOTS:SERVED",
                    help="ml_modelling_test runs by workload folder, max_loras, max_cpu_loras")
    ap.add_argument("--profile", default="llama31-8b-h100-64gb")
    args = ap.parse_args(argv)
    _patch()
    base = load_profile(args.profile)
    cap = (base.provenance.get("client") or {}).get("max_in_flight")
    table = shared_data_dir() / "vllm-h100" / "real_runs_llama31_8b.csv"
    runs = [r for r in read_run_table(table) if r.extra.get("experiment_set") == "ml_modelling_test"]
    rows = []
    for spec in args.run:
        wd, ml, cl = spec.split(":")
        run = next(r for r in runs if r.extra.get("workload_dir") == wd
                   and r.config.max_loras == int(ml) and r.config.max_cpu_loras == int(cl))
        window = float(math.floor(run.duration_s))
        trace, catalog = reconstruct(run, seed=0, window_s=window)
        for c in args.c_us:
            st = ScanPriced(base=base.step_time.base)
            st.c = c * 1e-6
            prof = dataclasses.replace(base, step_time=st)
            STATE["tree"] = Fenwick(FRONT + len(trace) + 1)
            t0 = time.perf_counter()
            res = simulate(trace, run.config, prof, catalog, window_s=window,
                           max_in_flight=cap, jump=False)
            s, m = res.summary, run.metrics
            rows.append({"run": spec, "c_us": c,
                         "throughput_signed": round(100 * (s["total_throughput"] / m["total_throughput"] - 1), 2),
                         "itl_signed": round(100 * (s["itl_ms"]["mean"] / m["mean_itl_ms"] - 1), 2),
                         "ttft_signed": round(100 * (s["ttft_ms"]["mean"] / m["mean_ttft_ms"] - 1), 2),
                         "running_real": m.get("num_running_mean"),
                         "running_twin": round(float(res.timeline["running"].mean()), 1),
                         "kv_real": m.get("kv_usage_mean"), "kv_twin": round(s["kv_cache"]["usage_mean"], 3),
                         "preemptions_twin": s["preemptions"],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

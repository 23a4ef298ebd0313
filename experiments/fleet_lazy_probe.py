"""Lagging replicas (``twin.fleet.lazy``) vs the heap-driven exact loop, affinity router.

The scale workload of ``experiments/fleet.py`` (64 tenants x the Azure hour, 64 replicas,
max_loras 4), cut to its first ``--minutes``: the adapter-affinity fleet with an exact
view, run alternately by the lazy loop and by the exact heap loop (``twin.fleet.loop._run``)
in one process. Prints per run the CPU seconds and a digest of the requests table and
routes (they must agree), and for the lazy loop how many replica advances it made and why
(which decision needed them). Last line: one JSON object.

    python experiments/fleet_lazy_probe.py [--minutes 2] [--rounds 2] [--horizon-s 0.5]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet as F   # noqa: E402  (experiments/fleet.py: the traces and configs)

from twin.fleet import lazy, loop, simulate_fleet   # noqa: E402
from twin.sim.fed import FedClock   # noqa: E402


def digest(run) -> str:
    req = run.result.requests
    h = hashlib.sha1(pd.util.hash_pandas_object(req, index=False).values.tobytes())
    return h.hexdigest()[:16]


def instrument(horizon_s: float) -> dict:
    """Count the lazy loop's advances per arrival by the decision that asked for them."""
    stats = {"arrivals": collections.Counter(), "advances": 0, "_now": set()}
    refine, next_arrival, run_lazy = (lazy.Lagging.refine, lazy.Lagging.next_arrival,
                                      lazy.run_lazy)

    def counted_refine(self, k, j, a):
        if self.at[k] != j and j >= 0:
            stats["advances"] += 1
            stats["_now"].add(sys._getframe(1).f_code.co_name)
        return refine(self, k, j, a)

    def counted_next(self, j, a):
        stats["arrivals"]["+".join(sorted(stats["_now"])) or "none"] += 1
        stats["_now"].clear()
        return next_arrival(self, j, a)

    lazy.Lagging.refine, lazy.Lagging.next_arrival = counted_refine, counted_next
    resume, within = FedClock.resume, lazy._within_slack
    stats["resumes"] = stats["holders"] = 0

    def counted_resume(self):
        stats["resumes"] += 1
        return resume(self)

    def counted_within(best, *a):   # the replicas holding the adapter on their GPU
        stats["holders"] += len(best)
        return within(best, *a)

    FedClock.resume, lazy._within_slack = counted_resume, counted_within
    lazy.run_lazy = lambda *a: run_lazy(*a, horizon_s=horizon_s)
    return stats


def run_fleet(trace, lazy_loop: bool):
    loop.LAZY = lazy_loop
    c0 = time.process_time()
    run = simulate_fleet(trace, 64, "adapter_affinity", config=F.SCALE_CONFIG,
                         profile=F.PROFILE)
    return run, round(time.process_time() - c0, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--horizon-s", type=float, default=0.5)
    args = ap.parse_args()
    trace = F.scale_trace()
    trace = trace[trace["arrival_s"] < 60 * args.minutes].reset_index(drop=True)
    run_lazy = lazy.run_lazy
    lazy.run_lazy = lambda *a: run_lazy(*a, horizon_s=args.horizon_s)
    cpu = {"lazy": [], "heap": []}
    digests = set()
    for _ in range(args.rounds):   # timed, not instrumented
        for name in ("lazy", "heap"):
            run, s = run_fleet(trace, name == "lazy")
            cpu[name].append(s)
            digests.add((digest(run), tuple(run.result.requests["replica"])).__hash__())
            print(name, s, digest(run), flush=True)
    lazy.run_lazy = run_lazy
    stats = instrument(args.horizon_s)   # then once more, counting
    run, _ = run_fleet(trace, True)
    digests.add((digest(run), tuple(run.result.requests["replica"])).__hash__())
    n = len(trace)
    print(json.dumps({"requests": n, "horizon_s": args.horizon_s, "cpu_s": cpu,
                      "identical": len(digests) == 1, "advances_per_arrival":
                      round(stats["advances"] / n, 3), "engine_resumes_per_arrival":
                      round(stats["resumes"] / n, 3), "gpu_holders_per_arrival":
                      round(stats["holders"] / n, 2), "arrivals_by_advance_cause":
                      {k: round(v / n, 3) for k, v in sorted(stats["arrivals"].items())}}))


if __name__ == "__main__":
    main()

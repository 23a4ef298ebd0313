"""Recommendation with prefix caching (issue 17, item 6): one workload where the best
``max_loras`` differs with caching on and off, on the H100 profile.

The workload comes from the session generator (``twin trace sessions``,
:func:`twin.workload.sessions.session_trace`): many adapters, each with its own long
system prompt, multi-turn chat sessions re-sending the conversation. Every ``max_loras`` of
the recommender's slot grid (``max_cpu_loras`` = adapters, ``max_lora_rank`` = the
adapters' rank: :class:`twin.ml.spec.ConfigGrid`) is simulated by the twin twice, with
``enable_prefix_caching`` on and off, through the verifier ``twin recommend`` uses
(:class:`twin.ml.verify.Verifier`). The best point of each is picked by recommend's own rule
(:func:`twin.ml.recommend.best_verified`: the highest throughput among runs that keep up, runs
within its tie tolerance to the lowest p99 TTFT).

Why they can differ: every GPU slot takes KV memory (at rank 64 on the H100 profile, 64
slots leave 125 k KV tokens, 16 slots 262 k). With caching off the KV cache holds only the
running requests and more slots mean fewer adapter swaps; with caching on it also holds the
adapters' system prompts and the conversations between turns, so KV capacity turns into
prefix hits (prefill not done) and fewer slots can win.

    python experiments/prefix_recommend.py                # the documented workload
    python experiments/prefix_recommend.py --duration-s 300 --slots 16,32,64   # quicker

The H100 profile was calibrated on real vLLM runs with caching off: its caching-on runs
rest on the executor validation (experiments/README_prefix.md). Last line: one JSON object
(best_max_loras_on, best_max_loras_off, differs, table, workload, wall_s).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from twin.costs.profile import load_profile  # noqa: E402
from twin.ml.recommend import best_verified  # noqa: E402
from twin.ml.spec import ConfigGrid, paper_base  # noqa: E402
from twin.ml.sweep import EarlyExit  # noqa: E402
from twin.ml.verify import Verifier  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402
from twin.workload.prefix_stats import prefix_share  # noqa: E402
from twin.workload.sessions import session_trace  # noqa: E402

_KEEP = ("throughput", "achieved", "ttft_p99", "tpot_p50", "preemptions",
         "prefix_cache_hit_rate")


def grid_runs(trace, catalog, profile, window_s, on: bool, slots, workers: int,
              max_model_len: int) -> dict:
    """{max_loras: the verifier's figures} over the slot grid, caching ``on`` or off."""
    base = paper_base().replace(enable_prefix_caching=on, max_model_len=max_model_len)
    grid = ConfigGrid(base=base, slots=slots)
    configs = grid.configs(len(catalog), int(catalog.table["rank"].max()))
    ver = Verifier(trace, catalog, profile, window_s, None, EarlyExit(), workers)
    try:
        out = dict(ver.run(list(enumerate(configs))))
    finally:
        ver.close()
    return {configs[i].max_loras: r for i, r in out.items()}


def best_max_loras(runs: dict) -> int | None:
    """recommend's pick among the runs that start and keep up (None if none does)."""
    good = [m for m, r in runs.items() if r["starts"] and not r["starving"]]
    return best_verified(runs, good, "throughput") if good else None


def _row(r: dict) -> dict:
    if not r["starts"]:
        return {"starts": False}
    return {"starving": r["starving"], "starving_reason": r.get("starving_reason"), **{k: round(float(r[k]), 4) for k in _KEEP if k in r}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="llama31-8b-h100-64gb")
    ap.add_argument("--n-adapters", type=int, default=64)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--sessions-per-adapter", type=float, default=3)
    ap.add_argument("--turns-mean", type=float, default=4.0)
    ap.add_argument("--think-s", type=float, default=30.0)
    ap.add_argument("--system-tokens", type=int, default=2048)
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--slots", default="8,16,32,48,64")
    ap.add_argument("--max-model-len", type=int, default=8192,
                    help="vLLM's max_model_len (default 8192, the session generator's cap; "
                    "the paper's 131072 would not start with many rank-64 slots)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    profile = load_profile(a.profile)
    trace = session_trace(a.n_adapters, a.sessions_per_adapter, turns_mean=a.turns_mean,
                          think_s=a.think_s, duration_s=a.duration_s,
                          system_tokens=a.system_tokens, max_model_len=a.max_model_len,
                          seed=a.seed)
    names = sorted(trace["adapter"].dropna().unique().tolist())
    catalog = AdapterCatalog.uniform(names, a.rank)
    slots = tuple(int(s) for s in a.slots.split(","))
    runs = {on: grid_runs(trace, catalog, profile, a.duration_s, on, slots, a.workers,
                          a.max_model_len) for on in (True, False)}
    best = {on: best_max_loras(r) for on, r in runs.items()}
    table = {str(m): {"on": _row(runs[True][m]), "off": _row(runs[False][m])}
             for m in sorted(runs[True])}
    print(f"{'max_loras':>9}  {'on tok/s':>9} {'hit %':>6} {'TTFT99':>7}  "
          f"{'off tok/s':>9} {'TTFT99':>7}")
    for m, row in table.items():
        on, off = row["on"], row["off"]
        print(f"{m:>9}  {on.get('throughput', 0):9.0f} "
              f"{100 * on.get('prefix_cache_hit_rate', 0):6.1f} {on.get('ttft_p99', 0):7.0f}"
              f"{'*' if on.get('starving') else ' '} {off.get('throughput', 0):9.0f} "
              f"{off.get('ttft_p99', 0):7.0f}{'*' if off.get('starving') else ' '}")
    print("(* starving)")
    workload = {k: getattr(a, k) for k in ("profile", "n_adapters", "rank",
                                           "sessions_per_adapter", "turns_mean", "think_s",
                                           "system_tokens", "duration_s", "max_model_len", "seed")}
    workload.update(requests=len(trace), prefix_share=round(prefix_share(trace), 4),
                    req_per_s=round(len(trace) / a.duration_s, 3))
    print(json.dumps({"best_max_loras_on": best[True], "best_max_loras_off": best[False],
                      "differs": best[True] != best[False], "table": table,
                      "workload": workload, "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

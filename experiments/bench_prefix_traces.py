"""Speed of the prefix-caching trace tools (issue 17, item 1): the multi-turn generator on a
1-hour trace of about 10k requests (target < 1 s), the shared-prefix fraction on it, and
the Mooncake conversation hour loaded with its block ids, with its shared-prefix fraction.

Generator case: 32 adapters x 80 chat sessions, ShareGPT-like uniform turn lengths
U[8, 512), 16-token blocks (about 1.5 M block ids). Times are CPU seconds of this process
(``time.process_time``), the median of ``--repeats`` runs, so that other processes on a
shared machine weigh less than on a wall clock.

    python experiments/bench_prefix_traces.py [--repeats 3]

The last line is one JSON object: sessions_requests, sessions_hash_ids,
sessions_generate_cpu_s, sessions_prefix_share_cpu_s, sessions_prefix_share,
mooncake_requests, mooncake_load_cpu_s, mooncake_prefix_share_cpu_s,
mooncake_prefix_share (whole trace on one adapter, i.e. the trace's own sharing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twin.errors import TwinInputError  # noqa: E402
from twin.workload import public  # noqa: E402
from twin.workload.prefix_stats import prefix_share  # noqa: E402
from twin.workload.sessions import session_trace  # noqa: E402


def _timed(fn, repeats: int):
    """(result of the last run, median CPU seconds)."""
    times, out = [], None
    for _ in range(repeats):
        t = time.process_time()
        out = fn()
        times.append(time.process_time() - t)
    return out, statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per timing (median)")
    args = ap.parse_args(argv)
    res = {}
    df, res["sessions_generate_cpu_s"] = _timed(
        lambda: session_trace(32, 80, duration_s=3600, seed=0), args.repeats)
    res["sessions_requests"] = len(df)
    res["sessions_hash_ids"] = int(df["hash_ids"].map(len).sum())
    res["sessions_prefix_share"], res["sessions_prefix_share_cpu_s"] = _timed(
        lambda: prefix_share(df), args.repeats)
    try:
        path = public.shared_trace_path(public.MOONCAKE_FILES["conversation"])
    except TwinInputError as exc:
        print(f"Mooncake skipped: {exc}", file=sys.stderr)
    else:
        mc, res["mooncake_load_cpu_s"] = _timed(
            lambda: public.load_mooncake(path, hash_ids=True), args.repeats)
        res["mooncake_requests"] = len(mc)
        res["mooncake_prefix_share"], res["mooncake_prefix_share_cpu_s"] = _timed(
            lambda: prefix_share(mc), args.repeats)
    for k, v in res.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Before/after check for changes to the fleet's event loop, routers and result assembly:
the fleet's per-request outputs, routes, summaries and per-replica results on small runs of
``experiments/fleet.py``'s traces must not change.

    python experiments/fleet_same.py --save DIR      # on the code before the change
    python experiments/fleet_same.py --compare DIR   # after: exits 1 on any difference

Cases: the scale trace (8 tenants, 5 simulated minutes, max_loras 4) under adapter
affinity (exact view and refreshed every 1 s), least outstanding requests, and the static
table in the one event loop and in a pool of 2; the skewed trace (128 adapters, power law,
first 5 minutes, 6 replicas, max_loras 8, a 240-s window) under every router. The last line
is one JSON object: ``{"cases": N, "different": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet as F   # noqa: E402  (experiments/fleet.py: the traces and configs)

from twin.fleet import simulate_fleet   # noqa: E402
from twin.fleet.routers import ROUTERS, StaticTable   # noqa: E402


def cases():
    scale = F.scale_trace(8)
    scale = scale[scale["arrival_s"] <= 300].reset_index(drop=True)
    kw = dict(config=F.SCALE_CONFIG, profile=F.PROFILE)
    yield "scale_affinity", lambda: simulate_fleet(scale, 8, "adapter_affinity", **kw)
    yield "scale_affinity_1s", lambda: simulate_fleet(scale, 8, "adapter_affinity",
                                                      refresh_s=1.0, **kw)
    yield "scale_lor", lambda: simulate_fleet(scale, 8, "least_outstanding_requests", **kw)
    table = StaticTable(F.one_to_one(8))
    yield "scale_static_loop", lambda: simulate_fleet(scale, 8, table, one_loop=True, **kw)
    yield "scale_static_pool", lambda: simulate_fleet(scale, 8, table, workers=2, **kw)
    skew = F.skewed_trace()
    skew = skew[skew["arrival_s"] <= 300].reset_index(drop=True)
    skw = dict(config=F.SKEW_CONFIG, profile=F.PROFILE, window_s=240.0)
    for name in ROUTERS:
        router = StaticTable(F.lpt_table(skew, 6)) if name == "static" else name
        yield f"skew_{name}", lambda r=router: simulate_fleet(skew, 6, r, **skw)
    yield "skew_affinity_0.5s", lambda: simulate_fleet(skew, 6, "adapter_affinity",
                                                       refresh_s=0.5, **skw)


def snapshot(run) -> dict:
    s = json.loads(json.dumps(run.summary, default=float))
    s["fleet"].pop("wall_s")
    return {"requests": run.result.requests, "timeline": run.result.timeline, "summary": s,
            "route": run.route.tolist(),
            "replicas": [None if r is None else (r.requests, r.timeline, r.summary)
                         for r in run.replicas]}


def same(a: dict, b: dict) -> bool:
    try:
        for key in ("requests", "timeline"):
            pd.testing.assert_frame_equal(a[key], b[key], check_exact=True)
        assert a["route"] == b["route"]
        assert json.dumps(a["summary"], sort_keys=True) == json.dumps(b["summary"],
                                                                      sort_keys=True)
        for x, y in zip(a["replicas"], b["replicas"], strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                pd.testing.assert_frame_equal(x[0], y[0], check_exact=True)
                pd.testing.assert_frame_equal(x[1], y[1], check_exact=True)
                assert json.dumps(x[2], sort_keys=True) == json.dumps(y[2], sort_keys=True)
    except AssertionError as e:
        print(str(e)[:500])
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", type=Path, help="write the snapshots here")
    g.add_argument("--compare", type=Path, help="compare with the snapshots saved here")
    args = p.parse_args()
    different, n = [], 0
    for name, run in cases():
        snap = snapshot(run())
        n += 1
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            (args.save / f"{name}.pkl").write_bytes(pickle.dumps(snap))
            print(name, "saved", flush=True)
        else:
            ok = same(pickle.loads((args.compare / f"{name}.pkl").read_bytes()), snap)
            print(name, "same" if ok else "DIFFERENT", flush=True)
            if not ok:
                different.append(name)
    print(json.dumps({"cases": n, "different": different}))
    if different:
        sys.exit(1)


if __name__ == "__main__":
    main()

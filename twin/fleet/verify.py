"""A placement checked under traffic (``twin place --verify-fleet``).

``twin place`` verifies each GPU on its own share of the trace, cut out ahead of time. Here
the placement runs as one fleet (:func:`twin.fleet.simulate_fleet`): a static-table router
with the placement's ``routing.csv``, each replica its GPU's verified serving config, the
whole trace, each GPU preloading (``preload_adapters``) only the adapters it serves, as
its ``vllm serve --lora-modules`` does. The check says whether any GPU starves (the starvation rule of every twin run,
per replica and for the fleet).

Then, for each router that does not know the placement (round robin, least outstanding
requests, consistent hashing, adapter affinity), :func:`gpus_needed` searches the fewest
identical replicas that keep up: from the placement's GPU count down while the fleet keeps
up, or up until it does, at most ``max_gpus``; each count is one fleet run. Those replicas
get :func:`fleet_config`, the placement's largest per-GPU config (any adapter may reach
any replica). The search assumes more replicas never starve more (it stops at the first
count that starves going down, or keeps up going up).
"""

from __future__ import annotations

import sys

from twin.config import ServingConfig
from twin.fleet.fleet import Replica, simulate_fleet
from twin.fleet.routers import make_router

ROUTERS_TO_SIZE = ("round_robin", "least_outstanding_requests", "consistent_hash",
                   "adapter_affinity")


def placement_configs(placement, base: ServingConfig) -> list[ServingConfig]:
    """Each GPU's serving config in a ``twin.ml`` placement: its verified one, else ``base``
    (a GPU serving only base-model traffic, or one that no configuration verified)."""
    out = []
    for g in placement.gpus:
        r = g.recommendation
        out.append(r.config if r is not None and r.ok and r.config is not None else base)
    return out


def fleet_config(configs: list[ServingConfig]) -> ServingConfig:
    """One config for replicas any adapter may reach: the one with the most GPU LoRA slots,
    with the largest host cache and LoRA rank among ``configs``."""
    top = max(configs, key=lambda c: c.max_loras)
    return top.replace(max_cpu_loras=max(max(c.max_cpu_loras for c in configs),
                                         top.max_loras),
                       max_lora_rank=max(c.max_lora_rank for c in configs))


def keeps_up(run) -> bool:
    """No replica starves and neither does the fleet as a whole."""
    return not run.summary["starving"] and run.summary["fleet"]["starving_replicas"] == 0


def check_placement(trace, configs, routing, *, profile, catalog=None, window_s=None,
                    refresh_s: float = 0.0, workers: int = 1) -> dict:
    """The placement (``configs[k]`` on GPU ``k``, ``routing``: ``routing.csv``) as a
    static-routed fleet on ``trace``: does any GPU starve, and each GPU's figures."""
    served = [tuple(routing.loc[routing["gpu"] == k, "adapter"].astype(str)) for k in
              range(len(configs))]   # each GPU's --lora-modules: what it preloads
    run = simulate_fleet(trace, [Replica(c, adapters=a) for c, a in zip(configs, served)],
                         make_router("static", table=routing), profile=profile,
                         catalog=catalog, window_s=window_s, refresh_s=refresh_s,
                         workers=workers)
    per = run.summary["fleet"]["per_replica"]
    return {"gpus": len(configs), "keeps_up": keeps_up(run),
            "starving_gpus": [p["replica"] for p in per if p["starving"]],
            "per_gpu": [{k: p[k] for k in ("replica", "requests", "total_throughput",
                                           "ttft_p99_ms", "loads_from_disk", "starving")}
                        for p in per]}


def gpus_needed(trace, router: str, config: ServingConfig, *, start: int, max_gpus: int,
                profile, catalog=None, window_s=None, refresh_s: float = 0.0,
                workers: int = 1, progress: bool = False) -> dict:
    """The fewest replicas of ``config`` behind ``router`` that keep up on ``trace``: from
    ``start`` down while they keep up, else up until they do (at most ``max_gpus``; None
    when even ``max_gpus`` starve). ``runs``: every count tried, one fleet run each."""
    tried: dict[int, dict] = {}

    def ok(n: int) -> bool:
        if n not in tried:
            run = simulate_fleet(trace, n, router, config=config, profile=profile,
                                 catalog=catalog, window_s=window_s, refresh_s=refresh_s,
                                 workers=workers)
            tried[n] = {"gpus": n, "keeps_up": keeps_up(run),
                        "starving_replicas": run.summary["fleet"]["starving_replicas"],
                        "ttft_p99_ms": run.summary["ttft_ms"]["p99"]}
            if progress:
                print(f"  fleet check: {router} on {n} GPU(s): "
                      f"{'keeps up' if tried[n]['keeps_up'] else 'STARVING'}", file=sys.stderr)
        return tried[n]["keeps_up"]

    n = min(max(int(start), 1), int(max_gpus))
    needed = None
    if ok(n):
        while n > 1 and ok(n - 1):
            n -= 1
        needed = n
    else:
        while n < max_gpus:
            n += 1
            if ok(n):
                needed = n
                break
    return {"router": router, "gpus": needed, "runs": [tried[k] for k in sorted(tried)]}


def verify_fleet(trace, configs, routing, *, profile, catalog=None, window_s=None,
                 routers=ROUTERS_TO_SIZE, max_gpus: int | None = None,
                 refresh_s: float = 0.0, workers: int = 1, progress: bool = False) -> dict:
    """``fleet_check``: the placement as a static-routed fleet (:func:`check_placement`),
    then the GPU count each of ``routers`` needs (:func:`gpus_needed`, from the placement's
    count, at most ``max_gpus``: default twice the placement's count, at least 4)."""
    k = len(configs)
    cap = max_gpus if max_gpus is not None else max(2 * k, 4)
    kw = dict(profile=profile, catalog=catalog, window_s=window_s, refresh_s=refresh_s,
              workers=workers)
    check = {"placement": check_placement(trace, configs, routing, **kw),
             "router_refresh_s": refresh_s, "max_gpus": cap, "routers": []}
    shared = fleet_config(configs)
    check["fleet_config"] = shared.to_dict()
    for name in routers:
        check["routers"].append(gpus_needed(trace, name, shared, start=k, max_gpus=cap,
                                            progress=progress, **kw))
    return check


def format_fleet_check(check: dict) -> str:
    """The fleet check as lines for ``twin place``'s report."""
    p = check["placement"]
    verdict = ("every GPU keeps up" if p["keeps_up"] else
               f"STARVING (GPU(s) {', '.join(map(str, p['starving_gpus'])) or 'fleet-wide'})")
    lines = [f"fleet check: the placement on {p['gpus']} GPU(s), static routing: {verdict}",
             f"  {'gpu':>4} {'requests':>9} {'tok/s':>9} {'TTFT p99':>9} {'disk':>6}  verdict"]
    for g in p["per_gpu"]:
        lines.append(f"  {g['replica']:>4} {g['requests']:>9} {g['total_throughput']:>9.0f} "
                     f"{g['ttft_p99_ms']:>9.0f} {g['loads_from_disk']:>6}  "
                     f"{'STARVING' if g['starving'] else 'ok'}")
    c = check["fleet_config"]
    lines.append(f"GPUs each router needs (identical replicas, max_loras={c['max_loras']} "
                 f"max_cpu_loras={c['max_cpu_loras']}; searched up to {check['max_gpus']}):")
    for r in check["routers"]:
        need = r["gpus"] if r["gpus"] is not None else f"> {check['max_gpus']}"
        tried = ", ".join(f"{t['gpus']}:{'ok' if t['keeps_up'] else 'starves'}"
                          for t in r["runs"])
        lines.append(f"  {r['router']:<28} {need!s:>5}   (tried {tried})")
    return "\n".join(lines)

"""A placement checked under traffic (``twin place --verify-fleet``).

``twin place`` verifies each GPU on its own share of the trace, cut out ahead of time. Here
the placement runs as one fleet (:func:`twin.fleet.simulate_fleet`): a static-table router
with the placement's ``routing.csv``, each replica its GPU's verified serving config, the
whole trace, each GPU preloading (``preload_adapters``) only the adapters it serves, as
its ``vllm serve --lora-modules`` does. The check says whether any GPU starves (the starvation rule of every twin run,
per replica and for the fleet).

With latency SLOs (``slo``: p99 TTFT/TPOT in ms) the check also scores them on the whole
fleet's requests, the p99 an operator measures at the fleet's front door (:func:`slo_check`),
and names every GPU whose own requests' p99 misses them: ``twin place`` and ``twin
recommend --objective cost`` verify each GPU alone on its share of the trace cut out ahead
of time, the fleet run on the share the router actually sends it.

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

import numpy as np

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


#: the SLO keys and the p99 each bounds (a run summary's, ms)
SLO_P99 = {"ttft": "ttft_ms", "tpot": "tpot_ms"}


def slo_misses(p99: dict, slo: dict | None) -> list[str]:
    """The SLOs of ``slo`` ({'ttft': ms, 'tpot': ms}) that the p99s ``p99`` ({'ttft': ms,
    'tpot': ms}) miss; a p99 that is not a number (no finished request) misses."""
    out = []
    for k, limit in (slo or {}).items():
        v = p99.get(k)
        if limit and not (v is not None and np.isfinite(v) and v <= float(limit)):
            out.append(k)
    return out


def slo_check(summary: dict, slo: dict) -> dict:
    """``slo`` on a fleet run: the p99s over all its requests (``met``: none missed) and
    the GPUs whose own p99s miss it (``gpus_missing``: [{'gpu', 'missed', 'ttft_p99',
    'tpot_p99'}]; a GPU may miss while the fleet meets it: its requests are ~1/k of the
    fleet's)."""
    fleet = {k: float(summary[m]["p99"]) for k, m in SLO_P99.items()}
    missing = []
    for p in summary["fleet"]["per_replica"]:
        own = {"ttft": p["ttft_p99_ms"], "tpot": p["tpot_p99_ms"]}
        miss = slo_misses(own, slo) if p["requests"] else []
        if miss:
            missing.append({"gpu": p["replica"], "missed": miss, "ttft_p99": own["ttft"],
                            "tpot_p99": own["tpot"]})
    return {"slo": dict(slo), "ttft_p99": fleet["ttft"], "tpot_p99": fleet["tpot"],
            "missed": slo_misses(fleet, slo), "met": not slo_misses(fleet, slo),
            "gpus_missing": missing}


def check_placement(trace, configs, routing, *, profile, catalog=None, window_s=None,
                    refresh_s: float = 0.0, workers: int = 1, slo: dict | None = None) -> dict:
    """The placement (``configs[k]`` on GPU ``k``, ``routing``: ``routing.csv``) as a
    static-routed fleet on ``trace``: does any GPU starve, each GPU's figures and, with
    ``slo``, the SLO verdict on the fleet's requests and each GPU's (``slo_check``)."""
    served = [tuple(routing.loc[routing["gpu"] == k, "adapter"].astype(str)) for k in
              range(len(configs))]   # each GPU's --lora-modules: what it preloads
    run = simulate_fleet(trace, [Replica(c, adapters=a) for c, a in zip(configs, served)],
                         make_router("static", table=routing), profile=profile,
                         catalog=catalog, window_s=window_s, refresh_s=refresh_s,
                         workers=workers)
    per = run.summary["fleet"]["per_replica"]
    out = {"gpus": len(configs), "keeps_up": keeps_up(run),
           "starving_gpus": [p["replica"] for p in per if p["starving"]],
           "per_gpu": [{k: p[k] for k in ("replica", "requests", "total_throughput",
                                          "ttft_p99_ms", "tpot_p99_ms", "loads_from_disk",
                                          "starving", "held_by")} for p in per]}
    if slo:
        out["slo_check"] = slo_check(run.summary, slo)
    return out


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
                 refresh_s: float = 0.0, workers: int = 1, progress: bool = False,
                 slo: dict | None = None) -> dict:
    """``fleet_check``: the placement as a static-routed fleet (:func:`check_placement`,
    with ``slo`` scored on the fleet's requests),
    then the GPU count each of ``routers`` needs (:func:`gpus_needed`, from the placement's
    count, at most ``max_gpus``: default twice the placement's count, at least 4)."""
    k = len(configs)
    cap = max_gpus if max_gpus is not None else max(2 * k, 4)
    kw = dict(profile=profile, catalog=catalog, window_s=window_s, refresh_s=refresh_s,
              workers=workers)
    check = {"placement": check_placement(trace, configs, routing, slo=slo, **kw),
             "router_refresh_s": refresh_s, "max_gpus": cap, "routers": []}
    shared = fleet_config(configs)
    check["fleet_config"] = shared.to_dict()
    for name in routers:
        check["routers"].append(gpus_needed(trace, name, shared, start=k, max_gpus=cap,
                                            progress=progress, **kw))
    return check


def format_placement_check(p: dict) -> list[str]:
    """:func:`check_placement`'s verdicts and per-GPU table as report lines."""
    verdict = ("every GPU keeps up" if p["keeps_up"] else
               f"STARVING (GPU(s) {', '.join(map(str, p['starving_gpus'])) or 'fleet-wide'})")
    sc = p.get("slo_check")
    miss = {g["gpu"]: g["missed"] for g in sc["gpus_missing"]} if sc else {}
    lines = [f"fleet check: the placement on {p['gpus']} GPU(s), static routing: {verdict}"]
    if sc:
        slo = ", ".join(f"p99 {k.upper()} <= {v:g} ms" for k, v in sc["slo"].items() if v)
        lines.append(f"  SLOs ({slo}) on the fleet's requests: p99 TTFT {sc['ttft_p99']:.0f} "
                     f"ms, p99 TPOT {sc['tpot_p99']:.1f} ms: "
                     + ("met" if sc["met"] else "MISSED (" + ", ".join(
                         k.upper() for k in sc["missed"]) + ")"))
        if miss:
            lines.append("  GPU(s) whose own requests miss them: " + "; ".join(
                f"gpu {g['gpu']} ({', '.join(k.upper() for k in g['missed'])}: p99 TTFT "
                f"{g['ttft_p99']:.0f} ms, TPOT {g['tpot_p99']:.1f} ms)"
                for g in sc["gpus_missing"]))
    lines.append(f"  {'gpu':>4} {'requests':>9} {'tok/s':>9} {'TTFT p99':>9} {'TPOT p99':>9} "
                 f"{'disk':>6}  verdict")
    for g in p["per_gpu"]:
        if g["starving"]:
            v = "STARVING" + (f" (queue held by {g['held_by']})" if g["held_by"] else "")
        elif g["replica"] in miss:
            v = "misses " + ",".join(k.upper() for k in miss[g["replica"]])
        else:
            v = "ok"
        lines.append(f"  {g['replica']:>4} {g['requests']:>9} {g['total_throughput']:>9.0f} "
                     f"{g['ttft_p99_ms']:>9.0f} {g['tpot_p99_ms']:>9.1f} "
                     f"{g['loads_from_disk']:>6}  {v}")
    return lines


def format_fleet_check(check: dict) -> str:
    """The fleet check as lines for ``twin place``'s report."""
    lines = format_placement_check(check["placement"])
    c = check["fleet_config"]
    lines.append(f"GPUs each router needs (identical replicas, max_loras={c['max_loras']} "
                 f"max_cpu_loras={c['max_cpu_loras']}; searched up to {check['max_gpus']}):")
    for r in check["routers"]:
        need = r["gpus"] if r["gpus"] is not None else f"> {check['max_gpus']}"
        tried = ", ".join(f"{t['gpus']}:{'ok' if t['keeps_up'] else 'starves'}"
                          for t in r["runs"])
        lines.append(f"  {r['router']:<28} {need!s:>5}   (tried {tried})")
    return "\n".join(lines)

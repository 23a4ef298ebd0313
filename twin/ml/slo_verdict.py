"""The goodput objective's verdict on the SLOs: did a verified run meet them, and if not,
the best achievable p99s, what bounds each (a knob, starvation, the load on one GPU) and
which SLOs no configuration on any number of these GPUs reaches (:func:`slo_verdict`),
with its report lines (:func:`verdict_lines`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.ml.slo_stop import SloStop, might_beat

_SLO_P99 = {"ttft": "ttft_p99", "tpot": "tpot_p99"}
_UNIT = {"ttft_p99": ("p99 TTFT", "ms", 0), "tpot_p99": ("p99 TPOT", "ms", 1)}


def slo_violation(run: dict, slo: dict | None) -> float:
    """The worst ratio of a twin run's p99 to its SLO (<= 1: every SLO met; inf: no p99)."""
    worst = 0.0
    for k, m in _SLO_P99.items():
        if slo and slo.get(k):
            v = run.get(m)
            v = float("inf") if v is None or not np.isfinite(v) else float(v)
            worst = max(worst, v / float(slo[k]))
    return worst


def _knobs(cfg, knobs) -> dict:
    return {k: getattr(cfg, k) for k in knobs}


def slo_verdict(cand: pd.DataFrame, results: dict, slo: dict, met: list, knobs,
                tpot_floor_ms: float | None = None) -> dict:
    """Did any verified configuration meet the SLOs (p99s of its own twin run)? If none
    did: the best achievable p99 of each SLO among runs that keep up (with their
    configurations), and for each SLO missed what bounds it: the knob whose one-step
    changes moved that p99 the most in the runs made, and whether any run reached the SLO
    only by starving (the knob bounds it) or none did (the load on this GPU bounds it).
    ``tpot_floor_ms`` (:func:`twin.ml.queueing.tpot_floor_ms`): a TPOT SLO under it is
    out of reach of any configuration on any number of these GPUs (``out_of_reach``)."""
    full = {i: r for i, r in results.items() if r["starts"] and r.get("full")}
    up = {i: r for i, r in full.items() if not r["starving"]}
    out = {"met": bool(met), "slo": dict(slo), "meeting": len(met), "runs": len(results),
           "keeping_up": len(up), "best": {}, "bounds": {}, "out_of_reach": {},
           "stopped_early": sum(bool(r.get("slo_violated_early")) for r in results.values()),
           "stopped_might_beat": {m: len(might_beat(results, m)) for m in _SLO_P99.values()}}
    if met:
        return out
    if tpot_floor_ms is not None and slo.get("tpot") and slo["tpot"] < tpot_floor_ms:
        out["out_of_reach"]["tpot_p99"] = {"floor": float(tpot_floor_ms),
                                           "slo": float(slo["tpot"])}
    for k, m in _SLO_P99.items():
        if not slo.get(k) or not up:
            continue
        i = min(up, key=lambda i: (_nan(up[i].get(m)), i))
        out["best"][m] = {"value": float(up[i][m]), "slo": float(slo[k]),
                          **_knobs(cand.at[i, "_config"], knobs)}
        if up[i][m] <= slo[k]:
            continue
        effect = {}
        for kn in knobs:   # pairs of runs that differ in this knob only
            groups: dict = {}
            for j, r in full.items():
                key = tuple(v for n, v in _knobs(cand.at[j, "_config"], knobs).items()
                            if n != kn)
                groups.setdefault(key, []).append(_nan(r.get(m)))
            spans = [max(g) / max(min(g), 1e-9) for g in groups.values()
                     if len(g) > 1 and np.isfinite(max(g))]
            if spans:
                effect[kn] = max(spans)
        lowest = min(full, key=lambda j: (_nan(full[j].get(m)), j))
        reach = full[lowest].get(m) is not None and full[lowest][m] <= slo[k]
        knob = max(effect, key=lambda kn: (effect[kn], kn)) if effect else None
        out["bounds"][m] = {
            "knob": knob, "knob_effect": effect.get(knob),
            "bound_by": "starvation" if reach else "load",
            "reached_only_starving": _knobs(cand.at[lowest, "_config"], knobs) if reach
            else None}
    return out


def _nan(x) -> float:
    return float("inf") if x is None or not np.isfinite(x) else float(x)


def verdict_lines(v: dict, objective_gpus: str = "one GPU") -> list[str]:
    """The report's lines for :func:`slo_verdict`."""
    slo = ", ".join(f"{_UNIT[_SLO_P99[k]][0]} <= {x:g} ms" for k, x in v["slo"].items() if x)
    if v["met"]:
        return [f"SLOs met ({slo}) in the recommended configuration's own twin run "
                f"({v['meeting']} of {v['runs']} runs meet them)"]
    stopped = v.get("stopped_early", 0)
    L = [f"NO verified configuration meets the SLOs ({slo}) on {objective_gpus}: "
         f"{v['runs']} twin runs, {v['keeping_up']} keep up, none within the SLOs"
         + (f"; {stopped} stopped once proven to miss them by {SloStop.FACTOR:g}x or "
            "more (no p99s" + ("; the best achievable p99s below are full runs')"
                               if v["best"] else ")") if stopped else "")]
    for m, f in v.get("out_of_reach", {}).items():
        name, unit, nd = _UNIT[m]
        L.append(f"  {name} <= {f['slo']:g} {unit} is out of reach on this GPU model: one "
                 f"request decoding alone takes {f['floor']:.{nd}f} {unit} a token, so no "
                 "configuration and no number of these GPUs meets it; relax it, or price a "
                 "faster GPU (`twin profile`)")
    if not v["keeping_up"]:   # more GPUs help the load, not an SLO out of reach
        L.append(f"  no configuration tried keeps up with this load on {objective_gpus}: a "
                 "starving run's p99s grow with its window, so none is achievable here"
                 + ("" if v.get("out_of_reach") else "; spread the adapters over more GPUs "
                    "(`twin place --slo`, or --objective cost)"))
    for m, b in v["best"].items():
        name, unit, nd = _UNIT[m]
        cfg = " ".join(f"{k}={x}" for k, x in b.items() if k not in ("value", "slo"))
        n = v.get("stopped_might_beat", {}).get(m, 0)
        L.append(f"  best achievable {name}: {b['value']:.{nd}f} {unit} (SLO {b['slo']:g}) "
                 f"at {cfg}" + (f" ({n} stopped run(s) not run in full might reach lower)"
                                if n else ""))
        bd = v["bounds"].get(m)
        if bd is None:
            continue
        moved = (f"{bd['knob']} moved it most (x{bd['knob_effect']:.2f} between runs)"
                 if bd["knob"] else "no two full runs differ in one knob alone")
        if bd["bound_by"] == "starvation":
            cfg = " ".join(f"{k}={x}" for k, x in bd["reached_only_starving"].items())
            L.append(f"    bounded by {bd['knob'] or 'the knobs'}: only a configuration that "
                     f"cannot keep up reaches it ({cfg}); {moved}")
        elif m not in v.get("out_of_reach", {}):
            L.append(f"    bounded by the load on {objective_gpus}: no knob tried reaches it; "
                     f"{moved}; spread the adapters over more GPUs (`twin place`)")
    return L

"""The ``--slo`` flag (:func:`parse_slo`) and, for ``twin recommend --objective cost``, the
cost plan (:func:`twin.ml.cost.cost_plan`), then
its placement run as one fleet on the whole trace with the SLOs scored on the fleet's
requests (:func:`twin.fleet.verify.check_placement`): the plan verifies each GPU alone on
its share of the trace, cut out ahead of time; the fleet run routes the trace through
``routing.csv`` as a deployment would, and names every GPU whose own p99s miss. Kept out of
``twin.cli.ml`` so that each stays one screenful."""

from __future__ import annotations

import re

from twin.errors import TwinInputError


def parse_slo(text: str | None) -> dict | None:
    """``ttft=2000,tpot=100`` (ms; a value ending in ``s`` is seconds) -> {'ttft': ms, ...}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        k = k.strip().lower()
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", v)
        if not sep or k not in ("ttft", "tpot") or not m or not float(m.group(1)) > 0:
            raise TwinInputError(f"expected ttft=MS,tpot=MS with values > 0, got {text!r}",
                                 field="--slo")
        if k in out:   # the last would win without a word
            raise TwinInputError(f"{k} is given twice in {text!r}; give each SLO once",
                                 field="--slo")
        out[k] = float(m.group(1)) * (1000.0 if m.group(2) == "s" else 1.0)
    return out


def cost_with_fleet_check(args, trace, catalog, profile, model, base, window, slo: dict,
                          rec, kw: dict):
    """The cost plan for ``args`` (``rec``: the one-GPU goodput recommendation already
    made) with ``plan.fleet_check`` set: the placement's static-routed fleet run with
    ``slo`` (None when no GPU count met the SLOs, or with ``--no-fleet-check``)."""
    from twin.ml.cost import cost_plan  # lazy: ML stack off twin --help

    plan = cost_plan(trace, catalog, slo=slo, profile=profile, model=model, base=base,
                     window_s=window, max_gpus=args.max_gpus, max_runs=args.max_runs,
                     workers=args.workers, gpu_price=args.gpu_price, one_gpu=rec, **kw)
    if plan.ok and not args.no_fleet_check:
        from twin.fleet.verify import check_placement, placement_configs  # lazy: simulator

        plan.fleet_check = check_placement(
            trace, placement_configs(plan.placement, base), plan.placement.routing,
            profile=profile, catalog=catalog, window_s=window, workers=args.workers, slo=slo)
    return plan


def fleet_ok(check: dict | None) -> bool:
    """A placement check (:func:`twin.fleet.verify.check_placement`) that keeps up and,
    when it scored SLOs, meets them on the fleet's requests (True when there is none)."""
    if check is None:
        return True
    sc = check.get("slo_check")
    return bool(check["keeps_up"] and (sc is None or sc["met"]))


def fleet_check_text(check: dict) -> str:
    """A placement check as report lines (:func:`twin.fleet.verify.format_placement_check`)."""
    from twin.fleet.verify import format_placement_check  # lazy: simulator off twin --help

    return "\n".join(format_placement_check(check))

"""``twin place --verify-fleet``: its flags and the fleet check after the placement
(``twin.fleet.verify``), kept out of ``twin.cli.ml`` so each stays one screenful."""

from __future__ import annotations

from twin.argtypes import comma_list, non_negative_float, positive_int
from twin.errors import TwinInputError

# the routers --verify-fleet sizes (twin.fleet.verify.ROUTERS_TO_SIZE; named here so that
# `twin --help` does not load the simulator)
FLEET_ROUTERS = ("round_robin", "least_outstanding_requests", "consistent_hash",
                 "adapter_affinity")


def add_verify_fleet_args(p) -> None:
    p.add_argument("--verify-fleet", action="store_true",
                   help="run the placement as a fleet on the trace (does any GPU starve?) "
                        "and find the GPUs each of --fleet-routers needs (see above)")
    p.add_argument("--fleet-routers", default=FLEET_ROUTERS,
                   type=comma_list(str, name="routers"),
                   help="routers to size with --verify-fleet, comma-separated (default "
                        f"{','.join(FLEET_ROUTERS)})")
    p.add_argument("--fleet-max-gpus", type=positive_int, default=None,
                   help="most GPUs tried per router (default: twice the placement's, at "
                        "least 4)")
    p.add_argument("--router-refresh-s", type=non_negative_float, default=0.0,
                   help="seconds between refreshes of a state-reading router's view of the "
                        "replicas (0: exact at each arrival; as twin fleet)")


def check_fleet_routers(args) -> None:
    """Unknown router names fail before the placement's twin runs, not after (and with or
    without --verify-fleet: a typo is never silently ignored)."""
    bad = [r for r in args.fleet_routers if r not in FLEET_ROUTERS]
    if bad:
        raise TwinInputError(f"--fleet-routers: unknown router(s) {bad}; expected some of "
                             f"{', '.join(FLEET_ROUTERS)} (the placement itself is run "
                             "with the static table)", field="--fleet-routers")


def verify_placement_fleet(args, placement, trace, catalog, profile, base,
                           window, slo: dict | None = None) -> dict | None:
    """With --verify-fleet: ``fleet_check`` for ``placement`` (printed; with ``slo``, the
    SLOs scored on the fleet's requests and each GPU's), else None."""
    if not args.verify_fleet:
        return None
    from twin.fleet.verify import (format_fleet_check, placement_configs,  # lazy: simulator
                                   verify_fleet)                          # off twin --help

    check = verify_fleet(trace, placement_configs(placement, base), placement.routing,
                         profile=profile, catalog=catalog, window_s=window,
                         routers=args.fleet_routers, max_gpus=args.fleet_max_gpus,
                         refresh_s=args.router_refresh_s, workers=args.workers,
                         progress=True, slo=slo)
    print(format_fleet_check(check))
    return check

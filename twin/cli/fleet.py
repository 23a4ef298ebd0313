"""``twin fleet``: a trace through a router onto N replicas, each a whole twin server."""

from __future__ import annotations

import argparse
from pathlib import Path

from twin.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from twin.cli.config_flags import add_config_flags, config_from_args, given_config_flags
from twin.errors import TwinInputError
from twin.outputs import console, input_paths, json_document, prepare
from twin import api

# twin.fleet.routers.ROUTERS by name (a test keeps them equal): building the parser loads no
# fleet module (twin.fleet imports the ML backends)
ROUTER_NAMES = ("round_robin", "least_outstanding_requests", "static", "consistent_hash",
                "adapter_affinity")

_DESCRIPTION = """\
Simulate a fleet: one request trace through a router onto N replicas, each a whole vLLM
server in the twin (its own scheduler, KV pool, adapter caches, profile and serving
config), and report the fleet-wide result in `vllm bench serve` terms plus a table per
replica (throughput, p99 TTFT, ITL, adapter loads from disk/host, preemptions, the
starvation verdict) and the load imbalance (max/mean across replicas).

Routers (--router):
  round_robin                 the j-th request to replica j mod N
  least_outstanding_requests  fewest requests in flight (running + waiting)
  static                      a routing table (--routing routing.csv, as `twin place`
                              writes: adapter, gpu = replica index, weight)
  consistent_hash             the adapter's name on a hash ring (~1/N of adapters move
                              when a replica is added)
  adapter_affinity            a replica with the adapter on its GPU, else in its host
                              memory, else the least loaded; a replica with the adapter
                              is skipped when it has more than --affinity-slack requests
                              in flight beyond the least-loaded one
The routers that read replica state (least_outstanding_requests, adapter_affinity) see it
as of the last refresh, every --router-refresh-s seconds of simulated time (0: exact at
each arrival), plus the requests they sent since; they run every replica in one event
loop. The others route the whole trace first and simulate each replica on its own share,
--workers at a time (--backend ray: on Ray, --address of a cluster or a local instance).

Every replica gets the serving flags below (or --config), or give one serve YAML per
replica with --replica-config (repeated; --replica-profile pairs a profile with each): each
YAML is then its replica's whole config, and serving flags beside it are refused; the
adapters a YAML lists under lora-modules (twin place's gpu-*/vllm_config.yaml) are the
ones its replica preloads, as vLLM loads them at start-up.

examples:
  twin fleet --trace t.parquet --replicas 4 --router adapter_affinity --max-loras 8 --plot --out runs/f
  twin place --trace t.parquet --out runs/place
  twin fleet --trace t.parquet --replicas 3 --router static --routing runs/place/routing.csv
  twin fleet --trace t.parquet --replica-config a100.yaml --replica-config h100.yaml \\
      --replica-profile my-a100.json --replica-profile llama31-8b-h100-64gb
"""


def add_fleet_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fleet", help="simulate N replicas behind a router",
                              description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, type=Path, help="trace (.parquet or .csv)")
    p.add_argument("--profile", default=None,
                   help="profile JSON path or shipped name for every replica (default: "
                        "llama31-8b-h100-64gb)")
    p.add_argument("--catalog", type=Path,
                   help="adapter catalog (adapter, rank); default: every adapter of the "
                        "trace, on each replica at its own max_lora_rank (as twin simulate "
                        "of its config)")
    p.add_argument("--replicas", type=positive_int, default=None,
                   help="number of identical replicas (default 2; or --replica-config)")
    p.add_argument("--replica-config", type=Path, action="append", default=[],
                   help="one replica's serve YAML (vLLM names); repeat for each replica")
    p.add_argument("--replica-profile", action="append", default=[],
                   help="the profile of the replica of the same position in --replica-config")
    p.add_argument("--router", default="round_robin", choices=ROUTER_NAMES,
                   help="routing rule (default round_robin; see the list above)")
    p.add_argument("--routing", type=Path, help="routing.csv for --router static")
    p.add_argument("--router-refresh-s", type=non_negative_float, default=0.0,
                   help="seconds between refreshes of the router's view (default 0: "
                        "exact, the replicas' state at each arrival)")
    p.add_argument("--affinity-slack", type=non_negative_int, default=16,
                   help="adapter_affinity: requests in flight a replica holding the adapter "
                        "may carry beyond the least-loaded replica (default 16)")
    p.add_argument("--window-s", type=positive_float, default=None,
                   help="measure a fixed window; default: run to completion")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="processes for replicas simulated independently (default 1)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="where independent replicas run (default local)")
    p.add_argument("--address", help="Ray cluster address (--backend ray)")
    p.add_argument("--out", type=Path, help="write requests.parquet (with replica), "
                   "summary.json, timeline.parquet (summed), replica_timelines.parquet (each "
                   "replica's), replicas.csv (and timeline.png) here")
    p.add_argument("--plot", action="store_true", help="PNG timeline, one line per replica")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p)
    p.set_defaults(func=run)
    return p


def _replicas(args, profile):
    if args.replica_profile and len(args.replica_profile) != len(args.replica_config):
        raise TwinInputError(f"{len(args.replica_profile)} --replica-profile for "
                             f"{len(args.replica_config)} --replica-config; give one each",
                             field="--replica-profile")
    if args.replica_config:
        if args.replicas is not None:
            raise TwinInputError("give --replicas or --replica-config, not both",
                                 field="--replicas")
        flags = given_config_flags(args)
        if flags:   # would be dropped silently: each replica's YAML is its whole config
            raise TwinInputError(
                f"{', '.join(flags)} set the config of --replicas' identical replicas; with "
                "--replica-config each replica's YAML is its whole config: put the settings "
                "there", field=flags[0])
        profiles = args.replica_profile or [profile] * len(args.replica_config)
        # the path itself: a file's lora-modules are the adapters its replica preloads
        return [api.fleet_replica(c, p) for c, p in zip(args.replica_config, profiles)]
    return args.replicas or 2


def run(args) -> int:
    if args.plot and not args.out:
        raise TwinInputError("--plot needs --out DIR", field="--plot")
    if args.router == "static" and args.routing is None:
        raise TwinInputError("--router static needs --routing routing.csv", field="--routing")
    if args.router != "static" and args.routing is not None:
        raise TwinInputError(f"--routing is read by --router static only (got --router "
                             f"{args.router}); add --router static or drop --routing",
                             field="--routing")
    say = console(args.json)
    with prepare(args.out, "fleet", inputs=input_paths(args)):
        profile = api.load_profile(args.profile)
        replicas = _replicas(args, profile)
        run_ = api.simulate_fleet(
            args.trace, replicas, args.router, config=config_from_args(args, profile),
            profile=profile, catalog=args.catalog, routing=args.routing,
            window_s=args.window_s, refresh_s=args.router_refresh_s,
            affinity_slack=args.affinity_slack, workers=args.workers,
            backend=args.backend, address=args.address, progress=not args.no_progress)
        if args.json:
            print(json_document(run_.summary, indent=2))
        else:
            print(run_.format_summary())
        if args.out:
            out = run_.save(args.out, plot=args.plot)
            say(f"wrote {out}/")
    return 0

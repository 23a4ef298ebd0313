"""``twin validate``: executor vs twin on the same trace and configuration."""

from __future__ import annotations

import argparse
from pathlib import Path

from twin.argtypes import device_name, non_negative_float, positive_float, positive_int
from twin.cli.config_flags import add_config_flags, config_from_args, read_limited_trace
from twin.outputs import console, input_paths, json_document, prepare
from twin.errors import TwinInputError
from twin.cli.fleet import ROUTER_NAMES
from twin.validate import validate
from twin.workload.schema import refuse_empty_window

_DESCRIPTION = """\
Serve a trace for real on the reference executor and simulate it on the twin with a
calibrated profile (twin calibrate --executor), with the same configuration and KV
capacity, and print a side-by-side table: throughput, TTFT/TPOT/ITL/E2E mean and p99,
adapter loads, preemptions, and SMAPE = 2|a-b|/(|a|+|b|) per metric. With --out it writes
executor/ and twin/ results, table.csv, validation.json and timeline_overlay.png (the two
timelines overlaid).

The executor runs in real time (arrivals on the wall clock): keep traces to tens of
seconds on a CPU (--limit, --time-scale).

Speed anchor (--speed-anchor): a shared CPU is not equally fast at calibration and at
validation. A ~0.4-s benchmark of the executor's hot path runs before and after every
executor run; the twin is priced at the box's speed during the runs (step times x anchor
now / anchor at calibration, from the profile's speed_anchor_s) and the raw twin, priced as
calibrated, is printed beside it. It corrects slow drift of the box between calibration
and validation, not noise within a run. Profiles without speed_anchor_s (calibrated
before the anchor, or from vLLM runs) are compared unscaled, as stated. Off by default:
on a shared 2-core box its correction was as large as its own noise, helping some
validations and hurting others (experiments/README_validate.md).

A fleet (--replicas N, --router R): N executor replicas behind the router, against the fleet
twin (twin fleet) behind the same router code and event loop; each replica's clock counts
only its own steps, so the replicas run side by side in logical time on one core. Printed:
the fleet-wide table, each replica's requests / throughput / TTFT / ITL / adapter loads on
both sides, and the share of requests both sides routed to the same replica
(experiments/README_fleet.md, "Executor replicas behind the router").

examples:
  twin validate --trace t.parquet --profile cpu-tiny --model tiny --max-loras 4 \\
      --max-cpu-loras 8 --out runs/val
  twin validate --trace t.parquet --config serve.yaml --profile cpu-smollm2 --model smollm2 \\
      --adapters adapters/smol --out runs/val-smol
  twin validate --trace t.parquet --profile my-cpu-tiny.json --model tiny --replicas 2 \\
      --router adapter_affinity --max-loras 2 --out runs/val-fleet
"""


def add_validate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("validate", help="compare the twin with the executor",
                              description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, type=Path, help="trace (.parquet or .csv)")
    p.add_argument("--profile", required=True,
                   help="calibrated profile (path or shipped name, e.g. cpu-tiny)")
    p.add_argument("--model", default="tiny", help="tiny, smollm2 or an HF Llama directory")
    p.add_argument("--adapters", type=Path,
                   help="PEFT adapters directory or catalog (default: synthetic ones named "
                        "after the trace's adapters, ranks 8,16)")
    p.add_argument("--device", type=device_name, default="cpu",
                   help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: the profile's calibration threads)")
    p.add_argument("--num-gpu-blocks", type=positive_int, default=None,
                   help="KV blocks for both (default: the profile's memory model, capped at "
                        "what the trace can use)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N requests only")
    p.add_argument("--time-scale", type=positive_float, default=1.0,
                   help="multiply arrival times (0.5 = twice as fast)")
    p.add_argument("--window-s", type=positive_float, default=None, help="measure a fixed window")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="executor runs; the twin is compared to their median (default 1)")
    p.add_argument("--speed-anchor", action=argparse.BooleanOptionalAction, default=False,
                   help="price the twin at the box's speed during the executor runs (the "
                        "speed anchor; default off; for a shared CPU whose speed drifts "
                        "between calibration and validation, unnecessary on a dedicated GPU)")
    p.add_argument("--replicas", type=positive_int, default=1,
                   help="executor replicas behind --router, against the fleet twin "
                        "(default 1: one server, no router)")
    p.add_argument("--router", default=None, choices=ROUTER_NAMES,
                   help="the fleet's routing rule (default round_robin with --replicas > 1)")
    p.add_argument("--routing", type=Path, help="routing.csv for --router static")
    p.add_argument("--router-refresh-s", type=non_negative_float, default=0.0,
                   help="seconds between refreshes of the router's view (0: exact)")
    p.add_argument("--replica-processes", action="store_true",
                   help="run each executor replica in a process of its own, routed in real "
                        "time (one core per replica: no replica's step shares a core's "
                        "caches with another's); default: all on one thread, logical time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--no-progress", action="store_true")
    add_config_flags(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    say = console(args.json)
    # --out is checked (and locked) before the executor runs
    with prepare(args.out, "validate", inputs=input_paths(args)):
        config = config_from_args(args)
        fleet = _fleet_requested(args)   # a fleet's flags refused before the trace is read
        trace = read_limited_trace(args)
        if args.time_scale != 1.0:
            trace = trace.assign(arrival_s=trace["arrival_s"] * args.time_scale)
        refuse_empty_window(trace, args.window_s, str(args.trace))
        if fleet:
            return _run_fleet(args, config, trace, say)
        v = validate(trace, config, args.profile, args.model, args.adapters, out=args.out,
                     threads=args.threads, num_gpu_blocks=args.num_gpu_blocks,
                     device=args.device, window_s=args.window_s,
                     progress=not args.no_progress, seed=args.seed,
                     trace_source=str(args.trace), repeats=args.repeats,
                     speed_anchor=args.speed_anchor)
    a = v.anchor_info
    note = (f"speed anchor: {1e3 * a['during_s']:.1f} ms during the runs vs "
            f"{1e3 * a['calibration_s']:.1f} ms at calibration: twin step times x "
            f"{a['ratio']:.3f} ('twin raw': priced as calibrated)" if a.get("applied")
            else f"speed anchor: {a['reason']}" if a else None)
    return _report(args, v, f"executor vs twin: {args.trace} ({len(trace)} requests, "
                   f"{v.num_blocks} KV blocks, profile {args.profile})",
                   "table.csv, validation.json, timeline_overlay.png", say, note)


def _report(args, v, title: str, files: str, say, note: str | None = None) -> int:
    """The table (or ``--json``), ``note``, the executor's own spread over ``--repeats``
    runs, and what was written."""
    if args.json:
        print(json_document(v.to_dict(), indent=2))
    else:
        print(v.format(title))
    if note:
        say(note)
    if args.repeats > 1:
        sp = v.spread
        say(f"executor: median of {args.repeats} runs; their own spread (median pairwise "
            f"SMAPE): throughput {100 * sp['throughput']:.1f}%, TTFT mean "
            f"{100 * sp['ttft_mean']:.1f}%, ITL mean {100 * sp['itl_mean']:.1f}%")
    if args.out:
        say(f"wrote {args.out}/ ({files})")
    return 0


def _fleet_requested(args) -> bool:
    """Whether the flags ask for a fleet (``--replicas`` > 1 or ``--router``); flags that
    do not fit what they ask for are refused rather than ignored."""
    fleet = args.replicas > 1 or args.router is not None
    router = args.router or "round_robin"
    if not fleet:
        if args.routing is not None or args.router_refresh_s or args.replica_processes:
            raise TwinInputError("--routing, --router-refresh-s and --replica-processes are "
                                 "a fleet's: add --router (and --replicas N)", field="--router")
        return False
    if router == "static" and args.routing is None:
        raise TwinInputError("--router static needs --routing routing.csv", field="--routing")
    if router != "static" and args.routing is not None:
        raise TwinInputError(f"--routing is the static router's table; --router {router} "
                             f"reads none (add --router static)", field="--routing")
    if args.num_gpu_blocks is not None or args.speed_anchor:
        raise TwinInputError("--num-gpu-blocks and --speed-anchor are for one server; a "
                             "fleet's replicas take the profile's KV capacity, unanchored",
                             field="--replicas")
    return True


def _run_fleet(args, config, trace, say) -> int:
    """``--replicas`` / ``--router``: executor replicas behind the router vs the fleet twin."""
    from twin.validate.fleet import validate_fleet   # lazy: the parser loads no fleet module

    router = args.router or "round_robin"
    v = validate_fleet(trace, args.replicas, args.profile, router, args.model, args.adapters,
                       config=config, routing=args.routing, refresh_s=args.router_refresh_s,
                       threads=args.threads, device=args.device, window_s=args.window_s,
                       seed=args.seed, repeats=args.repeats, trace_source=str(args.trace),
                       out=args.out, progress=not args.no_progress,
                       replica_processes=args.replica_processes)
    return _report(args, v, f"executor fleet vs twin fleet: {args.trace} ({len(trace)} "
                   f"requests, {args.replicas} replicas, router {router}, profile "
                   f"{args.profile})", "table.csv, replicas.csv, validation.json, "
                   "timeline_overlay.png", say)

"""``twin simulate``: run a trace through the twin and report as ``vllm bench serve`` does."""

from __future__ import annotations

import argparse
from pathlib import Path

from twin.argtypes import positive_float
from twin.cli.config_flags import add_config_flags, config_from_args
from twin.errors import TwinInputError
from twin.outputs import console, input_paths, json_document, prepare
from twin import api

_DESCRIPTION = """\
Simulate a request trace served by vLLM with LoRA adapters, on the hardware and base
model described by a profile, and print the result in `vllm bench serve` terms plus
adapter loads, preemptions, KV usage and the starvation verdict.

Verdict: STARVING when achieved total throughput is below 90% of offered, or the
waiting queue keeps growing. With --window-s both are per second of the window; run to
completion, both are measured from the first arrival: offered up to the latest arrival
plus time in service (first scheduled to finish) over the requests, achieved up to the last
completion; the gap is time spent waiting to be scheduled. Requests
with prompt + output over max_model_len are rejected (as vLLM's HTTP 400), not offered.
"Held by X (% busy)": the share of busy time in which the oldest waiting request was
kept out by limit X (max_loras: its adapter is outside the full set of GPU slots;
kv_cache; max_num_batched_tokens: the step was full; max_num_seqs); a STARVING verdict
names the limit that held it at least half the time, the knob to look at first.
"Note: outside the profile's calibration": the run's steps held more distinct adapters
(or its max_loras is larger) than the runs the profile's step time was fitted on (the
shipped H100 profile: 192), so its per-adapter step terms are extrapolated.

The serving configuration uses vLLM's own names, as flags (--max-loras 8) or in a YAML
file (--config serve.yaml, keys like max_loras or max-loras); flags override the file.

examples:
  twin simulate --trace traces/azure_conv_1h_32lora.parquet --max-loras 8 --max-cpu-loras 32
  twin simulate --trace t.parquet --config serve.yaml --window-s 3600 --out runs/a --plot
"""


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="simulate a trace on the twin",
                              description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, type=Path, help="trace (.parquet or .csv)")
    p.add_argument("--profile", default=None,
                   help="profile JSON path or shipped name (default: llama31-8b-h100-64gb)")
    p.add_argument("--catalog", type=Path,
                   help="adapter catalog (CSV/Parquet: adapter, rank); default: every adapter "
                        "of the trace at max_lora_rank")
    p.add_argument("--window-s", type=positive_float, default=None,
                   help="measure a fixed window (arrivals after it dropped, unfinished "
                        "requests counted as not completed); default: run to completion")
    p.add_argument("--out", type=Path, help="write requests.parquet, summary.json, "
                   "timeline.parquet (and timeline.png with --plot) here")
    p.add_argument("--plot", action="store_true", help="PNG timeline (needs --out)")
    p.add_argument("--steps", action="store_true", help="also write steps.parquet (step log; needs --out)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    for flag in ("plot", "steps"):   # what they write would go nowhere
        if getattr(args, flag) and not args.out:
            raise TwinInputError(f"--{flag} needs --out DIR", field=f"--{flag}")
    say = console(args.json)
    # --out is checked (and locked) before the simulation, not after it
    with prepare(args.out, "simulate", inputs=input_paths(args)):
        # the Python API reads the trace and catalog, as `twin.simulate` does
        profile = api.load_profile(args.profile)   # read once: the config takes its context
        result = api.simulate(args.trace, config_from_args(args, profile), profile,
                              catalog=args.catalog, window_s=args.window_s,
                              progress=not args.no_progress, record_steps=args.steps)
        if args.json:
            print(json_document(result.summary, indent=2))
        else:
            print(result.format_summary())
        if args.out:
            out = result.save(args.out, plot=args.plot, kind="simulate")
            say(f"wrote {out}/")
    return 0

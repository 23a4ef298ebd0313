"""``twin trace``: build a trace file from a public trace or a synthetic generator.

Wire it into the main CLI with ``add_trace_parser(subparsers)``; the parser sets
``func=run``. ``python -m twin.cli.trace trace ...`` runs it stand-alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from twin.argtypes import comma_list
from twin.errors import TwinInputError
from twin.outputs import input_paths, prepare, staged_file
from twin.workload import generate, popularity, prefix_stats, public, servegen, sessions
from twin.workload.schema import check_trace_name, read_trace, validate_trace, write_trace

_DESCRIPTION = """\
Build a request trace (Parquet, or CSV if --out ends in .csv) in twin's trace format:
request_id, arrival_s, adapter (empty = base model), prompt_tokens, output_tokens; for
prefix caching also hash_ids (block ids of each request's tokens, block size kept in the
Parquet file), session_id and turn (Mooncake and sessions; Parquet only).

Public sources are read from the shared data folder: $TWIN_SHARED_DATA, else ../shared/data
next to the repository (see its traces/README.md for provenance and licences).
Azure and Mooncake traces name no adapter: --adapters N tags them (uniform or power-law
popularity). ServeGen keeps its real tenants (one adapter per client). Every action is
deterministic given --seed.

examples:
  twin trace azure --kind conv --adapters 32 --popularity powerlaw --alpha 0.5 --out x.parquet
  twin trace mooncake --kind conversation --limit-s 600 --out m.parquet
  twin trace servegen --tenants 32 --duration-s 600 --total-rate 30 --out s.parquet
  twin trace rate-classes --adapters 32 --rates 1.6,0.8,0.4 --duration-s 3600 --out r.parquet
  twin trace powerlaw --adapters 100 --rate 20 --alpha 0.5 --cv 2 --out p.parquet
  twin trace sessions --adapters 8 --sessions-per-adapter 20 --turns-mean 4 --out s.parquet
  twin trace summary s.parquet
"""


_floats = comma_list(float, positive=True, name="positive numbers")


def _means(text: str):
    return None if text.strip().lower() == "none" else _floats(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output file (.parquet or .csv)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _tagging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter tagging (the trace names none)")
    g.add_argument("--adapters", type=int, default=0,
                   help="tag requests with N adapters lora-0..lora-(N-1); 0 = leave all on "
                        "the base model (default)")
    g.add_argument("--popularity", choices=("uniform", "powerlaw"), default="uniform",
                   help="uniform, or S-LoRA's power law: adapter = floor(N*X), X~power(alpha)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="power-law exponent; 1 = uniform, smaller = more skewed (default 1)")
    g.add_argument("--prefix", default="lora", help="adapter name prefix (default lora)")


def _lengths_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("request lengths")
    g.add_argument("--lengths", choices=("sharegpt", "uniform"), default="sharegpt",
                   help="sharegpt: pairs from the ShareGPT stats file under vLLM's filter "
                        "(default); uniform: S-LoRA's U[lo, hi)")
    g.add_argument("--target-means", type=_means, default=(223.0, 196.0),
                   help="rescale ShareGPT lengths to these prompt,output means (default "
                        "223,196: the vLLM-H100 runs' pool); 'none' keeps the file's")
    g.add_argument("--max-prompt", type=int, default=1024, help="ShareGPT filter (1024)")
    g.add_argument("--max-total", type=int, default=2048, help="ShareGPT filter (2048)")
    g.add_argument("--uniform", type=comma_list(int, minimum=1, length=2, name="integers"),
                   default=(8, 512), metavar="LO,HI",
                   help="bounds for --lengths uniform (default 8,512)")


def add_trace_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``trace`` (with actions azure, mooncake, servegen, rate-classes, powerlaw,
    sessions, summary)."""
    fmt = argparse.RawDescriptionHelpFormatter
    tp = subparsers.add_parser("trace", help="build a trace file from public or synthetic "
                               "workloads", description=_DESCRIPTION, formatter_class=fmt)
    tp.set_defaults(func=run)
    acts = tp.add_subparsers(dest="trace_action", metavar="ACTION", required=True)

    p = acts.add_parser("azure", help="Azure LLM inference trace 2023 (CC-BY 4.0)",
                        description="One hour of Azure's production LLM service (2023): real "
                        "arrivals and token counts; adapters assigned synthetically.")
    p.add_argument("--kind", choices=("conv", "code"), default="conv",
                   help="conversation (5.5 req/s) or code completion (2.6 req/s, bursty)")
    p.add_argument("--input", type=Path, help="CSV path (default: the shared copy)")
    p.add_argument("--limit-s", type=float, help="keep arrivals in [0, LIMIT_S)")
    _tagging(p)
    _common(p)

    p = acts.add_parser("mooncake", help="Mooncake FAST'25 trace (Apache-2.0)",
                        description="Kimi's conversation trace (1 h, long prompts, 3-s "
                        "ticks) or Mooncake's synthetic one; adapters assigned synthetically.")
    p.add_argument("--kind", choices=("conversation", "synthetic"), default="conversation")
    p.add_argument("--input", type=Path, help="JSONL path (default: the shared copy)")
    p.add_argument("--limit-s", type=float, help="keep arrivals in [0, LIMIT_S)")
    p.add_argument("--no-hash-ids", dest="hash_ids", action="store_false",
                   help="drop the 512-token block ids (kept by default, for prefix caching; "
                        "needed for a .csv --out)")
    p.add_argument("--tag-by-prefix", type=int, default=0, metavar="BLOCKS",
                   help="with --adapters: requests whose first BLOCKS block ids agree get "
                        "the same adapter (2 keeps a Kimi conversation's turns on one "
                        "adapter, as one tenant's would be); 0 = each request drawn on its "
                        "own (default)")
    _tagging(p)
    _common(p)

    p = acts.add_parser("servegen", help="per-tenant trace from ServeGen statistics "
                        "(Apache-2.0)", description="Synthesise one adapter per ServeGen "
                        "client (real tenant skew and burstiness): gaps from each client's "
                        "600-s Gamma/Weibull fit, lengths from its quantiles.")
    p.add_argument("--model", default="m-large",
                   help="m-large, m-mid, m-small (14 days), deepseek-r1 (1 day)")
    p.add_argument("--tenants", type=int, default=32, help="top clients by traffic (32)")
    p.add_argument("--duration-s", type=float, default=3600, help="span length (3600)")
    p.add_argument("--start-s", type=int, default=None,
                   help="span start, a multiple of 600 s (default: the model's busiest span)")
    p.add_argument("--total-rate", type=float, default=None,
                   help="scale all tenants so their mean aggregate rate is this many req/s "
                        "(default: the real rates, hundreds of req/s for m-large)")
    p.add_argument("--rate-csv", type=Path, help="default: the shared copy")
    p.add_argument("--length-csv", type=Path, help="default: the shared copy")
    _common(p)

    p = acts.add_parser("rate-classes", help="adapters as independent processes with "
                        "class rates (arXiv 2508.08343)", description="Each adapter an "
                        "independent Poisson (or Gamma) process; rates assigned round-robin "
                        "from --rates, then shuffled.")
    p.add_argument("--adapters", type=int, required=True, help="number of adapters")
    p.add_argument("--rates", type=_floats, default=(1.6, 0.8, 0.4),
                   help="req/s per class, comma-separated (default 1.6,0.8,0.4)")
    p.add_argument("--duration-s", type=float, default=3600,
                   help="arrivals stop here (default 3600)")
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson",
                   help="gap distribution per adapter (default poisson)")
    p.add_argument("--cv", type=float, default=1.0, help="gap CV for --arrival gamma")
    p.add_argument("--prefix", default="lora")
    _lengths_opts(p)
    _common(p)

    p = acts.add_parser("powerlaw", help="S-LoRA-style power-law popularity",
                        description="One Gamma arrival process (shape 1/cv^2) of --rate "
                        "req/s; adapter = floor(N*X), X ~ power(alpha).")
    p.add_argument("--adapters", type=int, required=True, help="number of adapters")
    p.add_argument("--rate", type=float, required=True, help="aggregate req/s")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="1 = uniform, smaller = more skewed (default 1)")
    p.add_argument("--cv", type=float, default=1.0,
                   help="gap CV of the aggregate process; 1 = Poisson (default)")
    p.add_argument("--duration-s", type=float, default=3600,
                   help="arrivals stop here (default 3600)")
    p.add_argument("--prefix", default="lora")
    _lengths_opts(p)
    _common(p)
    _sessions_parser(acts)

    p = acts.add_parser("summary", help="print a trace's summary (requests, adapters, "
                        "lengths, shared-prefix fraction, sessions)",
                        description="Read a trace and print the summary line `twin trace` "
                        "prints after building one. The shared-prefix fraction is the share "
                        "of prompt tokens an ideal (infinite) per-adapter prefix cache would "
                        "serve under vLLM's rules (twin.workload.prefix_stats.prefix_share).")
    p.add_argument("trace", type=Path, help="trace file (.parquet or .csv)")
    return tp


# (flag, type, default, help) of `twin trace sessions`; each flag's dest is the name of
# twin.workload.sessions.session_trace's parameter it sets
_SESSION_FLAGS = (
    ("--sessions-per-adapter", float, 10,
     "sessions per adapter over the span, on average (default 10)"),
    ("--turns-mean", float, 4.0, "mean turns per session, geometric distribution (default 4)"),
    ("--max-turns", int, None, "cap on turns per session (default: none)"),
    ("--think-s", float, 30.0, "mean think time between turns, exponential (default 30 s)"),
    ("--tpot-s", float, 0.03,
     "seconds per output token used to estimate a turn's duration (default 0.03)"),
    ("--duration-s", float, 3600,
     "sessions start in [0, DURATION_S); later turns are dropped (default 3600)"),
    ("--system-tokens", int, 512, "tokens of each adapter's system prompt (default 512)"),
    ("--context-tokens", int, 2048,
     "agent style: tokens of each session's tool context (default 2048)"),
    ("--block-size", int, 16,
     "tokens per hash id (default 16, vLLM's block size, so every full KV block can hit)"),
    ("--max-model-len", int, 8192,
     "a session ends before a turn whose prompt + output would pass this (default 8192)"),
)
_SESSION_ARGS = tuple(f[0][2:].replace("-", "_") for f in _SESSION_FLAGS[1:]) + (
    "style", "same_system_prompt", "popularity", "alpha", "seed", "prefix")


def _sessions_parser(acts) -> None:
    p = acts.add_parser(
        "sessions", help="multi-turn conversations (or agents) with per-adapter system "
        "prompts, for prefix caching", description="Sessions per adapter, each of a few "
        "turns; turn k's prompt = turn k-1's prompt + its answer + a new message (chat), or "
        "the same tool context re-sent with a new message (agent). Every adapter's sessions "
        "share its system prompt. Open loop: turn k arrives a think time plus an estimate "
        "of turn k-1's duration (--tpot-s per output token) after turn k-1 arrived, not "
        "after it really finished. Each turn's new message and answer are one (prompt, "
        "output) pair of --lengths. Writes hash_ids (block ids, equal ids = equal tokens; "
        "Parquet only), session_id and turn.")
    p.add_argument("--adapters", type=int, required=True, help="number of adapters")
    for flag, kind, default, text in _SESSION_FLAGS:
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--style", choices=sessions.STYLES, default="chat",
                   help="chat: history re-sent (default); agent: tool context re-sent")
    p.add_argument("--same-system-prompt", action="store_true",
                   help="every adapter gets the same system prompt text (vLLM still never "
                        "shares its blocks across adapters)")
    p.add_argument("--popularity", choices=("uniform", "powerlaw"), default="uniform",
                   help="sessions per adapter: equal (default) or S-LoRA's power law")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent (default 1)")
    p.add_argument("--prefix", default="lora", help="adapter name prefix (default lora)")
    _lengths_opts(p)
    _common(p)


def _length_sampler(args):
    if args.lengths == "uniform":
        lo, hi = (int(x) for x in args.uniform)
        return generate.uniform_lengths(lo, hi)
    means = args.target_means or None
    return public.sharegpt_length_pool(public.shared_trace_path(public.SHAREGPT_FILE),
                                       max_prompt=args.max_prompt, max_total=args.max_total,
                                       target_means=means)


def build(args) -> pd.DataFrame:
    """The trace an argument namespace describes (no file written)."""
    act = args.trace_action
    if act in ("azure", "mooncake"):
        if act == "azure":
            path = args.input or public.shared_trace_path(public.AZURE_FILES[args.kind])
            df = public.load_azure2023(path, limit_s=args.limit_s)
        else:
            path = args.input or public.shared_trace_path(public.MOONCAKE_FILES[args.kind])
            df = public.load_mooncake(path, limit_s=args.limit_s, hash_ids=args.hash_ids)
        by = getattr(args, "tag_by_prefix", 0)
        if by and not args.hash_ids:
            raise TwinInputError("--tag-by-prefix needs the block ids (drop --no-hash-ids)",
                                 field="--tag-by-prefix")
        if args.adapters:
            groups = prefix_stats.prefix_groups(df, by) if by else None
            df = popularity.assign_adapters(df, args.adapters, popularity=args.popularity,
                                            alpha=args.alpha, seed=args.seed,
                                            prefix=args.prefix, groups=groups)
        return df
    if act == "servegen":
        rate = args.rate_csv or public.shared_trace_path(public.SERVEGEN_RATE_FILE)
        length = args.length_csv or public.shared_trace_path(public.SERVEGEN_LENGTH_FILE)
        return servegen.servegen_tenants(rate, length, model=args.model,
                                         n_tenants=args.tenants, duration_s=args.duration_s,
                                         start_window_s=args.start_s,
                                         total_rate=args.total_rate, seed=args.seed)
    if act == "rate-classes":
        if 0 < args.adapters < len(args.rates):   # adapter i takes rates[i % len(rates)]
            unused = ", ".join(f"{r:g}" for r in args.rates[args.adapters:])
            print(f"note: {args.adapters} adapter(s) take the first {args.adapters} of "
                  f"{len(args.rates)} rates; no adapter has rate(s) {unused} req/s",
                  file=sys.stderr)
        return generate.rate_class_trace(args.adapters, args.rates,
                                         duration_s=args.duration_s,
                                         lengths=_length_sampler(args), arrival=args.arrival,
                                         cv=args.cv, seed=args.seed, prefix=args.prefix)
    if act == "powerlaw":
        return generate.powerlaw_trace(args.adapters, args.rate, alpha=args.alpha,
                                       duration_s=args.duration_s, cv=args.cv,
                                       lengths=_length_sampler(args), seed=args.seed,
                                       prefix=args.prefix)
    if act == "sessions":
        return sessions.session_trace(args.adapters, args.sessions_per_adapter,
                                      lengths=_length_sampler(args),
                                      **{k: getattr(args, k) for k in _SESSION_ARGS})
    raise TwinInputError(f"unknown trace action {act!r}", field="trace_action")


def summary(df: pd.DataFrame) -> str:
    """One line: rows, span, rate, adapters, mean lengths; the shared-prefix fraction when
    the trace has hash_ids, sessions and turns when it has sessions."""
    span = float(df["arrival_s"].max()) if len(df) else 0.0
    n_ad = int(df["adapter"].nunique())
    rate = len(df) / span if span > 0 else float("nan")
    line = (f"{len(df)} requests over {span:.0f} s ({rate:.2f} req/s), "
            f"{n_ad} adapter(s){' + base' if df['adapter'].isna().any() else ''}, "
            f"mean prompt {np.mean(df['prompt_tokens']) if len(df) else 0:.0f} / "
            f"output {np.mean(df['output_tokens']) if len(df) else 0:.0f} tokens")
    if "hash_ids" in df.columns and len(df):
        line += (f", shared-prefix fraction {100 * prefix_stats.prefix_share(df):.1f}% "
                 f"(ideal per-adapter cache, {df.attrs['hash_block_size']}-token blocks)")
    s = prefix_stats.session_summary(df)
    if s:
        line += (f", {s['sessions']} sessions ({s['sessions_per_adapter_mean']:.1f} per "
                 f"adapter, max {s['sessions_per_adapter_max']}), turns mean "
                 f"{s['turns_mean']:.1f} / max {s['turns_max']}")
    return line


def run(args) -> int:
    """Build the trace, write it, print a one-line summary. Returns the exit code."""
    if args.trace_action == "summary":
        print(f"{args.trace}: {summary(read_trace(args.trace))}")
        return 0
    out = check_trace_name(args.out, csv=True)   # before the build
    # --out checked (and locked) before the build; a CSV has no room for twin's output
    # marker, so an existing one is never replaced
    with prepare(out, "trace", inputs=input_paths(args), file=True):
        df = build(args)
        if not len(df):   # every command refuses a trace without requests: say so now
            raise TwinInputError("these options select no request (e.g. --limit-s 0, or a "
                                 "span or rate with no arrivals); nothing written",
                                 file=str(out))
        if out.suffix.lower() == ".csv":
            if "hash_ids" in df.columns:
                drop = " (or drop them: --no-hash-ids)" if args.trace_action == "mooncake" else ""
                raise TwinInputError("a CSV trace cannot keep the hash_ids' block size: "
                                     f"write .parquet{drop}", file=str(out), field="--out")
            with staged_file(out, "trace") as tmp:
                validate_trace(df, source=str(out)).to_csv(tmp, index=False)
        else:
            write_trace(df, out)
    print(f"{out}: {summary(df)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="twin", description="twin trace tools")
    add_trace_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TwinInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

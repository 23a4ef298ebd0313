"""``twin sweep``, ``twin recommend``, ``twin place``, ``twin train``.

Every command imports its part of :mod:`twin.ml` when it runs: the ML stack (the
simulator, pydantic schemas, the model) would otherwise load with every
``twin`` command, ``twin --help`` included (0.5-0.7 s more, measured on this machine)."""

from __future__ import annotations

import argparse
import shutil
from contextlib import contextmanager
from pathlib import Path

from twin.argtypes import comma_list, positive_float, positive_int
from twin.cli.config_flags import add_prefix_caching_flag, ml_base
from twin.cli.ml_help import PLACE, RECOMMEND, SWEEP
from twin.cli.place_fleet import (add_verify_fleet_args, check_fleet_routers,
                                  verify_placement_fleet)
from twin.cli.slo import cost_with_fleet_check, fleet_check_text, fleet_ok, parse_slo
from twin.costs.profile import load_profile
from twin.errors import TwinInputError
from twin.outputs import console, input_paths, json_document, prepare, staged_dir
from twin.workload import read_trace
from twin.workload.catalog import AdapterCatalog
from twin.workload.schema import refuse_empty_window

_FMT = argparse.RawDescriptionHelpFormatter

def _common_workload(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", type=Path, help="trace (.parquet or .csv)")
    src.add_argument("--workload-spec", type=Path,
                     help="workload spec YAML (family: rate_classes|powerlaw|trace, ...)")
    p.add_argument("--catalog", type=Path,
                   help="adapter catalog (adapter, rank[, path]); default: every adapter of "
                        "the trace at the base config's max_lora_rank")
    p.add_argument("--profile", default=None,
                   help="profile JSON path or shipped name (default: llama31-8b-h100-64gb)")
    p.add_argument("--base-config", type=Path,
                   help="YAML of the vLLM settings the runs start from (default: "
                        "max_num_seqs 2048, max_num_batched_tokens 2048, "
                        "gpu_memory_utilization 0.9): fixed, except the knobs the search "
                        "varies, which it overrides (max_loras, max_cpu_loras, "
                        "max_lora_rank; with --objective goodput or cost also "
                        "max_num_batched_tokens, max_num_seqs, gpu_memory_utilization)")
    p.add_argument("--window-s", type=positive_float, default=None,
                   help="measured window (default: the trace's span; a trace under 10 "
                        "minutes is verified by runs to its last request instead)")
    p.add_argument("--model", type=Path, help="recommender model JSON (default: shipped)")
    p.add_argument("--model-name", default=None,
                   help="model for `vllm serve` (default: the profile's model)")
    p.add_argument("--max-runs", type=positive_int, default=None,
                   help="twin runs per GPU (default 4; 16 with --objective goodput or cost, "
                        "or --slo; goodput: + up to 2 x --workers reruns of stopped runs)")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="parallel twin runs (default 2)")
    add_prefix_caching_flag(p)


def add_ml_parsers(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a workload x config grid into a dataset",
                              description=SWEEP, formatter_class=_FMT)
    p.add_argument("--workloads", type=Path, required=True, help="workloads YAML")
    p.add_argument("--out", type=Path, required=True, help="dataset folder")
    p.add_argument("--profile", default=None)
    p.add_argument("--base-config", type=Path)
    p.add_argument("--slots", default=None,
                   type=comma_list(int, minimum=1, name="max_loras values"),
                   help="comma-separated max_loras grid (default 1,2,4,8,16,32,64,96,128,...,384)")
    p.add_argument("--window-s", type=positive_float, default=None,
                   help="measured window per run (default: each workload's duration_s; a "
                        "trace workload's 3600 s, or to its last request if shorter); "
                        "refused when it runs past a workload's duration")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes (default: CPUs)")
    p.add_argument("--no-early-exit", action="store_true",
                   help="simulate clearly starving points for the whole window too")
    p.add_argument("--no-progress", action="store_true")
    add_prefix_caching_flag(p)
    p.set_defaults(func=run_sweep_cmd)

    p = subparsers.add_parser("recommend", help="recommend a verified vLLM configuration",
                              description=RECOMMEND, formatter_class=_FMT)
    _common_workload(p)
    p.add_argument("--objective", choices=("throughput", "goodput", "cost"),
                   default="throughput", help="what to optimize (see above; default "
                   "throughput)")
    p.add_argument("--slo", default=None,
                   help="ttft=MS,tpot=MS: p99 latency SLOs (goodput and cost objectives)")
    p.add_argument("--optimizer", choices=("auto", "tpe", "coordinate", "exhaustive"),
                   default="auto", help="search over the enlarged space (goodput/cost; "
                   "default auto: exhaustive if it fits --max-runs, else tpe if optuna is "
                   "installed, else coordinate)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default 0)")
    p.add_argument("--study-db", action="store_true",
                   help="keep the TPE study in OUT/study.db (SQLite) and resume it: runs it "
                        "records are not made again and count against --max-runs (raise "
                        "--max-runs to continue a study)")
    p.add_argument("--gpu-price", type=positive_float, default=None,
                   help="cost: dollars per GPU-hour, for $/hour and $ per million tokens "
                        "(default: the profile GPU's public on-demand list price, "
                        "twin/costs/gpus.py, printed with its source and date)")
    p.add_argument("--max-gpus", type=positive_int, default=8,
                   help="cost: most GPUs to try (default 8; servers of a tensor-parallel "
                        "profile, each its tensor_parallel_size GPUs); also the cap of the "
                        "fewest-GPU search after an infeasible goodput recommendation")
    p.add_argument("--out", type=Path, default=Path("runs/recommend"),
                   help="output folder (default runs/recommend)")
    p.add_argument("--no-fleet-check", action="store_true",
                   help="cost: skip running the placement as one fleet on the whole trace "
                        "(SLOs on the fleet's requests, and per GPU)")
    p.add_argument("--no-place", action="store_true",
                   help="goodput: when no configuration meets the SLOs on one GPU, do not "
                        "search the fewest GPUs that do (twin place --slo)")
    p.add_argument("--no-plot", action="store_true", help="skip throughput_map.png")
    p.add_argument("--json", action="store_true", help="print recommendation.json")
    p.set_defaults(func=run_recommend_cmd,
                   flag_defaults={d: p.get_default(d) for d in OBJECTIVE_FLAGS})

    p = subparsers.add_parser("place", help="place adapters on the fewest GPUs",
                              description=PLACE, formatter_class=_FMT)
    _common_workload(p)
    p.add_argument("--slo", default=None,
                   help="ttft=MS,tpot=MS: every GPU must meet these p99s in its twin run "
                        "(the fewest GPUs meeting the SLOs)")
    p.add_argument("--max-gpus", type=positive_int, default=64,
                   help="most GPUs to try (64; servers of a tensor-parallel profile, each its "
                        "tensor_parallel_size GPUs)")
    p.add_argument("--out", type=Path, default=Path("runs/place"),
                   help="output folder (default runs/place)")
    add_verify_fleet_args(p)
    p.set_defaults(func=run_place_cmd)

    p = subparsers.add_parser("train", help="retrain the recommender on the twin",
                              description="Sweep training and held-out workloads through "
                              "the twin, fit the recommender, compare models, evaluate "
                              "recommendations against exhaustive search; see "
                              "experiments/README_ml.md.", formatter_class=_FMT)
    add_train_args(p)
    p.set_defaults(func=run_train_cmd)


def add_train_args(p):
    p.add_argument("--profile", default=None)
    p.add_argument("--families", type=positive_int, default=100,
                   help="training workload families")
    p.add_argument("--heldout-families", type=positive_int, default=20)
    p.add_argument("--rate-range", default="3,45",
                   type=comma_list(float, positive=True, length=2, name="req/s bounds"),
                   help="aggregate req/s range of the sampled workloads (default 3,45: "
                        "light to ~2x one H100's capacity)")
    p.add_argument("--window-s", type=positive_float, default=600.0)
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/train"))
    p.add_argument("--no-install", action="store_true",
                   help="do not overwrite the shipped twin/ml/recommender.json")
    p.add_argument("--quick", action="store_true", help="smaller model comparison")
    p.add_argument("--no-latency-sweep", action="store_true",
                   help="fit the latency heads on the recommender's sweep alone (the paper's "
                        "max_num_batched_tokens / max_num_seqs, one window), without the "
                        "latency sweep over the goodput search's knobs and 120/600-s windows")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("SLO evaluation (issue 16): held-out workloads x SLO levels, "
                             "recommend --objective goodput vs exhaustive twin search")
    g.add_argument("--slo-only", action="store_true",
                   help="run only the SLO evaluation, with --model (default: the shipped "
                        "model); no sweeps, no training")
    g.add_argument("--no-slo", action="store_true", help="skip the SLO evaluation")
    g.add_argument("--slo-workloads", type=positive_int, default=8,
                   help="held-out workloads evaluated, one per family, <= 32 adapters "
                        "(default 8)")
    g.add_argument("--slo-window-s", type=positive_float, default=120.0,
                   help="window of each SLO evaluation run, s (default 120: minutes in all)")
    g.add_argument("--model", type=Path, default=None,
                   help="recommender model for --slo-only (default: the shipped one)")


# -- helpers ------------------------------------------------------------------------------------

#: `twin recommend`'s flags that only some objectives read (dest -> those objectives): one
#: given to another objective, away from its default, would be ignored without a word
OBJECTIVE_FLAGS = {"gpu_price": ("cost",), "slo": ("goodput", "cost"),
                   "optimizer": ("goodput", "cost"), "seed": ("goodput", "cost"),
                   "study_db": ("goodput", "cost"), "max_gpus": ("goodput", "cost"),
                   "no_fleet_check": ("cost",), "no_place": ("goodput",)}


def refuse_unread_flags(args) -> None:
    """Refuse a flag of :data:`OBJECTIVE_FLAGS` set (not at its parser default) for an
    objective that does not read it."""
    for dest, objectives in OBJECTIVE_FLAGS.items():
        if args.objective not in objectives and \
                getattr(args, dest) != args.flag_defaults[dest]:
            flag = "--" + dest.replace("_", "-")
            raise TwinInputError(f"{flag} applies to --objective {' or '.join(objectives)} "
                                 f"only; the {args.objective} objective would ignore it",
                                 field=flag)


def _load_workload(args):
    window = args.window_s
    if args.trace is not None:
        trace = read_trace(args.trace)
        catalog = AdapterCatalog.read(args.catalog) if args.catalog else None
        label = source = str(args.trace)
    else:
        from twin.ml.spec import WorkloadSpec  # lazy: ML stack off twin --help

        spec = WorkloadSpec.from_yaml(args.workload_spec)
        trace, catalog = spec.build()
        if args.catalog:
            catalog = AdapterCatalog.read(args.catalog)
        if window is None and spec.duration_s:
            window = spec.duration_s
        label = spec.describe()
        source = spec.params["path"] if spec.family == "trace" else label
    if catalog is not None:   # an unknown adapter is named at the trace's row
        catalog.check(trace, 512, source)
    refuse_empty_window(trace, args.window_s, source)   # the user's window, if given
    return trace, catalog, window, label


# -- commands -----------------------------------------------------------------------------------

def run_sweep_cmd(args) -> int:
    """Check (and lock) the store before the sweep; re-using one of kind sweep resumes it."""
    from twin.ml.store import adopt_store  # lazy: ML stack off twin --help

    adopt_store(args.out)
    with prepare(args.out, "sweep", inputs=input_paths(args)):
        return _sweep(args)


def _sweep(args) -> int:
    from twin.ml.spec import (  # lazy: ML stack off twin --help
        SLOTS_GRID, ConfigGrid, load_workloads_yaml)
    from twin.ml.sweep import (  # lazy: ML stack off twin --help
        SPEC_WINDOW, EarlyExit, plan, run_sweep)

    profile = load_profile(args.profile)
    specs = load_workloads_yaml(args.workloads)
    slots = args.slots or SLOTS_GRID
    grid = ConfigGrid(base=ml_base(args, profile), slots=slots)
    ee = EarlyExit(enabled=not args.no_early_exit)
    window = SPEC_WINDOW if args.window_s is None else args.window_s
    tasks = plan(specs, grid, window_s=window, profile=profile, early_exit=ee,
                 source=str(args.workloads))
    said = ("each workload's duration_s" if args.window_s is None
            else f"{args.window_s:g} s")
    print(f"{len(specs)} workloads, {len(tasks)} points, profile {profile.name}, window "
          f"{said}, backend {args.backend}")
    rep = run_sweep(tasks, args.out, profile=profile, backend=args.backend,
                    workers=args.workers, address=args.address, early_exit=ee,
                    progress=not args.no_progress, window=window)
    print(rep.line())
    return 0


def _model_name(args, profile) -> str:
    return args.model_name or profile.model.name


def run_recommend_cmd(args) -> int:
    # --out is checked (and locked) before the search and its twin runs
    with prepare(args.out, "recommend", inputs=input_paths(args)):
        return _recommend(args)


def _recommend(args) -> int:
    from twin.costs.machine import warn_if_other_machine  # lazy: as the other imports here
    from twin.ml.recommend import check_objective, recommend  # lazy: ML stack off --help
    from twin.ml.recommender import Recommender  # lazy: ML stack off twin --help

    say = console(args.json)
    refuse_unread_flags(args)
    slo = parse_slo(args.slo)
    check_objective(args.objective, slo, args.gpu_price, slo_ranks=True,
                    allowed=("throughput", "goodput", "cost"))
    profile = load_profile(args.profile)
    warn_if_other_machine(profile)   # one stderr line: an executor profile from another box
    trace, catalog, window, label = _load_workload(args)
    model = Recommender.load(args.model)
    base = ml_base(args, profile)
    kw = {"optimizer": args.optimizer, "seed": args.seed}
    with study_file(args.out, args.study_db) as db:
        rec = recommend(trace, catalog, profile=profile, model=model, base=base,
                        objective="goodput" if args.objective == "cost" else args.objective,
                        slo=slo, window_s=window, max_runs=args.max_runs,
                        workers=args.workers, study_db=db, **kw)
        plan = None
        if args.objective == "cost":
            plan = cost_with_fleet_check(args, trace, catalog, profile, model, base, window,
                                         slo, rec, kw)
        elif (rec.slo_verdict is not None and not rec.ok and not args.no_place
              and not rec.slo_verdict.get("out_of_reach")):   # more GPUs can help
            from twin.ml.placement import place  # lazy: ML stack off twin --help

            pl = place(trace, catalog, profile=profile, model=model, base=base,
                       window_s=window, max_runs=args.max_runs, workers=args.workers,
                       objective="goodput", slo=rec.slo, max_gpus=args.max_gpus, known=rec,
                       search_kw=kw)
            rec.fewest_gpus = pl.summary()
        say(f"trace: {label}")
        say(rec.report() if plan is None else plan.report())
        if plan is not None and plan.fleet_check is not None:
            say(fleet_check_text(plan.fleet_check))
        ok = rec.ok if plan is None else plan.ok and fleet_ok(plan.fleet_check)
        _write_recommend(args, say, rec, plan, trace, catalog, profile, model, base, label, db)
    if args.json:
        print(json_document(rec.to_dict() if plan is None else plan.to_dict(), indent=2,
                            default=str))
    return 0 if ok else 3


def _write_recommend(args, say, rec, plan, trace, catalog, profile, model, base, label, db):
    """The output folder, staged: the recommendation's files, the cost plan's (cost
    objective), the study's SQLite file (--study-db)."""
    from twin.ml.export import write_cost, write_recommendation  # lazy: ML stack off --help

    out = args.out
    with staged_dir(out, "recommend") as tmp:
        if plan is None:
            written, cmd = write_recommendation(
                tmp, rec, trace, catalog, profile=profile, model=model, base=base,
                model_name=_model_name(args, profile), label=label, plot=not args.no_plot)
            if cmd is not None:
                say("vllm command:", cmd[:300] + (" ..." if len(cmd) > 300 else ""))
        else:
            written = write_cost(tmp, plan, catalog, profile=profile,
                                 model_name=_model_name(args, profile), label=label,
                                 plot=not args.no_plot)
        if db is not None and Path(db).exists():
            shutil.copyfile(db, tmp / STUDY_DB)
            written.append(tmp / STUDY_DB)
        names = [out / Path(p).name for p in written]
    say("wrote " + ", ".join(str(p) for p in names))


STUDY_DB = "study.db"


@contextmanager
def study_file(out: Path, wanted: bool):
    """--study-db: a working copy of OUT/study.db beside OUT (OUT is replaced whole when
    the results are written), seeded from the previous one; None when not wanted."""
    if not wanted:
        yield None
        return
    work = out.parent / f".{out.name}.{STUDY_DB}"
    work.parent.mkdir(parents=True, exist_ok=True)
    if (out / STUDY_DB).is_file():
        shutil.copyfile(out / STUDY_DB, work)
    try:
        yield str(work)
    finally:
        work.unlink(missing_ok=True)


def run_place_cmd(args) -> int:
    # --out is checked (and locked) before the placement and its twin runs
    with prepare(args.out, "place", inputs=input_paths(args)):
        return _place(args)


def _place(args) -> int:
    from twin.ml.export import write_placement  # lazy: ML stack off twin --help
    from twin.ml.placement import place  # lazy: ML stack off twin --help
    from twin.ml.recommender import Recommender  # lazy: ML stack off twin --help

    check_fleet_routers(args)
    profile, slo = load_profile(args.profile), parse_slo(args.slo)
    trace, catalog, window, label = _load_workload(args)
    model, base = Recommender.load(args.model), ml_base(args, profile)
    pl = place(trace, catalog, profile=profile, model=model, base=base,
               window_s=window, max_gpus=args.max_gpus, max_runs=args.max_runs,
               workers=args.workers, objective="goodput" if slo else "throughput", slo=slo)
    print(f"trace: {label}")
    print(pl.report())
    check = verify_placement_fleet(args, pl, trace, catalog, profile, base, window, slo)
    out = args.out
    with staged_dir(out, "place") as tmp:
        write_placement(tmp, pl, catalog, profile=profile,
                        model_name=_model_name(args, profile), label=label,
                        fleet_check=check)
    n = len(list(Path(out).glob("gpu-*/vllm_config.yaml")))
    print(f"wrote {out}/routing.csv, {out}/placement.json" + (f" and {n} GPU config(s) "
          "(gpu-*/vllm_config.yaml)" if n else "; no GPU config (none verified)"))
    return 0 if pl.ok and (check is None or fleet_ok(check["placement"])) else 3


def run_train_cmd(args) -> int:
    from twin.ml.pipeline import train_main  # lazy: ML stack off twin --help

    return train_main(args)

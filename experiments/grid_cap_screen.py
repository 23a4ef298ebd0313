"""Screen the capped LoRA-grid term on the real H100 runs: which cap, if any, fixes ITL below
saturation without costing saturated throughput (issue 15, README_validate "the capped grid").

vLLM's Triton LoRA kernels launch a thread block per (token block, slot) pair, the blocks of a
slot without tokens exiting early (``lora_shrink`` / ``lora_expand``). The linear term
``lora_slot_tokens`` (tokens x slots, ``GRID_TERMS``) fixed ITL below saturation but
over-charged the saturated 2048-token steps at 64-192 slots. ``lora_slot_tokens_capped``
(``min(tokens, cap) x slots``, ``CAPPED_GRID_TERMS``) charges the empty blocks only up to a
step size: in a large step they run beside the blocks doing real LoRA work and hide behind
them. ``cap`` is a module constant (``twin.costs.step_time.LORA_GRID_TOKEN_CAP``, not a fitted
coefficient: the model stays linear in its weights); this script sets it per candidate.

For each cap: refit the step-time coefficients on the ``digital_twin_modelling`` runs (a
cheaper protocol than the normal command: ``--fit-runs`` runs spread over the offered load,
``--window-s`` windows, ``--iterations``, started from ``--init``'s coefficients), then
simulate the held-out ``ml_modelling_test`` runs (``--test-runs``, spread as
``reproduce_vllm_h100.py --max-runs``) and score them as that script does. ``--cap 0`` is the
shipped profile, unchanged (the reference row).

    python experiments/grid_cap_screen.py --caps 0 256 1024

The last line printed is one JSON object: per cap, the fit's in-sample and the held-out figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import reproduce_vllm_h100 as rep  # noqa: E402  (the held-out scoring, reused)

import twin.costs.step_time as step_time  # noqa: E402
from twin.calibrate.step_fit import CAPPED_GRID_TERMS, fit_step_time  # noqa: E402
from twin.calibrate.vllm_runs import read_run_table, spread  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402
from twin.costs.step_time import StepTimeModel  # noqa: E402
from twin.ml.ties import tie_band  # noqa: E402
from twin.workload.public import shared_data_dir  # noqa: E402


def refit(profile, fit_runs, cap: int, args, log=print):
    """The profile with its step time refitted with the capped grid term at ``cap``."""
    step_time.LORA_GRID_TOKEN_CAP = cap   # read per step; forked workers inherit it
    cap_in_flight = (profile.provenance.get("client") or {}).get("max_in_flight")
    init = dict(load_profile(args.init).step_time.base if args.init else profile.step_time.base)
    # the linear grid fit's per token-slot cost is where the capped one starts (the same for
    # a step under the cap)
    init["lora_slot_tokens_capped"] = init.pop("lora_slot_tokens", args.start)
    terms = tuple(args.terms or CAPPED_GRID_TERMS)
    fit = fit_step_time(fit_runs, profile, terms=terms, window_s=args.window_s,
                        iterations=args.iterations, processes=args.processes,
                        max_in_flight=cap_in_flight, init=init, log=log)
    best = min(fit.history, key=lambda h: h["itl_smape_median"]
               + (h["throughput_smape_median_saturated"] or 0))
    prof = load_profile(args.profile)
    prof.step_time = StepTimeModel(base={k: v for k, v in fit.coef.items() if v})
    prof.provenance = dict(prof.provenance, step_time={
        "method": "experiments/grid_cap_screen.py: simulation in the loop (twin.calibrate."
                  "step_fit) of the terms below, the others held at init's; a screen, not the "
                  "normal command's protocol",
        "init": args.init or args.profile, "terms": list(terms), "lora_grid_token_cap": cap,
        "runs": len(fit_runs), "window_s": args.window_s, "iterations": len(fit.history),
        "seconds": round(fit.seconds, 1), "itl_smape_median": best["itl_smape_median"],
        "throughput_smape_median": best["throughput_smape_median"],
        "ttft_smape_median_light": best["ttft_smape_median_light"]})
    insample = {k: round(best[k], 2) if best[k] is not None else None for k in
                ("itl_smape_median", "throughput_smape_median",
                 "throughput_smape_median_saturated", "ttft_smape_median_light")}
    return prof, insample


def held_out(profile, test_runs, data: Path, processes: int) -> tuple[dict, object]:
    """``reproduce_vllm_h100.py``'s headline figures for ``profile`` on ``test_runs``, with
    the non-starved / starved split of ITL, TTFT and throughput."""
    cap = (profile.provenance.get("client") or {}).get("max_in_flight")
    sims = rep.simulate_all(test_runs, profile, cap, processes, log=lambda *a: None)
    df = rep.results_frame(test_runs, sims)
    df = rep.attach_paper_twin(df[df["twin_error"].isna()], test_runs, data)
    ours = rep.error_stats(df, "twin")
    band, _ = tie_band(profile)
    opt = rep.optimum_table(df, "twin", band)
    out = rep.twin_figures(ours, opt, band)
    for name, part in (("nonstarved", df[~df.real_starving]), ("starved", df[df.real_starving])):
        if len(part):
            s = rep.error_stats(part, "twin")
            out[name] = {"runs": int(len(part)), "throughput": round(s["throughput"][0], 2),
                         "ttft": round(s["ttft"][0], 2), "itl": round(s["itl"][0], 2)}
    return out, df


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", type=int, nargs="+", default=[0, 256, 1024],
                    help="token caps to screen; 0 = the shipped profile as it is")
    ap.add_argument("--profile", default="llama31-8b-h100-64gb",
                    help="profile to start from (memory, loads, client cap, coefficients)")
    ap.add_argument("--fit-runs", type=int, default=131, help="fit runs, spread over load")
    ap.add_argument("--window-s", type=float, default=600.0, help="fit window per run")
    ap.add_argument("--iterations", type=int, default=2, help="fit iterations")
    ap.add_argument("--init", metavar="PROFILE",
                    help="start from this profile's coefficients (its lora_slot_tokens as the "
                         "capped term's), e.g. experiments/figures/llama31-8b-h100-64gb-grid.json; "
                         "default: --profile's")
    ap.add_argument("--start", type=float, default=2e-7,
                    help="starting s per capped token-slot where --init has no grid term")
    ap.add_argument("--terms", nargs="+", metavar="TERM",
                    help="fit only these coefficients, the others held at --init's "
                         "(default: all of CAPPED_GRID_TERMS)")
    ap.add_argument("--test-runs", type=int, default=20, help="held-out runs (0: all)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--out", type=Path, help="folder for each cap's profile and per-run CSV")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data = shared_data_dir() / "vllm-h100"
    runs = read_run_table(data / "real_runs_llama31_8b.csv")
    fit_runs = spread([r for r in runs if r.extra.get("experiment_set") == rep.FIT_SET],
                      args.fit_runs)
    test_runs = [r for r in runs if r.extra.get("experiment_set") == rep.TEST_SET]
    test_runs = spread(test_runs, args.test_runs or None)
    results = {}
    for cap in args.caps:
        t1 = time.perf_counter()
        print(f"cap {cap}: {'shipped profile' if not cap else 'refit'}", flush=True)
        if cap:
            prof, insample = refit(load_profile(args.profile), fit_runs, cap, args)
        else:
            prof, insample = load_profile(args.profile), None
        res, df = held_out(prof, test_runs, data, args.processes)
        res.update(insample=insample, coef=prof.step_time.to_dict()["base"],
                   seconds=round(time.perf_counter() - t1, 1))
        results[str(cap)] = res
        print(json.dumps({cap: res}), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            df.to_csv(args.out / f"cap{cap}_runs.csv", index=False)
            if cap:
                prof.save(args.out / f"llama31-8b-h100-64gb-cap{cap}.json")
    print(json.dumps({"fit_runs": len(fit_runs), "window_s": args.window_s,
                      "iterations": args.iterations, "test_runs": len(test_runs),
                      "caps": results, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

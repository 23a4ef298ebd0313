"""Calibrate a Profile from real vLLM measurements: KV capacities, adapter load events and
``vllm bench serve`` summaries of multi-LoRA runs (``twin calibrate --from-vllm-runs``).

Three fits, each small and physically interpretable, each in its own module:

- **Memory** and **adapter loads** (:mod:`twin.calibrate.vllm_fits`): closed-form fits to
  the KV capacities vLLM reports at start-up and to its adapter load events.
- **Step time** (:mod:`twin.calibrate.step_fit`): runs only report aggregates, so the fit
  is simulation in the loop over the runs' reconstructed workloads
  (:mod:`twin.calibrate.vllm_runs`).

:func:`calibrate` puts them together into one Profile with its provenance; this module
also names the pieces' public functions, so callers need one import.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from pathlib import Path

import numpy as np
import pandas as pd

from twin.calibrate.fit_checks import fit_warnings
from twin.calibrate.frontend_fit import (MEASURED_SERIES_S, fit_metrics_series, fit_request_delay,
                                        metrics_scrape)
from twin.calibrate.run_sim import simulate_run
from twin.calibrate.step_fit import (CAPPED_GRID_TERMS, GRID_TERMS, RIDGE_TERMS, STEP_TERMS,
                                    StepFit, fit_step_time)
from twin.calibrate.vllm_fits import (fit_client_cap, fit_load_time, fit_memory,
                                      read_kv_capacity, read_load_times)
from twin.costs.profile import Profile, load_profile
from twin.costs.step_time import StepTimeModel
from twin.errors import ConfigError
from twin.results.extrapolation import fit_extent
from twin.servers import kv_capacity_tokens

__all__ = ["fit_memory", "fit_load_time", "fit_step_time", "fit_client_cap", "calibrate",
           "simulate_run", "STEP_TERMS", "GRID_TERMS", "CAPPED_GRID_TERMS", "RIDGE_TERMS", "read_kv_capacity", "read_load_times"]


def calibrate(runs, *, kv: pd.DataFrame | None = None, loads: pd.DataFrame | None = None,
              base_profile: str | Path | Profile | None = None, name: str | None = None,
              sources: dict | None = None, window_s: float = 1200.0, iterations: int = 4,
              processes: int = 2, seed: int = 0, terms=STEP_TERMS, balance: str | None = None,
              feedback: bool = False, residual_weights=(1.0, 1.0, 0.25),
              hold: dict | None = None, decode_target: str = "itl",
              metrics_series_s: float | str | None = None, request_delay: bool = False,
              log=print) -> Profile:
    """A Profile fitted to real vLLM measurements (memory, loads, step time, client cap).
    ``residual_weights`` weigh the step-time fit's ITL, throughput and TTFT residuals
    (``fit_step_time(weights=)``); ``hold`` fixes step-time coefficients outside ``terms``
    (``fit_step_time(hold=)``); ``decode_target`` picks the runs' mean ITL or TPOT as the
    decode residuals' target (``fit_step_time(decode_target=)``); ``metrics_series_s``, the
    measured cost per ``lora_requests_info`` series, turns on the frontend's metrics scrape
    at the runs' own collector rate (``frontend_fit.metrics_scrape``), ``"fit"`` fits that
    cost on the runs' ITL/TPOT (``frontend_fit.fit_metrics_series``); ``request_delay`` fits
    the frontend's per-request delay on the light runs (``frontend_fit.fit_request_delay``)."""
    t0 = time.perf_counter()
    base = base_profile if isinstance(base_profile, Profile) else load_profile(
        base_profile or "llama31-8b-h100-64gb-first-principles")
    prov = {"method": "twin calibrate --from-vllm-runs (twin.calibrate.vllm)",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_profile": base.name, "fitted": True, "sources": sources or {}}
    prof = _fit_memory_and_loads(base, kv, loads, name, prov, log)
    cap = fit_client_cap(runs)
    if cap:
        prov["client"] = cap
        log(f"client: at most {cap['max_in_flight']} requests in flight (from {cap['runs']} "
            "overloaded runs)")
    usable = _startable(runs, prof)
    log(f"step time: simulation in the loop on {len(usable)} runs, {window_s:.0f} s windows, "
        f"{processes} process(es)")
    fit = fit_step_time(usable, prof, terms=terms, window_s=window_s, iterations=iterations,
                        processes=processes, seed=seed,
                        max_in_flight=cap["max_in_flight"] if cap else None,
                        weights=residual_weights, balance=balance, feedback=feedback,
                        hold=hold, decode_target=decode_target, log=log)
    prof.step_time = StepTimeModel(base={k: v for k, v in fit.coef.items() if v})
    prov["step_time"] = _step_provenance(fit, terms, usable, window_s, seed, decode_target)
    for w in prov["step_time"].get("warnings", ()):
        log(f"warning: step time: {w}")
    # the batches it was fitted on: a run past them says so (twin.results.extrapolation)
    prov["step_time"]["extent"] = fit_extent((r.config, r.n_adapters) for r in usable)
    if balance:
        prov["step_time"]["weights"] = ("each measured regime alike" if balance == "regime"
                                         else "each (max_loras, regime) cell alike")
    prov["step_time"]["residual_weights"] = dict(zip(("itl", "throughput", "ttft"),
                                                     map(float, residual_weights)))
    if feedback:
        prov["step_time"]["feedback"] = "ITL residuals scaled by each run's measured gain"
    if hold:
        prov["step_time"]["held"] = {k: float(v) for k, v in hold.items()}
    if metrics_series_s is not None:
        fitted = metrics_series_s == "fit"
        scrape, prov["frontend"] = metrics_scrape(runs, MEASURED_SERIES_S if fitted
                                                  else metrics_series_s)
        prof.frontend = dataclasses.replace(prof.frontend,
                                            metrics_scrape_hz=scrape.metrics_scrape_hz,
                                            metrics_series_s=scrape.metrics_series_s)
        if fitted:
            prof.frontend, prov["frontend"]["series_cost"] = fit_metrics_series(
                usable, prof, processes=processes, seed=seed)
            prov["frontend"]["metrics_series_s"] = prof.frontend.metrics_series_s
        log(f"frontend: /metrics scraped {scrape.metrics_scrape_hz:.3f}/s (median of "
            f"{prov['frontend']['runs']} runs), {1e6 * prof.frontend.metrics_series_s:.2f} us "
            f"per series ({'fitted on the runs that keep up' if fitted else 'as given'})")
    if request_delay:
        try:
            prof.frontend, prov.setdefault("frontend", {})["request"] = fit_request_delay(
                usable, prof, processes=processes, seed=seed, window_s=window_s)
            log(f"frontend: {1e3 * prof.frontend.request_s:.1f} ms per request outside the "
                f"engine (median of {prov['frontend']['request']['runs']} light runs)")
        except ValueError as exc:   # no light run: the delay stays as the base profile's
            prov.setdefault("frontend", {})["request"] = {"not_fitted": str(exc)}
            log(f"warning: per-request delay not fitted: {exc}")
    prov["seconds"] = round(time.perf_counter() - t0, 1)
    return prof


def _fit_memory_and_loads(base: Profile, kv, loads, name, prov: dict, log) -> Profile:
    """``base`` with the memory and load-time models fitted to the tables given (the base
    profile's where a table is not), each fit's report added to ``prov``."""
    memory, load_time = base.memory, base.load_time
    if kv is not None:
        memory, prov["memory"] = fit_memory(kv, base.memory)
        log(f"memory: KV capacity within {100 * prov['memory']['kv_tokens_rel_error_max']:.2f}% "
            f"on {prov['memory']['rows_with_kv_tokens']} probes (weights "
            f"{memory.weights_gib:.2f} GiB, {memory.lora_bytes_per_slot_rank / 2**20:.2f} MiB "
            f"per slot-rank, {memory.lora_bytes_per_slot / 2**20:.2f} MiB per slot, "
            f"activations {memory.activation_gib:.2f} GiB)")
    if loads is not None:
        load_time, prov["load_time"] = fit_load_time(loads, base.model)
        log(f"loads: activation {1e3 * load_time.host_to_gpu_s:.2f} ms + "
            f"{1e3 * load_time.host_to_gpu_s_per_byte * 2**20:.4f} ms/MiB, disk "
            f"{1e3 * load_time.disk_s:.1f} ms + {1e3 * load_time.disk_s_per_byte * 2**20:.3f} ms/MiB")
    return Profile(name=name or base.name.replace("-first-principles", ""),
                   hardware=base.hardware, model=base.model, memory=memory,
                   step_time=base.step_time, load_time=load_time, provenance=prov,
                   frontend=base.frontend)


def _startable(runs, prof: Profile) -> list:
    """The runs the memory model says can start (the others are dropped from the step fit:
    vLLM would refuse their configuration under this memory model)."""
    usable = []
    for r in runs:
        try:
            kv_capacity_tokens(r.config, prof)
            usable.append(r)
        except ConfigError:
            pass
    return usable


def _step_provenance(fit: StepFit, terms, runs, window_s: float, seed: int,
                     decode_target: str = "itl") -> dict:
    """What the step-time fit did and how well it fits, at its best iteration (the
    ``itl_*`` figures are of the decode target: mean TPOT where it is ``"tpot"``), and
    what it warns of (:func:`twin.calibrate.fit_checks.fit_warnings`)."""
    target = f"mean {decode_target.upper()}"
    last = min(fit.history, key=lambda h: h["score"])
    warned = fit_warnings(runs, len(terms), fit.history, best=fit.history.index(last))
    log_ratio = np.log(fit.residuals.twin_itl_ms / fit.residuals.real_itl_ms)
    return {
        "method": "simulation in the loop: twin runs of each fit run's reconstructed workload "
                  f"({window_s:.0f} s windows), surrogate Gauss-Newton on log-errors of {target}, "
                  "saturated throughput and light-load TTFT, non-negative coefficients",
        "decode_target": target,
        "terms": list(terms), "runs": len(runs), "window_s": window_s, "seed": seed,
        "iterations": len(fit.history), "seconds": round(fit.seconds, 1),
        "itl_smape_median": last["itl_smape_median"], "itl_smape_max": last["itl_smape_max"],
        "throughput_smape_median": last["throughput_smape_median"],
        "ttft_smape_median_light": last["ttft_smape_median_light"],
        "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()
                     if k != "coef"} for h in fit.history],
        "residuals_log_ratio_itl": {
            "median": float(np.median(log_ratio)),
            "p10": float(np.quantile(log_ratio, 0.1)),
            "p90": float(np.quantile(log_ratio, 0.9))},
        **({"warnings": warned} if warned else {}),
    }

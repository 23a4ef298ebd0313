"""Fit the frontend's first-request delay (``frontend.first_lora_request_s``) to real runs,
and read the runs' ``/metrics`` scrape rate (``frontend.metrics_scrape_hz``).

The runs report only the mean, median and p99 TTFT. A delay ``d`` paid by each adapter's
first request adds ``share x d`` to a run's mean TTFT (``share``: the adapters served over
the requests completed) and leaves its median alone; the p99 shows it only when
``share`` > 1%, which no ``digital_twin_modelling`` run without a queue reaches (all are at
0.03% or 0.47%). So the fit reads the mean: on light runs (no queue, few running) the
part of the real mean's excess over the median that the twin without the delay does not
have, per first request::

    d_run = ((real mean - real median) - (twin mean - twin median)) / share

and ``d`` is the median over the runs (>= 0). The twin's own excess (prompt lengths,
arrivals that meet a busy step) is subtracted, so what is left is what the twin lacks; at
0.47% a 1-ms error in that difference is ~0.2 s of ``d``: a rough estimate, whose spread
over the runs the report gives.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from twin.calibrate.run_weights import regime
from twin.calibrate.run_sim import map_jobs, simulate_run
from twin.costs.frontend import Frontend
from twin.costs.profile import Profile


def light_runs(runs, max_running: float = 6.0) -> list:
    """The runs without a queue (``num_waiting_mean`` < 1) and below ``max_running``
    running on average, that report mean and median TTFT and completed requests (> 0)."""
    out = []
    for r in runs:
        m = r.metrics
        need = ("mean_ttft_ms", "median_ttft_ms", "completed", "num_running_mean",
                "num_waiting_mean")
        if not all(k in m and math.isfinite(m[k]) for k in need):
            continue
        if (regime(m["num_waiting_mean"]) == "light" and m["num_running_mean"] < max_running
                and m["completed"] > 0):
            out.append(r)
    return out


def _job(args):
    spec, profile, seed, window_s = args
    return simulate_run(spec, profile, seed=seed, window_s=window_s)


def fit_first_lora_request(runs, profile: Profile, *, max_running: float = 6.0,
                           processes: int = 2, seed: int = 0) -> tuple[Frontend, dict]:
    """The delay fitted on ``runs``' light runs (see the module), with ``profile``'s step
    and load times, its own delay set to 0. Returns the frontend and a report (runs used,
    per-run estimates, their median and quartiles)."""
    light = light_runs(runs, max_running)
    if not light:
        raise ValueError(f"no run without a queue and below {max_running} running: "
                         "nothing to fit the first-request delay on")
    base = dataclasses.replace(profile, frontend=Frontend())
    sims = map_jobs(_job, [(r, base, seed, None) for r in light], processes)
    per_run = []
    for r, s in zip(light, sims):
        if "error" in s:
            continue
        m = r.metrics
        share = r.n_adapters / m["completed"]
        real = m["mean_ttft_ms"] - m["median_ttft_ms"]
        twin = s["mean_ttft_ms"] - s["median_ttft_ms"]
        if not math.isfinite(twin):   # the twin finished nothing: no estimate
            continue
        per_run.append({"key": r.key, "share": share, "real_excess_ms": real,
                        "twin_excess_ms": twin, "delay_s": (real - twin) / 1e3 / share})
    if not per_run:
        raise ValueError(f"no light run has an estimate (of {len(light)}: the twin failed "
                         "or finished nothing): nothing to fit the first-request delay on")
    d = np.array([p["delay_s"] for p in per_run])
    fitted = max(0.0, float(np.median(d)))
    report = {"method": "median over light runs of (real - twin) mean-over-median TTFT "
                        "excess / first-request share (twin.calibrate.frontend_fit)",
              "runs": len(per_run), "max_running": max_running,
              "first_lora_request_s": round(fitted, 4),
              "quartiles_s": [round(float(q), 4) for q in np.quantile(d, [0.25, 0.75])],
              "per_run": per_run}
    return Frontend(first_lora_request_s=round(fitted, 4)), report


def metrics_scrape(runs, series_s: float) -> tuple[Frontend, dict]:
    """The frontend's metrics scrape as the runs' own collectors made it: the rate the median
    of ``ts_samples / ts_span_s`` (samples of vLLM's gauges the collector took, over the
    seconds they span), each scrape rendering ``lora_requests_info`` at ``series_s`` seconds
    per series (measured: ``experiments/metrics_render_cost.py``; :func:`fit_metrics_series`
    fits it). Returns the frontend (its first-request delay 0) and a report."""
    if not series_s > 0:
        raise ValueError(f"series_s must be > 0 seconds per series, got {series_s!r}")
    rates = [float(r.extra["ts_samples"]) / float(r.extra["ts_span_s"]) for r in runs
             if float(r.extra.get("ts_span_s", 0) or 0) > 0
             and float(r.extra.get("ts_samples", 0) or 0) > 0]
    if not rates:
        raise ValueError("no run reports its metrics samples (ts_samples, ts_span_s): "
                         "nothing to read the scrape rate from")
    hz = round(float(np.median(rates)), 4)
    report = {"method": "median over the runs of ts_samples / ts_span_s (the collector's "
                        "scrapes of /metrics)",
              "series_cost": "measured (experiments/metrics_render_cost.py), not fitted",
              "runs": len(rates), "metrics_scrape_hz": hz, "metrics_series_s": series_s,
              "quartiles_hz": [round(float(q), 4) for q in np.quantile(rates, [0.25, 0.75])]}
    return Frontend(metrics_scrape_hz=hz, metrics_series_s=series_s), report


def fit_request_delay(runs, profile: Profile, *, max_running: float = 6.0,
                      processes: int = 2, seed: int = 0, window_s: float | None = None
                      ) -> tuple[Frontend, dict]:
    """``profile``'s frontend with its per-request delay (``request_s``) fitted on ``runs``'
    light runs: the median over them of the real median TTFT minus the twin's (>= 0). At no
    queue and few running a request's TTFT is its own prefill step and the rest of a step
    in flight, which the step-time fit prices; what the real median has beyond that is the
    time outside the engine (HTTP, tokenization, the hops to and from the engine core). The
    median TTFT, not the mean: the mean carries each adapter's first request
    (``first_lora_request_s``). Returns the frontend and a report."""
    light = light_runs(runs, max_running)
    if not light:
        raise ValueError(f"no run without a queue and below {max_running} running: "
                         "nothing to fit the per-request delay on")
    base = dataclasses.replace(profile, frontend=dataclasses.replace(profile.frontend,
                                                                     request_s=0.0))
    sims = map_jobs(_job, [(r, base, seed, window_s) for r in light], processes)
    per_run = [{"key": r.key, "real_median_ms": r.metrics["median_ttft_ms"],
                "twin_median_ms": s["median_ttft_ms"]}
               for r, s in zip(light, sims)
               if "error" not in s and math.isfinite(s["median_ttft_ms"])]
    if not per_run:
        raise ValueError(f"no light run has an estimate (of {len(light)}: the twin failed "
                         "or finished nothing): nothing to fit the per-request delay on")
    d = np.array([p["real_median_ms"] - p["twin_median_ms"] for p in per_run]) / 1e3
    fitted = round(max(0.0, float(np.median(d))), 5)
    report = {"method": "median over light runs of real - twin median TTFT "
                        "(twin.calibrate.frontend_fit.fit_request_delay)",
              "runs": len(per_run), "max_running": max_running, "request_s": fitted,
              "quartiles_s": [round(float(q), 5) for q in np.quantile(d, [0.25, 0.75])]}
    return dataclasses.replace(profile.frontend, request_s=fitted), report


#: seconds per ``lora_requests_info`` series of a scrape, as measured on this project's box
#: (``experiments/metrics_render_cost.py``)
MEASURED_SERIES_S = 22e-6
#: the grid of seconds per series :func:`fit_metrics_series` searches (0 to 60 µs)
SERIES_GRID_S = np.round(np.arange(0, 241) * 0.25e-6, 12)


def fit_metrics_series(runs, profile: Profile, *, processes: int = 2, seed: int = 0
                       ) -> tuple[Frontend, dict]:
    """``profile``'s frontend with the scrape's cost per ``lora_requests_info`` series
    (``metrics_series_s``) fitted on ``runs``' runs that keep up, at the scrape rate it has.

    The stall merges tokens into chunks, so it shows in mean ITL over mean TPOT and in
    nothing the engine decides: each run that keeps up is simulated once, whole, with no
    scrape (its engine ITL, TPOT and series count), and the cost is the one on
    :data:`SERIES_GRID_S` whose ITL/TPOT (:meth:`Frontend.itl_scale`) is nearest the run's
    real one, median over the runs of |log(twin ratio / real ratio)|. A cost measured on
    another CPU (``experiments/metrics_render_cost.py``: 22 µs per series on this project's
    box) need not be the serving host's; the runs' own ratio is."""
    hz = profile.frontend.metrics_scrape_hz
    if not hz > 0:
        raise ValueError("the series cost is fitted at a scrape rate: the profile has none "
                         "(metrics_scrape_hz; read it from the runs first)")
    need = ("mean_itl_ms", "mean_tpot_ms", "total_throughput")
    keep = [r for r in runs if all(math.isfinite(r.metrics.get(k, math.nan)) for k in need)
            and r.metrics["total_throughput"] >= 0.9 * r.offered_tps]
    if not keep:
        raise ValueError("no run that keeps up reports mean ITL and TPOT: nothing to fit "
                         "the metrics scrape's cost per series on")
    off = dataclasses.replace(profile, frontend=dataclasses.replace(
        profile.frontend, metrics_series_s=0.0))
    sims = map_jobs(_job, [(r, off, seed, None) for r in keep], processes)
    rows = [(r.metrics["mean_itl_ms"] / r.metrics["mean_tpot_ms"], s["mean_itl_ms"],
             s["mean_tpot_ms"], s.get("lora_running_sets", 0), s["window_s"])
            for r, s in zip(keep, sims)
            if "error" not in s and s.get("mean_tpot_ms", 0) > 0 and s.get("mean_itl_ms", 0) > 0]
    if not rows:
        raise ValueError(f"the twin finished nothing in the {len(keep)} runs that keep up: "
                         "nothing to fit the metrics scrape's cost per series on")
    real, itl, tpot, sets, dur = (np.array(c, dtype=float) for c in zip(*rows))

    def loss(series_s: float) -> float:
        f = dataclasses.replace(profile.frontend, metrics_series_s=series_s)
        scale = [f.itl_scale(int(n), d, i / 1e3) for n, d, i in zip(sets, dur, itl)]
        return float(np.median(np.abs(np.log(itl * np.array(scale) / tpot / real))))

    losses = [loss(s) for s in SERIES_GRID_S]
    best = float(SERIES_GRID_S[int(np.argmin(losses))])
    report = {"method": "grid search of metrics_series_s: median over the runs that keep up "
                        "of |log(twin ITL/TPOT / real ITL/TPOT)| "
                        "(twin.calibrate.frontend_fit.fit_metrics_series)",
              "runs": len(rows), "metrics_series_s": best,
              "loss_pct": round(100 * min(losses), 2),
              "loss_pct_without_scrape": round(100 * losses[0], 2)}
    return dataclasses.replace(profile.frontend, metrics_series_s=best), report

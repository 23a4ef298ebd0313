"""The step-time fit of a vLLM calibration: simulation in the loop.

Runs only report aggregates (mean ITL, TTFT, throughput), so the twin simulates every fit
run with the current coefficients while summing the step features the engine prices
(:class:`twin.calibrate.run_sim._RecordingStepTime`); with the batch compositions held fixed, mean ITL is linear
in the coefficients and the time per token of a saturated run too, so a small bounded
least-squares problem on log-errors gives the next coefficients; re-simulate and repeat
until the compositions settle (a Gauss–Newton step on a surrogate, a few iterations). The
model is linear in a handful of terms: fixed per-step cost, per decode sequence, per
prefill token, per attended KV token, per distinct adapter in the batch, per adapter slot
(``max_loras``), per padded LoRA rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from twin.calibrate.run_sim import FEATURE_INDEX, map_jobs, sim_job
from twin.calibrate.run_weights import cell_weights, regime, weighted_median
from twin.calibrate.step_terms import (CAPPED_GRID_TERMS, GRID_TERMS, RIDGE_TERMS,
                                      STEP_TERMS, TERM_STARTS, check_terms)
from twin.costs.profile import Profile
from twin.errors import ConfigError, TwinInputError
from twin.results import smape

__all__ = ["CAPPED_GRID_TERMS", "GRID_TERMS", "RIDGE_TERMS", "STEP_TERMS", "StepFit",
           "fit_step_time", "itl_gains"]

# -- step time: simulation in the loop --------------------------------------------------------

@dataclass
class StepFit:
    coef: dict
    history: list = field(default_factory=list)
    residuals: pd.DataFrame | None = None
    seconds: float = 0.0


def _initial_coef(profile: Profile, runs=()) -> dict:
    """Starting coefficients: a direct non-negative regression of the runs' mean ITL on
    their mean batch (``num_running_mean``) and an estimate of the distinct adapters in it
    (min(max_loras, served, running)), over runs without a waiting queue; the prefill,
    KV-read and slot terms start from the first-principles rates of ``profile``."""
    from scipy.optimize import nnls   # lazy: scipy.optimize takes ~0.5 s to import

    m = profile.model
    coef = {"const": 0.012, "decode_tokens": 5e-5, "prefill_tokens": 4e-5,
            "decode_context": 0.25 * float(m.kv_bytes_per_token) / 1.6e12, "adapters": 3e-4,
            "lora_slots": 1e-5, "lora_token_rank": 1e-7}
    rows, y = [], []
    for r in runs:
        met = r.metrics
        if regime(met.get("num_waiting_mean", 1.0)) == "light" and "num_running_mean" in met:
            n = met["num_running_mean"]
            u = min(r.config.max_loras, r.config.max_cpu_loras, n)
            rows.append([1.0, n, u])
            y.append(met["mean_itl_ms"] / 1e3)
    if len(rows) >= 5:
        x, _ = nnls(np.array(rows), np.array(y))
        if x[0] > 0:
            # the running-request slope also pays for the prefill of the arriving requests
            # (~prompt/output tokens per decode step per request): split it
            coef.update(const=float(x[0]), decode_tokens=float(max(x[1] * 0.5, 1e-6)),
                        prefill_tokens=float(max(x[1] * 0.5, 1e-6)),
                        adapters=float(max(x[2], 1e-6)))
    return coef


def start_coef(profile: Profile, runs, terms, init: dict | None = None) -> dict:
    """The fit's starting coefficients: ``init``, or the initial regression's
    (:func:`_initial_coef`); a term neither sets starts at ``TERM_STARTS`` (else 0)."""
    coef = dict(init or _initial_coef(profile, runs))
    for k in terms:
        members = k.split("+")
        if len(members) > 1:   # one coefficient shared: start all at their mean
            coef.update(dict.fromkeys(members, float(np.mean([coef.get(m, 0.0)
                                                               for m in members]))))
        else:
            coef.setdefault(k, TERM_STARTS.get(k, 0.0))
    return coef


def _held(terms, hold: dict | None) -> dict:
    """``hold`` checked: values >= 0 for coefficients not among ``terms`` (checked too)."""
    fitted = {m for k in check_terms(terms) for m in k.split("+")}
    if set(hold or ()) & fitted or any(not v >= 0 for v in (hold or {}).values()):
        raise ConfigError(f"held coefficients must be >= 0 and not among the fitted terms "
                          f"{sorted(fitted)}; got {hold}")
    return dict(hold or {})


def _checked_options(terms, hold, weights, balance, decode_target) -> tuple[dict, tuple]:
    """``fit_step_time``'s options checked before any work: the held coefficients
    (:func:`_held`, which checks the terms too) and the residual weights as floats."""
    if decode_target not in ("itl", "tpot"):
        raise ConfigError(f"decode_target must be 'itl' or 'tpot', got {decode_target!r}")
    if balance not in (None, "regime", "slots"):
        raise ConfigError(f"balance must be 'regime' or 'slots', got {balance!r}")
    weights = tuple(float(v) for v in weights)
    if len(weights) != 3 or min(weights) < 0 or not any(weights):
        raise ConfigError("weights must be three non-negative numbers (ITL, throughput, "
                          f"TTFT), not all zero; got {weights}")
    return _held(terms, hold), weights


def _columns(rec: np.ndarray, terms) -> np.ndarray:
    """A run's recorded feature sums per term; a tied term (``a+b``) sums its features."""
    return np.array([sum(rec[FEATURE_INDEX[m]] for m in k.split("+")) for k in terms])


def _theta(coef: dict, terms) -> np.ndarray:
    """The coefficients of ``terms`` (a tied term's members share one)."""
    return np.array([coef[k.split("+")[0]] for k in terms])


def fit_step_time(runs, profile: Profile, *, terms=STEP_TERMS, window_s: float = 1200.0,
                  iterations: int = 4, processes: int = 2, seed: int = 0,
                  max_in_flight: int | None = None, init: dict | None = None,
                  hold: dict | None = None,
                  weights=(1.0, 1.0, 0.25), balance: str | None = None, feedback: bool = False,
                  decode_target: str = "itl", log=print, tol: float = 0.01) -> StepFit:
    """Fit the linear step-time coefficients ``terms`` to runs' mean ITL, throughput and
    TTFT by simulation in the loop (see the module docstring).

    Each iteration simulates every run for ``window_s`` seconds with the current
    coefficients, then solves a bounded (non-negative) least-squares problem on the
    surrogate log-errors: ITL scales as (g·θ')/(g·θ) with g the decode-weighted mean step
    features; throughput of runs the twin finds saturated as (h·θ)/(h·θ') with h the mean
    features per step; light-load TTFT as the prefill-weighted features. ``weights`` weigh
    ITL, throughput and TTFT. The coefficients of the best-scoring iteration are returned.

    ``balance`` (``"regime"`` or ``"slots"``) weighs every measured regime, or every
    (``max_loras``, regime) cell, of the runs alike (:func:`cell_weights`), where the plain
    fit weighs every run alike: a run grid that is mostly overloaded runs otherwise sets the
    LoRA costs from saturated steps alone.

    ``feedback`` lets the surrogate know that a run's batch answers its step cost: a run that
    keeps up holds ``arrival rate x output x ITL`` requests, so a dearer step means a larger
    batch and dearer steps again, and its mean ITL moves several times the step cost near
    the knee (:func:`itl_gains`). With it the ITL residuals scale the surrogate's change by
    each run's gain measured between the last two rounds, instead of assuming the batch
    stays put.

    ``hold`` fixes coefficients that are not among ``terms`` at given values (e.g. the KV
    read per attended token at the hardware's bytes per second, where the runs' contexts are
    too short to pin it).

    ``decode_target`` ``"tpot"`` fits the decode residuals to the runs' mean TPOT (each
    request's decode time over its tokens) instead of their mean ITL (``vllm bench
    serve``'s gaps between streamed chunks, which run 6-13% above TPOT where several tokens
    reach the client in one chunk; the twin streams every token).
    """
    held, weights = _checked_options(terms, hold, weights, balance, decode_target)
    t_start = time.perf_counter()
    coef = {**start_coef(profile, runs, terms, init), **held}
    real = _Measured.of(runs, decode_target)
    w = cell_weights(runs, by_slots=balance == "slots") if balance else np.ones(len(runs))
    history = []
    best = None
    prev = None
    gain = np.ones(len(runs))
    for it in range(iterations + 1):
        t0 = time.perf_counter()
        rnd = _simulate_round(runs, profile, coef, seed=seed, window_s=window_s,
                              max_in_flight=max_in_flight, processes=processes,
                              decode_key=f"mean_{decode_target}_ms")
        score, entry = _score(rnd, real, it, coef, w)
        history.append(dict(entry, seconds=time.perf_counter() - t0))
        log(f"  iteration {it}: {decode_target.upper()} SMAPE median "
            f"{entry['itl_smape_median']:.1f}% (max "
            f"{entry['itl_smape_max']:.0f}%), throughput median "
            f"{entry['throughput_smape_median']:.1f}% (saturated "
            f"{entry['throughput_smape_median_saturated'] or 0:.1f}%), light TTFT median "
            f"{entry['ttft_smape_median_light'] or 0:.1f}%  [{time.perf_counter() - t0:.0f} s]")
        if best is None or score < best[0]:
            best = (score, dict(coef), rnd.sims)
        if it == iterations:
            break
        if feedback and prev is not None:
            gain = itl_gains(prev[0], prev[1], rnd, coef, terms, gain)
        prev = (rnd, coef)
        coef, change = _surrogate_step(coef, terms, rnd, real, weights, w,
                                       gain if feedback else None)
        if change < tol:
            log(f"  converged (largest coefficient change {100 * change:.2f}%)")
            break
    _, coef_best, sims = best
    resid_df = pd.DataFrame({
        "key": [r.key for r in runs],
        "real_itl_ms": real.itl, "twin_itl_ms": [s["mean_itl_ms"] for s in sims],
        "real_throughput": real.thr, "twin_throughput": [s["total_throughput"] for s in sims],
        "real_ttft_ms": real.ttft, "twin_ttft_ms": [s["mean_ttft_ms"] for s in sims]})
    return StepFit(coef=coef_best, history=history, residuals=resid_df,
                   seconds=time.perf_counter() - t_start)


@dataclass
class _Measured:
    """The runs' measured means the fit aims at."""

    itl: np.ndarray
    thr: np.ndarray
    ttft: np.ndarray

    @classmethod
    def of(cls, runs, decode_target: str = "itl") -> _Measured:
        return cls(itl=np.array([r.metrics[f"mean_{decode_target}_ms"] for r in runs]),
                   thr=np.array([r.metrics["total_throughput"] for r in runs]),
                   ttft=np.array([r.metrics["mean_ttft_ms"] for r in runs]))


@dataclass
class _Round:
    """Every run simulated once at the same coefficients: the twin's means, which runs it
    finds saturated, which are light (no queue, not saturated), the recorded features."""

    sims: list
    itl: np.ndarray
    thr: np.ndarray
    ttft: np.ndarray
    sat: np.ndarray
    light: np.ndarray


def _simulate_round(runs, profile: Profile, coef: dict, *, seed: int, window_s: float,
                    max_in_flight: int | None, processes: int,
                    decode_key: str = "mean_itl_ms") -> _Round:
    jobs = [(r, profile, coef, seed, window_s, max_in_flight) for r in runs]
    sims = map_jobs(sim_job, jobs, processes)
    bad = [s for s in sims if "error" in s]
    if bad:
        raise TwinInputError(f"{len(bad)} fit run(s) cannot start under the fitted memory "
                             f"model, e.g. {bad[0]['key']}: {bad[0]['error']}")
    sat = np.array([s["achieved_over_offered"] < 0.97 for s in sims])
    light = np.array([regime(r.metrics.get("num_waiting_mean", 0.0)) == "light"
                      for r in runs]) & ~sat
    return _Round(sims=sims, itl=np.array([s[decode_key] for s in sims]),
                  thr=np.array([s["total_throughput"] for s in sims]),
                  ttft=np.array([s["mean_ttft_ms"] for s in sims]), sat=sat, light=light)


def _score(rnd: _Round, real: _Measured, it: int, coef: dict,
           w: np.ndarray) -> tuple[float, dict]:
    """The round's score ((weighted) median ITL SMAPE plus that of saturated throughput;
    lower is better) and its history entry."""
    e_itl = smape(rnd.itl, real.itl, percent=True)
    e_thr = smape(rnd.thr, real.thr, percent=True)
    sat, light = rnd.sat, rnd.light
    e_ttft = smape(rnd.ttft[light], real.ttft[light], percent=True)
    score = weighted_median(e_itl, w) + (weighted_median(e_thr[sat], w[sat]) if sat.any() else 0.0)
    return score, {"iteration": it, "score": score, "coef": dict(coef),
                   "itl_smape_median": float(np.median(e_itl)),
                   "itl_smape_max": float(e_itl.max()),
                   "throughput_smape_median": float(np.median(e_thr)),
                   "throughput_smape_median_saturated":
                       float(np.median(e_thr[sat])) if sat.any() else None,
                   "ttft_smape_median_light": float(np.median(e_ttft)) if light.any() else None}


def itl_gains(rnd0: _Round, coef0: dict, rnd1: _Round, coef1: dict, terms,
              last: np.ndarray, lo: float = 1.0, hi: float = 8.0) -> np.ndarray:
    """Per run, how many times the change of its step cost its mean ITL moved between two
    rounds: log(ITL1/ITL0) over the log change round 0's batches predict (g0·θ1 / g0·θ0),
    clipped to [lo, hi]; runs whose predicted change is under 1% keep their ``last``
    gain."""
    th0, th1 = _theta(coef0, terms), _theta(coef1, terms)
    G0 = np.array([_columns(s["rec_dec"], terms) / max(s["rec_ndec"], 1.0) for s in rnd0.sims])
    static = np.log(np.maximum(G0 @ th1, 1e-12) / np.maximum(G0 @ th0, 1e-12))
    actual = np.log(np.maximum(rnd1.itl, 1e-9) / np.maximum(rnd0.itl, 1e-9))
    ok = np.abs(static) > 0.01
    out = last.copy()
    out[ok] = np.clip(actual[ok] / static[ok], lo, hi)
    return out


def _surrogate_step(coef: dict, terms, rnd: _Round, real: _Measured,
                    weights, run_w: np.ndarray,
                    gain: np.ndarray | None = None) -> tuple[dict, float]:
    """The next coefficients from the surrogate problem at the round's batch compositions
    (moved at most x3 per coefficient), and the largest relative change. ``run_w`` weighs
    the runs (:func:`cell_weights`); ``gain`` scales each run's predicted ITL change
    (:func:`itl_gains`; None: the batch held fixed)."""
    from scipy.optimize import least_squares   # lazy: scipy.optimize takes ~0.5 s to import

    sims, sat, light = rnd.sims, rnd.sat, rnd.light
    theta0 = _theta(coef, terms)
    G = np.array([_columns(s["rec_dec"], terms) / max(s["rec_ndec"], 1.0) for s in sims])
    H = np.array([_columns(s["rec_all"], terms) / max(s["rec_steps"], 1) for s in sims])
    P = np.array([_columns(s["rec_pre"], terms) / max(s["rec_npre"], 1.0) for s in sims])
    scale = np.where(theta0 > 0, theta0, 1e-6)
    wi, wt, wf = weights
    sw = np.sqrt(run_w)

    def resid(z):
        th = z * scale
        ratio = np.maximum(G @ th, 1e-9) / np.maximum(G @ theta0, 1e-9)
        r_itl = (np.log(ratio * rnd.itl / real.itl) if gain is None
                 else gain * np.log(ratio) + np.log(rnd.itl / real.itl))
        r_thr = np.log(np.maximum(H[sat] @ theta0, 1e-9) / np.maximum(H[sat] @ th, 1e-9)
                       * rnd.thr[sat] / real.thr[sat])
        r_ttft = np.log(np.maximum(P[light] @ th, 1e-9) / np.maximum(P[light] @ theta0, 1e-9)
                        * np.maximum(rnd.ttft[light], 1e-3) / real.ttft[light])
        return np.concatenate([wi * sw * r_itl, wt * sw[sat] * r_thr, wf * sw[light] * r_ttft,
                               [1e-3 * np.log1p(z.sum())]])
    z0 = np.ones(len(terms))
    sol = least_squares(resid, z0, bounds=(0.0, np.inf), loss="soft_l1", f_scale=0.1)
    new = sol.x * scale
    # damp: move at most x3 per iteration per coefficient
    new = np.clip(new, theta0 / 3.0, np.maximum(theta0 * 3.0, 1e-7))
    change = float(np.max(np.abs(new - theta0) / np.maximum(theta0, 1e-9)))
    return {**coef, **{m: float(v) for k, v in zip(terms, new) for m in k.split("+")}}, change

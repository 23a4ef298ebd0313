"""Few-run calibration: a first-principles prior in hardware terms + k real runs of the
user's own model (``vllm bench serve`` results or run-table rows), k as small as 1-5.

Seven free step-time coefficients cannot be fitted from three runs; four multipliers of the
prior can. The hardware terms (``twin.costs.hardware.HW_TERMS``) are grouped (``GROUPS``):
software overheads (per step, per layer), memory traffic (weights, KV, adapters,
activations), compute (dense, attention, LoRA FLOPs) and the LoRA kernels' per-call costs;
each group's coefficients are scaled by ``exp(u_g)``. Since the step time is linear in the
hardware coefficients, the step-time coefficients are ``sum_g exp(u_g) c_g`` with ``c_g`` the
prior's contribution of group g (``twin.costs.hardware.coefficients``).

The fit is the simulation-in-the-loop surrogate of ``twin.calibrate.vllm.fit_step_time``:
simulate each run with the current coefficients (recording the batches' features), then
solve for ``u`` on the log-errors of mean ITL (decode-weighted features), throughput of runs
the twin finds saturated (features per step) and mean TTFT (prefill-weighted), plus a
Gaussian prior ``u_g ~ N(0, sigma^2)`` that holds the groups the runs do not inform; repeat.
"""

from __future__ import annotations

import math
import time

import numpy as np

from twin.calibrate.run_weights import regime
from twin.calibrate.run_sim import map_jobs, sim_job
from twin.costs.hardware import HW_TERMS, coefficients
from twin.costs.step_time import FEATURES
from twin.errors import TwinInputError
from twin.results import smape

GROUPS = {
    "overhead": ("step_s", "layer_s", "decode_seq_layer_s", "prefill_seq_layer_s",
                 "sample_s_per_vocab", "idle_s", "allreduce_call_s"),
    "memory": ("weight_s_per_byte", "kv_s_per_byte", "adapter_s_per_byte", "act_s_per_byte",
               "idle_s_per_byte", "allreduce_s_per_byte"),
    "compute": ("dense_s_per_flop", "attn_s_per_flop", "lora_s_per_flop", "gemm_scale"),
    "lora": ("adapter_call_s", "slot_call_s", "lora_call_s"),
}
assert sorted(t for g in GROUPS.values() for t in g) == sorted(HW_TERMS)


def group_coefficients(hw: dict, shape, tp: int = 1) -> np.ndarray:
    """(groups x FEATURES): each group's share of the step-time coefficients."""
    out = np.zeros((len(GROUPS), len(FEATURES)))
    for g, terms in enumerate(GROUPS.values()):
        c = coefficients({k: hw.get(k, 0.0) for k in terms}, shape, tp)
        out[g] = [c.get(k, 0.0) for k in FEATURES]
    return out


def scaled(hw: dict, u) -> dict:
    """``hw`` with each group's terms multiplied by ``exp(u_g)``."""
    out = dict(hw)
    for ug, terms in zip(u, GROUPS.values()):
        for k in terms:
            if k in out:
                out[k] = out[k] * math.exp(float(ug))
    return out


def pick_runs(runs, k: int, seed: int = 0):
    """The first ``k`` of a seeded permutation of ``runs`` (nested: k runs ⊂ k+1 runs)."""
    order = np.random.default_rng(seed).permutation(len(runs))
    return [runs[i] for i in order[:k]]


def fit_fewrun(runs, profile, hw0: dict, *, iterations: int = 3, sigma: float = 1.0,
               noise: float = 0.1, min_multiplier: dict | None = None,
               window_s: float = 1200.0, max_in_flight: int | None = None, seed: int = 0,
               processes: int = 2, weights=(1.0, 1.0, 0.5), tp: int = 1, log=print) -> dict:
    """Fit the group multipliers of the prior ``hw0`` to ``runs`` (RunSpecs of the model in
    ``profile``). ``sigma``: the prior's spread of each log multiplier; ``noise``: a run's
    typical log-error (run-to-run variation and the twin's own), which weighs the data
    against the prior. ``min_multiplier``: a floor per group, e.g. ``{"memory": 0.8}`` when
    the prior's bandwidth is 80% of the datasheet peak (no fit may read weights faster than
    the peak: without it a few saturated runs trade weight bytes for FLOPs freely). Returns
    ``{"hardware": fitted coefficients, "u": {group: log multiplier}, "history": [...],
    "kept": the iteration whose u it is (the lowest median ITL + throughput SMAPE)}``; the
    step-time model is ``step_time_model(hardware, shape)``."""
    from scipy.optimize import least_squares  # lazy: off twin.calibrate's import path

    shape = profile.model
    C = group_coefficients(hw0, shape, tp)              # groups x features
    real = {m: np.array([r.metrics[m] for r in runs], float)
            for m in ("mean_itl_ms", "total_throughput", "mean_ttft_ms")}
    u = np.zeros(len(GROUPS))
    lo = np.array([math.log((min_multiplier or {}).get(g, 1e-2)) for g in GROUPS])
    history = []
    t0 = time.perf_counter()
    for it in range(iterations + 1):
        coef = {k: float(v) for k, v in zip(FEATURES, np.exp(u) @ C)}
        coef["const"] = max(coef["const"], 1e-9)
        sims = map_jobs(sim_job, [(r, profile, coef, seed, window_s, max_in_flight) for r in runs],
                    processes)
        bad = [s for s in sims if "error" in s]
        if bad:
            raise TwinInputError(f"run {bad[0]['key']} cannot start under the profile's memory "
                                 f"model: {bad[0]['error']}")
        itl = np.array([s["mean_itl_ms"] for s in sims])
        thr = np.array([s["total_throughput"] for s in sims])
        ttft = np.array([s["mean_ttft_ms"] for s in sims])
        history.append({"iteration": it, "u": u.round(4).tolist(),
                        "itl_smape_median": float(np.median(smape(itl, real["mean_itl_ms"], percent=True))),
                        "throughput_smape_median": float(np.median(smape(thr, real["total_throughput"], percent=True))),
                        "ttft_smape_median": float(np.median(smape(ttft, real["mean_ttft_ms"], percent=True)))})
        log(f"  few-run iteration {it}: ITL {history[-1]['itl_smape_median']:.1f}%, throughput "
            f"{history[-1]['throughput_smape_median']:.1f}%, TTFT "
            f"{history[-1]['ttft_smape_median']:.1f}% (fit runs) [{time.perf_counter() - t0:.0f} s]")
        if it == iterations:
            break
        G = np.array([s["rec_dec"] / max(s["rec_ndec"], 1.0) for s in sims]) @ C.T
        H = np.array([s["rec_all"] / max(s["rec_steps"], 1) for s in sims]) @ C.T
        P = np.array([s["rec_pre"] / max(s["rec_npre"], 1.0) for s in sims]) @ C.T
        sat = np.array([s["achieved_over_offered"] < 0.97 for s in sims])
        # TTFT only where the run keeps up (a queue's TTFT depends on the window, not the step)
        has_ttft = (np.isfinite(ttft) & (ttft > 0) & ~sat
                    & np.array([regime(r.metrics.get("num_waiting_mean", 0.0)) == "light"
                                for r in runs]))
        v0 = np.exp(u)
        wi, wt, wf = weights

        def resid(z):
            v = np.exp(z)
            r_itl = np.log(np.maximum(G @ v, 1e-12) / np.maximum(G @ v0, 1e-12)
                           * itl / real["mean_itl_ms"])
            r_thr = np.log(np.maximum(H[sat] @ v0, 1e-12) / np.maximum(H[sat] @ v, 1e-12)
                           * thr[sat] / real["total_throughput"][sat])
            r_ttft = np.log(np.maximum(P[has_ttft] @ v, 1e-12) / np.maximum(P[has_ttft] @ v0, 1e-12)
                            * ttft[has_ttft] / real["mean_ttft_ms"][has_ttft])
            data = np.concatenate([wi * r_itl, wt * r_thr, wf * r_ttft]) / noise
            return np.concatenate([data, z / sigma])

        sol = least_squares(resid, u, bounds=(lo, np.inf), loss="soft_l1", f_scale=2.0)
        u = np.maximum(np.clip(sol.x, u - 1.0, u + 1.0), lo)   # damped: at most x e per iteration
    best = min(history, key=lambda h: h["itl_smape_median"] + h["throughput_smape_median"])
    u_best = np.array(best["u"])
    return {"hardware": scaled(hw0, u_best), "u": dict(zip(GROUPS, u_best.tolist())),
            "history": history, "kept": best["iteration"], "runs": [r.key for r in runs],
            "seconds": round(time.perf_counter() - t0, 1)}

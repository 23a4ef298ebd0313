"""One measured run through the twin: its workload reconstructed from what the run reports
(:func:`twin.calibrate.reconstruct.reconstruct`), simulated under a profile, its summary
metrics, and with ``record`` the sums of the step features the engine priced
(:class:`_RecordingStepTime`): what a calibration's simulation in the loop
(:mod:`twin.calibrate.step_fit`, :mod:`twin.calibrate.fewrun`,
:mod:`twin.calibrate.frontend_fit`) re-runs each iteration, in parallel
(:func:`map_jobs`).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time

import numpy as np

from twin.calibrate.reconstruct import reconstruct
from twin.costs.profile import Profile
from twin.costs.step_time import FEATURES, StepTimeModel
from twin.errors import ConfigError
from twin.results import main_limit
from twin.sim.engine import simulate


#: a step feature's position in ``FEATURES``
FEATURE_INDEX = {k: i for i, k in enumerate(FEATURES)}


class _RecordingStepTime(StepTimeModel):
    """The step-time model, also summing the features of the steps the engine commits.

    The engine prices a single step with ``__call__`` and a run of pure-decode steps with
    ``decode_run`` (possibly re-priced with fewer steps when an arrival or the window cuts
    the run; ``steps_within`` probes lengths). The last direct ``decode_run`` for a plan is
    the one committed, so it is held as pending until the next step is priced.
    """

    def start_recording(self):
        n = len(FEATURES)
        self.rec_all = np.zeros(n)       # sum of features over steps
        self.rec_dec = np.zeros(n)       # sum of decode_n x features (ITL weighting)
        self.rec_pre = np.zeros(n)       # sum of prefill_tokens x features (TTFT weighting)
        self.rec_ndec = 0.0
        self.rec_npre = 0.0
        self.rec_steps = 0
        self._pending = None
        self._probing = False

    def _commit(self, f, ctx_step, k):
        v = np.asarray(f, float) * k
        v[FEATURE_INDEX["decode_context"]] += ctx_step * k * (k - 1) / 2.0
        self.rec_all += v
        d = f[FEATURE_INDEX["decode_tokens"]]
        if d:
            self.rec_dec += d * v
            self.rec_ndec += d * k
        p = f[FEATURE_INDEX["prefill_tokens"]]
        if p:
            self.rec_pre += p * v
            self.rec_npre += p * k
        self.rec_steps += k

    def flush(self):
        if self._pending is not None:
            self._commit(*self._pending)
            self._pending = None

    def __call__(self, f):
        if not self._probing:
            self.flush()
            self._commit(f, 0, 1)
        return super().__call__(f)

    def decode_run(self, f0, ctx_step, k):
        if not self._probing:
            if self._pending is not None and self._pending[0] is not f0:
                self.flush()
            self._pending = (f0, ctx_step, k)
        return super().decode_run(f0, ctx_step, k)

    def steps_within(self, f0, ctx_step, k_max, horizon):
        self._probing = True
        try:
            return super().steps_within(f0, ctx_step, k_max, horizon)
        finally:
            self._probing = False


def _profile_with(profile: Profile, coef: dict, recording: bool) -> Profile:
    cls = _RecordingStepTime if recording else StepTimeModel
    st = cls(base={k: v for k, v in coef.items() if v})
    if recording:
        st.start_recording()
    return Profile(name=profile.name, hardware=profile.hardware, model=profile.model,
                   memory=profile.memory, step_time=st, load_time=profile.load_time,
                   provenance=profile.provenance, frontend=profile.frontend)


def simulate_run(spec, profile: Profile, *, seed: int = 0, window_s: float | None = None,
                 max_in_flight: int | None = None, record: bool = False) -> dict:
    """Simulate one run's reconstructed workload: its summary metrics (and the recorded
    step-feature sums with ``record``); a config vLLM refuses comes back as ``{"error": msg}``.
    A run shorter than ``window_s`` (default: its whole seconds) runs as it ran, to the end."""
    short = window_s is not None and spec.duration_s < window_s   # a 60-s vllm bench run
    window = float(spec.duration_s if short else window_s or math.floor(spec.duration_s))
    trace, catalog = reconstruct(spec, seed=seed, window_s=window)
    kw = {"max_in_flight": max_in_flight} if max_in_flight else {}
    t0 = time.perf_counter()
    try:
        res = simulate(trace, spec.config, profile, catalog, window_s=None if short else window,
                       **kw)
    except ConfigError as exc:
        return {"key": spec.key, "error": str(exc)}
    s = res.summary
    out = {"key": spec.key, "total_throughput": s["total_throughput"],
           "offered": s["offered_total_throughput"],
           "achieved_over_offered": s["achieved_over_offered"],
           "mean_ttft_ms": s["ttft_ms"]["mean"], "mean_itl_ms": s["itl_ms"]["mean"],
           "mean_tpot_ms": s["tpot_ms"]["mean"], "median_ttft_ms": s["ttft_ms"]["median"],
           "p99_ttft_ms": s["ttft_ms"]["p99"],
           "starving": s["starving"], "completed": s["completed"],
           "rejected": s.get("rejected", 0), "preemptions": s["preemptions"],
           "kv_usage_mean": s["kv_cache"]["usage_mean"],
           "num_running_mean": float(res.timeline["running"].mean()),
           "num_waiting_mean": float(res.timeline["waiting"].mean()),
           "load_time_s": s["adapter_loads"]["time_s"], "window_s": window,
           "lora_running_sets": s.get("lora_running_sets", 0),
           "held_by": main_limit(s.get("waiting_held_by")) or "",
           "sim_wall_s": time.perf_counter() - t0, "n_requests": len(trace)}
    st = profile.step_time
    if record and isinstance(st, _RecordingStepTime):
        st.flush()
        out.update(rec_all=st.rec_all.copy(), rec_dec=st.rec_dec.copy(),
                   rec_pre=st.rec_pre.copy(), rec_ndec=st.rec_ndec, rec_npre=st.rec_npre,
                   rec_steps=st.rec_steps)
    return out


def sim_job(args):
    """One run under ``coef`` with its step features recorded (a pool's task:
    ``(spec, profile, coef, seed, window, max_in_flight)``)."""
    spec, profile, coef, seed, window, cap = args
    prof = _profile_with(profile, coef, recording=True)
    return simulate_run(spec, prof, seed=seed, window_s=window, max_in_flight=cap, record=True)


def map_jobs(fn, jobs, processes: int):
    """``fn`` over ``jobs`` (tuples whose first item is a RunSpec) in ``processes`` forked
    workers, the busiest runs first; results in the jobs' order."""
    if processes <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    # longest jobs first keeps both workers busy to the end
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].aggregate_rate)
    with ctx.Pool(processes) as pool:
        res = pool.map(fn, [jobs[i] for i in order], chunksize=1)
    out = [None] * len(jobs)
    for i, r in zip(order, res):
        out[i] = r
    return out

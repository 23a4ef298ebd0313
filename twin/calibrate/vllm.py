"""Calibrate a Profile from real vLLM measurements: KV capacities, adapter load events and
``vllm bench serve`` summaries of multi-LoRA runs.

Three fits, each small and physically interpretable:

- **Memory** (:func:`fit_memory`): the KV capacity vLLM reports at start-up is
  ``util·gpu_mem − weights − max_loras·(max_lora_rank·a + b) − activations``; with the
  "Model loading took X GiB" line (= weights + LoRA buffers) the four unknowns (weights,
  bytes per slot-rank ``a``, bytes per slot ``b``, activation constant) follow by linear
  least squares.
- **Adapter loads** (:func:`fit_load_time`): disk→host and host→GPU times, each affine in
  the adapter's bytes, by a robust (soft-L1) fit that ignores the first-load outliers.
- **Step time** (:func:`fit_step_time`): runs only report aggregates (mean ITL, TTFT,
  throughput), so the fit is *simulation in the loop*: simulate every fit run with the
  current coefficients while summing the step features the engine prices; with the batch
  compositions held fixed, mean ITL is linear in the coefficients and the time per token of
  a saturated run too, so a small bounded least-squares problem on log-errors gives the next
  coefficients; re-simulate and repeat until the compositions settle (a Gauss–Newton step on
  a surrogate, a few iterations). The model is linear in a handful of terms:
  fixed per-step cost, per decode sequence, per prefill token, per attended KV token, per
  distinct adapter in the batch, per adapter slot (``max_loras``), per padded LoRA rank.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.costs.load_time import LoadTimeModel
from twin.costs.memory import GIB, MemoryModel
from twin.costs.profile import Profile, load_profile
from twin.costs.step_time import FEATURES, StepTimeModel
from twin.results import smape

__all__ = ["fit_memory", "fit_load_time", "fit_step_time", "fit_client_cap", "calibrate",
           "simulate_run", "STEP_TERMS", "read_kv_capacity", "read_load_times"]

# -- helpers ---------------------------------------------------------------------------------


def _read_csv(path, need, what: str) -> pd.DataFrame:
    file = str(path)
    if not Path(path).exists():
        raise TwinInputError(f"{what} file not found", file=file)
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise TwinInputError(f"cannot be read as CSV: {exc}", file=file) from exc
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise TwinInputError(f"missing column(s) {missing}; a {what} table needs {list(need)}",
                             file=file, field=missing[0])
    return df


def _column(df, col, file, rows=None, *, positive=False) -> np.ndarray:
    v = pd.to_numeric(df[col], errors="coerce").to_numpy(float)
    check = np.ones(len(df), bool) if rows is None else rows
    bad = check & (~np.isfinite(v) | ((v <= 0) if positive else (v < 0)))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TwinInputError(f"expected a {'positive' if positive else 'non-negative'} number, "
                             f"got {df[col].iloc[row]!r}", file=file, row=row, field=col)
    return v


# -- memory ----------------------------------------------------------------------------------

KV_COLUMNS = ("max_loras", "max_lora_rank", "kv_cache_tokens")


def read_kv_capacity(path) -> pd.DataFrame:
    """KV-capacity probes: ``max_loras``, ``max_lora_rank``, ``kv_cache_tokens`` (empty when
    vLLM failed before reporting), optional ``model_loading_gib`` and
    ``gpu_memory_utilization``."""
    df = _read_csv(path, KV_COLUMNS, "KV-capacity")
    file = str(path)
    _column(df, "max_loras", file, positive=True)
    _column(df, "max_lora_rank", file, positive=True)
    tok = pd.to_numeric(df["kv_cache_tokens"], errors="coerce")
    bad = df["kv_cache_tokens"].notna() & (tok.isna() | (tok < 0))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise TwinInputError(f"expected a token count, got {df['kv_cache_tokens'].iloc[row]!r}",
                             file=file, row=row, field="kv_cache_tokens")
    if not tok.notna().any():
        raise TwinInputError("no row reports a KV capacity", file=file, field="kv_cache_tokens")
    df = df.copy()
    df["kv_cache_tokens"] = tok
    df.attrs["source"] = file
    return df


def fit_memory(kv: pd.DataFrame, base: MemoryModel, *, max_num_seqs: int = 2048,
               max_num_batched_tokens: int = 2048, block_size: int = 16,
               default_util: float = 0.9) -> tuple[MemoryModel, dict]:
    """Fit weights, LoRA bytes per slot-rank and per slot, and the activation constant.

    A probe reporting KV tokens gives ``fixed + L·r·a + L·b = util·gpu − kv_tokens·kv_bytes
    − act(seqs, tokens)`` with ``fixed`` = weights + activation constant; (fixed, a, b) come
    from least squares on *relative* KV-token errors (small capacities count as much as
    large ones). The "Model loading took X GiB" values (= weights + LoRA buffers) then split
    ``fixed`` into weights (median of ``loading − L·(r·a + b)``) and activations; without
    them the base profile's weights are kept. The per-sequence and per-token activation
    slopes are kept from ``base`` (the probes share one max_num_seqs and
    max_num_batched_tokens, so only their sum is identified).
    """
    util = (pd.to_numeric(kv["gpu_memory_utilization"], errors="coerce").fillna(default_util)
            .to_numpy(float) if "gpu_memory_utilization" in kv else np.full(len(kv), default_util))
    L = kv["max_loras"].to_numpy(float)
    r = kv["max_lora_rank"].to_numpy(float)
    tok = kv["kv_cache_tokens"].to_numpy(float)
    act_var = base.activation_bytes_per_seq * max_num_seqs + \
        base.activation_bytes_per_token * max_num_batched_tokens
    has_kv = np.isfinite(tok) & (tok > 0)
    if has_kv.sum() < 3:
        raise TwinInputError("need at least 3 probes with a KV capacity to fit the memory "
                             "model", file=kv.attrs.get("source"), field="kv_cache_tokens")
    A = np.c_[np.ones(has_kv.sum()), L[has_kv] * r[has_kv], L[has_kv]]
    y = (util[has_kv] * base.gpu_memory_gib * GIB - tok[has_kv] * base.kv_bytes_per_token
         - act_var) / GIB
    w = 1.0 / tok[has_kv]
    w = w / w.mean()
    (fixed_gib, a_gib, b_gib), *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
    n_loading = 0
    weights_gib = base.weights_gib
    if "model_loading_gib" in kv:
        ml = pd.to_numeric(kv["model_loading_gib"], errors="coerce").to_numpy(float)
        ok = np.isfinite(ml)
        n_loading = int(ok.sum())
        if n_loading:
            weights_gib = float(np.median(ml[ok] - L[ok] * (r[ok] * a_gib + b_gib)))
    act_gib = float(fixed_gib - weights_gib)
    kind = ["loading"] * n_loading
    mem = MemoryModel(gpu_memory_gib=base.gpu_memory_gib, weights_gib=weights_gib,
                      kv_bytes_per_token=base.kv_bytes_per_token,
                      lora_bytes_per_slot_rank=float(a_gib) * GIB,
                      lora_bytes_per_slot=float(b_gib) * GIB, activation_gib=act_gib,
                      activation_bytes_per_seq=base.activation_bytes_per_seq,
                      activation_bytes_per_token=base.activation_bytes_per_token)
    # residuals in the user's terms: KV tokens as vLLM would report them
    from twin.config import ServingConfig

    pred = []
    for i in range(len(kv)):
        cfg = ServingConfig(max_loras=int(L[i]), max_lora_rank=int(r[i]),
                            max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens,
                            gpu_memory_utilization=float(util[i]), block_size=block_size)
        pred.append(mem.kv_tokens(cfg) if mem.available_bytes(cfg) > 0 else 0)
    pred = np.array(pred, float)
    rel = np.abs(pred[has_kv] - tok[has_kv]) / tok[has_kv]
    report = {
        "data": kv.attrs.get("source", "kv table"), "rows": int(len(kv)),
        "rows_with_kv_tokens": int(has_kv.sum()),
        "rows_with_model_loading": int(kind.count("loading")),
        "method": "least squares on relative KV-token errors; weights from the median of "
                  "model loading minus LoRA buffers",
        "kv_tokens_rel_error_max": float(rel.max()),
        "kv_tokens_rel_error_median": float(np.median(rel)),
        "kv_tokens_abs_error_max": float(np.abs(pred[has_kv] - tok[has_kv]).max()),
        "assumed_probe_max_num_seqs": max_num_seqs,
        "assumed_probe_max_num_batched_tokens": max_num_batched_tokens,
        "rows_without_kv_predicted_tokens": {
            f"{int(L[i])}x{int(r[i])}": int(pred[i]) for i in np.flatnonzero(~has_kv)},
    }
    return mem, report


# -- adapter load times ----------------------------------------------------------------------

LOAD_COLUMNS = ("adapter_rank", "event", "duration_ms")
DISK_EVENT, ACTIVATE_EVENT = "load_disk_to_cpu", "activate_cpu_to_gpu_slot"


def read_load_times(path) -> pd.DataFrame:
    """Load events: ``adapter_rank``, ``event`` (``load_disk_to_cpu`` or
    ``activate_cpu_to_gpu_slot``), ``duration_ms``; optional ``phase``, ``max_lora_rank``."""
    df = _read_csv(path, LOAD_COLUMNS, "adapter load-time")
    file = str(path)
    _column(df, "adapter_rank", file, positive=True)
    _column(df, "duration_ms", file)
    ev = df["event"].astype(str)
    bad = ~ev.isin([DISK_EVENT, ACTIVATE_EVENT])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise TwinInputError(f"unknown event {df['event'].iloc[row]!r}; expected "
                             f"{DISK_EVENT!r} or {ACTIVATE_EVENT!r}", file=file, row=row,
                             field="event")
    for e in (DISK_EVENT, ACTIVATE_EVENT):
        if not (ev == e).any():
            raise TwinInputError(f"no {e!r} events", file=file, field="event")
    df = df.copy()
    df.attrs["source"] = file
    return df


def _robust_affine(x: np.ndarray, y: np.ndarray, scale: float) -> tuple[float, float, dict]:
    """y ≈ c + s·x, c, s >= 0, with a soft-L1 loss (outliers beyond ~``scale`` count
    linearly)."""
    from scipy.optimize import least_squares

    xs = x / x.max()
    c0, s0 = np.median(y), 0.0
    res = least_squares(lambda p: p[0] + p[1] * xs - y, [c0, s0], loss="soft_l1",
                        f_scale=scale, bounds=([0.0, 0.0], [np.inf, np.inf]))
    c, s = float(res.x[0]), float(res.x[1] / x.max())
    resid = y - (c + s * x)
    return c, s, {"median_abs_residual": float(np.median(np.abs(resid))),
                  "events": int(len(y)), "outliers_gt_3_scale": int((np.abs(resid) > 3 * scale).sum())}


def fit_load_time(loads: pd.DataFrame, model) -> tuple[LoadTimeModel, dict]:
    """Disk→host and host→GPU times, each affine in the adapter's bytes (robust fit).

    Activations are taken from the in-benchmark events (``phase == benchmark_request``) when
    the table says so: those are the ones paid inside a step.
    """
    nbytes = loads["adapter_rank"].astype(int).map(model.adapter_bytes).to_numpy(float)
    ms = loads["duration_ms"].to_numpy(float)
    ev = loads["event"].astype(str).to_numpy()
    disk = ev == DISK_EVENT
    act = ev == ACTIVATE_EVENT
    if "phase" in loads and (loads["phase"] == "benchmark_request").any():
        act &= (loads["phase"] == "benchmark_request").to_numpy()
    dc, ds, drep = _robust_affine(nbytes[disk], ms[disk], scale=5.0)
    ac, as_, arep = _robust_affine(nbytes[act], ms[act], scale=0.5)
    lt = LoadTimeModel(disk_s=max(dc, 0.0) / 1e3, disk_s_per_byte=max(ds, 0.0) / 1e3,
                       host_to_gpu_s=max(ac, 0.0) / 1e3, host_to_gpu_s_per_byte=max(as_, 0.0) / 1e3)
    by = pd.DataFrame({"rank": loads["adapter_rank"].astype(int), "ms": ms, "ev": ev})
    groups = {f"{e}/rank{k}": round(float(g["ms"].median()), 3)
              for (e, k), g in by[disk | act].groupby(["ev", "rank"])}
    pad = {}
    if "max_lora_rank" in loads:
        a = loads[act].assign(padded=lambda d: d["max_lora_rank"] > d["adapter_rank"])
        pad = {str(k): round(float(v), 3) for k, v in a.groupby("padded")["duration_ms"].median().items()}
    report = {"data": loads.attrs.get("source", "load table"), "rows": int(len(loads)),
              "method": "soft-L1 robust affine fit in adapter bytes (scipy least_squares)",
              "disk": drep, "activation": arep, "median_ms_by_event_rank": groups,
              "activation_median_ms_by_padding": pad,
              "note": "activations of adapters padded to a larger max_lora_rank take ~1.4 ms "
                      "longer (padding, not bytes); the affine model averages over it"}
    return lt, report


# -- client cap ------------------------------------------------------------------------------

def fit_client_cap(runs, *, saturated_waiting: float = 10000.0,
                   saturated_in_flight: float = 12000.0) -> dict | None:
    """Requests in flight (running + waiting) a ``vllm bench serve`` client sustains before
    new connections fail (ephemeral ports run out near 28k open connections on Linux).

    Estimated as the median time-averaged ``num_waiting + num_running`` over heavily
    overloaded runs (waiting queue above ``saturated_waiting`` at some point and above
    ``saturated_in_flight`` in flight on average); None when fewer than 3 runs are that
    overloaded (then the client is assumed unbounded).
    """
    heavy = [r.metrics["num_waiting_mean"] + r.metrics.get("num_running_mean", 0.0)
             for r in runs if r.metrics.get("num_waiting_max", 0) > saturated_waiting
             and "num_waiting_mean" in r.metrics]
    heavy = [v for v in heavy if v > saturated_in_flight]
    if len(heavy) < 3:
        return None
    return {"max_in_flight": int(round(float(np.median(heavy)))), "runs": len(heavy),
            "method": "median of time-averaged num_waiting + num_running over runs whose "
                      f"waiting queue exceeded {int(saturated_waiting)} and whose mean in "
                      f"flight exceeded {int(saturated_in_flight)}"}


# -- step time: simulation in the loop --------------------------------------------------------

#: Coefficients fitted (s per unit of the feature). Each is a physical cost: fixed per-step
#: overhead (scheduler, sampler, kernel launches, weight read), per decode sequence, per
#: prefill token (dense FLOPs), per attended KV token (KV read), per distinct adapter in the
#: batch, per adapter slot (the LoRA kernel grid spans max_loras), per padded LoRA
#: rank·token.
STEP_TERMS = ("const", "decode_tokens", "prefill_tokens", "decode_context", "adapters",
              "lora_slots", "lora_token_rank")
_IDX = {k: i for i, k in enumerate(FEATURES)}


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
        v[_IDX["decode_context"]] += ctx_step * k * (k - 1) / 2.0
        self.rec_all += v
        d = f[_IDX["decode_tokens"]]
        if d:
            self.rec_dec += d * v
            self.rec_ndec += d * k
        p = f[_IDX["prefill_tokens"]]
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
                   provenance=profile.provenance)


def simulate_run(spec, profile: Profile, *, seed: int = 0, window_s: float | None = None,
                 max_in_flight: int | None = None, record: bool = False) -> dict:
    """Simulate one run's reconstructed workload; returns the summary metrics (and the
    recorded step-feature sums with ``record``). Errors (e.g. a config vLLM refuses) come
    back as ``{"error": message}``."""
    from twin.errors import ConfigError
    from twin.calibrate.vllm_runs import reconstruct
    from twin.sim.engine import simulate

    window = float(window_s if window_s is not None else math.floor(spec.duration_s))
    trace, catalog = reconstruct(spec, seed=seed, window_s=window)
    kw = {"max_in_flight": max_in_flight} if max_in_flight else {}
    t0 = time.perf_counter()
    try:
        res = simulate(trace, spec.config, profile, catalog, window_s=window, **kw)
    except ConfigError as exc:
        return {"key": spec.key, "error": str(exc)}
    s = res.summary
    out = {"key": spec.key, "total_throughput": s["total_throughput"],
           "offered": s["offered_total_throughput"],
           "achieved_over_offered": s["achieved_over_offered"],
           "mean_ttft_ms": s["ttft_ms"]["mean"], "mean_itl_ms": s["itl_ms"]["mean"],
           "mean_tpot_ms": s["tpot_ms"]["mean"], "median_ttft_ms": s["ttft_ms"]["median"],
           "starving": s["starving"], "completed": s["completed"],
           "rejected": s.get("rejected", 0), "preemptions": s["preemptions"],
           "kv_usage_mean": s["kv_cache"]["usage_mean"],
           "num_running_mean": float(res.timeline["running"].mean()),
           "num_waiting_mean": float(res.timeline["waiting"].mean()),
           "load_time_s": s["adapter_loads"]["time_s"], "window_s": window,
           "sim_wall_s": time.perf_counter() - t0, "n_requests": len(trace)}
    st = profile.step_time
    if record and isinstance(st, _RecordingStepTime):
        st.flush()
        out.update(rec_all=st.rec_all.copy(), rec_dec=st.rec_dec.copy(),
                   rec_pre=st.rec_pre.copy(), rec_ndec=st.rec_ndec, rec_npre=st.rec_npre,
                   rec_steps=st.rec_steps)
    return out


def _sim_job(args):
    spec, profile, coef, seed, window, cap = args
    prof = _profile_with(profile, coef, recording=True)
    return simulate_run(spec, prof, seed=seed, window_s=window, max_in_flight=cap, record=True)


def _map(fn, jobs, processes: int):
    if processes <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp

    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    # longest jobs first keeps both workers busy to the end
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].aggregate_rate)
    with ctx.Pool(processes) as pool:
        res = pool.map(fn, [jobs[i] for i in order], chunksize=1)
    out = [None] * len(jobs)
    for i, r in zip(order, res):
        out[i] = r
    return out


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
    from scipy.optimize import nnls

    m = profile.model
    coef = {"const": 0.012, "decode_tokens": 5e-5, "prefill_tokens": 4e-5,
            "decode_context": 0.25 * float(m.kv_bytes_per_token) / 1.6e12, "adapters": 3e-4,
            "lora_slots": 1e-5, "lora_token_rank": 1e-7}
    rows, y = [], []
    for r in runs:
        met = r.metrics
        if met.get("num_waiting_mean", 1.0) < 1.0 and "num_running_mean" in met:
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


def fit_step_time(runs, profile: Profile, *, terms=STEP_TERMS, window_s: float = 1200.0,
                  iterations: int = 4, processes: int = 2, seed: int = 0,
                  max_in_flight: int | None = None, init: dict | None = None,
                  weights=(1.0, 1.0, 0.25), log=print, tol: float = 0.01) -> StepFit:
    """Fit the linear step-time coefficients ``terms`` to runs' mean ITL, throughput and
    TTFT by simulation in the loop (see the module docstring).

    Each iteration simulates every run for ``window_s`` seconds with the current
    coefficients, then solves a bounded (non-negative) least-squares problem on the
    surrogate log-errors: ITL scales as (g·θ')/(g·θ) with g the decode-weighted mean step
    features; throughput of runs the twin finds saturated as (h·θ)/(h·θ') with h the mean
    features per step; light-load TTFT as the prefill-weighted features. ``weights`` weigh
    ITL, throughput and TTFT.
    """
    from scipy.optimize import least_squares

    t_start = time.perf_counter()
    coef = dict(init or _initial_coef(profile, runs))
    for k in terms:
        coef.setdefault(k, 0.0)
    idx = np.array([_IDX[k] for k in terms])
    real_itl = np.array([r.metrics["mean_itl_ms"] for r in runs])
    real_thr = np.array([r.metrics["total_throughput"] for r in runs])
    real_ttft = np.array([r.metrics["mean_ttft_ms"] for r in runs])
    history = []
    best = None
    for it in range(iterations + 1):
        t0 = time.perf_counter()
        jobs = [(r, profile, coef, seed, window_s, max_in_flight) for r in runs]
        sims = _map(_sim_job, jobs, processes)
        bad = [s for s in sims if "error" in s]
        if bad:
            raise TwinInputError(f"{len(bad)} fit run(s) cannot start under the fitted memory "
                                 f"model, e.g. {bad[0]['key']}: {bad[0]['error']}")
        itl = np.array([s["mean_itl_ms"] for s in sims])
        thr = np.array([s["total_throughput"] for s in sims])
        ttft = np.array([s["mean_ttft_ms"] for s in sims])
        e_itl, e_thr = smape(itl, real_itl, percent=True), smape(thr, real_thr, percent=True)
        sat = np.array([s["achieved_over_offered"] < 0.97 for s in sims])
        light = np.array([(r.metrics.get("num_waiting_mean", 0) < 1.0) for r in runs]) & ~sat
        e_ttft = smape(ttft[light], real_ttft[light], percent=True)
        score = float(np.median(e_itl) + np.median(e_thr[sat]) if sat.any() else np.median(e_itl))
        history.append({"iteration": it, "coef": dict(coef), "itl_smape_median": float(np.median(e_itl)),
                        "itl_smape_max": float(e_itl.max()),
                        "throughput_smape_median": float(np.median(e_thr)),
                        "throughput_smape_median_saturated": float(np.median(e_thr[sat])) if sat.any() else None,
                        "ttft_smape_median_light": float(np.median(e_ttft)) if light.any() else None,
                        "seconds": time.perf_counter() - t0})
        log(f"  iteration {it}: ITL SMAPE median {np.median(e_itl):.1f}% (max {e_itl.max():.0f}%), "
            f"throughput median {np.median(e_thr):.1f}% (saturated {history[-1]['throughput_smape_median_saturated'] or 0:.1f}%), "
            f"light TTFT median {history[-1]['ttft_smape_median_light'] or 0:.1f}%  [{time.perf_counter() - t0:.0f} s]")
        if best is None or score < best[0]:
            best = (score, dict(coef), sims)
        if it == iterations:
            break
        # surrogate problem at the current batch compositions
        theta0 = np.array([coef[k] for k in terms])
        G = np.array([s["rec_dec"][idx] / max(s["rec_ndec"], 1.0) for s in sims])
        H = np.array([s["rec_all"][idx] / max(s["rec_steps"], 1) for s in sims])
        P = np.array([s["rec_pre"][idx] / max(s["rec_npre"], 1.0) for s in sims])
        scale = np.where(theta0 > 0, theta0, 1e-6)
        wi, wt, wf = weights

        def resid(z):
            th = z * scale
            r_itl = np.log(np.maximum(G @ th, 1e-9) / np.maximum(G @ theta0, 1e-9) * itl / real_itl)
            r_thr = np.log(np.maximum(H[sat] @ theta0, 1e-9) / np.maximum(H[sat] @ th, 1e-9)
                           * thr[sat] / real_thr[sat])
            r_ttft = np.log(np.maximum(P[light] @ th, 1e-9) / np.maximum(P[light] @ theta0, 1e-9)
                            * np.maximum(ttft[light], 1e-3) / real_ttft[light])
            return np.concatenate([wi * r_itl, wt * r_thr, wf * r_ttft,
                                   [1e-3 * np.log1p(z.sum())]])
        z0 = np.ones(len(terms))
        sol = least_squares(resid, z0, bounds=(0.0, np.inf), loss="soft_l1", f_scale=0.1)
        new = sol.x * scale
        # damp: move at most x3 per iteration per coefficient
        new = np.clip(new, theta0 / 3.0, np.maximum(theta0 * 3.0, 1e-7))
        change = float(np.max(np.abs(new - theta0) / np.maximum(theta0, 1e-9)))
        coef = {**coef, **{k: float(v) for k, v in zip(terms, new)}}
        if change < tol:
            log(f"  converged (largest coefficient change {100 * change:.2f}%)")
            break
    _, coef_best, sims = best
    resid_df = pd.DataFrame({
        "key": [r.key for r in runs],
        "real_itl_ms": real_itl, "twin_itl_ms": [s["mean_itl_ms"] for s in sims],
        "real_throughput": real_thr, "twin_throughput": [s["total_throughput"] for s in sims],
        "real_ttft_ms": real_ttft, "twin_ttft_ms": [s["mean_ttft_ms"] for s in sims]})
    return StepFit(coef=coef_best, history=history, residuals=resid_df,
                   seconds=time.perf_counter() - t_start)


# -- the whole calibration -------------------------------------------------------------------

def calibrate(runs, *, kv: pd.DataFrame | None = None, loads: pd.DataFrame | None = None,
              base_profile: str | Path | Profile | None = None, name: str | None = None,
              sources: dict | None = None, window_s: float = 1200.0, iterations: int = 4,
              processes: int = 2, seed: int = 0, terms=STEP_TERMS, log=print) -> Profile:
    """A Profile fitted to real vLLM measurements (memory, loads, step time, client cap)."""
    t0 = time.perf_counter()
    base = base_profile if isinstance(base_profile, Profile) else load_profile(
        base_profile or "llama31-8b-h100-64gb-first-principles")
    prov = {"method": "twin calibrate --from-vllm-runs (twin.calibrate.vllm)",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_profile": base.name, "fitted": True, "sources": sources or {}}
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
    prof = Profile(name=name or base.name.replace("-first-principles", ""), hardware=base.hardware,
                   model=base.model, memory=memory, step_time=base.step_time,
                   load_time=load_time, provenance=prov)
    cap = fit_client_cap(runs)
    if cap:
        prov["client"] = cap
        log(f"client: at most {cap['max_in_flight']} requests in flight (from {cap['runs']} "
            "overloaded runs)")
    # runs the memory model says cannot start are dropped from the step fit
    from twin.servers import kv_capacity_tokens
    from twin.errors import ConfigError

    usable = []
    for r in runs:
        try:
            kv_capacity_tokens(r.config, prof)
            usable.append(r)
        except ConfigError:
            pass
    log(f"step time: simulation in the loop on {len(usable)} runs, {window_s:.0f} s windows, "
        f"{processes} process(es)")
    fit = fit_step_time(usable, prof, terms=terms, window_s=window_s, iterations=iterations,
                        processes=processes, seed=seed,
                        max_in_flight=cap["max_in_flight"] if cap else None, log=log)
    prof.step_time = StepTimeModel(base={k: v for k, v in fit.coef.items() if v})
    last = min(fit.history, key=lambda h: h["itl_smape_median"] + (h["throughput_smape_median_saturated"] or 0))
    r = fit.residuals
    prov["step_time"] = {
        "method": "simulation in the loop: twin runs of each fit run's reconstructed workload "
                  f"({window_s:.0f} s windows), surrogate Gauss-Newton on log-errors of mean ITL, "
                  "saturated throughput and light-load TTFT, non-negative coefficients",
        "terms": list(terms), "runs": len(usable), "window_s": window_s, "seed": seed,
        "iterations": len(fit.history), "seconds": round(fit.seconds, 1),
        "itl_smape_median": last["itl_smape_median"], "itl_smape_max": last["itl_smape_max"],
        "throughput_smape_median": last["throughput_smape_median"],
        "ttft_smape_median_light": last["ttft_smape_median_light"],
        "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()
                     if k != "coef"} for h in fit.history],
        "residuals_log_ratio_itl": {
            "median": float(np.median(np.log(r.twin_itl_ms / r.real_itl_ms))),
            "p10": float(np.quantile(np.log(r.twin_itl_ms / r.real_itl_ms), 0.1)),
            "p90": float(np.quantile(np.log(r.twin_itl_ms / r.real_itl_ms), 0.9))},
    }
    prov["seconds"] = round(time.perf_counter() - t0, 1)
    return prof

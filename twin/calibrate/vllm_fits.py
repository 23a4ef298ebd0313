"""The parts of a vLLM calibration fitted directly, without simulating: the memory model
from KV capacities, the load-time model from adapter load events, and the client's cap on
requests in flight from the run table (:mod:`twin.calibrate.vllm` puts them together).

- **Memory** (:func:`fit_memory`): the KV capacity vLLM reports at start-up is
  ``util·gpu_mem − weights − max_loras·(max_lora_rank·a + b) − activations``; with the
  "Model loading took X GiB" line (= weights + LoRA buffers) the four unknowns (weights,
  bytes per slot-rank ``a``, bytes per slot ``b``, activation constant) follow by linear
  least squares.
- **Adapter loads** (:func:`fit_load_time`): disk→host and host→GPU times, each affine in
  the adapter's bytes, by a robust (soft-L1) fit that ignores the first-load outliers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.calibrate.tables import numeric_column, read_csv_table
from twin.config import ServingConfig
from twin.costs.load_time import LoadTimeModel
from twin.costs.memory import GIB, MemoryModel
from twin.errors import TwinInputError

__all__ = ["read_kv_capacity", "fit_memory", "read_load_times", "fit_load_time",
           "fit_client_cap", "overloaded_runs", "KV_COLUMNS", "LOAD_COLUMNS", "DISK_EVENT", "ACTIVATE_EVENT"]

# -- memory ----------------------------------------------------------------------------------

KV_COLUMNS = ("max_loras", "max_lora_rank", "kv_cache_tokens")


def read_kv_capacity(path) -> pd.DataFrame:
    """KV-capacity probes: ``max_loras``, ``max_lora_rank``, ``kv_cache_tokens`` (empty when
    vLLM failed before reporting), optional ``model_loading_gib`` and
    ``gpu_memory_utilization``."""
    df = read_csv_table(path, KV_COLUMNS, "KV-capacity")
    file = str(path)
    numeric_column(df, "max_loras", file, positive=True)
    numeric_column(df, "max_lora_rank", file, positive=True)
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
    if np.linalg.matrix_rank(A) < 3:   # 3 copies of a probe, or one max_loras throughout
        raise TwinInputError(
            "the KV probes cannot separate the weights from the LoRA buffers per slot and per "
            "slot-rank: they need at least 3 distinct (max_loras, max_lora_rank) settings "
            "spanning two max_loras values and two ranks; got "
            + ", ".join(sorted({f"{int(a)}x{int(b)}" for a, b in zip(L[has_kv], r[has_kv])})),
            file=kv.attrs.get("source"), field="max_loras")
    y = (util[has_kv] * base.gpu_memory_gib * GIB - tok[has_kv] * base.kv_bytes_per_token
         - act_var) / GIB
    w = 1.0 / tok[has_kv]
    w = w / w.mean()
    (fixed_gib, a_gib, b_gib), *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
    weights_gib, n_loading = _weights_from_loading(kv, L, r, a_gib, b_gib, base.weights_gib)
    # no memory is negative: a term below zero by more than a KV block over the probes
    # (what their token counts resolve) says they disagree; less is a zero term's noise
    block = block_size * base.kv_bytes_per_token / GIB
    terms = {"weights": (weights_gib, 1.0), "activations": (fixed_gib - weights_gib, 1.0),
             "per slot-rank": (a_gib, float((L * r)[has_kv].max())),
             "per slot": (b_gib, float(L[has_kv].max()))}
    below = [f"{k} {1024 * c:.3f} MiB" for k, (c, x) in terms.items() if c * x < -block]
    if below:
        raise TwinInputError(
            f"the KV probes fit negative memory ({', '.join(below)}): their capacities are "
            "inconsistent with one model and GPU; check the table's rows",
            file=kv.attrs.get("source"), field="kv_cache_tokens")
    weights_gib, a_gib, b_gib = max(weights_gib, 0.0), max(a_gib, 0.0), max(b_gib, 0.0)
    mem = MemoryModel(gpu_memory_gib=base.gpu_memory_gib, weights_gib=weights_gib,
                      kv_bytes_per_token=base.kv_bytes_per_token,
                      lora_bytes_per_slot_rank=float(a_gib) * GIB,
                      lora_bytes_per_slot=float(b_gib) * GIB,
                      activation_gib=float(fixed_gib - weights_gib),
                      activation_bytes_per_seq=base.activation_bytes_per_seq,
                      activation_bytes_per_token=base.activation_bytes_per_token)
    # residuals in the user's terms: KV tokens as vLLM would report them
    pred = np.array([_reported_kv_tokens(mem, ServingConfig(
        max_loras=int(L[i]), max_lora_rank=int(r[i]), max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, gpu_memory_utilization=float(util[i]),
        block_size=block_size)) for i in range(len(kv))], float)
    rel = np.abs(pred[has_kv] - tok[has_kv]) / tok[has_kv]
    report = {
        "data": kv.attrs.get("source", "kv table"), "rows": int(len(kv)),
        "rows_with_kv_tokens": int(has_kv.sum()),
        "rows_with_model_loading": n_loading,
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


def _weights_from_loading(kv: pd.DataFrame, L, r, a_gib, b_gib,
                          default_gib: float) -> tuple[float, int]:
    """Weights (GiB) as the median of "Model loading took X GiB" minus the LoRA buffers
    over the probes that report it, and how many do; ``default_gib`` when none does."""
    if "model_loading_gib" not in kv:
        return default_gib, 0
    ml = pd.to_numeric(kv["model_loading_gib"], errors="coerce").to_numpy(float)
    ok = np.isfinite(ml)
    n_loading = int(ok.sum())
    if not n_loading:
        return default_gib, 0
    return float(np.median(ml[ok] - L[ok] * (r[ok] * a_gib + b_gib))), n_loading


def _reported_kv_tokens(mem: MemoryModel, cfg: ServingConfig) -> int:
    """The KV tokens vLLM would report for ``cfg`` (0 where it would not start)."""
    return mem.kv_tokens(cfg) if mem.available_bytes(cfg) > 0 else 0


# -- adapter load times ----------------------------------------------------------------------

LOAD_COLUMNS = ("adapter_rank", "event", "duration_ms")
DISK_EVENT, ACTIVATE_EVENT = "load_disk_to_cpu", "activate_cpu_to_gpu_slot"


def read_load_times(path) -> pd.DataFrame:
    """Load events: ``adapter_rank``, ``event`` (``load_disk_to_cpu`` or
    ``activate_cpu_to_gpu_slot``), ``duration_ms``; optional ``phase``, ``max_lora_rank``."""
    df = read_csv_table(path, LOAD_COLUMNS, "adapter load-time")
    file = str(path)
    numeric_column(df, "adapter_rank", file, positive=True)
    numeric_column(df, "duration_ms", file)
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
    from scipy.optimize import least_squares   # lazy: scipy.optimize takes ~0.5 s to import

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

def overloaded_runs(runs, *, saturated_waiting: float = 10000.0,
                    saturated_in_flight: float = 12000.0) -> list:
    """Runs overloaded enough to have reached the client's cap: a waiting queue above
    ``saturated_waiting`` at some scrape and above ``saturated_in_flight`` requests in flight
    (running + waiting) on average. Runs without a scrape (bench JSON) are never among them."""
    return [r for r in runs if r.metrics.get("num_waiting_max", 0) > saturated_waiting
            and "num_waiting_mean" in r.metrics
            and r.metrics["num_waiting_mean"] + r.metrics.get("num_running_mean", 0.0)
            > saturated_in_flight]


def fit_client_cap(runs, *, saturated_waiting: float = 10000.0,
                   saturated_in_flight: float = 12000.0) -> dict | None:
    """Requests in flight (running + waiting) a ``vllm bench serve`` client sustains before
    new connections fail (ephemeral ports run out near 28k open connections on Linux).

    Estimated over the :func:`overloaded_runs` as the median of the most the client held:
    the largest scraped waiting queue plus the mean running batch. Not the time average: a
    real run stays below its ceiling for part of the window (the queue fills, the client
    falls behind its schedule), while the twin's cap is a ceiling it holds once reached, so
    a cap at the real runs' average holds the twin's queue ~17% short and its overloaded
    mean TTFT ~10% low (experiments/README_validate.md, "the client's ceiling"). None when
    fewer than 3 runs are that overloaded (then the client is assumed unbounded).
    """
    heavy = [r.metrics for r in overloaded_runs(runs, saturated_waiting=saturated_waiting,
                                                saturated_in_flight=saturated_in_flight)]
    if len(heavy) < 3:
        return None
    peak = [m["num_waiting_max"] + m.get("num_running_mean", 0.0) for m in heavy]
    mean = [m["num_waiting_mean"] + m.get("num_running_mean", 0.0) for m in heavy]
    return {"max_in_flight": int(round(float(np.median(peak)))), "runs": len(heavy),
            "mean_in_flight": int(round(float(np.median(mean)))),
            "method": "median of num_waiting_max + num_running_mean (the most in flight) over "
                      f"runs whose waiting queue exceeded {int(saturated_waiting)} and whose "
                      f"mean in flight exceeded {int(saturated_in_flight)}"}

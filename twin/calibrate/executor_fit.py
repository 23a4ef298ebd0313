"""The fit of ``twin calibrate --executor``: a Profile's step-time and load-time models from
a measurements log (no torch: a saved log refits anywhere).

Every executor step is one measurement: its full wall-clock duration (scheduling, forward,
sampling, bookkeeping — exactly what the twin must predict) minus its adapter-load time,
against the twin's step features (``twin.costs.step_time.FEATURES``) as the executor logs
them. A burst schedules alike every time, so a cell's steps line up across its repeats and
per step the mean (``statistic``) or median over the repeats is fitted
(:func:`step_table`). The model is linear, ``t = sum_k c_k f_k`` with ``c >= 0``
(non-negative least squares on relative errors, :func:`fit_nnls`). Load times are fitted
affine in the adapter's bytes as the twin counts them (``ModelShape.adapter_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from twin.costs.dispersion import fit_autocorrelation, fit_dispersion
from twin.costs.load_time import LoadTimeModel
from twin.costs.step_time import FEATURES, StepFeatures, StepTimeModel, derived_features

#: Features of a GPU's vLLM an executor calibration leaves out: the Triton LoRA kernel
#: grid's launch cost, in its linear and its capped form (the executor's LoRA is its own
#: code, with no such grid), and the dense layers' memory/compute ridge (a CPU's GEMMs are
#: priced by the measured GEMM curves). Measurement logs written before them lack their
#: columns.
GPU_ONLY_FEATURES = ("lora_slot_tokens", "lora_slot_tokens_capped", "tokens_past_ridge",
                     "adapters_squared", "adapter_tokens_capped", "waiting_skipped")
#: The features an executor calibration fits: all but ``GPU_ONLY_FEATURES``.
EXECUTOR_FEATURES = tuple(k for k in FEATURES if k not in GPU_ONLY_FEATURES)

__all__ = ["EXECUTOR_FEATURES", "ExecutorFit", "fit_measurements", "fit_nnls", "relative_to_prediction", "residual_stats", "step_features",
           "step_table"]


@dataclass
class ExecutorFit:
    """What :func:`fit_measurements` fits, with how well it fits."""

    steps: pd.DataFrame          # step_table: one row per distinct step of a cell
    coef: dict                   # step time, s per unit of each feature (FEATURES)
    residuals: dict              # residual_stats of the step-time fit
    sum_error_per_cell: dict     # cell key -> predicted / measured summed step time - 1
    load_time: LoadTimeModel
    load_residuals: dict         # {"disk": ..., "host_to_gpu": ...} residual_stats
    # measured / predicted over every repeat of every step, as equally likely multipliers
    # (twin.costs.dispersion): what the twin's ITL percentiles mix its prices with
    dispersion: list | None = None
    # and its correlation from a step to the next ones within a cell's run (TTFT percentiles)
    autocorrelation: list | None = None

    def step_time_model(self) -> StepTimeModel:
        """The profile's step-time model: the coefficients, with the dispersion."""
        return StepTimeModel(base=self.coef, dispersion=self.dispersion,
                             autocorrelation=self.autocorrelation)


def fit_measurements(measured: pd.DataFrame, loads: pd.DataFrame, shape,
                     statistic: str = "mean", weights: str = "predicted") -> ExecutorFit:
    """Fit the step-time model to the step rows ``measured`` (per distinct step, the
    ``statistic`` over the repeats of its duration minus its load time; relative errors:
    every step weighs alike, small decode steps as much as big prefills, each relative to
    its ``weights``: see :func:`fit_nnls`) and the load-time model to the load rows
    ``loads`` (disk and host-to-device medians, affine in ``shape.adapter_bytes``)."""
    steps = step_table(measured, statistic)
    y = steps["y"].to_numpy()
    X = steps[list(EXECUTOR_FEATURES)].to_numpy(float)
    coef, res = fit_nnls(X, y, EXECUTOR_FEATURES, relative=True, weights=weights)
    per_cell = {}
    pred = _predict(steps, coef)
    for key, idx in steps.groupby("key").indices.items():
        per_cell[key] = float(pred[idx].sum() / y[idx].sum() - 1)
    nbytes = np.array([shape.adapter_bytes(int(r)) for r in loads["rank"]], float)
    A = np.c_[np.ones(len(nbytes)), nbytes]
    dcoef, dres = fit_nnls(A, loads["disk_s"].to_numpy(float), ("s", "s_per_byte"))
    ccoef, cres = fit_nnls(A, loads["copy_s"].to_numpy(float), ("s", "s_per_byte"))
    load = LoadTimeModel(disk_s=dcoef["s"], disk_s_per_byte=dcoef["s_per_byte"],
                         host_to_gpu_s=ccoef["s"], host_to_gpu_s_per_byte=ccoef["s_per_byte"])
    # the spread of single measurements (every repeat), not of the means the fit saw
    each = _with_feature_columns(measured)
    y_each = (each["duration_s"] - each["load_s"]).to_numpy(float)
    pred_each = _predict(each, coef)
    return ExecutorFit(steps=steps, coef=coef, residuals=res, sum_error_per_cell=per_cell,
                       load_time=load, load_residuals={"disk": dres, "host_to_gpu": cres},
                       dispersion=fit_dispersion(y_each, pred_each),
                       autocorrelation=fit_autocorrelation(
                           _consecutive_runs(each, y_each, pred_each)))


def step_features(steps: pd.DataFrame, trace: pd.DataFrame, max_lora_rank: int,
                  max_loras: int) -> np.ndarray:
    """The twin's vLLM-layout step features (``FEATURES`` order) of every executor step,
    rebuilt from the step log's batches (request ids and token counts) and the trace.

    Calibration fits on the features the executor logs (its policy's own featurizer); this
    independent reconstruction checks them (tests) and analyses a log by hand. A sequence's
    tokens this step are a decode when everything before them is computed prompt (one
    token, start >= prompt), else a prefill chunk; the run must be free of preemptions
    (recompute resets progress).
    """
    prompt = dict(zip(trace["request_id"].tolist(), trace["prompt_tokens"].tolist()))
    lora = dict(zip(trace["request_id"].tolist(), trace["adapter"].notna().tolist()))
    if "after_idle" in steps.columns:
        idle = steps["after_idle"].to_numpy(bool)
    else:   # older logs: a gap before the step means the engine waited
        end = (steps["start_s"] + steps["duration_s"]).to_numpy()
        idle = np.r_[steps["start_s"].to_numpy()[:1] > 0,
                     steps["start_s"].to_numpy()[1:] > end[:-1] + 1e-9]
    computed: dict[int, int] = {}
    X = np.zeros((len(steps), len(FEATURES)))
    for j, (ids, toks) in enumerate(zip(steps["batch_request_ids"], steps["batch_tokens"])):
        pt = pn = pcn = dn = dctx = pctx = lt = 0
        for rid, k in zip(ids, toks):
            rid, k = int(rid), int(k)
            start = computed.get(rid, 0)
            if k == 1 and start >= prompt[rid]:
                dn += 1
                dctx += start + 1
            else:
                pt += k
                pn += 1
                pcn += start > 0
                pctx += k * (start + k)
            if lora[rid]:
                lt += k
            computed[rid] = start + k
        a = int(steps["batch_adapters"].iloc[j])
        slots = max_loras if lt else 0
        X[j] = StepFeatures(
            1.0, pt, dn, dctx, pctx, lt * max_lora_rank, a, a * max_lora_rank, slots,
            1 if lt else 0, pn, float(idle[j]), prefill_ctx_seqs=pcn,
            **derived_features(pt + dn, slots, a))
    return X



def fit_nnls(X: np.ndarray, y: np.ndarray, names, relative: bool = True,
             weights: str = "observed") -> tuple[dict, dict]:
    """Non-negative least squares ``y ~ X c``; with ``relative`` each row's error is
    relative: to the measured ``y`` (``weights="observed"``) or to the fit's own prediction
    (``"predicted"``: iteratively reweighted, starting from the observed weighting).

    Why the prediction: an error relative to the noisy measurement weighs the steps that
    happened to run fast more than those that ran slow, so the fit lands below their mean
    (on the 2-core box, whose speed flips between a fast and a slow state, the executor's
    own calibration steps then ran 3% over the fit and its served traces 2-6%); relative to
    the prediction each step still weighs alike but its noise no longer sets its weight, and
    the fit follows the mean. Returns (coefficients by name, residual statistics)."""
    if weights not in ("observed", "predicted"):
        raise ValueError(f"weights must be 'observed' or 'predicted', not {weights!r}")
    X = np.asarray(X, float)
    y = np.asarray(y, float)
    if not relative:
        c = _weighted_nnls(X, y, np.ones_like(y))
    elif weights == "observed":
        c = _weighted_nnls(X, y, 1.0 / np.maximum(y, 1e-9))
    else:
        c = relative_to_prediction(lambda scale: _weighted_nnls(X, y, 1.0 / scale), X, y)
    coef = {n: float(v) for n, v in zip(names, c)}
    return coef, residual_stats(y, X @ c)


def relative_to_prediction(solve, X: np.ndarray, y: np.ndarray,
                           rounds: int = 3) -> np.ndarray:
    """Coefficients fitted on errors relative to their own prediction (see
    :func:`fit_nnls`): ``solve(scale)`` fits with each row's error divided by ``scale``;
    the first fit divides by the measured ``y``, each later one by the previous fit's
    prediction ``X @ c`` (floored at a tenth of ``y``). Converges in one or two rounds (the
    weights barely move)."""
    c = solve(np.maximum(y, 1e-9))
    floor = 0.1 * np.maximum(y, 1e-9)
    for _ in range(rounds):
        c = solve(np.maximum(X @ c, floor))
    return c


def _weighted_nnls(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``argmin_{c >= 0} |w (y - X c)|``, columns scaled to a common size for the solver."""
    from scipy.optimize import nnls   # lazy: scipy.optimize takes ~0.5 s to import

    Xw = X * w[:, None]
    scale = np.abs(Xw).max(axis=0)
    scale[scale == 0] = 1.0
    c, _ = nnls(Xw / scale, y * w, maxiter=50 * X.shape[1])
    return c / scale


def residual_stats(y, pred) -> dict:
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if not len(y):
        return {"n": 0}
    rel = (pred - y) / np.maximum(np.abs(y), 1e-12)
    ss = float(((y - y.mean()) ** 2).sum())
    return {"n": int(len(y)), "rmse_s": float(np.sqrt(np.mean((pred - y) ** 2))),
            "r2": float(1 - ((pred - y) ** 2).sum() / ss) if ss > 0 else float("nan"),
            "rel_abs_median": float(np.median(np.abs(rel))),
            "rel_abs_p90": float(np.percentile(np.abs(rel), 90)),
            "rel_mean": float(rel.mean()),
            "sum_error": float(pred.sum() / y.sum() - 1) if y.sum() > 0 else float("nan")}



def step_table(steps: pd.DataFrame, statistic: str = "mean") -> pd.DataFrame:
    """One row per distinct step of a cell (same key, step index and features): the
    ``statistic`` (mean or median) of its duration minus load time over the repeats, the
    repeats' relative spread and their count. A cell's bursts schedule alike run after run,
    so its steps line up across repeats; where timing made them differ they stay apart."""
    df = _with_feature_columns(steps).assign(y=steps["duration_s"] - steps["load_s"])
    g = df.groupby(["key", "step", *FEATURES], sort=False)["y"]
    out = g.agg(y_mean="mean", y_median="median", y_std="std", repeats="size").reset_index()
    out["y"] = out["y_mean"] if statistic == "mean" else out["y_median"]
    out["spread"] = (out["y_std"].fillna(0.0) / out["y_median"].where(out["y_median"] > 0)).fillna(0.0)
    return out



def _consecutive_runs(each: pd.DataFrame, y: np.ndarray, pred: np.ndarray):
    """log(y / pred) of every cell run (key, repeat) in step order, for runs that kept every
    step (a Poisson cell keeps only its after-idle ones: not consecutive)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(y / pred)
    repeat = each["repeat"].fillna(-1) if "repeat" in each else 0   # older logs: one run
    d = pd.DataFrame({"key": each["key"].to_numpy(), "repeat": repeat,
                      "step": each["step"].to_numpy(), "lr": lr}, index=each.index)
    for _, g in d.groupby(["key", "repeat"], sort=False):
        g = g.sort_values("step")
        if len(g) > 2 and (np.diff(g["step"].to_numpy()) == 1).all():
            yield g["lr"].to_numpy()


def _predict(rows: pd.DataFrame, coef: dict) -> np.ndarray:
    """The fitted step time of each row (its ``EXECUTOR_FEATURES`` columns)."""
    return rows[list(EXECUTOR_FEATURES)].to_numpy(float) @ np.array(
        [coef[k] for k in EXECUTOR_FEATURES])


def _with_feature_columns(steps: pd.DataFrame) -> pd.DataFrame:
    """``steps`` (a copy) with every feature column: rows logged before a feature existed
    lack it (the GPU-only features: the executor fit leaves them out; prefill_ctx_seqs: refits
    of older logs, experiments/refit_cells.py), read as 0."""
    df = steps.copy()
    for k in (*GPU_ONLY_FEATURES, "prefill_ctx_seqs"):
        df[k] = df.get(k, pd.Series(0.0, df.index)).fillna(0.0)
    return df

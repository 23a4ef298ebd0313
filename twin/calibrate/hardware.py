"""Fit hardware coefficients (``twin.costs.hardware``) from step logs, so a calibration of a
machine on model A prices model B on it.

:class:`HardwareStepTime` is a scikit-learn-style estimator: ``fit(F, y, shapes)`` takes
per-step batch features ``F`` (``FEATURES`` columns, as the executor's step log and the
calibration measurements hold them), step durations ``y`` and the model shape of each row
(one shape, or one per row), and solves non-negative least squares for the hardware
coefficients ``coef_`` on relative errors (a served trace's time is mostly small decode
steps; see ``twin.calibrate.executor``). Rows of several shapes (e.g. model A at two depths
and at twice its width: :func:`widened_config`) separate what one shape confounds: per-step
vs per-layer costs, weight bytes vs lm_head FLOPs, per-layer launches vs a layer's bytes. With a measured GEMM table (``gemm``, ``twin.costs.gemm``) the dense work is the
table's time of each step's GEMMs times one fitted multiplier ``gemm_scale``, in place of one
flat ``dense_s_per_flop``: the FLOP rate a CPU reaches depends on the matrix sizes, which
differ between the calibration model and the one priced. An optional ``prior`` (hardware
coefficients) with weight ``prior_weight`` pulls each coefficient toward its prior value in
relative terms, for terms the data cannot separate.

:func:`calibrate_from_measurements` reads the measurement Parquet files that
``twin calibrate --executor`` writes (``PROFILE.measurements.parquet``) with their profiles'
shapes; :func:`twin.costs.hardware.derive_profile` (imported here too) turns the
coefficients into a Profile of another model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from twin.calibrate.executor import MEASUREMENT_SUFFIX, fit_nnls, residual_stats, step_table
from twin.calibrate.executor_fit import relative_to_prediction
from twin.costs.gemm import GemmTable
from twin.costs.hardware import HW_TERMS, as_vector, derive_profile, design, step_time_model
from twin.costs.profile import load_profile
from twin.costs.step_time import FEATURES

__all__ = ["HardwareStepTime", "calibrate_from_measurements", "derive_profile",
           "read_measurements", "widened_config", "write_random_model"]


class HardwareStepTime:
    """Step time = design(F, shape) @ coef_ with coef_ >= 0 (``HW_TERMS``).

    ``terms``: the hardware terms fitted (the others stay 0, or at ``prior`` when given;
    default: all but ``gemm_scale`` without a GEMM table, all but ``dense_s_per_flop`` with
    one). ``tp``: tensor-parallel size of the measured runs. ``gemm``: the machine's
    measured GEMM table (:class:`twin.costs.gemm.GemmTable`)."""

    def __init__(self, terms=None, prior: dict | None = None, prior_weight: float = 0.0,
                 relative: bool = True, tp: int = 1, gemm: GemmTable | None = None):
        self.terms = terms
        self.prior = prior
        self.prior_weight = prior_weight
        self.relative = relative
        self.tp = tp
        self.gemm = gemm

    def _terms(self) -> tuple:
        if self.terms is not None:
            return tuple(self.terms)
        drop = "dense_s_per_flop" if self.gemm is not None else "gemm_scale"
        return tuple(t for t in HW_TERMS if t != drop)

    def _design(self, F, shapes) -> np.ndarray:
        F = np.asarray(F, float)
        if F.ndim != 2 or F.shape[1] != len(FEATURES):
            raise ValueError(f"expected step features with {len(FEATURES)} columns {FEATURES}")
        if not isinstance(shapes, (list, tuple, np.ndarray)):
            return design(F, shapes, self.tp, self.gemm)
        if len(shapes) != len(F):
            raise ValueError("one shape per row expected")
        out = np.zeros((len(F), len(HW_TERMS)))
        ids = {}
        for j, s in enumerate(shapes):
            ids.setdefault(id(s), (s, []))[1].append(j)
        for s, rows in ids.values():
            out[rows] = design(F[rows], s, self.tp, self.gemm)
        return out

    def fit(self, F, y, shapes) -> "HardwareStepTime":
        """NNLS on errors relative to the fit's own prediction (iteratively reweighted from
        the measured durations), as ``fit_nnls(weights="predicted")`` does for a model's
        own profile: relative to the noisy measurement, the steps that happened to run fast
        weigh more and the fit lands below the steps' mean (2-3% on this box's
        calibrations), which every derived profile would inherit."""
        X = self._design(F, shapes)
        y = np.asarray(y, float)
        idx = [HW_TERMS.index(t) for t in self._terms()]
        fixed = np.zeros(len(HW_TERMS))
        if self.prior:   # terms not fitted keep their prior value
            p = as_vector(self.prior)
            rest = [j for j in range(len(HW_TERMS)) if j not in idx]
            fixed[rest] = p[rest]
        if self.relative:
            full = relative_to_prediction(lambda scale: self._solve(X, y, idx, fixed, scale),
                                          X, y)
        else:
            full = self._solve(X, y, idx, fixed, None)
        self.coef_ = {k: float(v) for k, v in zip(HW_TERMS, full)}
        self.residuals_ = residual_stats(y, X @ full)
        self.n_steps_ = int(len(y))
        return self

    def _solve(self, X, y, idx, fixed, scale) -> np.ndarray:
        """One weighted NNLS solve (errors relative to ``scale``; None: absolute), the
        prior's pull rows appended; the full coefficient vector."""
        w = np.ones_like(y) if scale is None else 1.0 / scale
        A, b = X[:, idx] * w[:, None], (y - X @ fixed) * w
        if self.prior and self.prior_weight > 0:
            p = as_vector(self.prior)[idx]
            has = p > 0
            lam = self.prior_weight * np.sqrt(len(y))
            R = np.zeros((int(has.sum()), len(idx)))
            R[np.arange(int(has.sum())), np.flatnonzero(has)] = lam / p[has]
            A = np.vstack([A, R])
            b = np.r_[b, np.full(int(has.sum()), lam)]
        coef, _ = fit_nnls(A, b, [HW_TERMS[j] for j in idx], relative=False)
        full = fixed.copy()
        full[idx] = [coef[HW_TERMS[j]] for j in idx]
        return full

    def predict(self, F, shapes) -> np.ndarray:
        return self._design(F, shapes) @ as_vector(self.coef_)

    def step_time_model(self, shape, tp: int | None = None):
        """The StepTimeModel of ``shape`` (any model) on the fitted machine."""
        return step_time_model(self.coef_, shape, self.tp if tp is None else tp, self.gemm)


# -- executor measurements ----------------------------------------------------------------------
def read_measurements(profile_path, statistic: str = "mean"):
    """(step features, durations, shape) of one ``twin calibrate --executor`` output: the
    distinct steps of its measurement file (mean over repeats, minus load time) and the
    model shape its profile records."""
    profile_path = Path(profile_path)
    prof = load_profile(profile_path)
    df = pd.read_parquet(profile_path.with_name(profile_path.name + MEASUREMENT_SUFFIX))
    if "model" in df and prof.provenance.get("model_dir"):
        df = df[df["model"].astype(str) == str(prof.provenance["model_dir"])]
    steps = step_table(df[df["kind"] == "step"], statistic)
    return steps[list(FEATURES)].to_numpy(float), steps["y"].to_numpy(float), prof.model


def calibrate_from_measurements(profile_paths, *, terms=None, prior=None,
                                prior_weight: float = 0.0,
                                gemm: GemmTable | None = None) -> HardwareStepTime:
    """Hardware coefficients fitted on the steps of one or more executor calibrations
    (each its own model shape, same machine and threads; ``gemm``: its GEMM table)."""
    Fs, ys, shapes = [], [], []
    for p in profile_paths:
        F, y, shape = read_measurements(p)
        Fs.append(F)
        ys.append(y)
        shapes += [shape] * len(y)
    est = HardwareStepTime(terms=terms, prior=prior, prior_weight=prior_weight, gemm=gemm)
    return est.fit(np.vstack(Fs), np.concatenate(ys), shapes)


# -- random-weight models of real shapes --------------------------------------------------------
def widened_config(config: dict, factor: int) -> dict:
    """``config`` at ``factor`` times its width: hidden size, intermediate size, attention
    and KV heads scaled together (head dim, vocabulary and the ratios between them kept).
    A calibration shape: at one width the per-layer constants (launches, per-layer
    interpreter work) and the layers' GEMM time both grow with the depth alone, so depths
    cannot tell them apart; the GEMM time grows with the width and they do not."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"width factor must be a positive integer, got {factor}")
    heads = config["num_attention_heads"]
    return dict(config, hidden_size=config["hidden_size"] * factor,
                intermediate_size=config["intermediate_size"] * factor,
                num_attention_heads=heads * factor,
                num_key_value_heads=(config.get("num_key_value_heads") or heads) * factor)


def write_random_model(config: dict, out, *, seed: int = 0, layers: int | None = None) -> Path:
    """An HF model directory (``config.json`` + ``model.safetensors``, bf16 random weights)
    of ``config``'s shape for the executor: step timing does not depend on weight values,
    so a random model of a real shape is a faithful timing subject. Qwen2's q/k/v biases are
    kept (the config becomes a Llama one with ``attention_bias``; Qwen2 has no o bias, a
    ~0.01% difference the executor then carries). ``layers`` overrides the depth (a
    shallower copy of the same width, for calibration). Written once per directory."""
    import torch  # lazy: torch stays off twin.calibrate's import path
    from safetensors.torch import save_file  # lazy: as torch

    out = Path(out)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    qkv_bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias"))
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=qkv_bias,
               hidden_act="silu")
    if layers is not None:
        cfg["num_hidden_layers"] = int(layers)
    mark = out / ".random-model"
    want = json.dumps({"config": cfg, "seed": seed}, sort_keys=True)
    if mark.exists() and mark.read_text() == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kvh = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    i, v = cfg["intermediate_size"], cfg["vocab_size"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not cfg.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = rnd(v, h)
    for li in range(L):
        p = f"model.layers.{li}."
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        for n, (o, k) in {"q_proj": (heads * hd, h), "k_proj": (kvh * hd, h),
                          "v_proj": (kvh * hd, h), "o_proj": (h, heads * hd)}.items():
            sd[p + f"self_attn.{n}.weight"] = rnd(o, k)
            if qkv_bias and n != "o_proj":
                sd[p + f"self_attn.{n}.bias"] = rnd(o)
        sd[p + "mlp.gate_proj.weight"] = rnd(i, h)
        sd[p + "mlp.up_proj.weight"] = rnd(i, h)
        sd[p + "mlp.down_proj.weight"] = rnd(h, i)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    mark.write_text(want)
    return out

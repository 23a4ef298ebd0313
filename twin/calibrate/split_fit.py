"""Split costs fitted to the executor's split mode (``twin.executor.split``'s logs).

Three fits, one per part of a split step (``twin.costs.split_costs``):

- **base**: per op (``embed``, ``qkv``, ``o``, ``gate_up``, ``down``, ``head``), a batch's
  ``compute_s = const + row_s x rows`` (non-negative least squares over the base-batch
  log, forward ``lin`` batches and the ends; input-gradient batches priced as forward);
- **link**: the client's copies into and out of the shared buffers, ``transfer_s =
  a x calls + bytes / bandwidth`` per step, plus the pipe's message latency: per step,
  ``base_wait_s`` less its own batches' compute, over ``2 x calls`` messages (from one-
  client runs, where no other client's batch is queued ahead; the lower quartile of every
  step when there are none);
- **local**: everything of a client step that is neither transfer nor base wait (its
  forward's ``local_s`` and the scheduling, sampling and bookkeeping around it: the
  step's duration less ``transfer_s`` and ``base_wait_s``) as ``const + prefill_tokens +
  decode_tokens + decode_context + after_idle`` (non-negative least squares over the
  client-step log; ``after_idle`` from the step log where present);
- **client waits** (their after-idle and per-prefill-token terms added to the local
  model): what one-client steps wait on the base beyond their own base compute and the
  link's messages, in the same terms. The probe
  (``experiments/split_step_profile.py``) shows it is the processes' wake-ups and
  run-queue delays on shared cores, not the base's queue or GEMMs: longer after the
  client was idle and with more of its own CPU work in the step. The link's latency is
  their median, so without this term the twin misses their tail.

The result is a :class:`SplitCosts` for the model's shape (every layer its own stage),
saved as JSON (``twin.split-costs/1``) with the fit's residuals.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from twin.calibrate.executor_fit import fit_nnls
from twin.costs.split_costs import (OPS, BaseCosts, Link, SplitCosts, stages)
from twin.costs.step_time import StepTimeModel
from twin.errors import TwinInputError

SCHEMA = "twin.split-costs/1"
BASE_OPS = ("embed",) + OPS + ("head",)
#: the client waits' terms added to the local model (see :func:`fit_waits`)
WAIT_TERMS = ("prefill_tokens", "after_idle")
LOCAL_TERMS = ("const", "prefill_tokens", "decode_tokens", "decode_context", "after_idle")


def _nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares in seconds (the executor fit's solver, unweighted)."""
    coef, _ = fit_nnls(X, y, range(X.shape[1]), relative=False)
    return np.array([coef[j] for j in range(X.shape[1])])


def fit_base(batches: pd.DataFrame) -> dict:
    """``{op: (const_s, row_s)}`` from base batches (see the module docstring)."""
    out = {}
    for op in BASE_OPS:
        b = batches[batches["op"] == op]
        if not len(b):
            raise TwinInputError(f"no base batch of op {op!r} to fit", field="base_batches")
        X = np.column_stack([np.ones(len(b)), b["rows"].to_numpy(float)])
        c = _nnls(X, b["compute_s"].to_numpy(float))
        out[op] = (float(c[0]), float(c[1]))
    return out


def base_costs_from(shape, fit: dict, layer_groups: int | None = None) -> BaseCosts:
    """Per-stage base costs from the per-op fit (a stage of n layers: n x the op)."""
    st = stages(shape, layer_groups)
    k = len(st)
    const, row, seq = np.zeros(k), np.zeros(k), np.zeros(k)
    for i, s in enumerate(st):
        op = "head" if s.op == "lm_head" else s.op
        a, b = fit[op]
        const[i] = a * s.layers
        if s.per_seq:
            seq[i] = b
        else:
            row[i] = b * s.layers
    return BaseCosts(st, const=const, prefill=row, decode=row.copy(), seq=seq)


def _own_compute(steps: pd.DataFrame, base: BaseCosts) -> np.ndarray:
    """Each step's own base compute had it been alone (its pass, unbatched)."""
    seqs = steps["num_decode"].to_numpy() + (steps["num_prefill_tokens"].to_numpy() > 0)
    return np.array([base.pass_time(int(p), int(d), int(s)) for p, d, s in zip(
        steps["num_prefill_tokens"], steps["num_decode"], seqs)])


def _step_bytes(steps: pd.DataFrame, stages_: list) -> np.ndarray:
    """Each step's bytes sent and received over the link (every stage, both ways)."""
    tokens = steps["num_tokens"].to_numpy(float)
    seqs = steps["num_decode"].to_numpy() + (steps["num_prefill_tokens"].to_numpy() > 0)
    return sum(np.where(s.per_seq, seqs, tokens) * (s.in_bytes + s.out_bytes)
               for s in stages_)


def fit_link(steps: pd.DataFrame, base: BaseCosts, shape, one_client: np.ndarray) -> Link:
    """The link's per-message latency and bandwidth (see the module docstring)."""
    calls = steps["calls"].to_numpy(float)
    nbytes = _step_bytes(steps, base.stages)
    a, inv_bw = _nnls(np.column_stack([calls, nbytes]), steps["transfer_s"].to_numpy(float))
    pipe = (steps["base_wait_s"].to_numpy() - _own_compute(steps, base)) / (2 * calls)
    lat = float(np.median(pipe[one_client]) if one_client.any() else np.quantile(pipe, 0.25))
    return Link("executor", max(lat, 0.0) + a / 2, 1.0 / inv_bw if inv_bw > 0 else np.inf,
                "fitted to the executor's split mode (twin.calibrate.split_fit)")


def local_rest(steps: pd.DataFrame, base: BaseCosts, link: Link) -> np.ndarray:
    """Per step, what the twin's base pass alone and its link do not explain: the step
    less its own base compute (unbatched) and its messages and bytes over ``link``.
    Besides the client's own work it holds the wake-ups and run-queue delays of the
    processes on shared cores, which grow with the client's CPU work in the step
    (``experiments/split_step_profile.py``), and (several clients) queueing behind
    the others' batches."""
    msgs = 2 * link.latency_s * steps["calls"].to_numpy(float)
    return ((steps["t_end"] - steps["t_start"]).to_numpy(float) - _own_compute(steps, base)
            - msgs - _step_bytes(steps, base.stages) / link.bytes_per_s)


def fit_local(steps: pd.DataFrame, y: np.ndarray | None = None
              ) -> tuple[StepTimeModel, float]:
    """The client-local model and its relative RMS residual, fitted to ``y`` (default:
    the step less its transfer and base wait; :func:`local_rest`)."""
    X = np.column_stack([np.ones(len(steps)), steps["num_prefill_tokens"], steps["num_decode"],
                         steps["context_tokens"], steps["after_idle"]]).astype(float)
    if y is None:
        y = (steps["t_end"] - steps["t_start"] - steps["transfer_s"]
             - steps["base_wait_s"]).to_numpy(float)
    c = _nnls(X, y)
    rms = float(np.sqrt(np.mean((X @ c - y) ** 2)) / max(np.mean(y), 1e-12))
    return StepTimeModel(base=dict(zip(LOCAL_TERMS, map(float, c)))), rms


def fit_waits(steps: pd.DataFrame, base: BaseCosts, link: Link) -> StepTimeModel | None:
    """The client's waits for a core, in the local model's terms: what one-client steps'
    base waits hold beyond their own base compute and the link's messages
    (:func:`local_rest` less the measured local part), fitted as the local model is.
    One-client steps only: with several clients the rest also holds queueing behind the
    others' batches, which the twin's event loop plays out itself. None without
    one-client steps. Of the fit, :func:`fit_split_costs` adds the terms of the steps
    that wait more than the others (:data:`WAIT_TERMS`: after idle, per prefill token);
    the constant and per-decode part of the waits is the link's (its latency) and the
    base's time per request (``fit_base_overhead``)."""
    one = steps["one_client"].to_numpy(bool)
    if not one.any():
        return None
    own = (steps["t_end"] - steps["t_start"] - steps["transfer_s"]
           - steps["base_wait_s"]).to_numpy(float)
    waits, _ = fit_local(steps[one], (local_rest(steps, base, link) - own)[one])
    return waits


def fit_split_costs(results, shape, client_waits: bool = True) -> SplitCosts:
    """:class:`SplitCosts` for ``shape`` from executor split runs (``RunResult``s with the
    ``base_batches`` and ``client_steps`` extras, and ``summary["split"]["clients"]``).
    ``client_waits``: add :func:`fit_waits`'s :data:`WAIT_TERMS` to the local model
    (False: the local model is the steps' local part only, as before the probe)."""
    batches, steps = [], []
    for r in results:
        if "base_batches" not in r.extras or "client_steps" not in r.extras:
            raise TwinInputError("not a split-mode run: no base_batches/client_steps extras",
                                 field="extras")
        b = r.extras["base_batches"]
        batches.append(b[b["kind"] != "grad"])
        s = r.extras["client_steps"].copy()
        has = r.steps is not None and "base_calls" in r.steps
        s["calls"] = r.steps["base_calls"].to_numpy() if has else len(stages(shape))
        s["one_client"] = r.summary["split"]["clients"] == 1
        idle = r.steps is not None and "after_idle" in r.steps and len(r.steps) == len(s)
        s["after_idle"] = r.steps["after_idle"].to_numpy(float) if idle else 0.0
        steps.append(s)
    batches = pd.concat(batches, ignore_index=True)
    steps = pd.concat(steps, ignore_index=True)
    steps = steps[steps["calls"] > 0]
    fit = fit_base(batches)
    base = base_costs_from(shape, fit)
    link = fit_link(steps, base, shape, steps["one_client"].to_numpy(bool))
    local, rms = fit_local(steps)
    waits = fit_waits(steps, base, link) if client_waits else None
    if waits is not None:
        local = StepTimeModel(base={k: local.base[k] + waits.base[k] * (k in WAIT_TERMS)
                                    for k in LOCAL_TERMS})
    return SplitCosts(base, local, link, notes={
        "schema": SCHEMA, "base_ops": {k: list(v) for k, v in fit.items()},
        "link": {"latency_s": link.latency_s, "bytes_per_s": link.bytes_per_s},
        "local": local.base, "local_rel_rms": rms, "runs": len(results),
        "client_waits": waits.base if waits is not None else None,
        "base_batches": int(len(batches)), "client_steps": int(len(steps))})


def with_base_overhead(costs: SplitCosts, h: float) -> SplitCosts:
    """``costs`` with ``h`` s of the base's time per request handled, taken out of the
    link's latency (a one-client round trip, ``2 x latency + h``, stays what was fitted)."""
    base = replace(costs.base, per_request=float(h))
    link = replace(costs.link, latency_s=max(costs.link.latency_s - h / 2, 0.0))
    notes = {**costs.notes, "base_per_request_s": float(h),
             "link": {"latency_s": link.latency_s, "bytes_per_s": link.bytes_per_s}}
    return SplitCosts(base, costs.local, link, notes=notes)


def fit_base_overhead(costs: SplitCosts, score, grid: int = 9) -> SplitCosts:
    """The base's per-request handling time: the one of ``grid`` values in ``[0, 2 x
    latency]`` whose costs ``score(costs) -> error`` finds lowest (simulation in the loop:
    ``score`` simulates the several-client calibration runs and compares them with the
    executor's; one-client runs cannot tell the base's time from the pipe's)."""
    best = min(np.linspace(0.0, 2 * costs.link.latency_s, grid),
               key=lambda h: score(with_base_overhead(costs, h)))
    return with_base_overhead(costs, best)


def save_split_costs(costs: SplitCosts, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(costs.notes, indent=2, default=float) + "\n")
    return path


def load_split_costs(path, shape, layer_groups: int | None = None) -> SplitCosts:
    """A saved fit as :class:`SplitCosts` for ``shape``."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TwinInputError(f"cannot read split costs: {exc}", file=str(path)) from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise TwinInputError(f"expected schema {SCHEMA!r}", file=str(path), field="schema")
    bad = (KeyError, TypeError, ValueError, AttributeError)
    try:
        fit = {k: tuple(map(float, v)) for k, v in d["base_ops"].items()}
    except bad as exc:
        raise _malformed(path, exc) from None
    missing = [op for op in BASE_OPS if op not in fit]
    if missing:
        raise TwinInputError(f"no cost for base op {missing[0]!r}", file=str(path),
                             field="base_ops")
    try:
        link = Link("executor", float(d["link"]["latency_s"]), float(d["link"]["bytes_per_s"]))
        base = replace(base_costs_from(shape, fit, layer_groups),
                       per_request=float(d.get("base_per_request_s", 0.0)))
        local = StepTimeModel(base={k: float(v) for k, v in dict(d["local"]).items()})
    except bad as exc:
        raise _malformed(path, exc) from None
    return SplitCosts(base, local, link, notes=d)


def _malformed(path, exc) -> TwinInputError:
    return TwinInputError(f"malformed split costs ({type(exc).__name__}: {exc}); expected "
                          "base_ops, link.latency_s, link.bytes_per_s and local as `twin "
                          "calibrate --executor --policy split` writes them", file=str(path))

"""Replay an executor run's measured step durations in the twin.

The twin and the executor drive the same scheduler; they differ only in how long a step
takes (DESIGN §1). :class:`ReplayStepTime` stands in for the profile's ``StepTimeModel``
and hands the twin, in order, the durations the executor measured, adapter loads included
(the executor's step duration already contains them, so the load-time model is zero). Run
that way the twin must reproduce the executor's batches step for step — the differential
test — and any difference in its results is then a difference in scheduling, not in cost.

The twin's engine prices a step with ``step_time(f)``; a run of ``k`` identical pure-decode
steps with ``decode_run(f, ctx_step, k)``, possibly followed by ``steps_within(f, ...)``
and a second ``decode_run(f, ...)`` that shortens the run (an arrival or the window cuts
it). So a decode run is consumed only when the next step is priced: calls made with the
*same* features object ``f`` belong to one run and the last ``k`` asked for counts.

Times are replayed exactly: a run of ``k`` steps lasts ``end[c+k-1] - start[c]`` of the
recorded log, so the twin's clock lands on the executor's recorded instants (up to one
rounding) and arrivals are admitted at the same step boundaries.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.costs.measured import exact_kv_memory, zero_load_time
from twin.costs.profile import ModelShape, Profile
from twin.sim.engine import simulate


class ReplayExhausted(RuntimeError):
    """The twin asked for more steps than were recorded: the schedules diverged."""


class ReplayStepTime:
    """A step-time model that returns recorded step durations in order.

    ``durations``: one per step. ``starts`` (optional): the recorded step start times;
    with them a run of steps is priced as the difference of recorded instants, so the
    twin's clock follows the recording without accumulating rounding.
    """

    def __init__(self, durations, starts=None):
        d = np.asarray(durations, dtype=np.float64)
        if d.ndim != 1 or (d < 0).any() or not np.isfinite(d).all():
            raise ValueError("durations must be a 1-d array of finite non-negative seconds")
        self.durations = d
        if starts is None:
            starts = np.concatenate([[0.0], np.cumsum(d)[:-1]]) if len(d) else np.zeros(0)
        self.starts = np.asarray(starts, dtype=np.float64)
        if self.starts.shape != d.shape:
            raise ValueError("starts and durations differ in length")
        self.ends = self.starts + d
        self.pos = 0                  # next unconsumed step
        self._pending_f = None        # features of the decode run being priced
        self._pending_k = 0

    @classmethod
    def from_steps(cls, steps: pd.DataFrame) -> "ReplayStepTime":
        """From a step log (``start_s``, ``duration_s``; one row per step, as the executor
        writes it)."""
        if "steps" in steps.columns and (steps["steps"] != 1).any():
            raise ValueError("the step log has rows covering several steps (a twin log?); "
                             "replay needs one row per step")
        return cls(steps["duration_s"].to_numpy(), steps["start_s"].to_numpy())

    def __len__(self) -> int:
        return len(self.durations)

    @property
    def consumed(self) -> int:
        """Steps priced so far (a pending decode run included)."""
        return self.pos + (self._pending_k if self._pending_f is not None else 0)

    def _commit(self, f) -> None:
        if self._pending_f is not None and f is not self._pending_f:
            self.pos += self._pending_k
            self._pending_f, self._pending_k = None, 0

    def _need(self, k: int) -> None:
        if self.pos + k > len(self.durations):
            raise ReplayExhausted(
                f"replay: step {self.pos + k} asked for, {len(self.durations)} recorded — the "
                "twin's schedule diverged from the recorded run")

    # -- the StepTimeModel interface ---------------------------------------------------------
    def __call__(self, f) -> float:
        self._commit(None)
        self._need(1)
        d = float(self.durations[self.pos])
        self.pos += 1
        return d

    def decode_run(self, f0, ctx_step: int, k: int) -> tuple[float, float, float]:
        """(total, first, last) of the next ``k`` recorded steps; consumed once the next
        step is priced (see the module docstring)."""
        self._commit(f0)
        k = int(k)
        self._need(k)
        c = self.pos
        self._pending_f, self._pending_k = f0, k
        total = float(self.ends[c + k - 1] - self.starts[c])
        return total, float(self.durations[c]), float(self.durations[c + k - 1])

    def steps_within(self, f0, ctx_step: int, k_max: int, horizon: float) -> int:
        """Smallest j in [1, k_max] whose run of j steps lasts >= ``horizon`` (else k_max)."""
        self._commit(f0)
        c = self.pos
        k_max = int(min(k_max, len(self.durations) - c))
        if k_max <= 0:
            self._need(1)
        run = self.ends[c:c + k_max] - self.starts[c]
        j = int(np.searchsorted(run, horizon, side="left"))
        return k_max if j >= k_max else j + 1

    def to_dict(self) -> dict:
        return {"replay": {"steps": len(self.durations)}}


def replay_profile(result, config=None) -> Profile:
    """A profile that makes the twin replay an executor run (``twin.executor.execute``):
    its step durations in order, zero load times (they are inside the durations), and the
    executor's exact KV capacity. ``config``: the serving config the twin will run with
    (default: the executor run's)."""
    meta = result.meta
    if not meta.get("executor") or result.steps is None:
        raise ValueError("replay_profile needs an executor RunResult (with its step log)")
    util = (config.gpu_memory_utilization if config is not None
            else meta["config"]["gpu_memory_utilization"])
    ms = dict(meta["model_shape"])
    shape = ModelShape(name=str(meta.get("model", "executor")), **ms)
    return Profile(
        name=f"replay:{meta.get('model', 'executor')}",
        hardware={"name": meta.get("device_name", meta.get("device", "?")), "replay": True},
        model=shape,
        memory=exact_kv_memory(meta["num_gpu_blocks"], meta["block_size"], util,
                               kv_bytes_per_token=shape.kv_bytes_per_token),
        step_time=ReplayStepTime.from_steps(result.steps),
        load_time=zero_load_time(),
        provenance={"source": "executor step log", "steps": int(len(result.steps))})


def replay(result, trace: pd.DataFrame, catalog=None, config=None, **simulate_kwargs):
    """Run ``trace`` through the twin replaying the executor ``result``'s step durations.

    ``config`` defaults to the executor run's (effective) config; ``catalog`` to every
    adapter of the trace. Returns the twin's RunResult.
    """
    if config is None:
        config = ServingConfig.from_dict(result.meta["config"])
    scale = result.meta.get("time_scale", 1.0)
    if scale != 1.0:
        trace = trace.assign(arrival_s=trace["arrival_s"] * float(scale))
    return simulate(trace, config, replay_profile(result, config), catalog, **simulate_kwargs)

"""What the executor's serving loop carries from one phase to the next: the logical clock,
the trace's arrivals, and one step between its load, forward and commit phases.

Apart from the loop (``engine.py``) so that the loop reads as its phases; nothing here
touches torch, the scheduler's plan is only carried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd

from twin.results.recorder import STEP_COLUMNS as TWIN_STEP_COLUMNS
from twin.sched import Request
from twin.workload.hash_ids import request_hashes


class Clock:
    """The engine's logical clock (see ``engine.py``): it advances by each step's measured
    wall duration and, when idle, jumps to the next arrival once the wall clock has caught
    up, so the twin replaying the step durations sees the very same instants."""

    __slots__ = ("now", "wall", "idle")

    def __init__(self):
        self.now = 0.0                     # logical clock (seconds from the trace start)
        self.wall = time.perf_counter()    # the wall instant that corresponds to ``now``
        self.idle = False   # waited for an arrival since the last step (as the twin marks it)

    def wait_until(self, arrival_s: float) -> None:
        """Idle until ``arrival_s``: sleep until the wall clock catches up with it."""
        target = self.now + (arrival_s - self.now)     # as the twin's clock computes it
        left = target - self.now - (time.perf_counter() - self.wall)
        if left > 0:
            time.sleep(left)
        self.now, self.wall, self.idle = target, time.perf_counter(), True

    def step_ended(self, now: float, wall: float) -> None:
        """A step ended at logical ``now``, wall instant ``wall``; the next starts there."""
        self.now, self.wall, self.idle = now, wall, False


class Arrivals:
    """The trace's requests in arrival order, released as :class:`Request` when the
    logical clock reaches them. Adapter ids are catalog order (-1: the base model, or any
    request of a server without LoRA)."""

    def __init__(self, trace: pd.DataFrame, ids: dict[str, int], enable_lora: bool):
        self.arrival = trace["arrival_s"].to_numpy(np.float64).tolist()
        self.adapter = [(-1 if pd.isna(a) or not enable_lora else ids[a])
                        for a in trace["adapter"]]
        self.prompt = trace["prompt_tokens"].to_numpy(np.int64).tolist()
        self.output = trace["output_tokens"].to_numpy(np.int64).tolist()
        self.request_id = trace["request_id"].to_numpy(np.int64).tolist()
        self.hashes, self.hash_block_size = request_hashes(trace)   # prefix cache
        self.n = len(self.arrival)
        self.i = 0

    @property
    def left(self) -> int:
        return self.n - self.i

    @property
    def next_s(self) -> float:
        return self.arrival[self.i]

    def due(self, now: float) -> Iterator[Request]:
        """The requests that have arrived by ``now`` and were not released yet."""
        while self.i < self.n and self.arrival[self.i] <= now:
            self.i += 1
            yield self.request(self.i - 1)

    def request(self, i: int) -> Request:
        """The trace's ``i``-th request (in arrival order), as released."""
        return Request(i, self.request_id[i], self.arrival[i], self.adapter[i],
                       self.prompt[i], self.output[i],
                       self.hashes[i] if self.hashes is not None else None,
                       self.hash_block_size)


# the executor's step log: the twin's columns, then the executor's own
STEP_COLUMNS = [
    *TWIN_STEP_COLUMNS,   # the twin's step-log columns (twin.results.recorder): logs line up
    # the executor's own
    "num_seqs", "num_tokens", "batch_adapters", "loads_from_disk", "kv_blocks", "failed",
    "schedule_s", "load_s", "read_s", "pack_s", "copy_s", "forward_s", "sample_s",
    "batch_request_ids", "batch_tokens",
    "gap_s",      # from the previous step's end to this one's schedule: that step's commit
    #               bookkeeping, the arrivals released, the loop (issue 15's phase split)
    "inputs_s",   # the batch's tensors (BatchInput.build), a part of forward_s
    "features",   # the twin's step-time features of the step (its policy's featurizer)
]


@dataclass(slots=True)
class Step:
    """One step between its phases: the plan and its features (load), the batch and its
    logits (forward), with each phase's timings and counts for the step log."""

    plan: Any
    features: Any
    t_sched: float
    t_load: float = 0.0
    t_read: float = 0.0
    t_pack: float = 0.0
    t_copy: float = 0.0
    t_fwd: float = 0.0
    t_samp: float = 0.0
    t_gap: float = 0.0      # previous step's end -> this step's schedule (see STEP_COLUMNS)
    t_inputs: float = 0.0   # the batch's tensors, within t_fwd
    n_disk: int = 0
    n_failed: int = 0
    failed: dict[int, str] = field(default_factory=dict)   # adapter -> why its load failed
    items: list = field(default_factory=list)     # the batch: (request, new tokens)
    starts: list[int] = field(default_factory=list)   # tokens already in each one's KV
    logits: Any = None


class NoProgress:
    """The progress bar when none is asked for."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def no_sync() -> None:
    """The device synchronisation of a CPU run: nothing to wait for."""

"""The serving frontend: time a request spends in the API server before the engine has it.

vLLM's OpenAI-compatible server does per-adapter work on the first request that names a
LoRA adapter it has not served since it started: ``TokenizerGroup.get_lora_tokenizer`` tries
to load a tokenizer from the adapter's folder for each new ``lora_int_id`` and caches it.
The engine gets such a request that much later; the client's clock (TTFT, E2E) started
when it sent it. In the real Llama-3.1-8B / H100 runs (vLLM 0.8.5) an adapter's first
request pays ~0.3 s (README_validate, "the TTFT tail at light load"); later requests of the
same adapter pay nothing measurable. One that arrives while the first is still being
worked on (tied with it, or within the delay) finds nothing cached yet: the twin lets it
through no earlier than the first (a lower bound: ``TokenizerGroup`` as read in the code
search loads through a thread pool and shares no load in flight, so such a request may pay
the whole delay itself; not measured). It never overtakes the first, and which of two tied
rows a trace lists first does not matter.

The cost belongs to the serving software, like the step-time constants, so it is a profile
field (``frontend.first_lora_request_s``); 0, the default, is the engine without a frontend
(the twin before it existed, and the executor, which has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frontend:
    """The frontend's delays. ``first_lora_request_s``: seconds between the arrival of an
    adapter's first request and the moment the engine gets it."""

    first_lora_request_s: float = 0.0

    def __post_init__(self):
        if not self.first_lora_request_s >= 0:   # NaN too
            raise ValueError(f"first_lora_request_s must be >= 0, got "
                             f"{self.first_lora_request_s!r}")

    @property
    def is_default(self) -> bool:
        return self.first_lora_request_s == 0

    def to_dict(self) -> dict:
        return {"first_lora_request_s": self.first_lora_request_s}

    def admission_order(self, arrival: np.ndarray, adapter: np.ndarray):
        """When and in which order the engine gets the requests: ``(order, admitted)``, the
        rows sorted by the time the engine gets them (ties: row order) and those times;
        None when the frontend delays nothing (the engine takes the arrivals as they are).

        An adapter's first request gets through ``first_lora_request_s`` after it arrived;
        one of the same adapter arriving before that (tied with it, or within the delay)
        finds the adapter's work not done yet and gets through no earlier than the first
        (:func:`ready_times`); later ones pay nothing.

        ``arrival``: the rows' arrival times, in order; ``adapter``: their adapter ids (< 0:
        the base model, which has no first request)."""
        d = float(self.first_lora_request_s)
        rows = np.flatnonzero(np.asarray(adapter) >= 0)
        if d == 0 or len(rows) == 0:
            return None
        admitted = np.array(arrival, dtype=np.float64)
        admitted[rows] = np.maximum(admitted[rows], ready_times(admitted, adapter, d)[rows])
        order = np.argsort(admitted, kind="stable")
        return order, admitted[order]


def ready_times(arrival: np.ndarray, adapter: np.ndarray, d: float) -> np.ndarray:
    """Per row, when its adapter's first request gets through the frontend (its arrival +
    ``d``; ``arrival`` in row order, as a trace is); the base model's rows (< 0): -inf."""
    a = np.asarray(adapter)
    out = np.full(len(a), -np.inf)
    rows = np.flatnonzero(a >= 0)
    if len(rows):
        _, first, inv = np.unique(a[rows], return_index=True, return_inverse=True)
        out[rows] = (np.asarray(arrival, dtype=np.float64)[rows[first]] + d)[inv]
    return out

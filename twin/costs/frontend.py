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
(the twin before it existed, and the executor, which has none). Every request also spends
a fixed time outside the engine (``frontend.request_s``: HTTP, tokenization, the hops to and
from the engine core), which adds to its TTFT and E2E and moves nothing the engine decides
(:meth:`Frontend.client_times`); fitted on light runs (``twin.calibrate.frontend_fit``).

A second frontend cost shows in what a streaming client measures, not in the engine: a
scrape of the server's ``/metrics`` renders, on the API server's event loop, one
``vllm:lora_requests_info`` series per label the server has seen since it started: the
running and the waiting adapters' names after a step (``AdapterCache.note_label``), ~22 µs
each on this project's box (``experiments/metrics_render_cost.py``), fitted on real runs'
ITL/TPOT by ``twin.calibrate.frontend_fit.fit_metrics_series``.
The engine keeps stepping; each running request's tokens pile up and reach the client in
one chunk when the loop is free, so ``vllm bench serve`` counts fewer, longer gaps: its mean
ITL is the twin's over ``1 − (share of the time the loop is stalled beyond one step)``
(:meth:`Frontend.itl_scale`; ``metrics_scrape_hz`` scrapes per second, ``metrics_series_s``
seconds per series; 0, the default: no scrape); and a request arriving, or a first token
made, during a stall waits for its end (:meth:`Frontend.ttft_wait_s`, the mean TTFT). The
real H100 runs' collector scraped at 0.40 Hz (median of the fit runs, which
``twin.calibrate.frontend_fit.metrics_scrape`` reads; README_validate, "the metrics scrape").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frontend:
    """The frontend's delays. ``first_lora_request_s``: seconds between the arrival of an
    adapter's first request and the moment the engine gets it. ``request_s``: seconds every
    request spends outside the engine on its way in and its first token's way out (HTTP,
    tokenization, the hops to and from the engine core), added to its TTFT and E2E."""

    first_lora_request_s: float = 0.0
    metrics_scrape_hz: float = 0.0      # scrapes of /metrics per second
    metrics_series_s: float = 0.0       # seconds a scrape takes per lora_requests_info series
    request_s: float = 0.0

    def __post_init__(self):
        for k in ("first_lora_request_s", "metrics_scrape_hz", "metrics_series_s", "request_s"):
            if not getattr(self, k) >= 0:   # NaN too
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)!r}")

    @property
    def is_default(self) -> bool:
        return self.first_lora_request_s == 0 and not self.scrapes and self.request_s == 0

    def client_times(self, req):
        """``req`` (a run's per-request table, changed in place and returned) as the client
        times it: every request's first token and end (``first_token_s``, ``finish_s``;
        NaN: never) ``request_s`` later. A constant delay moves no engine decision (the
        engine gets the arrivals in the same order, as far apart), so the engine runs on the
        trace's arrivals and the shift is made here, on the way out: ``first_scheduled_s``
        stays the engine's, so the time a request queued is not counted as the frontend's."""
        if self.request_s == 0:
            return req
        for c in ("first_token_s", "finish_s"):
            if c in req:
                t = req[c].to_numpy()
                req[c] = np.where(t >= 0, t + self.request_s, t)
        return req

    @property
    def scrapes(self) -> bool:
        return self.metrics_scrape_hz > 0 and self.metrics_series_s > 0

    def to_dict(self) -> dict:
        d = {"first_lora_request_s": self.first_lora_request_s}
        if self.request_s:
            d["request_s"] = self.request_s
        if self.scrapes:
            d.update(metrics_scrape_hz=self.metrics_scrape_hz,
                     metrics_series_s=self.metrics_series_s)
        return d

    def itl_scale(self, series: int, duration_s: float, step_s: float) -> float:
        """How much longer the client's mean ITL is than the engine's: ``1 / (1 − lost)``,
        ``lost`` the share of the run's time the scrapes stall the loop beyond one step
        (``step_s``, the engine's mean gap: a shorter stall merges nothing). The ``series``
        the run ended with are taken to have grown evenly from none (a steady churn of
        running sets); scrape k at ``(k + ½) / hz`` renders ``series · t / duration`` of
        them. 1 without scrapes."""
        if not self.scrapes or series <= 0 or duration_s <= 0 or not step_s >= 0:
            return 1.0   # (no decode gap at all, step_s NaN: no mean ITL to scale)
        n, a = self._stalls(series, duration_s)
        # sum over k of max(a (k + ½) - step_s, 0): the scrapes from k0 on stall longer
        k0 = min(n, max(0, math.ceil(step_s / a - 0.5))) if a > 0 else n
        m = n - k0
        lost = (a * m * (k0 + n) / 2 - m * step_s) / duration_s
        return 1.0 / (1.0 - min(max(lost, 0.0), 0.9))

    def _stalls(self, series: int, duration_s: float) -> tuple[int, float]:
        """The scrapes' stalls as ``(n, a)``: scrape k < n at ``(k + ½) / hz`` renders the
        series grown evenly from none to ``series`` by the end of the run, a stall of
        ``a (k + ½)`` seconds. Closed forms over them, not arrays: a run's window may be
        long (10^5 s is 10^4 scrapes at the shipped rate; a mistyped one, far more)."""
        hz = self.metrics_scrape_hz
        return int(duration_s * hz), self.metrics_series_s * series / (duration_s * hz)

    def ttft_wait_s(self, series: int, duration_s: float) -> float:
        """The mean TTFT a streaming client adds to the engine's: a request that reaches
        the API server during a stall is taken in when it ends, and a first token made
        during one reaches the client when it ends; each lands in stall k with chance
        ``S_k / duration`` and waits ``S_k / 2`` on average: ``Σ S_k² / duration`` for
        the two. 0 without scrapes."""
        if not self.scrapes or series <= 0 or duration_s <= 0:
            return 0.0
        n, a = self._stalls(series, duration_s)
        # sum over k of (a (k + ½))² = a² (n³/3 - n/12), through x = a·n (~ the last stall)
        # and n / duration (~ the rate): no n³ to overflow in a window of 10^200 s
        x = a * n
        return x * x * (n / duration_s) / 3 - a * x / (12 * duration_s)

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

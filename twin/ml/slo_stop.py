"""The SLO early exit: stop a verifying twin run once it is PROVEN to miss a p99 SLO.

The twin reports a run's p99 TTFT (TPOT) as ``np.percentile(x, 99)`` (linear
interpolation, then x 1000 for ms) over the requests FINISHED in its window
(:func:`twin.results.results.summarize`); requests still waiting or running at the window's
end are left out. So a request waiting longer than the SLO is no proof (it may never
finish in the window); a finished request whose TTFT is over the SLO is: it stays finished,
and in the percentile, whatever happens later.

The count rule (:func:`count_needed`): over ``n`` sorted values numpy's p99 lies between
``x[j]`` and ``x[j + 1]`` with ``j = floor(0.99 * (n - 1))`` (numpy's own float
arithmetic), so it is over a limit once the ``n - j`` largest values are; ``n`` (the
requests that will have finished) is not known during the run but is at most ``N``, the
requests of the window (:func:`window_counts`): ``max(n - j over n <= N)`` values over the
limit prove p99 > limit for every ``n`` the run can end with, and the ``max(...)``-th
largest value so far is a lower bound of the p99 (:func:`p99_lower_bound`).

:class:`SloStop` counts at each timeline sample of the run (:func:`twin.sim.engine.
simulate`'s ``stop``) and stops it once a p99 is proven over ``factor`` (2) times its SLO.
Why not at 1x: a stopped run's p99s are not known, only bounded, and the search ranks
runs by how far they miss (:func:`twin.ml.trials.slo_rank`); a run that misses by less
than 2x runs in full and ranks exactly, one stopped ranks by its proven bound (>= 2x). A
stopped run is reported as such (``full`` False, ``slo_violated_early``, the time and the
bounds proven), never with a full run's figures.
"""

from __future__ import annotations

import numpy as np

from twin.sched import RequestStatus

#: the percentile the SLOs bound (the twin's p99s)
Q = 99.0
#: the SLO keys and the figure each bounds
METRICS = ("ttft", "tpot")


def count_needed(n_max: int, q: float = Q) -> int:
    """The fewest values over a limit, among at most ``n_max`` values, that make
    ``np.percentile(values, q)`` (linear) over the limit for every count of values the
    run can end with: ``max over 1 <= n <= n_max of n - floor(q/100 * (n - 1))``, in
    numpy's float arithmetic (its virtual index ``(n - 1) * q/100``)."""
    if n_max < 1:
        return 1
    n = np.arange(1, int(n_max) + 1, dtype=np.float64)
    below = np.floor((n - 1) * np.true_divide(q, 100))
    return int(np.max(n - below))


def window_counts(output_tokens: np.ndarray) -> dict:
    """At most how many requests of a window enter each p99: TTFT every request, TPOT
    those that can generate more than one token."""
    out = np.asarray(output_tokens)
    return {"ttft": len(out), "tpot": int(np.count_nonzero(out > 1))}


def finished_values(outcomes, arrival: np.ndarray, metrics) -> dict:
    """{metric: its value (ms) for each finished request}, computed as the summary computes
    it (seconds, then x 1000), so that a value over a limit here is one the run's p99
    sees over it: TTFT of every finished request, TPOT of those with more than one token."""
    done = outcomes.status == RequestStatus.FINISHED
    first = outcomes.first_token[done]
    out = {}
    if "ttft" in metrics:
        out["ttft"] = (first - arrival[done]) * 1000.0
    if "tpot" in metrics:
        g = outcomes.generated[done]
        multi = g > 1
        out["tpot"] = ((outcomes.finish[done][multi] - first[multi])
                       / (g[multi].astype(np.int64) - 1) * 1000.0)
    return out


def p99_lower_bound(values: np.ndarray, needed: int) -> float | None:
    """The ``needed``-th largest of ``values`` (the run's finished requests so far): the
    run's p99 is at least that (``needed`` = :func:`count_needed` of the window); None
    while fewer have finished."""
    if len(values) < needed:
        return None
    return float(np.partition(values, len(values) - needed)[len(values) - needed])


class SloStop:
    """The stop rule of one run: ``slo`` ({'ttft': ms, 'tpot': ms} on the p99s), the
    window's trace (arrival times, output lengths). Called by the engine at its timeline
    samples, it counts at most every ``every_s`` simulated seconds (a count is one pass
    over the finished requests) and stops the run once a p99 is proven over ``factor``
    times its SLO: a run that misses by less runs in full (its exact p99s rank it in the
    search), one stopped carries sound lower bounds of its p99s (``lower_bounds``,
    :func:`p99_lower_bound`) that rank it as at least that far off."""

    EVERY_S = 5.0
    FACTOR = 2.0

    def __init__(self, slo: dict, arrival: np.ndarray, output_tokens: np.ndarray,
                 every_s: float = EVERY_S, factor: float = FACTOR):
        self.slo = {k: float(v) for k, v in slo.items() if k in METRICS and v}
        self.arrival = np.asarray(arrival, dtype=np.float64)
        self.needed = {k: count_needed(n) for k, n in window_counts(output_tokens).items()}
        self.every_s, self.next_s, self.factor = every_s, 0.0, float(factor)
        self.proven: dict = {}
        self.lower_bounds: dict = {}
        self.stopped_s: float | None = None

    def __call__(self, now: float, outcomes) -> bool:
        if not self.slo or now < self.next_s:
            return False
        self.next_s = now + self.every_s
        vals = finished_values(outcomes, self.arrival, METRICS)
        self.proven = {k: limit for k, limit in self.slo.items()
                       if np.count_nonzero(vals[k] > self.factor * limit) >= self.needed[k]}
        if not self.proven:
            return False
        self.stopped_s = float(now)
        self.lower_bounds = {f"{k}_p99": p99_lower_bound(v, self.needed[k])
                             for k, v in vals.items()}
        return True

    def violation_lower_bound(self) -> float:
        """The worst ratio of a proven p99 lower bound to its SLO (>= ``factor``)."""
        return max(self.lower_bounds[f"{k}_p99"] / v for k, v in self.proven.items())


def stop_report(rule: SloStop) -> str:
    """What a stopped run proved, as one line: 'p99 TTFT >= 4210 ms, over 2 x the SLO of
    2000 ms (proven at t=312 s)'."""
    parts = [f"p99 {k.upper()} >= {rule.lower_bounds[f'{k}_p99']:.0f} ms, over "
             f"{rule.factor:g} x the SLO of {v:g} ms" for k, v in rule.proven.items()]
    return f"{' and '.join(parts)} (proven at t={rule.stopped_s:.0f} s)"


def might_beat(results: dict, m: str) -> dict:
    """{row: its proven lower bound of p99 ``m`` ('ttft_p99'...; -inf: none yet)} of the
    runs stopped early (``results``: a search's twin runs) whose bound is under the best
    full run's that keeps up: their own p99 may be lower. None such: that best is the best
    of every run made."""
    best = min((r[m] for r in results.values() if r["starts"] and not r["starving"]
                and r.get("full")), default=np.inf)
    out = {}
    for i, r in results.items():
        if r.get("slo_violated_early"):
            lb = r["p99_lower_bounds"].get(m)
            lb = -np.inf if lb is None else float(lb)
            if lb < best:
                out[i] = lb
    return out

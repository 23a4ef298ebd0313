"""The twin's engine: a generator that steps the shared scheduler in simulated time.

Each iteration asks the scheduler for a step, prices it with the profile's step-time and
load-time models and advances the clock. A pure decode step whose blocked state persists
is the first of a run of identical steps; the run is advanced in one jump up to the next
completion, KV-block shortfall, or arrival that could change the schedule (DESIGN §4), so
the cost of a simulation follows the events, not the tokens.

The engine is written as a SimPy process (it yields ``env.timeout(d)``), but one server has
one process, so ``simulate`` resumes it itself (:func:`run_alone`) with SimPy's arithmetic
(``now + delay``) instead of through a ``simpy.Environment``, whose event objects, heap and
callbacks cost ~5% of a run for nothing to order.
"""

from __future__ import annotations

import gc
from array import array
from contextlib import contextmanager

import numpy as np
import pandas as pd

from twin.config import ServingConfig, require_serving_config
from twin.costs.profile import Profile, load_profile
from twin.costs.step_time import after_idle
from twin.errors import TwinInputError
from twin.results.extrapolation import extrapolation
from twin.results.recorder import Outcomes, Recorder, build_result, default_sample_dt
from twin.results.results import RunResult, crop_window
from twin.sched import Request, RequestStatus
from twin.servers import SERVER_LAYOUTS, ServerParts, build_server
from twin.workload.catalog import AdapterCatalog
from twin.workload.hash_ids import request_hashes
from twin.workload.schema import validate_trace


def check_run_inputs(config: ServingConfig, profile: Profile | str | None,
                     window_s: float | None) -> Profile:
    """The checks every simulation starts with, one server or a deployment of several
    (``twin.policies``): a window that measures something, the profile (loaded by name or
    path when not one), a ``max_model_len`` the model allows. Returns the profile."""
    if window_s is not None and not window_s > 0:   # NaN too: such a window measures nothing
        raise TwinInputError(f"window_s must be a number > 0, got {window_s!r}",
                             field="window_s")
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    profile.check_max_model_len(config)
    return profile


def default_catalog(trace: pd.DataFrame, config: ServingConfig) -> AdapterCatalog:
    """Without a catalog: every adapter of the trace at ``max_lora_rank`` (name order)."""
    names = trace["adapter"].dropna().unique().tolist()
    return AdapterCatalog.uniform(sorted(names), config.max_lora_rank)


def simulate(trace: pd.DataFrame, config: ServingConfig, profile: Profile | str | None = None,
             catalog: AdapterCatalog | None = None, *, server: ServerParts | None = None,
             window_s: float | None = None, progress: bool = False,
             record_steps: bool = False, sample_dt: float | None = None,
             trace_source: str = "trace", max_in_flight: int | None = None,
             jump: bool = True, stop=None) -> RunResult:
    """Simulate ``trace`` served by one server with ``config`` on the hardware/model of
    ``profile``.

    ``server``: the server, built by ``twin.servers.build_server`` (a strategy with options
    of its own builds it, e.g. S-LoRA's admission rule); by default it is built from
    ``config`` in the layout ``config.policy`` names (``vllm`` or ``slora``). Deployments
    of several servers (``merged``, ``hybrid``, several GPUs) are ``twin.policies``':
    ``twin.policies.simulate_policy`` runs any strategy.

    ``window_s``: measure a fixed window as ``vllm bench serve`` runs with a time limit do
    (arrivals after it are dropped, requests unfinished at its end are reported as such);
    by default the run goes on until every request has finished.

    ``max_in_flight``: a client-side cap on requests in flight (running + waiting). An
    arrival that finds that many fails on the client and never reaches the server (status
    ``rejected``; unlike a request vLLM refuses for ``max_model_len``, it still counts in the
    offered load). A long overloaded ``vllm bench
    serve`` hits such a cap when its ~28k ephemeral ports are all held by open connections.

    ``jump=False`` prices every decode step on its own instead of advancing quiet decode
    runs in one closed-form jump: the step-by-step reference the jump must equal (tests);
    the results are the same, only slower.

    ``stop``: a rule asked at each timeline sample, ``stop(now, outcomes)`` (the
    :class:`~twin.results.recorder.Outcomes` of the requests finished so far): True ends the
    run there, its summary over ``now`` seconds and ``meta["stopped_s"] = now`` (e.g. once a
    latency SLO is proven missed: :mod:`twin.ml.slo_stop`). None (default): no check.
    """
    require_serving_config(config)
    if server is None and config.policy not in SERVER_LAYOUTS:
        raise TwinInputError(
            f"policy {config.policy!r} deploys servers of its own; twin.sim.simulate runs one "
            "server (vllm or slora): run it with twin.policies.simulate_policy",
            file="config", field="policy")
    profile = check_run_inputs(config, profile, window_s)
    trace = crop_window(validate_trace(trace, source=trace_source), window_s)
    if catalog is None:
        catalog = default_catalog(trace, config)
    if server is None:
        server = build_server(config, profile, catalog, trace=trace, trace_source=trace_source)
    clock = _Clock(trace, catalog, server, profile, window_s=window_s,
                   max_in_flight=max_in_flight, record_steps=record_steps,
                   sample_dt=sample_dt, jump=jump, stop=stop)
    bar = _progress(progress, clock.horizon)
    end_time = run_alone(clock, bar)
    clock.rec.sample(end_time, server.scheduler)
    if bar is not None:
        bar.update(max(0.0, clock.horizon - bar.n))
        bar.close()
    if clock.stopped_s is not None:
        result = _result(clock, config, profile, clock.stopped_s, window_s)
        result.meta["stopped_s"] = clock.stopped_s
        return result
    duration = window_s if window_s is not None else end_time
    return _result(clock, config, profile, duration, window_s)


class ManualEnv:
    """The engine's view of time when a driver, not SimPy, resumes it: ``timeout(d)`` is
    the wait ``d`` itself, which the driver adds to :attr:`now`."""

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0):
        self.now = now

    @staticmethod
    def timeout(delay: float) -> float:
        return delay


@contextmanager
def gc_paused():
    """Python's cyclic garbage collector off while engines run (``simulate``'s, a fleet's
    event loop), as it was found after: an engine makes no reference cycles (a
    ``gc.collect()`` after a run finds none; tests), so the collector's passes over a
    run's objects free nothing, and reference counting frees the requests as they
    finish."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_alone(clock: _Clock, bar=None) -> float:
    """Run ``clock``'s engine, the only process in its simulated time, to its end; returns
    the end time. What ``simpy.Environment().run()`` does for one process: each yielded
    wait ``d`` moves the time to ``now + d`` (a negative one is refused, as SimPy's
    ``Timeout``), starting at SimPy's initial time, the int 0. The cyclic GC is paused
    meanwhile (:func:`gc_paused`)."""
    env = ManualEnv(0)
    send = clock.engine(env, bar).send
    with gc_paused():
        try:
            d = send(None)
            while True:
                if d < 0:
                    raise ValueError(f"Negative delay {d}")
                env.now = env.now + d
                d = send(None)
        except StopIteration:
            pass
    return env.now


class _Clock:
    """One simulation: the server, the trace as arrays, the outcomes and the recorder, and
    the process that steps the server (:meth:`engine`)."""

    def __init__(self, trace: pd.DataFrame, catalog: AdapterCatalog, server: ServerParts,
                 profile: Profile, *, window_s, max_in_flight, record_steps, sample_dt, jump,
                 stop=None):
        self.trace, self.server, self.sched = trace, server, server.scheduler
        self.stop, self.stopped_s = stop, None
        self.window_s, self.max_in_flight, self.jump = window_s, max_in_flight, jump
        # adapters are small ints in catalog order; bytes for load times from the model shape
        self.adapter_bytes = [profile.model.adapter_bytes(catalog.rank(a))
                              for a in catalog.adapters]
        self.n = n = len(trace)
        self.aid = pd.Categorical(trace["adapter"], categories=catalog.adapters).codes  # NA: -1
        self.prompt = trace["prompt_tokens"].to_numpy(dtype=np.int64)
        self.output = trace["output_tokens"].to_numpy(dtype=np.int64)
        self.rid = trace["request_id"].to_numpy(dtype=np.int64)
        # read in the hot loop: a list indexes faster
        self.arrival = trace["arrival_s"].to_numpy(dtype=np.float64).tolist()
        self.hashes, self.hash_block_size = request_hashes(trace)   # prefix cache
        # Requests exist from arrival to completion only; results go to columnar arrays so a
        # starving hour with 10^5 requests stays within a few hundred MB.
        self.out = Outcomes(self.output, prefix=self.hashes is not None)
        # the trace row of each position of the arrays above; None: the identity (no
        # frontend delay reorders what the engine gets, twin.costs.frontend)
        self.row = None
        self._admit_in_frontend_order(profile)
        # read once per arrival: an array's item is a Python int, a numpy array's a numpy
        # scalar (slower to index, and int() of it once more)
        self.aid, self.prompt, self.output, self.rid = (
            array("q", np.ascontiguousarray(a, dtype=np.int64).tobytes())
            for a in (self.aid, self.prompt, self.output, self.rid))
        # A starving hour holds ~10^5 waiting requests: let them share their int fields (a
        # length seen once is one object; a request id equal to the row is the row's int)
        # instead of each holding its own (-18 MB at 2*10^5 waiting).
        self.shared: dict[int, int] = {}
        self.horizon = window_s if window_s is not None else (self.arrival[-1] if n else 0.0)
        if sample_dt is None:
            sample_dt = default_sample_dt(self.horizon)
        self.rec = Recorder(sample_dt, self.sched.pool.num_blocks, record_steps,
                            prefix=self.hashes is not None)
        self.step_time = profile.step_time
        # an arrival the waiting loop would pass over changes the price of the steps ahead
        prices = getattr(profile.step_time, "prices", None)   # a measured replay has none
        self.sched.prices_skipped = bool(prices and prices("waiting_skipped"))
        self.load_model = profile.load_time

    def _admit_in_frontend_order(self, profile: Profile) -> None:
        """With a frontend that delays requests (an adapter's first, ``profile.frontend``),
        the engine gets them in the order they leave the frontend: the per-position arrays
        are put in that order, ``arrival`` holds the times the engine gets them and ``row``
        each one's trace row (its outcomes, and its TTFT from its own arrival, stay there)."""
        adm = profile.frontend.admission_order(np.asarray(self.arrival), self.aid)
        if adm is None:
            return
        order, admitted = adm
        self.row = order.tolist()
        self.aid, self.prompt = self.aid[order], self.prompt[order]
        self.output, self.rid = self.output[order], self.rid[order]
        self.arrival = admitted.tolist()
        if self.hashes is not None:
            self.hashes = [self.hashes[j] for j in self.row]

    def arrive(self, i: int) -> None:
        """The request at position ``i`` reaches the engine (its trace row: ``row[i]``)."""
        sched = self.sched
        row = i if self.row is None else self.row[i]
        if (self.max_in_flight is not None
                and sched.in_flight() >= self.max_in_flight):
            self.out.status[row] = RequestStatus.REJECTED   # the client's connection failed
            return
        req_id, p, o = self.rid[i], self.prompt[i], self.output[i]
        shared = self.shared
        r = Request(row, row if req_id == row else req_id, self.arrival[i], self.aid[i],
                    shared.setdefault(p, p), shared.setdefault(o, o),
                    self.hashes[i] if self.hashes is not None else None, self.hash_block_size)
        if row != i:
            r.key = i   # first come, first served in the order the engine got them
        if not sched.add_request(r):
            self.out.record(r)

    def engine(self, env, bar):
        """The process (``env``: a :class:`ManualEnv`, or a ``simpy.Environment``): arrivals,
        idle waits, then one priced step (or a run of identical decode steps) at a time.
        Runs once per step (~10^5 per simulated hour): the scheduler's and recorder's
        methods are bound once, and ``StepPlan``'s properties read as their fields."""
        sched, rec, out, arrive = self.sched, self.rec, self.out, self.arrive
        has_work, schedule, finish_step = sched.has_work, sched.schedule, sched.finish_step
        quiet_steps, record, rec_step = sched.quiet_steps, out.record, rec.step
        decode_run, one_step, timeout = self.decode_run, self.one_step, env.timeout
        arrival_list, window_s = self.arrival, self.window_s
        featurize, jump, horizon = self.server.featurize, self.jump, self.horizon
        i = 0
        idle = False   # the engine waited for an arrival since its last step
        while True:
            now = env.now
            n = self.n   # grows while a router feeds the clock (twin.sim.fed)
            while i < n and arrival_list[i] <= now:
                arrive(i)
                i += 1
            if window_s is not None and now >= window_s:
                break
            if not has_work():
                if i >= n:
                    break
                rec.sample(now, sched)
                idle = True
                yield timeout(arrival_list[i] - now)
                continue
            plan = schedule(now)
            if not (plan.decode_n or plan.prefill_tokens) and not plan.preempted:   # num_tokens
                # nothing can run until something arrives (cannot happen for a config vLLM
                # starts, where any single request fits the KV cache); never spin
                if i >= n:
                    break
                idle = True
                yield timeout(arrival_list[i] - now)
                continue
            f = featurize(plan)
            steps = 1
            was_idle, idle = idle, False
            if was_idle:
                f = after_idle(f)   # a step of its own: the run after it is warm
            elif jump and plan.group_decode and not plan.explicit and not plan.loads:
                steps = quiet_steps(plan)   # a pure decode step (plan.pure_decode)
            if steps > 1:
                dur, steps, i = decode_run(plan, f, now, steps, i)
            else:
                dur = one_step(plan, f)
            fed = yield timeout(dur)
            if fed is not None:   # a router fed arrivals during the run (twin.sim.fed)
                dur, steps, i = fed
            rec_step(plan, now, dur, steps, was_idle)
            t = env.now
            for r in finish_step(plan, t, steps):
                record(r)
            if t >= rec.next_sample:
                rec.sample(t, sched)
                if bar is not None:
                    bar.update(min(t, horizon) - bar.n)
                if self.stop is not None and self.stop(t, out):
                    self.stopped_s = t
                    break

    def decode_run(self, plan, f, now: float, steps: int, i: int) -> tuple[float, int, int]:
        """Price a run of ``steps`` identical pure decode steps in one closed form, cut at
        the first arrival that could change the schedule (arrivals that cannot are admitted
        to the queue on the way) and at the window's end. Returns (duration, steps, the next
        arrival's position: its trace row is ``row[i]``, see :meth:`arrive`)."""
        step_time, sched, arrival_list, aid = self.step_time, self.sched, self.arrival, self.aid
        ctx_step = plan.decode_n
        dur, first, last = step_time.decode_run(f, ctx_step, steps)
        end = now + dur
        cut = steps
        while i < self.n and arrival_list[i] < end:
            if sched.arrival_may_change(aid[i]):
                cut = step_time.steps_within(f, ctx_step, steps, arrival_list[i] - now)
                break
            self.arrive(i)
            i += 1
        window_s = self.window_s
        if window_s is not None and end > window_s:
            cut = min(cut, step_time.steps_within(f, ctx_step, steps, window_s - now))
        if cut != steps:
            steps = cut
            dur, first, last = step_time.decode_run(f, ctx_step, steps)
        self.rec.itl.add_range(first, last, steps, plan.decode_n)
        return dur, steps, i

    def one_step(self, plan, f) -> float:
        """Price one step: its batch, plus the adapter loads inside it."""
        dur = self.step_time(f)
        if plan.loads:
            lt = 0.0
            for ld in plan.loads:
                lt += self.load_model.load(self.adapter_bytes[ld.adapter], ld.from_disk)
            self.rec.load(len(plan.loads), lt)
            dur += lt
        if plan.decode_n:
            self.rec.itl.add_range(dur, dur, 1, plan.decode_n)   # itl.add, one call less
        return dur


def _result(clock: _Clock, config: ServingConfig, profile: Profile, duration: float,
            window_s: float | None) -> RunResult:
    """The run's tables: requests still running or waiting at the end are recorded as such."""
    sched, out, server = clock.sched, clock.out, clock.server
    for r in sched.running_in_order():
        out.record(r)
    for r in sched.waiting:
        out.record(r)
    # a starving hour ends with ~10^5 waiting requests: free them before the result tables
    # are built (the run's peak memory)
    sched.waiting.clear()
    meta = {"config": config.to_dict(), "profile": profile.name, "window_s": window_s,
            "twin_version": __import__("twin").__version__}
    if server.layout != "vllm":   # vLLM's default layout has always gone without the key
        meta["policy"] = server.layout
    result = build_result(clock.trace, out, clock.rec, sched, server.cache,
                          kv_tokens=server.kv_tokens, duration=duration, window_s=window_s,
                          max_model_len=config.max_model_len, meta=meta,
                          # a replay of recorded durations (ReplayStepTime) has neither
                          dispersion=getattr(profile.step_time, "dispersion", None),
                          autocorrelation=getattr(profile.step_time, "autocorrelation", None),
                          frontend=profile.frontend)
    pool = server.adapter_pool(result.summary["duration_s"])
    if pool is not None:
        result.summary["adapter_pool"] = pool
    # the slots vLLM's kernel grid spans; None where it spans the step's adapters (S-LoRA,
    # split clients: ``step_adapters_max`` covers them)
    slots = getattr(server.featurize, "max_loras", None)
    beyond = extrapolation(profile, clock.rec.adapters_max, slots)
    if beyond is not None:   # priced past the batches the step time was fitted on
        result.summary["extrapolated"] = beyond
    return result


def _progress(enabled: bool, horizon: float):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # lazy: tqdm only for an interactive progress bar

    return tqdm(total=round(horizon, 1), unit="sim-s", desc="simulating",
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} sim-s [{elapsed}<{remaining}]")

"""The twin's engine: a SimPy process that steps the shared scheduler in simulated time.

Each iteration asks the scheduler for a step, prices it with the profile's step-time and
load-time models and advances the clock. A pure decode step whose blocked state persists
is the first of a run of identical steps; the run is advanced in one jump up to the next
completion, KV-block shortfall, or arrival that could change the schedule (DESIGN §4), so
the cost of a simulation follows the events, not the tokens.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import simpy

from twin.config import ServingConfig, refuse_unserved_adapters
from twin.errors import ConfigError, TwinInputError
from twin.costs.profile import Profile, load_profile
from twin.costs.step_time import after_idle, features
from twin.sched import AdapterCache, Request, RequestStatus, Scheduler
from twin.results.recorder import Outcomes, Recorder, build_result
from twin.results.results import RunResult, crop_window
from twin.workload.catalog import AdapterCatalog
from twin.workload.schema import validate_trace


def kv_capacity_tokens(config: ServingConfig, profile: Profile) -> int:
    """KV-cache tokens for this config, refusing configs vLLM refuses to start."""
    tokens = profile.memory.kv_tokens(config)
    if tokens < config.max_model_len:
        m = profile.memory
        raise ConfigError(
            f"the KV cache holds {tokens} tokens, fewer than one max_model_len request "
            f"({config.max_model_len}); vLLM refuses to start. Memory: "
            f"{config.gpu_memory_utilization:.2f} x {m.gpu_memory_gib:.2f} GiB usable, weights "
            f"{m.weights_gib:.2f} GiB, LoRA slots "
            f"{m.lora_bytes(config.max_loras, config.max_lora_rank, config.enable_lora) / 2**30:.2f} "
            f"GiB (max_loras={config.max_loras} x max_lora_rank={config.max_lora_rank}), "
            f"activations {m.activation_bytes(config.max_num_seqs, config.max_num_batched_tokens) / 2**30:.2f} GiB. "
            "Lower max_model_len, max_loras or max_lora_rank.", file="config",
            field="max_model_len")
    return tokens


def simulate(trace: pd.DataFrame, config: ServingConfig, profile: Profile | str | None = None,
             catalog: AdapterCatalog | None = None, *, window_s: float | None = None,
             progress: bool = False, record_steps: bool = False, sample_dt: float | None = None,
             trace_source: str = "trace", build_server=None,
             max_in_flight: int | None = None, jump: bool = True) -> RunResult:
    """Simulate ``trace`` served with ``config`` on the hardware/model of ``profile``.

    ``window_s``: measure a fixed window as ``vllm bench serve`` runs with a time limit do
    (arrivals after it are dropped, requests unfinished at its end are reported as such);
    by default the run goes on until every request has finished.

    ``max_in_flight``: a client-side cap on requests in flight (running + waiting). An
    arrival that finds that many fails on the client and never reaches the server (status
    ``rejected``; unlike a request vLLM refuses for ``max_model_len``, it still counts in the
    offered load). A long overloaded ``vllm bench
    serve`` hits such a cap when its ~28k ephemeral ports are all held by open connections.

    ``config.policy`` other than ``"vllm"`` hands the run to that serving strategy
    (``twin.policies``). ``build_server`` is how a single-server strategy plugs its own
    scheduler in: ``build_server(config, profile, catalog, trace, trace_source)`` returns a
    ``twin.policies.ServerParts`` (scheduler, adapter cache, KV tokens, step featurizer).

    ``jump=False`` prices every decode step on its own instead of advancing quiet decode
    runs in one closed-form jump: the step-by-step reference the jump must equal (tests);
    the results are the same, only slower.
    """
    if window_s is not None and not window_s > 0:   # NaN too: such a window measures nothing
        raise TwinInputError(f"window_s must be a number > 0, got {window_s!r}",
                             field="window_s")
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    profile.check_max_model_len(config)
    # -- policy hook (twin.policies, issue 7): other strategies run through their class -----
    if build_server is None and config.policy != "vllm":
        from twin.policies import get_policy

        return get_policy(config.policy).simulate(
            trace, config, profile, catalog, window_s=window_s, progress=progress,
            record_steps=record_steps, sample_dt=sample_dt, trace_source=trace_source).result
    trace = validate_trace(trace, source=trace_source)
    if build_server is None:
        refuse_unserved_adapters(config, trace, trace_source)
    trace = crop_window(trace, window_s)
    names = trace["adapter"].dropna().unique().tolist()
    if catalog is None:
        catalog = AdapterCatalog.uniform(sorted(names), config.max_lora_rank)

    # adapters are small ints in catalog order; bytes for load times from the model shape
    adapter_bytes = [profile.model.adapter_bytes(catalog.rank(a)) for a in catalog.adapters]
    if build_server is None:
        catalog.check(trace, config.max_lora_rank, trace_source)
        kv_tokens = kv_capacity_tokens(config, profile)
        num_blocks = kv_tokens // config.block_size
        preload = list(range(len(catalog))) if config.preload_adapters else []
        cache = AdapterCache(config.max_loras, config.max_cpu_loras, preload=preload)
        sched = Scheduler(num_blocks=num_blocks, block_size=config.block_size,
                          max_num_seqs=config.max_num_seqs,
                          max_num_batched_tokens=config.max_num_batched_tokens,
                          max_loras=config.max_loras, max_model_len=config.max_model_len,
                          adapter_cache=cache, enable_lora=config.enable_lora)
        # vLLM's features: LoRA padded to max_lora_rank, the kernel spanning max_loras slots
        featurize = partial(features, max_lora_rank=config.max_lora_rank,
                            max_loras=config.max_loras)
    else:  # a strategy's own server (twin.policies); adapter ids are catalog order as above
        parts = build_server(config, profile, catalog, trace, trace_source)
        sched, cache, kv_tokens, featurize = (parts.scheduler, parts.cache, parts.kv_tokens,
                                              parts.featurize)

    n = len(trace)
    arrival = trace["arrival_s"].to_numpy(dtype=np.float64)
    aid = pd.Categorical(trace["adapter"], categories=catalog.adapters).codes  # NA -> -1
    prompt = trace["prompt_tokens"].to_numpy(dtype=np.int64)
    output = trace["output_tokens"].to_numpy(dtype=np.int64)
    rid = trace["request_id"].to_numpy(dtype=np.int64)
    arrival_list = arrival.tolist()   # read in the hot loop: a list indexes faster
    # Requests exist from arrival to completion only; results go to columnar arrays so a
    # starving hour with 10^5 requests stays within a few hundred MB.
    out = Outcomes(output)

    # A starving hour holds ~10^5 waiting requests: let them share their int fields (a
    # length seen once is one object; a request id equal to the row is the row's int)
    # instead of each holding its own (-18 MB at 2*10^5 waiting).
    shared: dict[int, int] = {}

    def arrive(i: int) -> None:
        if max_in_flight is not None and sched.num_running + sched.num_waiting >= max_in_flight:
            out.status[i] = RequestStatus.REJECTED   # the client's connection failed
            return
        req_id, p, o = int(rid[i]), int(prompt[i]), int(output[i])
        r = Request(i, i if req_id == i else req_id, arrival_list[i], int(aid[i]),
                    shared.setdefault(p, p), shared.setdefault(o, o))
        if not sched.add_request(r):
            out.record(r)

    horizon = window_s if window_s is not None else (arrival_list[-1] if n else 0.0)
    if sample_dt is None:
        sample_dt = max(horizon / 2000.0, 0.05)
    rec = Recorder(sample_dt, sched.pool.num_blocks, record_steps)
    step_time = profile.step_time
    load_model = profile.load_time
    env = simpy.Environment()
    bar = _progress(progress, horizon)

    def engine():
        i = 0
        idle = False   # the engine waited for an arrival since its last step
        while True:
            now = env.now
            while i < n and arrival_list[i] <= now:
                arrive(i)
                i += 1
            if window_s is not None and now >= window_s:
                break
            if not sched.has_work():
                if i >= n:
                    break
                rec.sample(now, sched)
                idle = True
                yield env.timeout(arrival_list[i] - now)
                continue
            plan = sched.schedule(now)
            if not plan.num_tokens and not plan.preempted:
                # nothing can run until something arrives (cannot happen for a config vLLM
                # starts, where any single request fits the KV cache); never spin
                if i >= n:
                    break
                idle = True
                yield env.timeout(arrival_list[i] - now)
                continue
            f = featurize(plan)
            steps = 1
            was_idle, idle = idle, False
            if was_idle:
                f = after_idle(f)   # a step of its own: the run after it is warm
            elif jump and plan.pure_decode:
                steps = sched.quiet_steps(plan)
            if steps > 1:
                ctx_step = plan.decode_n
                dur, first, last = step_time.decode_run(f, ctx_step, steps)
                end = now + dur
                cut = steps
                while i < n and arrival_list[i] < end:
                    if sched.arrival_may_change(int(aid[i])):
                        cut = step_time.steps_within(f, ctx_step, steps, arrival_list[i] - now)
                        break
                    arrive(i)
                    i += 1
                if window_s is not None and end > window_s:
                    cut = min(cut, step_time.steps_within(f, ctx_step, steps, window_s - now))
                if cut != steps:
                    steps = cut
                    dur, first, last = step_time.decode_run(f, ctx_step, steps)
                rec.itl.add_range(first, last, steps, plan.decode_n)
            else:
                dur = step_time(f)
                if plan.loads:
                    lt = 0.0
                    for ld in plan.loads:
                        lt += load_model.load(adapter_bytes[ld.adapter], ld.from_disk)
                    rec.load(len(plan.loads), lt)
                    dur += lt
                if plan.decode_n:
                    rec.itl.add(dur, plan.decode_n)
            rec.step(plan, now, dur, steps, was_idle)
            yield env.timeout(dur)
            for r in sched.finish_step(plan, env.now, steps):
                out.record(r)
            if env.now >= rec.next_sample:
                rec.sample(env.now, sched)
                if bar is not None:
                    bar.update(min(env.now, horizon) - bar.n)

    env.process(engine())
    env.run()
    end_time = env.now
    rec.sample(end_time, sched)
    if bar is not None:
        bar.update(max(0.0, horizon - bar.n))
        bar.close()
    duration = window_s if window_s is not None else end_time
    for r in sched.running_in_order():
        out.record(r)
    for r in sched.waiting:
        out.record(r)
    # a starving hour ends with ~10^5 waiting requests: free them before the result tables
    # are built (the run's peak memory)
    sched.waiting.clear()
    meta = {"config": config.to_dict(), "profile": profile.name, "window_s": window_s,
            "twin_version": __import__("twin").__version__}
    return build_result(trace, out, rec, sched, cache, kv_tokens=kv_tokens, duration=duration,
                        window_s=window_s, max_model_len=config.max_model_len, meta=meta)


def _progress(enabled: bool, horizon: float):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=round(horizon, 1), unit="sim-s", desc="simulating",
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} sim-s [{elapsed}<{remaining}]")


"""The reference executor: continuous batching of a multi-LoRA Llama on a wall clock.

It drives the *same* ``Scheduler`` / ``KVBlockPool`` / ``AdapterCache`` objects as the twin
(DESIGN §1) with real tensors. A step runs in three phases: *load* asks the scheduler for a
plan and performs its adapter loads (disk read, pack, host→device copy, vLLM-style, inside
the step); *forward* extends the requests' KV block tables and runs one forward pass over
the mixed batch of prefill chunks and decodes (``LlamaModel.step``, the only torch work);
*commit* samples greedily, ends the step on the clock and commits it to the scheduler and
the recorder. The memory layout (vLLM's slots, S-LoRA's unified pool) is the adapter store
the server was built with; the loop only calls its hooks. Requests are released when their
arrival time has come; the engine sleeps when idle. Unlike the twin it never jumps over
runs of decode steps: every step is computed and timed.

Clock. A *logical* clock advances by each step's measured duration and, idle, jumps to the
next arrival (sleeping until the wall clock catches up): step ``i`` is ``[start_i, start_i +
duration_i)``, so the twin replaying the durations (``twin.sim.replay``) sees the same
instants and must make the same batches. The start-up heap is out of the collector (vLLM).

Prompts. A trace holds lengths (and maybe ``hash_ids``); token ids are synthetic and
deterministic (:func:`request_token_ids`: equal hash ids, equal tokens), made before the
clock starts. With the prefix cache on, a hit reads the cached KV blocks
(``twin.executor.prefix_blocks``). Generation is greedy and stops at ``output_tokens``
(EOS ignored), as ``vllm bench`` runs with ``ignore_eos`` do.

Bad adapters. Adapters the trace uses are checked up front from their configs (missing dir,
pickle-only weights, unsupported PEFT features, rank > ``max_lora_rank``): their requests
fail. Anything found only when the weights are read (corrupt file, wrong shapes, NaN/inf
weights) fails the requests that needed the load, in that step; the adapter is then dropped
from the caches. A request whose logits turn NaN/inf (finite weights that overflow) is
stopped after that step rather than emitting argmax-of-NaN tokens. Either way the request's
status is ``failed`` with the reason in ``error``, and every other request runs normally:
attention never reads KV slots outside a request's own context (``model.context_slots``), so
what a failed request leaves in freed blocks cannot leak. A trace naming an adapter the
catalog lacks is refused before the run starts (:class:`TwinInputError`).
"""

from __future__ import annotations

import time
from array import array

import numpy as np
import pandas as pd
import torch

from twin.config import ServingConfig
from twin.costs.step_time import after_idle
from twin.executor.adapter_store import SlotAdapterStore as _AdapterStore
from twin.executor.adapters import AdapterError, load_error
from twin.executor.gc_heap import frozen_heap
from twin.executor.inputs import check_adapter_dir, checked_inputs, request_token_ids
from twin.executor.kv_memory import choose_num_blocks
from twin.executor.lora import GroupedLoRASlots
from twin.executor.loop_state import STEP_COLUMNS, Arrivals, Clock, NoProgress, Step, no_sync
from twin.executor.model import LlamaModel, SeqChunk
from twin.executor.prefix_blocks import block_tables
from twin.executor.run_meta import run_meta
from twin.executor.slora import SLORA_MAX_RANK, BuiltServer, build_slora
from twin.results.recorder import (Outcomes, Recorder, build_result, default_sample_dt,
                                   trace_horizon)
from twin.results.results import RunResult
from twin.sched import Request, RequestStatus
from twin.sched.adapter_cache import AdapterLoad
from twin.servers import build_server
from twin.workload.catalog import AdapterCatalog


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
def execute(trace: pd.DataFrame, config: ServingConfig, model, catalog=None, *,
            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            threads: int | None = None, window_s: float | None = None, progress: bool = False,
            seed: int = 0, num_gpu_blocks: int | None = None, kv_cache_gib: float | None = None,
            time_scale: float = 1.0, keep_tokens: bool = False, trace_source: str = "trace",
            sample_dt: float | None = None, gc_freeze: bool = True) -> RunResult:
    """Serve ``trace`` for real with ``config`` and return a :class:`RunResult` like the
    twin's, plus the per-step log in ``result.steps`` (see ``STEP_COLUMNS``).

    ``model``: an HF Llama directory or a loaded :class:`LlamaModel` (then ``device`` and
    ``dtype`` are the model's). ``catalog``: see ``inputs.resolve_catalog``; adapter ids are
    catalog order, as in the twin. ``threads``: torch CPU threads for the run.
    ``num_gpu_blocks`` / ``kv_cache_gib``: KV capacity (see :func:`choose_num_blocks`).
    ``time_scale``: multiplies arrival times (0.5 replays the trace twice as fast).
    ``keep_tokens``: add the generated token ids per request (column ``output_token_ids``).
    ``gc_freeze``: False scans the start-up heap in every full collection (module docstring).
    """
    trace, catalog = checked_inputs(trace, config, catalog, time_scale=time_scale,
                                    window_s=window_s, trace_source=trace_source)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        if not isinstance(model, LlamaModel):
            model_name = str(model)
            model = LlamaModel.from_pretrained(model, device=device, dtype=dtype)
        else:
            model_name = getattr(model, "name", "LlamaModel")
        engine = _Engine(trace, config, model, catalog, window_s=window_s, progress=progress,
                         seed=seed, num_gpu_blocks=num_gpu_blocks, kv_cache_gib=kv_cache_gib,
                         keep_tokens=keep_tokens, sample_dt=sample_dt,
                         meta={"model": model_name, "time_scale": time_scale, "seed": seed,
                               "threads": torch.get_num_threads(), "trace": trace_source})
        with frozen_heap(gc_freeze):
            return engine.run()
    finally:
        torch.set_num_threads(old_threads)


class _Engine:
    check_adapter = staticmethod(check_adapter_dir)   # the up-front check of an adapter
    arrivals_class = Arrivals   # releases the trace's requests (a fleet's: when delivered)

    def __init__(self, trace, config: ServingConfig, model: LlamaModel, catalog: AdapterCatalog,
                 *, window_s, progress, seed, num_gpu_blocks, kv_cache_gib, keep_tokens,
                 sample_dt, meta):
        self.trace, self.model, self.catalog = trace, model, catalog
        self.window_s, self.progress, self.seed = window_s, progress, seed
        self.keep_tokens, self.meta = keep_tokens, meta
        if config.max_model_len > model.shape.max_position_embeddings:
            # vLLM derives max_model_len from the model; it never serves beyond it
            config = config.replace(max_model_len=model.shape.max_position_embeddings)
        self.config = config
        self.names = names = catalog.adapters
        self.ids = {a: i for i, a in enumerate(names)}
        paths = list(catalog.table["path"]) if len(catalog) else []
        # up-front checks of the adapters the trace (or the preload) needs
        used = set(trace["adapter"].dropna().unique()) if config.enable_lora else set()
        if config.enable_lora and config.preload_adapters:
            used |= set(names)
        self.bad: dict[int, str] = {}
        # -- slora hook (issue 7): no slots, so no max_lora_rank ceiling on adapters --------
        self.paged = config.policy == "slora" and config.enable_lora
        max_rank = SLORA_MAX_RANK if self.paged else config.max_lora_rank
        for a in sorted(used, key=self.ids.get):
            msg = self.check_adapter(paths[self.ids[a]], a, max_rank)
            if msg is not None:
                self.bad[self.ids[a]] = msg
        # the server (twin.servers.build_server, as the twin builds it) and its torch side
        if self.paged:   # unified page pool, SLoRAScheduler, exact-rank store
            built = build_slora(model, config, trace, catalog, self.bad,
                                num_gpu_blocks=num_gpu_blocks, kv_cache_gib=kv_cache_gib,
                                choose_num_blocks=choose_num_blocks)
            self.meta["slora"] = built.meta
        else:
            built = self._build_vllm(config, model, catalog, trace, names, paths,
                                     num_gpu_blocks, kv_cache_gib)
        self.num_blocks, self.kv, self.tables = built.num_blocks, built.kv, built.tables
        self.slots, self.store = built.lora, built.store
        self.server = server = built.server
        self.sched, self.cache, self.featurize = server.scheduler, server.cache, server.featurize
        if not self.paged:   # start-up loads (preload_adapters), as AdapterCache preloads
            self.store.preload(self.cache, self.bad)
        self.sample_dt = (sample_dt if sample_dt is not None
                          else default_sample_dt(trace_horizon(trace, window_s)))

    def _build_vllm(self, config, model, catalog, trace, names, paths, num_gpu_blocks,
                    kv_cache_gib) -> BuiltServer:
        """vLLM's layout: LoRA slots, KV block tables, AdapterCache, Scheduler."""
        slots = None
        if config.enable_lora and len(catalog):
            slots = GroupedLoRASlots(model.shape, config.max_loras, config.max_lora_rank,
                                     dtype=model.dtype, device=model.device)
        num_blocks = choose_num_blocks(model, config, trace, num_gpu_blocks=num_gpu_blocks,
                                       kv_cache_gib=kv_cache_gib)
        preload = ([i for i in range(len(names)) if i not in self.bad]
                   if config.enable_lora and config.preload_adapters else [])
        # the prefix cache's hits read the KV blocks they name (twin.executor.prefix_blocks)
        server = build_server(config, None, catalog, layout="vllm", num_blocks=num_blocks,
                              preload=preload)
        return BuiltServer(server, num_blocks,
                           model.allocate_kv_cache(num_blocks, config.block_size),
                           block_tables(num_blocks, config.block_size, server.scheduler), slots,
                           _AdapterStore(model, slots, names, paths, config.max_lora_rank))

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Serve the trace: tick (release the requests whose arrival has come, run a step
        when the scheduler plans one) until the run is over; when nothing can run, wait on
        the wall clock for the next arrival."""
        self._start_run()
        clock = self.clock
        while (t := self._tick()) is not None:
            if t > clock.now:
                clock.wait_until(t)
        return self._finish_run()

    def _tick(self) -> float | None:
        """Release the requests due by now, then run one step (load, forward, commit) if the
        scheduler plans one. Returns when to tick next: the step's end, the next arrival when
        nothing can run until it comes, None once the run is over (``twin.executor.fed``)."""
        clock, arrivals, sched, rec = self.clock, self.arrivals, self.sched, self.rec
        for r in arrivals.due(clock.now):
            self._arrive(r)
        if self.window_s is not None and clock.now >= self.window_s:
            return None
        if not sched.has_work():
            if not arrivals.left:
                return None
            if clock.now >= rec.next_sample:
                rec.sample(clock.now, sched)
            return arrivals.next_s
        step = self._load_phase()
        if step is None:   # nothing can run until something arrives (as the twin waits)
            return arrivals.next_s if arrivals.left else None
        self._forward_phase(step)
        return self._commit_phase(step)

    def _start_run(self) -> None:
        """The run's state: arrivals, logical clock, outcomes, token ids, recorder."""
        self.arrivals = self.arrivals_class(trace := self.trace, self.ids, self.config.enable_lora)
        named = self.arrivals.hashes is not None   # the trace names its tokens: prefix figures
        self.out = Outcomes(trace["output_tokens"].to_numpy(np.int64), failures=True,
                            keep_tokens=self.keep_tokens, prefix=named)
        self.seqs: dict[int, list[int]] = {}    # request idx -> prompt + generated token ids
        self.memo: dict = {}                    # hash id -> its tokens (request_token_ids)
        self.prompt_ids = self._token_ids_ahead()
        self.rec = Recorder(self.sample_dt, self.num_blocks, prefix=named)
        self.bar = NoProgress()
        if self.progress:
            from tqdm.auto import tqdm  # lazy: tqdm only for progress=True

            self.bar = tqdm(total=len(trace), unit="req",
                            desc=f"executing ({self.model.device.type})")
        self.sync = torch.cuda.synchronize if self.model.device.type == "cuda" else no_sync
        self.clock = Clock()

    def _token_ids_ahead(self) -> list:
        """Every request's token ids before the clock starts (vLLM's engine gets prompts
        tokenized; made at arrival, ~0.3 ms each, they landed in the next step, issue 17),
        as 4-byte arrays (Python ints take ~9x that)."""
        return [self._token_ids(i) for i in range(self.arrivals.n)]

    def _token_ids(self, i: int) -> array:
        return array("i", request_token_ids(self.arrivals.request(i), self.model.shape.vocab,
                                            self.seed, self.memo))

    def _arrive(self, r: Request) -> None:
        """A request arrives: failed at once if its adapter is known bad, rejected if it
        exceeds max_model_len (vLLM's HTTP 400), else queued with its prompt's token ids."""
        now = self.clock.now
        if self.config.enable_lora and r.adapter in self.bad:
            self._fail(r, now, self.bad[r.adapter])
            return
        if not self.sched.add_request(r):
            self.out.record(r)
            self.out.error[r.idx] = (
                f"maximum context length is {self.config.max_model_len} tokens; requested "
                f"{r.prompt + r.output} ({r.prompt} prompt, {r.output} output)")
            self.bar.update(1)
            return
        # prompt (+ output tokens its hash ids name, fed instead of the sampled ones)
        self.seqs[r.idx], self.prompt_ids[r.idx] = self.prompt_ids[r.idx].tolist(), None

    def _fail(self, r: Request, now: float, msg: str) -> None:
        self.out.fail(r, now, msg)
        self.bar.update(1)

    # -- load: schedule the step and perform its adapter loads ------------------------------
    def _load_phase(self) -> Step | None:
        """Plan the step and perform its adapter loads, inside the step as vLLM does
        (``set_active_loras`` before the forward); the requests of an adapter that cannot
        be loaded fail in this step. None when the plan is empty."""
        perf = time.perf_counter
        t = perf()
        t_gap = t - self.clock.wall
        self.store.before_schedule(self.cache)   # S-LoRA: free the pages of idle adapters
        plan = self.sched.schedule(self.clock.now)
        t_sched = perf() - t
        if not plan.num_tokens and not plan.preempted:
            return None
        f = self.featurize(plan)   # as the twin prices this step
        if self.clock.idle:
            f = after_idle(f)
        for r in plan.preempted:
            self.tables.release(r.idx)
        step = Step(plan, f, t_sched, t_gap=t_gap)
        t = perf()
        for ld in plan.loads:
            self._load(step, ld)
        step.t_load = perf() - t if plan.loads else 0.0
        if step.failed:
            self._fail_loads(step)
        return step

    def _load(self, step: Step, ld: AdapterLoad) -> None:
        """One load of the plan (disk read, pack, host→device copy), timed into ``step``;
        a failure is noted in ``step.failed``."""
        step.n_disk += ld.from_disk
        known = self.bad.get(ld.adapter)
        if known is not None:   # failed before: no second attempt
            self.store.evict(ld)
            step.failed[ld.adapter] = known
            return
        try:
            r_s, p_s, c_s = self.store.apply(ld)
        except (AdapterError, OSError) as exc:   # OSError: unreadable file, vanished directory
            step.failed[ld.adapter] = load_error(self.names[ld.adapter], exc)
            return
        step.t_read += r_s
        step.t_pack += p_s
        step.t_copy += c_s

    def _fail_loads(self, step: Step) -> None:
        """Abort the plan's requests whose adapter failed to load, and drop the adapters."""
        failed = step.failed
        for r in [r for r, _ in step.plan.explicit if r.adapter in failed]:
            self.sched.abort(r, step.plan)
            self.tables.release(r.idx)
            self.seqs.pop(r.idx, None)
            self._fail(r, self.clock.now, failed[r.adapter])
            step.n_failed += 1
        for a, msg in failed.items():
            self.bad[a] = msg
            self.store.forget(a)
            self.cache.drop(a)

    # -- forward: the batch through the model (torch) ---------------------------------------
    def _forward_phase(self, step: Step) -> None:
        """Build the batch (each request's new tokens, KV block table and adapter slot) and
        run one forward pass over it."""
        sched, tables, store = self.sched, self.tables, self.store
        step.items = sched.batch(step.plan)
        tables.before_step(step.plan, step.items)
        chunks = []
        for r, k in step.items:
            start = sched.computed(r)
            toks = self.seqs[r.idx]
            chunks.append(SeqChunk(toks[start:start + k], start,
                                   tables.ensure_for(r, start, start + k),
                                   store.slot(r.adapter)))
            step.starts.append(start)
        if not step.failed:
            assert tables.used == step.plan.kv_blocks, (
                f"KV blocks: the executor's tables hold {tables.used}, the scheduler "
                f"counts {step.plan.kv_blocks}")
        if chunks:
            t = time.perf_counter()   # forward_s: the batch's tensors + the model (model.step)
            timing: dict = {}
            step.logits = self.model.step(chunks, self.kv, self.slots, timing=timing)
            step.t_inputs = timing.get("inputs_s", 0.0)
            self.sync()
            step.t_fwd = time.perf_counter() - t

    # -- commit: sample, advance the clock, finish, record ----------------------------------
    def _commit_phase(self, step: Step) -> float:
        """Sample the next tokens, end the step on the clock (its wall duration) and commit
        it (:meth:`_commit`); returns the step's end (a fleet's replica commits there)."""
        nonfinite = self._sample(step) if step.logits is not None else []
        end = time.perf_counter()
        self._commit(step, nonfinite, end, end - self.clock.wall)
        return self.clock.now

    def _commit(self, step: Step, nonfinite: list[int], end: float, dur: float) -> None:
        """Commit the step, ``dur`` long, ended at wall instant ``end``, to the scheduler;
        stop requests whose logits were NaN/inf; record the step and the finished ones."""
        clock = self.clock
        t_end = clock.now + dur
        done = self.sched.finish_step(step.plan, t_end)
        for j in nonfinite:
            self._stop_nonfinite(step.items[j], step.starts[j], done, t_end)
        step.n_failed += len(nonfinite)
        self._record_step(step, dur)
        for r in done:
            self.tables.release(r.idx)
            toks = self.seqs.pop(r.idx)
            assert len(toks) - r.prompt == r.generated, (len(toks), r.prompt, r.generated)
            self.out.record(r, toks)
            self.bar.update(1)
        clock.step_ended(t_end, end)
        if clock.now >= self.rec.next_sample:
            self.rec.sample(clock.now, self.sched)

    def _sample(self, step: Step) -> list[int]:
        """Greedy tokens, appended where a sequence's step ends its known tokens (end of
        prompt / recompute, or a decode). Returns the rows whose logits were not finite."""
        t = time.perf_counter()
        # one pass gives the greedy token and the check that the logits are finite
        top, next_ids = step.logits.max(dim=-1)
        for (r, k), start, tok in zip(step.items, step.starts, next_ids.tolist()):
            toks = self.seqs[r.idx]
            if start + k == len(toks):
                toks.append(tok)
        finite = torch.isfinite(top)
        nonfinite = [] if bool(finite.all()) else (~finite).nonzero().flatten().tolist()
        step.t_samp = time.perf_counter() - t
        return nonfinite

    def _stop_nonfinite(self, item, start: int, done: list, now: float) -> None:
        """Fail a request whose logits were NaN/inf this step (already committed by
        ``finish_step``) instead of letting it emit argmax-of-NaN tokens as if finished:
        a finished one is recorded as failed, a running one is aborted and its KV blocks
        freed."""
        r, k = item
        who = f"adapter {self.names[r.adapter]!r}" if r.adapter >= 0 else "the base model"
        msg = (f"non-finite logits (NaN/inf) at position {start + k - 1} of request "
               f"{r.request_id} ({who}); the request was stopped")
        if r in done:
            done.remove(r)
        else:
            self.sched.abort(r)
        self.tables.release(r.idx)
        self.seqs.pop(r.idx, None)
        self._fail(r, now, msg)

    def _record_step(self, step: Step, dur: float) -> None:
        """The step's row of the step log (counts toward the next step's time)."""
        plan, items, rec = step.plan, step.items, self.rec
        if plan.decode_n:
            rec.itl.add(dur, plan.decode_n)
        rec.load(len(plan.loads), step.t_load)
        rec.step(plan, self.clock.now, dur, 1, self.clock.idle, extra=(
            len(items), sum(k for _, k in items),
            len({r.adapter for r, _ in items if r.adapter >= 0}), step.n_disk,
            plan.kv_blocks, step.n_failed, step.t_sched, step.t_load, step.t_read,
            step.t_pack, step.t_copy, step.t_fwd, step.t_samp,
            [r.request_id for r, _ in items], [k for _, k in items], step.t_gap, step.t_inputs,
            list(step.features)))

    def _finish_run(self) -> RunResult:
        """The run's result (requests still running or waiting recorded as they stand)."""
        self._record_unfinished()
        duration = self.window_s if self.window_s is not None else self.clock.now
        return self._result(self.out, self.rec, duration)

    def _record_unfinished(self) -> None:
        """The last timeline sample; requests still running or waiting are recorded as
        they stand (a window's end)."""
        now, sched = self.clock.now, self.sched
        self.rec.sample(now, sched)
        self.bar.close()
        for r in sched.running_in_order() + list(sched.waiting):
            if r.status == RequestStatus.DECODING:
                r.generated = sched.computed(r) - r.prompt + 1
            self.out.record(r, (self.seqs.get(r.idx) or [])[:r.prompt + r.generated] or None)

    # -- the result -------------------------------------------------------------------------
    def _result(self, out: Outcomes, rec: Recorder, duration: float) -> RunResult:
        config = self.config
        meta = run_meta(self.meta, config, self.model, self.num_blocks, self.bad, self.names,
                        self.window_s)
        result = build_result(self.trace, out, rec, self.sched, self.cache,
                              kv_tokens=self.num_blocks * config.block_size, duration=duration,
                              window_s=self.window_s, max_model_len=config.max_model_len,
                              meta=meta, step_columns=STEP_COLUMNS)
        summary = result.summary
        summary.update(self.store.summary(self.cache))   # S-LoRA: the unified pool's use
        phases = ["schedule_s", "load_s", "forward_s", "sample_s"]
        summary["executor_phases_s"] = {p: float(result.steps[p].sum()) for p in phases}
        return result

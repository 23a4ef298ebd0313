"""``execute_split``: serve a trace in split mode — one base-executor process, N client
processes (and optionally a training client) — and return one :class:`RunResult`.

The driver checks the inputs as ``twin.executor.execute`` does, gives each client its
requests and adapters (:func:`assign_clients`), allocates the shared-memory buffers,
starts every process (spawn, one torch thread each), releases them together through a
barrier (their clocks start at the same instant), and collects what each sends back.
Any process that fails (or dies, or overruns ``timeout_s``) stops the run: the others are
told to stop, joined with a timeout, terminated if they linger, and the error is raised
as :class:`SplitExecutionError` with the failing process's traceback.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.multiprocessing as mp

from twin.config import ServingConfig
from twin.errors import TwinInputError
from twin.executor.inputs import checked_inputs, resolve_catalog
from twin.executor.split.base import base_main
from twin.executor.split.client import ClientSpec, client_config, client_main
from twin.executor.split.exchange import ClientBuffers
from twin.executor.split.probe import (BASE_CALL_COLUMNS, CALL_COLUMNS, STEP_PROBE_COLUMNS,
                                       probe_tables)
from twin.executor.split.results import merge_results
from twin.executor.split.trainer import TrainerSpec, trainer_main
from twin.executor.shape import LlamaShape
from twin.results.results import RunResult
from twin.workload.catalog import AdapterCatalog

LINKS = ("shm",)


class SplitExecutionError(RuntimeError):
    """A process of a split run failed; the message carries its traceback."""


def adapter_owners(catalog: AdapterCatalog, n: int) -> dict[str, int]:
    """Adapter i of the catalog -> client i % n."""
    return {a: i % n for i, a in enumerate(catalog.adapters)}


def per_client_catalogs(adapters: list) -> tuple[AdapterCatalog, dict[str, int]]:
    """One catalog of every client's adapters (a list of catalog sources, one per client)
    and the client that owns each."""
    cats = [resolve_catalog(c) for c in adapters]
    owner: dict[str, int] = {}
    for i, c in enumerate(cats):
        for a in c.adapters:
            owner.setdefault(a, i)
    table = pd.concat([c.table for c in cats], ignore_index=True)
    return AdapterCatalog(table.drop_duplicates("adapter").reset_index(drop=True)), owner


def assign_clients(trace: pd.DataFrame, catalog: AdapterCatalog, n: int,
                   owner: dict[str, int] | None = None) -> np.ndarray:
    """The client of each request: the trace's ``client`` column if present, else its
    adapter's owner (``owner``, default :func:`adapter_owners`); base-model requests go
    to client 0."""
    if "client" in trace.columns:
        c = trace["client"].to_numpy(np.int64)
        if len(c) and (c.min() < 0 or c.max() >= n):
            row = int(np.nonzero((c < 0) | (c >= n))[0][0])
            raise TwinInputError(f"client {c[row]} out of range [0, {n})", row=row,
                                 field="client")
        return c
    pos = owner if owner is not None else adapter_owners(catalog, n)
    return np.asarray([0 if pd.isna(a) else pos[a] for a in trace["adapter"]], dtype=np.int64)


def client_catalog(catalog: AdapterCatalog, owner: dict[str, int], client: int,
                   trace: pd.DataFrame) -> AdapterCatalog:
    """The adapters client ``client`` holds: those it owns and those its requests name,
    in catalog order."""
    used = set(trace["adapter"].dropna())
    keep = [owner.get(a) == client or a in used for a in catalog.adapters]
    return AdapterCatalog(catalog.table[np.asarray(keep, dtype=bool)].reset_index(drop=True),
                          source=catalog.source)


@dataclass
class _Run:
    """The processes of a run and what they sent back."""

    procs: dict = field(default_factory=dict)       # name -> Process
    got: dict = field(default_factory=dict)         # name -> payload
    stop: object = None      # abort: every process stops (the base included)
    done: object = None      # inference is over: the trainer ends its loop
    ready: object = None
    results: object = None


def execute_split(trace: pd.DataFrame, config: ServingConfig, model, adapters=None, *,
                  clients: int = 1, link: str = "shm", seed: int = 0,
                  dtype: torch.dtype = torch.float32, trainer: TrainerSpec | None = None,
                  num_gpu_blocks: int | None = None, kv_cache_gib: float | None = None,
                  keep_tokens: bool = False, time_scale: float = 1.0,
                  timeout_s: float = 600.0, buffer_rows: int = 1024, logit_rows: int = 64,
                  fault: dict | None = None, trace_source: str = "trace",
                  gc_freeze: bool = True, probe: bool = False) -> RunResult:
    """Serve ``trace`` in split mode (see the module docstring) and return its
    :class:`RunResult`: requests with a ``client`` column, the clients' step logs
    (``steps``, with ``client`` and the split counters), and ``extras``:
    ``base_batches`` (one row per base GEMM), ``client_steps`` (the contract's per-step
    table), ``base_report`` (what the base holds), ``clients`` (each client's adapters and
    tensors) and ``trainer`` (a training client's figures, when ``trainer`` is given).

    ``model``: an HF Llama directory. ``adapters``: a catalog source as
    ``twin.executor.execute`` takes it (adapter i -> client i % ``clients``), or a list of
    them, one per client (then ``clients`` is its length). Requests go to their
    adapter's client unless the trace has a ``client`` column. ``num_gpu_blocks`` /
    ``kv_cache_gib``: each client's KV cache. ``fault``:
    ``{client: step}`` raises in that client's step (tests of the shutdown path).
    ``gc_freeze``: every process freezes its start-up heap out of the cyclic collector,
    as vLLM does (``twin.executor.split.probe``; False: the collector's long pauses
    stall steps). ``probe``: ``extras["probe"]``, where each process's time went
    (:func:`probe_extras`).
    """
    if link not in LINKS:
        raise TwinInputError(f"link {link!r}: the CPU split executor exchanges activations "
                             f"through shared memory only ({', '.join(LINKS)})", field="link")
    owner = None
    if isinstance(adapters, (list, tuple)):   # one catalog per client
        clients = len(adapters)
        adapters, owner = per_client_catalogs(list(adapters)) if clients else (None, None)
    if clients < 1:
        raise TwinInputError(f"clients must be >= 1, got {clients}", field="clients")
    trace, catalog = checked_inputs(trace, config.replace(policy="vllm"), adapters,
                                    time_scale=time_scale, trace_source=trace_source)
    owner = owner if owner is not None else adapter_owners(catalog, clients)
    who = assign_clients(trace, catalog, clients, owner)
    model_dir = str(Path(model))
    shape = LlamaShape.from_dir(model_dir)
    specs = []
    for c in range(clients):
        sub = trace[who == c]
        cat = client_catalog(catalog, owner, c, sub)
        specs.append(ClientSpec(c, model_dir, dtype, sub, cat, client_config(config, len(cat)),
                                seed=seed, num_gpu_blocks=num_gpu_blocks,
                                kv_cache_gib=kv_cache_gib, keep_tokens=keep_tokens,
                                fault_step=(fault or {}).get(c), gc_freeze=gc_freeze,
                                probe=probe))
    rows = min(config.max_num_batched_tokens, buffer_rows)
    n_tr = 1 if trainer is not None else 0
    bufs = [ClientBuffers.allocate(shape, rows, logit_rows, dtype) for _ in range(clients)]
    if trainer is not None:
        t_rows = trainer.batch * trainer.seq_len
        bufs.append(ClientBuffers.allocate(shape, max(rows, t_rows), t_rows, dtype))
    run = _start(specs, trainer, bufs, model_dir, dtype, clients + n_tr, timeout_s,
                 gc_freeze, probe)
    try:
        _collect(run, timeout_s)
    finally:
        _shutdown(run)
    result = merge_results(trace, who, [run.got[f"client {c}"] for c in range(clients)],
                           run.got["base"], run.got.get("trainer"), config,
                           meta={"model": model_dir, "clients": clients, "link": link,
                                 "seed": seed, "dtype": str(dtype).replace("torch.", ""),
                                 "time_scale": time_scale, "trace": trace_source,
                                 "gc_freeze": bool(gc_freeze)})
    return probe_extras(result, run.got, clients) if probe else result


def probe_extras(result: RunResult, got: dict, clients: int) -> RunResult:
    """``result`` with ``extras["probe"]``: ``base`` and ``clients`` (one each), every
    process's wall, CPU and run-queue seconds and GC pauses, and its logs as tables
    (``calls``: one row per base call, the client's instants and copies or the base's
    arrival, batch and answer instants; a client's ``steps``: per step, its CPU and
    run-queue seconds), instants from the clients' common start."""
    t0 = min(got[f"client {c}"]["t0"] for c in range(clients))
    result.extras["probe"] = {
        "base": probe_tables(got["base"]["probe"], t0, {"calls": BASE_CALL_COLUMNS}),
        "clients": [probe_tables(got[f"client {c}"]["probe"], t0,
                                 {"calls": CALL_COLUMNS, "steps": STEP_PROBE_COLUMNS})
                    for c in range(clients)]}
    return result


def _start(specs, trainer, bufs, model_dir, dtype, n_conns, timeout_s, gc_freeze=True,
           probe=False) -> _Run:
    """Start the base, the clients and the trainer (spawn) with their pipes and buffers."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    run = _Run(stop=ctx.Event(), done=ctx.Event(),
               ready=ctx.Barrier(n_conns + 1, timeout=timeout_s), results=results)
    pipes = [ctx.Pipe() for _ in range(n_conns)]
    base_ends = [b for _, b in pipes]
    run.procs["base"] = ctx.Process(target=base_main, name="split-base", daemon=True, args=(
        model_dir, dtype, base_ends, bufs, run.stop, run.ready, results, gc_freeze, probe))
    for spec in specs:
        run.procs[f"client {spec.client}"] = ctx.Process(
            target=client_main, name=f"split-client-{spec.client}", daemon=True,
            args=(spec, pipes[spec.client][0], bufs[spec.client], run.ready, results))
    if trainer is not None:
        run.procs["trainer"] = ctx.Process(
            target=trainer_main, name="split-trainer", daemon=True,
            args=(trainer, model_dir, dtype, pipes[-1][0], bufs[-1], run.ready, run.done,
                  results, gc_freeze))
    for p in run.procs.values():
        p.start()
    for a, b in pipes:   # the children hold their ends; ours would hide a child's exit
        a.close()
        b.close()
    return run


def _collect(run: _Run, timeout_s: float) -> None:
    """Wait for every process's payload; raise on the first error, death or timeout.
    The trainer is told to stop once every inference client is done."""
    deadline = time.monotonic() + timeout_s
    clients = [n for n in run.procs if n.startswith("client")]
    while len(run.got) < len(run.procs):
        if all(c in run.got for c in clients) and "trainer" in run.procs:
            run.done.set()   # inference is over: the trainer ends its loop and reports
        try:
            msg = run.results.get(timeout=0.5)
        except queue.Empty:
            dead = [n for n, p in run.procs.items()
                    if n not in run.got and p.exitcode is not None]
            if dead:
                raise SplitExecutionError(f"split run: {dead[0]} exited (code "
                                          f"{run.procs[dead[0]].exitcode}) without a result")
            if time.monotonic() > deadline:
                missing = [n for n in run.procs if n not in run.got]
                raise SplitExecutionError(f"split run: no result from {missing} within "
                                          f"{timeout_s:g} s")
            continue
        if msg[0] == "error":
            raise SplitExecutionError(f"split run: {msg[1]} failed:\n{msg[2]}")
        name = "base" if msg[0] == "base" else (
            "trainer" if msg[0] == "trainer" else f"client {msg[1]}")
        run.got[name] = msg[-1]


def _shutdown(run: _Run, grace_s: float = 10.0) -> None:
    """Stop every process: the stop event and the barrier first, then join, then
    terminate whatever lingers."""
    run.stop.set()
    run.ready.abort()
    deadline = time.monotonic() + grace_s
    for p in run.procs.values():
        p.join(max(deadline - time.monotonic(), 0.1))
    for p in run.procs.values():
        if p.is_alive():
            p.terminate()
            p.join(2.0)
    run.results.close()

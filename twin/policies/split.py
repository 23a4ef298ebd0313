"""Split execution (Symbiosis, Gupta et al.): the frozen base model as a shared executor,
each client with its own requests, scheduler, KV cache and adapters.

What changes against vLLM (``twin.policies.vllm``):

- **Clients.** ``clients`` servers, each the shared scheduler over its own requests (the
  trace's ``client`` column, else adapter i of the catalog -> client ``i % clients``,
  base-model requests -> client 0; more clients than adapters are refused, as the
  spare ones would idle), its adapters always resident (no slots, no loads, no
  skip rule; LoRA priced at the adapters' exact ranks).
- **The base executor** is shared: every client step is a pass of requests to it, one per
  stage (``twin.costs.split_costs``), queued FIFO and batched per stage across clients
  (``twin.sim.split``). Fine-tuning jobs (``finetune_tokens_per_s``) load it with forward
  and input-gradient passes.
- **Transfers** over ``link`` (``shm``, ``ipc``, ``pcie``, ``nvlink``, ``network``;
  ``free``: none; ``auto``: by device, ``same`` -> ``ipc``, ``gpu`` -> ``nvlink``,
  ``cpu`` -> ``pcie``).
- **Devices** (``devices``, cycled over the clients): ``same`` (the base's GPU), ``gpu``
  (a GPU of its own, like the base's) or ``cpu`` (local compute at CPU rates, KV in host
  memory).
- **PEFT kinds** (the catalog's ``kind`` / ``virtual_tokens`` columns): LoRA at its rank;
  IA³ (elementwise scales) with no LoRA work; prompt and prefix tuning add their virtual
  tokens to each prompt (:func:`with_virtual_tokens`). vLLM's strategies serve LoRA only.
- **Memory.** The base weights once (GPU 0). Clients on the same GPU split what is left
  after weights and activations, less their adapters; a ``gpu`` client has a GPU's budget
  less activations and adapters; a ``cpu`` client ``host_memory_gib`` split among the CPU
  clients. Each client's KV pool is its share.

``costs``: a :class:`~twin.costs.split_costs.SplitCosts` fitted to the executor's split
mode (``twin.calibrate.split_fit``); by default derived from the profile.
``shared_compute``: whether a client's local work queues on the base's device (default:
for ``same`` clients, whose device it is). ``client_kv_tokens``: each client's KV pool
when given (what an executor chose), instead of the memory split above. The result's
``extras`` hold the contract's ``client_steps`` and (``log_batches``) ``base_batches``
tables, ``summary["split"]`` where the clients' step time went.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.costs.memory import GIB
from twin.costs.peft_costs import peft_cost
from twin.costs.split_costs import client_devices, get_link, on_device, split_costs
from twin.costs.step_time import step_features
from twin.errors import TwinInputError
from twin.policies.base import Policy
from twin.policies.deployment import (Deployment, PolicyRun, ServerRun, ServerSpec,
                                      _sub_catalog, combine)
from twin.policies.memory import MemoryPlan
from twin.servers import build_server
from twin.sim.engine import default_catalog
from twin.sim.split import SplitClient, SplitLoop, TrainJob
from twin.workload.catalog import LORA, PEFT_KINDS

SPLIT = "split"
HOST_MEMORY_GIB = 256.0     # a serving host's RAM for CPU clients' KV (an assumption)


def peft_kinds(catalog) -> dict:
    """adapter -> (PEFT kind, virtual tokens) from the catalog's ``kind`` and
    ``virtual_tokens`` columns (as ``twin.executor.peft_methods`` writes them); LoRA and 0
    where absent."""
    t = catalog.table
    virt = t["virtual_tokens"].astype(int) if "virtual_tokens" in t else [0] * len(t)
    return {a: (catalog.kind(a), int(v)) for a, v in zip(t["adapter"], virt)}


def adapter_bytes(model, kind: tuple, rank: int) -> int:
    """An adapter's weights: LoRA's as every strategy counts them (``adapter_bytes``),
    the other kinds' from ``twin.costs.peft_costs``."""
    if kind[0] == LORA:
        return model.adapter_bytes(rank)
    return peft_cost(model, kind[0], virtual_tokens=kind[1]).adapter_bytes


def with_virtual_tokens(trace: pd.DataFrame, kinds: dict) -> pd.DataFrame:
    """Prompt and prefix tuning: each request's prompt grows by its adapter's virtual
    tokens (prompt tuning computes them through the base; prefix tuning only attends and
    holds them, and the executor's split mode sends them to the base no more, but they
    are priced here as prompt tuning: an upper bound of a few tokens' base rows). A cost
    only: the result reports each request's own ``prompt_tokens`` (as the executor)."""
    extra = trace["adapter"].map(lambda a: 0 if pd.isna(a) else kinds.get(a, ("", 0))[1])
    if not extra.any():
        return trace
    return trace.assign(prompt_tokens=trace["prompt_tokens"] + extra.astype("int32"))


class ClientFeatures:
    """A split client's step features: LoRA at its adapters' mean exact rank, the kernel
    spanning the batch's adapters (no slots, nothing padded)."""

    __slots__ = ("rank",)

    def __init__(self, rank: float):
        self.rank = rank

    def __call__(self, plan):
        return step_features(plan, self.rank, plan.adapters * self.rank, plan.adapters)


class SplitPolicy(Policy):
    name = SPLIT
    summary = "shared base executor, clients with their own KV/adapters (Symbiosis)"
    peft_kinds = PEFT_KINDS

    def __init__(self, clients: int | None = None, link: str = "auto", devices: str = "same",
                 layer_groups: int | None = 4, finetune_tokens_per_s: float = 0.0,
                 finetune_tokens_per_step: int = 2048, host_memory_gib: float = HOST_MEMORY_GIB,
                 costs=None, log_batches: bool = False, client_kv_tokens: int | None = None,
                 shared_compute: bool | None = None):
        # None: the default, 4 (more than the adapters is refused only when asked for)
        self.clients_given = clients is not None
        clients = 4 if clients is None else clients
        if int(clients) < 1:
            raise TwinInputError(f"split needs >= 1 client, got {clients}", field="clients")
        self.clients = int(clients)
        self.link = link if link == "auto" and costs is None else (
            get_link(link) if costs is None else costs.link)
        self.devices = client_devices(devices)
        self.layer_groups = layer_groups
        self.finetune_tokens_per_s = float(finetune_tokens_per_s)
        self.finetune_tokens_per_step = int(finetune_tokens_per_step)
        self.host_memory_gib = float(host_memory_gib)
        self.costs = costs
        self.log_batches = log_batches
        self.client_kv_tokens = client_kv_tokens
        self.shared_compute = shared_compute

    def device(self, c: int) -> str:
        return self.devices[c % len(self.devices)]

    # -- deployment -------------------------------------------------------------------------
    def route(self, trace: pd.DataFrame, catalog) -> np.ndarray:
        """Client of each request (see the module docstring)."""
        if "client" in trace.columns:
            c = pd.to_numeric(trace["client"], errors="coerce").to_numpy()
            bad = np.flatnonzero(~np.isfinite(c) | (c < 0) | (c >= self.clients) | (c % 1 != 0))
            if len(bad):
                raise TwinInputError(f"client must be an integer in [0, {self.clients}), got "
                                     f"{trace['client'].iloc[bad[0]]!r}", row=int(bad[0]),
                                     field="client")
            return c.astype(np.int64)
        most = max(len(catalog), 1)     # adapters, or the base model alone
        if self.clients > most and self.clients_given:
            raise TwinInputError(
                f"split with {self.clients} clients serves {len(catalog)} adapter(s) (adapter "
                f"i -> client i mod {self.clients}, base-model requests -> client 0): "
                f"{self.clients - most} client(s) would get no request yet hold KV memory "
                f"(a GPU each on 'gpu'); use at most {most} client(s), or route requests "
                "with the trace's 'client' column", field="clients")
        index = {a: i % self.clients for i, a in enumerate(catalog.adapters)}
        return np.array([0 if pd.isna(a) else index[a] for a in trace["adapter"].tolist()],
                        dtype=np.int64)

    def deploy(self, trace, config, profile, catalog, gpus=None):
        catalog = catalog if catalog is not None else default_catalog(trace, config)
        route = self.route(trace, catalog)
        servers = []
        own_gpu = 0
        for c in range(self.clients):
            rows = route == c
            ads = tuple(sorted(set(trace["adapter"][rows].dropna().tolist())))
            dev = self.device(c)
            gpu = 0
            if dev == "gpu":
                own_gpu += 1
                gpu = own_gpu
            servers.append(ServerSpec(kind=SPLIT, gpu=gpu, share=1.0, adapters=ads,
                                      label=f"client{c}@{dev}", policy=self))
        return Deployment(policy=self.name, servers=servers, route=route, gpus=1 + own_gpu,
                          notes={"clients": self.clients,
                                 "link": getattr(self.link, "name", self.link),
                                 "devices": ",".join(self.devices)})

    # -- memory ------------------------------------------------------------------------------
    def memory(self, config, profile, catalog=None, share: float = 1.0) -> MemoryPlan:
        """The base executor's GPU: weights once, activations, the rest for the KV pools
        and adapters of the clients on it."""
        m = profile.memory
        budget = config.gpu_memory_utilization * m.gpu_memory_gib * share
        act = m.activation_bytes(config.max_num_seqs, config.max_num_batched_tokens) / GIB
        pool = max(budget - m.weights_gib - act, 0.0)
        return MemoryPlan(policy=self.name, budget_gib=budget, weights_gib=m.weights_gib,
                          activations_gib=act, adapters_gib=0.0, pool_gib=pool,
                          kv_tokens=int(pool * GIB // m.kv_bytes_per_token))

    def client_memory(self, c: int, dep: Deployment, config, profile, catalog) -> MemoryPlan:
        """Client ``c``'s share (see the module docstring); weights and activations are
        charged to client 0 (the base executor's GPU) only."""
        m = profile.memory
        dev = self.device(c)
        kinds = peft_kinds(catalog)
        ad = sum(adapter_bytes(profile.model, kinds.get(a, (LORA, 0)), int(catalog.rank(a)))
                 for a in dep.servers[c].adapters) / GIB
        act = m.activation_bytes(config.max_num_seqs, config.max_num_batched_tokens) / GIB
        if dev == "same":
            same = sum(1 for k in range(self.clients) if self.device(k) == "same")
            avail = self.memory(config, profile).pool_gib / same - ad
        elif dev == "gpu":
            avail = config.gpu_memory_utilization * m.gpu_memory_gib - act - ad
        else:
            cpus = sum(1 for k in range(self.clients) if self.device(k) == "cpu")
            avail = 0.9 * self.host_memory_gib / cpus - ad
        blocks = int(max(avail, 0.0) * GIB // (m.kv_bytes_per_token * config.block_size))
        if self.client_kv_tokens is not None:   # the pool an executor chose for itself
            blocks = self.client_kv_tokens // config.block_size
        tokens = blocks * config.block_size
        first = c == 0
        return MemoryPlan(policy=self.name, budget_gib=avail + ad,
                          weights_gib=m.weights_gib if first else 0.0,
                          activations_gib=act if first or dev == "gpu" else 0.0,
                          adapters_gib=ad if dev != "cpu" else 0.0,
                          pool_gib=tokens * m.kv_bytes_per_token / GIB if dev != "cpu" else 0.0,
                          kv_tokens=tokens, host_adapters_gib=ad if dev == "cpu" else 0.0)

    # -- simulation --------------------------------------------------------------------------
    def split_costs(self, profile, device: str):
        costs = self.costs if self.costs is not None else split_costs(
            profile, get_link(self.link, device), self.layer_groups)
        if device == "cpu" and self.costs is None:
            costs = type(costs)(costs.base, on_device(costs.local, profile, device),
                                costs.link, costs.notes)
        return costs

    def _client(self, c, dep, trace, config, profile, catalog, window_s, record_steps,
                sample_dt):
        rows = np.flatnonzero(dep.route == c)
        sub = trace.iloc[rows].reset_index(drop=True)
        spec = dep.servers[c]
        cat = _sub_catalog(catalog, spec.adapters)
        n = max(len(cat), 1)
        cfg = config.replace(policy="vllm", enable_lora=bool(len(cat)), max_loras=n,
                             max_cpu_loras=n, preload_adapters=True)
        mem = self.client_memory(c, dep, config, profile, catalog)
        if mem.kv_tokens < config.max_model_len:
            raise TwinInputError(
                f"split client {c} ({self.device(c)}) has room for {mem.kv_tokens} KV tokens, "
                f"fewer than one max_model_len request ({config.max_model_len}); use fewer "
                "clients on the base's GPU or lower max_model_len", field="clients")
        server = build_server(cfg, profile, cat, trace=sub, layout="vllm",
                              num_blocks=mem.kv_tokens // config.block_size, any_peft_kind=True)
        kinds = peft_kinds(cat)
        ranks = [int(cat.rank(a)) if kinds[a][0] == LORA else 0 for a in cat.adapters]
        server.featurize = ClientFeatures(float(np.mean(ranks)) if ranks else 0.0)
        client = SplitClient(c, sub, cat, server, profile,
                             self.split_costs(profile, self.device(c)), window_s=window_s,
                             record_steps=record_steps, sample_dt=sample_dt,
                             shared_compute=self.device(c) == "same" if self.shared_compute
                             is None else self.shared_compute)
        return client, rows, mem

    def simulate(self, trace, config, profile=None, catalog=None, *, gpus=None, window_s=None,
                 progress=False, record_steps=False, sample_dt=None, trace_source="trace"):
        profile, trace, catalog = self.prepare(trace, config, profile, catalog, window_s,
                                               trace_source)
        user = trace        # the requests as sent: what the result reports
        trace = with_virtual_tokens(trace, peft_kinds(catalog))   # what the clients price
        dep = self.deploy(trace, config, profile, catalog, gpus)
        built = [self._client(c, dep, trace, config, profile, catalog, window_s, record_steps,
                              sample_dt) for c in range(self.clients)]
        clients = [b[0] for b in built]
        actors: list = list(clients)
        job = None
        if self.finetune_tokens_per_s > 0:
            job = TrainJob(self.split_costs(profile, "same"), self.finetune_tokens_per_s,
                           self.finetune_tokens_per_step, window_s, clients)
            actors.append(job)
        base = actors[0].costs.base
        loop = SplitLoop(actors, base, log_batches=self.log_batches)
        loop.run()
        runs = []
        for cl, (_, rows, mem) in zip(clients, built):
            res = cl.result(config, profile, window_s) if len(rows) else None
            busy = float(sum(e[3] - e[2] for e in cl.log))
            runs.append(ServerRun(dep.servers[cl.cid], rows, res, mem, 1.0, busy))
        result = combine(dep, user, runs, config, profile, window_s)
        result.summary["split"] = split_summary(clients, loop, job, result)
        result.extras.update(client_steps=client_steps(clients),
                             base_batches=base_batches(loop, base))
        return PolicyRun(policy=self.name, deployment=dep, result=result, servers=runs)


STEP_LOG = ["client", "step", "t_start", "t_end", "num_tokens", "num_decode",
            "num_prefill_tokens", "context_tokens", "transfer_s", "base_wait_s", "local_s",
            "base_alone_s"]
BATCH_LOG = ["stage", "kind", "layer", "op", "layers", "rows", "clients", "t_start",
             "t_queue_s", "compute_s"]


def client_steps(clients) -> pd.DataFrame:
    """Per client step, the executor's split-mode columns (``base_wait_s``: the step's
    time in base queues and batches) and ``base_alone_s``, its pass's base compute had it
    been alone (so ``base_wait_s - base_alone_s`` is what sharing the base cost it)."""
    return pd.DataFrame([e for c in clients for e in c.log], columns=STEP_LOG)


def base_batches(loop: SplitLoop, base) -> pd.DataFrame | None:
    if loop.batches is None:
        return None
    """One row per base batch, the executor's columns (``kind``: embed, lin, head, grad;
    ``layer``: the layer group's index, -1 at the ends) plus the stage and its layers."""
    st = base.stages
    rows = []
    for s, back, n, k, q, c, t in loop.batches:
        x = st[s]
        op = "head" if x.op == "lm_head" else x.op
        kind = "grad" if back else x.op if x.op == "embed" else "head" if op == "head" else "lin"
        layer = int(x.name[1:].split(".")[0]) if x.name.startswith("g") else -1
        rows.append((x.name, kind, layer, op, x.layers, n, k, t, q, c))
    return pd.DataFrame(rows, columns=BATCH_LOG)


def split_summary(clients, loop: SplitLoop, job, result) -> dict:
    """Where the clients' step time went, the base's busy fraction, the job's rate (its
    tokens over the run's duration: a step of ``finetune_tokens_per_step`` tokens every
    ``tokens / target`` seconds from the start, so a short run at a low target trains a
    whole step, more than the target's rate)."""
    log = client_steps(clients)
    tot = float((log["t_end"] - log["t_start"]).sum()) if len(log) else 0.0
    dur = result.summary["duration_s"]
    out = {"clients": len(clients),
           "base_busy_fraction": loop.busy_s / dur if dur > 0 else 0.0,
           "mean_clients_per_batch": loop.n_requests / max(loop.n_batches, 1),
           "transfer_share": float(log["transfer_s"].sum() / tot) if tot else 0.0,
           "base_share": float(log["base_wait_s"].sum() / tot) if tot else 0.0,
           "base_queue_share": max(float((log["base_wait_s"] - log["base_alone_s"]).sum()
                                         / tot), 0.0) if tot else 0.0,
           "local_share": float(log["local_s"].sum() / tot) if tot else 0.0}
    if job is not None:     # tokens trained per second of the run, as serving's throughput
        out["finetune_tokens_per_s"] = job.done_tokens / dur if dur > 0 else 0.0
        out["finetune_target_tokens_per_s"] = job.rate
        out["finetune_tokens"] = job.done_tokens
        out["finetune_steps"] = len(job.steps)
        out["finetune_tokens_per_step"] = job.tokens
    return out

"""The interface every serving strategy implements, and what it returns.

A :class:`Policy` turns (trace, serving config, profile, catalog, GPU count) into a
:class:`~twin.policies.deployment.Deployment`: a list of servers, each a process on (a share
of) one GPU serving some adapters with a memory layout of its kind. The deployment runner
simulates every server on its share of the trace with the shared scheduler and engine and
combines the results. Single-server strategies differ only in the server they build
(``Policy.server_parts``) and its static memory accounting (``Policy.memory``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from twin.costs.memory import GIB
from twin.results import crop_window


@dataclass
class ServerParts:
    """What a strategy plugs into the engine (``simulate(..., build_server=...)``)."""

    scheduler: object                 # twin.sched.Scheduler or a subclass
    cache: object                     # in_use / acquire / release / loads_from_{disk,host}
    kv_tokens: int                    # tokens the (KV or unified) pool holds
    featurize: Callable | None = None  # StepPlan -> step-time features; None: vLLM's


@dataclass
class MemoryPlan:
    """One server's GPU memory at start-up, in GiB (DESIGN §2.4 terms).

    ``adapters_gib`` is the static LoRA reservation (vLLM's slot buffers); a unified-pool
    server (``slora``) reserves none and its adapters take pages of ``pool_gib`` at run
    time (see ``RunMemory``). ``host_adapters_gib`` is host RAM held for adapters.
    """

    policy: str
    budget_gib: float            # gpu_memory_utilization x GPU memory x this server's share
    weights_gib: float           # base weights (a merged replica: adapter folded in, same size)
    activations_gib: float       # profiled activation peak
    adapters_gib: float          # static adapter reservation (vLLM slots); 0 for slora/merged
    pool_gib: float              # KV pool (slora: shared by KV blocks and adapter pages)
    kv_tokens: int               # KV tokens the pool holds with no adapter resident
    host_adapters_gib: float = 0.0
    adapter_pages: dict = field(default_factory=dict)   # slora: rank -> pages of one adapter

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def gib(nbytes: float) -> float:
    return float(nbytes) / GIB


def memory_plan(policy: str, config, profile, share: float, *, slots: bool,
                **extra) -> MemoryPlan:
    """One server's start-up split of ``share`` of the GPU: weights, activations, vLLM's
    LoRA slot buffers when ``slots`` (and LoRA is enabled), the KV pool from the rest.
    ``extra``: the strategy's own fields (host adapters, adapter pages)."""
    m = profile.memory
    cfg = config.replace(gpu_memory_utilization=config.gpu_memory_utilization * share)
    if not slots:
        cfg = cfg.replace(enable_lora=False)
    kv_tokens = m.kv_tokens(cfg)
    return MemoryPlan(
        policy=policy, budget_gib=cfg.gpu_memory_utilization * m.gpu_memory_gib,
        weights_gib=m.weights_gib,
        activations_gib=m.activation_bytes(config.max_num_seqs,
                                           config.max_num_batched_tokens) / GIB,
        adapters_gib=gib(m.lora_bytes(cfg.max_loras, cfg.max_lora_rank, cfg.enable_lora)),
        pool_gib=gib(kv_tokens * m.kv_bytes_per_token), kv_tokens=kv_tokens, **extra)


class Policy:
    """A serving strategy. Subclasses set ``name`` and implement :meth:`deploy`."""

    name = "policy"
    #: one-line description for tables and ``--help``
    summary = ""

    def deploy(self, trace, config, profile, catalog, gpus: int | None = None):
        """The servers this strategy runs for ``trace`` (``twin.policies.deployment``)."""
        raise NotImplementedError

    def memory(self, config, profile, catalog=None, share: float = 1.0) -> MemoryPlan:
        """Static memory accounting of one of this strategy's servers."""
        raise NotImplementedError

    def simulate(self, trace, config, profile=None, catalog=None, *, gpus: int | None = None,
                 window_s: float | None = None, progress: bool = False,
                 record_steps: bool = False, sample_dt: float | None = None,
                 trace_source: str = "trace"):
        """Deploy and simulate; returns a :class:`~twin.policies.deployment.PolicyRun`."""
        from twin.costs.profile import Profile, load_profile
        from twin.policies.deployment import run_deployment
        from twin.workload.schema import validate_trace

        if not isinstance(profile, Profile):
            profile = load_profile(profile)
        trace = validate_trace(trace, source=trace_source)
        trace = crop_window(trace, window_s)
        dep = self.deploy(trace, config, profile, catalog, gpus)
        return run_deployment(dep, trace, config, profile, catalog, window_s=window_s,
                              progress=progress, record_steps=record_steps,
                              sample_dt=sample_dt, trace_source=trace_source)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({opts})"

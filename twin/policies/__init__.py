"""Serving strategies side by side (DESIGN §2, "Other policies").

Each strategy is a :class:`Policy`: it deploys a trace onto servers (``deploy``), accounts
their memory (``memory``) and, where options of its own shape a server, builds it
(``server_parts``, through ``twin.servers.build_server``). ``Policy.simulate`` returns a
:class:`PolicyRun` whose ``result`` is an ordinary ``RunResult`` for the whole deployment;
:func:`simulate_policy` runs whichever strategy a config names.

- ``vllm`` (default): vLLM V1, ``max_loras`` slots padded to ``max_lora_rank``.
- ``slora``: S-LoRA unified paging, exact ranks, no slots, FCFS bounded by the pool.
- ``merged``: one replica per adapter with the adapter merged into the weights.
- ``hybrid``: the hottest ``k`` adapters merged, the rest dynamic (vllm or slora).
- ``split``: a shared base executor, clients with their own KV and adapters (Symbiosis).
"""

from __future__ import annotations

import inspect

from twin.config import require_serving_config
from twin.errors import TwinInputError
from twin.policies.base import Policy
from twin.policies.deployment import Deployment, PolicyRun, ServerSpec, run_deployment
from twin.policies.hybrid import HybridPolicy
from twin.policies.memory import MemoryPlan
from twin.policies.merged import MergedPolicy
from twin.policies.slora import SLoRAPolicy
from twin.policies.split import SplitPolicy
from twin.policies.vllm import VLLMPolicy
from twin.results import RunResult
from twin.sim.engine import simulate

POLICY_CLASSES: dict[str, type[Policy]] = {
    "vllm": VLLMPolicy, "slora": SLoRAPolicy, "merged": MergedPolicy, "hybrid": HybridPolicy,
    "split": SplitPolicy,
}


def get_policy(name: str, **options) -> Policy:
    """The strategy ``name`` with the ``options`` its constructor takes (others ignored,
    so one option set can configure several strategies)."""
    cls = POLICY_CLASSES.get(name)
    if cls is None:
        raise TwinInputError(f"unknown policy {name!r}; known: {sorted(POLICY_CLASSES)}",
                             field="policy")
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in params and v is not None})


def simulate_policy(trace, config, profile=None, catalog=None, *, gpus: int | None = None,
                    window_s: float | None = None, progress: bool = False,
                    record_steps: bool = False, sample_dt: float | None = None,
                    trace_source: str = "trace", max_in_flight: int | None = None,
                    jump: bool = True, **options) -> RunResult:
    """Simulate ``trace`` under the strategy ``config.policy`` names: the one entry point
    for any strategy (``twin simulate --policy``, the public API).

    vLLM on one GPU is one server, ``twin.sim.simulate`` itself (its result carries no
    deployment summary, as it never has); any other strategy, or vLLM on ``gpus`` GPUs,
    is deployed and simulated by its :class:`Policy` (``options``: its constructor's,
    e.g. ``admission``, ``k``; vLLM takes none), the result being the whole deployment's.
    ``max_in_flight`` and ``jump`` (see ``twin.sim.simulate``) apply to one vLLM server
    only.
    """
    require_serving_config(config)
    if config.policy == "vllm" and gpus is None:
        return simulate(trace, config, profile, catalog, window_s=window_s, progress=progress,
                        record_steps=record_steps, sample_dt=sample_dt,
                        trace_source=trace_source, max_in_flight=max_in_flight, jump=jump)
    if max_in_flight is not None or not jump:
        raise TwinInputError("max_in_flight and jump apply to one vllm server, not to "
                             f"policy {config.policy!r}", field="policy")
    return get_policy(config.policy, **options).simulate(
        trace, config, profile, catalog, gpus=gpus, window_s=window_s, progress=progress,
        record_steps=record_steps, sample_dt=sample_dt, trace_source=trace_source).result


__all__ = ["POLICY_CLASSES", "get_policy", "simulate_policy", "Policy", "PolicyRun",
           "Deployment", "ServerSpec", "MemoryPlan", "run_deployment", "VLLMPolicy",
           "SLoRAPolicy", "MergedPolicy", "HybridPolicy", "SplitPolicy"]

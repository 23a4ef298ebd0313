"""Serving strategies side by side (DESIGN §2, "Other policies").

Each strategy is a :class:`Policy`: it deploys a trace onto servers (``deploy``), accounts
their memory (``memory``) and, for single-server strategies, builds the server the shared
engine runs (``server_parts``). ``Policy.simulate`` returns a :class:`PolicyRun` whose
``result`` is an ordinary ``RunResult`` for the whole deployment.

- ``vllm`` (default): vLLM V1, ``max_loras`` slots padded to ``max_lora_rank``.
- ``slora``: S-LoRA unified paging, exact ranks, no slots, FCFS bounded by the pool.
- ``merged``: one replica per adapter with the adapter merged into the weights.
- ``hybrid``: the hottest ``k`` adapters merged, the rest dynamic (vllm or slora).
"""

from __future__ import annotations

import inspect

from twin.errors import TwinInputError
from twin.policies.base import MemoryPlan, Policy, ServerParts
from twin.policies.deployment import Deployment, PolicyRun, ServerSpec, run_deployment
from twin.policies.hybrid import HybridPolicy
from twin.policies.merged import MergedPolicy
from twin.policies.slora import SLoRAPolicy, SLoRAScheduler, UnifiedAdapterPool
from twin.policies.vllm import VLLMPolicy

POLICY_CLASSES: dict[str, type[Policy]] = {
    "vllm": VLLMPolicy, "slora": SLoRAPolicy, "merged": MergedPolicy, "hybrid": HybridPolicy,
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


__all__ = ["POLICY_CLASSES", "get_policy", "Policy", "PolicyRun", "Deployment", "ServerSpec",
           "ServerParts", "MemoryPlan", "run_deployment", "VLLMPolicy", "SLoRAPolicy",
           "SLoRAScheduler", "UnifiedAdapterPool", "MergedPolicy", "HybridPolicy"]

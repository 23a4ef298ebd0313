"""Hybrid: the hottest ``k`` adapters merged into dedicated replicas, the rest dynamic.

The ``k`` adapters with the most offered tokens each get a merged replica on a GPU of
their own (no LoRA overhead where most of the traffic is); every other adapter and the
base model are served by dynamic multi-adapter servers (``vllm`` or ``slora``), one per
remaining GPU, adapters spread across them as ``twin.policies.vllm`` does. Without a GPU
count the deployment uses ``k + 1`` GPUs; with ``gpus`` it needs ``gpus > k``. When every
adapter is hot (``k`` = the trace's adapters; a larger ``k`` is refused) there is no
dynamic part: ``gpus >= k``, the spare GPUs holding extra replicas of the hottest adapters
(as ``twin.policies.merged`` does).
"""

from __future__ import annotations

import numpy as np

from twin.errors import TwinInputError
from twin.policies.base import Policy
from twin.policies.deployment import (Deployment, adapter_keys, adapter_load, assign_dynamic)
from twin.policies.memory import MemoryPlan
from twin.policies.merged import MergedPolicy, place_replicas
from twin.policies.slora import SLoRAPolicy
from twin.policies.vllm import VLLMPolicy

DYNAMIC = ("vllm", "slora")


class HybridPolicy(Policy):
    name = "hybrid"
    summary = "hottest k adapters merged on dedicated GPUs, the rest on dynamic servers"
    peft_note = "hybrid's dynamic servers (vLLM or S-LoRA) serve LoRA adapters only"

    def __init__(self, k: int = 1, dynamic: str = "vllm", slora_admission: str = "conservative"):
        if int(k) < 1:
            raise TwinInputError(f"hybrid needs k >= 1 merged adapters, got {k}", field="k")
        if dynamic not in DYNAMIC:
            raise TwinInputError(f"hybrid's dynamic part must be one of {DYNAMIC}, got "
                                 f"{dynamic!r}", field="dynamic")
        self.k = int(k)
        self.dynamic = dynamic
        self.slora_admission = slora_admission
        self._merged = MergedPolicy()
        self._dyn = (VLLMPolicy() if dynamic == "vllm"
                     else SLoRAPolicy(admission=slora_admission))

    def memory(self, config, profile, catalog=None, share: float = 1.0) -> MemoryPlan:
        """The dynamic servers' memory (the merged ones are ``MergedPolicy.memory``)."""
        return self._dyn.memory(config, profile, catalog, share)

    def deploy(self, trace, config, profile, catalog, gpus=None):
        load = adapter_load(trace)
        named = [a for a in load if a is not None]
        # the k hottest, or every adapter when the trace (its window) names fewer: a k above
        # them merges them all, with no dynamic part (a short window may name fewer)
        hot = named[:self.k]
        rest = [a for a in load if a not in hot]
        need = len(hot) + (1 if rest else 0)
        if gpus is not None and gpus < need:
            raise TwinInputError(
                f"hybrid with k={self.k} merged replicas needs at least {need} GPUs (one "
                f"per hot adapter{' plus the dynamic part' if rest else ''}), got {gpus}",
                field="gpus")
        # every adapter hot: GPUs beyond one each hold extra replicas of the hottest (merged's)
        g_hot = len(hot) if rest or gpus is None else gpus
        servers, route, _, _ = place_replicas(self._merged, trace, hot, load, 1, g_hot)
        g_dyn = (1 if gpus is None else gpus - len(hot)) if rest else 0
        if g_dyn:
            keys = adapter_keys(trace)
            hot_set = set(hot)
            rows = np.flatnonzero([a not in hot_set for a in keys.tolist()])
            assign_dynamic(self._dyn, self.dynamic, trace, keys, rows, g_dyn, route, servers,
                           gpu0=len(hot))
        return Deployment(policy=self.name, servers=servers, route=route,
                          gpus=g_hot + g_dyn, unserved=[],
                          notes={"merged_adapters": [str(a) for a in hot],
                                 "dynamic": self.dynamic, "k": self.k})

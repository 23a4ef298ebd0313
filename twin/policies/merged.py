"""Static deployment: one replica per adapter with the adapter merged into the weights.

A replica is a plain base-model vLLM server (``enable_lora=False``): no LoRA compute, no
slot buffers, no loads, but a full copy of the weights. Base-model traffic gets a replica
of its own (a merged replica cannot serve it).

**How many replicas fit on a GPU.** vLLM runs several processes on one GPU if each gets a
``gpu_memory_utilization`` share; a process starts only if its KV cache holds one
``max_model_len`` request (DESIGN §2.4). So ``replicas_per_gpu`` is the largest k for which
a server with ``gpu_memory_utilization / k`` still holds ``min_kv_tokens`` KV tokens
(default: ``max_model_len``), i.e. k ≈ usable memory / (weights + activations +
KV(max_model_len)). Co-located replicas split the memory evenly and time-slice the compute
(``twin.policies.deployment``).

**Given a GPU count** the hottest adapters (by offered tokens) get replicas, spread
round-robin over the GPUs, as many as fit; the rest are *unserved* (reported). When there
are more GPUs than adapters, the spare GPUs hold extra replicas of the hottest adapters
(data parallel, requests round-robin), one replica per GPU. **Without a GPU count** every
adapter gets one replica and the deployment uses ``ceil(replicas / replicas_per_gpu)`` GPUs.
"""

from __future__ import annotations

import math

import numpy as np

from twin.errors import ConfigError, TwinInputError
from twin.policies.base import Policy
from twin.policies.memory import MemoryPlan, memory_plan
from twin.policies.deployment import MERGED, Deployment, ServerSpec, adapter_keys, adapter_load
from twin.workload.catalog import IA3, LORA

MAX_REPLICAS_PER_GPU = 64


class MergedPolicy(Policy):
    name = "merged"
    summary = "one replica per adapter, adapter merged into a full copy of the weights"
    #: LoRA (W + BA) and IA3 (elementwise scales) fold into the weights; prefix and
    #: prompt tuning add virtual tokens to every prompt, which no weight can hold
    peft_kinds = (LORA, IA3)
    peft_note = ("a merged replica folds LoRA or IA3 adapters into the base weights; prefix "
                 "and prompt tuning add virtual tokens to every prompt and cannot be merged")

    def __init__(self, min_kv_tokens: int | None = None):
        self.min_kv_tokens = min_kv_tokens

    def memory(self, config, profile, catalog=None, share: float = 1.0) -> MemoryPlan:
        return memory_plan(self.name, config, profile, share, slots=False)

    def replicas_per_gpu(self, config, profile) -> int:
        """Largest k such that a replica with 1/k of the GPU still starts (holds
        ``min_kv_tokens``, default ``max_model_len``, KV tokens)."""
        need = self.min_kv_tokens or config.max_model_len
        k = 0
        while k < MAX_REPLICAS_PER_GPU and self.memory(config, profile,
                                                       share=1.0 / (k + 1)).kv_tokens >= need:
            k += 1
        if k == 0:
            mem = self.memory(config, profile)
            if self.min_kv_tokens:      # the strategy's own option, not the config's
                raise TwinInputError(
                    f"a merged replica's KV cache holds {mem.kv_tokens} tokens, fewer than "
                    f"min_kv_tokens {need} (compare's --merged-min-kv-tokens); not even one "
                    "replica fits on a GPU. Lower it.", field="min_kv_tokens")
            raise ConfigError(
                f"a merged replica's KV cache holds {mem.kv_tokens} tokens, fewer than "
                f"{need}; not even one replica fits on a GPU. Lower max_model_len.",
                file="config", field="max_model_len")
        return k

    def deploy(self, trace, config, profile, catalog, gpus=None):
        k = self.replicas_per_gpu(config, profile)
        load = adapter_load(trace)          # hottest first; None = base model
        keys = list(load)
        servers, route, unserved, replicas = place_replicas(self, trace, keys, load, k, gpus)
        return Deployment(policy=self.name, servers=servers, route=route,
                          gpus=max(s.gpu for s in servers) + 1 if servers else (gpus or 0),
                          replicas_per_gpu=k, unserved=unserved,
                          notes={"gpus_for_all_adapters": math.ceil(len(keys) / k) if keys else 0,
                                 "replicas": replicas})


def place_replicas(policy: Policy, trace, keys: list, load: dict, k: int, gpus: int | None,
                   gpu0: int = 0, route=None, servers=None):
    """Merged replicas of ``keys`` (hottest first) on ``gpus`` GPUs from ``gpu0``, at most
    ``k`` per GPU. Returns (servers, route, unserved keys, replica counts)."""
    n = len(keys)
    if route is None:
        route = np.full(len(trace), -1, dtype=np.int64)
    servers = [] if servers is None else servers
    if gpus is None:
        gpus = math.ceil(n / k) if n else 0
    served = keys[:gpus * k]
    unserved = keys[gpus * k:]
    count = {a: 1 for a in served}
    if served and len(served) < gpus:      # spare GPUs: replicate the hottest
        for _ in range(gpus - len(served)):
            a = max(served, key=lambda x: load[x] / count[x])
            count[a] += 1
    slots = [a for a in served for _ in range(count[a])]
    # hottest spread round-robin over the GPUs
    per_gpu = [[] for _ in range(gpus)]
    for j, a in enumerate(slots):
        per_gpu[j % gpus].append(a)
    index: dict = {}
    for g, reps in enumerate(per_gpu):
        for a in reps:
            index.setdefault(a, []).append(len(servers))
            name = "base" if a is None else str(a)
            servers.append(ServerSpec(kind=MERGED, gpu=gpu0 + g, share=1.0 / len(reps),
                                      adapters=(a,), label=f"merged[{name}]@gpu{gpu0 + g}",
                                      policy=policy))
    row_keys = adapter_keys(trace)
    seen: dict = {}
    for i, a in enumerate(row_keys.tolist()):
        if a not in index:
            continue
        reps = index[a]
        c = seen.get(a, 0)
        route[i] = reps[c % len(reps)]
        seen[a] = c + 1
    return servers, route, unserved, {("base" if a is None else str(a)): c
                                      for a, c in count.items()}

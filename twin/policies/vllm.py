"""vLLM's own strategy (the default): ``max_loras`` GPU slots padded to ``max_lora_rank``,
reserved at start-up beside a separate KV pool; the V1 scheduler with the skip rule.

The server is exactly what ``twin.servers.build_server`` builds for ``policy="vllm"``; this class
adds the memory accounting and, with several GPUs, one such server per GPU with the
adapters partitioned between them (see ``twin.policies.deployment.dynamic_deployment``).
"""

from __future__ import annotations

from twin.policies.base import Policy
from twin.policies.deployment import dynamic_deployment
from twin.policies.memory import MemoryPlan, gib, memory_plan


class VLLMPolicy(Policy):
    name = "vllm"
    summary = "vLLM V1: max_loras slots padded to max_lora_rank, separate KV pool, skip rule"

    def memory(self, config, profile, catalog=None, share: float = 1.0) -> MemoryPlan:
        host = 0
        if catalog is not None and config.enable_lora:
            sizes = sorted((profile.model.adapter_bytes(int(r)) for r in catalog.table["rank"]),
                           reverse=True)
            host = sum(sizes[:config.max_cpu_loras])   # the host cache full of the largest
        return memory_plan(self.name, config, profile, share, slots=True,
                           host_adapters_gib=gib(host))

    def deploy(self, trace, config, profile, catalog, gpus=None):
        return dynamic_deployment(self, "vllm", trace, gpus or 1)

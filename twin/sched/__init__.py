"""The serving core shared by both clocks: request state, waiting queue, KV-block pool,
prefix cache, adapter caches and the vLLM V1 scheduler. Plain Python objects with no
notion of time: the twin drives them with a discrete-event clock (a SimPy-style process),
the executor with a wall clock and tensors."""

from twin.sched.adapter_cache import AdapterCache, AdapterLoad
from twin.sched.kv_pool import KVBlockPool
from twin.sched.prefix_cache import PrefixCache
from twin.sched.request import Request, RequestStatus
from twin.sched.scheduler import Scheduler
from twin.sched.step_plan import StepPlan

__all__ = ["AdapterCache", "AdapterLoad", "KVBlockPool", "PrefixCache", "Request",
           "RequestStatus", "Scheduler", "StepPlan"]

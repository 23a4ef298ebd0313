"""twin: a digital twin of multi-adapter (LoRA) LLM serving.

The package is split so that the simulator never imports torch:
``twin.sched`` (scheduler, KV pool, adapter caches: shared by both clocks),
``twin.sim`` (SimPy clock + cost model), ``twin.costs`` (profiles, cost and memory
models), ``twin.workload`` (traces), ``twin.executor`` (torch reference engine),
``twin.ml`` (sweeps and recommendation).
"""

__version__ = "0.1.0"

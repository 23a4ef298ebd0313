"""twin: a digital twin of multi-adapter (LoRA) LLM serving.

The public Python API (:mod:`twin.api`) is reachable from here: ``twin.load_trace``,
``twin.ServingConfig``, ``twin.load_profile``, ``twin.simulate``, ``twin.recommend`` and
the types they take and return (``recommend`` returns a
:class:`twin.ml.recommender.Recommendation`). Those names are loaded on first use (PEP
562), so that ``import twin`` stays a few milliseconds and imports neither pandas nor
torch.

The package is split so that the simulator never imports torch:
``twin.sched`` (scheduler, KV pool, adapter caches: shared by both clocks),
``twin.sim`` (discrete-event clock + cost model), ``twin.costs`` (profiles, cost and memory
models), ``twin.workload`` (traces), ``twin.executor`` (torch reference engine),
``twin.ml`` (sweeps and recommendation).
"""

__version__ = "0.1.0"

#: the public API's names, each loaded from twin.api on first access
__all__ = ["load_trace", "ServingConfig", "load_config", "load_profile", "Profile",
           "load_catalog", "AdapterCatalog", "simulate", "simulate_fleet", "fleet_replica",
           "RunResult", "recommend", "TwinInputError", "rate_class_trace", "powerlaw_trace",
           "session_trace"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'twin' has no attribute {name!r}")
    from twin import api   # lazy: pandas and pydantic off `import twin`'s path

    value = getattr(api, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

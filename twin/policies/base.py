"""The interface every serving strategy implements, and what it returns.

A :class:`Policy` turns (trace, serving config, profile, catalog, GPU count) into a
:class:`~twin.policies.deployment.Deployment`: a list of servers, each a process on (a share
of) one GPU serving some adapters with a memory layout of its kind. The deployment runner
simulates every server on its share of the trace with the shared scheduler and engine and
combines the results. Single-server strategies differ only in the server they build
(``Policy.server_parts``, through ``twin.servers.build_server``) and its static memory
accounting (``Policy.memory``, ``twin.policies.memory``).
"""

from __future__ import annotations

from twin.policies.deployment import run_deployment
from twin.policies.memory import MemoryPlan
from twin.results import crop_window
from twin.sim.engine import check_run_inputs, default_catalog
from twin.workload.catalog import LORA, MAX_RANK
from twin.workload.schema import validate_trace


class Policy:
    """A serving strategy. Subclasses set ``name`` and implement :meth:`deploy`."""

    name = "policy"
    #: one-line description for tables and ``--help``
    summary = ""
    #: the PEFT kinds (a catalog's ``kind``) this strategy serves, and why only those
    peft_kinds: tuple[str, ...] = (LORA,)
    peft_note = "vLLM serves LoRA adapters only"

    def check_catalog(self, trace, config, catalog, trace_source: str = "trace") -> None:
        """The catalog check every strategy runs before it deploys (vLLM's server runs it
        too, ``AdapterCatalog.check``): every adapter ``trace`` names is in ``catalog``, and
        of a PEFT kind this strategy serves. Ranks are the servers' own check (vLLM's
        ``max_lora_rank``)."""
        catalog.check(trace, MAX_RANK, trace_source, kinds=self.peft_kinds,
                      note=self.peft_note)

    def prepare(self, trace, config, profile, catalog, window_s, trace_source: str):
        """What every strategy's ``simulate`` starts with: the run's inputs checked (profile,
        window), the trace validated and windowed, the catalog resolved and checked
        (:meth:`check_catalog`). Returns (profile, trace, catalog)."""
        profile = check_run_inputs(config, profile, window_s)
        trace = crop_window(validate_trace(trace, source=trace_source), window_s)
        catalog = catalog if catalog is not None else default_catalog(trace, config)
        self.check_catalog(trace, config, catalog, trace_source)
        return profile, trace, catalog

    def deploy(self, trace, config, profile, catalog, gpus: int | None = None):
        """The servers this strategy runs for ``trace`` (``twin.policies.deployment``)."""
        raise NotImplementedError

    def memory(self, config, profile, catalog=None, share: float = 1.0) -> MemoryPlan:
        """Static memory accounting of one of this strategy's servers."""
        raise NotImplementedError

    def server_parts(self, config, profile, catalog):
        """This strategy's own server for ``config`` when options of its own shape it
        (``twin.servers.ServerParts``); None: the server ``config`` describes, which
        ``twin.sim.simulate`` builds."""
        return None

    def simulate(self, trace, config, profile=None, catalog=None, *, gpus: int | None = None,
                 window_s: float | None = None, progress: bool = False,
                 record_steps: bool = False, sample_dt: float | None = None,
                 trace_source: str = "trace"):
        """Deploy and simulate; returns a :class:`~twin.policies.deployment.PolicyRun`."""
        profile, trace, catalog = self.prepare(trace, config, profile, catalog, window_s,
                                               trace_source)
        dep = self.deploy(trace, config, profile, catalog, gpus)
        return run_deployment(dep, trace, config, profile, catalog, window_s=window_s,
                              progress=progress, record_steps=record_steps,
                              sample_dt=sample_dt, trace_source=trace_source)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({opts})"

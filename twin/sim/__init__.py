"""The twin: the shared scheduler driven by a discrete-event clock (a SimPy-style
process resumed by its own driver, ``engine.run_alone``) and a cost model."""

from twin.sim.engine import simulate
from twin.results.results import RunResult

__all__ = ["simulate", "RunResult"]

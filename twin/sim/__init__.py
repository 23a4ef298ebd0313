"""The twin: the shared scheduler driven by a SimPy clock and a cost model."""

from twin.sim.engine import simulate
from twin.results.results import RunResult

__all__ = ["simulate", "RunResult"]

"""The results of a run, one layer for both clocks (the twin and the executor): the
recorder they both write to, the result table and its summary in ``vllm bench serve``
terms, plots, and the comparison metric (``smape``). It sits below the clocks: it imports
only the scheduler's request type, never ``twin.sim``, ``twin.executor`` or above."""

from twin.results.results import RunResult, crop_window, smape

__all__ = ["RunResult", "crop_window", "smape"]

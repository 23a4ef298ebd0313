"""The results of a run, one layer for both clocks (the twin and the executor): the
recorder they both write to, the result table and its summary in ``vllm bench serve``
terms, plots, the comparison metric (``smape``), the window crop and what held a run's
queue (``main_limit`` of its ``waiting_held_by``). It sits below the
clocks: it imports only ``twin.sched`` (the request type) and ``twin.outputs`` (staged
writes), never ``twin.sim``, ``twin.executor`` or anything above them."""

from twin.results.queue_head import main_limit
from twin.results.results import RunResult, crop_window, smape

__all__ = ["RunResult", "crop_window", "main_limit", "smape"]

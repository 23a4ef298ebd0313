"""Workloads: the trace contract, loaders for public traces, synthetic generators."""

from twin.workload.schema import TRACE_COLUMNS, read_trace, validate_trace, write_trace

__all__ = ["TRACE_COLUMNS", "read_trace", "validate_trace", "write_trace"]

"""Validation of the twin against the reference executor (``twin validate``).

:mod:`twin.validate.compare` serves a trace on the executor and simulates it on the twin with
the same config and KV capacity, and compares the two in ``vllm bench serve`` terms. It
imports torch only when :func:`validate` runs, so importing this package stays light.
"""

from twin.validate.compare import (KEYS, METRICS, Validation, compare, format_table,
                                   median_summary, run_spread, smape, usable_blocks, validate)

__all__ = ["KEYS", "METRICS", "Validation", "compare", "format_table", "median_summary",
           "run_spread", "smape", "usable_blocks", "validate"]

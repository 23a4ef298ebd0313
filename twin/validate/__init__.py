"""Validation of the twin against the reference executor (``twin validate``).

:mod:`twin.validate.run` serves a trace on the executor and simulates it on the twin with
the same config and KV capacity; :mod:`twin.validate.compare` compares the two in ``vllm
bench serve`` terms. Torch is imported only when :func:`validate` runs, so importing this
package stays light.
"""

from twin.validate.compare import (KEYS, METRICS, compare, format_table, median_summary,
                                   run_spread, smape)
from twin.validate.run import Validation, usable_blocks, validate

__all__ = ["KEYS", "METRICS", "Validation", "compare", "format_table", "median_summary",
           "run_spread", "smape", "usable_blocks", "validate"]

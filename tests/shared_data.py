"""Files of the shared data folder for tests, found through the project's own lookup
(``$TWIN_SHARED_DATA``, else ``../shared/data``: ``twin.workload.public.shared_data_dir``).
Tests that need one skip when it is absent."""

from __future__ import annotations

from pathlib import Path

from twin.errors import TwinInputError
from twin.workload.public import shared_data_dir


def shared_file(*parts: str) -> Path | None:
    """``<shared data>/<parts...>`` if it exists, else None."""
    try:
        path = shared_data_dir().joinpath(*parts)
    except TwinInputError:
        return None
    return path if path.exists() else None


#: vLLM's reported KV-cache capacities of Llama-3.1-8B on an H100 (None when absent)
KV_CSV = shared_file("vllm-h100", "kv_cache_tokens_llama31_8b.csv")

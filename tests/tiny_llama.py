"""The tiny random-weight Llama the executor tests serve: initialised wide enough
(``initializer_range`` 0.2) that greedy continuations depend on the context, so that a
wrong KV block, adapter or position changes the tokens."""

from __future__ import annotations

from pathlib import Path

from twin.executor.adapters import write_synthetic_adapters
from twin.executor.weights import make_tiny_llama
from twin.workload.catalog import AdapterCatalog

TINY = dict(seed=0, initializer_range=0.2, tie_word_embeddings=False,
            max_position_embeddings=512)


def tiny_with_adapters(root: Path, n: int, ranks=(8, 16)) -> tuple[Path, AdapterCatalog]:
    """The tiny model under ``root/model`` and ``n`` synthetic LoRA adapters of ``ranks``."""
    make_tiny_llama(root / "model", **TINY)
    cat = AdapterCatalog(write_synthetic_adapters(root / "model", root / "adapters", n,
                                                  ranks=ranks))
    return root / "model", cat

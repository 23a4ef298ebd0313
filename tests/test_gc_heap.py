"""The executor serves with the start-up heap out of the cyclic collector, as vLLM's engine
does (twin.executor.gc_heap), and leaves the collector as it found it."""

from __future__ import annotations

import gc

import numpy as np
import pandas as pd
import pytest

from twin.executor.gc_heap import frozen_heap, gc_frozen


@pytest.fixture(autouse=True)
def thawed():
    """Each test starts and ends with nothing frozen (pytest's own process never freezes)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_frozen_heap_freezes_the_live_objects_and_thaws_them_after():
    keep = [[i] for i in range(1000)]   # live objects that must land in the frozen set
    with frozen_heap():
        assert gc_frozen()
        frozen = gc.get_freeze_count()
        assert frozen >= len(keep)
        assert len(gc.get_objects()) < frozen   # the collector no longer scans them
    assert gc.get_freeze_count() == 0 and not gc_frozen()


def test_nested_or_disabled_it_leaves_the_outer_freeze_alone():
    with frozen_heap(enabled=False):
        assert not gc_frozen()
    with frozen_heap():
        outer = gc.get_freeze_count()
        with frozen_heap():   # no second collection, no thaw on the way out
            assert gc.get_freeze_count() == outer
        assert gc.get_freeze_count() == outer
    assert not gc_frozen()


def test_thawed_after_an_error_in_the_body():
    with pytest.raises(RuntimeError):
        with frozen_heap():
            raise RuntimeError("a failed run")
    assert not gc_frozen()


def test_an_executor_run_is_served_frozen_and_says_so(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from twin.config import ServingConfig
    from twin.executor.engine import execute
    from twin.executor.model import LlamaModel
    from twin.executor.weights import make_tiny_llama

    m = LlamaModel.from_pretrained(make_tiny_llama(tmp_path / "model",
                                                   max_position_embeddings=256))
    trace = pd.DataFrame({"request_id": np.arange(3), "arrival_s": [0.0, 0.0, 0.0],
                          "adapter": pd.array([None] * 3, dtype="string"),
                          "prompt_tokens": [12, 20, 7], "output_tokens": [4, 3, 5]})
    cfg = ServingConfig(enable_lora=False, max_model_len=128, max_num_seqs=4,
                        max_num_batched_tokens=64)
    frozen = execute(trace, cfg, m, num_gpu_blocks=16, threads=1, keep_tokens=True)
    assert frozen.meta["gc_frozen"] is True
    assert not gc_frozen()   # thawed once the run is over
    scanned = execute(trace, cfg, m, num_gpu_blocks=16, threads=1, keep_tokens=True,
                      gc_freeze=False)
    assert scanned.meta["gc_frozen"] is False
    # the collector changes timing only: the same tokens, the same schedule (all arrive
    # at 0: a schedule that cannot depend on step times)
    assert frozen.requests["output_token_ids"].tolist() == \
        scanned.requests["output_token_ids"].tolist()
    assert frozen.steps["num_tokens"].tolist() == scanned.steps["num_tokens"].tolist()

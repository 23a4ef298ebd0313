"""Where a split run's time goes (twin.executor.split.probe): the GC heap frozen at
start-up, the GC pause log, the schedstat reader, and a probed split run whose logs
account for every base call on both sides of the pipe, in causal order."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

from twin.executor.gc_heap import freeze_startup_heap
from twin.executor.split.probe import GCPauses, probe_tables, schedstat


def test_freeze_moves_the_heap_out_of_the_collector():
    gc.unfreeze()
    live = len(gc.get_objects())
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= live // 2   # the start-up heap is frozen
        assert len(gc.get_objects()) < gc.get_freeze_count()   # and no longer scanned
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_gc_pauses_logs_full_collections_only_while_installed():
    pauses = GCPauses()
    gc.collect()
    pauses.close()
    gc.collect()
    full = [p for p in pauses.log if p[2] == 2]
    assert len(full) == 1
    assert full[0][1] > 0.0


def test_schedstat_counts_this_threads_cpu_time():
    on0, wait0 = schedstat()
    x = 0
    for i in range(300_000):
        x += i * i
    on1, wait1 = schedstat()
    assert on1 > on0 and wait1 >= wait0 >= 0.0


def test_probe_tables_shift_instants_only():
    rep = {"wall_s": 1.0, "gc": [(10.5, 0.1, 2, 7)], "calls": [(0, 10.25, 3)]}
    out = probe_tables(rep, 10.0, {"calls": ["client", "t_send", "rows"]})
    assert out["gc"]["t_start"].tolist() == [0.5]
    assert out["calls"]["t_send"].tolist() == [0.25]
    assert out["calls"]["rows"].tolist() == [3] and out["wall_s"] == 1.0


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_probed_run_accounts_for_every_base_call(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_llama import tiny_with_adapters
    from twin.config import ServingConfig
    from twin.executor.split import execute_split

    model, cat = tiny_with_adapters(tmp_path, 2)
    trace = pd.DataFrame({"request_id": np.arange(6), "arrival_s": np.linspace(0, 0.05, 6),
                          "adapter": pd.array([cat.adapters[i % 2] for i in range(6)],
                                              dtype="string"),
                          "prompt_tokens": [5, 30, 12, 40, 7, 20], "output_tokens": 4})
    config = ServingConfig(enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=256)
    ex = execute_split(trace, config, model, cat, clients=2, probe=True, timeout_s=240)
    p = ex.extras["probe"]
    base = p["base"]["calls"]
    calls = pd.concat([c["calls"].assign(client=i) for i, c in enumerate(p["clients"])])
    # every call the clients counted is in their logs and answered once by the base
    assert len(calls) == ex.steps["base_calls"].sum() == len(base)
    m = calls.merge(base, on=["client", "t_send"], validate="one_to_one")
    assert len(m) == len(calls)
    # causal order on one clock: sent, arrived, batched, computed, answered / read
    # (the client may read the answer before the base's send returns)
    for a, b in [("t_send", "t_sent"), ("t_send", "t_arrived"), ("t_arrived", "t_start"),
                 ("t_start", "t_computed"), ("t_computed", "t_answered"),
                 ("t_computed", "t_ready"), ("t_ready", "t_recv")]:
        assert (m[b] >= m[a]).all(), (a, b)
    assert (m["bytes_in"] > 0).all() and (m["copy_in_s"] >= 0).all()
    for i, c in enumerate(p["clients"]):   # one probe row per step, CPU time within the wall
        assert len(c["steps"]) == (ex.steps["client"] == i).sum()
        assert 0 < c["cpu_s"] <= c["wall_s"] * 1.05
    assert ex.meta["gc_freeze"] is True

"""The executor with the prefix cache on (twin.executor.prefix_blocks): hits read the KV
blocks another request of the same adapter computed, outputs equal those with caching off,
adapters never read each other's blocks, and the hits are the twin's."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")

from prefix_traces import conversations  # noqa: E402
from twin.config import ServingConfig  # noqa: E402
from twin.executor.adapters import write_synthetic_adapters  # noqa: E402
from twin.executor.engine import execute  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.prefix_blocks import CachedBlockTables  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402
from twin.sim.replay import replay  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

# context-sensitive tiny Llama (as tests/test_executor_engine.py): corrupt KV changes tokens
TINY = dict(seed=0, initializer_range=0.2, tie_word_embeddings=False,
            max_position_embeddings=512)
CFG = ServingConfig(max_loras=2, max_cpu_loras=4, max_num_seqs=6, max_num_batched_tokens=64,
                    block_size=8, max_model_len=400)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefixexec")
    make_tiny_llama(root / "model", **TINY)
    cat = AdapterCatalog(write_synthetic_adapters(root / "model", root / "adapters", 3,
                                                  ranks=(8,)))
    return LlamaModel.from_pretrained(root / "model", dtype=torch.float64), cat


def sessions(cat, seed=3):
    """Multi-turn conversations over three adapters (and the base model), each adapter's
    opening with its system prompt; ids name 16-token blocks, fed 10x faster."""
    t = conversations(seed, 9, 3, list(cat.adapters), hbs=16, new_blocks=(1, 3),
                      output=(3, 12), gap_s=(0.05, 0.3), base_every=4)
    t["arrival_s"] = t["arrival_s"] * 0.1
    t.insert(0, "request_id", range(len(t)))
    return t


def run(model, trace, cat, cfg, **kw):
    return execute(trace, cfg, model, cat, keep_tokens=True, **kw)


def tokens_by_adapter(res):
    req = res.requests
    assert (req["status"] == "finished").all(), req[["status", "error"]]
    return {a: [list(x) for x in g["output_token_ids"]]
            for a, g in req.groupby(req["adapter"].fillna("base"))}


@pytest.mark.parametrize("num_blocks", [400, 52])   # ample; tight: evictions, preemptions
def test_outputs_equal_caching_off_and_hits_read_cached_blocks(tiny, num_blocks):
    model, cat = tiny
    trace = sessions(cat)
    on = run(model, trace, cat, CFG, num_gpu_blocks=num_blocks)
    off = run(model, trace, cat, CFG.replace(enable_prefix_caching=False),
              num_gpu_blocks=num_blocks)
    assert on.summary["prefix_cache_hits"] > 0 and off.summary["prefix_cache_hits"] == 0
    assert tokens_by_adapter(on) == tokens_by_adapter(off)
    # a hit skips its tokens: the executor computed fewer prefill tokens
    assert on.steps["num_tokens"].sum() < off.steps["num_tokens"].sum()


def test_hits_equal_the_twins_replaying_the_same_steps(tiny):
    model, cat = tiny
    trace = sessions(cat, seed=4)
    res = run(model, trace, cat, CFG, num_gpu_blocks=60)
    twin = replay(res, trace, cat)
    for k in ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_by_adapter"):
        assert twin.summary[k] == res.summary[k], k
    assert list(twin.requests["prefix_cache_hits"]) == list(res.requests["prefix_cache_hits"])


def test_same_hash_ids_on_two_adapters_share_nothing(tiny):
    model, cat = tiny
    a, b = cat.adapters[:2]
    conv = conversations(5, 1, 3, [a], hbs=16, output=(3, 8))   # one conversation, 3 turns
    both = pd.concat([conv.assign(arrival_s=[0.0, 1.0, 2.0]),
                      conv.assign(adapter=b, arrival_s=[10.0, 11.0, 12.0])], ignore_index=True)
    both.insert(0, "request_id", range(len(both)))
    both.attrs["hash_block_size"] = 16
    res = run(model, both, cat, CFG.replace(max_num_batched_tokens=512))
    hits = list(res.requests["prefix_cache_hits"])
    assert hits[1] > 0 and hits[0] == 0
    assert hits[3] == 0               # b's first turn: a's blocks, same ids, are not b's
    assert hits[3:] == hits[:3]       # b hits only its own earlier turns, as a did


def test_corrupting_adapter_a_cached_block_changes_only_a(tiny, monkeypatch):
    model, cat = tiny
    a = cat.adapters[0]
    trace = sessions(cat, seed=6)
    clean = tokens_by_adapter(run(model, trace, cat, CFG, num_gpu_blocks=400))
    kv = model.allocate_kv_cache(400, CFG.block_size)
    monkeypatch.setattr(LlamaModel, "allocate_kv_cache", lambda self, n, bs: kv)
    ensure = CachedBlockTables.ensure_for
    aid = list(cat.adapters).index(a)
    hits = []

    def corrupting(self, r, start, tokens):   # scramble A's hit blocks as they are reused
        new = r.idx not in self
        t = ensure(self, r, start, tokens)
        if new and start and r.adapter == aid:
            hits.append(r.idx)
            for layer in kv.k:
                layer[t[0]] = torch.randn_like(layer[t[0]]) * 10
        return t

    monkeypatch.setattr(CachedBlockTables, "ensure_for", corrupting)
    dirty = tokens_by_adapter(run(model, trace, cat, CFG, num_gpu_blocks=400))
    assert hits
    assert dirty[a] != clean[a]
    for name in clean:
        if name != a:
            assert dirty[name] == clean[name], name


def test_a_window_cut_records_only_the_tokens_generated(tiny):
    """Output tokens the hash ids name are fed, not yet generated: a request cut by the
    window's end records only what it generated."""
    model, cat = tiny
    trace = sessions(cat)
    res = run(model, trace, cat, CFG, window_s=float(trace["arrival_s"].iloc[len(trace) // 2]))
    req = res.requests
    assert (req["status"] != "finished").any()
    assert (req["output_token_ids"].map(len) == req["generated_tokens"]).all()


def test_nan_in_emptied_blocks_changes_no_token_with_caching(tiny, monkeypatch):
    """Blocks turn NaN the moment they are emptied (freed without a cached id, or evicted
    from the cache): a hit never reads one, a tight pool evicting all along."""
    from test_executor_isolation import _nan_garbage

    model, cat = tiny
    trace = sessions(cat, seed=8)
    ref = tokens_by_adapter(run(model, trace, cat, CFG, num_gpu_blocks=52))
    caches = _nan_garbage(monkeypatch)
    res = run(model, trace, cat, CFG, num_gpu_blocks=52)
    assert res.summary["prefix_cache_hits"] > 0
    assert torch.isnan(caches[-1].k[0]).any()
    assert tokens_by_adapter(res) == ref


def test_sessions_naming_each_answer_reuse_it_as_the_next_prompt(tiny):
    """``twin trace sessions`` names each turn's answer in its hash ids (the next turn
    re-sends it): those tokens are fed, so the answer's cached KV is the next prompt's,
    and caching on equals off per adapter (a tight pool: evictions)."""
    import numpy as np

    from twin.workload.sessions import session_trace

    model, cat = tiny
    lengths = np.stack(np.meshgrid(np.arange(8, 40, 4), np.arange(4, 24, 4)), -1).reshape(-1, 2)
    t = session_trace(3, 3, style="chat", duration_s=3.0, think_s=0.5, tpot_s=0.005,
                      system_tokens=48, lengths=lengths, block_size=16, max_model_len=400,
                      seed=1)
    names = dict(zip(sorted(t["adapter"].dropna().unique()), cat.adapters))
    t["adapter"] = t["adapter"].map(names).astype("string")
    n = t["hash_ids"].map(len) * 16
    assert (n > t["prompt_tokens"]).any()                 # answers named
    on = run(model, t, cat, CFG, num_gpu_blocks=51)
    off = run(model, t, cat, CFG.replace(enable_prefix_caching=False), num_gpu_blocks=51)
    assert on.summary["prefix_cache_hits"] > 0
    assert tokens_by_adapter(on) == tokens_by_adapter(off)

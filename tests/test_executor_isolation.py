"""One bad adapter harms only its own requests in the executor (issue 11, item 2).

- An adapter whose weights are NaN fails its own requests with a clear error when it is
  read; the other adapters' requests, sharing batches and (freed, reused) KV blocks with
  it, produce exactly the tokens of a run without it.
- Attention never trusts memory outside a request's context: NaN written into every KV
  block the moment it is allocated or freed changes no token, for the vLLM slot layout and
  the S-LoRA unified pages alike.
- A request whose logits become non-finite (finite weights whose activations overflow)
  fails with an error instead of emitting token 0 as ``finished``.
"""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twin.config import ServingConfig  # noqa: E402
from twin.executor.adapters import WEIGHTS_NAME, write_synthetic_adapters  # noqa: E402
from twin.executor.block_tables import PagedBlockTables  # noqa: E402
from twin.executor.engine import execute  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a random tiny Llama whose greedy continuations depend on the context (cf.
# test_executor_engine), so garbage read from the KV cache changes the tokens
TINY = dict(seed=0, initializer_range=0.2, tie_word_embeddings=False,
            max_position_embeddings=512)
CLEAN = ("lora-0000", "lora-0001", "lora-0002")


def _poisoned_copy(src, dst, fill: float):
    """A copy of the PEFT adapter ``src`` whose every weight is ``fill`` (NaN, or a huge
    finite value)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    ts = load_file(str(dst / WEIGHTS_NAME))
    save_file({k: torch.full_like(v, fill) for k, v in ts.items()}, str(dst / WEIGHTS_NAME),
              metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    make_tiny_llama(root / "model", **TINY)
    cat = write_synthetic_adapters(root / "model", root / "adapters", 4, ranks=(8, 16))
    src = root / "adapters" / "lora-0003"
    nan = _poisoned_copy(src, root / "nan", float("nan"))
    huge = _poisoned_copy(src, root / "huge", 3e38)       # finite, overflows in the forward
    table = cat.iloc[:3].copy()
    table = pd.concat([table, pd.DataFrame({"adapter": ["bad"], "rank": [16],
                                            "path": [str(nan)], "bytes": [0]})])
    table_huge = table.assign(path=list(table["path"].iloc[:3]) + [str(huge)])
    return (root / "model", AdapterCatalog(table.reset_index(drop=True)),
            AdapterCatalog(table_huge.reset_index(drop=True)))


def _trace(n: int = 16, seed: int = 3):
    """Four adapters interleaved, all arriving at once (so the schedule does not depend on
    step durations): they share steps, and with ``max_num_seqs`` below ``n`` and a small
    pool the later requests get the KV blocks that earlier ones (the bad adapter's among
    them) freed on completion or preemption."""
    rng = np.random.default_rng(seed)
    names = [*CLEAN, "bad"]
    return pd.DataFrame({
        "request_id": np.arange(n) + 100,
        "arrival_s": np.zeros(n),
        "adapter": pd.array([names[k % 4] for k in range(n)], dtype="string"),
        "prompt_tokens": rng.integers(5, 30, n), "output_tokens": rng.integers(8, 24, n)})


# small pool (preemptions and block reuse), chunked prefill mixed with decodes
CFG = ServingConfig(max_loras=4, max_cpu_loras=4, max_num_seqs=8, max_num_batched_tokens=32,
                    block_size=8, max_model_len=64)


def _tokens(res, rows=None):
    req = res.requests
    rows = range(len(req)) if rows is None else rows
    return {int(req["request_id"].iloc[i]): list(req["output_token_ids"].iloc[i]) for i in rows}


@pytest.mark.parametrize("policy", ["vllm", "slora"])
def test_nan_adapter_fails_alone_and_others_match_a_clean_run(tiny, policy):
    model_dir, cat, _ = tiny
    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float64)
    trace = _trace()
    cfg = CFG.replace(policy=policy)
    # slora: the three good adapters' pages (16 + 32 + 16) on top of 12 KV blocks
    blocks = 12 if policy == "vllm" else 76
    res = execute(trace, cfg, model, cat, num_gpu_blocks=blocks, keep_tokens=True)
    req = res.requests
    bad = (trace["adapter"] == "bad").to_numpy()
    assert (req["status"][bad] == "failed").all(), req[["status", "error"]]
    assert req["error"][bad].str.contains("'bad'").all()
    assert req["error"][bad].str.contains("non-finite").all()
    assert res.summary["failed"] == bad.sum()
    assert (req["status"][~bad] == "finished").all() and req["error"][~bad].isna().all()
    assert "bad" in res.meta["bad_adapters"]
    clean = execute(trace[~bad].reset_index(drop=True), cfg, model, cat,
                    num_gpu_blocks=blocks, keep_tokens=True)
    assert (clean.requests["status"] == "finished").all()
    assert _tokens(res, np.flatnonzero(~bad)) == _tokens(clean)


def _nan_garbage(monkeypatch):
    """Every KV block holds NaN until written: the cache is allocated full of NaN and each
    block is refilled with NaN the moment it goes back to the free list (KV blocks and,
    under S-LoRA, adapter pages alike)."""
    caches = []
    alloc, give = LlamaModel.allocate_kv_cache, PagedBlockTables._give

    def allocate(self, num_blocks, block_size=16):
        kv = alloc(self, num_blocks, block_size)
        for t in kv.k + kv.v:
            t.fill_(float("nan"))
        caches.append(kv)
        return kv

    def give_back(self, table):
        if table:
            for t in caches[-1].k + caches[-1].v:
                t[list(table)] = float("nan")
        return give(self, table)

    monkeypatch.setattr(LlamaModel, "allocate_kv_cache", allocate)
    monkeypatch.setattr(PagedBlockTables, "_give", give_back)
    return caches


@pytest.mark.parametrize("policy", ["vllm", "slora"])
def test_nan_in_free_kv_blocks_changes_no_token(tiny, monkeypatch, policy):
    model_dir, cat, _ = tiny
    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float64)
    trace = _trace(seed=7)
    trace = trace[trace["adapter"] != "bad"].reset_index(drop=True)
    cfg = CFG.replace(policy=policy)
    # slora: the three adapters' pages (16 + 32 + 16 at ranks 8, 16, 8) on top of 16 blocks
    blocks = 16 if policy == "vllm" else 80
    ref = execute(trace, cfg, model, cat, num_gpu_blocks=blocks, keep_tokens=True)
    assert (ref.requests["status"] == "finished").all()
    caches = _nan_garbage(monkeypatch)
    res = execute(trace, cfg, model, cat, num_gpu_blocks=blocks, keep_tokens=True)
    assert caches and torch.isnan(caches[-1].k[0]).any()     # the garbage was there
    assert (res.requests["status"] == "finished").all(), res.requests[["status", "error"]]
    assert ref.summary["preemptions"] == res.summary["preemptions"]
    assert res.steps["batch_request_ids"].tolist() == ref.steps["batch_request_ids"].tolist()
    assert _tokens(res) == _tokens(ref)


def test_non_finite_logits_fail_the_request(tiny):
    model_dir, _, cat_huge = tiny
    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float32)
    trace = _trace(n=8, seed=11)
    res = execute(trace, CFG, model, cat_huge, num_gpu_blocks=12, keep_tokens=True)
    req = res.requests
    bad = (trace["adapter"] == "bad").to_numpy()
    assert (req["status"][bad] == "failed").all(), req[["status", "error"]]
    assert req["error"][bad].str.contains("non-finite logits").all()
    assert req["error"][bad].str.contains("'bad'").all()
    assert (req["status"][~bad] == "finished").all() and req["error"][~bad].isna().all()
    assert res.summary["failed"] == bad.sum()
    # the KV blocks the overflowing requests filled with inf/NaN harmed nobody else
    clean = execute(trace[~bad].reset_index(drop=True), CFG, model, cat_huge,
                    num_gpu_blocks=12, keep_tokens=True)
    assert _tokens(res, np.flatnonzero(~bad)) == _tokens(clean)


def test_requests_stopped_mid_prefill_and_mid_decode_free_their_blocks(tiny, monkeypatch):
    """NaN logits injected into one request's second prefill chunk (it is still
    prefilling) and into another's fourth decode: exactly those two fail, the KV
    bookkeeping stays exact (the engine asserts it every step) and everyone else's tokens
    equal the reference run's."""
    from twin.executor.inputs import prompt_token_ids

    model_dir, cat, _ = tiny
    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float64)
    trace = _trace(n=14, seed=5)
    trace = trace[trace["adapter"] != "bad"].reset_index(drop=True)
    trace.loc[0, "prompt_tokens"] = 45                     # three chunks at 16 tokens a step
    a, b = 0, int(np.flatnonzero((trace["prompt_tokens"] < 20) & (trace["output_tokens"] > 6))[0])
    cfg = CFG.replace(max_num_batched_tokens=16)
    ref = execute(trace, cfg, model, cat, num_gpu_blocks=12, keep_tokens=True)
    prompts = {int(r.request_id): prompt_token_ids(int(r.request_id), int(r.prompt_tokens),
                                                   model.shape.vocab)
               for r in trace.itertuples()}
    rid_a, rid_b = int(trace["request_id"][a]), int(trace["request_id"][b])
    pos_b = int(trace["prompt_tokens"][b]) + 3
    owner: dict[int, int] = {}        # first KV block -> request id (set by its first chunk)
    step = LlamaModel.step

    def poisoned(self, seqs, kv_cache, lora=None, **kw):
        logits = step(self, seqs, kv_cache, lora, **kw).clone()
        for j, s in enumerate(seqs):
            toks = list(s.token_ids)
            if s.start_pos == 0:
                owner[s.block_table[0]] = next(r for r, p in prompts.items()
                                               if p[:len(toks)] == toks[:len(p)])
            rid = owner[s.block_table[0]]
            if (rid == rid_a and s.start_pos > 0 and len(toks) > 1) or (
                    rid == rid_b and s.start_pos == pos_b):
                logits[j, 7] = float("nan")
        return logits

    monkeypatch.setattr(LlamaModel, "step", poisoned)
    res = execute(trace, cfg, model, cat, num_gpu_blocks=12, keep_tokens=True)
    req = res.requests
    failed = (req["status"] == "failed").to_numpy()
    assert np.flatnonzero(failed).tolist() == [a, b], req[["status", "error"]]
    pos = req["error"].str.extract(r"non-finite logits \(NaN/inf\) at position (\d+)")[0]
    assert int(pos[a]) < 44 and int(pos[b]) == pos_b      # mid-prefill; mid-decode
    # b's count includes the token of the step that failed it (positions b.prompt .. pos_b)
    assert req["generated_tokens"][a] == 0 and req["generated_tokens"][b] == 5
    assert res.summary["failed"] == 2 and res.steps["failed"].sum() == 2
    assert (req["status"][~failed] == "finished").all() and req["error"][~failed].isna().all()
    assert _tokens(res, np.flatnonzero(~failed)) == _tokens(ref, np.flatnonzero(~failed))

"""The reference executor's engine (twin.executor.engine) on the tiny model.

- KV blocks reused after completions and preemptions never corrupt other sequences: every
  request's greedy tokens under a tiny, preempting KV pool equal those of running it alone.
- Mixed multi-adapter batches (chunked prefill + decodes, several adapters and the base
  model) produce the tokens of HF PEFT generating each request on its own.
- Bad adapters fail only their requests; an unknown adapter stops the run before it starts.
- The CLI (`twin execute`, `twin make-adapters`) end to end.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twin.config import ServingConfig  # noqa: E402
from twin.errors import TwinInputError  # noqa: E402
from twin.executor.adapters import write_synthetic_adapters  # noqa: E402
from twin.executor.block_tables import PagedBlockTables  # noqa: E402
from twin.executor.engine import execute  # noqa: E402
from twin.executor.inputs import prompt_token_ids  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

# a random tiny Llama whose greedy continuations depend on the context (a larger init
# than HF's default, untied head), so a corrupted KV cache changes the tokens
TINY = dict(seed=0, initializer_range=0.2, tie_word_embeddings=False,
            max_position_embeddings=512)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("exec")
    make_tiny_llama(root / "model", **TINY)
    cat = write_synthetic_adapters(root / "model", root / "adapters", 4, ranks=(8, 16))
    return root, root / "model", AdapterCatalog(cat)


def trace_of(rows):
    """rows: (arrival_s, adapter or None, prompt, output)."""
    return pd.DataFrame({"request_id": np.arange(len(rows)) + 1000,
                         "arrival_s": [r[0] for r in rows],
                         "adapter": pd.array([r[1] for r in rows], dtype="string"),
                         "prompt_tokens": [r[2] for r in rows],
                         "output_tokens": [r[3] for r in rows]})


# ---------------------------------------------------------------------------------------------
# block tables
# ---------------------------------------------------------------------------------------------
def test_block_tables_extend_release_reuse():
    t = PagedBlockTables(6, 4)
    assert t.ensure(1, 5) == [0, 1] and t.used == 2
    assert t.ensure(1, 8) == [0, 1]                    # still fits in two blocks
    assert t.ensure(2, 9) == [2, 3, 4] and t.free == 1
    assert t.release(1) == 2 and t.free == 3
    assert t.ensure(3, 12) == [0, 1, 5]                # freed blocks come back first
    assert t.release(7) == 0
    with pytest.raises(AssertionError, match="disagree"):
        t.ensure(2, 40)


# ---------------------------------------------------------------------------------------------
# KV reuse after completion and preemption (differential vs running alone)
# ---------------------------------------------------------------------------------------------
def test_kv_reuse_after_completion_and_preemption_is_clean(tiny):
    root, model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float64)
    rng = np.random.default_rng(5)
    names = cat.adapters
    rows = []
    for k in range(14):
        arrival = 0.0 if k < 8 else 0.02 * (k - 7)     # later arrivals reuse freed blocks
        rows.append((arrival, None if k % 4 == 3 else names[k % 3],
                     int(rng.integers(5, 40)), int(rng.integers(12, 40))))
    trace = trace_of(rows)
    # 10 blocks of 8 tokens: a few requests fill the pool, decoders get preempted
    cfg = ServingConfig(max_loras=2, max_cpu_loras=3, max_num_seqs=8,
                        max_num_batched_tokens=32, block_size=8, max_model_len=80)
    res = execute(trace, cfg, model, cat, num_gpu_blocks=10, keep_tokens=True)
    req = res.requests
    assert (req["status"] == "finished").all(), req[["status", "error"]]
    assert res.summary["preemptions"] >= 3
    assert req["preemptions"].max() >= 1
    assert (req["generated_tokens"] == req["output_tokens"]).all()
    alone_cfg = cfg.replace(max_num_batched_tokens=512)
    for i in range(len(trace)):
        one = trace.iloc[[i]].assign(arrival_s=0.0)
        ref = execute(one, alone_cfg, model, cat, num_gpu_blocks=16, keep_tokens=True)
        assert ref.summary["preemptions"] == 0
        got = list(req["output_token_ids"].iloc[i])
        alone = list(ref.requests["output_token_ids"].iloc[0])
        assert got == alone, (f"request {i} (preempted {req['preemptions'].iloc[i]}x) differs "
                              "from running alone")


# ---------------------------------------------------------------------------------------------
# mixed multi-adapter batches vs HF PEFT
# ---------------------------------------------------------------------------------------------
def test_mixed_batches_match_peft_generate(tiny):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, model_dir, cat = tiny
    names = cat.adapters
    rows = [(0.0, names[0], 23, 12), (0.0, names[1], 9, 14), (0.0, None, 17, 10),
            (0.0, names[2], 30, 12), (0.0, names[1], 5, 9), (0.0, names[3], 12, 11)]
    trace = trace_of(rows)
    # budget 24: prompts are chunked and share steps with decodes; all four adapters resident
    cfg = ServingConfig(max_loras=4, max_cpu_loras=4, max_num_seqs=8,
                        max_num_batched_tokens=24, max_model_len=128)
    # fp32, the engine's grouped-GEMM LoRA path (the smallest top-2 logit gap along these
    # trajectories is ~1e-3, far above fp32 noise)
    res = execute(trace, cfg, model_dir, cat, num_gpu_blocks=32, keep_tokens=True)
    steps = res.steps
    assert (steps["batch_adapters"] >= 3).any()                       # mixed adapters
    assert ((steps["prefill_tokens"] > 0) & (steps["decode_seqs"] > 0)).any()  # mixed phases
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    paths = dict(zip(cat.table["adapter"], cat.table["path"]))
    peft = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for a in names[1:]:
        peft.load_adapter(paths[a], adapter_name=a)
    peft = peft.eval()
    vocab = base.config.vocab_size
    for i, (_, adapter, p, o) in enumerate(rows):
        ids = prompt_token_ids(int(trace["request_id"].iloc[i]), p, vocab, seed=0)
        with torch.no_grad():
            out = peft.generate(torch.tensor([ids]), max_new_tokens=o, min_new_tokens=o,
                                do_sample=False, eos_token_id=None, pad_token_id=0,
                                adapter_names=[adapter or "__base__"])
        want = out[0, p:].tolist()
        assert list(res.requests["output_token_ids"].iloc[i]) == want, f"request {i} ({adapter})"


def test_grouped_lora_delta_equals_per_segment_loop(tiny):
    from twin.executor.engine import GroupedLoRASlots
    from twin.executor.lora import LoRASlots

    model = LlamaModel.from_pretrained(tiny[1])
    g = torch.Generator().manual_seed(0)
    grouped = GroupedLoRASlots(model.shape, 4, 16)
    loop = LoRASlots(model.shape, 4, 16)
    for k in grouped.a:
        loop.a[k].copy_(grouped.a[k].copy_(torch.randn(grouped.a[k].shape, generator=g)))
        loop.b[k].copy_(grouped.b[k].copy_(torch.randn(grouped.b[k].shape, generator=g)))
    if hasattr(torch, "_grouped_mm"):
        assert grouped._grouped
    # 3 base tokens, then slots 0 (2 tokens), 2 (5 tokens, two segments), 3 (1 token)
    segments = [(0, 3, 5), (2, 5, 8), (2, 8, 10), (3, 10, 11)]
    for layer in range(model.shape.layers):
        for grp in grouped.a:
            in_f = grouped.a[grp].shape[-1]
            out_f = grouped.b[grp].shape[2]
            x = torch.randn(11, in_f, generator=g)
            y0 = torch.randn(11, out_f, generator=g)
            y1, y2 = y0.clone(), y0.clone()
            grouped.apply(layer, grp, x, y1, segments)
            loop.apply(layer, grp, x, y2, segments)
            torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-4)
            assert torch.equal(y1[:3], y0[:3])              # base tokens untouched


# ---------------------------------------------------------------------------------------------
# bad adapters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preload", [False, True])
def test_bad_adapters_fail_only_their_requests(tiny, tmp_path, preload):
    root, model_dir, cat = tiny
    good = cat.table.iloc[:2]
    # wrong shapes: an adapter made for a wider model
    make_tiny_llama(tmp_path / "wide", hidden=96, intermediate=160, heads=4, kv_heads=2)
    wide = write_synthetic_adapters(tmp_path / "wide", tmp_path / "wide_ad", 1, ranks=(8,))
    # rank above max_lora_rank
    big = write_synthetic_adapters(model_dir, tmp_path / "big", 1, ranks=(32,))
    # corrupt weights (found only when read) and pickle-only weights
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    src = good["path"].iloc[0]
    (corrupt / "adapter_config.json").write_text(open(f"{src}/adapter_config.json").read())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(open(f"{src}/adapter_config.json").read())
    (pickled / "adapter_model.bin").write_bytes(b"not unpickled")
    table = pd.DataFrame({
        "adapter": ["good0", "good1", "missing", "pickled", "corrupt", "wide", "big"],
        "rank": [8, 16, 8, 8, 8, 8, 32],
        "path": [good["path"].iloc[0], good["path"].iloc[1], str(tmp_path / "nope"),
                 str(pickled), str(corrupt), wide["path"].iloc[0], big["path"].iloc[0]]})
    catalog = AdapterCatalog(table)
    rows = [(0.0, "good0", 10, 6), (0.0, "corrupt", 8, 5), (0.0, "good1", 12, 6),
            (0.0, "missing", 6, 4), (0.0, None, 9, 5), (0.0, "wide", 7, 4),
            (0.0, "pickled", 7, 4), (0.0, "big", 7, 4),
            (0.05, "corrupt", 5, 4), (0.05, "good0", 6, 5), (0.05, "wide", 6, 3)]
    trace = trace_of(rows)
    cfg = ServingConfig(max_loras=2, max_cpu_loras=4, max_lora_rank=16, max_num_seqs=8,
                        max_num_batched_tokens=64, max_model_len=64, preload_adapters=preload)
    res = execute(trace, cfg, model_dir, catalog, num_gpu_blocks=32)
    req = res.requests.set_index(trace["adapter"].fillna("base").to_numpy() + "#"
                                 + np.arange(len(rows)).astype(str))
    ok = req[req.index.str.startswith(("good", "base"))]
    bad = req[~req.index.str.startswith(("good", "base"))]
    assert (ok["status"] == "finished").all() and ok["error"].isna().all()
    assert (ok["generated_tokens"] == ok["output_tokens"]).all()
    assert (bad["status"] == "failed").all()
    err = bad["error"].to_dict()
    assert "not found" in err["missing#3"]
    assert "pickle" in err["pickled#6"]
    assert "corrupt" in err["corrupt#1"] and "corrupt" in err["corrupt#8"]
    assert "shape" in err["wide#5"] and "wide#10" in err
    assert "max_lora_rank" in err["big#7"]
    assert res.summary["failed"] == len(bad) and res.summary["completed"] == len(ok)
    if preload:   # corrupt and wide failed at start-up; their requests on arrival
        assert res.steps["failed"].sum() == 0 and set(res.meta["bad_adapters"]) == {
            "missing", "pickled", "corrupt", "wide", "big"}
    else:         # corrupt and wide failed inside the step that loaded them
        assert res.steps["failed"].sum() >= 2


def test_unknown_adapter_is_refused_before_the_run(tiny, tmp_path):
    root, model_dir, cat = tiny
    trace = trace_of([(0.0, cat.adapters[0], 5, 3), (0.0, "no-such-adapter", 5, 3)])
    with pytest.raises(TwinInputError, match="unknown adapter 'no-such-adapter'"):
        # the model path does not exist either: the trace is refused before it is read
        execute(trace, ServingConfig(max_model_len=64), tmp_path / "no-model", cat)


# ---------------------------------------------------------------------------------------------
# the step's phases (issue 15: where a step's time goes)
# ---------------------------------------------------------------------------------------------
def test_step_phases_partition_the_step_duration(tiny):
    """The logged phases are disjoint parts of each step's wall duration: the gap since the
    previous step (its bookkeeping, arrivals), schedule, loads, forward (whose batch tensors
    are ``inputs_s``) and sampling never add up to more than the step took."""
    _, model_dir, cat = tiny
    trace = trace_of([(0.0, "lora-0000", 30, 6), (0.0, None, 12, 8), (0.3, "lora-0001", 9, 5),
                      (0.6, None, 20, 4)])
    cfg = ServingConfig(max_loras=2, max_cpu_loras=2, max_num_seqs=4,
                        max_num_batched_tokens=16, max_model_len=128)
    st = execute(trace, cfg, model_dir, cat, num_gpu_blocks=40).steps
    phases = st[["gap_s", "schedule_s", "load_s", "forward_s", "sample_s"]]
    assert (phases >= 0).all().all() and st["inputs_s"].ge(0).all()
    assert (st["inputs_s"] <= st["forward_s"]).all() and st["inputs_s"].gt(0).all()
    assert (phases.sum(axis=1) <= st["duration_s"] + 1e-9).all()
    # a step after an idle wait: its gap is only the arrivals released, not the wait
    idle = st[st["after_idle"].astype(bool)]
    assert len(idle) and (idle["gap_s"] < idle["duration_s"]).all()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_make_adapters_and_execute(tiny, tmp_path, monkeypatch, capsys):
    from twin.cli import main

    root, model_dir, _ = tiny
    monkeypatch.setenv("TWIN_CACHE_DIR", str(tmp_path / "cache"))
    trace = trace_of([(0.0, "lora-1", 9, 4), (0.01, "lora-10", 7, 5), (0.02, None, 8, 3),
                      (0.02, "lora-2", 6, 4)])
    trace.to_csv(tmp_path / "t.csv", index=False)
    assert main(["make-adapters", "--model", str(model_dir), "--n", "2", "--ranks", "8",
                 "--trace", str(tmp_path / "t.csv"), "--out", str(tmp_path / "ad")]) == 0
    cat = pd.read_csv(tmp_path / "ad" / "catalog.csv")
    assert list(cat["adapter"]) == ["lora-1", "lora-2", "lora-10"]      # natural order
    assert main(["execute", "--trace", str(tmp_path / "t.csv"), "--model", str(model_dir),
                 "--adapters", str(tmp_path / "ad"), "--max-loras", "2", "--max-model-len",
                 "64", "--num-gpu-blocks", "16", "--no-progress", "--out",
                 str(tmp_path / "run")]) == 0
    assert "Serving Benchmark Result (executor)" in capsys.readouterr().out
    for f in ("requests.parquet", "summary.json", "timeline.parquet", "steps.parquet"):
        assert (tmp_path / "run" / f).exists()
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["summary"]["completed"] == 4 and s["meta"]["executor"]
    steps = pd.read_parquet(tmp_path / "run" / "steps.parquet")
    assert steps["forward_s"].gt(0).all() and steps["num_tokens"].sum() == 9 + 7 + 8 + 6 + 12
    # --make-adapters: synthetic adapters named after the trace's, in the cache
    assert main(["execute", "--trace", str(tmp_path / "t.csv"), "--model", str(model_dir),
                 "--make-adapters", "3", "--max-model-len", "64", "--num-gpu-blocks", "16",
                 "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 4
    # unknown adapter: a clean error, exit status 2
    bad = trace.assign(adapter=pd.array(["lora-1", "x", None, "lora-2"], dtype="string"))
    bad.to_csv(tmp_path / "bad.csv", index=False)
    assert main(["execute", "--trace", str(tmp_path / "bad.csv"), "--model", str(model_dir),
                 "--adapters", str(tmp_path / "ad"), "--no-progress"]) == 2
    assert "unknown adapter 'x'" in capsys.readouterr().err

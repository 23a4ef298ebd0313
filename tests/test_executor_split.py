"""Split execution (issue 19, twin.executor.split) on the tiny model, CPU, real processes.

- Token-identical to the single-process executor (greedy, same requests and LoRA
  adapters) with 1 and 3 clients; the request table has the executor's columns + client.
- Adapters of four PEFT kinds side by side, each request equal to the PEFT reference.
- The base process holds the base weights only (its report: names and bytes) and they are
  unchanged by a run; each client holds its adapters and norm vectors only.
- Per-(layer, op) batching batches across clients under a burst of concurrent requests.
- A client that raises stops the whole run with its traceback, without hanging.
- A training client's loss falls while it shares the base with an inference client (whose
  tokens stay identical); the base's input gradients are the true ones (gradcheck).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twin.config import ServingConfig  # noqa: E402
from twin.errors import TwinInputError  # noqa: E402
from twin.executor.engine import execute  # noqa: E402
from twin.executor.inputs import prompt_token_ids  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.peft_methods import (load_peft, reference_forward,  # noqa: E402
                                        write_synthetic_peft_adapters)
from twin.executor.split import (SplitExecutionError, TrainerSpec, assign_clients,  # noqa: E402
                                 execute_split)
from twin.executor.split.base import BaseWeights  # noqa: E402
from twin.executor.split.driver import per_client_catalogs  # noqa: E402
from twin.executor.split.exchange import LocalExchange  # noqa: E402
from twin.executor.split.trainer import RemoteLinear  # noqa: E402
from tiny_llama import tiny_with_adapters  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

CONFIG = ServingConfig(enable_lora=True, max_loras=4, max_lora_rank=16, max_model_len=256)
TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_with_adapters(tmp_path_factory.mktemp("split"), 4)


def burst_trace(cat: AdapterCatalog, n: int = 12, seed: int = 0, spread_s: float = 0.0):
    """n requests (every adapter and the base model) arriving within ``spread_s``."""
    rng = np.random.default_rng(seed)
    names = cat.adapters
    return pd.DataFrame({
        "request_id": np.arange(n) + 1000,
        "arrival_s": np.sort(rng.uniform(0, spread_s, n)) if spread_s else np.zeros(n),
        "adapter": pd.array([None if i % 5 == 0 else names[i % len(names)] for i in range(n)],
                            dtype="string"),
        "prompt_tokens": rng.integers(5, 40, n), "output_tokens": rng.integers(2, 8, n)})


@pytest.fixture(scope="module")
def reference(tiny):
    model, cat = tiny
    trace = burst_trace(cat)
    return trace, execute(trace, CONFIG, model, cat, keep_tokens=True, threads=1)


@pytest.fixture(scope="module")
def three(tiny, reference):
    model, cat = tiny
    trace, _ = reference
    return execute_split(trace, CONFIG, model, cat, clients=3, keep_tokens=True,
                         timeout_s=TIMEOUT_S)


def _tokens(result) -> list[list[int]]:
    return [list(t) for t in result.requests["output_token_ids"]]


def test_three_clients_token_identical(reference, three):
    trace, ref = reference
    assert (three.requests["status"] == "finished").all()
    assert _tokens(three) == _tokens(ref)
    assert list(three.requests["request_id"]) == list(trace["request_id"])
    assert set(three.requests.columns) == set(ref.requests.columns) | {"client",
                                                                       "virtual_tokens"}
    # the catalog order gives adapter i to client i % 3; base-model requests to client 0
    assert sorted(three.requests["client"].unique()) == [0, 1, 2]


def test_base_holds_base_weights_only(tiny, three):
    model_dir, cat = tiny
    model = LlamaModel.from_pretrained(model_dir)
    expect = {"embed_tokens": model.embed, "lm_head": model.lm_head}
    for i, w in enumerate(model.layers):
        expect.update({f"layers.{i}.{op}": getattr(w, op)
                       for op in ("qkv", "o", "gate_up", "down")})
    report = three.extras["base_report"]
    assert set(report["tensors"]) == set(expect)
    assert report["tensors"] == {k: t.numel() * t.element_size() for k, t in expect.items()}
    assert three.extras["base_sha256_after"] == report["sha256"]
    # the adapters live in the clients, each client holding only its own
    held = [set(c["adapters"]) for c in three.extras["clients"]]
    assert set().union(*held) == set(cat.adapters)
    assert held[0].isdisjoint(held[1])
    for c in three.extras["clients"]:
        assert all(a["bytes"] > 0 for a in c["adapters"].values())
        assert all("norm" in name for name in c["tensors"])   # no base matrix in a client


def test_base_batches_across_clients(three):
    batches = three.extras["base_batches"]
    lin = batches[batches["kind"] == "lin"]
    assert (lin["clients"] > 1).any()
    assert set(lin["op"]) == {"qkv", "o", "gate_up", "down"}
    assert (batches["compute_s"] >= 0).all() and (batches["t_queue_s"] >= 0).all()
    steps = three.extras["client_steps"]
    assert (steps["t_end"] >= steps["t_start"]).all()
    assert (steps["base_wait_s"] > 0).all()
    req = three.requests   # every prompt token prefilled once, every later token decoded
    assert three.summary["preemptions"] == 0
    assert steps["num_tokens"].sum() == (req["prompt_tokens"] + req["output_tokens"] - 1).sum()
    assert steps["num_prefill_tokens"].sum() == req["prompt_tokens"].sum()


def test_failing_client_stops_the_run(tiny, reference):
    model, cat = tiny
    trace, _ = reference
    t = time.monotonic()
    with pytest.raises(SplitExecutionError, match="injected fault"):
        execute_split(trace, CONFIG, model, cat, clients=2, fault={1: 1}, timeout_s=TIMEOUT_S)
    assert time.monotonic() - t < TIMEOUT_S
    assert not [p for p in torch.multiprocessing.active_children()
                if p.name.startswith("split-")]


def test_one_client_beside_a_trainer(tiny, reference):
    """One inference client, token-identical, while a training client's loss falls; the
    base's weights are the same bytes after the run."""
    model, cat = tiny
    trace, ref = reference
    res = execute_split(trace, CONFIG, model, cat, clients=1, keep_tokens=True,
                        trainer=TrainerSpec(min_steps=12, seq_len=16, lr=2e-2),
                        timeout_s=TIMEOUT_S)
    assert _tokens(res) == _tokens(ref)
    assert (res.requests["client"] == 0).all()
    tr = res.summary["trainer"]
    losses = res.extras["trainer_steps"]["loss"].to_numpy()
    assert tr["train_steps"] >= 12 and tr["train_tokens_per_s"] > 0
    assert losses[-1] < 0.7 * losses[0]
    assert res.extras["base_sha256_after"] == res.extras["base_report"]["sha256"]
    kinds = set(res.extras["base_batches"]["kind"])
    assert {"lin", "grad", "embed", "head"} <= kinds


def _greedy(model, adapter, ids, n):
    ids, out = list(ids), []
    for _ in range(n):
        out.append(int(reference_forward(model, adapter, ids)[-1].argmax()))
        ids.append(out[-1])
    return out


def test_cli_mixed_peft_kinds_side_by_side(tmp_path_factory, tiny, tmp_path, capsys):
    """``twin execute --policy split --clients 2`` serving LoRA, IA3, prefix and prompt
    tuning adapters (written by PEFT) side by side: each request token-identical to greedy
    decoding with peft_methods.reference_forward (which the peft tests hold to PEFT's own
    outputs); virtual tokens counted apart from the prompt, prefix tuning's never sent to
    the base; the split tables written."""
    from twin.cli import main

    model_dir, _ = tiny
    root = tmp_path_factory.mktemp("split-peft")
    df = write_synthetic_peft_adapters(model_dir, root, virtual_tokens=5, seed=1)
    cat = AdapterCatalog(df)
    trace = burst_trace(cat, n=9, seed=2)
    trace.to_csv(tmp_path / "t.csv", index=False)
    cat.table.to_csv(tmp_path / "cat.csv", index=False)
    args = ["execute", "--trace", str(tmp_path / "t.csv"), "--model", str(model_dir),
            "--adapters", str(tmp_path / "cat.csv"), "--max-model-len", "128"]
    assert main([*args, "--policy", "split", "--clients", "2", "--keep-tokens", "--json",
                 "--out", str(tmp_path / "run")]) == 0
    assert '"completed": 9' in capsys.readouterr().out
    for f in ("steps", "base_batches", "client_steps"):
        assert (tmp_path / "run" / f"{f}.parquet").exists()
    req = pd.read_parquet(tmp_path / "run" / "requests.parquet")
    assert sorted(req["client"].unique()) == [0, 1]
    assert list(req["prompt_tokens"]) == list(trace["prompt_tokens"])
    model = LlamaModel.from_pretrained(model_dir)
    ads = {a: load_peft(p, model.shape, adapter_id=a) for a, p in zip(df.adapter, df.path)}
    assert {a.kind for a in ads.values()} == {"LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING"}
    assert set(req["adapter"].dropna()) == set(ads)
    for row in req.itertuples():
        ad = None if pd.isna(row.adapter) else ads[row.adapter]
        assert row.virtual_tokens == (ad.virtual_tokens if ad is not None else 0)
        ids = prompt_token_ids(row.request_id, row.prompt_tokens, model.shape.vocab, 0)
        assert list(row.output_token_ids) == _greedy(model, ad, ids, row.output_tokens)
    # prefix tuning's virtual tokens are KV only: scheduled and cached, never sent to the base
    bb = pd.read_parquet(tmp_path / "run" / "base_batches.parquet")
    steps = pd.read_parquet(tmp_path / "run" / "steps.parquet")
    kv_only = sum(ads[a].virtual_tokens for a in req["adapter"].dropna()
                  if ads[a].kind == "PREFIX_TUNING")
    assert kv_only > 0 and steps["preempted"].sum() == 0
    assert bb.loc[bb["kind"] == "embed", "rows"].sum() == steps["num_tokens"].sum() - kv_only
    for extra, flag in ((["--clients", "2"], "--clients"),
                        (["--policy", "split", "--device", "cuda"], "--device")):
        assert main([*args, *extra]) != 0
        assert flag in capsys.readouterr().err


def test_base_input_gradients_are_exact(tiny):
    weights = BaseWeights.load(tiny[0], torch.float64)
    ex = LocalExchange(weights)
    for op, d_in in (("qkv", 64), ("down", 128)):
        x = torch.randn(5, d_in, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: RemoteLinear.apply(t, ex, "lin", 1, op), (x,))
    h = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: RemoteLinear.apply(t, ex, "head", -1, "head"),
                                    (h,))


def test_assign_clients_and_refusals(tiny):
    model, cat = tiny
    trace = burst_trace(cat, n=10)
    who = assign_clients(trace, cat, 3)
    pos = {a: i % 3 for i, a in enumerate(cat.adapters)}
    assert list(who) == [0 if pd.isna(a) else pos[a] for a in trace["adapter"]]
    assert list(assign_clients(trace.assign(client=np.arange(10) % 2), cat, 2)) == \
        list(np.arange(10) % 2)
    # one catalog per client: each adapter on its own client
    both, owner = per_client_catalogs([cat.table.iloc[[3, 1]], cat.table.iloc[[0, 2]]])
    assert owner == {cat.adapters[3]: 0, cat.adapters[1]: 0, cat.adapters[0]: 1,
                     cat.adapters[2]: 1}
    who = assign_clients(trace, both, 2, owner)
    assert list(who) == [0 if pd.isna(a) else owner[a] for a in trace["adapter"]]
    with pytest.raises(TwinInputError, match="client 2 out of range"):
        assign_clients(trace.assign(client=2), cat, 2)
    with pytest.raises(TwinInputError, match="shared memory"):
        execute_split(trace, CONFIG, model, cat, link="pcie")

"""A split-mode client: its own requests, scheduler, paged KV cache and adapters; the base
model's weights are reached through the base executor.

:class:`SplitModel` is :class:`twin.executor.model.LlamaModel` with the base's ops (the
embedding, every packed linear, the lm_head) sent to the base executor
(``twin.executor.split.exchange``); what stays local is what the contract gives the
client: the norms (tiny vectors, read alone from the model's safetensors), RoPE,
attention over its own KV cache, its adapters' hooks around each linear, sampling.

:class:`ClientEngine` is the executor's own serving loop (``twin.executor.engine``: the
same ``Scheduler``, KV block tables, clock, recorder and result) over a ``SplitModel``,
with every adapter of the client resident from the start (``ClientAdapterStore``: no
loads, no slots) and, per step, the split counters of the contract's client-step log
(``transfer_s``, ``base_wait_s``, ``local_s``, ``context_tokens``).
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from twin.config import ALLOWED_LORA_RANKS, ServingConfig
from twin.errors import TwinInputError
from twin.executor.engine import _Engine
from twin.executor.inputs import prompt_token_ids
from twin.executor.kv_memory import choose_num_blocks
from twin.executor.model import LayerWeights, LlamaModel
from twin.executor.peft_methods.kinds import PREFIX_TUNING, VIRTUAL_TOKEN_ID
from twin.executor.prefix_blocks import block_tables
from twin.executor.shape import LlamaShape
from twin.executor.slora import BuiltServer
from twin.executor.split.client_adapters import ClientAdapterStore, check_client_adapter
from twin.executor.split.exchange import Exchange, op_dims
from twin.executor.gc_heap import freeze_startup_heap
from twin.executor.split.probe import ProcessProbe, schedstat
from twin.servers import build_server
from twin.workload.catalog import AdapterCatalog

SPLIT_STEP_COLUMNS = ["transfer_s", "base_wait_s", "local_s", "base_calls", "context_tokens"]


def read_norms(model_dir, dtype: torch.dtype) -> tuple[LlamaShape, list, torch.Tensor]:
    """The model's shape and its norm vectors only (per layer input / post-attention,
    and the final one), read tensor by tensor without loading the rest."""
    d = Path(model_dir)
    shape = LlamaShape.from_config(json.loads((d / "config.json").read_text()))
    index = d / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    want = {"norm.weight"} | {f"layers.{i}.{n}_layernorm.weight" for i in range(shape.layers)
                              for n in ("input", "post_attention")}
    got: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(d / f), framework="pt") as fh:
            for key in fh.keys():
                name = key[len("model."):] if key.startswith("model.") else key
                if name in want:
                    got[name] = fh.get_tensor(key).to(dtype)
    missing = want - set(got)
    if missing:
        raise KeyError(f"{d}: norm weights {sorted(missing)[:3]} missing")
    norms = [(got[f"layers.{i}.input_layernorm.weight"],
              got[f"layers.{i}.post_attention_layernorm.weight"]) for i in range(shape.layers)]
    return shape, norms, got["norm.weight"]


class SplitModel(LlamaModel):
    """A Llama whose base ops run in the base executor (see the module docstring).

    ``embed`` is an empty tensor that only carries the dtype and device (the engine reads
    them from it); the client holds no base weight besides the norms."""

    def __init__(self, model_dir, dtype: torch.dtype, exchange: Exchange | None):
        shape, norms, final = read_norms(model_dir, dtype)
        layers = [LayerWeights(inp, post, None, None, None, None) for inp, post in norms]
        super().__init__(shape, torch.empty(0, dtype=dtype), layers, final, None)
        self.ex = exchange
        self.name = str(model_dir)

    _keep: torch.Tensor | None = None   # the rows the base computes (None: all)

    def forward(self, batch, kv_cache, lora=None) -> torch.Tensor:
        """The model's forward; the rows of virtual tokens (prompt/prefix tuning) are
        found first for the embedding and attention to use. Prefix tuning's are KV only:
        their keys and values are the adapter's, in every layer, and no other row reads
        their hidden states, so they skip the base (:meth:`_base`)."""
        segs = batch.lora_segments
        self._virtual = lora.virtual_rows(batch.positions, segs) if segs else []
        kv_only = [rows for ad, rows, _ in self._virtual if ad.kind == PREFIX_TUNING]
        self._keep = None
        if kv_only:
            keep = torch.ones(len(batch.positions), dtype=torch.bool)
            keep[torch.cat(kv_only)] = False
            self._keep = keep.nonzero().flatten()
        return super().forward(batch, kv_cache, lora)

    def _base(self, kind: str, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        """The base's answer for the rows it computes; prefix tuning's virtual rows
        (KV only) get zeros, which only their own attention queries ever read."""
        keep = self._keep
        if keep is None:
            return self.ex.call(kind, layer, op, x)
        width = self.shape.hidden if kind == "embed" else op_dims(self.shape, op)[1]
        y = torch.zeros((x.shape[0], width), dtype=self.dtype)
        if len(keep):
            y[keep] = self.ex.call(kind, layer, op, x[keep])
        return y

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The base's embedding; prompt tuning's virtual rows take its embeddings."""
        x = self._base("embed", -1, "embed", input_ids)
        for ad, rows, idx in self._virtual:
            x[rows] = ad.after_embedding(idx, x[rows])
        return x

    def _attention(self, li: int, q, k, v, b, kv) -> torch.Tensor:
        """Attention over the client's KV cache; prefix tuning's virtual rows hold its
        keys and values (unrotated, as transformers holds them as past tokens)."""
        for ad, rows, idx in self._virtual:
            pkv = ad.prefix_kv(li)
            if pkv is not None:
                k[rows] = pkv[0][idx].to(k.dtype)
                v[rows] = pkv[1][idx].to(v.dtype)
        return super()._attention(li, q, k, v, b, kv)

    def _linear(self, li: int, op: str, x: torch.Tensor, lora, segs) -> torch.Tensor:
        if segs:
            x = lora.before(li, op, x, segs)
        y = self._base("lin", li, op, x)
        if segs:
            lora.apply(li, op, x, y, segs)
        return y

    def _head(self, last: torch.Tensor) -> torch.Tensor:
        return self.ex.call("head", -1, "head", last)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The base-model tensors the client holds (norm vectors only)."""
        named = {"norm": self.norm}
        for i, w in enumerate(self.layers):
            named[f"layers.{i}.input_norm"] = w.input_norm
            named[f"layers.{i}.post_norm"] = w.post_norm
        return named


def client_config(config: ServingConfig, n_adapters: int) -> ServingConfig:
    """The client's own server: vLLM's scheduler with every adapter of the client resident
    (as many slots and host entries as adapters, preloaded) and no rank ceiling."""
    n = max(int(n_adapters), 1)
    return config.replace(policy="vllm", max_loras=n, max_cpu_loras=n, preload_adapters=True,
                          max_lora_rank=max(ALLOWED_LORA_RANKS))


def with_virtual_tokens(trace: pd.DataFrame, names: list[str],
                        virtual: dict[int, int]) -> pd.DataFrame:
    """``trace`` with each prompt lengthened by its adapter's virtual tokens: they are
    prefilled ahead of the prompt and take KV slots like prompt tokens."""
    if not virtual:
        return trace
    extra = trace["adapter"].map({names[a]: n for a, n in virtual.items()})
    return trace.assign(prompt_tokens=trace["prompt_tokens"]
                        + extra.fillna(0).to_numpy(np.int64))


class ClientEngine(_Engine):
    """The executor's serving loop over a :class:`SplitModel` (see the module docstring).
    Adapters of any PEFT kind; a request of a prompt/prefix-tuning adapter is scheduled
    with its virtual tokens ahead of its prompt (its context holds them), its token ids
    are the executor's for its own prompt behind as many placeholders."""

    fault_step: int | None = None   # fault injection (tests): raise in this step's forward
    probe_rows: list | None = None  # a list: per step, its CPU and run-queue seconds (probe)
    check_adapter = staticmethod(check_client_adapter)

    def _build_vllm(self, config, model, catalog, trace, names, paths, num_gpu_blocks,
                    kv_cache_gib) -> BuiltServer:
        store = ClientAdapterStore(model.shape, model.dtype, names, paths)
        self.virtual = store.load_all(self.bad) if config.enable_lora else {}
        if self.virtual and "hash_ids" in trace.columns:
            virt = trace["adapter"].isin([names[a] for a in self.virtual]).fillna(False)
            if trace.loc[virt.to_numpy(bool), "hash_ids"].notna().any():
                raise TwinInputError(
                    "requests of prompt/prefix-tuning adapters with hash_ids are not served in "
                    "split mode (the hash ids name the prompt's tokens, not the virtual tokens "
                    "ahead of it)", field="hash_ids")
        self.trace = trace = with_virtual_tokens(trace, names, self.virtual)
        num_blocks = choose_num_blocks(model, config, trace, num_gpu_blocks=num_gpu_blocks,
                                       kv_cache_gib=kv_cache_gib)
        preload = ([i for i in range(len(names)) if i not in self.bad]
                   if config.enable_lora else [])
        server = build_server(config, None, catalog, layout="vllm", num_blocks=num_blocks,
                              preload=preload)
        self.split_rows: list[tuple] = []
        return BuiltServer(server, num_blocks,
                           model.allocate_kv_cache(num_blocks, config.block_size),
                           block_tables(num_blocks, config.block_size, server.scheduler),
                           store.lora, store)

    def _arrive(self, r) -> None:
        """The executor's arrival; a request with virtual tokens gets placeholders
        (``VIRTUAL_TOKEN_ID``) for them ahead of its own prompt's ids."""
        super()._arrive(r)
        n = self.virtual.get(r.adapter, 0)
        if n and r.idx in self.seqs:
            own = prompt_token_ids(r.request_id, r.prompt - n, self.model.shape.vocab,
                                   self.seed)
            self.seqs[r.idx] = [VIRTUAL_TOKEN_ID] * n + own

    def _forward_phase(self, step) -> None:
        """The executor's forward, with the split counters of the step recorded."""
        if self.fault_step is not None and len(self.split_rows) >= self.fault_step:
            raise RuntimeError(f"injected fault at step {len(self.split_rows)}")
        self.model.ex.reset()
        if self.probe_rows is not None:
            on, delay = schedstat()
            super()._forward_phase(step)
            on2, delay2 = schedstat()
            self.probe_rows.append((on2 - on, delay2 - delay))
        else:
            super()._forward_phase(step)
        transfer, wait, calls = self.model.ex.reset()
        local = max(step.t_fwd - transfer - wait, 0.0)
        ctx = sum(s + k for (_, k), s in zip(step.items, step.starts))
        self.split_rows.append((transfer, wait, local, calls, ctx))


@dataclass
class ClientSpec:
    """What a client process is given: its share of the trace and of the catalog."""

    client: int
    model_dir: str
    dtype: torch.dtype
    trace: pd.DataFrame
    catalog: AdapterCatalog
    config: ServingConfig
    seed: int = 0
    num_gpu_blocks: int | None = None
    kv_cache_gib: float | None = None
    keep_tokens: bool = False
    start_timeout_s: float = 120.0
    fault_step: int | None = None
    gc_freeze: bool = True    # twin.executor.split.probe
    probe: bool = False


def client_main(spec: ClientSpec, conn, buffers, ready, results) -> None:
    """A client process: build its server, wait for everyone, serve its requests, send
    the result (or the error) to ``results``."""
    torch.set_num_threads(1)
    ex = None
    try:
        ex = Exchange(conn, buffers, None)
        model = SplitModel(spec.model_dir, spec.dtype, ex)
        ex.shape = model.shape
        engine = ClientEngine(
            spec.trace, spec.config, model, spec.catalog, window_s=None, progress=False,
            seed=spec.seed, num_gpu_blocks=spec.num_gpu_blocks, kv_cache_gib=spec.kv_cache_gib,
            keep_tokens=spec.keep_tokens, sample_dt=None,
            meta={"model": model.name, "time_scale": 1.0, "seed": spec.seed, "threads": 1,
                  "trace": f"client {spec.client}"})
        engine.fault_step = spec.fault_step
        adapters = {a.adapter_id: {"kind": a.kind, "bytes": int(a.nbytes)}
                    for a in engine.store.lora.table}
        if spec.gc_freeze:
            freeze_startup_heap()
        watch = ProcessProbe() if spec.probe else None
        if watch is not None:
            ex.calls_log, engine.probe_rows = [], []
        ready.wait(spec.start_timeout_s)
        t0 = time.perf_counter()
        if watch is not None:
            watch.start()
        result = engine.run()
        results.put(("client", spec.client, {
            "result": result, "split_rows": engine.split_rows, "t0": t0,
            "adapters": adapters, "probe": watch.report(
                calls=ex.calls_log, steps=engine.probe_rows) if watch else None,
            "tensors": {n: int(t.numel() * t.element_size())
                        for n, t in model.tensors().items()}}))
    except BaseException:   # noqa: BLE001 - any failure goes to the driver, which stops all
        results.put(("error", f"client {spec.client}", traceback.format_exc()))
    finally:
        if ex is not None:
            ex.close()

"""Costs of split execution (Symbiosis): the base executor's batched linears, the
activation transfers between a client and the base, and a client's own (local) compute.

A forward pass in split mode is a chain of *stages*, each one request from the client to
the base executor: ``embed`` (token ids in, hidden states back), per layer the packed
linears ``qkv``, ``o``, ``gate_up``, ``down`` (activations in, outputs back), and
``lm_head`` (one hidden row per sequence in, fp32 logits back). Layers may be grouped
(``layer_groups``): a group's stage stands for its layers' requests, costs and messages
summed, so the twin's event loop takes ``4 x groups + 2`` stages a pass, not ``4 x layers
+ 2`` (batching and queueing are then resolved per group, not per layer).

- **Base** (:class:`BaseCosts`): a stage batch of ``rows`` token rows and ``seqs`` logits
  rows costs ``const[s] + prefill[s] x P + decode[s] x D + seq[s] x S + per_request``
  summed over the clients in it: the const (weights read, kernel launch) is paid once per
  batch, which is what opportunistic batching saves; ``per_request`` is the base's own
  time to take in and answer each client's message (0 from a profile; fitted on the
  executor, whose base process handles every message on its one core).
- **Transfers** (:class:`Link`): each request and response is one message, ``latency +
  bytes / bandwidth``.
- **Local**: the rest of the step (attention, norms, RoPE, adapter math, scheduling,
  sampling) on the client's device, a ``StepTimeModel``, spread evenly over the gaps
  between stages.

From a profile (:func:`split_costs`) the base's part is the dense linear cost of the
hardware: weights read once (``rank_weight_bytes / HBM bandwidth``) and ``2 x params``
FLOPs per token (``lm_head``: per logits row), each clipped to the profile's own
coefficient; the local model is the profile's step time less that part, so one client on a
free link is priced exactly as the profile prices a vLLM step. A split calibration
(``twin.calibrate.split_fit``) replaces both with fits to the executor's split mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from twin.costs.gpus import DERATE
from twin.costs.hardware import linear_params, per_rank, rank_weight_bytes
from twin.costs.step_time import FEATURES, StepTimeModel
from twin.errors import TwinInputError

OPS = ("qkv", "o", "gate_up", "down")
BASE_FEATURES = ("const", "prefill_tokens", "decode_tokens", "prefill_seqs")
LOGIT_BYTES = 4          # logits come back in fp32
TOKEN_ID_BYTES = 8       # token ids go out as int64


@dataclass(frozen=True)
class Link:
    """One message between a client and the base: ``latency_s + bytes / bytes_per_s``."""

    name: str
    latency_s: float
    bytes_per_s: float
    source: str = ""

    def seconds(self, nbytes: float, messages: float = 1.0) -> float:
        return messages * self.latency_s + nbytes / self.bytes_per_s


#: Links a client reaches the base executor over (per direction; effective, derated).
LINKS: dict[str, Link] = {
    "free": Link("free", 0.0, math.inf, "no cost: the single-process reference"),
    # shared memory on one host: a memcpy into a preallocated shared tensor (~10 GB/s for one
    # core) plus a control message through a multiprocessing pipe (~20 us round trip on Linux;
    # the executor's split mode measures its own: twin.calibrate.split_fit)
    "shm": Link("shm", 20e-6, 10e9, "one-core memcpy ~10 GB/s; pipe message ~20 us (Linux)"),
    # a client on the base's own GPU (CUDA IPC handles to the same HBM): a device copy reads
    # and writes, so half the effective HBM bandwidth (H100 64 GB: 1.6 TB/s / 2), and ~5 us
    # of event synchronisation per message
    "ipc": Link("ipc", 5e-6, 0.8e12, "same-GPU copy at half of 1.6 TB/s; 5 us sync"),
    # PCIe Gen5 x16: 64 GB/s per direction (twin.costs.gpus 'pcie_bytes_per_s') x 0.7 link
    # derate; ~10 us per small cudaMemcpy + event (a client on the CPU or another board)
    "pcie": Link("pcie", 10e-6, 64e9 * DERATE["link"], "PCIe Gen5 x16 64 GB/s x 0.7; 10 us"),
    # NVLink 4 (H100 SXM): 450 GB/s per direction x 0.7; ~5 us per peer copy
    "nvlink": Link("nvlink", 5e-6, 450e9 * DERATE["link"], "NVLink 4 450 GB/s x 0.7; 5 us"),
    # 100 Gb/s Ethernet (12.5 GB/s) x 0.7, ~30 us per message (TCP, same rack)
    "network": Link("network", 30e-6, 12.5e9 * DERATE["link"], "100 GbE x 0.7; 30 us TCP"),
}


#: ``link="auto"``: each client's link by its device (twin.policies.split)
AUTO_LINKS = {"same": "ipc", "gpu": "nvlink", "cpu": "pcie"}


def get_link(link, device: str = "same") -> Link:
    if isinstance(link, Link):
        return link
    if link == "auto":
        link = AUTO_LINKS.get(device, "shm")
    if link not in LINKS:
        raise TwinInputError(f"unknown link {link!r}; known: {', '.join(LINKS)}", field="link")
    return LINKS[link]


@dataclass(frozen=True)
class Stage:
    """One request a client makes to the base in a pass (a layer group's op, or the ends)."""

    name: str               # "embed", "g0.qkv", ..., "lm_head"
    op: str                 # "embed" | one of OPS | "lm_head"
    layers: int             # layers this stage stands for (messages per pass)
    in_bytes: float         # bytes sent per row (per logits row for lm_head)
    out_bytes: float        # bytes received per row
    per_seq: bool = False   # rows are sequences (lm_head), not tokens


@dataclass
class BaseCosts:
    """The base executor's cost per stage batch (see the module docstring)."""

    stages: list[Stage]
    const: np.ndarray       # per stage: once per batch
    prefill: np.ndarray     # per stage: per prefill token of each client in the batch
    decode: np.ndarray      # per stage: per decode token
    seq: np.ndarray         # per stage: per logits row (sequence sampled this step)
    per_request: float = 0.0   # base time to take in and answer one client's request

    def contribution(self, prefill_tokens: int, decode_tokens: int, seqs: int) -> np.ndarray:
        """What one client's step adds to each stage's batch time (the const aside)."""
        return self.prefill * prefill_tokens + self.decode * decode_tokens + self.seq * seqs

    def pass_time(self, prefill_tokens: int, decode_tokens: int, seqs: int) -> float:
        """A client's pass alone: every stage unbatched."""
        return float((self.const + self.contribution(prefill_tokens, decode_tokens, seqs)).sum()
                     + self.per_request * len(self.stages))

    def scaled(self, factor: float) -> "BaseCosts":
        return replace(self, const=self.const * factor, prefill=self.prefill * factor,
                       decode=self.decode * factor, seq=self.seq * factor,
                       per_request=self.per_request * factor)


@dataclass
class SplitCosts:
    """Everything the twin's split policy prices: the base, the link, the local model."""

    base: BaseCosts
    local: StepTimeModel
    link: Link
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        st, link = self.base.stages, self.link
        self._lat = np.array([s.layers * link.latency_s for s in st])
        self._in = np.array([s.in_bytes for s in st]) / link.bytes_per_s
        self._out = np.array([s.out_bytes for s in st]) / link.bytes_per_s
        self._seq = np.array([s.per_seq for s in st])
        self._passes: dict = {}

    def pass_costs(self, prefill_tokens: int, decode_tokens: int, seqs: int) -> tuple:
        """(base contributions, request and response transfer times, as lists; the total
        transfer; the pass's base compute alone) of a step's pass; memoised (decode steps
        repeat the same few shapes)."""
        key = (prefill_tokens, decode_tokens, seqs)
        hit = self._passes.get(key)
        if hit is None:
            if len(self._passes) > 100_000:
                self._passes.clear()
            x_in, x_out = self.transfer(prefill_tokens + decode_tokens, seqs)
            contrib = self.base.contribution(prefill_tokens, decode_tokens, seqs)
            hit = (contrib.tolist(), x_in, x_out, sum(x_in) + sum(x_out),
                   self.base.pass_time(prefill_tokens, decode_tokens, seqs))
            self._passes[key] = hit
        return hit

    def transfer(self, tokens: int, seqs: int) -> tuple[list, list]:
        """Seconds to send each stage's request and to receive its response (lists: the
        event loop reads them one by one)."""
        rows = np.where(self._seq, seqs, tokens)
        return ((self._lat + rows * self._in).tolist(), (self._lat + rows * self._out).tolist())


def stages(shape, layer_groups: int | None = None) -> list[Stage]:
    """The stages of a pass of ``shape`` with its layers in ``layer_groups`` groups."""
    L = shape.layers
    g = L if layer_groups is None else max(1, min(int(layer_groups), L))
    db, h = shape.dtype_bytes, shape.hidden
    w = per_rank(shape)
    q, kv, inter = w["q"], w["kv"], w["inter"]
    widths = {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * inter),
              "down": (inter, h)}
    sizes = [L // g + (1 if j < L % g else 0) for j in range(g)]
    out = [Stage("embed", "embed", 1, TOKEN_ID_BYTES, h * db)]
    for j, n in enumerate(sizes):
        for op in OPS:
            a, b = widths[op]
            out.append(Stage(f"g{j}.{op}", op, n, n * a * db, n * b * db))
    out.append(Stage("lm_head", "lm_head", 1, h * db, shape.vocab * LOGIT_BYTES, per_seq=True))
    return out


def _op_params(shape) -> dict:
    w, h = per_rank(shape), shape.hidden
    return {"qkv": h * (w["q"] + 2 * w["kv"]), "o": w["q"] * h, "gate_up": 2 * h * w["inter"],
            "down": w["inter"] * h}


def dense_base(profile) -> dict:
    """The base's share of the profile's step-time coefficients (``BASE_FEATURES``): the
    weights read once a pass and the linears' FLOPs at the hardware's effective rates,
    each at most the profile's own coefficient. Without rates in the profile's hardware
    (a CPU profile): its token coefficients are taken as the base's, its const as local."""
    shape, hw = profile.model, profile.hardware
    own = profile.step_time.base
    bw = hw.get("effective_hbm_bytes_per_s") or (hw.get("hbm_bytes_per_s") or 0) * DERATE["hbm"]
    fl = hw.get("effective_flops_per_s") or (hw.get("flops_per_s") or 0) * DERATE["flops"]
    if not (bw and fl):
        return {"const": 0.0, "prefill_tokens": own.get("prefill_tokens", 0.0),
                "decode_tokens": own.get("decode_tokens", 0.0), "prefill_seqs": 0.0}
    head = 2.0 * shape.vocab * shape.hidden / fl
    want = {"const": rank_weight_bytes(shape) / bw,
            "prefill_tokens": 2.0 * linear_params(shape) / fl,
            "decode_tokens": (2.0 * linear_params(shape)) / fl + head, "prefill_seqs": head}
    return {k: min(v, max(own.get(k, 0.0), 0.0)) for k, v in want.items()}


def base_costs(shape, coef: dict, layer_groups: int | None = None) -> BaseCosts:
    """Per-stage base costs from per-pass coefficients ``coef`` (``BASE_FEATURES``): the
    const, prefill and decode token costs spread over the stages by weight (the lm_head
    and embedding weights at the ends), the per-sequence cost on ``lm_head``."""
    st = stages(shape, layer_groups)
    params = _op_params(shape)
    head = shape.vocab * shape.hidden
    w = np.array([0.0 if s.op == "embed" else head if s.op == "lm_head"
                  else params[s.op] * s.layers for s in st])
    w /= w.sum()
    wl = np.array([0.0 if s.op in ("embed", "lm_head") else x for s, x in zip(st, w)])
    wl /= wl.sum()
    seq = np.zeros(len(st))
    seq[-1] = coef.get("prefill_seqs", 0.0)
    return BaseCosts(st, const=w * coef.get("const", 0.0),
                     prefill=wl * coef.get("prefill_tokens", 0.0),
                     decode=wl * coef.get("decode_tokens", 0.0), seq=seq)


def local_model(profile, base_coef: dict) -> StepTimeModel:
    """The profile's step time less the base's part (so base + local = the profile)."""
    st = profile.step_time
    base = {k: st.base.get(k, 0.0) - base_coef.get(k, 0.0) for k in FEATURES}
    return StepTimeModel(base={k: v for k, v in base.items() if v or k == "const"},
                         memory=st.memory, compute=st.compute)


def split_costs(profile, link="shm", layer_groups: int | None = None) -> SplitCosts:
    """The split costs a profile implies (see the module docstring)."""
    coef = dense_base(profile)
    return SplitCosts(base_costs(profile.model, coef, layer_groups),
                      local_model(profile, coef), get_link(link),
                      notes={"base_coefficients": coef, "source": profile.name})


#: A client's device when it is not a GPU like the base's: a two-socket server CPU (e.g.
#: 2 x Xeon 8480+: 16 channels of DDR5-4800, 614 GB/s peak; AMX BF16 ~2 x 100 TFLOP/s
#: peak on large tiles, far less on attention's shapes), derated as twin.costs.gpus
#: derates a GPU's HBM (0.8) and, for attention/adapter matmuls on a CPU, to 5 TFLOP/s.
#: Assumptions, not fits; a CPU client's local cost from the executor's split mode on
#: this box replaces them (twin.calibrate.split_fit).
CPU_DEVICE = {"bytes_per_s": 614e9 * DERATE["hbm"], "flops_per_s": 5e12}
DEVICES = ("same", "gpu", "cpu")


def client_devices(text, field: str = "devices") -> tuple[str, ...]:
    """``same,cpu`` -> ('same', 'cpu'): the clients' devices (cycled over the clients), each
    one of :data:`DEVICES`; anything else is an error naming ``field`` (the policy's option,
    or the CLI's flag, which checks it before any strategy runs)."""
    devices = tuple(d.strip() for d in str(text).split(","))
    if len(devices) > 1 and not all(devices):   # "same,,cpu": a client without a device
        raise TwinInputError(f"empty item in {text!r}: name a device for each "
                             "comma-separated client (same, gpu, cpu)", field=field)
    bad = [d for d in devices if d not in DEVICES]
    if bad:
        raise TwinInputError(f"unknown client device {bad[0]!r}; known: "
                             f"{', '.join(DEVICES)}", field=field)
    return devices

_BYTES_FEATURES = ("decode_tokens", "prefill_tokens", "decode_context", "adapter_rank")
_FLOP_FEATURES = ("prefill_context", "lora_token_rank")


def on_device(local: StepTimeModel, profile, device: str) -> StepTimeModel:
    """The client-local model on ``device``: ``same``/``gpu`` (a GPU like the base's) as
    is; ``cpu``: memory-bound terms (KV and activation bytes, adapter weights) scaled by
    the GPU's effective bandwidth over the CPU's, compute-bound ones (prefill attention,
    LoRA FLOPs) by the FLOP rates; per-step and per-call software terms unchanged."""
    if device not in DEVICES:
        raise TwinInputError(f"unknown client device {device!r}; known: {', '.join(DEVICES)}",
                             field="devices")
    if device != "cpu":
        return local
    hw = profile.hardware
    bw = hw.get("effective_hbm_bytes_per_s") or (hw.get("hbm_bytes_per_s") or 0) * DERATE["hbm"]
    fl = hw.get("effective_flops_per_s") or (hw.get("flops_per_s") or 0) * DERATE["flops"]
    rb = max(bw / CPU_DEVICE["bytes_per_s"], 1.0) if bw else 1.0
    rf = max(fl / CPU_DEVICE["flops_per_s"], 1.0) if fl else 1.0

    def scale(d):
        if d is None:
            return None
        return {k: v * (rb if k in _BYTES_FEATURES else rf if k in _FLOP_FEATURES else 1.0)
                for k, v in d.items()}

    return StepTimeModel(scale(local.base), scale(local.memory), scale(local.compute))

"""PEFT LoRA adapters: read (safetensors only), validate, pack into the slot layout; synthesise.

Loading follows vLLM's ``LRUCacheWorkerLoRAManager`` path, in phases that are timed
separately because the twin's cost model fits each one:

1. read (:func:`read_adapter`): ``adapter_config.json`` + ``adapter_model.safetensors``
   from disk. Pickle formats (``.bin``/``.pt``) are refused, never unpickled.
2. pack (:func:`pack_adapter`): check every tensor against the model, group q/k/v and
   gate/up the way the model fuses them, fold the scaling alpha/r into B.
3. copy (``LoRASlots.load_slot`` in ``lora.py``): zero the slot, host -> device.

Anything vLLM would refuse (rank > max_lora_rank, DoRA, bias, modules_to_save) or that
does not fit the model raises :class:`AdapterError`.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from twin.config import ALLOWED_LORA_RANKS
from twin.errors import TwinInputError
from twin.executor.shape import (LORA_GROUPS, LORA_MODULES, MODULE_GROUP, MODULE_PARENT,
                                 LlamaShape)
from twin.executor.weights import cache_root
from twin.outputs import MARKER, staged_dir, write_marker

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
    r"\.lora_(A|B)(?:\.[\w-]+)?\.weight$")


class AdapterError(TwinInputError):
    """An adapter that cannot be served: names the adapter and says what is wrong."""

    def __init__(self, adapter_id: str, message: str):
        self.adapter_id = adapter_id
        super().__init__(f"adapter {adapter_id!r}: {message}")


def load_error(adapter_id: str, exc: Exception) -> str:
    """Why loading an adapter failed, as its requests report it: an AdapterError's own
    message, or an OSError (unreadable file, vanished directory) as "cannot be read"."""
    if isinstance(exc, AdapterError):
        return str(exc)
    return str(AdapterError(adapter_id, f"cannot be read: {exc}"))


@dataclass
class PeftAdapter:
    """An adapter as read from disk (phase 1): PEFT config and raw tensors."""

    adapter_id: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    use_rslora: bool
    disk_bytes: int
    read_s: float

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class PackedAdapter:
    """An adapter in host memory, in the slot layout (phase 2), at its own rank.

    ``a[group]``: [layers, n_slices, rank, in]; ``b[group]``: [layers, sum(out), rank] with
    the scaling folded in. Groups and slices the adapter lacks are zero; layers it lacks too.
    """

    adapter_id: str
    rank: int
    scaling: float
    shape: LlamaShape
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    target_modules: tuple[str, ...]
    path: Path | None = None
    disk_bytes: int = 0
    read_s: float = 0.0
    pack_s: float = 0.0
    copy_s: float | None = None  # set by LoRASlots.load_slot

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    @property
    def timings(self) -> dict[str, float | None]:
        return {"read_s": self.read_s, "pack_s": self.pack_s, "copy_s": self.copy_s}


def _as_shape(model) -> LlamaShape:
    if isinstance(model, LlamaShape):
        return model
    if hasattr(model, "shape") and isinstance(model.shape, LlamaShape):
        return model.shape
    return LlamaShape.from_dir(model)


# ---------------------------------------------------------------------------------------------
# Phase 1: read
# ---------------------------------------------------------------------------------------------
def read_adapter(path, adapter_id: str | None = None) -> PeftAdapter:
    """Read and check a PEFT LoRA directory (config + safetensors). Raises AdapterError."""
    path = Path(path)
    aid = adapter_id or path.name
    t0 = time.perf_counter()
    cfg = read_adapter_config(path, aid)
    tensors, disk_bytes = read_weights(path, aid)
    read_s = time.perf_counter() - t0
    return PeftAdapter(adapter_id=aid, path=path, config=cfg, tensors=tensors,
                       rank=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                       use_rslora=bool(cfg.get("use_rslora", False)), disk_bytes=disk_bytes,
                       read_s=read_s)


def read_weights(path: Path, aid: str) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of a PEFT directory's safetensors file and its size in bytes; a corrupt
    or missing file raises AdapterError naming it."""
    w_path = weights_path(path, aid)
    data = w_path.read_bytes()
    try:
        return load(data), len(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise AdapterError(aid, f"corrupt safetensors file {w_path}: {exc}") from None


def read_adapter_config(path: Path, aid: str, *, lora_only: bool = True) -> dict:
    """The checked ``adapter_config.json`` of a PEFT directory (no weights read). Raises
    AdapterError naming what is missing or wrong; an unreadable file raises OSError.
    ``lora_only=False``: only read it (the other PEFT kinds check their own fields)."""
    if not path.is_dir():
        raise AdapterError(aid, f"adapter directory not found: {path}")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(aid, f"missing {CONFIG_NAME} in {path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(aid, f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(aid, f"{cfg_path} must hold a JSON object")
    if lora_only:
        _check_config(aid, cfg)
    return cfg


def weights_path(path: Path, aid: str) -> Path:
    """The adapter's safetensors file; AdapterError if absent (pickle checkpoints named as
    such: twin never unpickles)."""
    w_path = path / WEIGHTS_NAME
    if not w_path.is_file():
        pickled = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickled:
            raise AdapterError(aid, f"{pickled[0]} is a pickle checkpoint, which twin never loads "
                                    f"(unsafe); convert it to {WEIGHTS_NAME}")
        raise AdapterError(aid, f"missing {WEIGHTS_NAME} in {path}")
    return w_path


def _check_config(aid: str, cfg: dict) -> None:
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise AdapterError(aid, f"peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(aid, f"adapter_config.json: 'r' must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(aid, f"adapter_config.json: 'lora_alpha' must be a number, got {alpha!r}")
    if cfg.get("use_dora"):
        raise AdapterError(aid, "DoRA adapters (use_dora=true) are not supported (as in vLLM)")
    if cfg.get("bias", "none") not in ("none", None) or cfg.get("lora_bias"):
        raise AdapterError(aid, f"adapters with bias (bias={cfg.get('bias')!r}, lora_bias="
                                f"{cfg.get('lora_bias')!r}) are not supported (as in vLLM)")
    if cfg.get("modules_to_save"):
        raise AdapterError(aid, f"modules_to_save {cfg['modules_to_save']} is not supported "
                                "(as in vLLM)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterError(aid, f"per-module {key} is not supported")
    for key in ("layer_replication", "trainable_token_indices", "use_qalora",
                "alora_invocation_tokens", "target_parameters"):
        if cfg.get(key):
            raise AdapterError(aid, f"{key} is not supported")


# ---------------------------------------------------------------------------------------------
# Phase 2: pack
# ---------------------------------------------------------------------------------------------
def pack_adapter(raw: PeftAdapter, model, max_lora_rank: int, *,
                 dtype: torch.dtype = torch.float32, pin_memory: bool = False) -> PackedAdapter:
    """Check ``raw`` against the model and pack it into the slot layout (scaling folded in B).

    ``model``: a LlamaShape, a LlamaModel, or an HF model directory.
    """
    aid = raw.adapter_id
    shape = _as_shape(model)
    t0 = time.perf_counter()
    r = raw.rank
    if r > max_lora_rank:
        raise AdapterError(aid, f"rank {r} > max_lora_rank {max_lora_rank}; raise "
                                f"--max-lora-rank to at least {r}")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in sorted(raw.tensors.items()):
        m = _KEY.match(key)
        if m is None:
            if ".bias" in key or key.endswith("lora_bias"):
                raise AdapterError(aid, f"bias tensor {key!r} is not supported")
            if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
                raise AdapterError(aid, f"LoRA on embeddings/lm_head ({key!r}) is not supported; "
                                        f"target modules must be among {list(LORA_MODULES)}")
            raise AdapterError(aid, f"unexpected tensor {key!r}")
        layer, parent, module, ab = int(m[1]), m[2], m[3], m[4]
        if module not in MODULE_GROUP or MODULE_PARENT[module] != parent:
            raise AdapterError(aid, f"unsupported target module {parent}.{module!r} in {key!r}; "
                                    f"expected among {list(LORA_MODULES)}")
        if layer >= shape.layers:
            raise AdapterError(aid, f"{key!r}: layer {layer} but the model has {shape.layers} "
                                    "layers")
        in_f, out_f = shape.module_dims(module)
        if t.ndim == 2 and t.shape[0 if ab == "A" else 1] != r:
            raise AdapterError(aid, f"{key!r} has rank {t.shape[0 if ab == 'A' else 1]} "
                                    f"(shape {tuple(t.shape)}) but adapter_config.json says "
                                    f"r={r}")
        want = (r, in_f) if ab == "A" else (out_f, r)
        if tuple(t.shape) != want:
            raise AdapterError(aid, f"{key!r} has shape {tuple(t.shape)}, expected {want} "
                                    f"(rank {r}, {module} {in_f}->{out_f}): adapter does not "
                                    "match this model")
        if not t.is_floating_point():
            raise AdapterError(aid, f"{key!r} has dtype {t.dtype}, expected floating point")
        # NaN/inf weights would poison every token of the adapter's requests (and, through
        # the KV blocks they leave behind, anything that trusted those blocks): refuse them
        # here, once per read, so only this adapter's requests fail
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            raise AdapterError(aid, f"{key!r} holds {int((~finite).sum())} non-finite "
                                    f"value(s) (NaN/inf) of {t.numel()}")
        pairs.setdefault((layer, module), {})[ab] = t
    if not pairs:
        raise AdapterError(aid, f"no LoRA weights in {WEIGHTS_NAME}")
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            miss = "B" if "A" in ab else "A"
            raise AdapterError(aid, f"layers.{layer}.{module}: lora_{miss} missing")

    scaling = raw.scaling
    L = shape.layers
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    present = sorted({mod for _, mod in pairs}, key=LORA_MODULES.index)
    for g, mods in LORA_GROUPS.items():
        if not any(mod in present for mod in mods):
            continue
        in_f = shape.module_dims(mods[0])[0]
        outs = [shape.module_dims(mod)[1] for mod in mods]
        ga = torch.zeros((L, len(mods), r, in_f), dtype=dtype)
        gb = torch.zeros((L, sum(outs), r), dtype=dtype)
        for (layer, mod), ab in pairs.items():
            gg, i = MODULE_GROUP[mod]
            if gg != g:
                continue
            o0 = sum(outs[:i])
            ga[layer, i].copy_(ab["A"])
            gb[layer, o0:o0 + outs[i]].copy_(ab["B"].to(torch.float32) * scaling)
        if pin_memory:
            ga, gb = ga.pin_memory(), gb.pin_memory()
        a[g], b[g] = ga, gb
    pack_s = time.perf_counter() - t0
    return PackedAdapter(adapter_id=aid, rank=r, scaling=scaling, shape=shape, a=a, b=b,
                         target_modules=tuple(present), path=raw.path,
                         disk_bytes=raw.disk_bytes, read_s=raw.read_s, pack_s=pack_s)


def load_adapter(path, model, max_lora_rank: int, *, adapter_id: str | None = None,
                 dtype: torch.dtype = torch.float32, pin_memory: bool = False) -> PackedAdapter:
    """Read + pack (phases 1 and 2); timings in ``.read_s`` and ``.pack_s``."""
    return pack_adapter(read_adapter(path, adapter_id), model, max_lora_rank, dtype=dtype,
                        pin_memory=pin_memory)


# ---------------------------------------------------------------------------------------------
# Synthetic adapters and the catalog
# ---------------------------------------------------------------------------------------------
CATALOG_COLUMNS = ("adapter", "rank", "path", "bytes")


def write_synthetic_adapters(model_dir, out_dir, n: int, ranks: Iterable[int] = (8, 16, 32),
                             target_modules: Iterable[str] | None = None, seed: int = 0,
                             alpha: float | None = 16.0, *, b_std: float = 0.1,
                             dtype: torch.dtype = torch.float32,
                             catalog_csv: str | Path | None = "catalog.csv"):
    """Write ``n`` PEFT LoRA adapters ``lora-0000``... for the model in ``model_dir``.

    Like vLLM's dummy LoRAs, but with non-zero B so that outputs differ from the base model:
    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's init), B ~ N(0, b_std^2 / r), so the delta's size
    does not depend on the rank. Adapter i has rank ``ranks[i % len(ranks)]`` and
    ``lora_alpha = alpha`` (None: alpha = rank, scaling 1). Deterministic in ``seed``.
    Returns a DataFrame (adapter, rank, path, bytes); also written to ``out_dir/catalog_csv``
    unless that is None.
    """
    shape = _as_shape(model_dir)
    ranks = [int(r) for r in ranks]
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    if max(ranks) > ALLOWED_LORA_RANKS[-1]:
        # vLLM serves no adapter above its largest max_lora_rank; such a rank would only
        # try to allocate (ranks x hidden) weights per module until memory runs out
        raise TwinInputError(f"ranks must be <= {ALLOWED_LORA_RANKS[-1]} (vLLM's largest "
                             f"max_lora_rank), got {max(ranks)}", field="ranks")
    mods = list(LORA_MODULES if target_modules is None else target_modules)
    bad = [m for m in mods if m not in MODULE_GROUP]
    if bad:
        raise ValueError(f"unknown target modules {bad}; choose from {list(LORA_MODULES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(max(n - 1, 0))))
    rows = []
    for i in range(n):
        name = f"lora-{i:0{width}d}"
        r = ranks[i % len(ranks)]
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        tensors = {}
        for layer in range(shape.layers):
            for m in mods:
                in_f, out_f = shape.module_dims(m)
                key = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[m]}.{m}"
                bound = 1.0 / math.sqrt(in_f)
                tensors[f"{key}.lora_A.weight"] = (
                    (torch.rand((r, in_f), generator=g) * 2 - 1) * bound).to(dtype).contiguous()
                tensors[f"{key}.lora_B.weight"] = (
                    torch.randn((out_f, r), generator=g) * (b_std / math.sqrt(r))).to(dtype)
        d = out / name
        d.mkdir(exist_ok=True)
        save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
               "lora_alpha": float(r if alpha is None else alpha), "lora_dropout": 0.0,
               "target_modules": mods, "bias": "none", "use_dora": False, "use_rslora": False,
               "modules_to_save": None, "fan_in_fan_out": False, "inference_mode": True,
               "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
               "base_model_name_or_path": str(model_dir)}
        (d / CONFIG_NAME).write_text(json.dumps(cfg, indent=1))
        rows.append({"adapter": name, "rank": r, "path": str(d),
                     "bytes": (d / WEIGHTS_NAME).stat().st_size})
    df = _frame(rows)
    if catalog_csv is not None:
        write_adapter_catalog(df, out / catalog_csv)
    return df


def adapter_catalog(source) -> "Any":
    """Catalog (DataFrame: adapter, rank, path, bytes; kind where one is not LoRA) of PEFT
    adapter directories: ``source``'s sub-directories, or an iterable of adapter
    directories (only their configs and file sizes are read)."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        dirs = sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file())
    else:
        dirs = [Path(p) for p in source]
    rows = []
    for d in dirs:
        try:
            cfg = json.loads((d / CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AdapterError(d.name, f"cannot read {d / CONFIG_NAME}: {exc}") from None
        w = d / WEIGHTS_NAME
        rows.append({"adapter": d.name, "rank": int(cfg.get("r", 0)), "path": str(d),
                     "bytes": w.stat().st_size if w.exists() else 0,   # kind: PEFT's name
                     "kind": str(cfg.get("peft_type") or "LORA").upper()})
    return _frame(rows)


def write_adapter_catalog(catalog, path) -> Path:
    """Write a catalog (DataFrame or list of dicts) as CSV with columns adapter, rank, path, bytes."""
    df = catalog if isinstance(catalog, pd.DataFrame) else _frame(list(catalog))
    missing = [c for c in CATALOG_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"catalog lacks columns {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.loc[:, list(CATALOG_COLUMNS)].to_csv(path, index=False)
    return path


def _frame(rows: list[dict]):
    kind = ("kind",) if any(r.get("kind", "LORA") != "LORA" for r in rows) else ()   # LoRA: no
    df = pd.DataFrame(rows, columns=[*CATALOG_COLUMNS, *kind])
    return df.astype({"adapter": "string", "rank": "int64", "path": "string", "bytes": "int64"})


def natural_key(s: str):
    """Sort key putting ``lora-2`` before ``lora-10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def make_adapters(model_dir, out_dir, n: int, ranks=(8, 16), *, names=None, seed: int = 0,
                  cached: bool = False):
    """Write ``n`` synthetic adapters to ``out_dir`` and its catalog.csv; with ``names``
    (e.g. a trace's adapters) the catalog maps name k to directory k mod n. Returns the
    catalog DataFrame (adapter, rank, path, bytes). Written through :mod:`twin.outputs`
    (kind ``adapters``); ``cached``: ``out_dir`` lies in twin's own cache, so a folder there
    from before the output marker existed is twin's to replace."""
    if n < 1:
        raise TwinInputError(f"need at least one adapter, got {n}", field="--n")
    if cached and Path(out_dir).is_dir() and not (Path(out_dir) / MARKER).exists():
        write_marker(out_dir, "adapters")
    final = Path(out_dir).resolve()
    with staged_dir(out_dir, "adapters") as tmp:
        df = write_synthetic_adapters(model_dir, tmp, n, ranks=ranks, seed=seed)
        # the catalog names where the adapters will be, not the staging directory
        df["path"] = [str(final / Path(p).relative_to(tmp)) for p in df["path"]]
        if names is not None:
            names = sorted(set(names), key=natural_key)
            rows = [dict(df.iloc[k % n].to_dict(), adapter=a) for k, a in enumerate(names)]
            df = pd.DataFrame(rows, columns=list(df.columns)).astype(df.dtypes.to_dict())
        write_adapter_catalog(df, tmp / "catalog.csv")
    return df


def make_cached_adapters(model_dir, n: int, ranks=(8, 16), *, names=None, seed: int = 0,
                         prefix: str = "adapters") -> Path:
    """:func:`make_adapters` into twin's cache (``~/.cache/twin``), in a folder named after
    the model, ``n``, the ranks and the seed; returns the folder. The cache, not a run's
    ``--out``: that is written in one piece when the run ends."""
    where = cache_root() / (f"{prefix}-{Path(model_dir).name}-{n}-"
                            f"{'_'.join(map(str, ranks))}-s{seed}")
    make_adapters(model_dir, where, n, ranks, names=names, seed=seed, cached=True)
    return where

"""Workload specifications and configuration grids: what a sweep runs.

A :class:`WorkloadSpec` names a synthetic workload family and its parameters (or a trace
file); it builds the trace and the adapter catalog deterministically and hashes to a stable
key, so a sweep can tell which (workload, config) points it has already run. A
:class:`ConfigGrid` turns a workload into the serving configurations to try: a base
configuration (the fixed knobs) with ``max_loras`` over the slot grid, ``max_cpu_loras`` =
the workload's adapter count (every adapter served) and ``max_lora_rank`` = the largest
rank present, as in arXiv 2508.08343.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BeforeValidator, Field, model_validator

from twin.config import ALLOWED_LORA_RANKS, ServingConfig, read_yaml, read_yaml_mapping
from twin.errors import TwinInputError
from twin.schemas import Float, Int, Schema, validate
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import (adapter_names, pool_lengths, powerlaw_trace,
                                    rate_class_trace, uniform_lengths)
from twin.workload.public import SHAREGPT_FILE, shared_trace_path, sharegpt_length_pool
from twin.workload.schema import read_trace

#: ``max_loras`` values tried (the paper's grid, 8..384, plus 1, 2, 4 for small workloads).
SLOTS_GRID = (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 256, 320, 384)
#: The paper's served-adapter grid.
SERVED_GRID = (8, 16, 32, 64, 96, 128, 160, 192, 256, 320, 384)
#: The paper's fixed knobs (vLLM 0.8.5 runs of arXiv 2508.08343); adapters preloaded in host
#: memory as ``--dummy-lora-modules`` does.
PAPER_BASE = dict(max_num_seqs=2048, max_num_batched_tokens=2048, gpu_memory_utilization=0.9,
                  max_model_len=131072, preload_adapters=True)

_LENGTH_DEFAULTS = {
    "sharegpt": {"kind": "sharegpt", "means": [223.0, 196.0], "max_prompt": 1024,
                 "max_total": 2048},
    "uniform": {"kind": "uniform", "lo": 8, "hi": 512},
}
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "rate_classes": {"n_adapters": 32, "rates": [1.6, 0.8, 0.4], "ranks": [16],
                     "duration_s": 3600.0, "lengths": "sharegpt", "arrival": "poisson",
                     "cv": 1.0, "seed": 0},
    "powerlaw": {"n_adapters": 32, "total_rate": 10.0, "alpha": 1.0, "cv": 1.0,
                 "ranks": [16], "duration_s": 3600.0, "lengths": "sharegpt", "seed": 0},
    "trace": {"path": None, "catalog": None, "default_rank": 16},
}


def pad_rank(rank: int) -> int:
    """The smallest vLLM-allowed ``max_lora_rank`` >= ``rank``."""
    for r in ALLOWED_LORA_RANKS:
        if r >= rank:
            return r
    raise TwinInputError(f"rank {rank} exceeds vLLM's largest max_lora_rank "
                         f"{ALLOWED_LORA_RANKS[-1]}", field="rank")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def digest(obj, n: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def profile_digest(profile) -> str:
    """A hash of what a profile prices (everything but its ``provenance``, which records how
    it was fitted and changes no simulation): sweep keys and the recommender's check that it
    runs on the profile it was trained on use it."""
    d = profile.to_dict()
    d.pop("provenance", None)
    return digest(d)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# -- the workload spec's schema (what each family reads; ranges the generators need) -------------
def _as_list(v):
    """A scalar where a list belongs is a one-element list (``rates: 2``)."""
    return list(np.atleast_1d(v)) if isinstance(v, (int, float, np.ndarray)) else v


_PosFloat = Annotated[Float, Field(gt=0)]
_PosInt = Annotated[Int, Field(ge=1)]
_Rank = Annotated[Int, Field(ge=1, le=ALLOWED_LORA_RANKS[-1])]


class ShareGPTLengths(Schema):
    kind: Literal["sharegpt"]
    means: Annotated[list[_PosFloat], Field(min_length=2, max_length=2)] | None = None
    max_prompt: _PosInt = 1024
    max_total: _PosInt = 2048


class UniformLengths(Schema):
    kind: Literal["uniform"]
    lo: _PosInt = 8
    hi: _PosInt = 512

    @model_validator(mode="after")
    def _order(self):
        if self.hi <= self.lo:
            raise ValueError(f"hi ({self.hi}) must be > lo ({self.lo}): lengths are U[lo, hi)")
        return self


_LENGTH_SCHEMAS = {"sharegpt": ShareGPTLengths, "uniform": UniformLengths}


class _Synthetic(Schema):
    n_adapters: _PosInt
    ranks: Annotated[list[_Rank], Field(min_length=1), BeforeValidator(_as_list)]
    duration_s: _PosFloat
    lengths: Any
    cv: _PosFloat
    seed: Annotated[Int, Field(ge=0)]


class RateClassesParams(_Synthetic):
    rates: Annotated[list[_PosFloat], Field(min_length=1), BeforeValidator(_as_list)]
    arrival: Literal["poisson", "gamma"]


class PowerlawParams(_Synthetic):
    total_rate: _PosFloat
    alpha: _PosFloat


_PathStr = Annotated[str, Field(min_length=1),
                     BeforeValidator(lambda v: str(v) if isinstance(v, Path) else v)]


class TraceParams(Schema):
    path: _PathStr
    catalog: _PathStr | None = None
    default_rank: _Rank = 16


_PARAM_SCHEMAS = {"rate_classes": RateClassesParams, "powerlaw": PowerlawParams,
                  "trace": TraceParams}


def _norm_lengths(v) -> dict:
    if isinstance(v, str):
        if v not in _LENGTH_DEFAULTS:
            raise TwinInputError(f"lengths must be one of {sorted(_LENGTH_DEFAULTS)} or a "
                                 f"mapping with 'kind', got {v!r}", field="lengths")
        return dict(_LENGTH_DEFAULTS[v])
    if not isinstance(v, dict) or not isinstance(v.get("kind"), str) \
            or v["kind"] not in _LENGTH_DEFAULTS:
        raise TwinInputError(f"lengths: expected 'sharegpt', 'uniform' or a mapping with kind "
                             f"sharegpt|uniform, got {v!r}", field="lengths")
    m = validate(_LENGTH_SCHEMAS[v["kind"]], v, None, prefix="lengths")
    return {**_LENGTH_DEFAULTS[v["kind"]], **m.model_dump(exclude_unset=True)}


@lru_cache(maxsize=8)
def _sharegpt_pool(means: tuple | None, max_prompt: int, max_total: int) -> np.ndarray:
    return sharegpt_length_pool(shared_trace_path(SHAREGPT_FILE), max_prompt=max_prompt,
                                max_total=max_total, target_means=means)


def length_sampler(lengths: dict):
    if lengths["kind"] == "uniform":
        return uniform_lengths(int(lengths["lo"]), int(lengths["hi"]))
    means = tuple(lengths["means"]) if lengths["means"] is not None else None
    return pool_lengths(_sharegpt_pool(means, int(lengths["max_prompt"]),
                                       int(lengths["max_total"])))


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload: ``family`` (rate_classes | powerlaw | trace) and its parameters.

    rate_classes (arXiv 2508.08343): ``n_adapters`` independent Poisson/Gamma processes at
    class ``rates`` (round-robin, shuffled); powerlaw (S-LoRA): one process of
    ``total_rate`` req/s, adapter popularity power(``alpha``), gap CV ``cv``. Both: adapter
    ranks cycle over ``ranks`` and are shuffled; ``lengths`` is 'sharegpt' (the ShareGPT
    pool rescaled to ``means``; needs the shared data) or 'uniform' (U[lo, hi)). trace: a
    trace file (``path``) with an optional ``catalog``. Everything is deterministic given
    ``seed``.
    """

    family: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in _FAMILY_DEFAULTS:
            raise TwinInputError(f"unknown workload family {self.family!r}; known: "
                                 f"{sorted(_FAMILY_DEFAULTS)}", field="family")
        d = dict(_FAMILY_DEFAULTS[self.family])
        unknown = set(self.params) - set(d)
        if unknown:
            raise TwinInputError(f"unknown {self.family} setting(s) {sorted(unknown)}; known: "
                                 f"{sorted(d)}", field=sorted(unknown)[0])
        # a null (None) parameter means the family's default
        d.update({k: v for k, v in self.params.items() if v is not None or k in ("catalog",)})
        if self.family == "trace" and not d["path"]:   # the schema would say "too short"
            raise TwinInputError("a trace workload needs 'path'", field="path")
        if self.family == "trace" and not d["catalog"]:   # '' as no catalog, as before
            d["catalog"] = None
        d = validate(_PARAM_SCHEMAS[self.family], d, None).model_dump()
        if self.family != "trace":
            d["lengths"] = _norm_lengths(d["lengths"])
        object.__setattr__(self, "params", d)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "WorkloadSpec":
        if d is not None and not isinstance(d, dict):
            raise TwinInputError(f"a workload spec is a mapping (family: ..., n_adapters: ...), "
                                 f"got {type(d).__name__}")
        d = dict(d or {})
        if "family" not in d:
            raise TwinInputError("a workload spec needs 'family' (rate_classes, powerlaw or "
                                 "trace)", field="family")
        fam = d.pop("family")
        if not isinstance(fam, str):
            raise TwinInputError(f"family must be rate_classes, powerlaw or trace, got {fam!r}",
                                 field="family")
        return cls(fam, {str(k): v for k, v in d.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "WorkloadSpec":
        """The spec of a YAML file; a trace spec's relative ``path`` and ``catalog`` are
        read from the file's folder (:func:`paths_beside`)."""
        d = read_yaml_mapping(path, missing="workload spec not found",
                              expected="a mapping (family: ..., n_adapters: ...)")
        try:
            return cls.from_dict(paths_beside(d, Path(path).parent))
        except TwinInputError as exc:
            raise TwinInputError(exc.detail, file=str(path), field=exc.field) from None

    def to_dict(self) -> dict:
        return {"family": self.family, **self.params}

    def replace(self, **changes) -> "WorkloadSpec":
        return WorkloadSpec(self.family, {**self.params, **changes})

    # -- identity -------------------------------------------------------------------------
    def identity(self) -> dict:
        """What the key hashes: the parameters, and a trace file's content."""
        d = self.to_dict()
        if self.family == "trace":
            d["path_sha"] = _file_digest(d.pop("path"))
            if d.get("catalog"):
                d["catalog_sha"] = _file_digest(d.pop("catalog"))
        return d

    @property
    def key(self) -> str:
        return digest(self.identity())

    @property
    def family_key(self) -> str:
        """The workload without its size and seed: groups workloads for held-out splits."""
        d = self.identity()
        for k in ("n_adapters", "seed", "total_rate"):
            d.pop(k, None)
        return digest(d)

    @property
    def duration_s(self) -> float | None:
        return self.params.get("duration_s")

    # -- building -------------------------------------------------------------------------
    def build(self) -> tuple[pd.DataFrame, AdapterCatalog]:
        """The trace and its adapter catalog."""
        p = self.params
        if self.family == "trace":
            trace = read_trace(p["path"])
            if p["catalog"]:
                catalog = AdapterCatalog.read(p["catalog"])
            else:
                names = sorted(trace["adapter"].dropna().unique().tolist())
                catalog = AdapterCatalog.uniform(names, int(p["default_rank"]))
            return trace, catalog
        lengths = length_sampler(p["lengths"])
        if self.family == "rate_classes":
            trace = rate_class_trace(p["n_adapters"], p["rates"], duration_s=p["duration_s"],
                                     lengths=lengths, arrival=p["arrival"], cv=p["cv"],
                                     seed=p["seed"])
        else:
            trace = powerlaw_trace(p["n_adapters"], p["total_rate"], alpha=p["alpha"],
                                   duration_s=p["duration_s"], cv=p["cv"], lengths=lengths,
                                   seed=p["seed"])
        n = p["n_adapters"]
        ranks = np.asarray(p["ranks"], dtype=np.int64)
        rng = np.random.default_rng([p["seed"], 7])
        per = rng.permutation(ranks[np.arange(n) % len(ranks)])
        catalog = AdapterCatalog(pd.DataFrame({"adapter": adapter_names(n), "rank": per}),
                                 source=f"{self.family} spec")
        return trace, catalog

    def describe(self) -> str:
        p = self.params
        if self.family == "trace":
            return f"trace {p['path']}"
        lens = p["lengths"]
        ls = (f"sharegpt{tuple(int(m) for m in lens['means'])}" if lens["kind"] == "sharegpt"
              and lens["means"] else lens["kind"])
        if self.family == "rate_classes":
            return (f"rate_classes n={p['n_adapters']} rates={p['rates']} ranks={p['ranks']} "
                    f"{ls} {p['arrival']} seed={p['seed']}")
        return (f"powerlaw n={p['n_adapters']} rate={p['total_rate']} alpha={p['alpha']} "
                f"cv={p['cv']} ranks={p['ranks']} {ls} seed={p['seed']}")


def slot_candidates(n_adapters: int, grid=SLOTS_GRID) -> list[int]:
    """``max_loras`` values for ``n_adapters`` served adapters: grid values below n, and n."""
    n = max(1, int(n_adapters))
    return sorted({m for m in grid if m < n} | {n})


@dataclass(frozen=True)
class ConfigGrid:
    """Configurations for a workload: ``base`` with ``max_loras`` over ``slots`` (values
    above the adapter count dropped, the adapter count itself added), ``max_cpu_loras`` =
    adapters served, ``max_lora_rank`` = the largest rank present (padded to vLLM's set)."""

    base: ServingConfig = field(default_factory=lambda: ServingConfig(**PAPER_BASE))
    slots: tuple = SLOTS_GRID

    def configs(self, n_adapters: int, max_rank: int) -> list[ServingConfig]:
        return [config_for(self.base, m, n_adapters, max_rank)
                for m in slot_candidates(n_adapters, self.slots)]


def config_for(base: ServingConfig, max_loras: int, n_adapters: int,
               max_rank: int) -> ServingConfig:
    n = max(int(n_adapters), int(max_loras))
    return base.replace(max_loras=int(max_loras), max_cpu_loras=n,
                        max_lora_rank=pad_rank(int(max_rank)))


def paper_base() -> ServingConfig:
    return ServingConfig(**PAPER_BASE)


def base_config(path=None, model_context: int | None = None, *,
                engine: dict | None = None) -> ServingConfig:
    """The paper's base config, with the settings of the YAML file at ``path`` over it.
    ``model_context``: the served model's context (``max_position_embeddings``); when the
    file does not set ``max_model_len``, vLLM derives it from the model, and so does this
    (the paper's 131072 is Llama-3.1's context). ``engine``: the profile's hardware, which
    engine settings the file states must match (``ServingConfig.from_dict``)."""
    d = dict(PAPER_BASE)
    keys: set = set()
    if path is not None:
        given = ServingConfig.from_yaml(path, engine=engine)   # names, types, refusals
        keys = {str(k).replace("-", "_") for k in
                read_yaml_mapping(path, expected="a mapping of vLLM setting names to values")}
        d.update({k: v for k, v in given.to_dict().items() if k in keys})   # only what it sets
    if model_context is not None and "max_model_len" not in keys:
        d["max_model_len"] = int(model_context)
    return ServingConfig.from_dict(d, source=str(path or "the paper's base"))


def paths_beside(d: dict, folder: Path) -> dict:
    """A trace spec's relative ``path`` and ``catalog`` as read from a spec file in
    ``folder``: beside the spec file, as a spec file kept with its trace means; a file
    found only from the working directory (what a relative path meant before) is still
    read from there; one found nowhere is reported beside the spec file."""
    if d.get("family") != "trace":
        return d
    out = dict(d)
    for key in ("path", "catalog"):
        v = out.get(key)
        if isinstance(v, (str, Path)) and str(v) and not Path(v).is_absolute():
            beside = folder / v
            if beside.exists() or not Path(v).exists():
                out[key] = str(beside)
    return out


def load_workloads_yaml(path: Path) -> list:
    """The workload specs of a YAML file: one spec, a list, or ``workloads: [...]``; an
    entry's ``grid: {setting: [values]}`` expands to one spec per combination."""
    data = read_yaml(path, missing="workloads file not found")
    items = data if isinstance(data, list) else (data.get("workloads", [data])
                                                 if isinstance(data, dict) else None)
    if isinstance(items, dict):
        items = [items]
    if not items or not isinstance(items, list):
        raise TwinInputError("expected a workload spec or a list of them", file=str(path))
    specs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TwinInputError("each workload is a mapping", file=str(path), row=i)
        item = dict(item)
        grid = item.pop("grid", None) or {}
        if not isinstance(grid, dict):
            raise TwinInputError("grid is a mapping of setting: [values]", file=str(path),
                                 row=i, field="grid")
        keys = list(grid)
        for k in keys:
            if not isinstance(grid[k], list) or not grid[k]:   # [] would expand to nothing
                raise TwinInputError("grid values are non-empty lists", file=str(path),
                                     row=i, field=f"grid.{k}")
        for combo in itertools.product(*(grid[k] for k in keys)):
            try:
                specs.append(WorkloadSpec.from_dict(
                    paths_beside({**item, **dict(zip(keys, combo))}, Path(path).parent)))
            except TwinInputError as exc:
                raise TwinInputError(exc.detail, file=str(path), row=i,
                                     field=exc.field) from None
    if not specs:   # a sweep of nothing would report an empty dataset as done
        raise TwinInputError("the workloads expand to no workload", file=str(path))
    return specs

"""ServingConfig: the knobs of a vLLM multi-LoRA server, under vLLM's own names.

Defaults are vLLM's (``LoRAConfig``, ``SchedulerConfig``) for a >=70 GiB GPU served through
the API server. ``policy`` selects the serving strategy; ``preload_adapters`` is twin's
own switch for servers that load every adapter into host memory at start-up (as the
``--dummy-lora-modules`` runs of arXiv 2508.08343 do, and as vLLM does with the adapters a
config file's ``lora-modules`` lists: such a file turns it on unless it says otherwise).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field

from twin.errors import TwinInputError
from twin.schemas import Float, Int, Schema, validate

#: vLLM's ``MaxLoRARanks`` (vllm/config/lora.py)
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: vLLM's ``BlockSize`` literal (vllm/config/cache.py, vLLM 0.10-0.11; 256 is not in it)
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
# serving strategies (twin.policies; issue 7): "vllm" is the default and the engine's own
POLICIES = ("vllm", "slora", "merged", "hybrid", "split")
# `vllm serve` settings that do not change what the twin models: accepted and ignored, so a
# vLLM YAML config (e.g. the one `twin recommend` writes) can be simulated as it is
VLLM_IGNORED = frozenset({"model", "served_model_name", "host", "port",
                          "tokenizer", "dtype", "seed", "api_key", "disable_log_requests",
                          "disable_log_stats", "trust_remote_code", "download_dir"})
#: engine settings a profile describes (``twin profile``; ``profile.hardware``), with vLLM's
#: defaults: a config file may state them (twin recommend writes them), and they must be
#: the profile's, else the file serves another engine than the one simulated
ENGINE_SETTINGS = {"tensor_parallel_size": 1, "quantization": None, "kv_cache_dtype": "auto"}


def _one_of(allowed: tuple, vllm_name: str):
    def check(v):
        if v not in allowed:
            raise ValueError(f"must be one of {allowed} (vLLM's {vllm_name})")
        return v
    return check


def setting_names(d: dict, source: str = "config") -> dict:
    """``d`` with vLLM's flag spelling (``max-loras``) read as the setting's name
    (``max_loras``); two keys naming one setting are refused (one would win silently)."""
    out: dict = {}
    for k, v in d.items():
        name = str(k).replace("-", "_")
        if name in out:
            raise TwinInputError(f"{name} is given twice (as {name!r} and its flag spelling "
                                 f"{name.replace('_', '-')!r}); keep one", file=source,
                                 field=name)
        out[name] = v
    return out


@dataclass(frozen=True)
class ServingConfig:
    enable_lora: bool = True
    max_loras: int = 1
    max_cpu_loras: int | None = None  # vLLM: defaults to max_loras
    max_lora_rank: int = 16
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    enable_chunked_prefill: bool = True
    max_model_len: int = 131072
    policy: str = "vllm"
    preload_adapters: bool = False
    # vLLM V1's automatic prefix caching (on by default there too): requests of a trace
    # with hash_ids reuse cached prefix blocks of their own adapter; without hash_ids no
    # request hits and every figure is what caching off gives
    enable_prefix_caching: bool = True
    # vLLM's --lora-modules, by name: the adapters a server loads at start-up (with
    # preload_adapters; None: every catalog adapter), as a config file twin place writes
    # lists its GPU's; a config that gives none writes none (to_dict)
    lora_modules: tuple | None = None

    def __post_init__(self):
        # vLLM's max_cpu_loras defaults to max_loras: a config given none follows its
        # max_loras through replace() too (ServingConfig().replace(max_loras=8) was
        # refused, its materialized max_cpu_loras 1 below 8)
        follows = self.max_cpu_loras is None
        if follows:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        object.__setattr__(self, "_cpu_follows", follows)
        self.validate()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config",
                  engine: dict | None = None) -> "ServingConfig":
        """The config of vLLM settings ``d`` (vLLM's names or flag spellings). Engine
        settings (``ENGINE_SETTINGS``: tensor parallelism, FP8) are the profile's: they
        are checked against ``engine`` (the profile's ``hardware``) and refused without
        it, never dropped unread."""
        if not isinstance(d, dict):
            raise TwinInputError(f"expected a mapping of vLLM setting names to values, got "
                                 f"{type(d).__name__}", file=source)
        known = {f.name for f in dataclasses.fields(cls)}
        named = setting_names(d, source)
        check_engine_settings(named, engine, source=source)
        norm = {k: v for k, v in named.items()
                if k not in VLLM_IGNORED and k not in ENGINE_SETTINGS}
        if "lora_modules" in norm:
            norm["lora_modules"] = lora_module_names(norm["lora_modules"], source)
        if norm.get("lora_modules") and "preload_adapters" not in norm:
            # vLLM loads --lora-modules into host memory at start-up (init_static_loras ->
            # add_lora), as the config files twin recommend writes list them
            norm["preload_adapters"] = True
        unknown = sorted(set(norm) - known)
        if unknown:
            raise TwinInputError(
                f"unknown setting(s) {unknown}; known: {sorted(known)}", file=source,
                field=unknown[0])
        c = _checked(norm, source, vllm=True)
        if norm.get("max_cpu_loras") is None:   # vLLM's default: it follows max_loras
            c["max_cpu_loras"] = None
        return cls(**c)

    @classmethod
    def from_yaml(cls, path: str | Path, *, engine: dict | None = None) -> "ServingConfig":
        data = read_yaml_mapping(path, expected="a mapping of vLLM setting names to values")
        return cls.from_dict(data, source=str(path), engine=engine)

    def replace(self, **changes) -> "ServingConfig":
        """A copy with ``changes``; ``max_cpu_loras`` still vLLM's default (``max_loras``)
        when it was not given, here or when ``self`` was built. Whether it was given is
        not part of a config's equality or of ``to_dict`` (a config written out states its
        value), so ``ServingConfig()`` and ``ServingConfig(max_cpu_loras=1)`` are equal but
        only the first follows a new ``max_loras``."""
        if self._cpu_follows and "max_cpu_loras" not in changes:
            changes["max_cpu_loras"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["lora_modules"] is None:   # as every config written before the field
            del d["lora_modules"]
        else:
            d["lora_modules"] = list(d["lora_modules"])
        return d

    # -- checks vLLM makes at start-up -----------------------------------------------------
    def validate(self) -> None:
        """Types and ranges (:class:`ServingSchema`), then vLLM's cross-setting refusals;
        values are normalised in place ("8" -> 8)."""
        vals = _checked({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                        "config")
        for k, v in vals.items():
            object.__setattr__(self, k, v)

    def vllm_args(self) -> list[str]:
        """The equivalent ``vllm serve`` flags."""
        args = []
        if self.enable_lora:
            args += ["--enable-lora", f"--max-loras={self.max_loras}",
                     f"--max-cpu-loras={self.max_cpu_loras}", f"--max-lora-rank={self.max_lora_rank}"]
        args += [f"--max-num-seqs={self.max_num_seqs}",
                 f"--max-num-batched-tokens={self.max_num_batched_tokens}",
                 f"--gpu-memory-utilization={self.gpu_memory_utilization}",
                 f"--block-size={self.block_size}", f"--max-model-len={self.max_model_len}"]
        args.append("--enable-chunked-prefill" if self.enable_chunked_prefill
                    else "--no-enable-chunked-prefill")
        if not self.enable_prefix_caching:   # on is vLLM V1's default
            args.append("--no-enable-prefix-caching")
        return args


class ServingSchema(Schema):
    """Types and ranges of the serving settings, as vLLM declares them (vLLM 0.11:
    ``vllm/config/{lora,cache,scheduler,model}.py``)."""

    enable_lora: bool
    max_loras: Annotated[Int, Field(ge=1)]
    max_cpu_loras: Annotated[Int, Field(ge=1)] | None
    max_lora_rank: Annotated[Int, AfterValidator(_one_of(ALLOWED_LORA_RANKS, "MaxLoRARanks"))]
    max_num_seqs: Annotated[Int, Field(ge=1)]
    max_num_batched_tokens: Annotated[Int, Field(ge=1)]
    gpu_memory_utilization: Annotated[Float, Field(gt=0.0, le=1.0)]
    block_size: Annotated[Int, Field(ge=1)]   # vLLM's BlockSize: checked on user input
    enable_chunked_prefill: bool
    max_model_len: Annotated[Int, Field(ge=1)]
    policy: Literal[POLICIES]
    preload_adapters: bool
    enable_prefix_caching: bool
    lora_modules: tuple[str, ...] | None


def _checked(values: dict[str, Any], source: str, *, vllm: bool = False) -> dict[str, Any]:
    """``values`` (every ServingConfig field or a subset) typed and range-checked by
    :class:`ServingSchema`, then vLLM's start-up refusals between settings, with vLLM's
    reasons (``SchedulerConfig._verify_args``, ``LoRAConfig``).

    ``vllm``: also refuse what vLLM refuses but the twin can still model — a block size
    outside ``BlockSize`` and, without chunked prefill, ``max_num_batched_tokens <
    max_num_seqs`` (issue 11; vLLM 0.11's ``_verify_args`` refuses the latter even with
    chunked prefill, but the executor recipes run small budgets under the default
    ``max_num_seqs``). Settings a user gives (YAML, flags, sidecars:
    :meth:`ServingConfig.from_dict`) are held to it; configurations built in code are not
    (the scheduler's differential tests use 4-token blocks)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ServingConfig)}
    c = validate(ServingSchema, {**defaults, **values}, source).model_dump()
    if c["max_cpu_loras"] is None:   # vLLM: max_cpu_loras defaults to max_loras
        c["max_cpu_loras"] = c["max_loras"]

    def bad(fld, msg):
        raise TwinInputError(msg, file=source, field=fld)

    if c["max_cpu_loras"] < c["max_loras"]:
        bad("max_cpu_loras", f"max_cpu_loras ({c['max_cpu_loras']}) must be >= max_loras "
                             f"({c['max_loras']}) (vLLM LoRAConfig)")
    if not c["enable_chunked_prefill"] and c["max_num_batched_tokens"] < c["max_model_len"]:
        bad("max_num_batched_tokens",
            f"max_num_batched_tokens ({c['max_num_batched_tokens']}) is smaller than "
            f"max_model_len ({c['max_model_len']}). This effectively limits the maximum "
            "sequence length to max_num_batched_tokens and makes vLLM reject longer "
            "sequences. Please increase max_num_batched_tokens or decrease max_model_len. "
            "(vLLM refuses this without chunked prefill)")
    if vllm and c["block_size"] not in BLOCK_SIZES:
        bad("block_size", f"block_size must be one of {BLOCK_SIZES} (vLLM's BlockSize, "
                          f"vllm/config/cache.py), got {c['block_size']}")
    if vllm and not c["enable_chunked_prefill"] \
            and c["max_num_batched_tokens"] < c["max_num_seqs"]:
        bad("max_num_batched_tokens",
            f"max_num_batched_tokens ({c['max_num_batched_tokens']}) must be greater than or "
            f"equal to max_num_seqs ({c['max_num_seqs']}). (vLLM refuses this)")
    return c


def check_engine_settings(settings: dict, engine: dict | None, *,
                          source: str = "config") -> None:
    """Engine settings (``ENGINE_SETTINGS``) a config states must be those of the profile
    it is served on (``engine``: ``profile.hardware``; unsaid there: vLLM's defaults): with
    others its KV capacity, weights and step times are another engine's. Without a
    profile to check them against (``engine`` None) they are refused, not dropped."""
    for name, default in ENGINE_SETTINGS.items():
        if name not in settings:
            continue
        flag = "--" + name.replace("_", "-")
        given = _engine_value(name, settings[name], source)
        if engine is None:
            raise TwinInputError(
                f"{name} is an engine setting, which a profile describes: give this config "
                "with the profile built for it (--profile; twin.load_config(..., "
                "profile=...)), or drop the setting", file=source, field=name)
        want = _engine_value(name, engine.get(name, default), "the profile")
        if given != want:
            raise TwinInputError(
                f"{name} is {given!r} here but {want!r} in the profile: its memory and step "
                f"times are of another engine; build a profile for it (twin profile {flag} "
                f"{given}) or drop the setting", file=source, field=name)


def _engine_value(name: str, v, source: str):
    """An engine setting's value, normalised (vLLM's FP8 KV aliases are one dtype)."""
    if name == "tensor_parallel_size":
        if v is None:
            return 1
        if isinstance(v, bool) or not isinstance(v, (int, float, str)) \
                or not str(v).strip().isdigit() or int(v) < 1:
            raise TwinInputError(f"expected a whole number of GPUs >= 1, got {v!r}",
                                 file=source, field=name)
        return int(v)
    if name == "kv_cache_dtype":
        v = str(v or "auto").lower()
        return "fp8" if v.startswith("fp8") else v
    return str(v).lower() if v else None


def lora_module_names(modules, source: str = "config") -> tuple | None:
    """The adapter names of a ``lora-modules`` setting as vLLM takes it: ``name=path``
    strings, JSON strings or mappings with a ``name``; None when there is none."""
    if not modules:
        return None
    if isinstance(modules, (str, dict)):
        modules = [modules]
    names = []
    for m in modules:
        try:
            if isinstance(m, str) and m.lstrip().startswith("{"):
                m = json.loads(m)
            names.append(str(m["name"]) if isinstance(m, dict)
                         else str(m).split("=", 1)[0].strip())
        except (ValueError, KeyError, TypeError):
            raise TwinInputError(f"a lora-modules entry is name=path, or JSON or a mapping "
                                 f"with a name; got {m!r}", file=source,
                                 field="lora_modules") from None
    return tuple(names)


def require_serving_config(config, field: str = "config") -> None:
    """The entry points below the API (``twin.sim.simulate``, ``twin.policies``) take a
    :class:`ServingConfig`; a dict or a path there failed deep inside the run with an
    AttributeError. It is refused here, naming what builds one: ``twin.load_config``
    derives ``max_model_len`` from the model as ``twin.simulate`` does, which a bare
    ``ServingConfig.from_dict`` cannot, so the two are not silently different runs."""
    if not isinstance(config, ServingConfig):
        raise TwinInputError(
            f"{field} must be a twin ServingConfig here, got {type(config).__name__} "
            f"{str(config)[:60]!r}: build one with twin.load_config(settings or YAML path, "
            "model_context=...) or ServingConfig(max_loras=...), or call twin.simulate, "
            "which takes a dict or a YAML path", field=field)


def refuse_unserved_adapters(config: ServingConfig, trace, source: str = "trace") -> None:
    """vLLM without ``--enable-lora`` serves no adapter: a request naming one is answered
    404 "The model `NAME` does not exist.", never served by the base model. The twin
    refuses such a run rather than report those requests as base-model traffic."""
    if config.enable_lora or "adapter" not in getattr(trace, "columns", ()):
        return
    named = trace["adapter"].dropna()
    if len(named):
        names = sorted(map(str, named.unique()))
        raise TwinInputError(
            f"enable_lora is false but {len(named)} request(s) name an adapter "
            f"({len(names)} adapter(s), e.g. {names[0]!r}); vLLM answers them 404 "
            f"\"The model `{names[0]}` does not exist.\" Serve with enable_lora true or "
            "drop the adapter column", file=source, field="adapter")


def read_yaml(path: str | Path, *, missing: str = "file not found"):
    """A YAML file's content (``None`` if empty); unreadable, non-UTF-8 or invalid YAML
    raises ``TwinInputError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise TwinInputError(missing, file=str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TwinInputError(f"not UTF-8 text (byte {exc.start}): is this a YAML file?",
                             file=str(path)) from None
    except OSError as exc:
        raise TwinInputError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TwinInputError(f"not valid YAML: {' '.join(str(exc).split())}",
                             file=str(path)) from None
    except (ValueError, TypeError, RecursionError) as exc:   # e.g. unhashable keys
        raise TwinInputError(f"not valid YAML: {exc}", file=str(path)) from None


def read_yaml_mapping(path: str | Path, *, missing: str = "file not found",
                      expected: str = "a mapping") -> dict:
    """Read a YAML file that must hold a mapping (empty file: ``{}``); errors name the file."""
    data = read_yaml(path, missing=missing)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TwinInputError(f"expected {expected}, got a YAML {type(data).__name__}",
                             file=str(path))
    return data

"""ServingConfig: the knobs of a vLLM multi-LoRA server, under vLLM's own names.

Defaults are vLLM's (``LoRAConfig``, ``SchedulerConfig``) for a >=70 GiB GPU served through
the API server. ``policy`` selects the serving strategy; ``preload_adapters`` is twin's
own switch for servers that load every adapter into host memory at start-up (as the
``--dummy-lora-modules`` runs of arXiv 2508.08343 do).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twin.errors import TwinInputError

ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# serving strategies (twin.policies; issue 7): "vllm" is the default and the engine's own
POLICIES = ("vllm", "slora", "merged", "hybrid")
# `vllm serve` settings that do not change what the twin models: accepted and ignored, so a
# vLLM YAML config (e.g. the one `twin recommend` writes) can be simulated as it is
VLLM_IGNORED = frozenset({"model", "lora_modules", "served_model_name", "host", "port",
                          "tokenizer", "dtype", "seed", "api_key", "disable_log_requests",
                          "disable_log_stats", "trust_remote_code", "download_dir"})


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

    def __post_init__(self):
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        self.validate()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "ServingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        norm = {str(k).replace("-", "_"): v for k, v in (d or {}).items()
                if str(k).replace("-", "_") not in VLLM_IGNORED}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise TwinInputError(
                f"unknown setting(s) {unknown}; known: {sorted(known)}", file=source,
                field=unknown[0])
        for f in dataclasses.fields(cls):
            if f.name in norm and norm[f.name] is not None:
                norm[f.name] = _coerce(norm[f.name], f, source)
        return cls(**norm)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServingConfig":
        data = read_yaml_mapping(path, expected="a mapping of vLLM setting names to values")
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes) -> "ServingConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- checks vLLM makes at start-up -----------------------------------------------------
    def validate(self) -> None:
        def bad(fld, msg):
            raise TwinInputError(msg, file="config", field=fld)

        for name in ("max_loras", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "max_model_len"):
            if int(getattr(self, name)) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_lora_rank not in ALLOWED_LORA_RANKS:
            bad("max_lora_rank", f"must be one of {ALLOWED_LORA_RANKS} (vLLM), got {self.max_lora_rank}")
        if self.max_cpu_loras < self.max_loras:
            bad("max_cpu_loras", f"must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.policy not in POLICIES:
            bad("policy", f"must be one of {POLICIES}, got {self.policy!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            bad("max_num_batched_tokens",
                f"without chunked prefill it must be >= max_model_len ({self.max_model_len}), "
                f"got {self.max_num_batched_tokens}")

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
        return args


def read_yaml_mapping(path: str | Path, *, missing: str = "file not found",
                      expected: str = "a mapping") -> dict:
    """Read a YAML file that must hold a mapping; errors name the file."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise TwinInputError(missing, file=str(path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TwinInputError(f"not valid YAML: {exc}", file=str(path)) from None
    if not isinstance(data, dict):
        raise TwinInputError(f"expected {expected}", file=str(path))
    return data


def _coerce(value, f: dataclasses.Field, source: str):
    typ = str(f.type)
    try:
        if typ.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise TwinInputError(f"expected {typ.split(' ')[0]}, got {value!r}", file=source,
                             field=f.name) from None

"""Profile: the versioned JSON that carries a hardware + base-model pair's cost models.

A profile holds the base model's shape, the memory model (KV capacity), the step-time
model and the adapter load-time model, each with provenance (what data, when, residuals).
Shipped profiles live in ``twin/profiles/``; users make their own with ``twin calibrate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from twin.errors import TwinInputError
from twin.models.load_time import LoadTimeModel
from twin.models.memory import MemoryModel
from twin.models.step_time import StepTimeModel

SCHEMA = "twin.profile/1"
DEFAULT_PROFILE = "llama31-8b-h100-64gb"


@dataclass
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    params: float = 0.0
    tie_word_embeddings: bool = False

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def lora_elems_per_rank(self) -> int:
        """A + B elements per unit of rank over q,k,v,o,gate,up,down of all layers."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
        return self.layers * per_layer

    def adapter_bytes(self, rank: int) -> int:
        """Bytes of an adapter of exact ``rank`` on every linear module."""
        return rank * self.lora_elems_per_rank * self.dtype_bytes


@dataclass
class Profile:
    name: str
    hardware: dict
    model: ModelShape
    memory: MemoryModel
    step_time: StepTimeModel
    load_time: LoadTimeModel
    provenance: dict = field(default_factory=dict)
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return {
            "schema": self.schema, "name": self.name, "hardware": self.hardware,
            "model": dict(self.model.__dict__), "memory": self.memory.to_dict(),
            "step_time": self.step_time.to_dict(), "load_time": self.load_time.to_dict(),
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """Write the profile atomically through :mod:`twin.outputs`: an existing ``path``
        is replaced only when it is a twin profile (its ``schema`` field says so)."""
        from twin.outputs import staged_file

        with staged_file(path, "profile") as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict, source: str = "profile") -> "Profile":
        if d.get("schema") != SCHEMA:
            raise TwinInputError(f"unsupported profile schema {d.get('schema')!r}; expected "
                                 f"{SCHEMA!r}", file=source, field="schema")
        try:
            return cls(name=d["name"], hardware=d["hardware"], model=ModelShape(**d["model"]),
                       memory=MemoryModel(**d["memory"]), step_time=StepTimeModel(**d["step_time"]),
                       load_time=LoadTimeModel(**d["load_time"]),
                       provenance=d.get("provenance", {}), schema=d["schema"])
        except KeyError as exc:
            raise TwinInputError(f"missing section {exc}", file=source, field=str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise TwinInputError(f"malformed profile: {exc}", file=source) from None


def shipped_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("twin.profiles").iterdir()
                  if p.name.endswith(".json"))


def load_profile(name_or_path: str | Path | None = None) -> Profile:
    """Load a profile by path, or by the name of a shipped one (default: Llama-3.1-8B/H100)."""
    name_or_path = name_or_path or DEFAULT_PROFILE
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text, source = path.read_text(), str(path)
    else:
        res = resources.files("twin.profiles") / f"{name_or_path}.json"
        if not res.is_file():
            raise TwinInputError(f"no profile file or shipped profile named {str(name_or_path)!r}; "
                                 f"shipped: {shipped_profiles()}", file=str(name_or_path))
        text, source = res.read_text(), f"twin/profiles/{name_or_path}.json"
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TwinInputError(f"not valid JSON: {exc}", file=source) from None
    return Profile.from_dict(d, source=source)

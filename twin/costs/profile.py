"""Profile: the versioned JSON that carries a hardware + base-model pair's cost models.

A profile holds the base model's shape, the memory model (KV capacity), the step-time
model and the adapter load-time model, each with provenance (what data, when, residuals).
Shipped profiles live in ``twin/profiles/``; users make their own with ``twin calibrate``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictStr, create_model, model_validator

from twin.errors import TwinInputError
from twin.costs.dispersion import check_dispersion
from twin.costs.frontend import Frontend
from twin.costs.load_time import LoadTimeModel
from twin.costs.memory import MemoryModel
from twin.costs.step_time import FEATURES, StepTimeModel
from twin.schemas import Number, Schema, validate
from twin.outputs import json_document, staged_file

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
    # the model's context as vLLM derives it from config.json (max_position_embeddings, times a
    # RoPE scaling factor: twin.costs.model_config.derived_context); None: unknown, not checked
    max_position_embeddings: int | None = None
    # how vLLM wraps the model for LoRA (twin.costs.model_config): q/k/v and gate/up as one
    # slice each (Phi-3's fused checkpoint) rather than one slice per projection; LoRA
    # buffers on embed_tokens and lm_head (the model class declares embedding_modules)
    lora_fused_modules: bool = False
    lora_embeddings: bool = True

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        # fields at their defaults are left out: profiles written before they existed
        # read and write back unchanged
        for key, default in (("max_position_embeddings", None), ("lora_fused_modules", False),
                             ("lora_embeddings", True)):
            if d[key] == default:
                del d[key]
        return d

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def lora_elems_per_rank(self) -> int:
        """A + B elements per unit of rank over q,k,v,o,gate,up,down of all layers."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        if self.lora_fused_modules:   # one A for qkv_proj, one for gate_up_proj
            per_layer = (h + q + 2 * kv) + (q + h) + (h + 2 * i) + (i + h)
        else:
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
    # the serving frontend's delays (twin.costs.frontend); default: none
    frontend: Frontend = field(default_factory=Frontend)

    def to_dict(self) -> dict:
        d = {
            "schema": self.schema, "name": self.name, "hardware": self.hardware,
            "model": self.model.to_dict(), "memory": self.memory.to_dict(),
            "step_time": self.step_time.to_dict(), "load_time": self.load_time.to_dict(),
        }
        if not self.frontend.is_default:   # profiles without one write back unchanged
            d["frontend"] = self.frontend.to_dict()
        d["provenance"] = self.provenance
        return d

    def save(self, path: str | Path) -> Path:
        """Write the profile atomically through :mod:`twin.outputs`: an existing ``path``
        is replaced only when it is a twin profile (its ``schema`` field says so)."""
        if Path(path).suffix.lower() != ".json":
            raise TwinInputError("a profile is a JSON file: give a name ending in .json, so "
                                 "that twin can load it back", file=str(path), field="--out")
        with staged_file(path, "profile") as tmp:
            tmp.write_text(json_document(self.to_dict(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict, source: str = "profile") -> "Profile":
        """A profile from its JSON content, validated by :class:`ProfileSchema` (a missing,
        wrongly typed or out-of-range field raises ``TwinInputError`` naming it)."""
        if not isinstance(d, dict):
            raise TwinInputError(f"expected a JSON object (a twin profile), got a JSON "
                                 f"{type(d).__name__}", file=source)
        if d.get("schema") != SCHEMA:
            raise TwinInputError(f"unsupported profile schema {d.get('schema')!r}; expected "
                                 f"{SCHEMA!r}", file=source, field="schema")
        validate(ProfileSchema, d, source)   # strict: the values below are as written
        try:
            return cls(name=d["name"], hardware=d["hardware"], model=ModelShape(**d["model"]),
                       memory=MemoryModel(**d["memory"]), step_time=StepTimeModel(**d["step_time"]),
                       load_time=LoadTimeModel(**d["load_time"]),
                       provenance=d.get("provenance", {}), schema=d["schema"],
                       frontend=Frontend(**(d.get("frontend") or {})))
        except (TypeError, ValueError) as exc:   # the schema should have caught it: say so
            raise TwinInputError(f"malformed profile: {exc}", file=source) from None

    def check_max_model_len(self, config) -> None:
        """vLLM refuses a ``max_model_len`` beyond the model's context
        (``ModelConfig.get_and_verify_max_len``) unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."""
        limit = self.model.max_position_embeddings
        if limit is not None and config.max_model_len > limit:
            raise TwinInputError(
                f"User-specified max_model_len ({config.max_model_len}) is greater than the "
                f"derived max_model_len ({limit}: the model's max_position_embeddings, times "
                f"its RoPE scaling factor; profile {self.name}). vLLM refuses it: lower "
                "max_model_len",
                file="config", field="max_model_len")


# -- the profile JSON's schema -------------------------------------------------------------------
_NonNeg = Annotated[Number, Field(ge=0)]
_Pos = Annotated[Number, Field(gt=0)]
_PosInt = Annotated[int, Field(ge=1, strict=True)]


class ModelShapeSchema(Schema):
    name: StrictStr
    layers: _PosInt
    hidden: _PosInt
    heads: _PosInt
    kv_heads: _PosInt
    head_dim: _PosInt
    intermediate: _PosInt
    vocab: _PosInt
    dtype_bytes: _PosInt = 2
    params: _NonNeg = 0.0
    tie_word_embeddings: StrictBool = False
    max_position_embeddings: _PosInt | None = None
    lora_fused_modules: StrictBool = False
    lora_embeddings: StrictBool = True


_Pair = Annotated[list[_NonNeg], Field(min_length=2, max_length=2)]


class LoraBuffersSchema(Schema):
    head: list[_Pair] = []
    layer: list[_Pair] = []
    layers: Annotated[int, Field(ge=0, strict=True)] = 0
    tail: list[_Pair] = []


class MemorySchema(Schema):
    gpu_memory_gib: _Pos
    weights_gib: _NonNeg
    kv_bytes_per_token: _Pos
    lora_bytes_per_slot_rank: _NonNeg
    lora_bytes_per_slot: _NonNeg
    activation_gib: _NonNeg
    activation_bytes_per_seq: _NonNeg = 0.0
    activation_bytes_per_token: _NonNeg = 0.0
    lora_buffers: LoraBuffersSchema | None = None


# step-time coefficients by feature (non-negative seconds per unit); the ``base`` part must
# give ``const`` (a missing one used to be silently 0, which flips verdicts)
_Coefs = create_model("StepTimeCoefficients", __base__=Schema,
                      **{k: (_NonNeg, 0.0) for k in FEATURES})
_BaseCoefs = create_model("StepTimeBaseCoefficients", __base__=_Coefs, const=(_NonNeg, ...))


class CurveSchema(Schema):
    """A measured step-time curve (``twin.costs.step_time.Curve``): seconds at increasing x
    of a sum of step features."""

    features: Annotated[list[Literal[FEATURES]], Field(min_length=1)]
    x: Annotated[list[_Pos], Field(min_length=1)]
    s: Annotated[list[_Pos], Field(min_length=1)]

    @model_validator(mode="after")
    def _points(self):
        if len(self.x) != len(self.s):
            raise ValueError(f"x and s need the same length, got {len(self.x)} and {len(self.s)}")
        if any(b <= a for a, b in zip(self.x, self.x[1:])):
            raise ValueError("x must increase")
        if "decode_context" in self.features:
            raise ValueError("a curve cannot read decode_context (decode runs' closed form)")
        return self


class StepTimeSchema(Schema):
    base: _BaseCoefs
    memory: _Coefs | None = None
    compute: _Coefs | None = None
    curves: list[CurveSchema] | None = None
    # equally likely multipliers of a step's price (twin.costs.dispersion), increasing
    dispersion: Annotated[list[_Pos], Field(min_length=1)] | None = None
    # its correlation from a step to the next 1, 2, ... steps
    autocorrelation: list[Annotated[Number, Field(ge=-1, le=1)]] | None = None

    @model_validator(mode="after")
    def _quantiles(self):
        if self.dispersion is not None:
            check_dispersion(self.dispersion)   # the rule StepTimeModel applies
        return self


class LoadTimeSchema(Schema):
    disk_s: _NonNeg
    disk_s_per_byte: _NonNeg
    host_to_gpu_s: _NonNeg
    host_to_gpu_s_per_byte: _NonNeg


class FrontendSchema(Schema):
    first_lora_request_s: _NonNeg = 0.0
    metrics_scrape_hz: _NonNeg = 0.0
    metrics_series_s: _NonNeg = 0.0
    request_s: _NonNeg = 0.0


class ProfileSchema(Schema):
    """Every field of a profile the twin reads; ``hardware`` and ``provenance`` are free
    mappings (descriptive, read by no model)."""

    schema_: Literal["twin.profile/1"] = Field(alias="schema")
    name: StrictStr
    hardware: dict
    model: ModelShapeSchema
    memory: MemorySchema
    step_time: StepTimeSchema
    load_time: LoadTimeSchema
    frontend: FrontendSchema | None = None
    provenance: dict = {}


def shipped_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("twin.profiles").iterdir()
                  if p.name.endswith(".json"))


def warn_if_shipped(path: str | Path, stream=None) -> bool:
    """One line on stderr when ``path`` is a shipped profile's own file (a checkout's
    ``twin/profiles/NAME.json``): writing it changes what every command that names NAME,
    or uses the default, reads from then on. True when it is."""
    path = Path(path).resolve()
    shipped = Path(str(resources.files("twin.profiles"))).resolve()
    if path.parent != shipped or path.stem not in shipped_profiles():
        return False
    print(f"note: {path} is the shipped profile {path.stem!r}: every command that names it"
          f"{' (or uses the default)' if path.stem == DEFAULT_PROFILE else ''} will read the "
          "new calibration (git checkout restores it)", file=stream or sys.stderr)
    return True


def load_profile(name_or_path: str | Path | None = None) -> Profile:
    """Load a profile by path, or by the name of a shipped one (default: Llama-3.1-8B/H100)."""
    name_or_path = name_or_path or DEFAULT_PROFILE
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text, source = _read_text(path), str(path)
    else:
        res = resources.files("twin.profiles") / f"{name_or_path}.json"
        if not res.is_file():
            if path.is_file():
                raise TwinInputError("a profile file must end in .json (twin reads profiles "
                                     "as JSON); rename it", file=str(name_or_path))
            raise TwinInputError(f"no profile file or shipped profile named {str(name_or_path)!r}; "
                                 f"shipped: {shipped_profiles()}", file=str(name_or_path))
        text, source = res.read_text(), f"twin/profiles/{name_or_path}.json"
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise TwinInputError(f"not valid JSON: {exc}", file=source) from None
    return Profile.from_dict(d, source=source)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TwinInputError(f"not UTF-8 text (byte {exc.start}): is this a profile JSON?",
                             file=str(path)) from None
    except OSError as exc:
        raise TwinInputError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None

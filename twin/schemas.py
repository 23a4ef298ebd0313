"""Declared schemas for what the twin reads: one converter from pydantic's errors to ours.

Every loader (serving YAML, profile JSON, workload spec, bench sidecar, recommender model)
declares its fields as a pydantic v2 model next to the code that uses them and validates
through :func:`validate`, so a wrong type, an out-of-range value, a missing required field
or an unknown key becomes one :class:`~twin.errors.TwinInputError` naming the file, the
field path (``step_time.base.const``) and what was expected — never a traceback and never
a value silently replaced by a default.

Pydantic is a light core dependency (no torch); import cost is a few tens of ms.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from twin.errors import TwinInputError

M = TypeVar("M", bound=BaseModel)


class Schema(BaseModel):
    """Base of the twin's schemas: unknown keys are errors, NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def _no_bool(v):
    """YAML's ``true`` is not the number 1: a bool where a number belongs is a mistake."""
    if isinstance(v, bool):
        raise ValueError("expected a number, not a boolean")
    return v


def _finite(v):
    if not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {v!r}")
    return v


#: an integer (8, "8" or 8.0 all read as 8; 8.5 and true are refused)
Int = Annotated[int, BeforeValidator(_no_bool)]
#: a finite float (ints read as floats)
Float = Annotated[float, BeforeValidator(_no_bool), AfterValidator(_finite)]
def _json_number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("expected a number")
    return v


#: a JSON number as written (no "1.5" strings, no booleans), finite; loaders that must keep
#: an int an int use the validated input itself, not the model's float
Number = Annotated[float, BeforeValidator(_json_number), AfterValidator(_finite)]


def _describe(err: dict) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "invalid")
    if kind == "missing":
        return "required but missing"
    if kind == "extra_forbidden":
        return "unknown key"
    msg = msg.removeprefix("Value error, ")
    inp = err.get("input")
    if kind == "value_error" and isinstance(inp, (dict, list)):   # a check across fields
        return msg
    if inp is None:
        return f"{msg}, got null (a value is required)"
    text = repr(inp)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{msg}, got {text}"


def to_input_error(exc: ValidationError, source: str | None, *, prefix: str = "",
                   row: int | None = None) -> TwinInputError:
    """The one converter: pydantic's ``ValidationError`` -> ``TwinInputError`` naming the file,
    the dotted field path of the first problem and what was expected (plus how many more)."""
    errs = exc.errors(include_url=False)
    first = errs[0]
    # union branches add their type name to the location ("int", "float", ...): drop them
    loc = [str(x) for x in first.get("loc", ()) if not _is_type_tag(x)]
    path = ".".join(([prefix] if prefix else []) + loc) or None
    msg = _describe(first)
    more = [p for p in dict.fromkeys(
        ".".join(([prefix] if prefix else []) + [str(x) for x in e.get("loc", ())
                                                  if not _is_type_tag(x)]) or "(top)"
        for e in errs[1:]) if p != path]
    if more:
        msg += f" (and {len(more)} more: {', '.join(more[:3])}{', ...' if len(more) > 3 else ''})"
    return TwinInputError(msg, file=source, row=row, field=path)


def _is_type_tag(x) -> bool:
    return isinstance(x, str) and (x in ("int", "float", "str", "bool", "list", "dict")
                                   or x.startswith(("function-", "constrained-", "literal[")))


def validate(model: type[M], data: Any, source: str | None, *, prefix: str = "",
             row: int | None = None) -> M:
    """``model`` validated from ``data``; any problem raises ``TwinInputError``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise to_input_error(exc, source, prefix=prefix, row=row) from None


__all__ = ["Schema", "Int", "Float", "Number", "to_input_error", "validate"]

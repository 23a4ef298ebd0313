"""Argument types shared by every ``twin`` subcommand: strict booleans, comma lists and
positive numbers. A bad value is an argparse error naming the flag (exit 2), never a value
silently read as something else (``--enable-lora flase`` used to become false)."""

from __future__ import annotations

import argparse
import math
import numbers
from typing import Callable

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def strict_bool(text: str) -> bool:
    """true/false/1/0/yes/no/on/off (any case); anything else is refused."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(
        f"expected one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}, got {text!r}")


def is_positive_number(v) -> bool:
    """A finite real number > 0, as the Python API's counts and seconds must be (numpy's
    too; not a bool, a string or NaN): the flags' types check the CLI's."""
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and 0 < v < math.inf


def _number(conv: Callable, text: str, *, minimum=None, positive: bool = False):
    try:
        v = conv(text.strip())
    except ValueError:
        kind = "an integer" if conv is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if positive and not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    if minimum is not None and v < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (``--window-s``: 0, negative and NaN windows measure nothing)."""
    return _number(float, text, positive=True)


def positive_float_or_fit(text: str) -> float | str:
    """``fit``, or a finite number > 0 (``--metrics-series-s``: a measured cost, or fitted)."""
    return "fit" if str(text).strip().lower() == "fit" else positive_float(text)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (``--router-refresh-s``: 0 means exact; ``--budget 0``: measure
    the first cell only)."""
    return _number(float, text, minimum=0.0)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (``--iterations 0``: the starting fit alone)."""
    return _number(int, text, minimum=0)


def comma_list(conv: Callable = float, *, minimum=None, positive: bool = False,
               length: int | None = None, name: str = "values") -> Callable[[str], tuple]:
    """An argparse ``type=`` for ``a,b,c``: a non-empty tuple of ``conv`` values (``int`` /
    ``float`` range-checked, ``str`` stripped), exactly ``length`` of them if given."""

    def parse(text: str) -> tuple:
        parts = [p.strip() for p in str(text).split(",")]
        if parts and parts[-1] == "":          # a trailing comma is harmless
            parts.pop()
        if not parts or any(p == "" for p in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated {name}, got {text!r}")
        if conv is str:
            out = tuple(parts)
        else:
            out = tuple(_number(conv, p, minimum=minimum, positive=positive) for p in parts)
        if length is not None and len(out) != length:
            raise argparse.ArgumentTypeError(f"expected {length} comma-separated {name}, "
                                             f"got {text!r}")
        return out

    parse.__name__ = f"comma-separated {name}"
    return parse


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: --limit, --repeats, --threads, --max-runs, --max-gpus: zero
    or a negative count would silently do nothing, or -- as ``head(-1)`` -- something else)."""
    return _number(int, text, minimum=1)


def device_name(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``: the devices the executor runs on, checked before any
    model is loaded (torch's own error for ``--device gpu`` lists a dozen backends)."""
    word = str(text).strip().lower()
    if word in ("cpu", "cuda") or (word.startswith("cuda:") and word[5:].isdigit()):
        return word
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def held_terms(text: str) -> dict:
    """``TERM=seconds[,TERM=seconds...]`` as a dict: step-time coefficients held, not fitted
    (``twin calibrate --hold``, ``reproduce_vllm_h100.py --hold``), the seconds finite and
    >= 0 (the TERM names are checked against the step-time features by the caller's type,
    ``twin.cli.calibrate.held_step_terms``: this module stays below ``twin.costs``)."""
    try:
        held = {k.strip(): float(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TERM=seconds[,TERM=seconds...], e.g. decode_context=6.5536e-8; "
            f"got {text!r}") from None
    bad = [k for k, v in held.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]}: expected seconds >= 0, got "
                                         f"{held[bad[0]]!r}")
    return held

"""Are the runs of the base profile's model? A fit maps the runs' timings onto the base
profile's model shape and memory: runs of another model give a profile that is neither.

Model names come in many spellings (``meta-llama/Llama-3.1-8B-Instruct``, ``llama-3.1-8b``,
``llama31-8b-h100-64gb``, ``Qwen2.5-0.5B-Instruct``), so the check is conservative: a name
is reduced to its family (the leading word: llama, qwen, smollm, ...) and its size in
parameters (``8B``, ``0.5B``, ``135M``); two names are refused only when both reduce and the
sizes differ, and warned about when the families differ (a fine-tune's name may lead with
another word: ``Hermes-3-Llama-3.1-8B``) or the names cannot both be reduced.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from twin.errors import TwinInputError

__all__ = ["model_key", "check_runs_model"]

_SIZE = re.compile(r"(?<![a-z0-9.])(?:\d+x)?(\d+(?:\.\d+)?)([bm])(?![a-z0-9])")
#: the fields a run names its model in (bench JSON: vllm bench serve's ``model_id``; run
#: table: its ``model`` column)
MODEL_FIELDS = ("model_id", "model")


def model_key(name) -> tuple[str, float] | None:
    """``(family, billions of parameters)`` of a model name, or None when it has no
    recognisable family and size (``tiny-llama``)."""
    base = str(name).strip().lower().rstrip("/").split("/")[-1]
    base = re.sub(r"^meta[-_]", "", base)
    family = re.match(r"[a-z]+", base)
    size = _SIZE.search(base.replace("_", "-"))
    if not family or not size:
        return None
    return family.group(0), float(size.group(1)) * (1e-3 if size.group(2) == "m" else 1.0)


def _plain(name) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower().split("/")[-1])


def check_runs_model(runs, profile, warn=None) -> None:
    """Refuse (``TwinInputError`` naming the run's file, row and field) runs that name a
    model clearly other than ``profile``'s; warn (one line on stderr) where the names
    differ but cannot be compared."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    want = profile.model.name
    mine = model_key(want)
    warned = set()
    for r in runs:
        field = next((f for f in MODEL_FIELDS if r.extra.get(f)), None)
        if field is None:
            continue
        theirs = r.extra[field]
        if _plain(theirs) == _plain(want) or _plain(want) in _plain(theirs):
            continue
        key = model_key(theirs)
        # only a size tells models apart for sure: a fine-tune's name may lead with another
        # word than its base's ("Hermes-3-Llama-3.1-8B" is a Llama 3.1 8B)
        if key is not None and mine is not None and key[1] != mine[1]:
            raise TwinInputError(
                f"the run is of {theirs!r}, the base profile {profile.name!r} of {want!r}: "
                "the fit would price another model; pass a --base-profile of this model "
                "(build one with `twin profile --model M --gpu G --out base.json`)",
                file=r.source or None, row=r.row, field=field)
        if key != mine and str(theirs) not in warned:
            warned.add(str(theirs))
            warn(f"warning: {Path(r.source).name if r.source else r.key}: the run names "
                 f"model {theirs!r}, the base profile {profile.name!r} is of {want!r}: check "
                 "that they are the same model")

"""What ``twin recommend`` and ``twin place`` start from: the defaults (profile, model, the
paper's base config, a catalog), the window the trace is measured over and whether the
verifying twin runs measure it or go on to the last request, and the refusal of a trace
with nothing to serve.
"""

from __future__ import annotations

import math

import pandas as pd

from twin.config import ServingConfig
from twin.costs.profile import Profile, load_profile
from twin.errors import TwinInputError
from twin.ml.recommender import Recommender
from twin.ml.spec import paper_base
from twin.results import crop_window
from twin.sched.request import exceeds_max_model_len
from twin.workload.catalog import AdapterCatalog


def prepare_inputs(trace, profile, model, base, window_s, catalog):
    """Defaults shared by recommend and place: the profile and model loaded, the paper's
    base config, the trace cut to its window, a catalog at the base rank if none given."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    model = model or Recommender.load()
    base = base or paper_base()
    window = trace_window(trace, window_s)
    trace = crop_window(trace, window)
    _check_servable(trace, base)
    if catalog is None:
        names = sorted(trace["adapter"].dropna().unique().tolist())
        catalog = AdapterCatalog.uniform(names, base.max_lora_rank)
    return profile, model, base, window, trace, catalog


def _check_servable(trace: pd.DataFrame, base: ServingConfig) -> None:
    """Refuse a trace with no request vLLM would serve (none in the window, or every one
    longer than ``max_model_len``): every configuration would read 0 tok/s of 0 offered."""
    if not len(trace):
        raise TwinInputError("no request to serve: the trace has none in its window",
                             field="arrival_s")
    long = exceeds_max_model_len(trace["prompt_tokens"].to_numpy(),
                                 trace["output_tokens"].to_numpy(), base.max_model_len)
    if long.all():
        raise TwinInputError(
            f"no request to serve: all {len(trace)} are longer than max_model_len "
            f"{base.max_model_len} (prompt + output tokens; vLLM refuses them): raise "
            "max_model_len in the base config", field="max_model_len")


#: windows shorter than this get :func:`short_window_warning`
SHORT_WINDOW_S = 600.0


def runs_to_completion(window: float, window_s: float | None) -> bool:
    """Whether the verifying twin runs go on to the trace's last request instead of
    measuring ``window``: when no window was given (``window_s`` None) and the trace spans
    less than :data:`SHORT_WINDOW_S`. A run cut at a short window counts the requests still
    running at its end as unserved: over an hour that edge is a few seconds of traffic,
    over a 40-s trace it read every GPU count STARVING (``twin place`` then asked for one
    GPU per adapter). Run to completion, the starvation rule is ``twin simulate``'s
    (``twin.results.results.load_spans``): time in service is not time unserved."""
    return window_s is None and window < SHORT_WINDOW_S


def verification_window(window: float, window_s: float | None,
                        to_completion: bool | None = None) -> float | None:
    """The window the verifying twin runs measure: ``window``, or None (each run goes on
    to the last request) when ``to_completion`` says so (None: :func:`runs_to_completion`)."""
    if to_completion is None:
        to_completion = runs_to_completion(window, window_s)
    return None if to_completion else window


def short_window_warning(window: float | None) -> str | None:
    """The warning that a short window's STARVING verdicts may be false: a verification
    run measures the window, and the requests still running at its end count as unserved
    (a window the user gave; without one a short trace runs to completion,
    :func:`runs_to_completion`). None for windows of :data:`SHORT_WINDOW_S` or more, or
    none (``window`` None)."""
    if window is None or window >= SHORT_WINDOW_S:
        return None
    return (f"the window is only {window:.0f} s: the requests still running at its end "
            "count as unserved, so a STARVING verdict may be the window's edge rather than "
            f"the load; verify on a trace of {SHORT_WINDOW_S / 60:.0f} minutes or more, or "
            "give no window: a short trace is then verified to its last request")


def trace_window(trace: pd.DataFrame, window_s: float | None) -> float:
    """The window a trace is measured over: the one given, else its span in whole seconds."""
    if window_s is not None:
        return float(window_s)
    return float(max(1.0, math.ceil(float(trace["arrival_s"].max())))) if len(trace) else 1.0

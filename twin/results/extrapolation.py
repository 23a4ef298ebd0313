"""Whether a run's steps went past the batches its profile's step time was fitted on.

A step time calibrated on real vLLM runs is a regression over the steps those runs made.
Its per-adapter terms (a cost per distinct adapter in a step, per adapter squared, per
adapter and token; twin.costs.step_time) price what vLLM does per active adapter, and were
measured where a step held at most ``max_loras`` adapters (192 at most in the shipped H100
runs). A strategy without slots (S-LoRA's unified pool, ``twin.policies.slora``) puts
hundreds of adapters in one step (~340 with 2,000 adapters at 10-40 req/s,
``experiments/README_policies.md``); a recommendation may set ``max_loras`` above any
fitted run's. There the fitted terms are extrapolated (at 340 adapters the H100 profile's
per-adapter and adapters² terms add ~0.37 s to a step of ~20 ms), and a prediction must say
so rather than look like a finding.

Calibration records the extent it fitted on (``provenance.step_time.extent``: the most
distinct adapters a fit run's step could hold, and the largest ``max_loras``); a run's
summary gets ``extrapolated`` when its steps went past either, and ``format_summary``
(so ``twin simulate`` and ``twin fleet``), ``twin compare``'s verdict and ``twin
recommend``'s warnings (its verified pick's run) say so. An executor calibration records
the extent of its measured steps too. Profiles without an extent are never flagged: first
principles, whose terms are physics; calibrations made before the extent was recorded
(the shipped CPU profiles among them). Steps with more tokens than the fitted runs' are not
flagged either: past the dense layers' ridge a step's cost per token is linear (FLOPs), so
the per-token terms carry on as measured.
"""

from __future__ import annotations

#: the step-time features charged per distinct adapter of a step
PER_ADAPTER = ("adapters", "adapter_rank", "adapters_squared", "adapter_tokens_capped")
#: the features charged per LoRA slot the kernel grid spans (vLLM: ``max_loras``)
PER_SLOT = ("lora_slots", "lora_slot_tokens", "lora_slot_tokens_capped")


def fitted_extent(profile) -> dict | None:
    """The batches ``profile``'s step time was fitted on (``{"adapters": A, "max_loras":
    S}``), or None when its provenance does not say."""
    prov = getattr(profile, "provenance", None) or {}
    step = prov.get("step_time") if isinstance(prov, dict) else None
    extent = step.get("extent") if isinstance(step, dict) else None
    return extent if isinstance(extent, dict) and extent else None


def fit_extent(configs_and_adapters) -> dict:
    """The extent to record for a fit over runs given as ``(ServingConfig, number of
    adapters it served)`` pairs: a step holds at most min(max_loras, adapters) distinct
    adapters."""
    pairs = list(configs_and_adapters)
    return {"adapters": max(min(c.max_loras, n) for c, n in pairs),
            "max_loras": max(c.max_loras for c, _ in pairs)}


def extrapolation(profile, step_adapters_max: int, lora_slots: int | None) -> dict | None:
    """What a run priced beyond ``profile``'s fitted extent, or None. ``step_adapters_max``:
    the most distinct adapters in one of its steps; ``lora_slots``: the slots its LoRA
    kernel grid spans (vLLM's ``max_loras``; None where the grid spans the step's adapters,
    which ``step_adapters_max`` covers)."""
    extent = fitted_extent(profile)
    if extent is None:
        return None
    prices = profile.step_time.prices
    out = {}
    fitted = extent.get("adapters")
    if (fitted is not None and step_adapters_max > fitted
            and any(prices(k) for k in PER_ADAPTER + (PER_SLOT if lora_slots is None else ()))):
        out.update(step_adapters_max=int(step_adapters_max), fitted_adapters_max=int(fitted))
    fitted = extent.get("max_loras")
    if (fitted is not None and lora_slots is not None and lora_slots > fitted
            and step_adapters_max > 0 and any(prices(k) for k in PER_SLOT)):
        # (slots are priced only in steps with LoRA tokens: base-model traffic is not flagged)
        out.update(max_loras=int(lora_slots), fitted_max_loras=int(fitted))
    return out or None


def combined(parts: list[dict | None]) -> dict | None:
    """Several servers' ``extrapolated`` as one (None: none went past its calibration): of
    each kind, the server that went furthest, with its own profile's fitted figure."""
    out: dict = {}
    for went, fitted in (("step_adapters_max", "fitted_adapters_max"),
                         ("max_loras", "fitted_max_loras")):
        flagged = [p for p in parts if p and went in p]
        if flagged:
            top = max(flagged, key=lambda p: p[went] / max(p[fitted], 1))
            out.update({went: top[went], fitted: top[fitted]})
    return out or None


def describe(extrapolated: dict | None) -> str | None:
    """One sentence for a report, or None."""
    if not extrapolated:
        return None
    said = []
    if "step_adapters_max" in extrapolated:
        said.append(f"steps held up to {extrapolated['step_adapters_max']} distinct adapters, "
                    f"the step time was fitted on at most {extrapolated['fitted_adapters_max']}")
    if "max_loras" in extrapolated:
        said.append(f"max_loras {extrapolated['max_loras']} is above the fitted runs' "
                    f"largest ({extrapolated['fitted_max_loras']})")
    terms = " and ".join(t for k, t in (("step_adapters_max", "per-adapter"),
                                         ("max_loras", "per-slot")) if k in extrapolated)
    return ("outside the profile's calibration: " + "; ".join(said)
            + f" (its {terms} step terms are extrapolated: calibrate on runs like this one, "
              "or read these figures as a rough guess)")

"""The step-time terms a fit on real vLLM runs (``twin.calibrate.step_fit``) may use: the
default set and the opt-in ones, each with the runs' verdict on it, and where a term that
the initial regression does not set starts."""

from __future__ import annotations

from twin.costs.step_time import FEATURES
from twin.errors import ConfigError

__all__ = ["ADAPTER_PAIR_TERMS", "check_terms", "CAPPED_GRID_TERMS", "GRID_TERMS", "RIDGE_TERMS", "STEP_TERMS", "TERM_STARTS"]

#: Coefficients fitted (s per unit of the feature). Each is a physical cost: fixed per-step
#: overhead (scheduler, sampler, kernel launches, weight read), per decode sequence, per
#: prefill token (dense FLOPs), per attended KV token (KV read), per distinct adapter in the
#: batch, per adapter slot (the LoRA kernel grid spans max_loras), per padded LoRA
#: rank·token.
STEP_TERMS = ("const", "decode_tokens", "prefill_tokens", "decode_context", "adapters",
              "lora_slots", "lora_token_rank")
#: ``STEP_TERMS`` plus a cost per token·slot: vLLM's Triton LoRA kernels launch a thread
#: block per token block and slot (``lora_shrink`` / ``lora_expand``). Opt-in: on the H100
#: runs it lowers ITL at 64-192 slots but over-charges the saturated 2048-token steps there
#: (experiments/README_validate.md, "real H100 runs").
GRID_TERMS = STEP_TERMS + ("lora_slot_tokens",)
#: ``STEP_TERMS`` plus the grid cost capped at ``LORA_GRID_TOKEN_CAP`` tokens per step
#: (``lora_slot_tokens_capped``): the empty slots' blocks show in decode steps and hide
#: behind the real LoRA work of a large step. Opt-in, as ``GRID_TERMS`` (no refit with it
#: was better on every held-out figure: experiments/README_validate.md, "the capped grid").
CAPPED_GRID_TERMS = STEP_TERMS + ("lora_slot_tokens_capped",)
#: ``STEP_TERMS`` plus a cost per token past the dense layers' ridge (``tokens_past_ridge``):
#: below it a step's tokens ride along with the weights' read (``const``), where the linear
#: terms alone charge every prefill token a saturated step's cost. Opt-in (README_validate,
#: "the dense ridge": held-out ITL 5.25 -> 4.97%, 4.36% only with the KV read left free)
RIDGE_TERMS = STEP_TERMS + ("tokens_past_ridge",)
#: ``STEP_TERMS`` plus a cost per distinct adapter squared (``adapters_squared``): at their
#: measured batches the real H100 runs' step times grow faster than linearly in the batch's
#: adapters (README_validate, "adapters squared"). Opt-in, measured beside the others
ADAPTER_PAIR_TERMS = STEP_TERMS + ("adapters_squared",)
#: where a term the initial regression does not set starts (the surrogate moves a
#: coefficient at most x3 per iteration: one starting at 0 would stay there)
TERM_STARTS = {"lora_slot_tokens": 2e-7, "lora_slot_tokens_capped": 2e-7,
               "tokens_past_ridge": 2e-5, "adapters_squared": 2e-6,
               "adapter_tokens_capped": 2e-7, "waiting_skipped": 5e-7}


def check_terms(terms):
    """``terms``, refused (``ConfigError``, naming the known features) where one is no step
    feature; a tied term ``a+b`` is checked member by member."""
    unknown = sorted({m for k in terms for m in k.split("+")} - set(FEATURES))
    if unknown or not terms:
        raise ConfigError(f"unknown step-time term(s) {unknown or '(none given)'}; "
                          f"known: {', '.join(FEATURES)}")
    return terms

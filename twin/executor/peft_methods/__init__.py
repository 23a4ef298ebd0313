"""Mixed PEFT methods for split execution: LoRA, IA³, prefix tuning and prompt tuning.

``load_peft(path, shape, dtype)`` reads a PEFT directory of any of these kinds into a
:class:`ClientAdapter` whose hooks (``before_linear``/``after_linear`` around the base
model's packed linear ops, ``prefix_kv``, ``prompt_embeddings``) compute exactly what PEFT
computes; ``reference_forward`` runs a plain forward over ``LlamaModel`` weights with them;
``write_synthetic_peft_adapters`` writes seeded adapters of each kind with PEFT itself.
Modules: ``kinds`` (the adapters and their hooks), ``loading`` (PEFT directories ->
adapters), ``reference`` (the forward), ``paged`` (virtual tokens in a paged KV cache),
``synthetic`` (the writer). The cost of each kind: ``twin.costs.peft_costs``.
"""

from __future__ import annotations

from twin.executor.peft_methods.kinds import (BASE_ADAPTER, IA3, LORA, OPS, PEFT_KINDS,
                                              PREFIX_TUNING, PROMPT_TUNING, VIRTUAL_TOKEN_ID,
                                              ClientAdapter, IA3ClientAdapter,
                                              LoraClientAdapter, PrefixClientAdapter,
                                              PromptClientAdapter)
from twin.executor.peft_methods.loading import load_peft, peft_kind
from twin.executor.peft_methods.paged import (prefix_tokens, scheduled_token_ids,
                                              write_prefix_kv)
from twin.executor.peft_methods.reference import reference_forward, reference_forward_batch
from twin.executor.peft_methods.synthetic import write_synthetic_peft_adapters

__all__ = ["BASE_ADAPTER", "IA3", "LORA", "OPS", "PEFT_KINDS", "PREFIX_TUNING",
           "PROMPT_TUNING", "VIRTUAL_TOKEN_ID", "ClientAdapter", "IA3ClientAdapter",
           "LoraClientAdapter", "PrefixClientAdapter", "PromptClientAdapter", "load_peft", "peft_kind",
           "prefix_tokens", "scheduled_token_ids", "write_prefix_kv",
           "reference_forward", "reference_forward_batch", "write_synthetic_peft_adapters"]

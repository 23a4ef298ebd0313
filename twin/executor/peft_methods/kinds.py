"""Client-side adapters of every PEFT kind, behind the hooks of the split contract.

A :class:`ClientAdapter` is what a client process holds of one adapter: the base executor
computes the packed linear ops (``qkv``, ``o``, ``gate_up``, ``down``) of the frozen model
and the client brings the adapter in around them, through four hooks:

- ``before_linear(layer, op, x) -> x``: the rows sent to the base linear (IA³ scales the
  input of its feedforward modules here, as PEFT's ``IA3Layer`` with ``is_feedforward``);
- ``after_linear(layer, op, x_in, y) -> y``: the base output, amended (the LoRA delta
  ``x_in A^T B^T * scaling``; the IA³ output scaling of k/v). ``x_in`` is what went into
  the base linear, i.e. after ``before_linear``;
- ``prefix_kv(layer) -> (k, v)``: prefix tuning's virtual keys/values ``[n_virtual,
  kv_heads, head_dim]``, used as given: transformers puts them in the cache ahead of the
  prompt and never rotates them (they are past keys);
- ``prompt_embeddings() -> [n_virtual, hidden]``: prompt tuning's virtual token embeddings,
  prefilled ahead of the prompt; ``after_embedding(positions, x) -> x`` puts them in place
  of the embeddings of placeholder tokens scheduled at positions ``0 .. n_virtual - 1``.

Hooks never modify their arguments (a client's activations may live in shared-memory
buffers); they return a new tensor, or the argument itself where the adapter does not touch
that op. For both prompt-learning kinds the real tokens take positions ``virtual_tokens``,
``virtual_tokens + 1``, ... (transformers counts the prefix as past tokens; PEFT prepends
the prompt embeddings to ``inputs_embeds``), so a sequence's context is ``virtual_tokens``
+ its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from twin.costs.peft_costs import IA3, LORA, PEFT_KINDS, PREFIX_TUNING, PROMPT_TUNING
from twin.executor.adapters import PackedAdapter
from twin.executor.lora import LoRASlots
from twin.executor.shape import LORA_GROUPS, LlamaShape

OPS: tuple[str, ...] = tuple(LORA_GROUPS)           # the packed linear ops of one layer
VIRTUAL_TOKEN_ID = 0   # the id scheduled at a prompt-tuning virtual position (replaced)
__all__ = ["OPS", "VIRTUAL_TOKEN_ID", "IA3", "LORA", "PEFT_KINDS", "PREFIX_TUNING", "PROMPT_TUNING",
           "ClientAdapter", "BASE_ADAPTER", "LoraClientAdapter", "IA3ClientAdapter",
           "PrefixClientAdapter", "PromptClientAdapter"]


@dataclass(eq=False)
class ClientAdapter:
    """The identity adapter (the base model); each PEFT kind overrides the hooks it needs."""

    adapter_id: str = "base"
    shape: LlamaShape | None = field(default=None, repr=False)
    kind: str = "BASE"

    @property
    def virtual_tokens(self) -> int:
        """Virtual tokens ahead of the prompt (prompt/prefix tuning), 0 otherwise."""
        return 0

    @property
    def nbytes(self) -> int:
        """Bytes of the adapter's tensors as held by the client."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the adapter holds (for sizes and for checks that the base executor
        holds none of them)."""
        return []

    def prompt_embeddings(self) -> torch.Tensor | None:
        return None

    def prefix_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def after_embedding(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The input embeddings ``x`` of rows at sequence ``positions`` (prompt tuning puts
        its virtual embeddings at positions below ``virtual_tokens``; the token ids there
        are placeholders, :data:`VIRTUAL_TOKEN_ID`)."""
        return x

    def before_linear(self, layer: int, op: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def after_linear(self, layer: int, op: str, x_in: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
        return y


BASE_ADAPTER = ClientAdapter()


class LoraClientAdapter(ClientAdapter):
    """LoRA: ``y + (x A^T) B^T`` per module, with alpha/r folded into B. One slot of the
    executor's own :class:`LoRASlots` at the adapter's rank, so the delta is computed
    exactly as the single-process executor computes it."""

    def __init__(self, packed: PackedAdapter, dtype: torch.dtype = torch.float32):
        super().__init__(packed.adapter_id, packed.shape, LORA)
        self.rank = packed.rank
        self.scaling = packed.scaling
        self.target_modules = packed.target_modules
        self.groups = tuple(g for g in OPS if g in packed.a)
        self.slots = LoRASlots(packed.shape, 1, packed.rank, dtype=dtype)
        self.slots.load_slot(0, packed)

    def tensors(self) -> list[torch.Tensor]:
        return [t for g in self.groups for t in (self.slots.a[g], self.slots.b[g])]

    def after_linear(self, layer, op, x_in, y):
        if op not in self.groups or y.shape[0] == 0:
            return y
        out = y.clone()
        self.slots.apply(layer, op, x_in, out, [(0, 0, y.shape[0])])
        return out


@dataclass(eq=False)
class IA3ClientAdapter(ClientAdapter):
    """IA³: learned vectors that rescale activations. PEFT multiplies the *output* of a
    non-feedforward target (k_proj, v_proj by default for Llama, bias included) and the
    *input* of a feedforward one (down_proj). Packed here per (layer, op): ``out_scale``
    spans the op's whole output (ones on the slices not targeted, exact in floating point);
    ``in_scale`` is only allowed on ops with one module (``o``, ``down``), whose input no
    other module shares."""

    out_scale: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    in_scale: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    kind: str = IA3

    def tensors(self):
        return [*self.out_scale.values(), *self.in_scale.values()]

    def before_linear(self, layer, op, x):
        s = self.in_scale.get((layer, op))
        return x if s is None else x * s

    def after_linear(self, layer, op, x_in, y):
        s = self.out_scale.get((layer, op))
        return y if s is None else y * s


@dataclass(eq=False)
class PrefixClientAdapter(ClientAdapter):
    """Prefix tuning: per layer, ``n_virtual`` keys and values prepended to every
    sequence's attention context. ``kv``: [layers, 2, n_virtual, kv_heads, head_dim]
    (PEFT's ``prompt_embeddings`` [n_virtual, layers * 2 * kv_size] reshaped: for each
    layer, K then V)."""

    kv: torch.Tensor | None = field(default=None, repr=False)
    kind: str = PREFIX_TUNING

    @property
    def virtual_tokens(self) -> int:
        return int(self.kv.shape[2])

    def tensors(self):
        return [self.kv]

    def prefix_kv(self, layer):
        return self.kv[layer, 0], self.kv[layer, 1]


@dataclass(eq=False)
class PromptClientAdapter(ClientAdapter):
    """Prompt tuning: ``n_virtual`` learned input embeddings prefilled ahead of the prompt
    (they run through every layer like real tokens; the logits at their positions are not
    the model's output)."""

    embeddings: torch.Tensor | None = field(default=None, repr=False)
    kind: str = PROMPT_TUNING

    @property
    def virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    def tensors(self):
        return [self.embeddings]

    def prompt_embeddings(self):
        return self.embeddings

    def after_embedding(self, positions, x):
        virtual = positions < self.virtual_tokens
        if not bool(virtual.any()):
            return x
        out = x.clone()
        out[virtual] = self.embeddings[positions[virtual]].to(out.dtype)
        return out

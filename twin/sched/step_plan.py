"""What one scheduling step computes (:class:`StepPlan`), and why its waiting phase stopped."""

from __future__ import annotations

# Why the waiting phase stopped (the "blocked" state). All but PREEMPTED persist through
# a run of pure decode steps until a request finishes or (for EMPTY/LORA) one arrives.
EMPTY, SEQS, BUDGET, KV, LORA, PREEMPTED = "empty", "seqs", "budget", "kv", "lora", "preempted"


class StepPlan:
    """What one step computes. ``explicit`` lists (request, new tokens) outside the decode
    group in running order; when ``group_decode`` every group member decodes one token."""

    __slots__ = ("explicit", "group_decode", "decode_n", "decode_ctx", "decode_lora",
                 "prefill_tokens", "prefill_n", "prefill_ctx", "prefill_ctx_n",
                 "prefill_lora_tokens",
                 "adapters", "loads", "admitted", "preempted", "blocked", "held", "kv_blocks",
                 "waiting_skipped")

    def __init__(self):
        self.explicit: list = []        # (request, new tokens), running order
        self.group_decode = False
        self.decode_n = 0               # decode sequences (group + explicit decodes)
        self.decode_ctx = 0             # sum of attended tokens over decode sequences
        self.decode_lora = 0            # decode sequences with an adapter
        self.prefill_tokens = 0
        self.prefill_n = 0              # prefill chunks
        self.prefill_ctx = 0            # sum over prefill chunks of n * (start + n)
        self.prefill_ctx_n = 0          # prefill chunks with start > 0 (a hit or a chunk before)
        self.prefill_lora_tokens = 0
        self.adapters = 0               # distinct adapters in the batch
        self.loads: list = []           # AdapterLoad, paid inside the step
        self.admitted: list = []
        self.preempted: list = []
        self.blocked = EMPTY
        self.held = EMPTY               # what kept the oldest waiting request out (or EMPTY)
        self.kv_blocks = 0              # KV blocks in use once the step's allocations are made
        self.waiting_skipped = 0        # waiting requests the LoRA rule passed over

    @property
    def pure_decode(self) -> bool:
        # twin.sim.engine's step loop reads these three fields inline (one property call
        # less per step): change both together
        return self.group_decode and not self.explicit and not self.loads

    @property
    def num_tokens(self) -> int:
        return self.decode_n + self.prefill_tokens

    @property
    def lora_tokens(self) -> int:
        return self.decode_lora + self.prefill_lora_tokens

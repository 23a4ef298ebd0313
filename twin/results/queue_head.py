"""Which vLLM limit kept the oldest waiting request out, as a share of the busy time.

A run that starves is told to do different things depending on what held its queue: more
GPU adapter slots (``max_loras``: the oldest request's adapter is outside the full set),
more KV cache (its blocks do not fit, or the step preempted and so admitted no one), a
larger step (``max_num_batched_tokens``: the step was full; compute at that step size) or
more sequences (``max_num_seqs``). The head of the queue is the request whose wait sets
the TTFT of everything behind it, so what holds it is the knob to look at first. Each
step's plan says what held it (``StepPlan.held``, the same through a run of identical
decode steps), and the recorder adds the step's duration to it.
"""

from __future__ import annotations

from twin.sched.step_plan import BUDGET, EMPTY, KV, LORA, PREEMPTED, SEQS

#: the vLLM setting (or resource) behind each thing that can hold the queue's head
LIMIT_OF = {LORA: "max_loras", KV: "kv_cache", PREEMPTED: "kv_cache",
            BUDGET: "max_num_batched_tokens", SEQS: "max_num_seqs"}
LIMITS = ("max_loras", "kv_cache", "max_num_batched_tokens", "max_num_seqs")
#: a limit is named in the verdict when it held the queue at least this share of busy time
NAMED_SHARE = 0.5


def held_seconds() -> dict[str, float]:
    """A fresh tally: seconds of steps by what held the queue's head (``EMPTY``: no queue)."""
    return dict.fromkeys((EMPTY, *LIMIT_OF), 0.0)


def waiting_held_by(seconds: dict[str, float], busy_s: float) -> dict[str, float]:
    """The summary's ``waiting_held_by``: ``busy_s`` (seconds of steps) and, per limit of
    :data:`LIMITS`, the share of that time in which it held the oldest waiting request.
    The shares sum to at most 1; the rest is time with nobody left waiting."""
    out = {"busy_s": float(busy_s), **dict.fromkeys(LIMITS, 0.0)}
    if busy_s > 0:
        for reason, name in LIMIT_OF.items():
            out[name] += seconds.get(reason, 0.0) / busy_s
    return out


def combined(parts: list[dict]) -> dict[str, float]:
    """Several servers' ``waiting_held_by`` as one, each weighted by its busy time."""
    busy = sum(p["busy_s"] for p in parts)
    out = {"busy_s": float(busy)}
    for name in LIMITS:
        out[name] = sum(p[name] * p["busy_s"] for p in parts) / busy if busy > 0 else 0.0
    return out


def main_limit(held_by: dict | None) -> str | None:
    """The limit that held the queue for at least :data:`NAMED_SHARE` of the busy time, or
    None (no figures, or no single limit did)."""
    if not held_by:
        return None
    name = max(LIMITS, key=lambda k: held_by[k])
    return name if held_by[name] >= NAMED_SHARE else None

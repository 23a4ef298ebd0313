"""Per-request state, as vLLM's ``Request`` keeps it (tokens computed, tokens generated)."""

from __future__ import annotations


class RequestStatus:
    WAITING = 0
    PREFILLING = 1  # running, prompt (or recompute) not fully computed yet
    DECODING = 2    # running, one token per step; bookkept lazily by DecodeGroup
    FINISHED = 3
    REJECTED = 4    # prompt + output over max_model_len: vLLM answers HTTP 400
    ABORTED = 5     # taken out by the engine (the executor: its adapter failed to load)

    NAMES = {0: "waiting", 1: "running", 2: "running", 3: "finished", 4: "rejected",
             5: "failed"}


#: how tables and reports name the base model's requests (adapter -1; an empty adapter cell
#: in a trace): routing tables, placements, the held-back adapter; no adapter may be so named
BASE_MODEL = "(base model)"


def exceeds_max_model_len(prompt, output, max_model_len):
    """Would vLLM refuse this request? Its OpenAI server answers HTTP 400 ("maximum context
    length") when prompt + max_tokens exceeds max_model_len, and refuses a prompt of
    max_model_len tokens or more whatever max_tokens is. ``vllm bench serve`` sends
    max_tokens = the trace's output length, so such a request is refused, never truncated.
    Works on ints and on numpy arrays alike (the summary applies it to whole columns)."""
    return (prompt >= max_model_len) | (prompt + output > max_model_len)


class Request:
    """One request. ``adapter`` is a small int (-1 = base model).

    ``computed`` counts tokens whose KV is in the cache (prefix-cache hits included); it is
    exact for waiting and prefilling requests. For decoding requests the scheduler's ``DecodeGroup`` holds it
    as ``x + clock`` (``x`` below) so that a decode step costs O(1), not O(running).
    """

    __slots__ = ("idx", "request_id", "arrival", "adapter", "prompt", "output", "computed",
                 "generated", "blocks", "key", "seq", "x", "status", "first_scheduled",
                 "first_token", "finish", "preemptions", "hash_ids", "hash_block_size",
                 "prefix")

    def __init__(self, idx: int, request_id: int, arrival: float, adapter: int, prompt: int,
                 output: int, hash_ids: tuple[int, ...] | None = None,
                 hash_block_size: int = 512):
        self.idx = idx
        self.request_id = request_id
        self.arrival = arrival
        self.adapter = adapter
        self.prompt = prompt
        self.output = output
        self.computed = 0
        self.generated = 0
        self.blocks = 0       # KV blocks held (exact unless DECODING)
        self.key = idx        # FCFS key in the waiting queue (negative after preemption)
        self.seq = -1         # position key in the running list (admission order)
        self.x = 0            # DECODING: computed == x + decode clock
        self.status = RequestStatus.WAITING
        self.first_scheduled = -1.0
        self.first_token = -1.0
        self.finish = -1.0
        self.preemptions = 0
        # the token content, for the prefix cache: ids of consecutive hash_block_size-token
        # blocks, prompt first (two requests agreeing on the first j ids share their first
        # j * hash_block_size tokens); None shares nothing with anyone
        self.hash_ids = hash_ids
        self.hash_block_size = hash_block_size
        self.prefix = None    # twin.sched.prefix_cache.PrefixState, built at first lookup

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what a (re)prefill must compute."""
        return self.prompt + self.generated

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (f"Request(id={self.request_id}, adapter={self.adapter}, status="
                f"{RequestStatus.NAMES[self.status]}, computed={self.computed}, "
                f"generated={self.generated}/{self.output})")

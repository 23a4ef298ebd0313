"""Multi-turn (and agent) workloads with shared prefixes, for prefix-caching studies.

Each adapter (tenant) has a system prompt shared by all its sessions; a session is a
conversation of a few turns. ``style="chat"``: turn k's prompt is turn k-1's prompt, its
answer and the new user message, so it re-sends the whole previous exchange.
``style="agent"``: every call re-sends the system prompt and the session's tool context
(the same tool definitions and documents each call) and a new message, without history.

Arrivals are open-loop: turn k arrives ``think time + an estimate of turn k-1's duration``
after turn k-1 arrived (the estimate is ``tpot_s`` per output token), not after turn k-1
really finished: the trace is a file, it cannot wait for a server. Sessions start at
uniform times in ``[0, duration_s)``; turns at or past ``duration_s``, or that would pass
``max_model_len`` tokens (prompt + output), end the session.

``hash_ids`` (the trace contract, :mod:`twin.workload.prefix_columns`) name the blocks of
``block_size`` tokens of what each request holds, prompt then output: a block entirely in
the adapter's system prompt gets the adapter's id (one for every session of the adapter),
a block in what the session re-sends (chat: the whole conversation so far; agent: system
prompt and tool context) the session's id for that position, anything else a fresh id. So
equal ids are equal tokens, a partial block's tokens are the start of the full block with
the same id, and turn k's prompt ids start with all of turn k-1's ids (its output
included). ``same_system_prompt=True`` gives every adapter the same system prompt text
(the same ids): vLLM still never shares those blocks across adapters.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.workload.generate import MAX_REQUESTS, adapter_names, as_length_sampler
from twin.workload.popularity import powerlaw_index
from twin.workload.prefix_columns import BLOCK_SIZE_ATTR
from twin.workload.schema import validate_trace

__all__ = ["session_trace", "STYLES"]

STYLES = ("chat", "agent")


def _check_args(n_adapters, sessions_per_adapter, turns_mean, duration_s, block_size,
                style, max_model_len, think_s, tpot_s, popularity) -> None:
    def need(ok, field, what, got):
        if not ok:
            raise TwinInputError(f"{field} must be {what}, got {got!r}", field=field)
    need(int(n_adapters) >= 1, "n_adapters", "at least 1", n_adapters)
    need(sessions_per_adapter > 0 and math.isfinite(sessions_per_adapter),
         "sessions_per_adapter", "a finite number > 0", sessions_per_adapter)
    need(turns_mean >= 1 and math.isfinite(turns_mean), "turns_mean", "a number >= 1",
         turns_mean)
    need(duration_s > 0 and math.isfinite(duration_s), "duration_s", "a finite number > 0 s",
         duration_s)
    need(int(block_size) >= 1, "block_size", "an integer >= 1 token", block_size)
    need(style in STYLES, "style", f"one of {STYLES}", style)
    need(int(max_model_len) >= 2, "max_model_len", "an integer >= 2 tokens", max_model_len)
    need(think_s >= 0 and math.isfinite(think_s), "think_s", "a finite number >= 0 s",
         think_s)
    need(tpot_s >= 0 and math.isfinite(tpot_s), "tpot_s", "a finite number >= 0 s", tpot_s)
    need(popularity in ("uniform", "powerlaw"), "popularity", "'uniform' or 'powerlaw'",
         popularity)
    expect = n_adapters * sessions_per_adapter * turns_mean
    need(expect <= MAX_REQUESTS, "sessions_per_adapter",
         f"small enough for at most {MAX_REQUESTS:,} requests", expect)


def _segment_start(seg: np.ndarray) -> np.ndarray:
    """For rows grouped by ``seg`` (contiguous), the index of each row's group start."""
    first = np.r_[True, seg[1:] != seg[:-1]]
    return np.maximum.accumulate(np.where(first, np.arange(len(seg)), 0))


def _segment_cumsum(x: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum of ``x`` within each contiguous group (``start``)."""
    c = np.cumsum(x)
    return c - (c - x)[start]


def _turns(rng, sess_adapter, t0, turns_mean, max_turns, think_s, tpot_s, sampler,
           style, system_tokens, context_tokens, max_model_len, duration_s):
    """Per turn (rows grouped by session): session, turn, arrival, prompt, output, and
    the tokens the session re-sends (the prefix that turn shares with the others)."""
    n_turns = rng.geometric(1.0 / turns_mean, size=len(t0))
    if max_turns:
        n_turns = np.minimum(n_turns, int(max_turns))
    sess = np.repeat(np.arange(len(t0)), n_turns)
    start = _segment_start(sess)
    turn = np.arange(len(sess)) - start
    lens = np.asarray(sampler(rng, len(sess)), dtype=np.int64)
    user, out = np.maximum(lens[:, 0], 1), np.maximum(lens[:, 1], 1)
    think = rng.exponential(think_s, size=len(sess)) if think_s > 0 else np.zeros(len(sess))
    # turn k arrives think_k + tpot * output_{k-1} after turn k-1 (open loop)
    step = np.where(turn > 0, think + tpot_s * np.r_[0, out[:-1]], 0.0)
    arrival = t0[sess] + _segment_cumsum(step, start)
    head = system_tokens + (context_tokens[sess] if style == "agent" else 0)
    if style == "chat":   # everything said before, then the new message
        prompt = head + _segment_cumsum(user + out, start) - out
        shared = np.full(len(sess), np.iinfo(np.int64).max)
    else:
        prompt = head + user
        shared = head
    ok = (prompt + out <= max_model_len) & (arrival < duration_s)
    keep = _segment_cumsum((~ok).astype(np.int64), start) == 0   # a session ends at its
    return (sess[keep], turn[keep], arrival[keep], prompt[keep], out[keep],   # first miss
            shared[keep], sess_adapter[sess[keep]])


def _hash_ids(block, system_tokens, adapter_key, sess, prompt, out, shared):
    """Each request's block ids (lists), from (owner, block position) keys: the adapter's
    system prompt, the session's re-sent prefix, or the request itself; numbered in row
    order, as Mooncake's are."""
    n = -(-(prompt + out) // block)
    row = np.repeat(np.arange(len(n)), n)
    pos = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    end = (pos + 1) * block    # tokens up to the block's end
    n_ad = int(adapter_key.max()) + 1 if len(adapter_key) else 1
    n_sess = int(sess.max()) + 1 if len(sess) else 1
    owner = np.where(end <= system_tokens, adapter_key[row],
                     np.where(end <= shared[row], n_ad + sess[row],
                              n_ad + n_sess + row))
    key = owner.astype(np.int64) * (int(n.max(initial=1)) + 1) + pos
    ids = pd.factorize(key)[0].tolist()
    bounds = np.r_[0, np.cumsum(n)].tolist()
    return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def session_trace(n_adapters: int, sessions_per_adapter: float = 10, *,
                  turns_mean: float = 4.0, max_turns: int | None = None,
                  think_s: float = 30.0, tpot_s: float = 0.03, duration_s: float = 3600,
                  system_tokens: int = 512, context_tokens: int = 2048,
                  style: str = "chat", lengths=None, block_size: int = 16,
                  max_model_len: int = 8192, popularity: str = "uniform",
                  alpha: float = 1.0, same_system_prompt: bool = False, seed: int = 0,
                  prefix: str = "lora") -> pd.DataFrame:
    """A multi-turn trace with shared prefixes (see the module doc).

    ``n_adapters * sessions_per_adapter`` sessions (rounded), spread over the adapters
    evenly (``popularity="uniform"``: each gets the same count, +-1) or by S-LoRA's power law
    (``"powerlaw"``, ``alpha``); each starts at a uniform time in ``[0, duration_s)``. Turns
    per session ~ Geometric(mean ``turns_mean``), capped at ``max_turns``; think time ~
    Exponential(mean ``think_s``). Each turn's new message and answer lengths come from
    ``lengths`` (a pool or :data:`twin.workload.generate.LengthSampler`; default U[8,512)).
    The system prompt has ``system_tokens``; the agent style's tool context
    ``context_tokens`` per session. Columns: the contract's five, ``session_id``, ``turn``,
    ``hash_ids`` (``df.attrs["hash_block_size"] = block_size``). Deterministic by ``seed``.
    """
    _check_args(n_adapters, sessions_per_adapter, turns_mean, duration_s, block_size, style,
                max_model_len, think_s, tpot_s, popularity)
    if int(system_tokens) < 0 or int(context_tokens) < 0:
        raise TwinInputError("system_tokens and context_tokens must be >= 0",
                             field="system_tokens")
    rng = np.random.default_rng(seed)
    n_sess = max(1, int(round(n_adapters * sessions_per_adapter)))
    sess_adapter = (rng.permutation(np.arange(n_sess) % n_adapters) if popularity == "uniform"
                    else powerlaw_index(rng, n_adapters, alpha, n_sess))
    t0 = np.sort(rng.uniform(0.0, duration_s, size=n_sess))
    context = np.full(n_sess, int(context_tokens), dtype=np.int64)
    sess, turn, arrival, prompt, out, shared, adapter = _turns(
        rng, sess_adapter, t0, turns_mean, max_turns, think_s, tpot_s,
        as_length_sampler(lengths), style, int(system_tokens), context, int(max_model_len),
        duration_s)
    order = np.lexsort((turn, sess, arrival))
    sess, turn, arrival, prompt, out, shared, adapter = (
        a[order] for a in (sess, turn, arrival, prompt, out, shared, adapter))
    key = np.zeros_like(adapter) if same_system_prompt else adapter
    ids = _hash_ids(int(block_size), int(system_tokens), key, sess, prompt, out, shared)
    df = pd.DataFrame({
        "arrival_s": arrival,
        "adapter": pd.array(adapter_names(n_adapters, prefix)[adapter], dtype="string"),
        "prompt_tokens": prompt, "output_tokens": out,
        "session_id": sess, "turn": turn,
        "hash_ids": pd.Series(ids, dtype=object),
    })
    df.attrs[BLOCK_SIZE_ATTR] = int(block_size)
    return validate_trace(df, source="session_trace")

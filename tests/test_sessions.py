"""The multi-turn generator (twin.workload.sessions), checked against an independent model
of the conversation text: every token labelled by what it is, blocks compared by content."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twin.errors import TwinInputError
from twin.workload.sessions import session_trace

B = 16


def _token_labels(df: pd.DataFrame, system: int, context: int, style: str, same_sys: bool):
    """Per request, a label per token of prompt + output, built from the trace's lengths
    alone: the system prompt (per adapter), then chat: the session's alternating messages
    and answers; agent: the session's tool context, then this call's own tokens."""
    out, prev = [], {}
    for r in df.itertuples():
        sys_owner = "all" if same_sys else r.adapter
        labels = [("sys", sys_owner, i) for i in range(system)]
        if style == "chat":
            hist = prev.get(r.session_id, [])
            new_user = r.prompt_tokens - system - len(hist)
            assert new_user >= 1   # turn k's prompt holds turn k-1's prompt and answer
            labels += hist + [("u", r.session_id, r.turn, j) for j in range(new_user)]
            labels += [("o", r.session_id, r.turn, j) for j in range(r.output_tokens)]
            prev[r.session_id] = labels[system:]
        else:
            labels += [("ctx", r.session_id, i) for i in range(context)]
            labels += [("u", r.request_id, j) for j in range(r.prompt_tokens - len(labels))]
            labels += [("o", r.request_id, j) for j in range(r.output_tokens)]
        assert len(labels) == r.prompt_tokens + r.output_tokens
        out.append(labels)
    return out


def _check_ids_are_content(df, labels):
    """Equal ids <=> equal block content (a partial block: the start of its full block)."""
    by_id, by_content = {}, {}
    for ids, lab in zip(df["hash_ids"], labels):
        assert len(ids) == -(-len(lab) // B)
        for j, x in enumerate(ids):
            content = tuple(lab[j * B:(j + 1) * B])
            longest = by_id.setdefault(x, content)
            short, long_ = sorted((content, longest), key=len)
            assert long_[:len(short)] == short, f"id {x} names two different contents"
            by_id[x] = long_
    for x, content in by_id.items():
        if len(content) == B:
            assert by_content.setdefault(content, x) == x, "one content, two ids"


@pytest.mark.parametrize("style, same_sys", [("chat", False), ("agent", False),
                                             ("chat", True)])
def test_hash_ids_match_an_independent_model_of_the_text(style, same_sys):
    system, context = 40, 50   # not multiples of the block: straddling blocks are unique
    df = session_trace(3, 4, turns_mean=3, think_s=5, duration_s=300, system_tokens=system,
                       context_tokens=context, style=style, block_size=B,
                       same_system_prompt=same_sys, seed=3)
    assert df.attrs["hash_block_size"] == B and df["turn"].max() >= 2
    labels = _token_labels(df, system, context, style, same_sys)
    _check_ids_are_content(df, labels)


def test_turn_k_prompt_starts_with_turn_k_minus_1_full_ids():
    df = session_trace(4, 5, turns_mean=4, think_s=2, duration_s=600, seed=1)
    pairs = 0
    for _, s in df.groupby("session_id"):
        s = s.sort_values("turn")
        assert s["turn"].tolist() == list(range(len(s)))
        for (_, a), (_, b) in zip(s.iloc[:-1].iterrows(), s.iloc[1:].iterrows()):
            assert b["hash_ids"][:len(a["hash_ids"])] == a["hash_ids"]
            assert b["prompt_tokens"] > a["prompt_tokens"] + a["output_tokens"]
            pairs += 1
    assert pairs > 20


def test_system_prompt_shared_within_an_adapter_and_no_id_across_adapters():
    df = session_trace(4, 6, system_tokens=64, duration_s=600, seed=2)
    head = df["hash_ids"].map(lambda ids: tuple(ids[:64 // B]))
    assert (head.groupby(df["adapter"]).nunique() == 1).all()   # one system prompt each
    assert head.groupby(df["adapter"]).first().nunique() == 4    # different per adapter
    ids = {a: set(np.concatenate(g.to_numpy())) for a, g in df.groupby("adapter")["hash_ids"]}
    names = sorted(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not ids[a] & ids[b]
    same = session_trace(4, 6, system_tokens=64, duration_s=600, seed=2,
                         same_system_prompt=True)
    assert same["hash_ids"].map(lambda x: tuple(x[:4])).nunique() == 1


def test_open_loop_arrivals_limits_and_determinism():
    kw = dict(turns_mean=5, think_s=0.0, tpot_s=0.05, duration_s=400, max_model_len=3000,
              lengths=np.array([[300, 200], [100, 50]]), seed=7)
    df = session_trace(2, 5, **kw)
    assert (df["prompt_tokens"] + df["output_tokens"] <= 3000).all()
    assert df["arrival_s"].max() < 400
    for _, s in df.groupby("session_id"):
        s = s.sort_values("turn")   # no think time: exactly the previous output's estimate
        np.testing.assert_allclose(np.diff(s["arrival_s"]), 0.05 * s["output_tokens"][:-1])
    again = session_trace(2, 5, **kw)
    pd.testing.assert_frame_equal(df, again)
    other = session_trace(2, 5, **{**kw, "seed": 8})
    assert not df[["arrival_s"]].equals(other[["arrival_s"]])


def test_popularity_and_session_counts():
    even = session_trace(5, 8, duration_s=1e6, max_model_len=10 ** 6, seed=0)
    assert even.groupby("adapter")["session_id"].nunique().tolist() == [8] * 5
    skew = session_trace(10, 20, popularity="powerlaw", alpha=0.3, duration_s=1e6,
                         max_model_len=10 ** 6, seed=0)
    per = skew.groupby("adapter")["session_id"].nunique()
    assert per["lora-0"] > 3 * per.get("lora-9", 0)


@pytest.mark.parametrize("kw, field", [
    (dict(n_adapters=0), "n_adapters"), (dict(turns_mean=0.5), "turns_mean"),
    (dict(block_size=0), "block_size"), (dict(style="x"), "style"),
    (dict(think_s=-1), "think_s"), (dict(duration_s=float("inf")), "duration_s"),
    (dict(sessions_per_adapter=1e12), "sessions_per_adapter"),
])
def test_bad_arguments_name_the_field(kw, field):
    args = dict(n_adapters=2, sessions_per_adapter=2)
    args.update(kw)
    with pytest.raises(TwinInputError) as e:
        session_trace(**args)
    assert e.value.field == field

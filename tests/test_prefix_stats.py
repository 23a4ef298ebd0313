"""The shared-prefix fraction (twin.workload.prefix_stats) against a brute-force reference,
prefix groups for adapter tagging, the Mooncake loader's hash ids and ``twin trace``'s
sessions / summary actions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twin.cli.trace import main as cli_main
from twin.errors import TwinInputError
from twin.ml.features import PREFIX_FEATURES, prefix_features
from twin.workload import public
from twin.workload.popularity import assign_adapters
from twin.workload.prefix_stats import (prefix_groups, prefix_hit_tokens, prefix_share,
                                        session_summary)
from twin.workload.schema import read_trace, validate_trace
from twin.workload.sessions import session_trace
from shared_data import shared_file


def _brute_hits(df: pd.DataFrame) -> list[int]:
    """vLLM's rule by hand: leading full blocks (at most (prompt - 1) // block) whose whole
    chain of ids some earlier request of the same adapter computed in full (it computed
    prompt + output - 1 tokens)."""
    block, seen, out = df.attrs["hash_block_size"], set(), []
    for ids, adapter, prompt, output in zip(df["hash_ids"], df["adapter"],
                                            df["prompt_tokens"], df["output_tokens"]):
        if ids is None:   # unknown content: shares nothing
            out.append(0)
            continue
        ns = None if pd.isna(adapter) else adapter
        hits = 0
        for i in range((prompt - 1) // block):
            if (ns, tuple(ids[:i + 1])) not in seen:
                break
            hits += 1
        out.append(hits * block)
        full = min(len(ids), (prompt + output - 1) // block)
        seen.update((ns, tuple(ids[:i + 1])) for i in range(full))
    return out


def _random_trace(seed: int, n: int = 300, block: int = 4) -> pd.DataFrame:
    """Requests built from a few shared openings and random tails, so chains share
    prefixes, diverge, and re-use ids at other positions (which must not hit)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        k = int(rng.integers(1, 9))
        ids = [int(rng.integers(0, 3))] + rng.integers(0, 6, size=k - 1).tolist()
        prompt = int(rng.integers((k - 1) * block + 1, k * block + 1))
        rows.append((ids, prompt, int(rng.integers(1, 3 * block))))
    df = pd.DataFrame({"arrival_s": np.arange(n, dtype=float),
                       "adapter": rng.choice(np.array(["a", "b", None], dtype=object), n),
                       "prompt_tokens": [r[1] for r in rows],
                       "output_tokens": [r[2] for r in rows]})
    df["hash_ids"] = pd.Series([None if i % 37 == 5 else r[0] for i, r in enumerate(rows)],
                               dtype=object)
    df.attrs["hash_block_size"] = block
    return validate_trace(df)


@pytest.mark.parametrize("seed", range(5))
def test_prefix_hits_equal_the_brute_force_reference(seed):
    df = _random_trace(seed)
    hits = prefix_hit_tokens(df)
    assert hits.tolist() == _brute_hits(df)
    assert 0 < hits.sum() < df["prompt_tokens"].sum()
    assert prefix_share(df) == pytest.approx(hits.sum() / df["prompt_tokens"].sum())


def test_generated_sessions_against_the_reference_and_adapter_namespaces():
    df = session_trace(3, 5, turns_mean=3, think_s=5, duration_s=300, system_tokens=64,
                       same_system_prompt=True, seed=4)
    assert prefix_hit_tokens(df).tolist() == _brute_hits(df)
    one = df.assign(adapter="x")   # the same text on one adapter shares the system prompt
    assert prefix_share(one) > prefix_share(df) > 0.3


def test_prefix_share_needs_hash_ids():
    df = validate_trace(pd.DataFrame({"arrival_s": [0.0], "prompt_tokens": [3],
                                      "output_tokens": [1]}))
    with pytest.raises(TwinInputError, match="hash_ids"):
        prefix_share(df)


def test_prefix_groups_and_group_tagging():
    df = _random_trace(1)
    g = prefix_groups(df, 2)
    null = df["hash_ids"].isna().to_numpy()
    assert null.any() and len(set(g[null])) == null.sum()   # no ids: each alone
    assert not set(g[null]) & set(g[~null])
    heads = df["hash_ids"][~null].map(lambda ids: tuple(ids[:2]))
    assert (pd.Series(g[~null]).groupby(heads.to_numpy()).nunique() == 1).all()
    assert (heads.groupby(g[~null]).nunique() == 1).all()
    tagged = assign_adapters(df, 5, groups=g, seed=0)
    assert (tagged["adapter"].groupby(g).nunique() == 1).all()
    assert tagged["adapter"].nunique() > 1
    assert tagged["hash_ids"].tolist() == df["hash_ids"].tolist()


def test_session_summary():
    df = session_trace(4, 3, duration_s=1e6, max_model_len=10 ** 6, seed=0)
    s = session_summary(df)
    assert s["sessions"] == 12 and s["sessions_per_adapter_mean"] == 3
    assert s["turns_mean"] == pytest.approx(len(df) / 12)
    assert session_summary(df.drop(columns=["session_id", "turn"])) == {}


def test_mooncake_keeps_hash_ids_through_parquet(tmp_path):
    path = shared_file("traces", public.MOONCAKE_FILES["conversation"])
    if path is None:
        pytest.skip("shared/data not available")
    out = tmp_path / "m.parquet"
    assert cli_main(["trace", "mooncake", "--limit-s", "300", "--adapters", "4",
                     "--tag-by-prefix", "2", "--out", str(out)]) == 0
    df = read_trace(out)
    assert df.attrs["hash_block_size"] == 512
    raw = pd.read_json(path, lines=True, nrows=len(df))
    assert df["hash_ids"].tolist() == raw["hash_ids"].tolist()
    heads = df["hash_ids"].map(lambda ids: tuple(ids[:2]))
    assert (df["adapter"].groupby(heads.to_numpy()).nunique() == 1).all()
    assert cli_main(["trace", "mooncake", "--limit-s", "60", "--out",
                     str(tmp_path / "m.csv")]) == 2   # a CSV cannot keep the block size
    assert cli_main(["trace", "mooncake", "--limit-s", "60", "--no-hash-ids", "--out",
                     str(tmp_path / "m.csv")]) == 0


def test_cli_sessions_and_summary(tmp_path, capsys):
    out = tmp_path / "s.parquet"
    args = ["trace", "sessions", "--adapters", "3", "--sessions-per-adapter", "4",
            "--lengths", "uniform", "--uniform", "20,60", "--block-size", "8",
            "--style", "agent", "--seed", "5", "--out", str(out)]
    assert cli_main(args) == 0
    df = read_trace(out)
    assert df.attrs["hash_block_size"] == 8 and df["session_id"].nunique() == 12
    capsys.readouterr()
    assert cli_main(["trace", "summary", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"shared-prefix fraction {100 * prefix_share(df):.1f}%" in line
    assert "12 sessions" in line
    assert cli_main(["trace", "sessions", "--adapters", "0", "--out",
                     str(tmp_path / "x.parquet")]) == 2


def test_prefix_features_for_the_recommender():
    df = session_trace(4, 3, duration_s=1e6, max_model_len=10 ** 6, seed=0)
    f = prefix_features(df)
    assert tuple(f) == PREFIX_FEATURES
    assert f == {"prefix_share": prefix_share(df), "sessions_per_adapter": 3.0}
    plain = df.drop(columns=["hash_ids", "session_id", "turn"])
    assert prefix_features(plain) == {"prefix_share": 0.0,
                                      "sessions_per_adapter": len(df) / 4}


@pytest.mark.parametrize("name, block, share_min", [
    ("sessions_16lora_10min.parquet", 16, 0.8), ("mooncake_conv_5min_8lora.parquet", 512, 0.1)])
def test_bundled_prefix_traces_hold_the_contract(name, block, share_min):
    path = Path(__file__).resolve().parents[1] / "traces" / name
    assert path.stat().st_size < 300_000
    df = read_trace(path)
    assert df.attrs["hash_block_size"] == block
    assert share_min < prefix_share(df) < 1
    assert prefix_hit_tokens(df).tolist() == _brute_hits(df)

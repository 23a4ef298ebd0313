"""Synthetic generators: determinism, realised rates, rate/popularity assignment (their
speed: experiments/bench_generate_predict.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twin.errors import TwinInputError
from twin.workload import generate
from twin.workload.generate import (pool_lengths, powerlaw_trace, rate_class_trace,
                                    renewal_arrivals, uniform_lengths)
from twin.workload.popularity import powerlaw_shares
from twin.workload.schema import read_trace, write_trace

POOL = np.array([[10, 20], [300, 40], [5, 500]])


def test_deterministic_by_seed():
    a = rate_class_trace(12, duration_s=300, lengths=POOL, seed=7)
    pd.testing.assert_frame_equal(a, rate_class_trace(12, duration_s=300, lengths=POOL, seed=7))
    b = rate_class_trace(12, duration_s=300, lengths=POOL, seed=8)
    assert len(a) != len(b) or not np.array_equal(a["arrival_s"], b["arrival_s"])
    p = powerlaw_trace(10, 5.0, alpha=0.5, duration_s=300, cv=2.0, seed=3)
    pd.testing.assert_frame_equal(p, powerlaw_trace(10, 5.0, alpha=0.5, duration_s=300,
                                                    cv=2.0, seed=3))


def test_rate_class_assignment():
    df = rate_class_trace(32, (1.6, 0.8, 0.4), duration_s=600, lengths=POOL, seed=0)
    per = df.groupby("adapter")["rate_rps"].agg(["min", "max"])
    assert len(per) == 32 and (per["min"] == per["max"]).all()  # one rate per adapter
    counts = per["min"].value_counts()
    assert counts[1.6] == 11 and counts[0.8] == 11 and counts[0.4] == 10
    # shuffled: not the plain round-robin order
    order = [per.loc[f"lora-{i}", "min"] for i in range(32)]
    assert order != [(1.6, 0.8, 0.4)[i % 3] for i in range(32)]
    assert df["arrival_s"].max() < 600 and df["arrival_s"].is_monotonic_increasing
    assert df["request_id"].tolist() == list(range(len(df)))


def test_realised_rates_long_run():
    duration = 20000.0
    df = rate_class_trace(30, (1.6, 0.8, 0.4), duration_s=duration, lengths=POOL, seed=1)
    g = df.groupby("adapter").agg(n=("arrival_s", "size"), rate=("rate_rps", "first"))
    realised = g["n"] / duration / g["rate"]
    assert realised.between(0.95, 1.05).all()
    by_class = df.groupby("rate_rps").size() / duration / (10 * np.array([0.4, 0.8, 1.6]))
    assert np.allclose(by_class, 1.0, atol=0.02)


def test_gamma_arrivals_cv():
    df = rate_class_trace(4, (2.0,), duration_s=10000, lengths=POOL, arrival="gamma", cv=2.0)
    for _, grp in df.groupby("adapter"):
        gaps = np.diff(grp["arrival_s"].to_numpy())
        assert abs(gaps.mean() - 0.5) < 0.03
        assert abs(gaps.std() / gaps.mean() - 2.0) < 0.15
    poisson = rate_class_trace(2, (2.0,), duration_s=10000, lengths=POOL, cv=3.0)
    gaps = np.diff(poisson.loc[poisson["adapter"] == "lora-0", "arrival_s"].to_numpy())
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # poisson ignores cv


def test_renewal_top_up(monkeypatch):
    """The rare path where a stream's first block of gaps ends before the horizon."""
    monkeypatch.setattr(generate, "_MARGIN_SD", 0.0)
    monkeypatch.setattr(generate, "_MARGIN_N", 0)
    t, s = renewal_arrivals([1.0, 0.5, 3.0], 20000.0, rng=np.random.default_rng(0))
    assert np.all(np.diff(t) >= 0) and t.max() < 20000
    counts = np.bincount(s, minlength=3) / 20000
    np.testing.assert_allclose(counts, [1.0, 0.5, 3.0], rtol=0.05)


def test_powerlaw_trace():
    n, rate, dur = 16, 20.0, 3000.0
    df = powerlaw_trace(n, rate, alpha=0.5, duration_s=dur, seed=2, lengths=POOL)
    assert abs(len(df) / dur / rate - 1) < 0.03
    share = df["adapter"].value_counts(normalize=True).reindex(
        [f"lora-{i}" for i in range(n)], fill_value=0)
    np.testing.assert_allclose(share.to_numpy(dtype=float), powerlaw_shares(n, 0.5), atol=0.01)
    rr = df.groupby("adapter")["rate_rps"].first()
    assert np.isclose(rr["lora-0"], rate * powerlaw_shares(n, 0.5)[0])
    flat = powerlaw_trace(4, 10.0, alpha=1.0, duration_s=2000, seed=0, lengths=POOL)
    assert np.allclose(flat["adapter"].value_counts(normalize=True), 0.25, atol=0.02)


def test_lengths():
    rng = np.random.default_rng(0)
    u = uniform_lengths(8, 512)(rng, 50000)
    assert u.min() >= 8 and u.max() < 512 and abs(u.mean() - 259.5) < 3
    df = rate_class_trace(3, (1.0,), duration_s=500, lengths=POOL)
    pairs = set(map(tuple, df[["prompt_tokens", "output_tokens"]].to_numpy()))
    assert pairs <= set(map(tuple, POOL)) and len(pairs) == 3
    d = powerlaw_trace(3, 2.0, duration_s=200, lengths=None)  # default S-LoRA uniform
    assert d["prompt_tokens"].between(8, 511).all()
    custom = rate_class_trace(2, (1.0,), duration_s=100,
                              lengths=lambda rng, n: np.full((n, 2), 7))
    assert (custom["output_tokens"] == 7).all()
    with pytest.raises(TwinInputError):
        pool_lengths(np.array([[0, 3]]))
    with pytest.raises(TwinInputError):
        pool_lengths(np.array([1, 2, 3]))


def test_hour_trace_round_trips(tmp_path):
    # its generation time is measured by experiments/bench_generate_predict.py, not here
    pool = np.column_stack([np.arange(1, 1001), np.arange(1000, 0, -1)])
    df = rate_class_trace(32, (1.6, 0.8, 0.4), duration_s=3600, lengths=pool, seed=0)
    assert 105_000 < len(df) < 114_000
    back = read_trace(write_trace(df, tmp_path / "r.parquet"))
    pd.testing.assert_frame_equal(back, df)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_adapters=0), "n_adapters"),
    (dict(rates=(1.0, 0.0)), "rates"),
    (dict(arrival="weibull"), "arrival"),
    (dict(arrival="gamma", cv=0.0), "cv"),
    (dict(duration_s=0), "duration_s"),
])
def test_rate_class_errors(kwargs, field):
    args = dict(n_adapters=4, lengths=POOL) | kwargs
    with pytest.raises(TwinInputError) as e:
        rate_class_trace(**args)
    assert e.value.field == field


def test_powerlaw_errors():
    with pytest.raises(TwinInputError) as e:
        powerlaw_trace(4, 0.0)
    assert e.value.field == "total_rate"
    with pytest.raises(TwinInputError) as e:
        powerlaw_trace(4, 1.0, alpha=0)
    assert e.value.field == "alpha"


def test_tenant_copies_shift_each_tenant_circularly():
    base = rate_class_trace(3, (1.0,), duration_s=100, lengths=uniform_lengths(8, 64), seed=2)
    out = generate.tenant_copies(base, 4, span_s=100.0, seed=5)
    assert len(out) == 4 * len(base) and out["arrival_s"].is_monotonic_increasing
    assert out["adapter"].value_counts().to_dict() == {f"tenant-{k}": len(base)
                                                      for k in range(4)}
    for k in range(4):
        mine = out[out["adapter"] == f"tenant-{k}"]
        # the same requests: lengths as a multiset, gaps the same up to the wrap point
        assert sorted(zip(mine["prompt_tokens"], mine["output_tokens"])) == sorted(
            zip(base["prompt_tokens"], base["output_tokens"]))
        a, b = np.sort(mine["arrival_s"].to_numpy()), base["arrival_s"].to_numpy()
        # one common offset (mod the span) explains every arrival of the tenant
        assert any(np.allclose(np.sort((b + (a[0] - x)) % 100.0), a) for x in b)
    offsets = {round(float(out[out["adapter"] == f"tenant-{k}"]["arrival_s"].min()), 6)
               for k in range(4)}
    assert len(offsets) == 4   # tenants' bursts do not coincide
    assert generate.tenant_copies(base, 4, span_s=100.0, seed=5).equals(out)
    with pytest.raises(TwinInputError, match="at least one tenant"):
        generate.tenant_copies(base, 0)

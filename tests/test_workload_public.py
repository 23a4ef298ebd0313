"""Loaders for the public traces, the trace contract's validation, and ``twin trace``."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin.errors import TwinInputError
from twin.workload import public
from twin.cli.trace import main as cli_main
from twin.workload.popularity import assign_adapters, powerlaw_shares
from twin.workload.public import (load_azure2023, load_mooncake, sharegpt_length_pool,
                                  shared_data_dir)
from twin.workload.servegen import servegen_tenants
from twin.workload.schema import read_trace, validate_trace, write_trace

REPO = Path(__file__).resolve().parents[1]


def _shared():
    try:
        return shared_data_dir() / "traces"
    except TwinInputError:
        pytest.skip("shared/data not available")


# -- tiny hand-written inputs -----------------------------------------------------------------

AZURE_TINY = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,0
2023-11-16 18:15:50.9951690,12,3
2023-11-16 18:16:46.6805900,5,7
"""


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_azure_tiny(tmp_path):
    df = load_azure2023(_write(tmp_path, "a.csv", AZURE_TINY))
    assert list(df.columns) == ["request_id", "arrival_s", "adapter", "prompt_tokens",
                                "output_tokens"]
    np.testing.assert_allclose(df["arrival_s"], [0.0, 4.314579, 4.314579, 60.0])
    assert df["output_tokens"].tolist() == [44, 1, 3, 7]  # 0 clipped to 1
    assert df["adapter"].isna().all()
    assert len(load_azure2023(tmp_path / "a.csv", limit_s=5)) == 3


@pytest.mark.parametrize("text, row, field", [
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,3\n", None, "GeneratedTokens"),
    (AZURE_TINY.replace("18:15:50.9951690,396", "18:15:40.0,396"), 1, "TIMESTAMP"),
    (AZURE_TINY.replace("18:16:46.6805900", "not-a-time"), 3, "TIMESTAMP"),
    (AZURE_TINY.replace("12,3", "12,"), 2, "GeneratedTokens"),
    (AZURE_TINY.replace("12,3", "-12,3"), 2, "ContextTokens"),
    (AZURE_TINY.replace("5,7", "5.5,7"), 3, "ContextTokens"),
])
def test_azure_errors_name_file_row_field(tmp_path, text, row, field):
    path = _write(tmp_path, "bad.csv", text)
    with pytest.raises(TwinInputError) as e:
        load_azure2023(path)
    assert (e.value.file, e.value.row, e.value.field) == (str(path), row, field)
    assert "bad.csv" in str(e.value)


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


MOON = [{"timestamp": 3000, "input_length": 10, "output_length": 2, "hash_ids": [0]},
        {"timestamp": 3000, "input_length": 600, "output_length": 0, "hash_ids": [0, 1]},
        {"timestamp": 9500, "input_length": 7, "output_length": 9, "hash_ids": [2]}]


def test_mooncake_tiny(tmp_path):
    path = _write(tmp_path, "m.jsonl", _jsonl(MOON))
    df = load_mooncake(path)
    np.testing.assert_allclose(df["arrival_s"], [0.0, 0.0, 6.5])
    assert df["output_tokens"].tolist() == [2, 1, 9]
    assert "hash_ids" not in df
    assert load_mooncake(path, hash_ids=True)["hash_ids"].iloc[1] == [0, 1]
    assert len(load_mooncake(path, limit_s=6.5)) == 2


def test_mooncake_errors(tmp_path):
    bad = _write(tmp_path, "b.jsonl", _jsonl(MOON[:2]) + "{oops\n" + _jsonl(MOON[2:]))
    with pytest.raises(TwinInputError) as e:
        load_mooncake(bad)
    assert (e.value.file, e.value.row) == (str(bad), 2)
    unsorted = _write(tmp_path, "u.jsonl", _jsonl([MOON[2], MOON[0]]))
    with pytest.raises(TwinInputError) as e:
        load_mooncake(unsorted)
    assert (e.value.row, e.value.field) == (1, "timestamp")
    neg = _write(tmp_path, "n.jsonl", _jsonl([MOON[0], dict(MOON[2], timestamp=-1)]))
    with pytest.raises(TwinInputError) as e:
        load_mooncake(neg)
    assert (e.value.row, e.value.field) == (1, "timestamp")
    missing = _write(tmp_path, "x.jsonl", _jsonl([{"timestamp": 0, "input_length": 3}]))
    with pytest.raises(TwinInputError) as e:
        load_mooncake(missing)
    assert e.value.field == "output_length"
    with pytest.raises(TwinInputError, match="not found"):
        load_mooncake(tmp_path / "nope.jsonl")


def test_loaders_round_trip(tmp_path):
    for df in (load_azure2023(_write(tmp_path, "a.csv", AZURE_TINY)),
               load_mooncake(_write(tmp_path, "m.jsonl", _jsonl(MOON)))):
        back = read_trace(write_trace(df, tmp_path / "t.parquet"))
        pd.testing.assert_frame_equal(back, df)


# -- real public files ------------------------------------------------------------------------

def test_azure_real():
    d = _shared()
    df = load_azure2023(d / public.AZURE_FILES["conv"])
    assert len(df) == 19366 and df["arrival_s"].iloc[0] == 0
    assert 1150 < df["prompt_tokens"].mean() < 1160 and 205 < df["output_tokens"].mean() < 215
    head = load_azure2023(d / public.AZURE_FILES["code"], limit_s=300)
    assert 0 < len(head) < 8819 and head["arrival_s"].max() < 300


def test_mooncake_real():
    d = _shared()
    df = load_mooncake(d / public.MOONCAKE_FILES["conversation"], limit_s=300)
    assert len(df) > 100 and df["arrival_s"].max() < 300
    assert (np.diff(df["arrival_s"]) == 0).mean() > 0.8  # bucketed to ~3-s ticks


def test_real_round_trip(tmp_path):
    df = load_azure2023(_shared() / public.AZURE_FILES["conv"], limit_s=600)
    df = assign_adapters(df, 8, popularity="powerlaw", alpha=0.5)
    pd.testing.assert_frame_equal(read_trace(write_trace(df, tmp_path / "r.parquet")), df)


def test_sharegpt_pool():
    path = _shared() / public.SHAREGPT_FILE
    raw = sharegpt_length_pool(path)
    assert raw.shape == (11035, 2) and raw.dtype == np.int64
    assert raw[:, 0].min() >= 4 and raw[:, 0].max() <= 1024 and raw[:, 1].min() >= 4
    assert raw.sum(axis=1).max() <= 2048
    pool = sharegpt_length_pool(path, target_means=public.VLLM_H100_POOL_MEANS)
    assert pool.shape == raw.shape
    assert abs(pool[:, 0].mean() - 223) < 0.5 and abs(pool[:, 1].mean() - 196) < 0.5
    assert pool[:, 0].min() >= 4 and pool[:, 1].min() >= 4 and pool.sum(1).max() <= 2048
    # shape kept: rank order of prompts unchanged by a monotone rescale
    assert np.all(np.diff(pool[np.argsort(raw[:, 0], kind="stable"), 0]) >= 0)


def test_sharegpt_tiny_filter(tmp_path):
    path = _write(tmp_path, "s.csv", "num_prefill_tokens,num_decode_tokens\n3,10\n4,4\n"
                  "1000,1049\n1025,5\n500,3\n100,100\n")
    assert sharegpt_length_pool(path).tolist() == [[4, 4], [100, 100]]
    assert sharegpt_length_pool(path, max_total=2049).tolist() == [[4, 4], [1000, 1049],
                                                                   [100, 100]]


def test_servegen_real():
    d = _shared()
    df = servegen_tenants(d / public.SERVEGEN_RATE_FILE, d / public.SERVEGEN_LENGTH_FILE,
                          n_tenants=8, duration_s=600, total_rate=20.0, seed=3)
    assert df["adapter"].nunique() == 8
    assert df["adapter"].str.startswith("m-large/client").all()
    assert abs(len(df) / 600 - 20.0) < 0.6
    assert df["arrival_s"].max() < 600 and (df["prompt_tokens"] >= 1).all()


# -- ServeGen on tiny hand-made statistics ----------------------------------------------------

def _servegen_files(tmp_path):
    rates = pd.DataFrame({
        "category": "language", "model": "m",
        "client_id": [1, 1, 2, 2, 3, 3, 9],
        "window_start_s": [0, 600, 0, 600, 0, 600, 0],
        "rate_rps": [5.0, 2.0, 1.0, 0.0, 0.05, 0.05, 50.0],
        "cv": 1.0,
        "iat_dist": ["Gamma", "Weibull", "Gamma", None, "Gamma", "Gamma", "Gamma"],
        "iat_shape": [0.5, 0.6, 1.0, 0.0, 2.0, 2.0, 1.0],
        "iat_scale": 1.0})
    rp = tmp_path / "rates.csv.gz"
    rates.to_csv(rp, index=False)
    rows = []
    for cid, start in ((1, 0), (2, 0), (3, 21600)):  # client 3: only a later window
        for field, base in (("input_tokens", 100), ("output_tokens", 10)):
            q = {f"q{i}": base + i for i in range(101)}
            q.update(q99_5=base + 100, q99_9=base + 100)
            rows.append(dict(category="language", model="m", client_id=cid,
                             window_start_s=start, window_len_s=21600, field=field,
                             mean=base + 50, n_support=101, **q))
    lp = tmp_path / "len.csv.gz"
    pd.DataFrame(rows).to_csv(lp, index=False)  # client 9 has no lengths: skipped
    return rp, lp


def test_servegen_tiny(tmp_path):
    rp, lp = _servegen_files(tmp_path)
    df = servegen_tenants(rp, lp, model="m", n_tenants=2, duration_s=1200, start_window_s=0)
    assert set(df["adapter"].unique()) == {"m/client1", "m/client2"}  # top 2 with lengths
    n1 = (df["client_id"] == 1).to_numpy()
    first = n1 & (df["arrival_s"] < 600).to_numpy()
    assert first.sum() == 3000 and (n1 & ~first).sum() == 1200  # rate * 600, exactly
    assert ((df["client_id"] == 2) & (df["arrival_s"] >= 600)).sum() == 0
    assert df["prompt_tokens"].between(100, 200).all()
    assert abs(df["prompt_tokens"].mean() - 150) < 2 and abs(df["output_tokens"].mean() - 60) < 2
    assert set(df["rate_rps"].round(6)) == {5.0, 2.0, 1.0}
    again = servegen_tenants(rp, lp, model="m", n_tenants=2, duration_s=1200, start_window_s=0)
    pd.testing.assert_frame_equal(df, again)
    other = servegen_tenants(rp, lp, model="m", n_tenants=2, duration_s=1200, start_window_s=0,
                             seed=1)
    assert not np.array_equal(df["arrival_s"], other["arrival_s"])


def test_servegen_tiny_options(tmp_path):
    rp, lp = _servegen_files(tmp_path)
    with pytest.warns(UserWarning, match="only 3 clients"):
        df = servegen_tenants(rp, lp, model="m", n_tenants=5, duration_s=1200)
    assert df["client_id"].nunique() == 3  # client 3 uses its nearest (later) length window
    assert df.loc[df["client_id"] == 3, "prompt_tokens"].between(100, 200).all()
    scaled = servegen_tenants(rp, lp, model="m", n_tenants=3, duration_s=1200,
                              total_rate=1.0)
    assert abs(len(scaled) - 1200) < 40
    with pytest.raises(TwinInputError) as e:
        servegen_tenants(rp, lp, model="m", start_window_s=7)
    assert e.value.field == "start_window_s"
    with pytest.raises(TwinInputError) as e:
        servegen_tenants(rp, lp, model="nope")
    assert e.value.field == "model"


# -- adapter tagging --------------------------------------------------------------------------

def _untagged(n):
    return validate_trace(pd.DataFrame({"arrival_s": np.arange(n) * 0.1, "prompt_tokens": 5,
                                        "output_tokens": 5}))


def test_assign_adapters():
    df = _untagged(60000)
    uni = assign_adapters(df, 10)
    assert uni["adapter"].nunique() == 10
    assert np.allclose(uni["adapter"].value_counts(normalize=True), 0.1, atol=0.01)
    pl = assign_adapters(df, 8, popularity="powerlaw", alpha=0.5, seed=1, prefix="a")
    share = pl["adapter"].value_counts(normalize=True).reindex([f"a-{i}" for i in range(8)])
    np.testing.assert_allclose(share.to_numpy(dtype=float), powerlaw_shares(8, 0.5), atol=0.01)
    pd.testing.assert_frame_equal(pl, assign_adapters(df, 8, popularity="powerlaw", alpha=0.5,
                                                      seed=1, prefix="a"))
    pd.testing.assert_series_equal(pl["arrival_s"], df["arrival_s"])
    assert np.isclose(powerlaw_shares(32, 1.0), 1 / 32).all()
    with pytest.raises(TwinInputError):
        assign_adapters(df, 0)
    with pytest.raises(TwinInputError):
        assign_adapters(df, 4, popularity="zipf")


# -- shared data lookup and CLI ---------------------------------------------------------------

def test_shared_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TWIN_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    with pytest.raises(TwinInputError, match="not found"):
        public.shared_trace_path("nothing.csv")
    monkeypatch.setenv("TWIN_SHARED_DATA", str(tmp_path / "absent"))
    with pytest.raises(TwinInputError, match="TWIN_SHARED_DATA"):
        shared_data_dir()


def test_cli_azure_and_errors(tmp_path, capsys):
    src = _write(tmp_path, "a.csv", AZURE_TINY)
    out = tmp_path / "o.parquet"
    assert cli_main(["trace", "azure", "--input", str(src), "--adapters", "3",
                     "--popularity", "powerlaw", "--alpha", "0.5", "--out", str(out)]) == 0
    df = read_trace(out)
    assert len(df) == 4 and df["adapter"].str.startswith("lora-").all()
    assert "4 requests" in capsys.readouterr().out
    csv = tmp_path / "o.csv"
    assert cli_main(["trace", "azure", "--input", str(src), "--out", str(csv)]) == 0
    assert read_trace(csv)["adapter"].isna().all()
    bad = _write(tmp_path, "bad.csv", AZURE_TINY.replace("12,3", "12,x"))
    assert cli_main(["trace", "azure", "--input", str(bad), "--out", str(out)]) == 2
    assert "row 2" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        cli_main(["trace", "--help"])
    text = capsys.readouterr().out
    for action in ("azure", "mooncake", "servegen", "rate-classes", "powerlaw"):
        assert action in text
    assert "TWIN_SHARED_DATA" in text


def test_bundled_traces_valid():
    names = ["azure_conv_1h", "azure_conv_1h_32lora", "servegen_32tenants_10min",
             "rate_classes_32_heavy_10min"]
    for name in names:
        path = REPO / "traces" / f"{name}.parquet"
        assert path.stat().st_size < 1_000_000
        df = read_trace(path)
        assert len(df) > 10000


# -- properties of the contract ---------------------------------------------------------------

_trace_rows = st.lists(st.tuples(st.floats(0, 100, allow_nan=False),
                                 st.integers(1, 5000), st.integers(1, 5000),
                                 st.sampled_from([None, "a", "b/c"])), min_size=2, max_size=40)


def _frame(rows, sort=True):
    t = np.array([r[0] for r in rows])
    if sort:
        t = np.sort(t)
    return pd.DataFrame({"arrival_s": t, "adapter": pd.array([r[3] for r in rows],
                                                               dtype="string"),
                         "prompt_tokens": [r[1] for r in rows],
                         "output_tokens": [r[2] for r in rows]})


@settings(max_examples=60, deadline=None)
@given(_trace_rows)
def test_validate_accepts_valid(rows):
    df = validate_trace(_frame(rows))
    assert df["request_id"].tolist() == list(range(len(rows)))
    assert df["prompt_tokens"].dtype == np.int32 and df["adapter"].dtype == "string"


@settings(max_examples=60, deadline=None)
@given(_trace_rows, st.data())
def test_validate_rejects_unsorted_at_first_bad_row(rows, data):
    df = _frame(rows)
    t = df["arrival_s"].to_numpy() + 100.0  # room to step back without going negative
    i = data.draw(st.integers(1, len(t) - 1))
    t[i] = t[i - 1] - data.draw(st.floats(0.001, 50))
    df["arrival_s"] = t
    expect = int(np.flatnonzero(np.diff(t) < 0)[0]) + 1
    with pytest.raises(TwinInputError) as e:
        validate_trace(df, source="x")
    assert (e.value.row, e.value.field) == (expect, "arrival_s")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 9000), st.integers(0, 900)),
                min_size=1, max_size=30))
def test_azure_loader_round_trips(rows):
    base = np.datetime64("2023-11-16T18:15:46.6805900")
    ns = np.sort(np.array([r[0] for r in rows], dtype=np.int64) * 100)  # 100-ns resolution
    stamps = (base + ns.astype("timedelta64[ns]")).astype(str)
    text = "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"{s.replace('T', ' ')},{r[1]},{r[2]}\n" for s, r in zip(stamps, rows))
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "a.csv"
        src.write_text(text)
        df = load_azure2023(src)
        np.testing.assert_allclose(df["arrival_s"], (ns - ns[0]) / 1e9, atol=1e-9)
        assert (df["prompt_tokens"] == np.maximum([r[1] for r in rows], 1)).all()
        back = read_trace(write_trace(df, Path(d) / "t.parquet"))
        pd.testing.assert_frame_equal(back, df)
        gz = Path(d) / "a.csv.gz"
        with gzip.open(gz, "wt") as fh:
            fh.write(text)
        pd.testing.assert_frame_equal(load_azure2023(gz), df)

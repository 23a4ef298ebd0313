"""Property tests over the trace, catalog and sweep-store loaders (issue 11, "How it is
checked"): for any mangled input the result is either success with exactly the values that
were written, or the project's TwinInputError naming the file -- never another exception,
never a changed value."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin.errors import TwinInputError
from twin.workload.catalog import AdapterCatalog
from twin.workload.schema import read_trace

FUZZ = settings(max_examples=15, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
COLS = ["request_id", "arrival_s", "adapter", "prompt_tokens", "output_tokens"]

# adapter names include ones pandas would read as null by default ("NA", "null", "nan")
names = st.one_of(st.sampled_from(["a", "NA", "null", "nan", "None", "lora-7", "ü", " x"]),
                  st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"),
                          min_size=1, max_size=6))


@st.composite
def traces(draw):
    n = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), min_size=n, max_size=n,
                        unique=True))
    gaps = draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=n, max_size=n))
    return pd.DataFrame({
        "request_id": np.array(ids, dtype=np.int64),
        "arrival_s": np.cumsum(gaps).astype(np.float64),
        "adapter": pd.array(draw(st.lists(st.none() | names, min_size=n, max_size=n)),
                            dtype="string"),
        "prompt_tokens": np.array(draw(st.lists(st.integers(1, 2 ** 31 - 1), min_size=n,
                                                max_size=n)), dtype=np.int32),
        "output_tokens": np.array(draw(st.lists(st.integers(1, 2 ** 31 - 1), min_size=n,
                                                max_size=n)), dtype=np.int32),
    })


# values injected into one cell: numbers in and out of range, NaN/inf, booleans, dates,
# durations, text (exact integers, fractions, junk), None
injected = st.one_of(
    st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.just(dt.datetime(2024, 1, 1)),
    st.just(dt.timedelta(seconds=3)), st.just(pd.Timestamp("2024-01-01")),
    st.integers(-(2 ** 70), 2 ** 70).map(str), st.floats().map(repr),
    st.sampled_from(["", " ", "1.0", "1e3", "0x10", "True", "12abc", "1_000", "NaN", "-inf"]))


def _intended(v, col, fmt):
    """The value a successful load must hold for an injected ``v`` (None: must be refused).
    A CSV holds the text pandas wrote (missing and NaN as an empty field)."""
    from decimal import Decimal, InvalidOperation

    if fmt == "csv":
        v = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
        if col == "adapter":
            return pd.NA if v == "" else v
    if col == "adapter" and (v is None or isinstance(v, float) and np.isnan(v)):
        return pd.NA   # null: the base model
    if v is None or isinstance(v, (bool, dt.datetime, dt.timedelta, pd.Timestamp)):
        return None
    if col == "adapter":
        if isinstance(v, str):
            return v
        return str(v) if isinstance(v, int) else None
    if col == "arrival_s":
        try:
            f = float(v.strip()) if isinstance(v, str) else float(v)
        except (ValueError, OverflowError):
            return None
        return f if np.isfinite(f) else None
    if isinstance(v, float):
        return int(v) if np.isfinite(v) and v == int(v) and abs(v) <= 2 ** 53 else None
    if isinstance(v, str):
        try:
            d = Decimal(v.strip())
        except InvalidOperation:
            return None
        return int(d) if d.is_finite() and d == d.to_integral_value() else None
    return int(v)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _stored(path: Path, row: int, col: str, v):
    """The injected cell as the file holds it: pyarrow converts while writing (False in a
    float column becomes 0.0), so the oracle is the stored value, not the injected one. A
    CSV holds ``str(v)``, which :func:`_intended` derives itself."""
    if path.suffix == ".csv":
        return v
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[col]).column(col)[row].as_py()


def _write(df: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)


def _expect_input_error(fn, path):
    try:
        return fn()
    except TwinInputError as exc:
        assert exc.file == str(path), str(exc)
        return None


def _same_cells(out: pd.DataFrame, ref: pd.DataFrame, skip=None):
    """Every cell of ``ref`` (except ``skip`` = (row, col)) equals the loaded one exactly."""
    assert len(out) == len(ref)
    for c in COLS:
        for i, (a, b) in enumerate(zip(out[c].tolist(), ref[c].tolist())):
            if (i, c) == skip:
                continue
            if c == "adapter" and (b is None or b is pd.NA or b == ""):
                assert a is pd.NA, (i, c, a, b)
            elif a is pd.NA:
                assert b is pd.NA, (i, c, a, b)
            else:
                assert a == b, (i, c, a, b)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@FUZZ
@given(df=traces(), data=st.data())
def test_trace_cell_injection(tmp_path, fmt, df, data):
    col = data.draw(st.sampled_from(COLS))
    row = data.draw(st.integers(0, len(df) - 1))
    v = data.draw(injected)
    bad = df.astype({c: object for c in COLS})
    bad.at[row, col] = v
    path = tmp_path / f"t.{fmt}"
    try:
        _write(bad, path)
    except Exception:   # a frame pyarrow cannot write is not a trace anyone has
        return
    out = _expect_input_error(lambda: read_trace(path), path)
    if out is None:
        return
    want = _intended(_stored(path, row, col, v), col, fmt)
    assert want is not None, f"{v!r} in {col} was accepted as {out[col].iloc[row]!r}"
    got = out[col].iloc[row]
    if col == "adapter" and (want is pd.NA or want == ""):
        assert got is pd.NA
    else:
        assert got == want, (v, got, want)
    _same_cells(out, df, skip=(row, col))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@FUZZ
@given(df=traces(), data=st.data())
def test_trace_column_mangling(tmp_path, fmt, df, data):
    how = data.draw(st.sampled_from(["drop", "rename", "as_float", "as_str", "as_int64",
                                     "as_bool", "as_datetime", "as_duration", "reverse"]))
    col = data.draw(st.sampled_from(COLS))
    if col == "adapter" and how in ("as_int64", "as_datetime", "as_duration"):
        how = "none"
    bad = df.copy()
    if how == "drop":
        bad = bad.drop(columns=[col])
    elif how == "rename":
        bad = bad.rename(columns={col: col.upper()})
    elif how == "as_float":
        bad[col] = pd.to_numeric(bad[col], errors="coerce").astype(np.float64)
    elif how == "as_str":
        bad[col] = bad[col].astype(str)
    elif how == "as_int64":
        bad[col] = bad[col].astype(np.int64)
    elif how == "as_bool":
        bad[col] = bad[col].notna()
    elif how == "as_datetime":
        bad[col] = pd.to_datetime(bad[col].astype(np.float64), unit="s", errors="coerce")
    elif how == "as_duration":
        bad[col] = pd.to_timedelta(bad[col].astype(np.float64), unit="s", errors="coerce")
    elif how == "reverse":
        bad = bad.iloc[::-1].reset_index(drop=True)
    path = tmp_path / f"t.{fmt}"
    try:
        _write(bad, path)
    except Exception:
        return
    out = _expect_input_error(lambda: read_trace(path), path)
    if out is None:
        return
    # success: only value-preserving mangles may get here
    ref = df
    if how == "drop" or how == "rename":
        assert col in ("request_id", "adapter"), f"{how} {col} was accepted"
        ref = df.copy()
        if col == "request_id":
            ref["request_id"] = np.arange(len(df), dtype=np.int64)
        else:
            ref["adapter"] = pd.array([None] * len(df), dtype="string")
    elif how == "reverse":
        ref = df.iloc[::-1].reset_index(drop=True)
    elif how in ("as_int64", "as_float") and col != "adapter":
        ref = df.copy()   # the writer's own conversion is what the file holds
        ref[col] = bad[col].tolist()
    elif col == "adapter" and how != "none":
        # the writer itself may have renamed adapters (floats, booleans, dates): the oracle
        # is what the file holds -- a CSV's text, a Parquet's all-null float column
        ref = df.copy()
        if fmt == "csv":
            text = pd.read_csv(path, dtype=str, keep_default_na=False)["adapter"]
            ref["adapter"] = pd.array([t if t else None for t in text], dtype="string")
        elif how == "as_str":
            ref["adapter"] = pd.array(bad["adapter"].tolist(), dtype="string")
        else:
            assert how == "as_float", f"{how} adapter was accepted"
            ref["adapter"] = pd.array([None] * len(df), dtype="string")
    _same_cells(out, ref)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@FUZZ
@given(df=traces(), data=st.data())
def test_trace_bytes_mangling(tmp_path, fmt, df, data):
    path = tmp_path / f"t.{fmt}"
    _write(df, path)
    raw = path.read_bytes()
    how = data.draw(st.sampled_from(["truncate", "empty", "latin1", "garbage_tail"]))
    if how == "truncate":
        cut = data.draw(st.integers(0, len(raw)))
        path.write_bytes(raw[:cut])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "latin1":
        try:
            enc = raw.decode("utf-8").encode("latin-1") if fmt == "csv" else raw
        except UnicodeEncodeError:
            return   # names latin-1 cannot hold: nothing to write
        if enc != raw and _is_utf8(enc):
            return   # latin-1 bytes that spell other UTF-8 text: the file says that text
        path.write_bytes(enc)
    else:
        path.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=16)))
    out = _expect_input_error(lambda: read_trace(path), path)
    if out is None:
        return
    if fmt == "parquet" or how == "latin1":   # latin-1 read: only an ASCII file, unchanged
        _same_cells(out, df)
    else:
        # a CSV cut or extended at a line end is another valid trace; the rows before the
        # last one read are the written ones exactly
        n = len(out)
        assert n <= len(df) + 1
        k = min(n, len(df)) - 1
        _same_cells(out.iloc[:k].reset_index(drop=True), df.iloc[:k].reset_index(drop=True))


# -- catalogs -----------------------------------------------------------------------------

@st.composite
def catalogs(draw):
    n = draw(st.integers(1, 5))
    ids = draw(st.lists(names, min_size=n, max_size=n, unique=True)
               .filter(lambda xs: all(x.strip() for x in xs)))
    ranks = draw(st.lists(st.integers(1, 2 ** 31 - 1), min_size=n, max_size=n))
    return pd.DataFrame({"adapter": pd.array(ids, dtype="string"),
                         "rank": np.array(ranks, dtype=np.int64)})


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@FUZZ
@given(cat=catalogs(), data=st.data())
def test_catalog_mangling(tmp_path, fmt, cat, data):
    how = data.draw(st.sampled_from(["inject", "drop", "truncate", "empty", "latin1"]))
    bad = cat.astype(object)
    col = data.draw(st.sampled_from(["adapter", "rank"]))
    row = data.draw(st.integers(0, len(cat) - 1))
    v = data.draw(injected)
    if how == "inject":
        bad.at[row, col] = v
    elif how == "drop":
        bad = bad.drop(columns=[col])
    path = tmp_path / f"c.{fmt}"
    try:
        _write(bad, path)
    except Exception:
        return
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[:data.draw(st.integers(0, len(raw)))])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "latin1" and fmt == "csv":
        try:
            enc = raw.decode("utf-8").encode("latin-1")
        except UnicodeEncodeError:
            return
        if enc != raw and _is_utf8(enc):
            return
        path.write_bytes(enc)
    out = _expect_input_error(lambda: AdapterCatalog.read(path), path)
    if out is None:
        return
    assert how != "drop" and how != "empty"
    got = out.table
    if how == "inject":
        want = _intended(_stored(path, row, col, v), col, fmt)
        assert want is not None, f"{v!r} in {col} was accepted as {got[col].iloc[row]!r}"
        assert got[col].iloc[row] == want
        keep = [i for i in range(len(cat)) if i != row]
        assert got[col].iloc[keep].tolist() == cat[col].iloc[keep].tolist()
        other = "rank" if col == "adapter" else "adapter"
        assert got[other].tolist() == cat[other].tolist()
    elif how == "truncate" and fmt == "csv":
        k = max(len(got) - 1, 0)   # rows before the last read are the written ones
        assert got["adapter"].iloc[:k].tolist() == cat["adapter"].iloc[:k].tolist()
        assert got["rank"].iloc[:k].tolist() == cat["rank"].iloc[:k].tolist()
    else:
        assert got["adapter"].tolist() == cat["adapter"].tolist()
        assert got["rank"].tolist() == cat["rank"].tolist()


# -- the sweep store ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    from twin.ml.spec import WorkloadSpec
    from twin.ml.sweep import plan, read_sweep, run_sweep

    spec = WorkloadSpec("rate_classes", dict(n_adapters=4, rates=[0.8, 0.3, 0.1], ranks=[8, 16],
                                             duration_s=60.0, lengths="uniform", seed=0))
    out = tmp_path_factory.mktemp("sweep") / "s"
    run_sweep(plan([spec], window_s=60.0), out, workers=1, progress=False, chunk_points=1)
    return out, read_sweep(out)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sweep_store_mangled_parts(small_sweep, data):
    from twin.ml.sweep import SweepStore, read_sweep

    src, ref = small_sweep
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "s"
        shutil.copytree(src, out)
        store = SweepStore(out)
        parts = store.part_files()
        hit = [parts[i] for i in sorted(data.draw(st.sets(st.integers(0, len(parts) - 1),
                                                           min_size=1)))]
        for p in hit:
            raw = p.read_bytes()
            how = data.draw(st.sampled_from(["truncate", "garbage", "empty"]))
            if how == "truncate":
                p.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
            elif how == "garbage":
                p.write_bytes(data.draw(st.binary(max_size=64)))
            else:
                p.write_bytes(b"")
        lost = len(store.done_keys())
        got = read_sweep(out)
        assert len(store.quarantined()) == len(hit)
        assert lost == len(got) == len(ref) - len(hit)
        if got.empty:
            return
        pd.testing.assert_frame_equal(got, ref[ref["key"].isin(got["key"])]
                                      .reset_index(drop=True))

"""The trace contract's optional prefix-caching columns: hash_ids with their block size,
session_id and turn (twin.workload.prefix_columns), through validation and Parquet."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twin.errors import TwinInputError
from twin.workload.schema import read_trace, validate_trace, write_trace


def _trace(block=16, **cols):
    df = pd.DataFrame({"arrival_s": [0.0, 1.0, 2.0], "adapter": ["a", "a", None],
                       "prompt_tokens": [20, 40, 5], "output_tokens": [10, 3, 1]})
    df["hash_ids"] = pd.Series([[1, 2], [1, 2, 3], [9]], dtype=object)
    for k, v in cols.items():
        df[k] = pd.Series(v, dtype=object) if k == "hash_ids" else v
    if block is not None:
        df.attrs["hash_block_size"] = block
    return df


def test_round_trip_keeps_hash_ids_block_size_and_sessions(tmp_path):
    df = _trace(session_id=[7, 7, 8], turn=[0, 1, 0])
    df["hash_ids"] = pd.Series([(1, 2), np.array([1, 2, 3]), [np.int64(9)]], dtype=object)
    path = write_trace(df, tmp_path / "t.parquet")
    back = read_trace(path)
    assert back.attrs["hash_block_size"] == 16
    assert back["hash_ids"].tolist() == [[1, 2], [1, 2, 3], [9]]
    assert all(type(x) is int for ids in back["hash_ids"] for x in ids)
    assert back["session_id"].tolist() == [7, 7, 8] and back["turn"].dtype == np.int32
    # a trace without the columns is read as before: the contract's five columns
    plain = read_trace(write_trace(df.drop(columns=["hash_ids", "session_id", "turn"]),
                                   tmp_path / "p.parquet"))
    assert list(plain.columns) == ["request_id", "arrival_s", "adapter", "prompt_tokens",
                                   "output_tokens"]


def test_hash_ids_without_block_size_names_the_file(tmp_path):
    with pytest.raises(TwinInputError) as e:
        validate_trace(_trace(block=None), source="x.parquet")
    assert e.value.file == "x.parquet" and e.value.field == "hash_block_size"
    # a Parquet file written by another tool without the block size (pandas' own
    # to_parquet keeps df.attrs, and read_trace reads them back)
    path = tmp_path / "other.parquet"
    _trace(block=None).to_parquet(path)
    _trace().to_parquet(tmp_path / "pandas.parquet")
    assert read_trace(tmp_path / "pandas.parquet").attrs["hash_block_size"] == 16
    with pytest.raises(TwinInputError) as e:
        read_trace(path)
    assert e.value.file == str(path) and "block size" in str(e.value)


@pytest.mark.parametrize("ids, row, words", [
    ([[1, 2], [1, 2], [9]], 1, "do not cover"),           # 2 * 16 < 40 prompt tokens
    ([[1, 2], [1, 2, 3, 4, 5], [9]], 1, "more than"),     # 5 > ceil(43 / 16) = 3
    ([[1, 2], [1, 2.5, 3], [9]], 1, "integers"),
    ([[1, 2], [1, True, 3], [9]], 1, "integers"),
    ([[1, 2], [1, 2, 2 ** 64], [9]], 1, "from 0 to 2^61 - 2"),
    # ids the prefix cache could not tell apart (Python hashes -1 as -2, and an id n as
    # n modulo 2^61 - 1): refused rather than counted as hits
    ([[1, 2], [1, -1, 3], [9]], 1, "from 0 to 2^61 - 2"),
    ([[1, 2], [9], [1, 2 ** 61 - 1]], 2, "from 0 to 2^61 - 2"),
    ([[1, 2], "1,2,3", [9]], 1, "list"),
])
def test_bad_hash_ids_name_row_and_field(ids, row, words):
    with pytest.raises(TwinInputError) as e:
        validate_trace(_trace(hash_ids=ids), source="t")
    assert (e.value.row, e.value.field) == (row, "hash_ids")
    assert words in str(e.value)


def test_null_hash_ids_are_requests_that_share_nothing(tmp_path):
    df = validate_trace(_trace(hash_ids=[[1, 2], None, [9]]))
    assert df["hash_ids"].tolist() == [[1, 2], None, [9]]
    back = read_trace(write_trace(df, tmp_path / "n.parquet"))
    assert back["hash_ids"].tolist() == [[1, 2], None, [9]]


def test_bad_block_size():
    with pytest.raises(TwinInputError, match="positive integer"):
        validate_trace(_trace(block=0))


def test_sessions_need_both_columns_and_increasing_turns():
    with pytest.raises(TwinInputError) as e:
        validate_trace(_trace(session_id=[1, 1, 2]))
    assert e.value.field == "turn"
    with pytest.raises(TwinInputError) as e:
        validate_trace(_trace(session_id=[1, 1, 2], turn=[1, 0, 0]))
    assert (e.value.row, e.value.field) == (1, "turn")
    with pytest.raises(TwinInputError) as e:
        validate_trace(_trace(session_id=[1, 1, 2], turn=[0, -1, 0]))
    assert e.value.field == "turn"


def test_csv_trace_with_hash_ids_is_refused_for_its_missing_block_size(tmp_path):
    path = tmp_path / "t.csv"
    _trace().to_csv(path, index=False)
    with pytest.raises(TwinInputError) as e:
        read_trace(path)
    assert e.value.field == "hash_block_size" and e.value.file == str(path)

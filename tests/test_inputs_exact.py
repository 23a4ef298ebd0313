"""Traces and catalogs are read exactly or refused; the sweep store heals (issue 11, 4/7/8).

Each test here names a defect of the old loaders: ids through float64, datetimes read as
nanoseconds, booleans read as 1, int32 overflow wrapping, "NA" adapters turned null, empty
traces reaching the engines, catalog files raising raw pyarrow/pandas errors, and a
truncated sweep part blocking resume and ``read_sweep``.
"""

from __future__ import annotations

import pandas as pd
import pytest

from twin.cli import main as cli_main
from twin.errors import TwinInputError
from twin.ml.spec import WorkloadSpec
from twin.ml.sweep import SweepStore, comparable, plan, read_sweep, run_sweep
from twin.workload.catalog import AdapterCatalog
from twin.workload.schema import read_trace, validate_trace

HEADER = "request_id,arrival_s,adapter,prompt_tokens,output_tokens\n"
BIG = 2 ** 53   # the first integer above which float64 skips integers


def _csv(tmp_path, body, name="t.csv", header=HEADER):
    p = tmp_path / name
    p.write_text(header + body)
    return p


def _frame(**cols):
    base = dict(request_id=[1, 2], arrival_s=[0.0, 1.0], adapter=["a", None],
                prompt_tokens=[5, 6], output_tokens=[7, 8])
    base.update(cols)
    return pd.DataFrame(base)


# -- traces -------------------------------------------------------------------------------

def test_request_ids_above_2_53_are_exact_in_csv(tmp_path):
    ids = [BIG + 1, BIG + 3, 2 ** 63 - 1]
    p = _csv(tmp_path, "".join(f"{i},{k}.5,a,5,6\n" for k, i in enumerate(ids)))
    assert read_trace(p)["request_id"].tolist() == ids


def test_request_ids_above_2_53_are_exact_in_parquet(tmp_path):
    ids = [BIG + 1, BIG + 3]
    p = tmp_path / "t.parquet"
    _frame(request_id=ids).to_parquet(p, index=False)
    assert read_trace(p)["request_id"].tolist() == ids


def test_neighbouring_big_ids_are_not_duplicates_and_real_duplicates_name_both_rows(tmp_path):
    assert validate_trace(_frame(request_id=[BIG, BIG + 1]))["request_id"].tolist() == [
        BIG, BIG + 1]
    with pytest.raises(TwinInputError, match=f"duplicate request_id {BIG + 1} \\(also at "
                                             "row 0\\)") as e:
        validate_trace(_frame(request_id=[BIG + 1, BIG + 1]), source="x")
    assert (e.value.file, e.value.row, e.value.field) == ("x", 1, "request_id")


def test_datetime_and_duration_arrivals_are_refused(tmp_path):
    p = tmp_path / "t.parquet"
    _frame(arrival_s=pd.to_datetime(["2024-01-01", "2024-01-02"])).to_parquet(p, index=False)
    with pytest.raises(TwinInputError, match="seconds from the trace start") as e:
        read_trace(p)
    assert (e.value.file, e.value.row, e.value.field) == (str(p), 0, "arrival_s")
    with pytest.raises(TwinInputError, match="seconds from the trace start"):
        validate_trace(_frame(arrival_s=pd.to_timedelta([0, 1], unit="s")))


def test_a_column_given_twice_is_refused():
    f = _frame()
    for twice in (pd.concat([f, f[["adapter"]]], axis=1),          # an extra copy
                  pd.concat([f, f[["prompt_tokens"]]], axis=1),    # of a canonical column
                  f.set_axis(["request_id", "arrival_s", "adapter", "prompt_tokens",
                              "prompt_tokens"], axis=1)):          # two names alike
        with pytest.raises(TwinInputError, match="more than once") as e:
            validate_trace(twice, source="mine")
        assert e.value.file == "mine"


@pytest.mark.parametrize("col", ["prompt_tokens", "output_tokens"])
def test_boolean_token_counts_are_refused(col):
    with pytest.raises(TwinInputError, match="boolean") as e:
        validate_trace(_frame(**{col: [True, True]}), source="x")
    assert (e.value.row, e.value.field) == (0, col)


def test_boolean_text_is_not_a_count_in_object_columns():
    with pytest.raises(TwinInputError, match="boolean"):
        validate_trace(_frame(prompt_tokens=pd.Series([5, True], dtype=object)))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_int32_overflow_reports_the_original_value(tmp_path, fmt):
    over = 2 ** 32 + 5   # wraps to 5 as int32
    if fmt == "csv":
        p = _csv(tmp_path, f"1,0.0,a,{over},6\n")
    else:
        p = tmp_path / "t.parquet"
        _frame(prompt_tokens=[over, 5]).to_parquet(p, index=False)
    with pytest.raises(TwinInputError, match=f"got {over}, at most 2147483647") as e:
        read_trace(p)
    assert (e.value.row, e.value.field) == (0, "prompt_tokens")


def test_csv_adapter_named_like_a_null_keeps_its_name(tmp_path):
    p = _csv(tmp_path, "1,0.0,NA,5,6\n2,0.5,null,5,6\n3,1.0,,5,6\n")
    assert read_trace(p)["adapter"].tolist()[:2] == ["NA", "null"]
    assert read_trace(p)["adapter"].isna().tolist() == [False, False, True]


def test_whitespace_only_adapter_is_refused_at_its_trace_row(tmp_path, capsys):
    """Not at the default catalog's row 0, as it was: the user's file and row."""
    p = _csv(tmp_path, "1,0.0,a,5,6\n2,0.5,\"  \",5,6\n3,1.0,b,5,6\n")
    with pytest.raises(TwinInputError, match="only whitespace") as e:
        read_trace(p)
    assert (e.value.row, e.value.field) == (1, "adapter") and "t.csv" in str(e.value)
    assert cli_main(["simulate", "--trace", str(p), "--no-progress"]) == 2
    assert "t.csv, row 1, field 'adapter'" in capsys.readouterr().err


def test_a_trace_specs_relative_paths_are_read_beside_the_spec(tmp_path, monkeypatch):
    """A spec kept with its trace works from any working directory; a path that exists only
    from the working directory (the old reading) still does; the catalog's unknown adapter
    is named at the trace's file and row."""
    from twin.ml.spec import load_workloads_yaml

    folder = tmp_path / "specs"
    folder.mkdir()
    _csv(folder, "1,0.0,a,5,6\n2,0.5,b,5,6\n")
    (folder / "cat.csv").write_text("adapter,rank\na,8\n")
    (folder / "w.yaml").write_text("family: trace\npath: t.csv\ncatalog: cat.csv\n")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = WorkloadSpec.from_yaml(folder / "w.yaml")
    assert spec.params["path"] == str(folder / "t.csv")
    assert [s.params["catalog"] for s in load_workloads_yaml(folder / "w.yaml")] == [
        str(folder / "cat.csv")]
    trace, catalog = spec.build()
    with pytest.raises(TwinInputError, match="unknown adapter 'b'") as e:
        catalog.check(trace, 512, spec.params["path"])
    assert (e.value.row, e.value.field) == (1, "adapter")
    assert cli_main(["recommend", "--workload-spec", str(folder / "w.yaml"),
                     "--out", str(tmp_path / "rec")]) == 2
    monkeypatch.chdir(tmp_path)   # the old reading: relative to the working directory
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "old.yaml").write_text("family: trace\npath: specs/t.csv\n")
    assert WorkloadSpec.from_yaml(tmp_path / "sub" / "old.yaml").params["path"] == "specs/t.csv"


def test_parquet_written_by_pandas_from_a_filtered_frame_reads(tmp_path):
    """``df[mask].to_parquet(p)`` stores pandas' index as ``__index_level_0__`` with
    metadata naming it: read as the same trace as the frame (it was a cryptic KeyError)."""
    frame = pd.DataFrame({"request_id": [10, 11, 12, 13], "arrival_s": [0.0, 1.0, 2.0, 3.0],
                          "adapter": ["a", None, "b", "a"], "prompt_tokens": [5, 6, 7, 8],
                          "output_tokens": [1, 2, 3, 4]})
    part = frame[frame["prompt_tokens"] > 5]
    part.to_parquet(tmp_path / "f.parquet")
    got = read_trace(tmp_path / "f.parquet")
    assert "__index_level_0__" not in got.columns
    assert got["request_id"].tolist() == [11, 12, 13]
    assert got.equals(validate_trace(part.reset_index(drop=True)))
    part.set_index("request_id").to_parquet(tmp_path / "named.parquet")   # a named index
    assert read_trace(tmp_path / "named.parquet")["request_id"].tolist() == [11, 12, 13]


def test_non_integral_text_ids_are_refused_not_rounded(tmp_path):
    p = _csv(tmp_path, f"{BIG + 1}.5,0.0,a,5,6\n")
    with pytest.raises(TwinInputError, match="fraction") as e:
        read_trace(p)
    assert (e.value.row, e.value.field) == (0, "request_id")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_empty_trace_is_refused(tmp_path, fmt):
    if fmt == "csv":
        p = _csv(tmp_path, "")
    else:
        p = tmp_path / "t.parquet"
        _frame().iloc[:0].to_parquet(p, index=False)
    with pytest.raises(TwinInputError, match="no requests") as e:
        read_trace(p)
    assert e.value.file == str(p)


@pytest.mark.parametrize("command", [["simulate"], ["compare"], ["place"]])
def test_commands_on_an_empty_trace_print_one_line(tmp_path, capsys, command):
    p = _csv(tmp_path, "")
    rc = cli_main(command + ["--trace", str(p), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "no requests" in err and str(p) in err


# -- catalogs -----------------------------------------------------------------------------

def _bad_catalog(tmp_path, case):
    if case == "corrupt_parquet":
        p = tmp_path / "c.parquet"
        p.write_bytes(b"PAR1" + b"\x00" * 64)
    elif case == "zero_bytes":
        p = tmp_path / "c.parquet"
        p.write_bytes(b"")
    elif case == "latin1":
        p = tmp_path / "c.csv"
        p.write_bytes("adapter,rank\ncaf\xe9,8\n".encode("latin-1"))
    elif case == "directory":
        p = tmp_path / "c.csv"
        p.mkdir()
    return p


@pytest.mark.parametrize("case", ["corrupt_parquet", "zero_bytes", "latin1", "directory"])
def test_unreadable_catalog_files_are_input_errors(tmp_path, case):
    p = _bad_catalog(tmp_path, case)
    with pytest.raises(TwinInputError) as e:
        AdapterCatalog.read(p)
    assert e.value.file == str(p)


@pytest.mark.parametrize("rank, why", [("True", "boolean"), ("99999999999999999999",
                                                             "99999999999999999999"),
                                       ("8.5", "fraction"), ("", "empty")])
def test_catalog_ranks_are_exact_integers_in_range(tmp_path, rank, why):
    p = tmp_path / "c.parquet"
    col = [True] if rank == "True" else [rank]
    pd.DataFrame({"adapter": ["a"], "rank": col}).to_parquet(p, index=False)
    with pytest.raises(TwinInputError, match=why) as e:
        AdapterCatalog.read(p)
    assert (e.value.file, e.value.row, e.value.field) == (str(p), 0, "rank")


def test_catalog_empty_adapter_id_is_refused(tmp_path):
    p = tmp_path / "c.parquet"
    pd.DataFrame({"adapter": ["a", " "], "rank": [8, 16]}).to_parquet(p, index=False)
    with pytest.raises(TwinInputError, match="empty") as e:
        AdapterCatalog.read(p)
    assert (e.value.row, e.value.field) == (1, "adapter")


# -- the sweep store ----------------------------------------------------------------------

WINDOW = 60.0


def _tasks():
    spec = WorkloadSpec("rate_classes", dict(n_adapters=4, rates=[0.8, 0.3, 0.1], ranks=[8, 16],
                                             duration_s=WINDOW, lengths="uniform", seed=0))
    return plan([spec], window_s=WINDOW)


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes"])
def test_damaged_part_is_quarantined_and_redone(tmp_path, capsys, damage):
    tasks = _tasks()
    out = tmp_path / "s"
    run_sweep(tasks, out, workers=1, progress=False, chunk_points=1)
    store = SweepStore(out)
    parts = store.part_files()
    assert len(parts) == len(tasks) >= 2
    ref = comparable(read_sweep(out))
    bad = parts[1]
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"")
    capsys.readouterr()

    partial = read_sweep(out)   # the other parts are still read
    err = capsys.readouterr().err
    assert err.count("unreadable") == 1 and bad.name in err
    assert len(partial) == len(tasks) - 1
    assert store.quarantined() == [bad.with_name(bad.name + ".corrupt")]
    pd.testing.assert_frame_equal(comparable(partial),
                                  ref[ref["key"].isin(partial["key"])].reset_index(drop=True))
    read_sweep(out)
    assert "unreadable" not in capsys.readouterr().err   # reported once

    rep = run_sweep(tasks, out, workers=1, progress=False, chunk_points=1)
    assert (rep.ran, rep.skipped) == (1, len(tasks) - 1)
    pd.testing.assert_frame_equal(comparable(read_sweep(out)), ref)


def test_leftover_temp_parts_are_cleaned_on_resume(tmp_path):
    tasks = _tasks()
    out = tmp_path / "s"
    run_sweep(tasks[:1], out, workers=1, progress=False)
    parts = SweepStore(out).parts
    # a writer killed mid-write: the old name and one naming a process that is gone
    left = [parts / ".tmp-part-00000000000000000001-deadbeef.parquet",
            parts / ".tmp-999999999-part-00000000000000000002-deadbeef.parquet"]
    for p in left:
        p.write_bytes(b"PAR1 half a part")
    run_sweep(tasks, out, workers=1, progress=False)
    assert not any(p.exists() for p in left)
    assert len(read_sweep(out)) == len(tasks)


def test_public_loader_refuses_boolean_token_counts(tmp_path):
    from twin.workload.public import load_mooncake

    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": true, "output_length": 5}\n'
                 '{"timestamp": 10, "input_length": true, "output_length": 7}\n')
    with pytest.raises(TwinInputError, match="boolean") as e:
        load_mooncake(p)
    assert (e.value.file, e.value.row, e.value.field) == (str(p), 0, "input_length")

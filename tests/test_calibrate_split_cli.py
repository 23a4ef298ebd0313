"""``twin calibrate --executor --policy split`` end to end (issue 19): the tiny model's
split mode on the quick calibration design, the split-costs JSON it writes, and
``twin compare --policies split --split-costs`` simulating with it; the refusals."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest

from twin.calibrate.split_design import CALIBRATION, calibration_workloads, workload
from twin.calibrate.split_fit import SCHEMA, load_split_costs
from twin.cli import main
from twin.costs.profile import load_profile
from twin.errors import TwinInputError
from twin.workload.catalog import AdapterCatalog

CAT = AdapterCatalog(pd.DataFrame({"adapter": ["a0", "a1", "a2", "a3"],
                                   "rank": [8, 16, 8, 16]}))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The quick split calibration of the tiny model (two executor runs, ~50 s)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("splitcal") / "split-tiny.json"
    rc = main(["calibrate", "--executor", "--policy", "split", "--model", "tiny", "--quick",
               "--clients-max", "2", "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture()
def trace_files(tmp_path):
    trace = tmp_path / "t.csv"
    workload(CAT, "t", 2, 20, 5.0, (8, 64), (8, 24), 0.2, 1).to_csv(trace, index=False)
    catalog = tmp_path / "catalog.csv"
    pd.DataFrame({"adapter": CAT.adapters, "rank": [8, 16, 8, 16]}).to_csv(catalog,
                                                                            index=False)
    return trace, catalog


def test_writes_split_costs_that_load(fitted):
    d = json.loads(fitted.read_text())
    assert d["schema"] == SCHEMA and d["model"] == "tiny-llama" and d["quick"] is True
    assert d["workloads"] == [w[0] for w in CALIBRATION] and d["runs"] == 2
    costs = load_split_costs(fitted, load_profile("cpu-tiny").model)
    # the base's per-request time is one of fit_base_overhead's grid: within [0, 2 x the
    # link's latency before it was taken out] (h/2 moved from the link's latency)
    h = costs.base.per_request
    assert 0.0 <= h <= 2 * (costs.link.latency_s + h / 2) + 1e-12
    assert costs.link.bytes_per_s > 0 and costs.notes["client_steps"] > 0
    assert all(v >= 0 for v in costs.local.base.values())
    assert not list(fitted.parent.glob(".*.tmp*"))   # written atomically, nothing left


def _split_ttft(trace, catalog, out, *extra) -> float:
    rc = main(["compare", "--trace", str(trace), "--catalog", str(catalog),
               "--policies", "vllm,split", "--clients", "2", "--max-loras", "4",
               "--max-lora-rank", "16", "--max-model-len", "256", "--json",
               "--out", str(out), *map(str, extra)])
    assert rc == 0
    table = pd.read_csv(out / "table.csv")
    return float(table.set_index("policy").loc["split", "ttft_p50_ms"])


def test_compare_simulates_split_with_the_costs(fitted, trace_files, tmp_path, capsys):
    trace, catalog = trace_files
    # on the profile of the model it was fitted on (cpu-tiny: tiny-llama's shape)
    tiny = ("--profile", "cpu-tiny")
    with_costs = _split_ttft(trace, catalog, tmp_path / "a", *tiny, "--split-costs", fitted)
    without = _split_ttft(trace, catalog, tmp_path / "b", *tiny)
    assert with_costs != without   # the fitted costs, not the profile's, priced it
    got = capsys.readouterr()
    assert "was fitted on" not in got.out + got.err
    # on another model's profile (the default 8B): its shape at the tiny's per-layer costs,
    # with a note; the tiny's pipe carrying the 8B's activations is slower than the 8B's
    big = _split_ttft(trace, catalog, tmp_path / "c", "--split-costs", fitted)
    assert big > _split_ttft(trace, catalog, tmp_path / "d")
    got = capsys.readouterr()
    assert "fitted on tiny-llama" in got.out + got.err


def test_refusals(trace_files, tmp_path, capsys):
    trace, _ = trace_files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": SCHEMA, "base_ops": {}}))
    with pytest.raises(TwinInputError, match="base op 'embed'"):
        load_split_costs(bad, load_profile("cpu-tiny").model)
    bad.write_text(json.dumps({"schema": SCHEMA, "base_ops": {"embed": "x"}}))
    with pytest.raises(TwinInputError, match="malformed split costs"):
        load_split_costs(bad, load_profile("cpu-tiny").model)
    cmd = ["compare", "--trace", str(trace), "--out", str(tmp_path / "c")]
    assert main(cmd + ["--policies", "vllm", "--split-costs", str(bad)]) == 2
    assert "only the split policy" in capsys.readouterr().err
    cal = ["calibrate", "--executor", "--policy", "split", "--out"]
    assert main(cal + [str(tmp_path / "s.json"), "--dtype", "bfloat16"]) == 2
    assert "--dtype" in capsys.readouterr().err
    assert main(cal + [str(tmp_path / "s.csv")]) == 2
    assert "give --out NAME.json" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_calibration_workloads():
    assert calibration_workloads() == CALIBRATION
    three = calibration_workloads(3)
    assert [w[1] for w in three] == [1, 2, 3] and len({w[-1] for w in three}) == 3
    quick = calibration_workloads(2, quick=True)
    assert all(q[2] < w[2] for q, w in zip(quick, CALIBRATION))
    assert [w[1] for w in calibration_workloads(1)] == [1]
    with pytest.raises(TwinInputError):
        calibration_workloads(0)

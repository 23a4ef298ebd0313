"""`twin sweep`'s guards: each workload's own window by default (a window past a workload
refused), a re-run into a store swept with other settings refused, an empty grid refused."""

from __future__ import annotations

import json

import pytest
import yaml

from twin.errors import TwinInputError
from twin.ml.spec import WorkloadSpec, load_workloads_yaml
from twin.ml.sweep import SweepStore, plan, spec_window
from twin.ml.train import sample_workloads
from twin.workload.generate import rate_class_trace

PROFILE = "llama31-8b-h100-64gb-first-principles"   # pinned: stable shipped profile


def _spec(duration_s, seed=0, n=4):
    return WorkloadSpec("rate_classes", dict(n_adapters=n, rates=[0.8, 0.3], ranks=[8],
                                             duration_s=duration_s, lengths="uniform",
                                             seed=seed))


def test_default_window_is_each_workloads_duration():
    specs = [_spec(60.0), _spec(120.0, seed=1)]
    tasks = plan(specs, profile=PROFILE)
    assert {t.spec.key: t.window_s for t in tasks} == {specs[0].key: 60.0,
                                                       specs[1].key: 120.0}
    # the same keys as the window given explicitly: stored points stay comparable
    for s in specs:
        assert ([t.key for t in tasks if t.spec.key == s.key]
                == [t.key for t in plan([s], window_s=s.duration_s, profile=PROFILE)])


def test_window_past_a_workload_refused_naming_file_spec_and_duration():
    specs = [_spec(600.0), _spec(120.0, seed=1)]
    with pytest.raises(TwinInputError) as e:
        plan(specs, window_s=3600.0, profile=PROFILE, source="w.yaml")
    msg = str(e.value)
    assert "w.yaml" in msg and specs[0].describe() in msg and "600" in msg
    assert e.value.field == "--window-s"
    # within the margin (60 s or 10% past): accepted, as the other commands accept it
    assert {t.window_s for t in plan([_spec(120.0)], window_s=170.0, profile=PROFILE)} \
        == {170.0}


def test_trace_workload_window(tmp_path):
    tp = tmp_path / "t.parquet"
    rate_class_trace(4, (0.5,), duration_s=300.0, seed=3).to_parquet(tp)
    spec = WorkloadSpec("trace", {"path": str(tp)})
    assert spec_window(spec) is None   # shorter than 3600 s: to its last request
    with pytest.raises(TwinInputError, match="past the trace"):
        plan([spec], window_s=3600.0, profile=PROFILE, source="w.yaml")
    assert spec_window(spec, 300.0) == 300.0


def test_train_sampled_workloads_unaffected():
    specs = sample_workloads(3, seed=5, window_s=120.0)
    a = plan(specs, window_s=120.0, profile=PROFILE)
    assert [t.key for t in a] == [t.key for t in plan(specs, profile=PROFILE)]


def _cli(*argv):
    from twin.cli import main

    return main(["sweep", *map(str, argv)])


@pytest.fixture
def small_store(tmp_path):
    wl = tmp_path / "w.yaml"
    wl.write_text(yaml.safe_dump(_spec(40.0).to_dict()))
    out = tmp_path / "s"
    base = ["--workloads", wl, "--out", out, "--slots", "1", "--workers", "1",
            "--no-progress", "--profile", PROFILE]
    assert _cli(*base) == 0
    return base, out


def test_cli_window_past_workload_refused_before_any_run(tmp_path, capsys):
    wl = tmp_path / "w.yaml"
    wl.write_text(yaml.safe_dump([_spec(120.0).to_dict()]))
    out = tmp_path / "s"
    assert _cli("--workloads", wl, "--out", out, "--window-s", 3600, "--slots", 1,
                "--workers", 1, "--no-progress") == 2
    err = capsys.readouterr().err
    assert str(wl) in err and "duration_s 120" in err and "--window-s" in err
    assert not SweepStore(out).part_files()


@pytest.mark.parametrize("change, named", [
    (["--no-early-exit"], "early exit"),
    (["--window-s", "30"], "--window-s"),
    (["--profile", "llama31-8b-h100-64gb"], "--profile")])
def test_cli_rerun_with_other_settings_refused(small_store, capsys, change, named):
    base, out = small_store
    meta = (out / "sweep.json").read_text()
    parts = SweepStore(out).part_files()
    args = list(base)
    if change[0] == "--profile":
        args = args[:-2]
    capsys.readouterr()
    assert _cli(*args, *change) == 2
    err = capsys.readouterr().err
    assert named in err and "new --out" in err and "sweep.json" in err
    assert (out / "sweep.json").read_text() == meta
    assert SweepStore(out).part_files() == parts


def test_cli_compatible_rerun_resumes(small_store, capsys):
    base, out = small_store
    assert json.loads((out / "sweep.json").read_text())["window_s"] == "duration_s"
    capsys.readouterr()
    assert _cli(*base) == 0
    assert "2 already done, 0 run" in capsys.readouterr().out


@pytest.mark.parametrize("grid", [{"n_adapters": []}, {"seed": [0, 1], "n_adapters": []}])
def test_empty_grid_list_refused(tmp_path, capsys, grid):
    wl = tmp_path / "w.yaml"
    wl.write_text(yaml.safe_dump([_spec(60.0).to_dict(), {**_spec(60.0).to_dict(),
                                                          "grid": grid}]))
    with pytest.raises(TwinInputError) as e:
        load_workloads_yaml(wl)
    assert (e.value.file, e.value.row, e.value.field) == (str(wl), 1, "grid.n_adapters")
    assert "non-empty" in str(e.value)
    out = tmp_path / "s"
    assert _cli("--workloads", wl, "--out", out, "--no-progress") == 2
    assert "grid.n_adapters" in capsys.readouterr().err and not SweepStore(out).part_files()

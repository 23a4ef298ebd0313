"""Outputs never destroy a user's files; ``--json`` prints one JSON document (issue 11, items
1 and 9). Every writing command goes through twin.outputs: dangerous or foreign ``--out``
destinations are refused before any work with the user's files intact, a command re-runs
into its own previous output, concurrent writers get a clear error, failed writes leave no
temporary behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twin import outputs
from twin.cli import main
from twin.errors import TwinInputError

ROOT = Path(__file__).resolve().parents[1]


def small_trace(n=40, adapters=3, seed=0, span=10.0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "arrival_s": np.sort(rng.uniform(0, span, n)),
        "adapter": [f"a{i}" for i in rng.integers(0, adapters, n)],
        "prompt_tokens": rng.integers(4, 200, n),
        "output_tokens": rng.integers(1, 50, n)})


@pytest.fixture
def trace(tmp_path):
    p = tmp_path / "data" / "t.csv"
    p.parent.mkdir()
    small_trace().to_csv(p, index=False)
    return p


@pytest.fixture
def engine_calls(monkeypatch):
    """Counts twin simulations (the long work a bad --out must not wait for). The count is
    taken on the simulator's run object, which every path to a simulation constructs (the
    CLI, the API, the policies' dispatch), so no caller's own binding of a function can
    hide one."""
    from twin.sim import engine

    calls = []
    real = engine._Clock.__init__

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(engine._Clock, "__init__", counted)
    return calls


def test_engine_calls_sees_a_simulation(tmp_path, trace, engine_calls):
    """The counter the refusal tests rely on does count a simulation that runs."""
    assert main(simulate_args(trace, tmp_path / "run")) == 0
    assert engine_calls == [1]


def simulate_args(trace, out, *more):
    return ["simulate", "--trace", str(trace), "--max-loras", "2", "--max-cpu-loras", "3",
            "--no-progress", "--out", str(out), *more]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(d: Path) -> list:
    return [p.name for p in d.rglob("*") if p.name.endswith((".tmp", outputs.LOCK_SUFFIX))
            or ".tmp." in p.name]


# -- dangerous destinations ---------------------------------------------------------------

@pytest.mark.parametrize("out", ["", ".", ".."])
def test_cwd_and_parent_refused_files_intact(tmp_path, trace, monkeypatch, capsys,
                                             engine_calls, out):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    assert main(simulate_args(trace, out)) == 2
    err = capsys.readouterr().err
    assert "error" in err and "--out" in err and "Traceback" not in err
    assert engine_calls == [] and snapshot(tmp_path) == before


def test_home_refused(tmp_path, trace, monkeypatch, capsys, engine_calls):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    assert main(simulate_args(trace, home)) == 2
    assert main(simulate_args(trace, "~")) == 2
    assert "home directory" in capsys.readouterr().err
    assert engine_calls == [] and (home / ".bashrc").read_text() == "mine"


def test_ancestor_of_the_trace_refused(tmp_path, trace, capsys, engine_calls):
    before = snapshot(tmp_path)
    assert main(simulate_args(trace, trace.parent)) == 2
    assert "input" in capsys.readouterr().err
    assert engine_calls == [] and snapshot(tmp_path) == before


def test_dir_with_user_file_refused(tmp_path, trace, capsys, engine_calls):
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(simulate_args(trace, mine)) == 2
    assert "not a twin output" in capsys.readouterr().err
    assert engine_calls == [] and [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_failed_run_leaves_no_folders_behind(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    small_trace().assign(prompt_tokens=-1).to_csv(bad, index=False)
    assert main(simulate_args(bad, tmp_path / "new" / "deep" / "run")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_existing_plain_file_refused(tmp_path, trace, capsys, engine_calls):
    f = tmp_path / "result"
    f.write_text("mine")
    assert main(simulate_args(trace, f)) == 2
    assert "is a file" in capsys.readouterr().err
    assert engine_calls == [] and f.read_text() == "mine"


def test_twin_output_of_another_kind_refused(tmp_path, trace, capsys):
    out = tmp_path / "run"
    assert main(simulate_args(trace, out)) == 0
    before = snapshot(out)
    assert main(["compare", "--trace", str(trace), "--policies", "vllm", "--max-loras", "2",
                 "--out", str(out)]) == 2
    assert "holds a twin 'simulate' output" in capsys.readouterr().err
    assert snapshot(out) == before


def test_unwritable_parent_refused_before_simulating(tmp_path, trace, capsys, engine_calls):
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    assert main(simulate_args(trace, blocker / "run")) == 2
    assert "not a directory" in capsys.readouterr().err
    assert engine_calls == [] and blocker.read_text() == "mine"


def test_unwritable_parent_by_permissions(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(outputs.os, "access",
                        lambda p, m: False if Path(p) == ro else real(p, m))
    with pytest.raises(TwinInputError, match="not writable"):
        outputs.check_out(ro / "sub" / "run", "simulate")


# -- own outputs, empty dirs, --json ------------------------------------------------------

def test_rerun_into_own_output_and_empty_dir(tmp_path, trace, capsys):
    out = tmp_path / "run"
    out.mkdir()                                     # an empty directory may be used
    assert main(simulate_args(trace, out)) == 0
    assert outputs.output_kind(out) == "simulate"
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask     # not a temp dir's 0700
    assert main(simulate_args(trace, out, "--max-loras", "1")) == 0
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["config"]["max_loras"] == 1
    assert leftovers(tmp_path) == []


def test_rerun_refuses_an_output_holding_the_users_files(tmp_path, trace, capsys,
                                                        engine_calls):
    """A previous output of the same kind is replaced only while it holds just what twin
    wrote there: a note the user added beside it, a folder of plots, or a nested output
    makes the rerun refuse before any work, and every one of them stays."""
    out = tmp_path / "run"
    assert main(simulate_args(trace, out)) == 0
    assert outputs.foreign_entries(out) == []
    (out / "analysis.md").write_text("my notes")
    (out / "plots").mkdir()
    (out / "plots" / "fig.png").write_bytes(b"x")
    before = len(engine_calls)
    assert main(simulate_args(trace, out, "--max-loras", "1")) == 2
    assert "analysis.md" in capsys.readouterr().err
    assert len(engine_calls) == before                     # refused before simulating
    assert (out / "analysis.md").read_text() == "my notes"
    assert (out / "plots" / "fig.png").read_bytes() == b"x"
    assert outputs.foreign_entries(out) == ["analysis.md", "plots", "plots/fig.png"]
    (out / "analysis.md").unlink()
    (out / "plots" / "fig.png").unlink()
    (out / "plots").rmdir()
    assert main(simulate_args(trace, out / "sub")) == 0     # a nested output of its own
    assert main(simulate_args(trace, out)) == 2
    assert (out / "sub" / "summary.json").is_file()
    __import__("shutil").rmtree(out / "sub")
    assert main(simulate_args(trace, out, "--max-loras", "1")) == 0   # only twin's: replaced
    assert json.loads((out / "summary.json").read_text())["meta"]["config"]["max_loras"] == 1


def test_json_with_out_prints_one_document(tmp_path, trace, capsys):
    assert main(simulate_args(trace, tmp_path / "run", "--json")) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)                       # the whole of stdout, nothing else
    assert "total_throughput" in doc and "wrote" in cap.err


def strict_json(path):
    """``path`` read as RFC 8259 JSON: NaN, Infinity and -Infinity are refused, as jq and
    JavaScript refuse them."""
    def refuse(token):
        raise ValueError(f"{path.name}: non-standard JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_summary_json_is_standard_json_when_a_metric_has_no_sample(tmp_path):
    """A window in which nothing finishes has no TTFT: summary.json writes null, not NaN."""
    from twin import simulate
    from twin.config import ServingConfig

    long = pd.DataFrame({"arrival_s": [0.0, 0.001], "adapter": ["a", "b"],
                         "prompt_tokens": [100, 100], "output_tokens": [500, 500]})
    result = simulate(long, ServingConfig(max_loras=2), window_s=0.05)
    assert np.isnan(result.summary["ttft_ms"]["mean"])      # the summary in Python: NaN
    result.save(tmp_path / "run")
    doc = strict_json(tmp_path / "run" / "summary.json")
    assert doc["summary"]["ttft_ms"]["mean"] is None
    assert doc["summary"]["completed"] == 0
    (tmp_path / "bare.json").write_text('{"a": NaN}')
    with pytest.raises(ValueError, match="NaN"):   # the strict reader can fail
        strict_json(tmp_path / "bare.json")
    assert outputs.json_document({"x": np.float32(0.5), "y": np.array([1, 2]),
                                  "z": float("-inf")}) == '{"x": 0.5, "y": [1, 2], "z": null}'


def test_compare_json_and_rerun(tmp_path, trace, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--trace", str(trace), "--policies", "vllm,slora", "--max-loras", "2",
            "--out", str(out), "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == ["vllm", "slora"]
    assert main(args) == 0
    assert {"table.csv", "summary.json", "compare.png"} <= {p.name for p in out.iterdir()}
    assert strict_json(out / "summary.json")["winner"] in (None, "vllm", "slora")
    assert outputs.output_kind(out) == "compare" and leftovers(tmp_path) == []


# -- concurrency and failures ---------------------------------------------------------------

def test_concurrent_writer_gets_a_clear_error(tmp_path, trace, capsys, engine_calls):
    import fcntl

    out = tmp_path / "run"
    lock = outputs._lock_path(out)                  # another process's lock: a separate fd
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert main(simulate_args(trace, out)) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert "another twin command is writing it" in err and "Traceback" not in err
    assert engine_calls == [] and not out.exists()
    # the lock died with its holder: the file left behind is no obstacle
    assert lock.exists() and main(simulate_args(trace, out)) == 0
    assert not lock.exists()


def test_two_processes_one_wins(tmp_path, trace):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, twin.outputs as o\n"
         f"with o.prepare({str(out)!r}, 'simulate'):\n"
         "    print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "twin.cli",
                                 *simulate_args(trace, out)], capture_output=True, text=True,
                                env=env)
    finally:
        holder.communicate("\n")
    assert second.returncode == 2 and "another twin command" in second.stderr
    assert "Traceback" not in second.stderr and not out.exists()


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_no_temp_leftovers_after_failure_mid_write(tmp_path, trace, monkeypatch, exc):
    out = tmp_path / "run"
    assert main(simulate_args(trace, out)) == 0
    before = snapshot(out)

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr("twin.results.plot.plot_timeline", boom)   # after the Parquet files
    if isinstance(exc, KeyboardInterrupt):
        assert main(simulate_args(trace, out, "--plot")) == 130
    else:   # an internal error: one line, exit 70 (the CLI's top level)
        assert main(simulate_args(trace, out, "--plot")) == 70
    assert snapshot(out) == before and leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]


def test_killed_run_temporaries_cleared_by_the_next(tmp_path, trace):
    out = tmp_path / "run"
    stale = tmp_path / ".run.k1ll3d_x.tmp"            # what a SIGKILL mid-write leaves
    stale.mkdir()
    (stale / "requests.parquet").write_text("half")
    (tmp_path / ".run-notes.txt").write_text("mine")  # not a temporary of ours
    other = tmp_path / ".run.x.a1b2c3d4.tmp"          # a live one of another --out, run.x
    other.mkdir()
    assert main(simulate_args(trace, out)) == 0
    assert not stale.exists() and (tmp_path / ".run-notes.txt").read_text() == "mine"
    assert other.is_dir()
    other.rmdir()
    assert leftovers(tmp_path) == []


def test_os_error_mid_write_propagates_and_cleans(tmp_path):
    with pytest.raises(OSError):
        with outputs.staged_dir(tmp_path / "x", "k") as tmp:
            (tmp / "a").write_text("half")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


# -- single-file outputs ------------------------------------------------------------------

def trace_args(out):
    return ["trace", "rate-classes", "--adapters", "2", "--rates", "1", "--duration-s", "5",
            "--lengths", "uniform", "--out", str(out)]


def test_trace_file_outputs(tmp_path, capsys):
    out = tmp_path / "t.parquet"
    assert main(trace_args(out)) == 0
    assert outputs.output_kind(out) == "trace"
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask     # not a temp file's 0600
    assert main(trace_args(out)) == 0               # twin's own trace: replaced
    mine = tmp_path / "mine.parquet"
    pd.read_parquet(out).to_parquet(mine)           # the same table, written by the user
    before = mine.read_bytes()
    assert main(trace_args(mine)) == 2
    assert "not a twin output" in capsys.readouterr().err and mine.read_bytes() == before
    csv = tmp_path / "t.csv"
    csv.write_text("user,data\n")
    assert main(trace_args(csv)) == 2 and csv.read_text() == "user,data\n"
    assert main(trace_args(tmp_path)) == 2          # a directory: refused
    assert main(trace_args(tmp_path / "new.csv")) == 0
    for name in ("t.json", "t_noext"):   # Parquet under a name no command reads back
        assert main(trace_args(tmp_path / name)) == 2
        assert ".parquet" in capsys.readouterr().err and not (tmp_path / name).exists()
    assert leftovers(tmp_path) == []


def test_calibrate_refuses_before_fitting(tmp_path, capsys, monkeypatch):
    import twin.calibrate.vllm as cv
    import twin.calibrate.vllm_runs as vr

    def never(*a, **k):
        pytest.fail("the runs were read and fitted before --out was checked")

    monkeypatch.setattr(vr, "load_runs", never)
    monkeypatch.setattr(cv, "calibrate", never)
    runs = tmp_path / "runs.csv"
    runs.write_text("a,b\n1,2\n")
    assert main(["calibrate", "--from-vllm-runs", str(runs), "--out", str(runs)]) == 2
    assert "input" in capsys.readouterr().err and runs.read_text() == "a,b\n1,2\n"
    mine = tmp_path / "p.json"
    mine.write_text('{"mine": 1}')
    assert main(["calibrate", "--from-vllm-runs", str(runs), "--out", str(mine)]) == 2
    assert "not a twin output" in capsys.readouterr().err
    assert mine.read_text() == '{"mine": 1}'


def test_profile_save_replaces_only_profiles(tmp_path):
    from twin.costs.profile import load_profile

    prof = load_profile("cpu-tiny")
    out = prof.save(tmp_path / "p.json")
    assert outputs.output_kind(out) == "profile"
    prof.save(out)                                   # its own kind: replaced
    (tmp_path / "m.json").write_text('{"schema": "twin.recommender/1"}')
    with pytest.raises(TwinInputError, match="'recommender'"):
        prof.save(tmp_path / "m.json")
    with pytest.raises(TwinInputError, match=r"\.json"):   # JSON under a name load refuses
        prof.save(tmp_path / "p.yaml")
    assert not (tmp_path / "p.yaml").exists()
    (tmp_path / "q.yaml").write_text((tmp_path / "p.json").read_text())
    with pytest.raises(TwinInputError, match="must end in .json"):   # not "no such profile"
        load_profile(tmp_path / "q.yaml")
    assert leftovers(tmp_path) == []


# -- the other writing commands: each refuses a foreign --out before its work -----------------

@pytest.mark.parametrize("argv", [
    ["recommend", "--trace", "{trace}"],
    ["place", "--trace", "{trace}"],
    ["sweep", "--workloads", "{trace}"],
    ["train", "--families", "1"],
    ["validate", "--trace", "{trace}", "--profile", "cpu-tiny"],
    ["execute", "--trace", "{trace}"],
    ["make-adapters", "--n", "1"],
    ["compare", "--trace", "{trace}"],
])
def test_every_command_refuses_a_user_dir(tmp_path, trace, capsys, argv):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    argv = [a.replace("{trace}", str(trace)) for a in argv] + ["--out", str(mine)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not a twin output" in err and "Traceback" not in err
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


def test_sweep_store_resumes_and_refuses_others(tmp_path, capsys):
    import yaml

    wl = tmp_path / "w.yaml"
    wl.write_text(yaml.safe_dump({"family": "rate_classes", "n_adapters": 2, "rates": [1.0],
                                  "duration_s": 5, "lengths": "uniform"}))
    out = tmp_path / "sweep"
    args = ["sweep", "--workloads", str(wl), "--out", str(out), "--window-s", "5",
            "--slots", "1", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0
    assert "2 points: 2 already done" in capsys.readouterr().out
    assert outputs.output_kind(out) == "sweep"
    # a store written before the marker existed still resumes
    (out / outputs.MARKER).unlink()
    assert main(args) == 0 and "2 points: 2 already done" in capsys.readouterr().out
    assert main(["compare", "--trace", str(wl), "--out", str(out)]) == 2


# -- torch commands -------------------------------------------------------------------------

def test_make_adapters_and_execute(tmp_path, trace, monkeypatch, capsys, one_torch_thread):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.setenv("TWIN_CACHE_DIR", str(tmp_path / "cache"))
    ad = tmp_path / "ad"
    mk = ["make-adapters", "--n", "2", "--ranks", "8", "--trace", str(trace), "--out", str(ad)]
    assert main(mk) == 0 and main(mk) == 0          # re-run into its own output
    cat = pd.read_csv(ad / "catalog.csv")           # paths point to the final place
    assert all(Path(p).parent == ad.resolve() and Path(p).is_dir() for p in cat["path"])
    tr = tmp_path / "few.csv"
    small_trace(3, span=0.05).assign(prompt_tokens=8, output_tokens=2).to_csv(tr, index=False)
    run = ["execute", "--trace", str(tr), "--adapters", str(ad), "--max-loras", "2",
           "--max-model-len", "64", "--num-gpu-blocks", "16", "--no-progress",
           "--out", str(tmp_path / "run"), "--json"]
    capsys.readouterr()
    assert main(run) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 3
    assert outputs.output_kind(tmp_path / "run") == "execute"
    assert main(run[:-3] + ["--out", str(ad)]) == 2          # the input adapters
    assert "input" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_input_paths_collects_every_path_argument(tmp_path, trace):
    from twin.cli import build_parser

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max_loras: 2\n")
    args = build_parser().parse_args(["simulate", "--trace", str(trace), "--config", str(cfg),
                                      "--profile", str(cfg), "--out", "x"])
    assert set(map(str, outputs.input_paths(args))) == {str(trace), str(cfg)}


def test_recommend_json_and_place_rerun(tmp_path, trace, capsys):
    rec = ["recommend", "--trace", str(trace), "--out", str(tmp_path / "rec"), "--json",
           "--no-plot", "--max-runs", "2", "--workers", "1"]
    assert main(rec) == 0
    doc = json.loads(capsys.readouterr().out)     # the report and "wrote" went to stderr
    assert doc["config"]["max_loras"] >= 1
    assert main(rec) == 0 and outputs.output_kind(tmp_path / "rec") == "recommend"
    place = ["place", "--trace", str(trace), "--out", str(tmp_path / "pl"), "--max-runs", "2",
             "--workers", "1"]
    assert main(place) == 0 and main(place) == 0
    assert (tmp_path / "pl" / "routing.csv").exists() and leftovers(tmp_path) == []
    assert main(place[:-4] + ["--out", str(tmp_path / "rec")]) == 2
    assert "holds a twin 'recommend' output" in capsys.readouterr().err


def test_sigterm_leaves_no_temporary_and_no_lock(tmp_path):
    """``timeout``/``kill`` (SIGTERM) used to kill a command where it stood: a 34,831-entry
    temporary folder and the lock stayed. Now it unwinds like Ctrl-C: exit 143, nothing
    left beside the destination."""
    import signal
    import time

    out = tmp_path / "adapters"
    proc = subprocess.Popen([sys.executable, "-m", "twin", "make-adapters", "--n", "100000000",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".adapters.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.1)   # until the temporary folder is being written
    assert list(tmp_path.glob(".adapters.*.tmp")), proc.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []

"""Sweeps: keys, resume after a kill, determinism, backends (Ray when installed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from twin.ml.spec import ConfigGrid, WorkloadSpec, slot_candidates
from twin.ml.sweep import (EarlyExit, SweepStore, comparable, plan, point_key, read_sweep,
                           run_sweep)
from twin.costs.profile import load_profile

WINDOW = 60.0
PROFILE = "llama31-8b-h100-64gb-first-principles"   # pinned: stable shipped profile


def _specs(n_workloads=6):
    out = []
    for i in range(n_workloads):
        out.append(WorkloadSpec("rate_classes", dict(
            n_adapters=(4, 8)[i % 2], rates=[0.8, 0.3, 0.1], ranks=[8, 16],
            duration_s=WINDOW, lengths="uniform", seed=i)))
    return out


def test_slot_candidates_and_grid():
    assert slot_candidates(8) == [1, 2, 4, 8]
    assert slot_candidates(20) == [1, 2, 4, 8, 16, 20]
    cfgs = ConfigGrid().configs(20, 12)
    assert [c.max_loras for c in cfgs] == [1, 2, 4, 8, 16, 20]
    assert {c.max_cpu_loras for c in cfgs} == {20} and {c.max_lora_rank for c in cfgs} == {16}
    assert {c.max_num_seqs for c in cfgs} == {2048}


def test_keys_stable_and_sensitive():
    prof = load_profile(PROFILE)
    spec = _specs(1)[0]
    t1 = plan([spec], window_s=WINDOW, profile=prof)
    t2 = plan([WorkloadSpec.from_dict(spec.to_dict())], window_s=WINDOW, profile=prof)
    assert [t.key for t in t1] == [t.key for t in t2]
    assert len({t.key for t in t1}) == len(t1)
    other = plan([spec.replace(seed=99)], window_s=WINDOW, profile=prof)
    assert not {t.key for t in t1} & {t.key for t in other}
    # a profile with different content gets different keys
    d = prof.to_dict()
    d["hardware"] = {**d["hardware"], "step_overhead_s": 0.004}
    from twin.costs.profile import Profile
    p2 = Profile.from_dict(d)
    cfg = t1[0].config
    ee = EarlyExit()
    from twin.ml.sweep import profile_digest
    assert point_key(spec, cfg, WINDOW, profile_digest(prof), ee) == t1[0].key
    assert point_key(spec, cfg, WINDOW, profile_digest(p2), ee) != t1[0].key


def test_sweep_deterministic_across_worker_counts(tmp_path):
    tasks = plan(_specs(2), window_s=WINDOW)
    r1 = run_sweep(tasks, tmp_path / "a", workers=1, progress=False)
    r2 = run_sweep(tasks, tmp_path / "b", workers=2, progress=False)
    assert r1.ran == r2.ran == len(tasks)
    a, b = comparable(read_sweep(tmp_path / "a")), comparable(read_sweep(tmp_path / "b"))
    pd.testing.assert_frame_equal(a, b)
    # re-running skips everything
    r3 = run_sweep(tasks, tmp_path / "a", workers=1, progress=False)
    assert r3.ran == 0 and r3.skipped == len(tasks)
    row = a.iloc[0]
    assert {"f_rate_mean", "c_max_loras", "total_throughput", "starving",
            "ttft_ms_p99"} <= set(a.columns)
    assert row["max_cpu_loras"] in (4, 8)


def test_sweep_resumes_after_kill(tmp_path):
    specs = _specs(10)
    wl = tmp_path / "w.yaml"
    wl.write_text(yaml.safe_dump([s.to_dict() for s in specs]))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "twin.cli", "sweep", "--workloads", str(wl), "--out",
           str(out), "--window-s", str(WINDOW), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    store = SweepStore(out)
    deadline = time.time() + 60
    try:
        while time.time() < deadline and not store.part_files() and proc.poll() is None:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    tasks = plan(specs, window_s=WINDOW)
    done = store.done_keys()
    assert 0 < len(done) < len(tasks), "the kill should land mid-sweep"
    rep = run_sweep(tasks, out, workers=1, progress=False)
    assert rep.skipped == len(done)
    assert rep.ran == len(tasks) - len(done)
    ref = tmp_path / "ref"
    run_sweep(tasks, ref, workers=2, progress=False)
    pd.testing.assert_frame_equal(comparable(read_sweep(out)), comparable(read_sweep(ref)))


def test_sweep_ignores_partial_part_files(tmp_path):
    tasks = plan(_specs(1), window_s=WINDOW)
    run_sweep(tasks, tmp_path / "s", workers=1, progress=False)
    (tmp_path / "s" / "parts" / ".tmp-part-broken.parquet").write_bytes(b"garbage")
    assert len(read_sweep(tmp_path / "s")) == len(tasks)


def test_ray_backend_equals_local(tmp_path):
    # CI installs the ray extra (.ci/run), so there a missing Ray fails instead of skipping
    if not os.environ.get("CI"):
        pytest.importorskip("ray")
    import ray

    tasks = plan(_specs(2), window_s=WINDOW)
    run_sweep(tasks, tmp_path / "local", workers=2, progress=False)
    run_sweep(tasks, tmp_path / "ray", backend="ray", workers=2, progress=False)
    pd.testing.assert_frame_equal(comparable(read_sweep(tmp_path / "local")),
                                  comparable(read_sweep(tmp_path / "ray")))
    # the points ran in Ray's worker processes (a local instance started and shut down)
    assert os.getpid() not in set(read_sweep(tmp_path / "ray")["worker"])
    assert not ray.is_initialized()


def test_ray_backend_missing_is_a_clear_error(monkeypatch):
    import builtins

    from twin.errors import TwinInputError
    from twin.ml.sweep import make_backend

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(TwinInputError, match="pip install"):
        make_backend("ray")

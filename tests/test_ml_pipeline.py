"""The ML pipeline end to end through the CLI: a sweep long enough for early exit, run to
completion and checked against direct twin runs; ``twin train`` and the model it writes;
``twin recommend`` with the shipped model on a slice of the demo trace (the ``make demo``
path), its configuration verified by ``twin simulate --config``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from twin.cli import main
from twin.ml.dataset import row_table
from twin.ml.spec import ConfigGrid, WorkloadSpec
from twin.ml.sweep import EarlyExit, plan, read_sweep
from twin.costs.profile import load_profile
from twin.sim.engine import simulate

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "llama31-8b-h100-64gb-first-principles"   # pinned: stable shipped profile
# the shortest window early exit applies to: a probe of max(min_probe_s, probe_frac x window)
# must fit in half the window, i.e. 120 s with the default rule (60-s probe)
WINDOW = 120.0
SLOTS = (1, 4, 16)


def _specs():
    """Three loads on one GPU: far over capacity, over it, and within it."""
    return [WorkloadSpec("rate_classes", dict(n_adapters=n, rates=rates, ranks=[8, 16],
                                              duration_s=WINDOW, lengths="uniform", seed=1))
            for n, rates in ((32, [3.2, 1.6, 0.8]), (64, [1.6, 0.8, 0.4]),
                             (16, [0.8, 0.4, 0.2]))]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    wl = d / "w.yaml"
    wl.write_text(yaml.safe_dump([s.to_dict() for s in _specs()]))
    args = ["sweep", "--workloads", str(wl), "--out", str(d / "sweep"), "--profile", PROFILE,
            "--window-s", str(WINDOW), "--slots", ",".join(map(str, SLOTS)), "--workers", "2",
            "--no-progress"]
    assert main(args) == 0
    profile = load_profile(PROFILE)
    tasks = plan(_specs(), ConfigGrid(slots=SLOTS), window_s=WINDOW, profile=profile,
                 early_exit=EarlyExit())
    return {"dir": d / "sweep", "args": args, "tasks": tasks, "profile": profile}


def test_early_exit_applies_to_this_window():
    ee = EarlyExit()
    assert ee.probe_s(WINDOW) == 60.0
    assert ee.probe_s(90.0) is None and EarlyExit(enabled=False).probe_s(WINDOW) is None


def test_sweep_runs_to_completion_every_key_once(swept, capsys):
    parts = sorted((swept["dir"] / "parts").glob("part-*.parquet"))
    raw = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    keys = [t.key for t in swept["tasks"]]
    assert len(set(keys)) == len(keys) == 11   # 4 + 4 + 3 slot values (up to each count)
    assert raw["key"].is_unique and set(raw["key"]) == set(keys)
    meta = json.loads((swept["dir"] / "sweep.json").read_text())
    assert meta["profile"] == PROFILE and meta["early_exit"] == EarlyExit().identity()
    # a second run of the same command has nothing left to do
    capsys.readouterr()
    assert main(swept["args"]) == 0
    assert f"{len(keys)} points: {len(keys)} already done, 0 run" in capsys.readouterr().out


def test_sweep_rows_equal_direct_twin_runs_and_early_exit_verdicts(swept):
    """Each row against a plain ``simulate`` of the same config over the whole window: a
    fully simulated row has its figures; an early-exit row has its starving verdict."""
    df = read_sweep(swept["dir"]).set_index("key")
    by_key = {t.key: t for t in swept["tasks"]}
    built = {}
    n_early = n_ok = 0
    for key, row in df.iterrows():
        t = by_key[key]
        if t.spec.key not in built:
            tr, cat = t.spec.build()
            built[t.spec.key] = (tr[tr["arrival_s"] <= WINDOW].reset_index(drop=True), cat)
        tr, cat = built[t.spec.key]
        s = simulate(tr, t.config, swept["profile"], cat, window_s=WINDOW).summary
        assert row["max_loras"] == t.config.max_loras
        assert bool(row["starving"]) == s["starving"], (key, row["max_loras"])
        if row["early_exit"]:   # cut short only when clearly starving, as the full run says
            n_early += 1
            assert row["starving"] and s["starving"], (key, row["max_loras"])
            assert row["simulated_s"] == EarlyExit().probe_s(WINDOW)
            assert pd.isna(row["ttft_ms_p99"])
        else:
            assert row["simulated_s"] == WINDOW
            for k in ("total_throughput", "offered_total_throughput", "achieved_over_offered"):
                assert row[k] == pytest.approx(s[k], rel=1e-12), k
            assert (row["completed"], row["preemptions"]) == (s["completed"],
                                                              s["preemptions"])
            assert row["ttft_ms_p99"] == pytest.approx(s["ttft_ms"]["p99"], rel=1e-12)
        n_ok += not s["starving"]
    # the grid holds clear starvation (cut short), configs that keep up, and full runs
    assert n_early >= 3 and n_ok >= 1 and (~df["early_exit"]).sum() >= n_ok + 1


def test_family_table_of_a_sweep_without_rate_class_workloads(swept):
    """``twin train`` tabulates rate-class families only; a training sweep that drew none
    (small --families) crashed with KeyError 'family_key' instead of an empty table."""
    from twin.ml.dataset import family_table

    sweep = read_sweep(swept["dir"])
    assert len(family_table(sweep)) == 3
    ft = family_table(sweep[sweep["family"] == "powerlaw"])
    assert len(ft) == 0 and {"family_key", "workloads", "max_served"} <= set(ft.columns)


# -- twin train -----------------------------------------------------------------------------

UNIFORM = ({"kind": "uniform", "lo": 8, "hi": 512},)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``twin train`` at its smallest: 2 training families, 1 held out, 120-s windows, light
    loads, uniform lengths (so that no shared data is needed)."""
    import twin.ml.pipeline as pipeline_mod
    import twin.ml.train as train_mod

    d = tmp_path_factory.mktemp("train")
    shipped = Path(train_mod.__file__).with_name("recommender.json")
    before = shipped.read_bytes()
    real = train_mod.sample_workloads
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline_mod, "sample_workloads",
               lambda *a, **k: real(*a, **{**k, "lengths": UNIFORM}))
    try:
        rc = main(["train", "--profile", PROFILE, "--families", "2", "--heldout-families", "1",
                   "--rate-range", "2,6", "--window-s", str(WINDOW), "--workers", "2",
                   "--quick", "--no-install", "--no-progress", "--out", str(d),
                   "--slo-workloads", "1", "--slo-window-s", "30"])
    finally:
        mp.undo()
    assert rc == 0
    assert shipped.read_bytes() == before   # --no-install leaves the shipped model alone
    return d


def test_saved_thresholds_route_float32_features_as_fitted():
    """A rate of 1/60 req/s (one request a minute) recurs exactly across workloads; a
    threshold just below it, rounded to 7 digits as saving did, sent it the other way."""
    import numpy as np

    from twin.ml.estimators import split_threshold

    x = np.float32(1 / 60)
    t = (float(x) + float(np.nextafter(x, np.float32(0)))) / 2   # sklearn's midpoint
    assert not x <= t and x <= float(f"{t:.7g}")                  # the old rounding's flip
    s = split_threshold(t)
    assert not x <= s and len(repr(s)) < len(repr(t))
    xs = np.nextafter(x, np.float32(0))
    assert xs <= s and xs <= t
    rng = np.random.default_rng(0)
    vals = rng.lognormal(0, 3, 2000).astype(np.float32)
    for v in vals[:200]:
        mid = (float(v) + float(np.nextafter(v, np.float32(np.inf)))) / 2
        assert ((vals <= split_threshold(mid)) == (vals <= mid)).all()


def test_train_writes_a_model_equal_to_the_fitted_one(trained):
    from twin.ml.recommender import Recommender
    from twin.ml.latency import with_queue_features
    from twin.ml.train import fit_recommender

    profile = load_profile(PROFILE)
    train = read_sweep(trained / "sweep-train")
    held = read_sweep(trained / "sweep-heldout")
    assert set(train["workload_key"]).isdisjoint(held["workload_key"])
    saved = Recommender.load(trained / "recommender.json")
    assert saved.meta["profile"] == PROFILE and saved.meta["rows"] == len(train)
    assert saved.meta["window_s"] == WINDOW
    # the latency heads also learned from the latency sweep (the same training workloads
    # at other latency knobs; held-out workloads never in it)
    lat = read_sweep(trained / "sweep-latency")
    assert len(lat) and set(lat["workload_key"]) <= set(train["workload_key"])
    assert lat["max_num_seqs"].nunique() > 1 or lat["max_num_batched_tokens"].nunique() > 1
    assert saved.meta["latency_rows"] > 0
    # the in-memory model fitted on the same sweeps predicts the held-out rows as the saved
    # one does, up to the 7 significant digits the file keeps
    fitted = fit_recommender(train, profile, latency_sweep=lat)
    X = with_queue_features(row_table(held), profile)
    a, b = fitted.predict_rows(X), saved.predict_rows(X)
    assert len(a) == len(X) > 0   # rows of configs that start
    pd.testing.assert_frame_equal(b, a, check_exact=False, rtol=1e-5, atol=1e-6)


def test_train_reports_recommendations_checked_by_the_sweep(trained):
    summary = json.loads((trained / "summary.json").read_text())
    held = read_sweep(trained / "sweep-heldout")
    rep = pd.read_csv(trained / "heldout.csv")
    assert len(rep) == held["workload_key"].nunique() == summary["heldout_workloads"]
    assert summary["train_rows"] == len(read_sweep(trained / "sweep-train"))
    assert (trained / "models" / "model_scores.csv").exists()
    for _, r in rep.iterrows():
        g = held[held["workload_key"] == r["workload_key"]]
        assert r["exhaustive_runs"] == len(g)
        if not r["rec_ok"]:
            continue
        # the recommendation's verified throughput is that config's sweep row (same run) and
        # never beats the exhaustive best
        row = g[g["max_loras"] == r["rec_max_loras"]].iloc[0]
        assert not row["starving"]
        assert r["rec_throughput"] == pytest.approx(row["total_throughput"], rel=1e-9)
        assert r["rec_throughput"] <= r["exhaustive_throughput"] * (1 + 1e-9)


def test_train_reports_the_slo_evaluation_and_the_latency_error(trained):
    """The SLO part ran (issue 16): its keys are in the summary, and every recommendation it
    made met its SLO in its own run; the saved model records its p99 latency error."""
    from twin.ml.recommender import Recommender

    summary = json.loads((trained / "summary.json").read_text())
    assert "slo_cases" in summary and summary["slo_window_s"] == 30.0
    if summary["slo_cases"]:
        cases = pd.read_csv(trained / "slo_cases.csv")
        assert len(cases) == summary["slo_cases"] and summary["slo_violations"] == 0
        assert not cases.loc[cases["rec_ok"] & ~cases["feasible"]].shape[0]
    err = Recommender.load(trained / "recommender.json").latency_error
    if err is not None:   # two or more families with runs that keep up
        assert summary["latency_ttft_p99_smape_median"] == err["ttft_p99"]["smape_median"]


def test_slo_only_runs_just_the_slo_evaluation(trained, tmp_path, monkeypatch, capsys):
    """``--slo-only`` with ``--model``: no sweeps, no model written; the last line is the
    SLO summary, equal to the one the full training computed on the same workloads."""
    import twin.ml.pipeline as pipeline_mod
    import twin.ml.train as train_mod

    real = train_mod.sample_workloads
    monkeypatch.setattr(pipeline_mod, "sample_workloads",
                        lambda *a, **k: real(*a, **{**k, "lengths": UNIFORM}))
    out = tmp_path / "slo"
    rc = main(["train", "--slo-only", "--model", str(trained / "recommender.json"),
               "--profile", PROFILE, "--families", "2", "--heldout-families", "1",
               "--rate-range", "2,6", "--window-s", str(WINDOW), "--workers", "2",
               "--no-progress", "--out", str(out), "--slo-workloads", "1",
               "--slo-window-s", "30"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not (out / "sweep-train").exists() and not (out / "recommender.json").exists()
    full = json.loads((trained / "summary.json").read_text())
    for k in ("slo_cases", "slo_violations", "slo_gap_to_exhaustive_median_pct",
              "pred_ttft_p99_smape_median"):
        assert last.get(k) == full.get(k), k


# -- recommend with the shipped model (make demo) -------------------------------------------

def test_recommend_with_shipped_model_on_the_demo_trace(tmp_path, capsys):
    """``make demo`` on the first 10 minutes of its trace: the shipped model, the default
    profile, then ``twin simulate --config`` of the written YAML."""
    from twin.workload.schema import read_trace, write_trace

    tr = read_trace(ROOT / "traces" / "azure_conv_1h_32lora.parquet")
    tr = tr[tr["arrival_s"] < 600.0].reset_index(drop=True)
    path = write_trace(tr, tmp_path / "slice.parquet")
    rec_dir = tmp_path / "recommend"
    assert main(["recommend", "--trace", str(path), "--out", str(rec_dir)]) == 0
    rec = json.loads((rec_dir / "recommendation.json").read_text())
    assert rec["ok"] and rec["verified"]["starving"] is False
    cfg = yaml.safe_load((rec_dir / "vllm_config.yaml").read_text())
    assert cfg["max-cpu-loras"] == tr["adapter"].nunique() == 32
    assert 1 <= cfg["max-loras"] <= 32 and len(cfg["lora-modules"]) == 32
    assert (rec_dir / "throughput_map.png").stat().st_size > 1000
    capsys.readouterr()
    out = tmp_path / "demo"
    assert main(["simulate", "--trace", str(path), "--config", str(rec_dir / "vllm_config.yaml"),
                 "--window-s", str(rec["window_s"]), "--no-progress", "--json",
                 "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["summary"]
    assert not s["starving"]
    assert s["total_throughput"] == pytest.approx(rec["verified"]["throughput"], rel=1e-9)
    assert s["achieved_over_offered"] >= 0.9

"""recommend and place end to end on a tiny grid: a model trained here on a small sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from twin.ml.dataset import family_table, row_table, workload_table
from twin.ml.latency import with_queue_features
from twin.ml.placement import place
from twin.ml.recommend import recommend
from twin.ml.recommender import Recommender
from twin.ml.spec import pad_rank
from twin.ml.sweep import plan, read_sweep, run_sweep
from twin.ml.train import fit_recommender, sample_workloads
from twin.sim.engine import simulate
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import rate_class_trace

WINDOW = 90.0
UNIFORM = ({"kind": "uniform", "lo": 8, "hi": 512},)
# pinned, so that loads below stay light/heavy whatever the default profile becomes
PROFILE = "llama31-8b-h100-64gb-first-principles"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from twin.costs.profile import load_profile

    d = tmp_path_factory.mktemp("tiny")
    profile = load_profile(PROFILE)
    specs = sample_workloads(5, seed=3, window_s=WINDOW, lengths=UNIFORM, sizes=(4, 8, 16),
                             rate_range=(4.0, 80.0), per_family=(2, 2))
    run_sweep(plan(specs, window_s=WINDOW, profile=profile), d / "sweep", profile=profile,
              workers=2, progress=False)
    sweep = read_sweep(d / "sweep")
    model = fit_recommender(sweep, profile, n_estimators=40, latency_estimators=20)
    path = model.save(d / "model.json")
    return {"dir": d, "profile": profile, "sweep": sweep, "model": Recommender.load(path),
            "path": path, "fitted": model}


def _workload(n, rates, seed=5):
    tr = rate_class_trace(n, rates, duration_s=WINDOW, seed=seed)
    ranks = [8, 16, 32][:3] * ((n + 2) // 3)
    cat = AdapterCatalog(pd.DataFrame({"adapter": [f"lora-{i}" for i in range(n)],
                                       "rank": ranks[:n]}))
    return tr, cat


def test_tables(tiny):
    rows = row_table(tiny["sweep"])
    assert {"achieved", "starving", "throughput", "ttft_p99"} <= set(rows.columns)
    wt = workload_table(tiny["sweep"])
    assert len(wt) == 10 and {"best_max_loras", "max_throughput", "starving_all"} <= set(wt)
    ok = wt[~wt["starving_all"]]
    assert (ok["best_max_loras"] <= ok["n_adapters"]).all()
    ft = family_table(tiny["sweep"])
    assert {"max_served", "best_max_loras_at_max"} <= set(ft.columns)


def test_model_roundtrip(tiny):
    # saving rounds leaf values to 7 significant digits: the loaded model must predict what
    # the fitted one did, to that precision (speed: experiments/bench_generate_predict.py)
    X = with_queue_features(row_table(tiny["sweep"]), tiny["profile"])
    before = tiny["fitted"].predict_rows(X)
    after = tiny["model"].predict_rows(X)
    assert {"achieved", "p_starve", "ttft_p99", "tpot_p50"} <= set(after.columns)
    assert list(after.columns) == list(before.columns)
    pd.testing.assert_frame_equal(after, before, check_exact=False, rtol=1e-5, atol=1e-6)
    assert before["achieved"].std() > 0  # the rows are not all predicted alike


def test_recommend_returns_verified_non_starving_config(tiny):
    tr, cat = _workload(12, (4.0, 2.0, 1.0))
    rec = recommend(tr, cat, profile=tiny["profile"], model=tiny["model"], window_s=WINDOW,
                    workers=2)
    assert rec.ok, rec.report()
    c = rec.config
    assert c.max_cpu_loras == 12 and c.max_lora_rank == pad_rank(32) == 32
    assert c.max_loras <= 12 and c.max_num_seqs == 2048
    assert not rec.verified["starving"] and rec.runs <= 4
    # the verification is a plain twin run of that configuration
    s = simulate(tr, c, tiny["profile"], cat, window_s=WINDOW).summary
    assert s["total_throughput"] == pytest.approx(rec.verified["throughput"])
    assert not s["starving"]
    assert "recommended: max_loras=" in rec.report()
    # a 90-s window: its edge may read STARVING, and the report says so (an hour's: silent)
    assert any("window is only 90 s" in w for w in rec.warnings)
    assert "warning: the window is only 90 s" in rec.report()
    from twin.ml.inputs import short_window_warning
    assert short_window_warning(3600.0) is None and short_window_warning(599.0)


def test_a_short_trace_given_no_window_is_verified_to_its_last_request(tiny):
    """A 90-s trace without --window-s: the twin runs go on to the last request (their
    starvation rule is twin simulate's), so a server that keeps up is not read STARVING
    for the requests still running at the window's edge; no edge warning then. A window
    the user gives is measured as given (the test above)."""
    from twin.ml.inputs import runs_to_completion

    assert runs_to_completion(90.0, None) and not runs_to_completion(90.0, 90.0)
    assert not runs_to_completion(3600.0, None)
    tr, cat = _workload(12, (4.0, 2.0, 1.0))
    rec = recommend(tr, cat, profile=tiny["profile"], model=tiny["model"], workers=1)
    assert rec.ok and rec.to_completion and rec.to_dict()["to_completion"] is True
    assert not any("window is only" in w for w in rec.warnings)
    assert "(twin runs to the last request)" in rec.report()
    s = simulate(tr, rec.config, tiny["profile"], cat).summary   # no window: to the end
    assert s["total_throughput"] == pytest.approx(rec.verified["throughput"])
    assert rec.verified["achieved"] == pytest.approx(s["achieved_over_offered"])
    cut = simulate(tr, rec.config, tiny["profile"], cat, window_s=rec.window_s).summary
    assert s["achieved_over_offered"] > cut["achieved_over_offered"]   # the edge, gone
    # the share is of the run's own offered load, which the report says beside it
    assert rec.verified["offered"] == pytest.approx(s["offered_total_throughput"])
    # (here 8% below the workload's tokens over the 90-s window: the span is the last
    # arrival plus the last request's time in service, from the first arrival)
    assert abs(rec.verified["offered"] / rec.workload["offered_tps"] - 1) > 0.005
    assert f"of offered {rec.verified['offered']:.0f} tok/s over the run's span" in rec.report()


def test_recommend_goodput_objective(tiny):
    tr, cat = _workload(8, (2.0, 1.0, 0.5))
    rec = recommend(tr, cat, profile=tiny["profile"], model=tiny["model"], window_s=WINDOW,
                    objective="goodput", slo={"ttft": 3000.0, "tpot": 200.0}, workers=1)
    assert rec.ok
    assert 0 < rec.verified["goodput"] <= rec.verified["throughput"] + 1e-6


def test_recommend_cli_writes_vllm_files(tiny, tmp_path):
    from twin.cli import main

    tr, cat = _workload(12, (4.0, 2.0, 1.0))
    tp, cp = tmp_path / "t.parquet", tmp_path / "cat.csv"
    tr.to_parquet(tp, index=False)
    cat.table.to_csv(cp, index=False)
    out = tmp_path / "rec"
    rc = main(["recommend", "--trace", str(tp), "--catalog", str(cp), "--model",
               str(tiny["path"]), "--profile", PROFILE, "--window-s", str(WINDOW),
               "--out", str(out)])
    assert rc == 0
    args = (out / "vllm_args.txt").read_text()
    assert args.startswith("vllm serve ") and "--enable-lora" in args
    assert "--max-cpu-loras=12" in args and "--max-lora-rank=32" in args
    assert '"lora-0=$ADAPTER_DIR/lora-0"' in args
    cfg = yaml.safe_load((out / "vllm_config.yaml").read_text())
    assert cfg["enable-lora"] is True and cfg["max-cpu-loras"] == 12
    assert cfg["max-loras"] >= 1 and len(cfg["lora-modules"]) == 12
    assert (out / "throughput_map.png").stat().st_size > 1000
    from twin.cli.ml_help import RECOMMEND, RECOMMEND_WRITES
    from twin.outputs import MARKER

    written = {p.relative_to(out).as_posix() for p in out.rglob("*")
               if p.is_file() and p.name != MARKER}
    assert written == set(RECOMMEND_WRITES["throughput"])   # what its --help says it writes
    assert all(f in " ".join(RECOMMEND.split()) for f in written)
    import json
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["ok"] and rec["verified"]["starving"] is False


def test_recommend_refuses_what_it_would_ignore_or_cannot_serve(tiny, tmp_path, capsys):
    from twin.cli import main
    from twin.errors import TwinInputError

    tr, cat = _workload(6, (4.0, 2.0, 1.0))
    tp = tmp_path / "t.parquet"
    tr.to_parquet(tp, index=False)
    cli = ["recommend", "--trace", str(tp), "--model", str(tiny["path"]), "--profile",
           PROFILE, "--window-s", str(WINDOW), "--out", str(tmp_path / "rec")]
    # an SLO or a GPU price under the throughput objective would be ignored: refused
    assert main(cli + ["--slo", "ttft=1"]) == 2
    assert "--slo applies to --objective goodput or cost" in capsys.readouterr().err
    for objective in ("throughput", "goodput"):   # only the cost objective prices GPUs
        assert main(cli + ["--gpu-price", "2.5", "--objective", objective,
                           "--slo", "ttft=1000,tpot=100"]) == 2
        assert "--gpu-price applies to --objective cost only" in capsys.readouterr().err
    assert not (tmp_path / "rec").exists()
    # so is every other flag only some objectives read (one table, against the defaults)
    slo = ["--slo", "ttft=1000,tpot=100"]
    for objective, extra, flag in (
            ("throughput", ["--seed", "3"], "--seed"),
            ("throughput", ["--study-db"], "--study-db"),
            ("throughput", ["--max-gpus", "2"], "--max-gpus"),
            ("throughput", ["--no-fleet-check"], "--no-fleet-check"),
            ("throughput", ["--no-place"], "--no-place"),
            ("throughput", ["--optimizer", "coordinate"], "--optimizer"),
            ("goodput", slo + ["--no-fleet-check"], "--no-fleet-check"),
            ("cost", slo + ["--no-place"], "--no-place")):
        assert main(cli + ["--objective", objective, *extra]) == 2
        err = capsys.readouterr().err
        assert f"{flag} applies to --objective" in err and f"the {objective} objective " \
            "would ignore it" in err
    # every request longer than max_model_len, or none in the window: nothing to serve
    # (said so, not a division by zero in the tie between 0 tok/s configurations)
    for t, msg in ((tr.assign(prompt_tokens=200_000), "all .* are longer than max_model_len"),
                   (tr.assign(arrival_s=tr["arrival_s"] + 10 * WINDOW), "none in its window")):
        with pytest.raises(TwinInputError, match=msg):
            recommend(t, cat, profile=tiny["profile"], model=tiny["model"], window_s=WINDOW,
                      max_runs=2, workers=1)


def test_place_assigns_every_adapter_and_each_gpu_verifies(tiny, tmp_path):
    tr, cat = _workload(48, (2.0, 1.0, 0.5), seed=9)
    pl = place(tr, cat, profile=tiny["profile"], model=tiny["model"], window_s=WINDOW,
               workers=2)
    assert pl.ok, pl.report()
    r = pl.routing
    assert sorted(r["adapter"]) == sorted(cat.adapters)
    assert r["adapter"].is_unique
    for g in pl.gpus:
        rec = g.recommendation
        assert rec.ok and not rec.verified["starving"]
        sub = tr[tr["adapter"].isin(g.adapters)].reset_index(drop=True)
        subcat = AdapterCatalog(cat.table[cat.table["adapter"].isin(g.adapters)])
        assert rec.config.max_cpu_loras == len(g.adapters)
        s = simulate(sub, rec.config, tiny["profile"], subcat, window_s=WINDOW).summary
        assert not s["starving"]
    assert len(pl.gpus) >= 2  # ~29k tok/s offered: more than one GPU of this profile
    assert pl.report().count("warning: the window is only 90 s") == 1   # once, not per GPU
    assert pl.verify_runs >= len(pl.gpus)  # every GPU ran on the twin


def test_place_cli_outputs(tiny, tmp_path):
    from twin.cli import main

    tr, cat = _workload(6, (1.0, 0.5, 0.25))
    tp = tmp_path / "t.parquet"
    tr.to_parquet(tp, index=False)
    rc = main(["place", "--trace", str(tp), "--model", str(tiny["path"]), "--profile",
               PROFILE, "--window-s", str(WINDOW), "--out", str(tmp_path / "pl")])
    assert rc == 0
    routing = pd.read_csv(tmp_path / "pl" / "routing.csv")
    assert set(routing["adapter"]) == set(cat.adapters) and set(routing["gpu"]) == {0}
    assert yaml.safe_load((tmp_path / "pl" / "gpu-0" / "vllm_config.yaml").read_text())[
        "max-cpu-loras"] == 6


def test_place_on_a_short_trace_without_a_window_does_not_split_for_the_edge(tiny):
    """Each GPU verified to its last request: the GPU count is the one the windowed
    placement finds at most (a 90-s window's edge read GPUs that keep up as STARVING)."""
    tr, cat = _workload(12, (8.0, 4.0, 2.0), seed=6)
    kw = dict(profile=tiny["profile"], model=tiny["model"], workers=2)
    whole = place(tr, cat, **kw)
    assert whole.ok, whole.report()
    assert all(g.recommendation.to_completion for g in whole.gpus)
    edge = place(tr, cat, window_s=WINDOW, **kw)
    assert len(whole.gpus) < len(edge.gpus), (whole.report(), edge.report())
    assert "window is only" not in whole.report()
    # each GPU's line: the offered load its verified percentage is of (the run's span)
    for g in whole.gpus:
        v = g.recommendation.verified
        assert f"gpu {g.gpu}: {len(g.adapters)} adapters, offered {v['offered']:.0f} tok/s" \
            in whole.report()


def test_shipped_model_predicts(tiny):
    # the shipped model is part of the package (make demo uses it): load it and predict
    m = Recommender.load()
    assert m.meta["profile"] and m.meta["rows"] > 0
    rows = with_queue_features(row_table(tiny["sweep"]), tiny["profile"])
    p = m.predict_rows(rows)
    assert len(p) == len(rows) and p.notna().all().all()
    assert ((p["p_starve"] >= 0) & (p["p_starve"] <= 1)).all()
    # it ranks starving sweep points as more likely to starve than the points that kept up
    assert p["p_starve"][rows["starving"]].mean() > p["p_starve"][~rows["starving"]].mean()


def test_place_replicates_an_adapter_too_hot_for_one_gpu(tiny):
    # one adapter at ~60 req/s (~31k tok/s) exceeds one GPU of this profile on its own
    tr, cat = _workload(8, (60.0,) + (0.5,) * 7, seed=4)
    pl = place(tr, cat, profile=tiny["profile"], model=tiny["model"], window_s=WINDOW,
               workers=2)
    assert pl.ok, pl.report()
    hot = tr["adapter"].value_counts().index[0]
    assert pl.replicas[hot] >= 2 and len(pl.gpus) >= 2
    r = pl.routing
    assert set(r["adapter"]) == set(cat.adapters)
    w = r.groupby("adapter")["weight"].sum()
    assert np.allclose(w.to_numpy(), 1.0)
    assert r.groupby("adapter")["requests"].sum().sum() == len(tr)
    assert all(g.recommendation.ok for g in pl.gpus)


def test_a_tensor_parallel_placement_writes_its_engine_and_counts_its_gpus(tiny, tmp_path):
    """place on a TP-2 profile: each GPU of the report is a server of 2 GPUs, and its
    exported files start that engine (vLLM would start one GPU from them)."""
    import json

    from twin.costs.first_principles import LLAMA31_8B, build_profile
    from twin.ml.export import write_placement

    tp2 = build_profile(LLAMA31_8B, "h100-80gb", tensor_parallel_size=2)
    tr, cat = _workload(8, (4.0, 2.0, 1.0))
    pl = place(tr, cat, profile=tp2, model=tiny["model"], window_s=WINDOW, workers=1)
    assert pl.ok and pl.gpus_per_server == 2 and pl.total_gpus == 2 * len(pl.gpus)
    assert f"{len(pl.gpus)} server(s) x 2 GPUs (tensor parallel)" in pl.report()
    write_placement(tmp_path, pl, cat, profile=tp2, model_name="m", label="t")
    assert "--tensor-parallel-size=2" in (tmp_path / "gpu-0" / "vllm_args.txt").read_text()
    record = json.loads((tmp_path / "placement.json").read_text())
    assert record["profile"] == tp2.name


def test_a_probed_candidate_is_reported_as_the_probe_it_was():
    """A clearly starving candidate is stopped after the early exit's probe: its figures are
    the probe's first minute, not the window's, so the report must not print them as a
    run's throughput and TTFT p99 (it did: a 60-s probe's p99 of 1.7 s beside a full run's
    134 s, the probe looking far better), and the candidates table says which runs were
    full (``ver_full``) and what each simulated (``ver_simulated_s``)."""
    from twin.ml.sweep import EarlyExit

    tr = rate_class_trace(64, (1.6, 0.8, 0.4), duration_s=300.0, seed=0)
    rec = recommend(tr, None, profile="llama31-8b-h100-64gb", window_s=300.0, workers=1,
                    max_runs=3)
    tried = rec.candidates.dropna(subset=["ver_throughput"])
    probes = tried[tried["ver_full"] == False]   # noqa: E712 (an object column)
    assert len(probes) >= 1
    assert (probes["ver_simulated_s"] == EarlyExit().probe_s(300.0)).all()
    lines = rec.report().splitlines()
    for m in probes["max_loras"]:
        line = next(x for x in lines if f"max_loras={int(m):>3}:" in x)
        assert "not a full run" in line and "TTFT" not in line and "first 60 s" in line
    assert set(tried["ver_full"]) <= {True, False}

"""The SLO search over the enlarged space (issue 16): the new knobs change what the twin
measures, the optimizers find the optimum of a space small enough to run whole, TPE is
deterministic by seed, the cost objective's GPU count is the exhaustive one, and an
infeasible cost is said plainly. Small synthetic traces, the default profile."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from twin.costs.profile import load_profile
from twin.ml.cost import cost_plan
from twin.ml.optimize import optuna_version
from twin.ml.placement import _partition
from twin.ml.units import Units
from twin.ml.recommend import recommend
from twin.ml.recommender import Recommender
from twin.ml.search_space import search_space
from twin.ml.spec import paper_base
from twin.sim.engine import simulate
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import rate_class_trace

WINDOW = 60.0
needs_optuna = pytest.mark.skipif(optuna_version() is None, reason="optuna not installed")


def _cat(n: int) -> AdapterCatalog:
    return AdapterCatalog(pd.DataFrame({"adapter": [f"lora-{i}" for i in range(n)],
                                        "rank": [16] * n}))


@pytest.fixture(scope="module")
def setup():
    tr = rate_class_trace(6, (2.0, 1.0, 0.5), duration_s=WINDOW, seed=7)
    return tr, _cat(6), load_profile(None), Recommender.load()


def _run(setup, **cfg):
    tr, cat, profile, _ = setup
    base = paper_base().replace(max_loras=6, max_cpu_loras=6)
    return simulate(tr, base.replace(**cfg), profile, cat, window_s=WINDOW).summary


def test_new_knobs_change_what_the_twin_measures(setup):
    lo, hi = _run(setup, gpu_memory_utilization=0.80), _run(setup, gpu_memory_utilization=0.95)
    assert lo["kv_cache"]["capacity_tokens"] < hi["kv_cache"]["capacity_tokens"]
    r16, r64 = _run(setup, max_lora_rank=16), _run(setup, max_lora_rank=64)
    assert r64["tpot_ms"]["median"] > r16["tpot_ms"]["median"]   # padding: slower steps
    assert r64["kv_cache"]["capacity_tokens"] < r16["kv_cache"]["capacity_tokens"]
    few = _run(setup, max_loras=2, max_cpu_loras=2)
    many = _run(setup, max_loras=2, max_cpu_loras=6)   # host cache: fewer disk loads
    assert few["ttft_ms"]["p99"] > many["ttft_ms"]["p99"]


SLO = {"ttft": 1000.0, "tpot": 25.0}
KNOBS = ("max_loras", "max_num_seqs")
SIZE = search_space(6, 16, paper_base(), knobs=KNOBS).size()


def _rec(setup, **kw):
    tr, cat, profile, model = setup
    return recommend(tr, cat, profile=profile, model=model, window_s=WINDOW,
                     objective="goodput", slo=SLO, workers=1, knobs=KNOBS, **kw)


def _goodput(rec) -> float:
    return rec.verified["goodput"] if rec.ok else 0.0


@pytest.fixture(scope="module")
def exhaustive(setup):
    return _rec(setup, max_runs=SIZE + 4)   # auto: the whole space fits the budget


def test_auto_runs_the_whole_space_when_it_fits(exhaustive):
    s = exhaustive.search
    assert s["optimizer"] == "exhaustive"
    assert set(s["space"]["knobs"]) == set(KNOBS) and s["space"]["size"] == SIZE
    ran = {(t["max_loras"], t["max_num_seqs"]) for t in s["trials"]}
    assert len(ran) >= SIZE
    assert exhaustive.ok and exhaustive.slo_verdict["met"]


def test_exhaustive_refused_when_the_space_exceeds_the_budget(setup, monkeypatch):
    from types import SimpleNamespace

    import twin.ml.recommend as rm

    from twin.errors import TwinInputError
    from twin.ml.optimize import choose

    space = search_space(6, 16, paper_base(), knobs=KNOBS)
    T = SimpleNamespace(space=space, index={}, results={}, max_runs=3, budget=lambda: 3)
    with pytest.raises(TwinInputError, match=f"space: {SIZE} .*--max-runs {SIZE} or more"):
        choose("exhaustive", T)
    T.max_runs, T.budget = SIZE, lambda: SIZE
    assert choose("exhaustive", T)[0] == "exhaustive"
    # refused before any twin run (it came after the max_loras walk's runs: for
    # --objective cost, after minutes of place's runs)
    monkeypatch.setattr(rm, "Verifier", lambda *a, **k: pytest.fail("a twin run started"))
    with pytest.raises(TwinInputError, match="--optimizer exhaustive runs every"):
        _rec(setup, optimizer="exhaustive", max_runs=3)   # the search: refused, not cut


@pytest.mark.parametrize("optimizer", [pytest.param("tpe", marks=needs_optuna), "coordinate"])
def test_optimizer_finds_the_exhaustive_optimum(setup, exhaustive, optimizer):
    budget = SIZE // 2
    rec = _rec(setup, optimizer=optimizer, max_runs=budget)
    assert rec.search["optimizer"] == optimizer and rec.runs <= budget
    assert rec.ok
    assert _goodput(rec) >= 0.99 * _goodput(exhaustive)


@needs_optuna
def test_tpe_is_deterministic_by_seed_and_records_its_trials(setup):
    a = _rec(setup, optimizer="tpe", seed=3, max_runs=8)
    b = _rec(setup, optimizer="tpe", seed=3, max_runs=8)
    ta, tb = a.search["trials"], b.search["trials"]
    assert [(t["max_loras"], t["max_num_seqs"]) for t in ta] == \
        [(t["max_loras"], t["max_num_seqs"]) for t in tb]
    assert len(ta) == a.runs <= 8 and {t["search"] for t in ta} >= {"max_loras", "tpe"}
    d = json.loads(json.dumps(a.to_dict(), default=str))
    assert d["search"]["optimizer"] == "tpe" and d["search"]["seed"] == 3
    assert d["explanation"]["targets"]["achieved"]["features"]


@needs_optuna
def test_study_db_resumes_without_running_again(setup, tmp_path, trace_files):
    from twin.cli import main

    tp, cp = trace_files(*setup[:2])
    out = tmp_path / "rec"
    args = ["recommend", "--trace", str(tp), "--catalog", str(cp), "--window-s", str(WINDOW),
            "--objective", "goodput", "--slo", "ttft=1000,tpot=25", "--optimizer", "tpe",
            "--max-runs", "6", "--workers", "1", "--no-plot", "--study-db", "--out", str(out)]
    assert main(args) == 0 and (out / "study.db").stat().st_size > 0
    first = json.loads((out / "recommendation.json").read_text())["search"]["trials"]
    assert main(args) == 0   # the study in OUT/study.db is resumed: nothing run again
    again = json.loads((out / "recommendation.json").read_text())["search"]["trials"]
    resumed = [t for t in again if t.get("resumed")]
    assert len(first) == 6 and len(resumed) >= 4
    assert not (tmp_path / ".rec.study.db").exists()   # the working copy is gone
    assert _as_help_says(out, "goodput") and (out / "vllm_config.yaml").is_file()


def _exhaustive_gpus(tr, cat, profile, model, slo, max_gpus):
    """The fewest k whose load-balanced partition has, on every GPU, a configuration of
    the space meeting the SLOs (every configuration run)."""
    U = Units(tr, cat)
    rank = {a: cat.rank(a) for a in cat.adapters}
    for k in range(1, max_gpus + 1):
        ok = True
        for g in _partition(U, rank, k):
            t, c = U.sub(g)
            r = recommend(t, c, profile=profile, model=model, window_s=WINDOW,
                          objective="goodput", slo=slo, workers=1, knobs=("max_loras",),
                          optimizer="exhaustive", max_runs=50)
            ok = ok and r.ok
        if ok:
            return k
    return None


def test_cost_gpus_equal_the_exhaustive_count(setup):
    tr, cat, profile, model = setup
    slo = {"ttft": 1000.0, "tpot": 20.0}
    plan = cost_plan(tr, cat, slo=slo, profile=profile, model=model, window_s=WINDOW,
                     max_gpus=3, max_runs=50, workers=1, gpu_price=2.0,
                     optimizer="exhaustive", knobs=("max_loras",))
    want = _exhaustive_gpus(tr, cat, profile, model, slo, 3)
    assert want is not None and want > 1
    assert plan.ok and plan.gpus == want
    assert plan.per_hour == pytest.approx(2.0 * want)
    assert all(c["gpus_verified"] <= c["gpus"] for c in plan.placement.curve)
    met = [c for c in plan.placement.curve if c["met"]]
    assert met and min(c["gpus"] for c in met) == want
    assert all(c["ttft_p99"] <= slo["ttft"] for c in met)


def _cli_cost(setup, trace_files, out, slo: str, max_gpus: int, max_runs: int, *extra):
    """``twin recommend --objective cost`` on the setup's trace: its exit status."""
    from twin.cli import main

    tr, cat, _, _ = setup
    tp, cp = trace_files(tr, cat)
    return main(["recommend", "--trace", str(tp), "--catalog", str(cp), "--window-s",
                 str(WINDOW), "--objective", "cost", "--slo", slo, "--max-gpus",
                 str(max_gpus), "--max-runs", str(max_runs), "--optimizer", "coordinate",
                 "--workers", "1", "--out", str(out), *extra])


def _as_help_says(out, objective: str) -> bool:
    """Whether every file in ``out`` is one `twin recommend --help` says ``objective``
    writes (gpu-<i>/ for each GPU's folder)."""
    import re

    from twin.cli.ml_help import RECOMMEND_WRITES
    from twin.outputs import MARKER

    written = {re.sub(r"^gpu-\d+/", "gpu-<i>/", p.relative_to(out).as_posix())
               for p in out.rglob("*") if p.is_file() and p.name != MARKER}
    return written <= set(RECOMMEND_WRITES[objective]) | {"study.db"}


def test_cost_infeasible_is_said_plainly(setup, tmp_path, trace_files, capsys):
    out = tmp_path / "cost"
    rc = _cli_cost(setup, trace_files, out, "ttft=1,tpot=0.5", 2, 3)
    assert rc == 3
    assert "NO placement on up to 2 GPU(s) meets the SLOs" in capsys.readouterr().out
    d = json.loads((out / "cost.json").read_text())
    assert d["ok"] is False and d["gpus"] is None and d["max_gpus"] == 2
    assert (out / "cost_curve.png").stat().st_size > 0
    assert _as_help_says(out, "cost")


def test_frontier_plot_and_help(exhaustive, tmp_path, capsys):
    from twin.cli import main
    from twin.ml.slo_plots import plot_slo_frontier, top_knobs

    t = pd.DataFrame(exhaustive.search["trials"])
    assert set(top_knobs(t, KNOBS)) == set(KNOBS)
    png = plot_slo_frontier(exhaustive.search, SLO, tmp_path / "f.png", chosen=exhaustive.config)
    assert png.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["recommend", "--help"])
    text = capsys.readouterr().out
    for flag in ("--optimizer", "--seed", "--study-db", "--gpu-price", "--max-gpus", "cost"):
        assert flag in text


def test_without_optuna_auto_falls_back_to_the_coordinate_walk(setup, monkeypatch):
    monkeypatch.setattr("twin.ml.optimize.optuna_version", lambda: None)
    rec = _rec(setup, max_runs=6)
    assert rec.search["optimizer"] == "coordinate" and "not installed" in rec.search["why"]
    assert "search: coordinate (optuna is not installed" in rec.report()


def test_cost_price_defaults_to_the_gpus_list_price_and_says_where_from():
    from twin.costs.gpus import GPU_PRICES, GPUS, list_price
    from twin.ml.cost import price_of

    for key, p in GPU_PRICES.items():   # every price names its GPU, provider and date
        assert key in GPUS and p["usd_per_hour"] > 0 and p["source"]
        assert len(p["as_of"]) == 10 and p["as_of"].startswith("20")
    price, why = price_of(None, None)   # the default profile: the 64 GB H100
    assert price == GPU_PRICES["h100-64gb"]["usd_per_hour"]
    assert "list price" in why and GPU_PRICES["h100-64gb"]["as_of"] in why
    assert price_of(None, 1.5) == (1.5, "--gpu-price")
    assert price_of("cpu-tiny", None)[0] is None   # no board, no price: said, not guessed
    hw = dict(GPUS["l4"], key="l4", tensor_parallel_size=2)   # per GPU, whatever the TP
    assert list_price(hw)["usd_per_hour"] == GPU_PRICES["l4"]["usd_per_hour"]
    assert list_price({"name": "some other board"}) is None


def test_a_tensor_parallel_placement_counts_and_prices_every_gpu():
    """Servers of a TP-4 profile span 4 GPUs each: 2 servers are 8 GPUs, priced per
    GPU-hour as --gpu-price says (they were '2 GPUs' and 2 x the price: 4x too cheap, and
    the list price, multiplied by the TP, disagreed with --gpu-price by 4x)."""
    from twin.ml.cost import CostPlan
    from twin.ml.report import GPUPlan, Placement

    def placement(tp):
        return Placement([GPUPlan(0, (), [], None), GPUPlan(1, (), [], None)],
                         pd.DataFrame(), True, 0.1, 4, [], {}, gpus_per_server=tp)

    pl = placement(4)
    assert pl.total_gpus == 8 and "2 server(s) x 4 GPUs (tensor parallel) = 8 GPUs" in pl.report()
    plan = CostPlan(slo={"ttft": 1000.0}, gpus=2, max_gpus=8, placement=pl, one_gpu=None,
                    offered_tps=1000.0, gpu_price=3.0, price_source="--gpu-price")
    assert plan.total_gpus == 8 and plan.per_hour == pytest.approx(24.0)
    assert "cost: 8 x $3/GPU-hour = $24.00/hour" in plan.report()
    d = plan.to_dict()
    assert (d["gpus"], d["gpus_per_server"], d["total_gpus"]) == (2, 4, 8)
    one = CostPlan(slo={"ttft": 1000.0}, gpus=2, max_gpus=8, placement=placement(1),
                   one_gpu=None, offered_tps=1000.0, gpu_price=3.0, price_source="x")
    assert one.per_hour == pytest.approx(6.0) and "2 GPU(s)" in one.placement.report()


def test_cli_cost_checks_the_slos_on_the_whole_fleet(setup, tmp_path, trace_files, capsys):
    tr = setup[0]
    out = tmp_path / "cost"
    rc = _cli_cost(setup, trace_files, out, "ttft=1000,tpot=20", 3, 6, "--no-plot")
    text = capsys.readouterr().out
    d = json.loads((out / "cost.json").read_text())
    assert d["ok"] and d["gpus"] >= 2
    check = d["fleet_check"]
    sc = check["slo_check"]
    assert check["gpus"] == d["gpus"] and sc["slo"] == {"ttft": 1000.0, "tpot": 20.0}
    assert sum(g["requests"] for g in check["per_gpu"]) == len(tr)
    assert sc["met"] == (sc["ttft_p99"] <= 1000.0 and sc["tpot_p99"] <= 20.0)
    assert rc == (0 if sc["met"] and check["keeps_up"] else 3)
    assert "on the fleet's requests" in text
    assert _as_help_says(out, "cost") and (out / "gpu-0" / "vllm_args.txt").is_file()
    assert "list price" in d["gpu_price_source"] and d["per_hour"] > 0
    assert "price: public on-demand list price" in text


def test_a_model_that_predicts_starving_everywhere_does_not_make_a_placement(setup,
                                                                             monkeypatch):
    """Every count up to ``max_gpus`` predicted to starve: the last one is still verified
    on the twin, and a partition no twin run verified is no placement (``ok`` False), not
    one whose GPUs, never run, count as meeting the SLOs."""
    from twin.ml import placement

    tr, cat, profile, model = setup
    monkeypatch.setattr(placement._Search, "predicted_ok", lambda self, units: False)
    pl = placement.place(tr, cat, profile=profile, model=model, window_s=WINDOW, max_gpus=2,
                         max_runs=2, workers=1, objective="goodput",
                         slo={"ttft": 1.0, "tpot": 0.5}, search_kw={"optimizer": "coordinate"})
    assert not pl.ok
    assert "2 GPU(s): verification failed" in pl.attempts
    assert "2 GPU(s): predicted to starve" not in pl.attempts


def test_every_report_counts_tensor_parallel_servers_in_the_same_words():
    """The cost report, the placement and the recommendation's fewest-GPUs line name a
    count of TP servers one way (two writings of it had drifted apart)."""
    from twin.ml.cost import CostPlan
    from twin.ml.report import GPUPlan, Placement, servers_text

    assert servers_text(3) == "3 GPU(s)" and servers_text(3, bare=True) == "3"
    tp4 = "2 server(s) x 4 GPUs (tensor parallel) = 8 GPUs"
    assert servers_text(2, 4) == servers_text(2, 4, bare=True) == tp4
    pl = Placement([GPUPlan(0, (), [], None), GPUPlan(1, (), [], None)], pd.DataFrame(),
                   True, 0.1, 4, [], {}, gpus_per_server=4)
    plan = CostPlan(slo={"ttft": 1000.0}, gpus=2, max_gpus=8, placement=pl, one_gpu=None,
                    offered_tps=1000.0, gpu_price=None, price_source=None)
    assert plan.report().splitlines()[0].endswith(": " + tp4)
    assert pl.report().startswith(tp4)

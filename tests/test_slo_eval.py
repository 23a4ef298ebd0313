"""The SLO evaluation's arithmetic (issue 16) on cases whose answer is known by construction,
the calibrated latency heads against the first ones, and the model file's latency error."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from twin.ml.ensemble import TreeEnsemble
from twin.ml.features import ROW_FEATURES
from twin.ml.latency import HEAD_FEATURES, heldout_error
from twin.ml.recommender import Recommender
from twin.ml.report import stated_latency_error
from twin.ml.slo_eval import exhaustive_best, headline, score_case, slo_levels
from twin.ml.spec import paper_base
from twin.ml.verify import goodput, goodput_of, request_latencies


def _run(ttft, tpot, tokens=100, *, starving=False, starts=True, full=True, n=10):
    """A twin run whose n requests all have these TTFT/TPOT (ms) and tokens, over 10 s:
    its p99s are those values and its goodput is n*tokens/10 when it meets an SLO."""
    return {"starts": starts, "full": full, "starving": starving, "ttft_p99": float(ttft),
            "tpot_p99": float(tpot), "duration_s": 10.0, "config": f"cfg-{ttft}-{tpot}",
            "latencies": {"ttft_ms": np.full(n, float(ttft)), "tpot_ms": np.full(n, float(tpot)),
                          "tokens": np.full(n, float(tokens))}}


# A: fast, 1,000 tok over 10 s; B: slower TTFT, twice the tokens; C: fastest but starving
# (never counts); D: does not start.
RUNS = [_run(100, 10), _run(300, 10, tokens=200), _run(50, 5, starving=True),
        _run(0, 0, starts=False)]


def test_levels_and_exhaustive_best_ignore_runs_that_do_not_keep_up():
    lv = slo_levels(RUNS)
    assert lv["tight"] == {"ttft": 125.0, "tpot": 12.5}   # 1.25 x (100, 10), not C's 50/5
    assert exhaustive_best(RUNS, {"ttft": 150, "tpot": 20}) == (0, 100.0)   # only A meets
    assert exhaustive_best(RUNS, {"ttft": 400, "tpot": 20}) == (1, 200.0)   # B has more
    assert exhaustive_best(RUNS, {"ttft": 60, "tpot": 20})[0] is None
    assert slo_levels([RUNS[2], RUNS[3]]) == {}
    # nothing keeps up on one GPU: one level, relative to the 2-GPU split's worse GPU
    two = [[_run(40, 8)], [_run(60, 6), _run(300, 12)]]
    assert slo_levels([RUNS[2], RUNS[3]], two) == {"overload": {"ttft": 120.0, "tpot": 16.0}}
    assert slo_levels([RUNS[2]], [[RUNS[2]], [_run(60, 6)]]) == {}
    # "beyond": only when two GPUs lower the best p99 TTFT by > 10 %: geometric mean
    split = [[_run(25, 10)], [_run(64, 10)]]
    assert slo_levels(RUNS, split)["beyond"] == {"ttft": 80.0, "tpot": 20.0}
    assert "beyond" not in slo_levels(RUNS, [[_run(95, 10)], [_run(95, 10)]])


def test_case_figures_known_by_construction():
    feasible = {"ttft": 150, "tpot": 20}      # exhaustive best: A, goodput 100
    impossible = {"ttft": 60, "tpot": 20}     # nothing on one GPU
    ok_pick = {"ok": True, "gpus": 1, "goodput": 98.0, "ttft_p99": 100.0, "tpot_p99": 10.0,
               "starving": False, "full": True}
    c = score_case(RUNS, feasible, ok_pick)
    assert c["feasible"] and c["gap_pct"] == pytest.approx(2.0) and not c["violation"]
    assert c["gpus_gap"] == 0
    # a pick whose own run misses the SLO is a violation
    bad = score_case(RUNS, feasible, {**ok_pick, "ttft_p99": 151.0})
    assert bad["violation"]
    # a feasible SLO refused: the whole goodput is lost
    assert score_case(RUNS, feasible, {"ok": False, "gpus": 2})["gap_pct"] == 100.0
    # infeasible on one GPU: refused with 2 GPUs -> detected, at the minimum
    two = score_case(RUNS, impossible, {"ok": False, "gpus": 2})
    assert not two["feasible"] and two["infeasible_detected"] and two["gpus_gap"] == 0
    # 3 GPUs given where an even 2-GPU split meets it: one too many
    three = score_case(RUNS, impossible, {"ok": False, "gpus": 3}, feasible_2gpu=True)
    assert three["infeasible_detected"] and three["gpus_gap"] == 1
    # refused without a GPU count: not detected (when some count is known to work)
    none = score_case(RUNS, impossible, {"ok": False, "gpus": None}, feasible_2gpu=True)
    assert not none["infeasible_detected"] and none["multi_gpu_known"]
    # recommended on one GPU although nothing there meets it: a violation
    assert score_case(RUNS, impossible, {**ok_pick, "ttft_p99": 100.0})["violation"]

    cases = pd.DataFrame([c, bad, two, three, none])
    cases["e2e_s"] = [1.0, 2.0, 3.0, 4.0, 5.0]
    pred = pd.DataFrame({"metric": ["ttft_p99", "ttft_p99", "tpot_p99"],
                         "predicted": [100.0, 300.0, 10.0], "twin": [100.0, 100.0, 10.0],
                         "base_knobs": [True, False, True]})
    h = headline(cases, pred)
    assert h["slo_violations"] == 1 and h["slo_cases"] == 5
    assert h["slo_gap_to_exhaustive_median_pct"] == pytest.approx(2.0)
    assert h["slo_infeasible_detected_pct"] == pytest.approx(200 / 3, abs=0.1)
    assert h["cost_gap_gpus_max"] == 1 and h["slo_recommend_e2e_median_s"] == 3.0
    assert h["pred_ttft_p99_smape_median"] == 50.0          # SMAPEs 0 and 100
    assert h["pred_ttft_p99_smape_median_base_knobs"] == 0.0
    # no run kept up anywhere: no pairs, no SMAPE (and no error)
    empty = pd.DataFrame(columns=["max_loras", "metric", "base_knobs", "predicted", "twin"])
    assert headline(cases, empty)["pred_ttft_p99_smape_median"] is None


def test_goodput_of_kept_latencies_equals_goodput_of_requests():
    rng = np.random.default_rng(0)
    n = 200
    arr = np.sort(rng.uniform(0, 50, n))
    first = arr + rng.exponential(0.5, n)
    gen = rng.integers(1, 200, n)
    req = pd.DataFrame({"status": np.where(rng.random(n) < 0.9, "finished", "aborted"),
                        "arrival_s": arr, "first_token_s": first,
                        "finish_s": first + gen * rng.uniform(0.01, 0.08, n),
                        "prompt_tokens": rng.integers(10, 900, n), "generated_tokens": gen})
    lat = request_latencies(req)
    for slo in ({"ttft": 500, "tpot": 40}, {"ttft": 2000}, None):
        assert goodput_of(lat, 50.0, slo) == pytest.approx(goodput(req, 50.0, slo))
    assert goodput_of(lat, 50.0, {"ttft": 500}) < goodput_of(lat, 50.0, None)


def test_exhaustive_space_is_the_reduced_search_space_less_configs_vllm_refuses():
    from twin.costs.profile import load_profile
    from twin.ml.search_space import LATENCY_GRID
    from twin.ml.recommender import candidate_table
    from twin.ml.slo_bench import SLO_KNOBS, space_configs

    profile, base = load_profile(None), paper_base()
    cfgs = space_configs(8, 16, base, profile, SLO_KNOBS)
    keys = {(c.max_loras, c.max_num_batched_tokens, c.max_num_seqs) for c in cfgs}
    assert len(keys) == len(cfgs)
    # every max_loras candidate recommend would consider x every latency-knob value it walks
    wf = {k: 1.0 for k in ROW_FEATURES} | {"n_adapters": 8.0, "offered_tps": 1000.0,
                                           "prompt_p99": 1.0}
    slots = set(candidate_table(Recommender.load(), wf, base, profile, 16)["max_loras"])
    grid = [sorted(set(v) | {int(getattr(base, k))}) for k, v in LATENCY_GRID.items()]
    assert keys == {(int(m), a, b) for m in slots for a in grid[0] for b in grid[1]}
    assert all(c.max_cpu_loras == 8 and c.max_lora_rank == 16 for c in cfgs)


def _queueing_rows(n_families=16, per=25, seed=0) -> pd.DataFrame:
    """Synthetic sweep rows: p99 TTFT explodes as the load nears a capacity set by an
    interaction of features (prompt length x slots x KV), as queueing does; above capacity
    the run starves (minutes of TTFT)."""
    rng = np.random.default_rng(seed)
    rows = []
    for fam in range(n_families):
        prompt, kv = rng.uniform(100, 1200), rng.uniform(2e5, 6e5)
        for _ in range(per):
            r = dict.fromkeys(HEAD_FEATURES, 0.0)
            slots = rng.choice([4, 8, 16, 32, 64])
            cap = 40.0 * (kv / 4e5) * min(1.0, slots / 16) * (300.0 / prompt)
            rate = rng.uniform(0.2, 1.3) * cap
            u = rate / cap
            r.update(prompt_mean=prompt, kv_tokens=kv, max_loras=slots, total_rate=rate)
            ttft = 60.0 * prompt / 300 * (1 + 1 / max(1 - u, 0.02) ** 2) * rng.lognormal(0, .1)
            r.update(family_key=f"f{fam}", full=True, starving=u >= 1.0,
                     ttft_p99=ttft * (50 if u >= 1 else 1), ttft_p50=ttft / 3,
                     tpot_p99=20 * (1 + u) * rng.lognormal(0, .05), tpot_p50=15.0)
            rows.append(r)
    return pd.DataFrame(rows)


def test_calibrated_latency_heads_beat_the_first_ones_on_held_out_families():
    rows = _queueing_rows()
    first = heldout_error(rows, n_splits=3, weighted=False, make=lambda t: TreeEnsemble(
        "regressor", n_estimators=80, max_depth=3, log_target=True))
    calibrated = heldout_error(rows, n_splits=3)
    assert calibrated["ttft_p99"]["smape_median"] < first["ttft_p99"]["smape_median"]
    assert calibrated["ttft_p99"]["rows"] == int((~rows["starving"]).sum())
    assert calibrated["folds"] == 3 and calibrated["families"] == 16


def test_model_file_records_latency_error_and_old_files_still_load(tmp_path):
    shipped = Recommender.load()
    err = {"ttft_p99": {"smape_median": 30.0, "smape_p90": 110.0, "rows": 500},
           "tpot_p99": {"smape_median": 10.0, "smape_p90": 30.0, "rows": 500},
           "families": 100, "folds": 5, "on": "held-out families"}
    path = Recommender(shipped.models, shipped.meta, latency_error=err).save(tmp_path / "m.json")
    back = Recommender.load(path)
    assert back.latency_error == err
    stated, source = stated_latency_error(back)
    assert stated == {"ttft_p99": 110.0, "tpot_p99": 30.0} and "p90" in source
    # a file saved before the field existed: loads, with no stated error (factor 2 default)
    d = json.loads(path.read_text())
    del d["latency_error"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(d))
    assert Recommender.load(old).latency_error is None
    assert stated_latency_error(Recommender.load(old))[0] == {}
    # a malformed error is refused by the schema, naming the file
    d["latency_error"] = {**err, "ttft_p99": {"smape_median": -1, "smape_p90": 1, "rows": 1}}
    old.write_text(json.dumps(d))
    with pytest.raises(Exception, match="old.json"):
        Recommender.load(old)

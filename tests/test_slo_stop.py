"""The SLO early exit (twin/ml/slo_stop.py): its count rule proves numpy's p99 over the SLO
(property test), a run it stops misses the SLO in full and is reported as stopped, never
with a full run's figures, a run that meets the SLO is never stopped (and equals a plain
run), and recommend reports stopped runs and takes its best achievable p99s from full runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.config import ServingConfig
from twin.costs.profile import load_profile
from twin.ml.recommend import _search, recommend
from twin.ml.recommender import Recommender
from twin.ml.slo_plots import plot_slo_frontier
from twin.ml.slo_stop import count_needed
from twin.ml.sweep import EarlyExit, simulate_point
from twin.ml.verify import Verifier
from twin.sim.engine import simulate
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import rate_class_trace

WINDOW = 60.0


@settings(max_examples=300, deadline=None)
@given(n_max=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1),
       slo=st.floats(0.001, 1e4, allow_nan=False), data=st.data())
def test_count_rule_proves_numpys_p99_over_the_slo(n_max, seed, slo, data):
    """Any array of n <= n_max values of which count_needed(n_max) are over the SLO has
    np.percentile(x, 99) > SLO: values over it barely (next float up) or far, the rest
    anywhere at or below it, the scale of the summary (s, then x 1000) included."""
    rng = np.random.default_rng(seed)
    k = count_needed(n_max)
    n = data.draw(st.integers(min(k, n_max), n_max))
    over = np.nextafter(slo, np.inf) + rng.exponential(slo, k) * rng.integers(0, 2, k)
    rest = slo - rng.exponential(slo, n - k) * rng.integers(0, 2, n - k)
    x = rng.permutation(np.r_[over, rest])
    assert np.percentile(x, 99) > slo
    # as the twin's summary computes it: seconds, the p99, then x 1000; counted in ms
    secs = x / 1000.0
    if np.count_nonzero(secs * 1000.0 > slo) >= k:
        assert np.percentile(secs, 99) * 1000.0 > slo


def test_count_rule_is_numpys_index_and_not_looser():
    # n - floor(0.99 (n - 1)): 1 value of 1, 2 of 100, 11 of 1000, the max over n <= N
    assert [count_needed(n) for n in (1, 2, 100, 101, 1000)] == [1, 2, 2, 2, 11]
    # one fewer can leave the p99 at the SLO: n = 101 (index 99 exactly), 1 value over it
    x = np.r_[np.full(100, 5.0), 9.0]
    assert np.percentile(x, 99) == 5.0


@pytest.fixture(scope="module")
def setup():
    tr = rate_class_trace(6, (3.0, 1.5, 0.75), duration_s=WINDOW, seed=7)
    cat = AdapterCatalog(pd.DataFrame({"adapter": [f"lora-{i}" for i in range(6)],
                                       "rank": [16] * 6}))
    return tr, cat, load_profile(None)


def _cfg(**kw) -> ServingConfig:
    return ServingConfig(**{"max_loras": 2, "max_cpu_loras": 6, "max_lora_rank": 16,
                            "max_num_seqs": 16, "max_num_batched_tokens": 2048, **kw})


NO_PROBE = EarlyExit(enabled=False)


@pytest.mark.parametrize("cfg", [_cfg(), _cfg(max_loras=6, max_num_seqs=256)])
def test_stopped_only_when_the_full_run_misses_and_never_when_it_meets(setup, cfg):
    tr, cat, profile = setup
    full = simulate(tr, cfg, profile, cat, window_s=WINDOW).summary
    p99 = {"ttft": full["ttft_ms"]["p99"], "tpot": full["tpot_ms"]["p99"]}
    for metric in ("ttft", "tpot"):
        for f in (0.05, 0.2, 0.4, 0.5, 0.9, 1.0, 1.5):
            slo = {metric: p99[metric] * f}
            s, is_full, sim_s, res = simulate_point(tr, cat, cfg, profile, WINDOW, NO_PROBE,
                                                    slo=slo)
            if not is_full:   # stopped: the full run misses 2x, within the bounds proven
                assert p99[metric] > 2 * slo[metric]
                for m, lb in res.meta["slo_stop"]["lower_bounds"].items():
                    assert lb is None or lb <= full[f"{m[:4]}_ms"]["p99"]
                assert sim_s < WINDOW and res.meta["stopped_s"] == sim_s
            if f >= 0.5:      # missed by < 2x or met: never stopped, the plain run's figures
                assert is_full and s["ttft_ms"] == full["ttft_ms"] \
                    and s["total_throughput"] == full["total_throughput"]


def _verify_missed_10x(setup, window_s):
    """The plain run's summary, then the verification of an SLO it misses 10x (stopped at
    2x) and the same run in full: (summary, slo, stopped figures, full figures)."""
    tr, cat, profile = setup
    cfg = _cfg()
    full = simulate(tr, cfg, profile, cat, window_s=window_s).summary
    slo = {"ttft": full["ttft_ms"]["p99"] / 10, "tpot": 1e6}
    ver = Verifier(tr, cat, profile, window_s, slo, NO_PROBE, workers=1)
    try:
        (_, r), = ver.run([(0, cfg)])
        (_, f), = ver.run_full([(0, cfg)])
    finally:
        ver.close()
    return full, slo, r, f


def test_a_stopped_verification_is_reported_as_stopped(setup):
    full, slo, r, f = _verify_missed_10x(setup, WINDOW)
    assert r["full"] is False and r["slo_violated_early"] is True
    assert 0 < r["stopped_s"] < WINDOW
    assert r["slo_proven"].startswith("p99 TTFT >= ")
    assert f"over 2 x the SLO of {slo['ttft']:g} ms (proven at t=" in r["slo_proven"]
    assert all(np.isnan(r[k]) for k in ("ttft_p99", "tpot_p99", "throughput"))
    # the bounds proven are bounds of the full run's p99s
    lb = r["p99_lower_bounds"]
    assert 2 * slo["ttft"] < lb["ttft_p99"] <= full["ttft_ms"]["p99"]
    assert lb["tpot_p99"] is None or lb["tpot_p99"] <= full["tpot_ms"]["p99"]
    assert r["starving"] is None and r["slo_violation_lower_bound"] > 2
    # goodput: what the stopped run proves at least
    assert 0 <= r["goodput"] <= f["goodput"]
    assert f["full"] is True and f["ttft_p99"] == pytest.approx(full["ttft_ms"]["p99"])


def test_infeasible_recommendation_reports_stops_and_full_best(setup, tmp_path):
    profile = setup[2]
    tr = rate_class_trace(6, (1.0, 0.5, 0.25), duration_s=WINDOW, seed=7)   # keeps up
    cat = setup[1]
    slo = {"ttft": 1.0, "tpot": 0.5}   # nothing reaches it: runs are stopped early
    rec = recommend(tr, cat, profile=profile, model=Recommender.load(), window_s=WINDOW,
                    objective="goodput", slo=slo, workers=1, max_runs=6)
    assert not rec.ok
    res = rec.search["trials"]
    stopped = [t for t in res if t.get("slo_violated_early")]
    assert stopped, "an SLO of 1 ms is proven missed well within the window"
    sv = rec.slo_verdict
    assert sv["stopped_early"] == len(stopped)
    # the best achievable p99s are those of full runs (a rerun of a stopped one included)
    full = [t for t in res if t["full"] and t["starving"] is False]
    assert full and sv["best"]["ttft_p99"]["value"] == min(t["ttft_p99"] for t in full)
    assert set(rec.search["reruns"]) <= set(rec.candidates.index)
    text = rec.report()
    assert "stopped early, p99 TTFT >= " in text
    assert "stopped once proven to miss them by 2x" in text
    # the frontier plot draws stopped runs at their proven bound
    assert plot_slo_frontier(rec.search, slo, tmp_path / "f.png").stat().st_size > 0


def test_throughput_objective_with_an_slo_runs_every_verification_in_full(setup):
    """The throughput objective ranks runs by throughput, which a stopped run lacks: with
    an SLO given (reported as goodput) its runs are never stopped early (a stopped run
    counted as keeping up left nothing to rank, a crash)."""
    tr = rate_class_trace(6, (1.0, 0.5, 0.25), duration_s=WINDOW, seed=7)
    rec = recommend(tr, setup[1], profile=setup[2], model=Recommender.load(),
                    window_s=WINDOW, objective="throughput", slo={"ttft": 1.0, "tpot": 0.5},
                    workers=1, max_runs=4)
    ran = rec.candidates.dropna(subset=["ver_starts"])
    assert len(ran) == rec.runs > 0
    assert ran["ver_slo_proven"].isna().all() and ran["ver_throughput"].notna().all()
    assert rec.ok and rec.verified["full"] and np.isfinite(rec.verified["throughput"])


def test_a_stopped_run_ends_its_timeline_with_one_sample_at_the_stop(setup):
    """The engine samples the timeline, then asks the stop rule; ``simulate`` samples again
    at its end, the same time and state, and the result keeps one row per time
    (``build_result``): the timeline ends at the stop, with the unstopped run's samples."""
    tr, cat, profile = setup
    cfg = _cfg()
    every = simulate(tr, cfg, profile, cat, window_s=WINDOW).timeline
    asked = []

    def stop(now, outcomes):
        asked.append(now)
        return len(asked) == 20

    res = simulate(tr, cfg, profile, cat, window_s=WINDOW, stop=stop)
    t = res.timeline["time_s"].to_numpy()
    assert res.meta["stopped_s"] == asked[-1] == t[-1] and (np.diff(t) > 0).all()
    # up to the stop, the very samples of the run that was not stopped
    pd.testing.assert_frame_equal(res.timeline, every.iloc[:len(t)], check_dtype=False)


def test_a_stopped_verification_without_a_window_has_no_goodput(setup):
    """Without a window the run's length is not known at the stop: its goodput is NaN, not
    the SLO-meeting tokens per second of the run so far (an overstatement)."""
    _, _, r, f = _verify_missed_10x(setup, None)
    assert r["slo_violated_early"] and np.isnan(r["goodput"])
    assert f["full"] and np.isfinite(f["goodput"])


class _Runs:
    """A verifier of fixed figures per candidate row: rows of ``stopped`` ({row: the
    violation bound proven}) stop early with a high partial goodput, the others keep up
    with ``goodput``."""

    workers = 2

    def __init__(self, goodput: dict, stopped: dict | None = None):
        self.goodput, self.stopped, self.seen = goodput, stopped or {}, []

    def run(self, items):
        out = []
        for i, _ in items:
            self.seen.append(i)
            if i in self.stopped:
                r = {"starts": True, "full": False, "starving": None,
                     "slo_violated_early": True, "slo_violation_lower_bound": self.stopped[i],
                     "goodput": 1e6, "ttft_p99": float("nan")}
            else:
                r = {"starts": True, "full": True, "starving": False,
                     "goodput": self.goodput[i], "ttft_p99": 100.0}
            out.append((i, r))
        return out


def _search_over(ver, n=6, start=2, max_runs=4):
    """The max_loras walk (``_search``) over ``n`` candidates, every neighbour promising."""
    cand = pd.DataFrame({"_config": [_cfg(max_loras=m + 1) for m in range(n)],
                         "pred_p_starve": 0.0, "pred_achieved": 1.0, "pred_ok": True})
    score = np.ones(n)   # every neighbour predicted as good: promising
    return _search(cand, score, start, ver, max_runs, "goodput", "goodput")


def test_max_loras_walk_ranks_a_stopped_run_as_missing_the_slos():
    """A run stopped once proven to miss the SLOs by 2x counts as missing them: the walk goes
    on from the best full run, not from the stopped one for its partial goodput; among
    stopped runs only, from the one proven to miss them least."""
    down = {i: 100.0 * (6 - i) for i in range(6)}   # full runs: fewer slots, more goodput
    ver = _Runs(down, stopped={2: 2.5})
    res = _search_over(ver)
    assert ver.seen[:2] == [2, 3]   # the predicted best and its upper neighbour, together
    assert 4 in res and 1 not in res   # from row 3 (the full run) on, not from row 2
    ver = _Runs(down, stopped={2: 3.0, 3: 2.2})
    assert 4 in _search_over(ver) and 1 not in ver.seen   # from row 3: proven nearer
    ver = _Runs(down, stopped={2: 2.2, 3: 3.0})
    assert 1 in _search_over(ver) and 4 not in ver.seen
    # with no stopped run the walk goes from row 2 (the best) down
    ver = _Runs(down)
    assert 1 in _search_over(ver) and 4 not in ver.seen


def test_a_probed_run_s_goodput_counts_only_what_met_the_slos():
    """A clearly starving run stopped after the early exit's probe: its goodput is what
    the probe proves, its requests that met the SLOs per second of the whole window, as
    for a run stopped on the SLOs (it was the probe's whole throughput, printed and stored
    as goodput for runs missing the SLOs by far)."""
    from twin.ml.verify import goodput

    tr = rate_class_trace(64, (1.6, 0.8, 0.4), duration_s=300.0, seed=0)
    cfg = ServingConfig(max_loras=8, max_cpu_loras=64)
    slo = {"ttft": 300.0, "tpot": 30.0}
    profile = load_profile("llama31-8b-h100-64gb")
    ver = Verifier(tr, None, profile, 300.0, slo, EarlyExit(), workers=1, slo_stop=False)
    try:
        (_, r), = ver.run([(0, cfg)])
    finally:
        ver.close()
    assert r["full"] is False and r["simulated_s"] == EarlyExit().probe_s(300.0)
    head = tr[tr["arrival_s"] <= r["simulated_s"]]
    probe = simulate(head, cfg, profile, window_s=r["simulated_s"])
    assert r["goodput"] == pytest.approx(goodput(probe.requests, 300.0, slo))
    assert r["goodput"] < 0.5 * r["throughput"]

"""The frontend's metrics scrapes (``twin.costs.frontend.Frontend.itl_scale``): each scrape
of ``/metrics`` stalls vLLM's API server for the ``vllm:lora_requests_info`` series it
renders, tokens reach a streaming client merged, and its mean ITL grows by
``1 / (1 − share of the time stalled beyond one step)``; a request or a first token that
lands in a stall waits for its end (mean TTFT). Off by default."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from twin.config import ServingConfig
from twin.costs import load_profile
from twin.costs.frontend import Frontend
from twin.costs.profile import Profile
from twin.sim import simulate


def test_the_scale_is_the_share_of_time_stalled_beyond_a_step_by_hand():
    """4 scrapes in 4 s (at 0.5, 1.5, 2.5, 3.5 s) of a run that ended with 1,000 series,
    grown evenly: they render 125, 375, 625, 875 series at 1 ms each; beyond a 0.2-s step
    the loop loses 0, 0.175, 0.425, 0.675 s of 4 s."""
    f = Frontend(metrics_scrape_hz=1.0, metrics_series_s=1e-3)
    lost = (0.175 + 0.425 + 0.675) / 4
    assert f.itl_scale(1000, 4.0, 0.2) == pytest.approx(1 / (1 - lost))
    # a stall shorter than a step merges nothing; more series, more merging
    assert f.itl_scale(100, 4.0, 0.2) == 1.0
    assert f.itl_scale(2000, 4.0, 0.2) > f.itl_scale(1000, 4.0, 0.2)
    # no scrapes (either field 0): no change
    for off in (Frontend(), Frontend(metrics_scrape_hz=1.0), Frontend(metrics_series_s=1e-3)):
        assert off.itl_scale(10**6, 3600.0, 0.02) == 1.0 and not off.scrapes


def test_the_ttft_wait_is_the_chance_of_landing_in_a_stall_times_its_half_by_hand():
    """Same scrapes: stalls of 0.125, 0.375, 0.625, 0.875 s in 4 s; a request's intake and
    its first token each land in stall k with chance S_k / 4 and wait S_k / 2."""
    f = Frontend(metrics_scrape_hz=1.0, metrics_series_s=1e-3)
    s = np.array([0.125, 0.375, 0.625, 0.875])
    assert f.ttft_wait_s(1000, 4.0) == pytest.approx(2 * float((s / 4 * s / 2).sum()))
    assert Frontend().ttft_wait_s(10**6, 3600.0) == 0.0


def test_the_closed_forms_are_the_sums_over_every_scrape():
    """Random scrape rates, costs, series, run lengths and steps: the scale and the wait
    equal the sums over each scrape's stall written out; a window of 10^12 s (a typo) costs
    no more than a short one (no array of its 10^11 scrapes)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        f = Frontend(metrics_scrape_hz=float(rng.uniform(0.05, 2.0)),
                     metrics_series_s=float(rng.uniform(1e-6, 1e-3)))
        series, dur, step = int(rng.integers(1, 50_000)), float(rng.uniform(1, 4000)), \
            float(rng.uniform(1e-3, 0.5))
        t = (np.arange(int(dur * f.metrics_scrape_hz)) + 0.5) / f.metrics_scrape_hz
        stall = f.metrics_series_s * series * t / dur
        lost = float(np.clip(stall - step, 0.0, None).sum()) / dur
        assert f.itl_scale(series, dur, step) == pytest.approx(1 / (1 - min(lost, 0.9)),
                                                               rel=1e-12)
        assert f.ttft_wait_s(series, dur) == pytest.approx(float((stall ** 2).sum()) / dur,
                                                           rel=1e-12)
    f = Frontend(metrics_scrape_hz=0.1, metrics_series_s=1.4e-5)
    for window in (1e12, 1e200):
        assert f.itl_scale(1000, window, 0.02) == 1.0 and 0 < f.ttft_wait_s(1000, window) < 1
    # a run with no decode gap (every output one token) has no mean ITL to scale
    assert f.itl_scale(1000, 100.0, float("nan")) == 1.0


def test_a_scraped_run_without_decode_gaps_or_in_a_vast_window_runs():
    """The shipped H100 profile scrapes /metrics: a trace of one-token outputs (no ITL),
    a window shorter than any step and one of 10^200 s all give a summary."""
    t = pd.DataFrame({"request_id": [0, 1, 2], "arrival_s": [0.0, 1.0, 2.0],
                      "adapter": pd.array(["a", "b", "a"], dtype="string"),
                      "prompt_tokens": [100, 200, 50], "output_tokens": [20, 20, 20]})
    cfg = ServingConfig(max_loras=2)
    assert load_profile("llama31-8b-h100-64gb").frontend.scrapes
    s = simulate(t.assign(output_tokens=1), cfg).summary
    assert s["completed"] == 3 and np.isnan(s["itl_ms"]["mean"])
    assert simulate(t, cfg, window_s=0.01).summary["completed"] == 0
    assert simulate(t, cfg, window_s=1e200).summary["completed"] == 3


def test_negative_or_nan_fields_are_refused_and_the_fields_round_trip():
    for bad in ({"metrics_scrape_hz": -1.0}, {"metrics_series_s": float("nan")}):
        with pytest.raises(ValueError, match="must be >= 0"):
            Frontend(**bad)
    f = Frontend(metrics_scrape_hz=0.4, metrics_series_s=2.2e-5)
    assert Frontend(**f.to_dict()) == f and not f.is_default
    assert Frontend().to_dict() == {"first_lora_request_s": 0.0}   # old profiles unchanged


def _trace(n=600, adapters=48, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"request_id": range(n), "arrival_s": np.sort(rng.uniform(0, 120, n)),
                         "prompt_tokens": rng.integers(20, 300, n),
                         "output_tokens": rng.integers(10, 120, n),
                         "adapter": [f"a{k}" for k in rng.integers(0, adapters, n)]})


def test_a_scraped_server_s_mean_itl_and_ttft_move_by_the_model_and_nothing_else_does():
    base = dataclasses.replace(load_profile("llama31-8b-h100-64gb"), frontend=Frontend())
    scraped = dataclasses.replace(base, frontend=Frontend(metrics_scrape_hz=0.5,
                                                          metrics_series_s=2e-4))
    assert isinstance(scraped, Profile)
    cfg = ServingConfig(max_loras=8, max_cpu_loras=48)
    a, b = (simulate(_trace(), cfg, p).summary for p in (base, scraped))
    scale = scraped.frontend.itl_scale(a["lora_running_sets"], a["duration_s"],
                                       a["itl_ms"]["mean"] / 1000)
    assert scale > 1.02
    assert b["itl_ms"]["mean"] == pytest.approx(a["itl_ms"]["mean"] * scale)
    wait = scraped.frontend.ttft_wait_s(a["lora_running_sets"], a["duration_s"])
    assert b["ttft_ms"]["mean"] == pytest.approx(a["ttft_ms"]["mean"] + 1000 * wait)
    assert wait > 0
    for k in ("total_throughput", "completed", "lora_running_sets", "tpot_ms"):
        assert b[k] == a[k]
    for q in ("median", "p99"):   # the means only
        assert b["ttft_ms"][q] == a["ttft_ms"][q]


def test_the_scrape_rate_is_read_from_the_runs_own_collectors():
    """``metrics_scrape``: the median of ``ts_samples / ts_span_s`` over the runs that report
    both (the others left out), the cost per series as given; no run to read, or a cost that
    is not positive, is an error that says so."""
    from types import SimpleNamespace

    from twin.calibrate.frontend_fit import metrics_scrape

    runs = [SimpleNamespace(extra={"ts_samples": n, "ts_span_s": 100.0}) for n in (30, 40, 90)]
    runs += [SimpleNamespace(extra={"ts_samples": 5}), SimpleNamespace(extra={})]
    front, report = metrics_scrape(runs, 2e-5)
    assert front.metrics_scrape_hz == pytest.approx(0.4) and front.metrics_series_s == 2e-5
    assert front.scrapes and front.first_lora_request_s == 0
    assert report["runs"] == 3 and report["quartiles_hz"] == [0.35, 0.65]
    with pytest.raises(ValueError, match="ts_samples"):
        metrics_scrape(runs[3:], 2e-5)
    with pytest.raises(ValueError, match="series_s"):
        metrics_scrape(runs, 0.0)


def test_a_fleet_s_means_carry_each_replica_s_own_stalls():
    """A combined result is recomputed from its servers' requests (the engines' times):
    each replica's scrape stalls are put back, its decode gaps at its own scale and its
    requests at its own wait, so the fleet's mean ITL and TTFT are its replicas' means
    weighted by gaps and by completed requests; without scrapes nothing moves."""
    import numpy as np

    from twin.fleet import simulate_fleet
    from twin.fleet.routers import StaticTable

    base = dataclasses.replace(load_profile("llama31-8b-h100-64gb"), frontend=Frontend())
    scraped = dataclasses.replace(base, frontend=Frontend(metrics_scrape_hz=0.5,
                                                          metrics_series_s=1e-3))
    trace = _trace(adapters=12)
    table = pd.DataFrame({"adapter": [f"a{k}" for k in range(12)],
                          "gpu": [k % 2 for k in range(12)], "weight": 1.0})
    cfg = ServingConfig(max_loras=4, max_cpu_loras=12)
    runs = {p: simulate_fleet(trace, 2, StaticTable(table), config=cfg, profile=prof,
                              workers=1)
            for p, prof in (("base", base), ("scraped", scraped))}
    parts = []
    for k in range(2):
        sub = trace[(table.set_index("adapter").loc[trace["adapter"], "gpu"] == k).to_numpy()]
        alone = simulate(sub.reset_index(drop=True), cfg, scraped)
        s, req = alone.summary, alone.requests
        done = req["status"] == "finished"
        parts.append((s, int((req["generated_tokens"][done] - 1).clip(lower=0).sum()),
                      s["completed"]))
    fleet = runs["scraped"].summary
    assert fleet["frontend_stalls"]["itl_scale"] > 1.02
    itl = sum(s["itl_ms"]["mean"] * g for s, g, _ in parts) / sum(g for _, g, _ in parts)
    ttft = sum(s["ttft_ms"]["mean"] * c for s, _, c in parts) / sum(c for *_, c in parts)
    assert fleet["itl_ms"]["mean"] == pytest.approx(itl, rel=1e-9)
    assert fleet["ttft_ms"]["mean"] == pytest.approx(ttft, rel=1e-9)
    plain = runs["base"].summary
    assert "frontend_stalls" not in plain
    assert plain["itl_ms"]["mean"] < fleet["itl_ms"]["mean"]
    assert np.isclose(plain["total_throughput"], fleet["total_throughput"])


def test_the_printed_summary_says_the_stalls_are_in_the_means_only():
    """A mean TTFT recomputed from requests.parquet is lower than the summary's by the
    stalls' wait: the printout says so, with the figures it added (it said nothing)."""
    base = dataclasses.replace(load_profile("llama31-8b-h100-64gb"), frontend=Frontend())
    scraped = dataclasses.replace(base, frontend=Frontend(metrics_scrape_hz=0.5,
                                                          metrics_series_s=2e-4))
    cfg = ServingConfig(max_loras=8, max_cpu_loras=48)
    res = simulate(_trace(), cfg, scraped)
    st, req = res.summary["frontend_stalls"], res.requests
    done = req[req["status"] == "finished"]
    from_table = 1000 * (done["first_token_s"] - done["arrival_s"]).mean()
    assert res.summary["ttft_ms"]["mean"] == pytest.approx(from_table + st["ttft_wait_ms"])
    text = " ".join(res.format_summary().split())
    assert f"includes {st['ttft_wait_ms']:.1f} ms" in text and "requests.parquet" in text
    assert "requests.parquet" not in simulate(_trace(), cfg, base).format_summary()

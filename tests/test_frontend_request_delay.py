"""The frontend's per-request delay (``Frontend.request_s``): time every request spends
outside the engine (HTTP, tokenization, the hops to and from the engine core). It moves
every request's engine times, so its TTFT and E2E, by exactly that much and nothing the
engine decides; fitted on light runs as the real median TTFT's excess over the twin's."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from test_metrics_scrape import _trace

from twin.config import ServingConfig
from twin.costs import load_profile
from twin.costs.frontend import Frontend
from twin.sim import simulate


def test_the_delay_moves_ttft_and_e2e_by_itself_and_nothing_the_engine_decides():
    shipped = load_profile("llama31-8b-h100-64gb")   # with its own scrape and delay
    base = dataclasses.replace(shipped, frontend=dataclasses.replace(shipped.frontend,
                                                                     request_s=0.0))
    delayed = dataclasses.replace(base, frontend=dataclasses.replace(base.frontend,
                                                                     request_s=0.012))
    cfg = ServingConfig(max_loras=4, max_cpu_loras=12)
    a, b = (simulate(_trace(n=400, adapters=12, seed=1), cfg, p) for p in (base, delayed))
    for q in ("mean", "median", "p99"):
        assert b.summary["ttft_ms"][q] == pytest.approx(a.summary["ttft_ms"][q] + 12.0)
        assert b.summary["e2e_ms"][q] == pytest.approx(
            a.summary["e2e_ms"][q] + 12.0)
    for k in ("completed", "steps", "preemptions"):
        assert b.summary[k] == a.summary[k]
    # the run lasts to the last response the client gets: the delay later (vllm bench's
    # duration), over the same tokens
    assert b.summary["duration_s"] == pytest.approx(a.summary["duration_s"] + 0.012)
    assert b.summary["total_throughput"] * b.summary["duration_s"] == pytest.approx(
        a.summary["total_throughput"] * a.summary["duration_s"])
    for k in ("tpot_ms", "itl_ms"):
        assert b.summary[k] == pytest.approx(a.summary[k])
    done = a.requests["status"] == "finished"
    shift = (b.requests["first_token_s"] - a.requests["first_token_s"])[done]
    assert np.allclose(shift, 0.012)
    never = a.requests["first_token_s"].isna()
    assert b.requests["first_token_s"][never].isna().all()


def test_the_field_is_checked_kept_and_left_out_of_profiles_without_it():
    with pytest.raises(ValueError, match="request_s must be >= 0"):
        Frontend(request_s=-0.001)
    f = Frontend(request_s=0.002)
    assert not f.is_default and Frontend(**f.to_dict()) == f
    assert "request_s" not in Frontend().to_dict()


def test_the_fit_reads_the_light_runs_median_ttft_excess(monkeypatch):
    """Per light run the real median TTFT minus the twin's; the median over the runs, and
    never below 0 (a twin slower than the real runs gets no negative delay)."""
    from twin.calibrate import frontend_fit

    def light(real_ms):
        return SimpleNamespace(key=f"r{real_ms}", metrics={
            "mean_ttft_ms": real_ms, "median_ttft_ms": real_ms, "completed": 100,
            "num_running_mean": 2.0, "num_waiting_mean": 0.0})

    runs = [light(v) for v in (40.0, 43.0, 50.0)]
    runs.append(SimpleNamespace(key="busy", metrics={
        "mean_ttft_ms": 900.0, "median_ttft_ms": 900.0, "completed": 100,
        "num_running_mean": 80.0, "num_waiting_mean": 50.0}))
    seen = []

    def fake_map(fn, jobs, processes):
        seen.extend(j[0].key for j in jobs)
        assert all(j[1].frontend.request_s == 0 for j in jobs)   # fitted without itself
        return [{"median_ttft_ms": 38.0} for _ in jobs]

    monkeypatch.setattr(frontend_fit, "map_jobs", fake_map)
    prof = load_profile("llama31-8b-h100-64gb")
    prof = dataclasses.replace(prof, frontend=Frontend(request_s=0.5))
    front, report = frontend_fit.fit_request_delay(runs, prof)
    assert seen == ["r40.0", "r43.0", "r50.0"]
    assert front.request_s == pytest.approx(0.005) and report["runs"] == 3
    slow = [light(30.0)]
    assert frontend_fit.fit_request_delay(slow, prof)[0].request_s == 0.0
    with pytest.raises(ValueError, match="no run without a queue"):
        frontend_fit.fit_request_delay(runs[3:], prof)


def test_the_series_cost_is_fitted_to_the_runs_itl_over_tpot(monkeypatch):
    """Runs whose real ITL/TPOT a scrape of 12 µs per series made (each with its own series
    count and step): the fit, on the grid, finds 12 µs from the runs that keep up alone,
    simulated without the scrape; a run that starves does not count."""
    from twin.calibrate import frontend_fit

    truth = Frontend(metrics_scrape_hz=0.4, metrics_series_s=12e-6)
    engine = [(30.0, 29.0, 4000), (45.0, 44.0, 12000), (60.0, 58.0, 25000), (25.0, 25.0, 900)]

    def run(k, itl, tpot, sets, thr=100.0):
        real = itl * truth.itl_scale(sets, 3600.0, itl / 1e3)
        return SimpleNamespace(key=f"r{k}", offered_tps=100.0, metrics={
            "mean_itl_ms": real, "mean_tpot_ms": tpot, "total_throughput": thr})

    runs = [run(k, *e) for k, e in enumerate(engine)]
    runs.append(run(9, 80.0, 60.0, 30000, thr=50.0))   # starves: its ratio is not the scrape's
    sims = {f"r{k}": e for k, e in enumerate(engine)}
    seen = []

    def fake_map(fn, jobs, processes):
        seen.extend(j[0].key for j in jobs)
        assert all(j[1].frontend.metrics_series_s == 0 and j[3] is None for j in jobs)
        return [{"mean_itl_ms": sims[j[0].key][0], "mean_tpot_ms": sims[j[0].key][1],
                 "lora_running_sets": sims[j[0].key][2], "window_s": 3600.0} for j in jobs]

    monkeypatch.setattr(frontend_fit, "map_jobs", fake_map)
    prof = dataclasses.replace(load_profile("llama31-8b-h100-64gb"),
                               frontend=Frontend(metrics_scrape_hz=0.4, metrics_series_s=1e-6))
    front, report = frontend_fit.fit_metrics_series(runs, prof)
    assert seen == ["r0", "r1", "r2", "r3"]
    assert front.metrics_series_s == pytest.approx(12e-6) and report["runs"] == 4
    assert report["loss_pct"] < 0.01 < report["loss_pct_without_scrape"]
    with pytest.raises(ValueError, match="scrape rate"):
        frontend_fit.fit_metrics_series(runs, dataclasses.replace(prof, frontend=Frontend()))

"""The step-time dispersion (``twin.costs.dispersion``): fitted at calibration, kept in the
profile, read by the twin's ITL percentiles only (issue 15's p99 ITL)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from twin.calibrate.executor_fit import EXECUTOR_FEATURES, fit_measurements
from twin.config import ServingConfig
from twin.costs.dispersion import (LEVELS, check_dispersion, fit_autocorrelation,
                                   fit_dispersion, log_sd, quantile)
from twin.costs.profile import Profile, load_profile
from twin.costs.step_time import FEATURES, StepTimeModel
from twin.errors import TwinInputError
from twin.policies.deployment import scaled_profile
from twin.results.itl_histogram import ITLHistogram, mixed
from twin.results.spread import mean_share, shrunk, spread_percentiles
from twin.sim import simulate
from twin.workload.generate import powerlaw_trace, uniform_lengths


def lognormal_dispersion(sigma: float, seed: int = 0, n: int = 20000) -> list[float]:
    """A dispersion fitted on prices times log-normal noise of log-sd ``sigma``."""
    rng = np.random.default_rng(seed)
    pred = rng.uniform(1e-3, 1e-2, n)
    return fit_dispersion(pred * rng.lognormal(0.0, sigma, n), pred)


def test_fit_dispersion_keeps_the_spread_at_mean_one():
    d = lognormal_dispersion(0.25)
    assert len(d) == LEVELS and check_dispersion(d) == tuple(d)
    assert np.mean(d) == pytest.approx(1.0, abs=0.01)
    assert log_sd(d) == pytest.approx(0.25, rel=0.08)   # the quantiles' own log-sd
    # read back: the 90th percentile of a log-normal of log-sd 0.25 and mean 1
    assert quantile(d, 0.9) == pytest.approx(np.exp(-0.25 ** 2 / 2 + 1.2816 * 0.25), rel=0.02)
    assert quantile(d, 0.5) == pytest.approx((d[49] + d[50]) / 2)
    # a price that is always right has no spread; pairs without a ratio are left out
    flat = fit_dispersion([2.0, 4.0, 1.0, 0.0], [1.0, 2.0, 0.5, 0.0])
    assert flat == pytest.approx([1.0] * LEVELS)
    with pytest.raises(ValueError, match="no step"):
        fit_dispersion([0.0], [1.0])


@pytest.mark.parametrize("values, match", [([], "at least one"), ([1.0, -0.5], "positive"),
                                           ([1.2, 0.9], "not decrease")])
def test_check_dispersion_refuses_what_is_not_quantiles(values, match):
    with pytest.raises(ValueError, match=match):
        check_dispersion(values)


def filled(durations, weights) -> ITLHistogram:
    h = ITLHistogram()
    for d, w in zip(durations, weights):
        h.add(float(d), float(w))
    return h


def test_mixture_percentiles_match_a_monte_carlo_of_it():
    """A histogram of three step kinds (decode 3 ms with batches of 8, prefill-beside-decode
    9 ms with 4 rows, a rare 20 ms step with 2) read with a log-normal dispersion: each
    percentile equals the same percentile of durations times draws of the multipliers."""
    rng = np.random.default_rng(3)
    kinds = rng.choice(3, 5000, p=[0.9, 0.08, 0.02])
    dur = np.array([3e-3, 9e-3, 20e-3])[kinds] * rng.uniform(0.97, 1.03, 5000)
    rows = np.array([8, 4, 2])[kinds]
    disp = lognormal_dispersion(0.25, seed=4)
    h = filled(dur, rows)
    draws = 400   # per step, of the equally likely multipliers
    noisy = dur[:, None] * rng.choice(disp, (len(dur), draws))
    w = np.repeat(rows, draws).astype(float)
    order = np.argsort(noisy.ravel())
    cum = np.cumsum(w[order]) / w.sum()
    for q in (50, 90, 99, 99.9):
        mc = noisy.ravel()[order][np.searchsorted(cum, q / 100)]
        assert h.percentile(q, disp) == pytest.approx(mc, rel=0.015), q
    # the spread widens the tail: p99 moves up from the prices' own
    assert h.percentile(99, disp) > 1.2 * h.percentile(99)


def test_mixture_keeps_the_total_and_a_unit_dispersion_changes_nothing():
    h = filled([1e-3, 2e-3, 5e-3], [10, 5, 1])
    w = h._weights()
    assert mixed(w, [0.5, 1.0, 2.0]).sum() == pytest.approx(w.sum())
    assert np.array_equal(mixed(w, [1.0]), w)
    for q in (1, 50, 99):
        assert h.percentile(q, None) == h.percentile(q) == h.percentile(q, [1.0, 1.0])


def synthetic_measurements(sigma: float, seed: int = 0) -> pd.DataFrame:
    """A calibration's step log: cells of decode steps repeated 3 times, each measurement
    its known cost times log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for cell in range(12):
        n = 2 + 4 * cell
        for step in range(40):
            f = dict.fromkeys(FEATURES, 0.0)
            f.update(const=1.0, decode_tokens=n, decode_context=n * (32 + step))
            cost = 1e-3 + 3e-5 * n + 2e-7 * f["decode_context"]
            for rep in range(3):
                rows.append({**f, "kind": "step", "key": f"c{cell}", "step": step,
                             "repeat": rep, "duration_s": cost * rng.lognormal(0, sigma),
                             "load_s": 0.0})
    return pd.DataFrame(rows)


def test_calibration_fit_stores_the_spread_of_single_measurements():
    shape = load_profile("cpu-tiny").model
    loads = pd.DataFrame({"rank": [8, 16], "disk_s": [1e-3, 2e-3], "copy_s": [1e-4, 2e-4]})
    fit = fit_measurements(synthetic_measurements(0.2), loads, shape)
    assert len(fit.dispersion) == LEVELS
    assert log_sd(fit.dispersion) == pytest.approx(0.2, rel=0.1)
    quiet = fit_measurements(synthetic_measurements(0.01), loads, shape)
    assert log_sd(quiet.dispersion) < 0.02
    # independent noise step to step: no correlation within a cell's run
    assert len(fit.autocorrelation) == 30 and max(map(abs, fit.autocorrelation[:5])) < 0.1
    st = fit.step_time_model()
    assert (st.dispersion, st.autocorrelation) == (fit.dispersion, fit.autocorrelation)
    assert set(fit.coef) == set(EXECUTOR_FEATURES)


def test_profile_round_trip_and_schema(tmp_path):
    prof = load_profile("cpu-tiny")
    assert prof.step_time.dispersion is None
    assert "dispersion" not in prof.step_time.to_dict()   # written back unchanged
    disp = lognormal_dispersion(0.2)
    with_disp = dataclasses.replace(prof, step_time=StepTimeModel(
        base=prof.step_time.base, dispersion=disp, autocorrelation=[0.6, 0.3, -0.1]))
    path = with_disp.save(tmp_path / "p.json")
    again = load_profile(str(path))
    assert again.step_time.dispersion == pytest.approx(disp)
    assert again.step_time.base == prof.step_time.base
    assert again.step_time.autocorrelation == [0.6, 0.3, -0.1]
    # time-slicing scales the prices, not their relative spread
    scaled = scaled_profile(again, 1.5).step_time
    assert (scaled.dispersion, scaled.autocorrelation) == (again.step_time.dispersion,
                                                           again.step_time.autocorrelation)
    d = json.loads(path.read_text())
    for bad in ([1.2, 0.9], [0.0, 1.0], []):
        d["step_time"]["dispersion"] = bad
        with pytest.raises(TwinInputError, match="dispersion"):
            Profile.from_dict(d, source="bad.json")
    d["step_time"]["dispersion"] = disp
    d["step_time"]["autocorrelation"] = [0.5, 1.5]
    with pytest.raises(TwinInputError, match="autocorrelation"):
        Profile.from_dict(d, source="bad.json")


def test_dispersion_moves_the_itl_percentiles_and_nothing_else():
    """The same run with and without a dispersion: every figure equal (throughput, every
    mean, TTFT, E2E, the schedule's counts) but the ITL median and p99, which read the
    mixture; a unit dispersion reproduces the percentiles exactly."""
    trace = powerlaw_trace(4, 20.0, duration_s=6, lengths=uniform_lengths(16, 128), seed=5)
    config = ServingConfig(max_loras=2, max_num_seqs=16)
    prof = load_profile("cpu-tiny")

    def run(disp, autocorrelation=None):
        p = dataclasses.replace(prof, step_time=StepTimeModel(
            base=prof.step_time.base, dispersion=disp, autocorrelation=autocorrelation))
        return simulate(trace, config, p).summary

    plain, unit, noisy = run(None), run([1.0] * 4), run(lognormal_dispersion(0.25))
    assert unit == plain
    assert noisy["itl_ms"]["p99"] > plain["itl_ms"]["p99"] * 1.1
    assert noisy["itl_ms"]["mean"] == plain["itl_ms"]["mean"]
    strip = lambda s: {k: v for k, v in s.items() if k != "itl_ms"}   # noqa: E731
    assert strip(noisy) == strip(plain)   # TTFT too: no autocorrelation, no TTFT spread
    # with the correlation as well, the TTFT median and p99 read the mixture; its mean and
    # everything else stand
    both = run(lognormal_dispersion(0.25), [0.6, 0.36, 0.2])
    assert both["itl_ms"] == noisy["itl_ms"]
    assert both["ttft_ms"]["mean"] == plain["ttft_ms"]["mean"]
    assert both["ttft_ms"]["p99"] != plain["ttft_ms"]["p99"]
    strip2 = lambda s: {k: v for k, v in s.items() if k not in ("itl_ms", "ttft_ms")}  # noqa: E731
    assert strip2(both) == strip2(plain)


def test_ttft_spread_matches_a_monte_carlo_and_shrinks_with_the_steps_spanned():
    """TTFTs spanning 1 to ~1000 steps of 4 ms, each times the spread of the mean of as many
    correlated step multipliers: percentiles as a Monte Carlo of it; one-step TTFTs keep the
    whole spread, TTFTs over hundreds of steps nearly none."""
    rng = np.random.default_rng(7)
    disp = lognormal_dispersion(0.25, seed=8)
    rho = [0.6, 0.36, 0.2, 0.1]
    v = np.r_[rng.uniform(3e-3, 2e-2, 300), rng.uniform(1.0, 4.0, 100)]
    share = mean_share(v / 4e-3, rho)
    draws = np.stack([rng.choice(shrunk(disp, sh), 400) for sh in share])
    noisy = (v[:, None] * draws).ravel()
    for q, got in zip((50, 90, 99), spread_percentiles(v, 4e-3, disp, rho, (50, 90, 99))):
        assert got == pytest.approx(np.percentile(noisy, q), rel=0.02), q
    short = np.full(50, 4e-3)   # one step: the ITL mixture of the same durations
    assert spread_percentiles(short, 4e-3, disp, rho, (99,))[0] == pytest.approx(
        filled(short, np.ones(50)).percentile(99, disp), rel=0.011)
    long = rng.uniform(3.0, 4.0, 200)   # ~900 steps: the spread averages away
    assert spread_percentiles(long, 4e-3, disp, rho, (99,))[0] == pytest.approx(
        np.percentile(long, 99), rel=0.02)


def test_mean_share_and_the_fitted_correlation():
    assert mean_share([1, 0.2], [0.9, 0.8]) == pytest.approx([1.0, 1.0])
    assert mean_share([4, 100], []) == pytest.approx([0.25, 0.01])       # independent steps
    assert mean_share([10], [1.0] * 30) == pytest.approx([1.0])           # one state throughout
    assert mean_share([2], [-1.0]) == pytest.approx([0.0])                # clipped at 0
    # AR(1) noise of coefficient 0.6 in runs of 200 steps: rho_k = 0.6^k
    rng = np.random.default_rng(9)
    runs = []
    for _ in range(200):
        e = rng.normal(size=200)
        x = np.empty(200)
        x[0] = e[0]
        for t in range(1, 200):
            x[t] = 0.6 * x[t - 1] + 0.8 * e[t]
        runs.append(x + rng.normal())   # a run's own level: removed
    rho = fit_autocorrelation(runs)
    assert rho[0] == pytest.approx(0.6, abs=0.03) and rho[1] == pytest.approx(0.36, abs=0.04)
    assert abs(rho[9]) < 0.05 and len(rho) == 30

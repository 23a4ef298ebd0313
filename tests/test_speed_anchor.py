"""The speed anchor: calibration records the box's speed, validation prices the twin at the
speed during the runs (one scalar on the step times), and says when it does not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

import twin.executor.speed_anchor as speed_anchor  # noqa: E402
from twin.calibrate.executor import calibrate_executor  # noqa: E402
from twin.cli import main  # noqa: E402
from twin.config import ServingConfig  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402
from twin.costs.step_time import StepFeatures  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.weights import resolve_model  # noqa: E402
from twin.policies.deployment import scaled_profile  # noqa: E402
from twin.validate import validate  # noqa: E402
from twin.validate.anchor import SpeedAnchor  # noqa: E402

CFG = ServingConfig(max_loras=1, max_cpu_loras=2, max_lora_rank=16, max_num_seqs=16,
                    max_num_batched_tokens=64)


def spaced(n=6, adapters=True, gap=0.2):
    """Requests ``gap`` apart: far enough (see :func:`alone`) that each is served alone, so
    the schedule does not depend on step times and a scaled twin serves the very same
    batches."""
    ad = pd.array([f"a{i % 2}" if adapters else None for i in range(n)], dtype="string")
    return pd.DataFrame({"request_id": np.arange(n), "arrival_s": np.arange(n) * gap,
                         "adapter": ad, "prompt_tokens": np.full(n, 24),
                         "output_tokens": np.full(n, 6)})


def alone(alone_gap, cfg, profile, scale, **kw):
    """:func:`spaced` at a gap that keeps every request alone in the twin at ``scale`` x
    the fitted profile's step times: 0.2 s, or more where this machine's fresh calibration
    (a slow or busy box) fitted step times that a 0.2-s gap would not hold."""
    t = spaced(**kw)
    return spaced(**kw, gap=alone_gap(t, cfg, scaled_profile(profile, scale), 0.2, 2.0))


def fake_anchor(monkeypatch, seconds, calls=None):
    def fake(model, **kw):
        if calls is not None:
            calls.append(kw)
        return {"anchor_s": seconds, "per_shape_s": {}, "rounds": 5, "wall_s": 0.0}
    monkeypatch.setattr(speed_anchor, "measure_speed_anchor", fake)


def test_benchmark_times_every_shape():
    m = LlamaModel.from_pretrained(resolve_model("tiny"))
    a = speed_anchor.measure_speed_anchor(m, budget_s=0.0, min_rounds=3)
    assert a["rounds"] == 3
    assert set(a["per_shape_s"]) == {name for name, _ in speed_anchor.ANCHOR_SHAPES}
    assert a["anchor_s"] == pytest.approx(sum(a["per_shape_s"].values()))
    assert all(v > 0 for v in a["per_shape_s"].values())


def test_calibration_records_anchor_start_middle_end_and_reuses_it(tiny_profile, tmp_path):
    prov = load_profile(tiny_profile).provenance
    assert prov["speed_anchor_samples"] == 3   # start, middle, end of the cells
    assert prov["speed_anchor_s"] > 0 and prov["speed_anchor_spread"] >= 0
    assert prov["speed_anchor_version"] == speed_anchor.ANCHOR_VERSION
    assert prov["speed_anchor_model"] == str(resolve_model("tiny"))
    # a re-run reuses every measurement, the anchor samples included
    again, info = calibrate_executor("tiny", out=tiny_profile, max_cells=3, repeats=1,
                                     progress=False, log=lambda *a, **k: None)
    assert info["new"] == 0
    assert again.provenance["speed_anchor_s"] == prov["speed_anchor_s"]


def test_scaled_profile_scales_step_times_exactly(tiny_profile):
    prof = load_profile(tiny_profile)
    f = StepFeatures(1.0, 48, 3, 200, 1200, 16 * 8, 1, 16, 1, 1, 1, 0.0, 48 + 3,
                      prefill_ctx_seqs=1, lora_slot_tokens_capped=48 + 3)
    assert scaled_profile(prof, 1.3).step_time(f) == pytest.approx(1.3 * prof.step_time(f),
                                                                   rel=1e-12)


def test_anchor_ratio_is_applied_exactly(tiny_profile, monkeypatch, alone_gap):
    prof = load_profile(tiny_profile)
    fake_anchor(monkeypatch, 1.3 * prof.provenance["speed_anchor_s"])
    cfg = CFG.replace(enable_lora=False)
    v = validate(alone(alone_gap, cfg, prof, 1.3, adapters=False), cfg, tiny_profile, "tiny",
                 plot=False, speed_anchor=True)
    a = v.anchor_info
    assert a["applied"] and a["ratio"] == pytest.approx(1.3)
    assert len(a["samples_s"]) == 2   # before and after the run
    # base-model requests served alone: every step is priced x 1.3, nothing else moves
    tw, raw = v.twin.summary, v.twin_raw.summary
    assert tw["itl_ms"]["mean"] == pytest.approx(1.3 * raw["itl_ms"]["mean"], rel=1e-9)
    assert tw["ttft_ms"]["mean"] == pytest.approx(1.3 * raw["ttft_ms"]["mean"], rel=1e-9)
    t = v.table.set_index("key")
    assert t.loc["itl_mean", "twin_raw"] == pytest.approx(raw["itl_ms"]["mean"])
    assert v.smape_raw("itl_mean") != v.smape("itl_mean")


def test_slower_anchor_gives_longer_twin_latencies_and_is_logged(tiny_profile, monkeypatch,
                                                                 alone_gap):
    prof = load_profile(tiny_profile)
    cal = prof.provenance["speed_anchor_s"]
    fake_anchor(monkeypatch, 1.5 * cal)
    v = validate(alone(alone_gap, CFG, prof, 1.5), CFG, tiny_profile, "tiny", plot=False,
                 repeats=2, speed_anchor=True)
    assert v.anchor_info["ratio"] == pytest.approx(1.5)
    assert len(v.anchor_info["samples_s"]) == 4   # before and after each of 2 runs
    assert v.twin.summary["ttft_ms"]["mean"] > v.twin_raw.summary["ttft_ms"]["mean"]
    assert v.twin.summary["itl_ms"]["mean"] > 1.4 * v.twin_raw.summary["itl_ms"]["mean"]
    assert v.executor.meta["speed_anchor_s"] == {"before": 1.5 * cal, "after": 1.5 * cal}
    assert v.to_dict()["speed_anchor"]["applied"]
    assert "twin raw" in v.format()


def test_profile_without_anchor_validates_unscaled(tiny_profile, monkeypatch, tmp_path):
    prof = load_profile(tiny_profile)
    old = dataclasses.replace(prof, provenance={k: v for k, v in prof.provenance.items()
                                                if not k.startswith("speed_anchor")})
    calls = []
    fake_anchor(monkeypatch, 1.0, calls)
    v = validate(spaced(), CFG, old, "tiny", plot=False, speed_anchor=True)
    assert calls == []   # nothing measured
    a = v.anchor_info
    assert not a["applied"] and a["ratio"] is None and "no speed_anchor_s" in a["reason"]
    assert v.twin is v.twin_raw
    assert (v.table["smape"].fillna(-1) == v.table["smape_raw"].fillna(-1)).all()
    assert v.executor.meta["speed_anchor_s"] == {"before": None, "after": None}


def test_anchor_off_by_default_and_for_foreign_profiles(tiny_profile):
    prof = load_profile(tiny_profile)
    a = SpeedAnchor.for_profile(prof, None, None, enabled=False, threads=1)
    assert not a.on and "off (the default" in a.reason
    h100 = load_profile("llama31-8b-h100-64gb")
    a = SpeedAnchor.for_profile(h100, None, None, enabled=True, threads=1)
    assert not a.on and "no speed_anchor_s" in a.reason and a.ratio(h100) is None
    moved = dataclasses.replace(prof, provenance=dict(prof.provenance,
                                                      speed_anchor_model="/nonexistent"))
    a = SpeedAnchor.for_profile(moved, None, None, enabled=True, threads=1)
    assert not a.on and "not on this machine" in a.reason


def test_cli_speed_anchor_is_opt_in(tiny_profile, tmp_path, capsys, monkeypatch):
    fake_anchor(monkeypatch, 2.0 * load_profile(tiny_profile).provenance["speed_anchor_s"])
    trace = tmp_path / "t.csv"
    spaced(4).to_csv(trace, index=False)
    args = ["validate", "--trace", str(trace), "--profile", str(tiny_profile), "--model",
            "tiny", "--max-loras", "1", "--max-cpu-loras", "2", "--max-num-batched-tokens",
            "64", "--no-progress"]
    assert main(args + ["--speed-anchor"]) == 0
    out = capsys.readouterr()
    assert "twin raw" in out.out and "x 2.000" in out.err + out.out
    assert main(args) == 0
    out = capsys.readouterr()
    assert "twin raw" not in out.out and "off (the default" in out.err + out.out

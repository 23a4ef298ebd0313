"""recommend and sweep with prefix caching (issue 17, item 6): the verifying twin runs use
the configuration's enable_prefix_caching, the CLI takes vLLM's flag names."""

from __future__ import annotations

import pytest

from twin.cli.app import build_parser
from twin.cli.config_flags import with_prefix_caching
from twin.ml.recommend import recommend
from twin.ml.spec import WorkloadSpec, paper_base
from twin.ml.sweep import EarlyExit, point_key
from twin.workload.generate import rate_class_trace
from twin.workload.sessions import session_trace

PROFILE = "llama31-8b-h100-64gb"


@pytest.fixture(scope="module")
def sessions():
    return session_trace(8, 10, turns_mean=3, think_s=5, duration_s=120, system_tokens=1024,
                         seed=1)


@pytest.mark.parametrize("on", [True, False])
def test_verified_run_uses_the_prefix_caching_setting(sessions, on):
    base = paper_base().replace(enable_prefix_caching=on)
    rec = recommend(sessions, profile=PROFILE, base=base, window_s=120, max_runs=1, workers=1)
    assert rec.ok
    p = rec.prefix
    assert p["enable_prefix_caching"] is on and p["model_aware"] is False
    assert 0.3 < p["prefix_share"] <= 1.0      # per-adapter system prompts + chat history
    if on:
        assert rec.verified["prefix_cache_hits"] > 0 and p["verified_hit_rate"] > 0.3
    else:
        assert rec.verified["prefix_cache_hits"] == 0 and p["verified_hit_rate"] == 0.0
    assert any("prefix caching" in w for w in rec.warnings)
    assert "shared-prefix fraction" in rec.report()
    assert rec.to_dict()["prefix_caching"]["enable_prefix_caching"] is on


def test_trace_without_hash_ids_has_no_prefix_section():
    tr = rate_class_trace(4, [0.5], duration_s=30, seed=2)
    rec = recommend(tr, profile=PROFILE, window_s=30, max_runs=1, workers=1)
    assert rec.prefix is None and not any("prefix" in w for w in rec.warnings)
    assert "shared-prefix" not in rec.report()


@pytest.mark.parametrize("argv,want", [([], None), (["--enable-prefix-caching"], True),
                                       (["--no-enable-prefix-caching"], False)])
@pytest.mark.parametrize("cmd", ["recommend", "place", "sweep"])
def test_cli_prefix_caching_flag(cmd, argv, want):
    src = ["--workloads", "w.yaml", "--out", "o"] if cmd == "sweep" else ["--trace", "t.csv"]
    args = build_parser().parse_args([cmd, *src, *argv])
    assert args.enable_prefix_caching is want
    base = paper_base().replace(enable_prefix_caching=False)
    assert with_prefix_caching(base, args).enable_prefix_caching is (False if want is None
                                                                     else want)


def test_sweep_point_key_includes_prefix_caching():
    spec = WorkloadSpec("rate_classes", {"n_adapters": 4})
    on = paper_base().replace(enable_prefix_caching=True)
    keys = {point_key(spec, c, 60.0, "sha", EarlyExit(), twin_version="x")
            for c in (on, on.replace(enable_prefix_caching=False))}
    assert len(keys) == 2

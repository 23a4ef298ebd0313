"""Executor replicas behind the fleet's router and event loop (``twin.executor.fed``,
``twin.validate.fleet``): the fleet twin's validation against real engines (issue 18)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twin.cli import main  # noqa: E402
from twin.config import ServingConfig  # noqa: E402
from twin.costs.profile import load_profile  # noqa: E402
from twin.errors import TwinInputError  # noqa: E402
from twin.sim.engine import simulate  # noqa: E402
from twin.validate.fleet import validate_fleet  # noqa: E402

CFG = ServingConfig(max_loras=1, max_cpu_loras=2, max_lora_rank=16, max_num_seqs=16,
                    max_num_batched_tokens=64)


def trace_of(adapters, gap=0.0, prompt=24, output=6):
    n = len(adapters)
    return pd.DataFrame({"request_id": np.arange(n), "arrival_s": np.arange(n) * gap,
                         "adapter": pd.array(adapters, dtype="string"),
                         "prompt_tokens": np.full(n, prompt), "output_tokens": np.full(n, output)})


def steps_of(fleet_run, k):
    return fleet_run.replicas[k].steps


def test_burst_replicas_run_concurrently_in_logical_time(tiny_profile, one_torch_thread):
    """A burst at t = 0 on 2 replicas: both start at 0 though their steps ran one after
    another on one thread, each replica's steps follow one another without gaps (its clock
    counts only its own steps), and every request is served once, where it was routed."""
    tr = trace_of([f"a{i % 2}" for i in range(8)])
    v = validate_fleet(tr, 2, tiny_profile, "round_robin", "tiny", config=CFG, warmup=False)
    ex = v.executor
    assert ex.route.tolist() == [0, 1] * 4 == v.twin.route.tolist()
    assert v.route_agreement == 1.0
    req = ex.result.requests
    assert (req["status"] == "finished").all() and len(req) == 8
    assert req["replica"].tolist() == ex.route.tolist()
    for k in (0, 1):
        s = steps_of(ex, k)
        assert s["start_s"].iloc[0] == 0.0
        ends = (s["start_s"] + s["duration_s"]).to_numpy()[:-1]
        assert np.array_equal(s["start_s"].to_numpy()[1:], ends)   # contiguous: busy
        assert ex.replicas[k].summary["num_requests"] == 4
    busy = [steps_of(ex, k)["duration_s"].sum() for k in (0, 1)]
    assert ex.summary["duration_s"] < 0.8 * sum(busy)   # the two ran side by side


def test_idle_replica_wakes_at_the_arrival_it_was_sent(tiny_profile, one_torch_thread,
                                                       alone_gap):
    """Requests apart: a replica's step after a wait starts exactly at the arrival of the
    request delivered to it and is marked after-idle, as a lone executor's (one arriving at
    t = 0 meets an engine that never waited)."""
    tr = trace_of(["a0", "a1", "a0", "a1", "a0", "a1"])
    gap = alone_gap(tr, CFG, load_profile(tiny_profile), 0.1)
    tr = trace_of(["a0", "a1", "a0", "a1", "a0", "a1"], gap=gap)
    v = validate_fleet(tr, 2, tiny_profile, "round_robin", "tiny", config=CFG, warmup=False)
    for k in (0, 1):
        s = steps_of(v.executor, k)
        firsts = s[s["after_idle"]]
        mine = tr["arrival_s"].iloc[k::2]
        assert firsts["start_s"].tolist() == mine[mine > 0].tolist()   # t = 0: no wait


def busy_trace(tiny_profile, alone_gap, names):
    """``names[0]``'s request runs long from t = 0 on one replica while the others, short
    and served alone, arrive after it: the routers' picks depend on what they read. The
    long request is about as long as the tiny model's context allows (2,000 output tokens
    of 2,048): it must outlast the last short arrival on the executor too, whose steps can
    be several times faster than a calibration taken on a busier box prices them (a length
    fitted to the profile's step time came out too short there, or over the context and
    refused: every request then went to replica 0)."""
    prof = load_profile(tiny_profile)
    gap = alone_gap(trace_of(names[1:]), CFG, prof, 0.05)
    tr = trace_of(names, gap=gap)
    tr.loc[0, "output_tokens"] = 2000
    long = simulate(tr.iloc[:1], CFG, prof).requests
    assert float(long["finish_s"].iloc[0]) > 2 * (len(names) + 1) * gap   # by the twin too
    return tr


def test_routers_read_the_executor_replicas_state(tiny_profile, one_torch_thread, alone_gap):
    """While a0's long request runs on replica 0: least outstanding requests sends every
    short request to replica 1 (it read the in-flight counts), adapter affinity sends b0's
    to replica 1 and a0's to replica 0, where a0 is resident (it read the adapter caches);
    round robin would alternate. Executor and twin route alike and load alike."""
    names = ["a0", "b0", "b0", "a0", "b0"]
    tr = busy_trace(tiny_profile, alone_gap, names)
    for router, want in (("least_outstanding_requests", [0, 1, 1, 1, 1]),
                         ("adapter_affinity", [0, 1, 1, 0, 1])):
        v = validate_fleet(tr, 2, tiny_profile, router, "tiny", config=CFG, warmup=False)
        assert v.executor.route.tolist() == want == v.twin.route.tolist(), router
        assert v.route_agreement == 1.0
        per = v.replicas.set_index("replica")
        assert (per["loads_from_disk_executor"] == per["loads_from_disk_twin"]).all()


def test_fleet_validation_table_files_and_errors(tiny_profile, tmp_path, one_torch_thread):
    tr = trace_of([f"a{i % 3}" for i in range(9)], gap=0.02)
    v = validate_fleet(tr, [CFG, CFG.replace(max_loras=2)], tiny_profile,
                       "least_outstanding_requests", "tiny", out=tmp_path / "fv", repeats=2)
    text = v.format("t")
    for label in ("total throughput", "TTFT mean", "ITL mean", "per replica", "routed alike"):
        assert label in text
    assert len(v.executor_summaries) == 2 and "throughput" in v.spread
    assert v.twin.summary["fleet"]["per_replica"][1]["max_loras"] == 2
    for f in ("table.csv", "replicas.csv", "validation.json", "timeline_overlay.png",
              "executor/requests.parquet", "twin/requests.parquet"):
        assert (tmp_path / "fv" / f).exists(), f
    with pytest.raises(TwinInputError):
        validate_fleet(tr, 0, tiny_profile, "round_robin", "tiny", config=CFG)


def test_cli_validate_fleet(tiny_profile, tmp_path, capsys, one_torch_thread):
    tr = trace_of([f"a{i % 2}" for i in range(6)], gap=0.02)
    path = tmp_path / "t.csv"
    tr.to_csv(path, index=False)
    rc = main(["validate", "--trace", str(path), "--profile", str(tiny_profile), "--model",
               "tiny", "--replicas", "2", "--router", "round_robin", "--max-loras", "1",
               "--max-lora-rank", "16", "--out", str(tmp_path / "cv")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "per replica" in out and "routed alike: 100.0%" in out
    assert (tmp_path / "cv" / "replicas.csv").exists()


def test_each_executor_replica_is_a_lone_executor(tiny_profile, one_torch_thread):
    """Every executor replica of a fleet, replayed by the twin on the requests routed to
    it (its own measured step durations, ``twin.sim.replay``), is the run a lone executor
    makes: the same step count, after-idle instants, loads and request times. So a fed
    replica releases arrivals, idles and schedules as ``execute`` does."""
    from twin.executor.weights import resolve_model
    from twin.validate.run import _catalogs

    rng = np.random.default_rng(3)
    n = 30
    tr = trace_of([f"a{i}" for i in rng.integers(0, 4, n)], output=8)
    tr["arrival_s"] = np.sort(np.concatenate([np.zeros(10), rng.uniform(0.3, 0.6, 10),
                                              rng.uniform(1.5, 1.8, 10)]))
    tr["output_tokens"] = rng.integers(2, 24, n)
    v = validate_fleet(tr, 2, tiny_profile, "least_outstanding_requests", "tiny",
                       config=CFG, warmup=False)
    _, twin_catalog = _catalogs(tr, CFG, None, resolve_model("tiny"), adapter_ranks=(8, 16),
                                seed=0)
    ex = v.executor
    for k in (0, 1):
        sub = tr.iloc[np.flatnonzero(ex.route == k)].reset_index(drop=True)
        assert_replays_alone(ex.replicas[k], sub, twin_catalog)


def assert_replays_alone(res, sub, twin_catalog):
    """Executor replica run ``res``, replayed by the twin on its share ``sub`` (its own
    measured step durations, ``twin.sim.replay``), is a lone executor's run: the same step
    count, after-idle instants, loads and request times."""
    from twin.sim.replay import replay

    tw = replay(res, sub, twin_catalog, record_steps=True)
    assert tw.summary["steps"] == len(res.steps) > 0
    idle_ex = res.steps.loc[res.steps["after_idle"], "start_s"].to_numpy()
    idle_tw = tw.steps.loc[tw.steps["after_idle"], "start_s"].to_numpy()
    np.testing.assert_allclose(idle_tw, idle_ex, rtol=0, atol=1e-9)
    for key in ("from_disk", "from_host"):
        assert tw.summary["adapter_loads"][key] == res.summary["adapter_loads"][key]
    a = res.requests.set_index("request_id").sort_index()
    b = tw.requests.set_index("request_id").sort_index()
    assert a.index.tolist() == sub["request_id"].sort_values().tolist()
    for col in ("first_scheduled_s", "first_token_s", "finish_s"):
        np.testing.assert_allclose(b[col], a[col], rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# validate_fleet: bad input refused before any executor run
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_executor(monkeypatch):
    """Fail the test if validate_fleet gets as far as loading the executor's model."""
    def refuse(*a, **k):
        raise AssertionError("validate_fleet reached the executor before refusing its input")

    monkeypatch.setattr("twin.validate.fleet._executor_model", refuse)


@pytest.mark.parametrize("kw, match", [
    (dict(replicas=2, config=CFG.replace(policy="merged")), "merged"),
    (dict(replicas=2, router="static"), "routing"),
    (dict(replicas=2, router="no_such_router"), "no_such_router"),
    (dict(replicas=2, router="static", routing="missing-routing.csv"), "missing-routing"),
])
def test_validate_fleet_refuses_bad_input_early(no_executor, kw, match):
    tr = trace_of(["a0", "a1"])
    kw = {"router": "round_robin", **kw}
    with pytest.raises(TwinInputError, match=match):
        validate_fleet(tr, kw.pop("replicas"), "cpu-tiny", model="tiny", **kw)


def test_validate_fleet_refuses_a_routing_table_that_misses_an_adapter(no_executor,
                                                                        tmp_path):
    """A static table without a row for an adapter of the trace fails before the runs,
    not at that adapter's first request in the middle of an executor run."""
    path = tmp_path / "routing.csv"
    pd.DataFrame({"adapter": ["lora-0000"], "gpu": [0], "weight": [1.0]}).to_csv(path,
                                                                                   index=False)
    tr = trace_of(["lora-0000", "lora-0001"], gap=0.1)
    with pytest.raises(TwinInputError, match="lora-0001"):
        validate_fleet(tr, 2, "cpu-tiny", "static", "tiny", routing=path)


def test_validate_fleet_refuses_a_replica_that_cannot_serve_the_trace(monkeypatch):
    """Every replica's config is checked against the trace before the warm-up and the
    runs: a replica without LoRA in a fleet whose trace names adapters is refused, whichever
    place it has (the adapters are the fleet's, not replica 0's)."""
    def refuse(*a, **k):
        raise AssertionError("validate_fleet ran the executor before refusing its input")

    monkeypatch.setattr("twin.validate.fleet.warm_up", refuse)
    monkeypatch.setattr("twin.validate.fleet._execute_fleet", refuse)
    tr = trace_of(["a0", "a1"], gap=0.1)
    base = CFG.replace(enable_lora=False)
    for configs in ([CFG, base], [base, CFG]):
        with pytest.raises(TwinInputError, match="a0"):
            validate_fleet(tr, configs, "cpu-tiny", "round_robin", "tiny")


@pytest.mark.parametrize("flags, match", [
    (["--routing", "routing.csv"], "fleet"),                      # no fleet asked for
    (["--router-refresh-s", "0.5"], "fleet"),
    (["--replicas", "2", "--routing", "routing.csv"], "static"),  # round robin reads none
    (["--replicas", "2", "--router", "static"], "--routing"),
    (["--replicas", "2", "--num-gpu-blocks", "64"], "one server"),
    (["--replicas", "2", "--policy", "merged"], "merged"),
])
def test_cli_validate_refuses_flags_that_do_not_fit(no_executor, tmp_path, capsys, flags,
                                                    match):
    """Fleet flags without a fleet, or that its router does not read, are refused (exit
    2, the reason on stderr) rather than ignored, before any executor run."""
    path = tmp_path / "t.csv"
    trace_of(["a0", "a1"]).to_csv(path, index=False)
    rc = main(["validate", "--trace", str(path), "--profile", "cpu-tiny", "--model", "tiny",
               *flags])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_cli_router_names_are_the_routers():
    from twin.cli.fleet import ROUTER_NAMES
    from twin.fleet.routers import ROUTERS

    assert sorted(ROUTER_NAMES) == sorted(ROUTERS)

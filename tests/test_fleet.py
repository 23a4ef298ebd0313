"""The fleet twin (``twin.fleet``): differential tests against ``twin.sim.simulate`` and
router unit tests.

- A fleet of one replica is ``twin simulate``, request for request, whatever the router
  (the event loop's fed clock cuts quiet decode runs where ``simulate``'s look-ahead does).
- A fleet whose router reads no state equals the per-replica simulations of each replica's
  share of the trace, request for request, both when simulated independently and when run
  in the one event loop of the state-reading routers (which so checks the fed clocks with
  several replicas, mixed configs, S-LoRA and a window).
- Routers: affinity prefers GPU residency, then host, bounded by load; a view refreshed
  late sees stale state; consistent hashing moves ~1/N of adapters when a replica is added;
  a static table's weights split an adapter's requests.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from twin.cli import main
from twin.config import ServingConfig
from twin.errors import TwinInputError
from twin.fleet import Replica, simulate_fleet
from twin.fleet.routers import AdapterAffinity, ConsistentHash, StaticTable, make_router
from twin.fleet.view import GPU, HOST, NONE, LiveView, ScrapedView
from twin.sim import simulate
from twin.sim.fed import FedClock
from twin.workload.generate import rate_class_trace, uniform_lengths
from twin.workload.schema import write_trace

PROFILE = "llama31-8b-h100-64gb-first-principles"   # pinned: stable shipped profile
CONFIG = ServingConfig(max_loras=2, max_cpu_loras=4, max_num_seqs=32)


@pytest.fixture(scope="module")
def trace():
    """12 adapters, ~22 req/s for 60 s: with 2 GPU slots a replica loads adapters,
    decode runs are cut by arrivals, and some requests queue."""
    return rate_class_trace(12, (3.2, 1.6, 0.8), duration_s=60,
                            lengths=uniform_lengths(8, 512), seed=1)


def _same(a, b):
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    pd.testing.assert_frame_equal(a.timeline, b.timeline, check_exact=True)
    assert json.dumps(a.summary, sort_keys=True) == json.dumps(b.summary, sort_keys=True)


@pytest.mark.parametrize("router,refresh", [("least_outstanding_requests", 0.0),
                                            ("adapter_affinity", 0.0),
                                            ("adapter_affinity", 0.5),
                                            ("round_robin", 0.0)])
def test_fleet_of_one_is_simulate_request_for_request(trace, router, refresh, monkeypatch):
    ref = simulate(trace, CONFIG, PROFILE)
    cuts = []
    deliver = FedClock.deliver

    def counting(self, row):   # count the runs the fed clock cut short
        before = self.pending
        w = deliver(self, row)
        cuts.append(w is not None and self.pending is not before and self.run is None)
        return w

    monkeypatch.setattr(FedClock, "deliver", counting)
    run = simulate_fleet(trace, 1, router, config=CONFIG, profile=PROFILE, refresh_s=refresh)
    _same(run.replicas[0], ref)
    cols = list(ref.requests.columns)
    pd.testing.assert_frame_equal(run.result.requests[cols], ref.requests, check_exact=True)
    assert (run.result.requests["replica"] == 0).all()
    # the fleet-wide figures too (its timeline was resampled: the queue growth differed)
    pd.testing.assert_frame_equal(run.result.timeline, ref.timeline[run.result.timeline.columns])
    for key in ("waiting_growth", "starving", "total_throughput", "achieved_over_offered"):
        assert run.summary[key] == ref.summary[key], key
    if router != "round_robin":   # the event loop ran, and cut quiet decode runs short
        assert sum(cuts) > 0


def test_static_fleet_is_each_replicas_own_simulation(trace):
    adapters = sorted(trace["adapter"].unique())
    # adapters[0]: half on replica 0, half on replica 1
    table = pd.DataFrame({"adapter": adapters + [adapters[0]],
                          "gpu": [i % 3 for i in range(len(adapters))] + [1],
                          "weight": [1.0] * len(adapters) + [1.0]})
    run = simulate_fleet(trace, 3, StaticTable(table), config=CONFIG, profile=PROFILE)
    loop = simulate_fleet(trace, 3, StaticTable(table), config=CONFIG, profile=PROFILE,
                          one_loop=True)
    dt = max(trace["arrival_s"].iloc[-1] / 2000, 0.05)
    for k in range(3):
        rows = np.flatnonzero(run.route == k)
        own = simulate(trace.iloc[rows].reset_index(drop=True), CONFIG, PROFILE,
                       sample_dt=dt)
        _same(run.replicas[k], own)
        _same(loop.replicas[k], own)
        # the replica's share of time in steps (it was 0.0 for every fleet replica)
        busy = own.summary["waiting_held_by"]["busy_s"] / own.summary["duration_s"]
        per = run.summary["deployment"]["per_server"][k]
        assert 0 < busy <= 1 and per["busy_fraction"] == pytest.approx(busy)
    first = run.route[(trace["adapter"] == adapters[0]).to_numpy()]
    assert list(first[:6]) == [0, 1, 0, 1, 0, 1]   # equal weights alternate
    pd.testing.assert_frame_equal(run.result.requests, loop.result.requests)


def test_mixed_replicas_in_one_loop_equal_their_own_runs(trace):
    reps = [Replica(CONFIG), Replica(ServingConfig(max_loras=4, max_cpu_loras=12)),
            Replica(ServingConfig(policy="slora", max_num_seqs=32))]
    kw = dict(profile=PROFILE, window_s=40.0)
    own = simulate_fleet(trace, reps, "consistent_hash", **kw)
    loop = simulate_fleet(trace, reps, "consistent_hash", one_loop=True, **kw)
    pool = simulate_fleet(trace, reps, "consistent_hash", workers=2, **kw)
    for a, b, c in zip(own.replicas, loop.replicas, pool.replicas):
        _same(a, b)
        _same(a, c)
    per = own.summary["fleet"]["per_replica"]
    assert [p["max_loras"] for p in per] == [2, 4, 1]
    # no one replica's config stands for replicas that differ; each is in meta.replicas
    assert own.result.meta["config"] is None
    assert [m["config"]["max_loras"] for m in own.result.meta["replicas"]] == [2, 4, 1]
    assert sum(p["requests"] for p in per) == own.summary["num_requests"]


def test_ray_backend_equals_local(trace):
    # as tests/test_ml_sweep.py: CI installs the ray extra, so there a missing Ray fails
    if not os.environ.get("CI"):
        pytest.importorskip("ray")
    import ray

    short = trace[trace["arrival_s"] <= 20].reset_index(drop=True)
    kw = dict(config=CONFIG, profile=PROFILE)
    local = simulate_fleet(short, 2, "consistent_hash", **kw)
    remote = simulate_fleet(short, 2, "consistent_hash", backend="ray", workers=2, **kw)
    for a, b in zip(local.replicas, remote.replicas):
        _same(a, b)
    assert not ray.is_initialized()   # the local instance it started is shut down


def test_stale_view_routes_on_the_routers_own_sends(trace):
    """A least-outstanding router whose view is never refreshed after t=0 counts only its
    own sends: round robin. Refreshed at each arrival it follows completions instead."""
    stale = simulate_fleet(trace, 3, "least_outstanding_requests", config=CONFIG,
                           profile=PROFILE, refresh_s=1e6)
    assert (stale.route == np.arange(len(trace)) % 3).all()
    live = simulate_fleet(trace, 3, "least_outstanding_requests", config=CONFIG,
                          profile=PROFILE)
    assert (live.route != stale.route).any()


class _Sched(SimpleNamespace):
    def in_flight(self):   # the scheduler's running + waiting
        return self.num_running + self.num_waiting


def _clock(running, waiting, gpu=(), host=()):
    cache = SimpleNamespace(gpu=SimpleNamespace(resident=dict.fromkeys(gpu)),
                            host=SimpleNamespace(resident=dict.fromkeys(host)))
    sched = _Sched(num_running=running, num_waiting=waiting)
    return SimpleNamespace(sched=sched, server=SimpleNamespace(cache=cache), inbox=0)


def test_scraped_view_sees_state_as_of_its_last_refresh():
    clocks = [_clock(3, 0, gpu=[1], host=[1]), _clock(0, 0)]
    live, scraped = LiveView(clocks), ScrapedView(clocks)
    clocks[0].sched.num_running = 0          # replica 0 finished its requests ...
    clocks[1].server.cache.gpu.resident[1] = None   # ... replica 1 loaded adapter 1
    live.dirty.add(0)
    assert live.outstanding_all() == [0, 0] and live.tier(1, 1) == GPU
    assert scraped.outstanding_all() == [3, 0] and scraped.tier(1, 1) == NONE
    scraped.sent(1)
    assert scraped.outstanding_all() == [3, 1]   # its own sends, not the completions
    scraped.refresh()
    assert scraped.outstanding_all() == [0, 0] and scraped.tier(1, 1) == GPU


def test_affinity_prefers_gpu_then_host_bounded_by_load():
    clocks = [_clock(5, 0), _clock(9, 0, host=[7]), _clock(12, 0, gpu=[7], host=[7])]
    view = LiveView(clocks)
    router = AdapterAffinity(slack=16).bind(3, [f"a{i}" for i in range(8)])
    assert view.tier(2, 7) == GPU and view.tier(1, 7) == HOST and view.tier(0, 7) == NONE
    assert router.pick(7, view) == 2                 # on a GPU, though the busiest
    clocks[2].server.cache.gpu.resident.clear()
    assert router.pick(7, view) == 1                 # in host memory on 1 and 2: the less loaded
    clocks[1].sched.num_running, clocks[2].sched.num_running = 40, 30
    view.dirty.update(range(3))
    assert router.pick(7, view) == 0 and 0 in router.holders[7]   # both over the bound
    clocks[0].sched.num_running = 20
    clocks[0].server.cache.host.resident.clear()
    view.dirty.update(range(3))
    assert router.pick(7, view) == 2                 # within slack of the least loaded
    assert router.pick(3, view) == 0                 # unseen adapter: least loaded


def test_consistent_hash_moves_about_one_nth_when_a_replica_is_added():
    names = [f"tenant-{i}" for i in range(2000)]
    before = ConsistentHash().bind(8, names).table
    after = ConsistentHash().bind(9, names).table
    moved = [a != b for a, b in zip(before, after)]
    assert 0.5 / 9 < np.mean(moved) < 2 / 9
    assert all(b == 8 for m, b in zip(moved, after) if m)   # only to the new replica
    assert ConsistentHash().bind(8, names).table == before   # stable run to run
    assert np.bincount(before, minlength=8).min() > 2000 / 8 / 2   # spread over all


def test_static_table_weights_and_errors():
    table = pd.DataFrame({"adapter": ["a", "a", "(base model)"], "gpu": [0, 1, 1],
                          "weight": [0.75, 0.25, 1.0]})
    r = StaticTable(table).bind(2, ["a", "b"])
    picks = [r.pick(0, None) for _ in range(8)]
    assert picks.count(0) == 6 and picks[:4].count(1) == 1   # 3:1, interleaved
    assert r.pick(-1, None) == 1
    with pytest.raises(TwinInputError, match="'b' of the trace has no row"):
        r.pick(1, None)
    with pytest.raises(TwinInputError, match="replica index"):
        StaticTable(table).bind(1, ["a"])
    for gpu, weight, field, row in (("x", 1.0, "gpu", 0), (None, 1.0, "gpu", 0),
                                    (1.5, 1.0, "gpu", 0), (0, "abc", "weight", 0),
                                    (0, -1.0, "weight", 0), (0, float("inf"), "weight", 0)):
        bad = pd.DataFrame({"adapter": ["b", "a"], "gpu": [0, gpu], "weight": [1.0, weight]})
        with pytest.raises(TwinInputError) as err:   # a user's cell: an error, not a crash
            StaticTable(bad).bind(2, ["a", "b"])
        assert (err.value.field, err.value.row) == (field, row + 1), (gpu, weight)
    # a table given as a DataFrame is checked as a file is: a missing column is named
    with pytest.raises(TwinInputError, match=r"lacks column\(s\) \['weight'\]") as err:
        StaticTable(table.drop(columns="weight"))
    assert err.value.field == "weight"
    with pytest.raises(TwinInputError, match="routing table"):
        make_router("static")
    with pytest.raises(TwinInputError, match="unknown router"):
        make_router("random")


def test_cli_fleet_refuses_a_routing_table_no_router_reads(trace, tmp_path, capsys):
    path = write_trace(trace, tmp_path / "t.parquet")
    table = tmp_path / "routing.csv"
    table.write_text("adapter,gpu,weight\n")
    rc = main(["fleet", "--trace", str(path), "--profile", PROFILE, "--replicas", "2",
               "--routing", str(table), "--no-progress"])   # round robin would ignore it
    assert rc == 2 and "--router static" in capsys.readouterr().err


def test_cli_fleet_refuses_serving_flags_beside_replica_configs(trace, tmp_path, capsys):
    path = write_trace(trace, tmp_path / "t.parquet")
    rc1 = tmp_path / "rc1.yaml"
    rc1.write_text("max_loras: 2\nmax_cpu_loras: 4\n")
    args = ["fleet", "--trace", str(path), "--profile", PROFILE, "--no-progress",
            "--replica-config", str(rc1), "--replica-config", str(rc1)]
    # each replica's YAML is its whole config: a flag beside them would be dropped silently
    assert main(args + ["--max-loras", "5", "--max-num-seqs", "7"]) == 2
    err = capsys.readouterr().err
    assert "--max-loras, --max-num-seqs" in err and "replica's YAML" in err
    assert main(args + ["--config", str(rc1)]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(args) == 0
    # replicas padding to different ranks, no catalog: the adapters are taken at the
    # smallest, which every replica can load
    rc2 = tmp_path / "rc2.yaml"
    rc2.write_text("max_loras: 2\nmax_cpu_loras: 4\nmax_lora_rank: 8\n")
    assert main(args[:-2] + ["--replica-config", str(rc2)]) == 0


def test_cli_fleet_writes_requests_with_their_replica(trace, tmp_path, capsys):
    path = write_trace(trace, tmp_path / "t.parquet")
    rc = main(["fleet", "--trace", str(path), "--profile", PROFILE, "--replicas", "2",
               "--router", "adapter_affinity", "--max-loras", "2", "--max-cpu-loras", "4",
               "--router-refresh-s", "0.25", "--out", str(tmp_path / "f"), "--plot",
               "--json", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    req = pd.read_parquet(tmp_path / "f" / "requests.parquet")
    per = pd.read_csv(tmp_path / "f" / "replicas.csv")
    assert req["replica"].value_counts().sort_index().tolist() == per["requests"].tolist()
    assert summary["fleet"]["refresh_s"] == 0.25
    assert (tmp_path / "f" / "timeline.png").stat().st_size > 0
    # each replica's own timeline, which the plot draws: summed, the fleet's own
    own = pd.read_parquet(tmp_path / "f" / "replica_timelines.parquet")
    assert sorted(own["replica"].unique()) == [0, 1]
    whole = pd.read_parquet(tmp_path / "f" / "timeline.parquet")
    assert own.groupby("replica")["tokens"].sum().sum() > 0
    assert own.groupby("replica")["running"].max().max() <= whole["running"].max()
    assert main(["fleet", "--trace", str(path), "--router", "static"]) == 2
    # a router that reads no state has no view to refresh: refused, not ignored
    assert main(["fleet", "--trace", str(path), "--profile", PROFILE, "--router",
                 "round_robin", "--router-refresh-s", "1"]) == 2
    assert "reads no view" in capsys.readouterr().err
    assert main(["fleet", "--trace", str(path), "--profile", PROFILE, "--replicas", "2",
                 "--router", "adapter_affinity", "--affinity-slack", "0", "--max-loras",
                 "2", "--max-cpu-loras", "4", "--no-progress"]) == 0   # no slack: allowed
    assert "AdapterAffinity(slack=0)" in capsys.readouterr().out
    assert main(["fleet", "--trace", str(path), "--profile", PROFILE, "--replicas", "2",
                 "--router", "consistent_hash", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "view refreshed" not in out and "from the trace alone" in out


def test_fleet_of_one_with_prefix_caching_is_simulate():
    """A trace naming its prompts' blocks (multi-turn sessions): the fed clock passes each
    request's hash ids on, so the fleet's prefix-cache hits are simulate's, request for
    request (and there are hits to compare)."""
    from twin.workload.schema import read_trace
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "traces/sessions_16lora_10min.parquet"
    sessions = read_trace(path)
    sessions = sessions[sessions["arrival_s"] < 120].reset_index(drop=True)
    sessions.attrs.update(read_trace(path).attrs)
    ref = simulate(sessions, CONFIG, PROFILE)
    run = simulate_fleet(sessions, 1, "adapter_affinity", config=CONFIG, profile=PROFILE)
    _same(run.replicas[0], ref)
    assert ref.requests["prefix_cache_hits"].sum() > 0
    two = simulate_fleet(sessions, 2, "adapter_affinity", config=CONFIG, profile=PROFILE)
    assert two.result.requests["prefix_cache_hits"].sum() > 0


def test_event_loop_makes_no_reference_cycles_and_restores_the_gc(trace):
    """The loop pauses Python's cyclic GC (``twin.fleet.loop``): sound only while a fleet
    run leaves no cyclic garbage behind; the GC's state is restored after it."""
    import gc

    short = trace[trace["arrival_s"] <= 20].reset_index(drop=True)
    kw = dict(config=CONFIG, profile=PROFILE)
    simulate_fleet(short, 2, "adapter_affinity", **kw)   # warm: imports, caches
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)   # keep what a collection finds, to look at it
    try:
        simulate_fleet(short, 2, "adapter_affinity", **kw)
        assert not gc.isenabled()   # left as it was found
        gc.collect()
        found = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # the fleet's own objects in a cycle; cyclic garbage that other tests left unreachable
    # meanwhile (a closed matplotlib figure, say) is not the loop's
    ours = [o for o in found if type(o).__module__.startswith("twin.")
            or "/twin/" in getattr(getattr(o, "__code__", None), "co_filename", "")]
    assert not ours, ours[:5]
    simulate_fleet(short, 2, "least_outstanding_requests", refresh_s=0.5, **kw)
    assert gc.isenabled()


def test_pool_shares_are_each_replicas_rows_largest_first(trace):
    from twin.fleet.fleet import Replica as Rep, _Shares

    route = np.arange(len(trace)) % 5
    route[route == 3] = 1   # replica 1 gets two fifths, replica 3 none
    reps = [Rep(CONFIG, PROFILE)] * 5
    shares = _Shares(trace, reps, route, [None] * 5, {})
    got = list(shares)
    assert len(shares) == len(got) == 4
    assert [k for k, *_ in got][0] == 1
    sizes = [len(sub) for _, sub, *_ in got]
    assert sizes == sorted(sizes, reverse=True)
    for k, sub, *_ in got:
        pd.testing.assert_frame_equal(
            sub, trace.iloc[np.flatnonzero(route == k)].reset_index(drop=True))


def test_fleet_itl_percentiles_are_over_every_replicas_tokens(trace):
    """A replica 3x slower serving ~0.2% of the tokens: the fleet's ITL p99 is the fast
    replica's (the pooled tokens' 99th percentile), not the slow one's (the largest
    replica p99, as it was); the pooled histogram is the replicas' summed."""
    from twin.costs.profile import load_profile
    from twin.policies.deployment import scaled_profile
    rare = pd.DataFrame({"request_id": [900001, 900002], "arrival_s": [10.0, 30.0],
                         "adapter": ["rare", "rare"], "prompt_tokens": [64, 64],
                         "output_tokens": [200, 200]})
    two = pd.concat([trace, rare]).sort_values("arrival_s", kind="stable")
    two = two.reset_index(drop=True)
    table = pd.DataFrame({"adapter": sorted(trace["adapter"].unique()) + ["rare"],
                          "gpu": [0] * trace["adapter"].nunique() + [1], "weight": 1.0})
    slow = scaled_profile(load_profile(PROFILE), 3.0)
    reps = [Replica(CONFIG, PROFILE), Replica(CONFIG, slow)]
    run = simulate_fleet(two, reps, StaticTable(table))
    fast_p99, slow_p99 = (r.summary["itl_ms"]["p99"] for r in run.replicas)
    assert slow_p99 > 2 * fast_p99
    fleet = run.summary["itl_ms"]
    assert fleet["p99"] == pytest.approx(fast_p99, rel=0.02)
    assert fleet["median"] == pytest.approx(run.replicas[0].summary["itl_ms"]["median"],
                                            rel=0.02)
    np.testing.assert_allclose(run.result.itl_bins,
                               run.replicas[0].itl_bins + run.replicas[1].itl_bins)


def test_fleet_verdict_and_kv_figures_are_the_replicas(tmp_path):
    """Three replicas whose queues grow by 25, 41 and 22 requests in a minute, each under
    its own threshold (50): summed, 89 read as the fleet's growing queue, STARVING beside
    three 'ok' rows (and place --verify-fleet sized routers on it). The KV cache's peak is
    the fullest replica's (it was a capacity-weighted mean of peaks, nobody's), and its
    capacity counts replicas that got no request."""
    path = tmp_path / "h.parquet"
    assert main(["trace", "rate-classes", "--adapters", "16", "--rates", "6.4,3.2,1.6",
                 "--duration-s", "60", "--out", str(path)]) == 0
    cfg = ServingConfig(max_loras=8, max_cpu_loras=8, max_num_seqs=2048,
                        max_num_batched_tokens=2048, preload_adapters=True)
    run = simulate_fleet(pd.read_parquet(path), 3, "adapter_affinity", config=cfg,
                         profile="llama31-8b-h100-64gb")
    s = run.summary
    own = [r.summary for r in run.replicas]
    assert s["waiting_growth"] > max(50, 0.02 * s["num_requests"])   # the summed queue
    assert all(not o["starving"] for o in own)
    assert not s["starving"] and s["fleet"]["starving_replicas"] == 0
    assert s["kv_cache"]["usage_max"] == max(o["kv_cache"]["usage_max"] for o in own)
    light = rate_class_trace(2, (0.5,), duration_s=20, lengths=uniform_lengths(8, 64),
                             seed=3)
    four = simulate_fleet(light, 4, "consistent_hash", config=CONFIG, profile=PROFILE)
    idle = [r is None for r in four.replicas]
    assert any(idle)
    one = next(r for r in four.replicas if r is not None)
    assert four.summary["kv_cache"]["capacity_tokens"] == 4 * one.summary["kv_cache"][
        "capacity_tokens"]


def test_a_replica_row_names_a_limit_only_when_it_starves():
    """As twin simulate's verdict: 'ok (queue held by max_loras)' read as a problem on a
    replica that keeps up; one that keeps up while holding an adapter back says so."""
    from twin.fleet.report import format_fleet

    row = dict(replica=0, requests=10, total_throughput=100.0, ttft_p99_ms=5.0,
               itl_mean_ms=1.0, loads_from_disk=0, loads_from_host=0, preemptions=0)
    f = {"replicas": 3, "router": "r", "reads_state": False, "refresh_s": None,
         "imbalance": {"requests": 1.0, "total_throughput": 1.0}, "starving_replicas": 1,
         "per_replica": [dict(row, starving=False, held_by="max_loras", held_back=""),
                         dict(row, replica=1, starving=True, held_by="kv_cache", held_back=""),
                         dict(row, replica=2, starving=False, held_by="max_loras",
                              held_back="lora-3 waited 48.0 s")]}
    lines = format_fleet(f).splitlines()
    assert lines[-3].endswith("  ok")
    assert lines[-2].endswith("STARVING (queue held by kv_cache)")
    assert lines[-1].endswith("ok (lora-3 waited 48.0 s on average: held back)")


def test_mixed_rank_replicas_price_adapters_as_their_own_simulate(trace):
    """Without a catalog each replica has the trace's adapters at its own max_lora_rank,
    as `twin simulate` of its config does (they were all at the smallest replica's: the
    rank-64 replica loaded rank-8 adapters, its share's own run rank-64 ones)."""
    adapters = sorted(trace["adapter"].unique())
    table = pd.DataFrame({"adapter": adapters, "gpu": [i % 2 for i in range(len(adapters))],
                          "weight": 1.0})
    reps = [ServingConfig(max_loras=2, max_cpu_loras=4, max_lora_rank=8),
            ServingConfig(max_loras=2, max_cpu_loras=4, max_lora_rank=64)]
    run = simulate_fleet(trace, reps, StaticTable(table), profile=PROFILE)
    dt = max(trace["arrival_s"].iloc[-1] / 2000, 0.05)
    for k, cfg in enumerate(reps):
        own = simulate(trace.iloc[run.route == k].reset_index(drop=True), cfg, PROFILE,
                       sample_dt=dt)
        _same(run.replicas[k], own)


def test_refresh_is_refused_for_a_router_that_reads_no_state_and_idle_slora_counts(trace):
    """The API refuses what the CLI refuses (a refresh nothing reads); an idle S-LoRA
    replica's KV capacity is its unified pool, as its live twin's."""
    with pytest.raises(TwinInputError, match="reads no view to refresh"):
        simulate_fleet(trace, 2, "round_robin", config=CONFIG, profile=PROFILE, refresh_s=1.0)
    light = rate_class_trace(1, (0.5,), duration_s=20, lengths=uniform_lengths(8, 64), seed=3)
    slora = ServingConfig(policy="slora", max_num_seqs=32)
    run = simulate_fleet(light, 3, "consistent_hash", config=slora, profile=PROFILE)
    live = [r for r in run.replicas if r is not None]
    assert len(live) == 1
    assert run.summary["kv_cache"]["capacity_tokens"] == 3 * live[0].summary["kv_cache"][
        "capacity_tokens"]


def _small_trace(seed):
    return rate_class_trace(4, (2.0, 1.0), duration_s=20, lengths=uniform_lengths(8, 128),
                            seed=seed)


def test_combined_itl_from_results_without_histograms_is_a_bound():
    """Results read back from disk carry no ITL histogram: the combined median is the
    servers' medians weighted by completed requests, the p99 the largest server p99 (an
    upper bound of the pooled one); with histograms it is the pooled percentile."""
    from twin.policies.combine import _combined_itl

    a = simulate(_small_trace(1), CONFIG, PROFILE)
    b = simulate(_small_trace(2), CONFIG.replace(max_loras=1), PROFILE)
    p50, p99, bins = _combined_itl([a, b])
    assert bins is not None and p99 <= max(a.summary["itl_ms"]["p99"],
                                           b.summary["itl_ms"]["p99"]) / 1000 + 1e-12
    a.itl_bins = None
    m50, m99, none = _combined_itl([a, b])
    assert none is None
    assert m99 == max(a.summary["itl_ms"]["p99"], b.summary["itl_ms"]["p99"]) / 1000
    w = [a.summary["completed"], b.summary["completed"]]
    assert m50 == pytest.approx(np.average([a.summary["itl_ms"]["median"],
                                            b.summary["itl_ms"]["median"]], weights=w) / 1000)

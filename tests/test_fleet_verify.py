"""``twin place --verify-fleet`` (``twin.fleet.verify``): a placement run as a static-routed
fleet, and the GPU count each router needs, on a small trace (12 adapters, ~11 req/s, 30 s:
one GPU of ``CONFIG`` starves, two keep up)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from twin.cli import main
from twin.cli.place_fleet import FLEET_ROUTERS
from twin.config import ServingConfig
from twin.fleet import Replica, simulate_fleet
from twin.fleet.routers import StaticTable
from twin.results.queue_head import main_limit
from twin.sim import simulate
from twin.fleet.verify import (ROUTERS_TO_SIZE, check_placement, fleet_config,
                               format_fleet_check, format_placement_check, gpus_needed,
                               keeps_up, slo_misses, verify_fleet)
from twin.workload.generate import rate_class_trace, uniform_lengths

PROFILE = "llama31-8b-h100-64gb-first-principles"   # pinned: stable shipped profile
CONFIG = ServingConfig(max_loras=4, max_cpu_loras=12, max_num_seqs=16)


@pytest.fixture(scope="module")
def trace():
    return rate_class_trace(12, (1.6, 0.8, 0.4), duration_s=30,
                            lengths=uniform_lengths(8, 256), seed=1)


def _routing(trace, gpus: int) -> pd.DataFrame:
    """Adapters dealt round the GPUs by request count (as place's balanced partition)."""
    counts = trace["adapter"].value_counts()
    return pd.DataFrame({"adapter": counts.index.astype(str),
                         "gpu": [i % gpus for i in range(len(counts))], "weight": 1.0})


def test_a_placement_that_fits_keeps_up_as_a_fleet(trace):
    check = verify_fleet(trace, [CONFIG, CONFIG], _routing(trace, 2), profile=PROFILE,
                         routers=("round_robin",), max_gpus=4)
    p = check["placement"]
    assert p["keeps_up"] and p["starving_gpus"] == []
    assert sum(g["requests"] for g in p["per_gpu"]) == len(trace)
    assert all(g["requests"] > 0 for g in p["per_gpu"])
    (rr,) = check["routers"]
    assert rr["router"] == "round_robin" and rr["gpus"] is not None
    assert "every GPU keeps up" in format_fleet_check(check)


@pytest.mark.parametrize("one_loop", [False, True])
def test_replicas_preload_only_the_adapters_they_serve(trace, one_loop):
    """With preload_adapters each GPU of a placement preloads its own --lora-modules: the
    static fleet equals each GPU's own run on its share (what place verified), request for
    request, whether the replicas are told their adapters or take them from the table;
    preloading the whole catalog's first adapters instead loads more from disk."""
    cfg = CONFIG.replace(max_loras=6, max_cpu_loras=6, preload_adapters=True)
    table = _routing(trace, 2)
    served = [tuple(table.loc[table["gpu"] == k, "adapter"]) for k in range(2)]
    run = simulate_fleet(trace, [Replica(cfg, adapters=a) for a in served],
                         StaticTable(table), profile=PROFILE, one_loop=one_loop)
    untold = simulate_fleet(trace, [cfg, cfg], StaticTable(table), profile=PROFILE,
                            one_loop=one_loop)
    for a, b in zip(run.replicas, untold.replicas):
        pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    every = tuple(sorted(trace["adapter"].unique()))
    naive = simulate_fleet(trace, [Replica(cfg, adapters=every)] * 2, StaticTable(table),
                           profile=PROFILE, one_loop=one_loop)
    dt = max(trace["arrival_s"].iloc[-1] / 2000, 0.05)
    for k in range(2):
        own = simulate(trace.iloc[run.route == k].reset_index(drop=True), cfg, PROFILE,
                       sample_dt=dt)
        pd.testing.assert_frame_equal(run.replicas[k].requests, own.requests,
                                      check_exact=True)
        assert own.summary["adapter_loads"]["from_disk"] == 0   # all 6 preloaded
    assert sum(p["loads_from_disk"] for p in naive.summary["fleet"]["per_replica"]) > 0


def test_a_too_small_placement_is_reported_starving(trace):
    check = verify_fleet(trace, [CONFIG], _routing(trace, 1), profile=PROFILE, routers=())
    assert not check["placement"]["keeps_up"]
    assert check["placement"]["starving_gpus"] == [0]
    # what held its queue is the one the GPU's own run names, and the report says it
    held = check["placement"]["per_gpu"][0]["held_by"]
    own = simulate_fleet(trace, [CONFIG], StaticTable(_routing(trace, 1)), profile=PROFILE)
    assert held and held == main_limit(own.replicas[0].summary["waiting_held_by"])
    assert f"STARVING (queue held by {held})" in format_fleet_check(check)


@pytest.mark.parametrize("router", ["round_robin", "adapter_affinity"])
def test_gpu_search_returns_the_fewest_that_keep_up(trace, router):
    down = gpus_needed(trace, router, CONFIG, start=4, max_gpus=6, profile=PROFILE)
    up = gpus_needed(trace, router, CONFIG, start=1, max_gpus=6, profile=PROFILE)
    n = down["gpus"]
    assert n is not None and up["gpus"] == n and n < 4
    assert {r["gpus"]: r["keeps_up"] for r in down["runs"]}[n]
    fewer = n - 1   # one GPU fewer starves (found by the search, and in a run of its own)
    if fewer >= 1:
        assert not {r["gpus"]: r["keeps_up"] for r in up["runs"]}[fewer]
        assert not keeps_up(simulate_fleet(trace, fewer, router, config=CONFIG,
                                           profile=PROFILE))


def test_gpu_search_reports_none_when_the_cap_starves(trace):
    tight = CONFIG.replace(max_num_seqs=2)
    r = gpus_needed(trace, "round_robin", tight, start=1, max_gpus=2, profile=PROFILE)
    assert r["gpus"] is None and [t["gpus"] for t in r["runs"]] == [1, 2]


def test_fleet_config_covers_every_gpu():
    a = ServingConfig(max_loras=2, max_cpu_loras=8, max_lora_rank=8)
    b = ServingConfig(max_loras=6, max_cpu_loras=6, max_lora_rank=16)
    c = fleet_config([a, b])
    assert (c.max_loras, c.max_cpu_loras, c.max_lora_rank) == (6, 8, 16)


def test_cli_routers_match_and_help_explains(capsys):
    assert tuple(FLEET_ROUTERS) == tuple(ROUTERS_TO_SIZE)
    with pytest.raises(SystemExit):
        main(["place", "--help"])
    out = capsys.readouterr().out
    assert "--verify-fleet" in out and "--fleet-max-gpus" in out and "fleet_check" in out


def test_cli_place_verify_fleet_writes_fleet_check(trace, tmp_path, capsys):
    tp = tmp_path / "t.parquet"
    trace.to_parquet(tp, index=False)
    out = tmp_path / "pl"
    rc = main(["place", "--trace", str(tp), "--profile", PROFILE, "--max-runs", "2",
               "--verify-fleet", "--fleet-routers", "round_robin", "--fleet-max-gpus", "3",
               "--out", str(out)])
    record = json.loads((out / "placement.json").read_text())
    check = record["fleet_check"]
    assert rc == (0 if record["ok"] and check["placement"]["keeps_up"] else 3)
    assert check["placement"]["gpus"] == len(record["gpus"])
    assert [r["router"] for r in check["routers"]] == ["round_robin"]
    assert check["max_gpus"] == 3 and all(t["gpus"] <= 3 for t in check["routers"][0]["runs"])
    assert "fleet check: the placement on" in capsys.readouterr().out


def test_twin_fleet_on_the_files_place_wrote_runs_the_fleet_place_checked(tmp_path):
    """Each replica preloads the adapters its vllm_config.yaml lists under lora-modules;
    it preloaded the whole catalog (16 adapters into a host cache of 6), evicting the ones
    it serves: disk loads and a p99 TTFT the placement's own check never saw."""
    tp = tmp_path / "t.parquet"
    rate_class_trace(16, (3.2, 1.6, 0.8), duration_s=60, seed=0).to_parquet(tp, index=False)
    out = tmp_path / "pl"
    main(["place", "--trace", str(tp), "--verify-fleet", "--fleet-routers", "round_robin",
          "--fleet-max-gpus", "2", "--out", str(out)])
    record = json.loads((out / "placement.json").read_text())
    placed = record["fleet_check"]["placement"]["per_gpu"]
    assert len(placed) >= 2 and max(g["config"]["max_cpu_loras"] for g in record["gpus"]) < 16
    configs = [a for k in range(len(placed))
               for a in ("--replica-config", str(out / f"gpu-{k}" / "vllm_config.yaml"))]
    assert main(["fleet", "--trace", str(tp), "--router", "static", "--routing",
                 str(out / "routing.csv"), *configs, "--no-progress",
                 "--out", str(tmp_path / "fl")]) in (0, 3)
    rows = pd.read_csv(tmp_path / "fl" / "replicas.csv")
    assert rows["loads_from_disk"].tolist() == [g["loads_from_disk"] for g in placed]
    assert rows["ttft_p99_ms"].tolist() == pytest.approx([g["ttft_p99_ms"] for g in placed])


def test_cli_unknown_fleet_router_fails_before_placing(trace, tmp_path, capsys):
    tp = tmp_path / "t.parquet"
    trace.to_parquet(tp, index=False)
    for verify in (["--verify-fleet"], []):   # a typo is refused with or without the check
        rc = main(["place", "--trace", str(tp), "--profile", PROFILE, *verify,
                   "--fleet-routers", "round_robin,static", "--out", str(tmp_path / "pl")])
        assert rc != 0
        assert "--fleet-routers" in capsys.readouterr().err
        assert not (tmp_path / "pl" / "placement.json").exists()


# -- SLOs on the fleet's requests (issue 16) ----------------------------------------------------

def _uneven(trace):
    """Two GPUs, the first with a single sequence slot (its requests queue: high p99
    TTFT), the second as CONFIG; adapters dealt alternately."""
    configs = [CONFIG.replace(max_num_seqs=1), CONFIG.replace(max_loras=6)]
    return configs, _routing(trace, 2)


def test_slo_is_scored_on_the_fleet_and_the_gpu_that_misses_is_named(trace):
    configs, table = _uneven(trace)
    plain = check_placement(trace, configs, table, profile=PROFILE)
    assert "slo_check" not in plain
    t0, t1 = (g["ttft_p99_ms"] for g in plain["per_gpu"])
    assert t0 > 2 * t1   # the one-slot GPU queues
    # between the GPUs' own p99s: the slow GPU misses it, the fast one meets it; the
    # fleet's p99 is a quantile of their mixture, so it lies between the two
    slo = {"ttft": float(np.sqrt(t0 * t1)), "tpot": 1e6}
    p = check_placement(trace, configs, table, profile=PROFILE, slo=slo)
    sc = p["slo_check"]
    assert [g["gpu"] for g in sc["gpus_missing"]] == [0]
    assert sc["gpus_missing"][0]["missed"] == ["ttft"]
    assert t1 <= sc["ttft_p99"] <= t0
    assert sc["met"] == (sc["ttft_p99"] <= slo["ttft"])
    # a looser SLO than the fleet's p99: met by the fleet, still missed by GPU 0
    loose = {"ttft": (sc["ttft_p99"] + t0) / 2}
    sc2 = check_placement(trace, configs, table, profile=PROFILE, slo=loose)["slo_check"]
    assert sc2["met"] and [g["gpu"] for g in sc2["gpus_missing"]] == [0]
    text = "\n".join(format_placement_check({**p, "slo_check": sc2}))
    assert "on the fleet's requests" in text and "gpu 0 (TTFT" in text
    # tighter than either GPU: the fleet misses, both GPUs are named
    tight = {"ttft": t1 / 2}
    sc3 = check_placement(trace, configs, table, profile=PROFILE, slo=tight)["slo_check"]
    assert not sc3["met"] and sc3["missed"] == ["ttft"]
    assert [g["gpu"] for g in sc3["gpus_missing"]] == [0, 1]
    assert "MISSED (TTFT)" in "\n".join(format_placement_check({**p, "slo_check": sc3}))


def test_slo_misses_counts_a_missing_p99_as_missed():
    assert slo_misses({"ttft": 10.0, "tpot": 5.0}, {"ttft": 10.0, "tpot": 4.0}) == ["tpot"]
    assert slo_misses({"ttft": float("nan"), "tpot": 1.0}, {"ttft": 1e9}) == ["ttft"]
    assert slo_misses({"ttft": 50.0}, None) == []


def test_cli_place_verify_fleet_with_slo_exits_3_when_the_fleet_misses(trace, tmp_path,
                                                                       capsys):
    tp = tmp_path / "t.parquet"
    trace.to_parquet(tp, index=False)
    out = tmp_path / "pl"
    rc = main(["place", "--trace", str(tp), "--profile", PROFILE, "--max-runs", "2",
               "--slo", "ttft=100000,tpot=100000", "--verify-fleet", "--fleet-routers",
               "round_robin", "--fleet-max-gpus", "2", "--out", str(out)])
    check = json.loads((out / "placement.json").read_text())["fleet_check"]["placement"]
    sc = check["slo_check"]
    assert sc["slo"] == {"ttft": 100000.0, "tpot": 100000.0} and sc["met"]
    assert rc == (0 if check["keeps_up"] else 3)
    assert "on the fleet's requests" in capsys.readouterr().out

"""Every CLI command and flag that no other test ran, through ``twin.cli.main`` on tiny
inputs, each output checked for behaviour (not just that a file appeared): ``twin
--version``; ``simulate --json/--steps/--catalog/--window-s``; the ``trace`` actions
rate-classes, powerlaw, mooncake, servegen; ``compare --gpus/--hybrid-*``; ``calibrate
--bench-config``. Actions that read the shared public data skip only when it is absent."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from twin.cli import main
from twin.errors import TwinInputError
from twin.workload.generate import rate_class_trace, uniform_lengths
from twin.workload.schema import read_trace, write_trace

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "llama31-8b-h100-64gb-first-principles"   # pinned: stable shipped profile


def _shared(name: str) -> Path:
    """A public trace file, or skip when the shared data is absent (nothing else skips)."""
    from twin.workload.public import shared_trace_path

    try:
        return shared_trace_path(name)
    except TwinInputError:
        pytest.skip(f"shared data ({name}) not available")


def _run(args, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().out


@pytest.fixture(scope="module")
def light(tmp_path_factory):
    """8 adapters, ~2 req/s in all, short uniform lengths: a light 60-s trace."""
    tr = rate_class_trace(8, (0.4, 0.2), duration_s=60, lengths=uniform_lengths(8, 256),
                          seed=3)
    return write_trace(tr, tmp_path_factory.mktemp("light") / "light.parquet"), tr


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """8 adapters, ~15 req/s: more than one GPU with max_loras=2 serves."""
    tr = rate_class_trace(8, (3.2, 1.6, 0.8), duration_s=60, lengths=uniform_lengths(8, 512),
                          seed=0)
    return write_trace(tr, tmp_path_factory.mktemp("heavy") / "heavy.parquet"), tr


# -- twin --version -------------------------------------------------------------------------

def test_version_prints_the_package_version(capsys):
    import twin

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"twin {twin.__version__}"
    # the version users see is the one the package is built with
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert twin.__version__ == meta["project"]["version"]


def test_python_m_twin_is_the_twin_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "twin", "--version"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().startswith("twin ")


# -- simulate -------------------------------------------------------------------------------

def test_simulate_json_equals_saved_summary(light, tmp_path, capsys):
    path, tr = light
    rc, out = _run(["simulate", "--trace", path, "--profile", PROFILE, "--max-loras", 2,
                    "--no-progress", "--json", "--out", tmp_path / "run"], capsys)
    assert rc == 0
    printed = json.loads(out)        # stdout is one JSON document; "wrote ..." goes to stderr
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert printed == saved["summary"]
    assert printed["num_requests"] == len(tr) and printed["completed"] == len(tr)
    assert saved["meta"]["config"]["max_loras"] == 2


def test_simulate_steps_table_accounts_for_every_token(light, tmp_path, capsys):
    path, tr = light
    rc, _ = _run(["simulate", "--trace", path, "--profile", PROFILE, "--max-loras", 2,
                  "--no-progress", "--steps", "--out", tmp_path / "run"], capsys)
    assert rc == 0
    steps = pd.read_parquet(tmp_path / "run" / "steps.parquet")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())["summary"]
    req = pd.read_parquet(tmp_path / "run" / "requests.parquet")
    assert s["completed"] == len(tr) and s["preemptions"] == 0   # light: no recomputation
    # one row per run of identical steps: their step counts add up to the run's
    assert int(steps["steps"].sum()) == s["steps"]
    # every prompt token is prefilled once; the first output token comes with the prefill,
    # each further one from one decode step
    assert int(steps["prefill_tokens"].sum()) == int(req["prompt_tokens"].sum())
    assert int((steps["decode_seqs"] * steps["steps"]).sum()) == int(
        (req["generated_tokens"] - 1).sum())
    assert int(steps["loads"].sum()) == (s["adapter_loads"]["from_disk"]
                                         + s["adapter_loads"]["from_host"])
    assert (np.diff(steps["start_s"]) >= 0).all() and (steps["duration_s"] > 0).all()
    # the last step ends when the last request finishes
    end = steps["start_s"].iloc[-1] + steps["duration_s"].iloc[-1]
    assert end == pytest.approx(req["finish_s"].max(), abs=1e-6)
    # without --out the step log would go nowhere: refused, as --plot is
    for flag in ("--steps", "--plot"):
        rc, _ = _run(["simulate", "--trace", path, "--profile", PROFILE, flag], capsys)
        assert rc == 2


def test_simulate_catalog_ranks_set_load_times(light, tmp_path, capsys):
    path, tr = light
    adapters = sorted(tr["adapter"].dropna().unique())
    per_load = {}
    for rank in (8, 64):
        cat = tmp_path / f"cat{rank}.csv"
        pd.DataFrame({"adapter": adapters, "rank": rank}).to_csv(cat, index=False)
        rc, out = _run(["simulate", "--trace", path, "--profile", PROFILE, "--catalog", cat,
                        "--max-loras", 2, "--max-lora-rank", 64, "--no-progress", "--json"],
                       capsys)
        assert rc == 0
        loads = json.loads(out)["adapter_loads"]
        n = loads["from_disk"] + loads["from_host"]
        assert n > len(adapters)   # 2 slots for 8 adapters: adapters are swapped in and out
        per_load[rank] = loads["time_s"] / n
    # rank-64 adapters hold 8x the weights of rank-8 ones: every load takes longer
    assert per_load[64] > 1.5 * per_load[8]


def test_simulate_window_crops_to_the_window(heavy, tmp_path, capsys):
    path, tr = heavy
    res = {}
    for w in (None, 30.0):
        extra = [] if w is None else ["--window-s", w]
        rc, out = _run(["simulate", "--trace", path, "--profile", PROFILE, "--max-loras", 8,
                        "--no-progress", "--json", *extra], capsys)
        assert rc == 0
        res[w] = json.loads(out)
    full, win = res[None], res[30.0]
    inside = tr[tr["arrival_s"] <= 30.0]
    assert win["duration_s"] == 30.0 and full["duration_s"] > 60.0
    # arrivals after the window are dropped; throughput counts what finished inside it
    assert win["num_requests"] == len(inside) < full["num_requests"] == len(tr)
    assert win["completed"] < len(inside)   # requests still in flight at 30 s
    assert win["total_throughput"] * 30.0 <= (inside["prompt_tokens"].sum()
                                              + inside["output_tokens"].sum())
    offered = (inside["prompt_tokens"].sum() + inside["output_tokens"].sum()) / 30.0
    assert win["offered_total_throughput"] == pytest.approx(offered)


# -- trace actions --------------------------------------------------------------------------

def test_trace_rate_classes(tmp_path, capsys):
    out = tmp_path / "rc.parquet"
    rc, text = _run(["trace", "rate-classes", "--adapters", 6, "--rates", "2,0.5",
                     "--duration-s", 400, "--lengths", "uniform", "--uniform", "8,64",
                     "--seed", 1, "--out", out], capsys)
    assert rc == 0 and str(out) in text
    df = read_trace(out)
    assert sorted(df["adapter"].unique()) == [f"lora-{i}" for i in range(6)]
    assert df["arrival_s"].max() < 400
    # classes assigned round-robin: three adapters at ~2 req/s, three at ~0.5 req/s
    rates = np.sort(df.groupby("adapter").size().to_numpy() / 400.0)
    assert np.all(np.abs(rates[:3] - 0.5) < 0.2) and np.all(np.abs(rates[3:] - 2.0) < 0.4)
    assert df["prompt_tokens"].between(8, 63).all() and df["output_tokens"].between(8, 63).all()
    # the seed makes it reproducible (here through the CSV writer)
    rc, _ = _run(["trace", "rate-classes", "--adapters", 6, "--rates", "2,0.5",
                  "--duration-s", 400, "--lengths", "uniform", "--uniform", "8,64",
                  "--seed", 1, "--out", tmp_path / "again.csv"], capsys)
    assert rc == 0
    again = read_trace(tmp_path / "again.csv")
    np.testing.assert_allclose(again["arrival_s"], df["arrival_s"])
    assert (again["adapter"].to_numpy() == df["adapter"].to_numpy()).all()
    assert "note:" not in capsys.readouterr().err
    # fewer adapters than classes: a class no adapter takes is said, not dropped silently
    assert main(["trace", "rate-classes", "--adapters", "2", "--rates", "1.6,0.8,0.4",
                 "--duration-s", "30", "--out", str(tmp_path / "two.parquet")]) == 0
    assert "no adapter has rate(s) 0.4 req/s" in capsys.readouterr().err


def test_trace_powerlaw(tmp_path, capsys):
    out = tmp_path / "pl.parquet"
    rc, _ = _run(["trace", "powerlaw", "--adapters", 10, "--rate", 5, "--alpha", 0.3,
                  "--duration-s", 600, "--lengths", "uniform", "--seed", 2, "--out", out],
                 capsys)
    assert rc == 0
    df = read_trace(out)
    assert len(df) / 600.0 == pytest.approx(5.0, rel=0.1)
    assert df["arrival_s"].max() < 600 and set(df["adapter"]) <= {f"lora-{i}" for i in range(10)}
    # adapter = floor(N X), X ~ power(0.3): P(lora-0) = 0.1^0.3 ~ 0.50, the rest decreasing
    share = df["adapter"].value_counts(normalize=True)
    assert share["lora-0"] == pytest.approx(0.1 ** 0.3, abs=0.05)
    assert share["lora-0"] > share.get("lora-1", 0) > share.get("lora-9", 0)


def test_trace_mooncake(tmp_path, capsys):
    _shared("mooncake_conversation_trace.jsonl")
    out = tmp_path / "mc.parquet"
    rc, _ = _run(["trace", "mooncake", "--kind", "conversation", "--limit-s", 300,
                  "--adapters", 4, "--seed", 0, "--out", out], capsys)
    assert rc == 0
    df = read_trace(out)
    assert len(df) > 100 and df["arrival_s"].max() < 300
    counts = df["adapter"].value_counts()
    assert sorted(counts.index) == [f"lora-{i}" for i in range(4)]
    assert counts.min() > 0.15 * len(df)   # uniform popularity: ~25 % each
    assert df["prompt_tokens"].mean() > 1000   # Mooncake's prompts are long


def test_trace_servegen(tmp_path, capsys):
    _shared("servegen_client_rate_windows.csv.gz")
    out = tmp_path / "sg.parquet"
    rc, _ = _run(["trace", "servegen", "--tenants", 8, "--duration-s", 600,
                  "--total-rate", 5, "--seed", 0, "--out", out], capsys)
    assert rc == 0
    df = read_trace(out)
    assert df["arrival_s"].max() < 600 and 1 < df["adapter"].nunique() <= 8
    assert len(df) / 600.0 == pytest.approx(5.0, rel=0.3)
    # real tenant skew: the busiest tenant sends more than an equal share
    assert df["adapter"].value_counts(normalize=True).iloc[0] > 1 / 8


# -- compare --------------------------------------------------------------------------------

def _compare(path, out, capsys, *extra):
    rc, _ = _run(["compare", "--trace", path, "--profile", PROFILE, "--max-loras", 2,
                  "--out", out, *extra], capsys)
    assert rc == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("flag, value", [("--hybrid-k", "0"), ("--merged-min-kv-tokens", "-1"),
                                         ("--merged-min-kv-tokens", "0"), ("--gpus", "0"),
                                         ("--clients", "0"), ("--client-devices", "foo")])
def test_compare_refuses_a_bad_flag_before_any_strategy_runs(heavy, tmp_path, capsys,
                                                             monkeypatch, flag, value):
    import twin.cli.compare as cmd

    path, _ = heavy
    ran = []
    monkeypatch.setattr(cmd, "compare", lambda *a, **k: ran.append(1))
    try:   # argparse's own check exits; twin's returns the input-error code
        rc = main(["compare", "--trace", str(path), "--profile", PROFILE, flag, value,
                   "--out", str(tmp_path / "c")])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2 and flag in capsys.readouterr().err and ran == []


def test_compare_gpus_adds_capacity(heavy, tmp_path, capsys):
    path, _ = heavy
    one = _compare(path, tmp_path / "g1", capsys, "--policies", "vllm", "--gpus", 1)
    two = _compare(path, tmp_path / "g2", capsys, "--policies", "vllm", "--gpus", 2)
    d1, d2 = one["deployments"]["vllm"], two["deployments"]["vllm"]
    assert (d1["gpus"], d2["gpus"]) == (1, 2) and (d1["servers"], d2["servers"]) == (1, 2)
    assert sum(s["adapters"] for s in d2["per_server"]) == 8
    t1, t2 = one["table"][0], two["table"][0]
    assert t1["starving"]   # one GPU with 2 slots does not keep up with this trace
    assert t2["total_tok_per_s"] > 1.1 * t1["total_tok_per_s"]
    assert t2["pct_offered"] > t1["pct_offered"]


def test_compare_hybrid_flags_change_the_deployment(heavy, tmp_path, capsys):
    path, tr = heavy
    hottest = tr["adapter"].value_counts()
    hottest = list(hottest.sort_values(ascending=False, kind="stable").index)
    default = _compare(path, tmp_path / "h1", capsys, "--policies", "hybrid")["deployments"][
        "hybrid"]
    two = _compare(path, tmp_path / "h2", capsys, "--policies", "hybrid", "--hybrid-k", 2,
                   "--hybrid-dynamic", "slora")["deployments"]["hybrid"]
    assert default["k"] == 1 and default["dynamic"] == "vllm" and default["gpus"] == 2
    assert two["k"] == 2 and two["dynamic"] == "slora" and two["gpus"] == 3
    # the hottest adapters are the merged ones; the rest go to the dynamic server
    assert set(default["merged_adapters"]) == set(hottest[:1])
    assert set(two["merged_adapters"]) == set(hottest[:2])
    assert sorted(s["kind"] for s in two["per_server"]) == ["merged", "merged", "slora"]
    assert [s["adapters"] for s in two["per_server"] if s["kind"] == "slora"] == [6]


# -- calibrate --bench-config ---------------------------------------------------------------

def _bench_files(d: Path) -> list[Path]:
    paths = []
    for i, (rate, ttft, tpot, thr) in enumerate([(2.0, 40.0, 15.0, 830.0),
                                                 (6.0, 80.0, 25.0, 2480.0)]):
        p = d / f"bench{i}.json"
        p.write_text(json.dumps({
            "date": "20250101-000000", "backend": "vllm", "request_rate": rate,
            "completed": int(rate * 120), "total_input_tokens": int(rate * 120 * 223),
            "total_output_tokens": int(rate * 120 * 196), "duration": 120.0,
            "mean_ttft_ms": ttft, "mean_tpot_ms": tpot, "mean_itl_ms": tpot + 0.5,
            "total_token_throughput": thr, "max_lora_rank": "16"}))
        paths.append(p)
    return paths


def test_calibrate_reads_the_bench_config(tmp_path, capsys):
    _shared("sharegpt_8k_filtered_stats_llama2_tokenizer.csv")   # workload reconstruction
    runs = _bench_files(tmp_path)
    common = ["calibrate", "--from-vllm-runs", *runs, "--window-s", 60, "--iterations", 2,
              "--processes", 1, "--quiet"]
    # without it the JSON files lack the server's LoRA settings: a one-line input error
    rc = main([str(a) for a in common + ["--out", tmp_path / "none.json"]])
    err = capsys.readouterr().err
    assert rc == 2 and "max_loras" in err and len(err.strip().splitlines()) == 1
    fits = {}
    for name, side in (("a", {"max_loras": 2, "max_cpu_loras": 8,
                              "adapter_ranks": {8: 4, 16: 4}}),
                       ("b", {"max_loras": 8, "max_cpu_loras": 8, "adapter_ranks": {16: 8}})):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(side))
        rc, _ = _run(common + ["--bench-config", cfg, "--out", tmp_path / f"{name}.json"],
                     capsys)
        assert rc == 0
        prov = json.loads((tmp_path / f"{name}.json").read_text())["provenance"]
        assert prov["sources"]["bench_config"] == str(cfg)
        assert prov["step_time"]["runs"] == 2
        fits[name] = prov["step_time"]
    # the runs were simulated with the settings the config gives (2 vs 8 slots, other
    # ranks): the same measurements fit differently
    assert fits["a"]["history"] != fits["b"]["history"]
    assert fits["a"]["itl_smape_median"] != pytest.approx(fits["b"]["itl_smape_median"])


def test_command_table_matches_what_the_modules_register():
    """`twin X` imports only the module that registers X (twin.cli.app.COMMANDS): the table
    must name every registered command and the module that really registers it."""
    import argparse
    import importlib

    from twin.cli import app as cli_main

    seen = {}
    for module, func in cli_main._REGISTRARS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        getattr(importlib.import_module(module), func)(sub)
        for name in sub.choices:
            seen[name] = module
    assert seen == cli_main.COMMANDS


def test_a_command_imports_no_other_commands_module():
    import subprocess
    import sys

    code = ("import sys; from twin.cli.app import build_parser; build_parser('profile'); "
            "print(sorted(m for m in sys.modules if m.startswith('twin.cli.') "
            "or m in ('twin.sim', 'torch', 'twin.ml')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "twin.cli.simulate" not in out and "'torch'" not in out and "twin.sim'" not in out
    assert "twin.cli.profile" in out

"""The public Python API (``twin.api``, reached as ``twin.simulate`` etc.): it gives the
figures the commands give for the same inputs, whatever form the inputs take (DataFrame or
file, ServingConfig, dict or YAML, Profile or name); bad input raises TwinInputError naming
the field; ``import twin`` stays light (no pandas, no torch); the README's example runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import twin
from twin.cli import main
from twin.ml.report import Recommendation
from twin.workload.generate import uniform_lengths
from twin.workload.schema import write_trace

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "llama31-8b-h100-64gb-first-principles"   # pinned: stable shipped profile
WINDOW = 60.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 60-s trace of 8 adapters (Parquet), a catalog with two ranks (CSV) and a serving
    YAML in vLLM's dashed names, plus the DataFrames they hold."""
    d = tmp_path_factory.mktemp("api")
    trace = twin.rate_class_trace(8, (1.6, 0.8), duration_s=WINDOW,
                                  lengths=uniform_lengths(8, 512), seed=4)
    names = sorted(trace["adapter"].dropna().unique())
    catalog = pd.DataFrame({"adapter": names, "rank": [8, 32] * (len(names) // 2)})
    settings = {"max-loras": 2, "max-cpu-loras": 8, "max-lora-rank": 32,
                "max-num-seqs": 256, "max-num-batched-tokens": 2048}
    (d / "serve.yaml").write_text(yaml.safe_dump(settings))
    catalog.to_csv(d / "catalog.csv", index=False)
    return {"trace": write_trace(trace, d / "t.parquet"), "catalog": d / "catalog.csv",
            "config": d / "serve.yaml", "trace_df": trace, "catalog_df": catalog,
            "settings": settings}


def _cli_json(args, capsys) -> dict:
    rc = main([str(a) for a in args])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)


# -- simulate: the API and `twin simulate` give the same figures ---------------------------

@pytest.mark.parametrize("policy", ["vllm", "slora"])
def test_simulate_equals_the_cli_whatever_form_the_inputs_take(files, policy, capsys):
    cli = _cli_json(["simulate", "--trace", files["trace"], "--config", files["config"],
                     "--catalog", files["catalog"], "--profile", PROFILE, "--policy", policy,
                     "--window-s", WINDOW, "--no-progress", "--json"], capsys)
    # files, as the command reads them (the policy given over the YAML's settings)
    config = twin.load_config(files["config"]).replace(policy=policy)
    by_path = twin.simulate(files["trace"], config, PROFILE, catalog=files["catalog"],
                            window_s=WINDOW)
    # Python objects: a DataFrame, a dict of dashed vLLM names, a Profile, a catalog table
    run = twin.simulate(files["trace_df"], {**files["settings"], "policy": policy},
                        twin.load_profile(PROFILE), catalog=files["catalog_df"],
                        window_s=WINDOW)
    assert isinstance(run, twin.RunResult)
    assert run.summary == cli
    assert 0 < cli["completed"] < cli["num_requests"]   # a real run, cut by the window
    assert by_path.summary == cli
    assert by_path.meta["trace"] == str(files["trace"])   # as the command records it
    assert len(run.requests) == cli["num_requests"] and len(run.timeline) > 1


def test_config_forms_agree_and_default_to_vllms(files):
    from_yaml = twin.load_config(files["config"])
    from_dict = twin.load_config(files["settings"])
    direct = twin.ServingConfig(max_loras=2, max_cpu_loras=8, max_lora_rank=32,
                                max_num_seqs=256, max_num_batched_tokens=2048)
    assert from_yaml == from_dict == direct and twin.load_config(direct) is direct
    assert twin.load_config(None) == twin.ServingConfig()
    assert twin.load_config(None).max_num_batched_tokens == 8192   # vLLM's default


def test_load_trace_from_file_and_frame_are_equal(files):
    from_file = twin.load_trace(files["trace"])
    from_frame = twin.load_trace(files["trace_df"].drop(columns=["request_id"]))
    pd.testing.assert_frame_equal(from_file, from_frame)
    assert str(from_file["adapter"].dtype) == "string"


def test_run_result_repr_is_one_line_of_figures(files):
    run = twin.simulate(files["trace_df"], files["settings"], PROFILE,
                        catalog=files["catalog_df"], window_s=WINDOW, record_steps=True)
    text = repr(run)
    assert "\n" not in text and len(text) < 300       # not the tables' rows
    s = run.summary
    assert f"completed={s['completed']}" in text and f"starving={s['starving']}" in text
    assert f"requests=<{len(run.requests)} rows>" in text
    assert f"steps=<{len(run.steps)} rows>" in text


# -- recommend: the API and `twin recommend` give the same figures --------------------------

def _comparable(rec: dict) -> dict:
    """A recommendation without its wall-clock timings."""
    drop = {"predict_ms", "total_s"}
    out = {k: v for k, v in rec.items() if k not in drop}
    if out.get("verified"):
        out["verified"] = {k: v for k, v in out["verified"].items() if k != "wall_s"}
    return out


def test_recommend_equals_the_cli_and_writes_nothing_unless_asked(files, tmp_path, capsys,
                                                                    monkeypatch):
    base = {"max_num_seqs": 512}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base}))
    out = tmp_path / "rec"
    cli_args = ["recommend", "--trace", files["trace"], "--catalog", files["catalog"],
                "--profile", PROFILE, "--window-s", WINDOW, "--max-runs", 2, "--workers", 1,
                "--no-plot", "--json", "--out", out]
    rc = main([str(a) for a in cli_args])
    printed = capsys.readouterr().out
    assert rc in (0, 3)
    cli = json.loads(printed[printed.index("{\n"):])
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    rec = twin.recommend(files["trace_df"], catalog=files["catalog_df"], profile=PROFILE,
                         window_s=WINDOW, max_runs=2, workers=1)
    assert list(empty.iterdir()) == []                  # no file written without out=
    assert isinstance(rec, Recommendation)
    got = json.loads(json.dumps(rec.to_dict(), default=str))
    assert _comparable(got) == _comparable(cli)
    assert cli["runs"] >= 1 and len(cli["candidates"]) > 1
    # out= writes what the command writes
    rec2 = twin.recommend(files["trace"], catalog=files["catalog"], profile=PROFILE,
                          window_s=WINDOW, max_runs=2, workers=1, out=tmp_path / "rec2",
                          plot=False)
    assert sorted(p.name for p in (tmp_path / "rec2").iterdir()) == sorted(
        p.name for p in out.iterdir())
    assert _comparable(json.loads((tmp_path / "rec2" / "recommendation.json").read_text())) \
        == _comparable(json.loads((out / "recommendation.json").read_text()))
    assert rec2.config == rec.config


def test_recommend_base_dict_is_over_the_papers_base(files):
    rec = twin.recommend(files["trace_df"], catalog=files["catalog_df"], profile=PROFILE,
                         window_s=WINDOW, max_runs=1, workers=1, base={"max-num-seqs": 512})
    chosen = rec.config or rec.predicted_config
    assert chosen.max_num_seqs == 512
    assert chosen.max_num_batched_tokens == 2048 and chosen.preload_adapters  # paper's base


# -- bad input: TwinInputError naming the field --------------------------------------------

@pytest.mark.parametrize("call, field", [
    (lambda f: twin.simulate(f["trace_df"], {"max_loras": 0}, PROFILE), "max_loras"),
    (lambda f: twin.simulate(f["trace_df"], {"max_lorass": 2}, PROFILE), "max_lorass"),
    (lambda f: twin.simulate(f["trace_df"], ["max_loras"], PROFILE), "config"),
    (lambda f: twin.simulate(42, None, PROFILE), "trace"),
    (lambda f: twin.simulate(f["trace_df"], None, 3.5), "profile"),
    (lambda f: twin.simulate(f["trace_df"], None, PROFILE, catalog=[1]), "catalog"),
    (lambda f: twin.simulate(f["trace_df"], {"max_lora_rank": 8}, PROFILE,
                             catalog=f["catalog_df"]), "rank"),
    (lambda f: twin.simulate(f["trace_df"].assign(arrival_s=f["trace_df"]["arrival_s"] + 100),
                             None, PROFILE, window_s=50.0), "window_s"),
    (lambda f: twin.load_trace(f["trace_df"].assign(prompt_tokens=0)), "prompt_tokens"),
    (lambda f: twin.recommend(f["trace_df"], base=7), "base"),
    (lambda f: twin.recommend(f["trace_df"], base={"max_loras": -1}), "max_loras"),
    (lambda f: twin.simulate(f["trace_df"], None, PROFILE, window_s="10"), "window_s"),
    (lambda f: twin.simulate(f["trace_df"], None, PROFILE, window_s=float("nan")), "window_s"),
    (lambda f: twin.simulate_fleet(f["trace_df"], 2, profile=PROFILE, window_s=0), "window_s"),
    # the fleet's and the recommender's counts (each was a TypeError or AttributeError)
    (lambda f: twin.simulate_fleet(f["trace_df"], 2.0, profile=PROFILE), "replicas"),
    (lambda f: twin.simulate_fleet(f["trace_df"], True, profile=PROFILE), "replicas"),
    (lambda f: twin.simulate_fleet(f["trace_df"], 2, profile=PROFILE, refresh_s=None),
     "refresh_s"),
    (lambda f: twin.simulate_fleet(f["trace_df"], 2, "adapter_affinity", profile=PROFILE,
                                   affinity_slack="x"), "affinity_slack"),
    (lambda f: twin.simulate_fleet(f["trace_df"], 2, "adapter_affinity", profile=PROFILE,
                                   affinity_slack=2.7), "affinity_slack"),
    (lambda f: twin.recommend(f["trace_df"], max_runs=1.5, workers=1), "max_runs"),
    # the layers below the API take a ServingConfig: a dict was an AttributeError deep inside
    (lambda f: __import__("twin.sim", fromlist=["simulate"]).simulate(
        f["trace_df"], {"max_loras": 2}, PROFILE), "config"),
    (lambda f: __import__("twin.policies", fromlist=["x"]).simulate_policy(
        f["trace_df"], {"max_loras": 2}, PROFILE), "config"),
    (lambda f: __import__("twin.policies.compare", fromlist=["x"]).compare(
        f["trace_df"], {"max_loras": 2}, PROFILE), "config"),
    (lambda f: __import__("twin.fleet", fromlist=["x"]).simulate_fleet(
        f["trace_df"], 2, config={"max_loras": 2}, profile=PROFILE), "config"),
])
def test_bad_input_raises_twin_input_error_naming_the_field(files, call, field):
    with pytest.raises(twin.TwinInputError) as e:
        call(files)
    assert e.value.field == field, str(e.value)


def test_a_numpy_window_gives_the_summary_of_a_float_one(files):
    """numpy scalars reach a notebook's calls: the summary is the float window's, JSON-able
    (a float32 window once leaked float32 figures into it)."""
    import json

    a = twin.simulate(files["trace_df"], None, PROFILE, window_s=np.float32(30)).summary
    b = twin.simulate(files["trace_df"], None, PROFILE, window_s=30.0).summary
    assert json.dumps(a, default=str) == json.dumps(b, default=str)
    json.dumps(a)   # no numpy scalar left


def test_a_trace_that_starts_late_says_its_throughput_counts_the_wait(files):
    """A slice of a longer trace (first arrival long after 0): the throughput is per second
    from 0, which the summary says; a trace from 0 says nothing of it."""
    t = files["trace_df"]
    late = twin.simulate(t.assign(arrival_s=t["arrival_s"] + 1000.0), None, PROFILE)
    s = late.summary
    assert s["first_arrival_s"] == pytest.approx(float(t["arrival_s"].min()) + 1000.0)
    assert s["total_throughput"] < 0.5 * s["offered_total_throughput"]   # the dilution
    assert "Note: the first request arrives at" in late.format_summary()
    plain = twin.simulate(t, None, PROFILE)
    assert "first request arrives" not in plain.format_summary()
    assert "each over its span" not in plain.format_summary()


def test_a_short_run_says_its_throughput_and_its_share_of_offered_have_other_spans():
    """Two requests at 5 s: 51 tok/s (per second from 0) beside an offered 330 tok/s and
    "keeps up (100%)" (each over its span from the first arrival) read as a contradiction;
    the summary says which span each figure is over."""
    t = pd.DataFrame({"request_id": [0, 1], "arrival_s": [5.0, 5.0], "adapter": ["a", "a"],
                      "prompt_tokens": [200, 200], "output_tokens": [100, 100]})
    s = (run := twin.simulate(t, {"max_loras": 2}, PROFILE)).summary
    assert s["total_throughput"] < 0.5 * s["offered_total_throughput"]
    assert s["achieved_over_offered"] > 0.95
    text = " ".join(run.format_summary().split())
    assert "throughput is per second of the whole run" in text
    assert f"first arrival at 5.0 s (offered: {s['offered_span_s']:.1f} s" in text


def test_fleet_replicas_may_be_given_as_configs(files):
    """A list of config dicts (what simulate takes) is a list of replicas, each on the
    fleet's profile: the same run as the fleet_replica() list (it was an AttributeError)."""
    cfgs = [{"max_loras": 2}, {"max_loras": 4}]
    a = twin.simulate_fleet(files["trace_df"], cfgs, profile=PROFILE)
    b = twin.simulate_fleet(files["trace_df"], [twin.fleet_replica(c) for c in cfgs],
                            profile=PROFILE)
    assert a.result.summary["total_throughput"] == b.result.summary["total_throughput"]
    assert [r.meta["config"]["max_loras"] for r in a.replicas] == [2, 4]


def test_bad_input_names_the_file_and_row(files, tmp_path):
    bad = files["trace_df"].copy()
    bad.loc[5, "output_tokens"] = -1
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(twin.TwinInputError) as e:
        twin.simulate(tmp_path / "bad.csv", None, PROFILE)
    assert (e.value.file, e.value.row, e.value.field) == (str(tmp_path / "bad.csv"), 5,
                                                           "output_tokens")
    with pytest.raises(twin.TwinInputError) as e:
        twin.load_profile("no-such-profile")
    assert e.value.file == "no-such-profile"


# -- import twin stays light -----------------------------------------------------------------

def test_import_twin_loads_neither_pandas_nor_torch_and_the_api_not_torch():
    """``import twin`` loads no pandas; the API loads no torch, and simulate (as ``twin
    simulate``) not the recommender either."""
    code = ("import sys, twin\n"
            "light = not {'pandas', 'torch', 'twin.api'} & set(sys.modules)\n"
            "twin.simulate, twin.recommend\n"
            "print(light, 'torch' in sys.modules, 'twin.ml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert out == ["True", "False", "False"]


def test_every_public_name_resolves_and_unknown_names_fail():
    for name in twin.__all__:
        assert getattr(twin, name) is not None
        assert name in dir(twin)
    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        twin.simulat   # noqa: B018


# -- the README's example runs ---------------------------------------------------------------

def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)   # asserts inside
    assert scope["run"].summary["starving"] and not scope["better"].summary["starving"]
    assert list(tmp_path.iterdir()) == []


def test_a_deployments_busy_fraction_is_measured_without_a_step_log(files):
    """``per_server[*].busy_fraction`` came from the step log only: 0.0 for any run that
    kept none (every twin simulate --policy without --steps)."""
    r = twin.simulate(files["trace_df"], {"max_loras": 2, "policy": "slora"}, PROFILE)
    (per,) = r.summary["deployment"]["per_server"]
    logged = twin.simulate(files["trace_df"], {"max_loras": 2, "policy": "slora"}, PROFILE,
                           record_steps=True)   # the step log's own sum, independently
    busy = logged.steps["duration_s"].sum() / logged.summary["duration_s"]
    assert 0 < per["busy_fraction"] == pytest.approx(busy, rel=1e-9)


def test_a_run_to_completion_lasts_until_the_client_gets_the_last_response(files):
    """vllm bench serve's duration ends at the last response; the frontend's delay puts it
    after the engine's last step (duration_s ended ~2 ms before the last finish_s)."""
    r = twin.simulate(files["trace_df"], None, "llama31-8b-h100-64gb")   # request_s 1.8 ms
    last = float(r.requests["finish_s"].max())
    assert r.summary["duration_s"] == last
    assert r.summary["total_throughput"] == pytest.approx(
        (r.requests["prompt_tokens"].sum() + r.requests["generated_tokens"].sum()) / last)
    w = twin.simulate(files["trace_df"], None, "llama31-8b-h100-64gb", window_s=20.0)
    assert w.summary["duration_s"] == 20.0   # a window is the window


def test_a_deployments_gpu_count_is_in_the_printed_summary(files):
    """merged serves each adapter on a GPU of its own: the text says how many GPUs (it
    was only in summary.json, and the run read as one server's)."""
    r = twin.simulate(files["trace_df"], {"policy": "merged"}, PROFILE)
    gpus = r.summary["deployment"]["gpus"]
    assert gpus == files["trace_df"]["adapter"].nunique() > 1
    assert f"merged, {gpus}, {gpus}" in r.format_summary()
    plain = twin.simulate(files["trace_df"], None, PROFILE)
    assert "Deployment" not in plain.format_summary()

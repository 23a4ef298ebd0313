"""What ``twin calibrate`` reads from runs (``vllm bench serve --save-result`` JSON, run
tables, the sidecar YAML) is checked when read: values the fit cannot use are refused
naming the file, row and field, never fitted silently nor crashing the fit."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.shared_data import shared_file
from twin.calibrate.vllm_runs import read_bench_results, read_run_table
from twin.errors import TwinInputError

RUNS = shared_file("vllm-h100", "real_runs_llama31_8b.csv")


def bench(**over) -> dict:
    """A `vllm bench serve --save-result` document (its keys and types) with the server's
    LoRA settings as --metadata puts them."""
    d = {"date": "20250101-000000", "backend": "vllm", "model_id": "meta-llama/Llama-3.1-8B",
         "request_rate": 4.0, "burstiness": 1.0, "max_concurrency": None, "completed": 1200,
         "failed": 0, "total_input_tokens": 267600, "total_output_tokens": 235200,
         "duration": 300.0, "request_throughput": 4.0, "total_token_throughput": 1676.0,
         "mean_ttft_ms": 40.0, "median_ttft_ms": 35.0, "mean_tpot_ms": 20.0,
         "median_tpot_ms": 19.0, "mean_itl_ms": 20.5, "median_itl_ms": 19.5,
         "max_loras": 4, "max_cpu_loras": 8, "max_lora_rank": 16}
    d.update(over)
    return d


def write(tmp_path, d: dict, name: str = "bench.json"):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


# -- values the fit takes logs of ---------------------------------------------------------

@pytest.mark.parametrize("field, value", [("mean_itl_ms", 0), ("mean_tpot_ms", 0.0),
                                          ("mean_ttft_ms", 0), ("duration", 0),
                                          ("total_token_throughput", 0)])
def test_a_bench_metric_the_fit_takes_the_log_of_must_be_positive(tmp_path, field, value):
    """A run of one-token outputs has mean ITL 0: the fit's log residuals used to crash
    (exit 70, 'Residuals are not finite'); it is refused when read, naming the field."""
    p = write(tmp_path, bench(**{field: value}))
    with pytest.raises(TwinInputError, match="must be > 0") as e:
        read_bench_results([p])
    assert e.value.file == str(p) and e.value.field == field
    assert read_bench_results([write(tmp_path, bench())])   # the same run, metric > 0: fine


def test_one_token_runs_are_named_for_what_they_are(tmp_path):
    p = write(tmp_path, bench(mean_itl_ms=0, mean_tpot_ms=0))
    with pytest.raises(TwinInputError, match="one token") as e:
        read_bench_results([p])
    assert "drop it" in str(e.value)


@pytest.mark.skipif(RUNS is None, reason="shared vLLM run table absent")
@pytest.mark.parametrize("column", ["duration_s", "total_throughput_tps", "mean_itl_ms",
                                    "mean_tpot_ms", "mean_ttft_ms"])
def test_a_run_table_metric_the_fit_takes_the_log_of_must_be_positive(tmp_path, column):
    df = pd.read_csv(RUNS, nrows=8, low_memory=False)
    ok = np.flatnonzero(((df["status"] == "ok") & df["anomaly"].isna()).to_numpy())
    df.loc[ok[1], column] = 0
    p = tmp_path / "runs.csv"
    df.to_csv(p, index=False)
    with pytest.raises(TwinInputError, match="must be > 0") as e:
        read_run_table(p)
    assert (e.value.file, e.value.row, e.value.field) == (str(p), ok[1], column)


# -- the adapters' ranks and rates at the JSON's top level ----------------------------------

def test_the_documented_metadata_example_loads(tmp_path, capsys):
    """`twin calibrate --help` and read_bench_results' docstring show `vllm bench serve
    --metadata max_loras=8 max_cpu_loras=32 max_lora_rank=16 adapter_ranks=...`: --metadata
    stores strings at the top level; the example's own values must load (it used to say
    'adapter_ranks name 2 adapters, max_cpu_loras is 32')."""
    from twin.cli import main
    from twin.calibrate import bench_json

    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for text in (shown, " ".join(bench_json.read_bench_results.__doc__.split())):
        example = text.split("--metadata ", 1)[1].split("`")[0]
        meta = dict(kv.split("=", 1) for kv in example.split() if "=" in kv)
        assert "adapter_ranks" in meta
        (spec,) = read_bench_results([write(tmp_path, bench(**meta))])
        assert sum(spec.ranks.values()) == spec.config.max_cpu_loras == int(meta["max_cpu_loras"])
        assert sum(spec.rates.values()) == spec.config.max_cpu_loras


@pytest.mark.parametrize("ranks, expect", [([8, 8, 16, 16, 16, 16, 32, 32], {8: 2, 16: 4, 32: 2}),
                                           ({"8": 4, "16": 4}, {8: 4, 16: 4}),
                                           ("8:6,16:2", {8: 6, 16: 2})])
def test_adapter_ranks_at_the_top_level_as_a_list_or_mapping_are_read(tmp_path, ranks, expect):
    """A list or {rank: count} used to be dropped silently (all adapters at max_lora_rank)."""
    (spec,) = read_bench_results([write(tmp_path, bench(adapter_ranks=ranks, max_lora_rank=32))])
    assert spec.ranks == expect


def test_adapter_rates_at_the_top_level_are_read(tmp_path):
    rates = [1.0, 1.0] + [0.5] * 4 + [0.25] * 2
    (spec,) = read_bench_results([write(tmp_path, bench(adapter_rates_rps=rates))])
    assert spec.rates == {1.0: 2, 0.5: 4, 0.25: 2}
    (spec,) = read_bench_results([write(tmp_path, bench(adapter_rates_rps={"0.5": 8}))])
    assert spec.rates == {0.5: 8}


def test_a_list_under_another_setting_is_refused_not_dropped(tmp_path):
    p = write(tmp_path, bench(max_loras=[4, 8]))
    with pytest.raises(TwinInputError, match="one value") as e:
        read_bench_results([p])
    assert (e.value.file, e.value.field) == (str(p), "max_loras")
    p = write(tmp_path, bench(adapter_ranks=[8, 8]))   # 2 ranks for 8 adapters: said
    with pytest.raises(TwinInputError, match="2 adapters") as e:
        read_bench_results([p])
    assert e.value.field == "adapter_ranks"


# -- the client's settings ---------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("max_concurrency", 16), ("burstiness", 0.5)])
def test_a_run_the_twin_cannot_replay_is_refused(tmp_path, field, value):
    """A closed loop (max_concurrency) or gamma arrivals (burstiness != 1) are another
    workload than the open-loop Poisson one the twin replays: fitted, they mislead."""
    p = write(tmp_path, bench(**{field: value}))
    with pytest.raises(TwinInputError, match="Poisson") as e:
        read_bench_results([p])
    assert (e.value.file, e.value.field) == (str(p), field)


def test_failed_requests_and_an_impossible_rate_are_warned_about(tmp_path, capsys):
    read_bench_results([write(tmp_path, bench())])
    assert capsys.readouterr().err == ""               # vllm bench serve's own defaults
    read_bench_results([write(tmp_path, bench(failed=3))])
    assert "3 request(s) failed" in capsys.readouterr().err
    # 1200 requests in 300 s cannot come from a client sending 2 per second
    (spec,) = read_bench_results([write(tmp_path, bench(request_rate=2.0))])
    assert "request_rate 2" in capsys.readouterr().err and spec.aggregate_rate == 2.0
    # fewer completions per second than sent: a saturated run, the fit's best: no warning
    read_bench_results([write(tmp_path, bench(request_rate=8.0))])
    assert capsys.readouterr().err == ""


# -- the sidecar's per-file settings --------------------------------------------------------

def test_sidecar_runs_match_by_name_or_path_and_a_stray_key_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    p = write(tmp_path / "a", bench(), "r1.json")
    q = write(tmp_path, bench(), "r2.json")
    side = {"runs": {str(p): {"max_loras": 2}, "r2.json": {"max_loras": 8}}}
    r1, r2 = read_bench_results([p, q], side)
    assert (r1.config.max_loras, r2.config.max_loras) == (2, 8)
    with pytest.raises(TwinInputError) as e:                # a typo used to be ignored
        read_bench_results([p, q], {"runs": {"r3.json": {"max_loras": 2}}})
    assert "r3.json" in str(e.value) and str(p) in str(e.value)
    assert e.value.field == "runs.r3.json"
    with pytest.raises(TwinInputError, match="give its settings once"):
        read_bench_results([p], {"runs": {"r1.json": {"max_loras": 2},
                                          str(p): {"max_loras": 4}}})


# -- the runs' model and the base profile's ------------------------------------------------

def test_runs_of_another_model_than_the_base_profile_are_refused(tmp_path, capsys,
                                                                 monkeypatch):
    """A bench JSON of Qwen2.5-0.5B used to be fitted onto the default Llama-3.1-8B profile
    silently: the profile written priced neither model."""
    import twin.calibrate.vllm as cv
    from twin.cli import main

    monkeypatch.setattr(cv, "calibrate", lambda *a, **k: pytest.fail("fitted"))
    p = write(tmp_path, bench(model_id="Qwen/Qwen2.5-0.5B-Instruct"))
    assert main(["calibrate", "--from-vllm-runs", str(p), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "model_id" in err and "Qwen2.5-0.5B" in err and "--base-profile" in err
    assert "twin profile" in err and not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("name, verdict", [
    ("meta-llama/Llama-3.1-8B-Instruct", "ok"), ("llama-3.1-8b-instruct", "ok"),
    ("Meta-Llama-3.1-8B-Instruct", "ok"), ("Qwen/Qwen2.5-7B-Instruct", "refused"),
    ("meta-llama/Llama-3.1-70B-Instruct", "refused"), ("my-finetune", "warned"),
    # a fine-tune of the same shape whose name leads with another word: warned, not refused
    ("NousResearch/Hermes-3-Llama-3.1-8B", "warned")])
def test_model_names_are_compared_conservatively(tmp_path, name, verdict):
    from twin.calibrate.run_model import check_runs_model
    from twin.costs.profile import load_profile

    base = load_profile("llama31-8b-h100-64gb-first-principles")   # Llama-3.1-8B-Instruct
    runs = read_bench_results([write(tmp_path, bench(model_id=name))])
    said = []
    if verdict == "refused":
        with pytest.raises(TwinInputError) as e:
            check_runs_model(runs, base, warn=said.append)
        assert e.value.field == "model_id" and e.value.file == runs[0].source
    else:
        check_runs_model(runs, base, warn=said.append)
        assert len(said) == (verdict == "warned")


@pytest.mark.skipif(RUNS is None, reason="shared vLLM run table absent")
def test_a_run_tables_model_column_is_checked(tmp_path):
    from twin.calibrate.run_model import check_runs_model
    from twin.costs.profile import load_profile

    base = load_profile("llama31-8b-h100-64gb-first-principles")
    df = pd.read_csv(RUNS, nrows=8, low_memory=False)
    check_runs_model(read_run_table(RUNS), base)              # the real runs are of it
    df["model"] = "qwen2.5-0.5b-instruct"
    p = tmp_path / "runs.csv"
    df.to_csv(p, index=False)
    with pytest.raises(TwinInputError) as e:
        check_runs_model(read_run_table(p), base)
    assert (e.value.file, e.value.field) == (str(p), "model") and e.value.row is not None

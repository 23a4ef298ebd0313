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

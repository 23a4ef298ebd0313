"""Regressions found by the adversarial probe (experiments/probe_inputs.py): inputs a new
user can type that used to end in an internal error (exit 70), a hang, or a run that
silently did something else than asked. Each now ends in a one-line input error (exit 2)
naming the flag or field."""

from __future__ import annotations

import math

import pytest

from twin.cli import build_parser, main
from twin.errors import TwinInputError
from twin.workload.generate import (MAX_ADAPTERS, powerlaw_trace, rate_class_trace,
                                    uniform_lengths)


def _refused_by_argparse(argv, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err, err


# counts of 0 or less used to run: `--limit -1` served all but the last request (pandas
# head(-1)), `--limit 0` / `--repeats 0` / `--max-runs 0` ran or compared nothing and still
# printed a result ("no verified configuration" from zero twin runs); `--threads 0`,
# `calibrate --executor --repeats 0`, `place --max-gpus 0` were internal errors (exit 70);
# `--kv-cache-gib nan` an internal error; `--device bogus` torch's internal error;
# `validate --time-scale 0` released every request at t=0 without a word.
@pytest.mark.parametrize("argv,flag", [
    (["execute", "--trace", "t.csv", "--limit", "-1"], "--limit"),
    (["execute", "--trace", "t.csv", "--limit", "0"], "--limit"),
    (["execute", "--trace", "t.csv", "--threads", "0"], "--threads"),
    (["execute", "--trace", "t.csv", "--kv-cache-gib", "nan"], "--kv-cache-gib"),
    (["execute", "--trace", "t.csv", "--device", "bogus"], "--device"),
    (["validate", "--trace", "t.csv", "--profile", "cpu-tiny", "--repeats", "0"],
     "--repeats"),
    (["validate", "--trace", "t.csv", "--profile", "cpu-tiny", "--limit", "0"], "--limit"),
    (["validate", "--trace", "t.csv", "--profile", "cpu-tiny", "--time-scale", "0"],
     "--time-scale"),
    (["validate", "--trace", "t.csv", "--profile", "cpu-tiny", "--device", "gpu"],
     "--device"),
    (["calibrate", "--executor", "--out", "p.json", "--repeats", "0"], "--repeats"),
    (["calibrate", "--executor", "--out", "p.json", "--threads", "0"], "--threads"),
    (["calibrate", "--executor", "--out", "p.json", "--device-memory-gib", "-1"],
     "--device-memory-gib"),
    (["calibrate", "--executor", "--out", "p.json", "--budget", "nan"], "--budget"),
    (["recommend", "--trace", "t.csv", "--max-runs", "0"], "--max-runs"),
    (["place", "--trace", "t.csv", "--max-runs", "0"], "--max-runs"),
    (["place", "--trace", "t.csv", "--max-gpus", "0"], "--max-gpus"),
    (["place", "--trace", "t.csv", "--workers", "0"], "--workers"),
    (["train", "--families", "0"], "--families"),
    (["sweep", "--workloads", "w.yaml", "--out", "o", "--workers", "0"], "--workers"),
])
def test_counts_and_sizes_must_be_positive(argv, flag, capsys):
    _refused_by_argparse(argv, capsys, flag)


def test_device_names_are_kept():
    for dev in ("cpu", "cuda", "cuda:1"):
        args = build_parser().parse_args(["execute", "--trace", "t.csv", "--device", dev])
        assert args.device == dev


def test_rate_classes_too_many_requests_is_an_input_error():
    """--rates 1e9 used to try to allocate 298 GiB (MemoryError, exit 70)."""
    with pytest.raises(TwinInputError) as exc:
        rate_class_trace(4, [1e9], duration_s=10, lengths=uniform_lengths(8, 16))
    assert exc.value.field == "duration_s" and "requests" in str(exc.value)


@pytest.mark.parametrize("kw", [dict(cv=math.inf), dict(duration_s=math.inf)])
def test_powerlaw_non_finite_is_an_input_error(kw):
    """--cv inf used to be numpy's 'negative dimensions are not allowed' (exit 70)."""
    args = dict(duration_s=10.0, lengths=uniform_lengths(8, 16)) | kw
    with pytest.raises(TwinInputError) as exc:
        powerlaw_trace(8, 2.0, **args)
    assert exc.value.field in kw


def test_rate_classes_non_finite_rate_is_an_input_error():
    with pytest.raises(TwinInputError) as exc:
        rate_class_trace(4, [math.inf], duration_s=10, lengths=uniform_lengths(8, 16))
    assert exc.value.field == "rates"


def test_powerlaw_adapter_count_is_bounded():
    """--adapters 10^12 used to hang building a name per adapter."""
    with pytest.raises(TwinInputError) as exc:
        powerlaw_trace(MAX_ADAPTERS + 1, 2.0, duration_s=1.0, lengths=uniform_lengths(8, 16))
    assert exc.value.field == "n_adapters"


def test_train_reversed_rate_range_is_an_input_error(tmp_path, capsys):
    """--rate-range 5,1 used to be numpy's 'high - low < 0' (exit 70)."""
    rc = main(["train", "--rate-range", "5,1", "--no-install", "--quick", "--no-progress",
               "--families", "1", "--heldout-families", "1", "--out", str(tmp_path / "t")])
    assert rc == 2
    assert "--rate-range" in capsys.readouterr().err


def test_train_with_one_family_is_an_input_error_and_installs_nothing(tmp_path, capsys,
                                                                      monkeypatch):
    """--families 1 used to crash in the model comparison (exit 70) after the new model
    had already replaced the shipped one; now refused before any sweep, and the install
    is the pipeline's last step."""
    import twin.ml.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_datasets", lambda *a: pytest.fail("swept"))
    monkeypatch.setattr(pipeline.shutil, "copyfile", lambda *a: pytest.fail("installed"))
    rc = main(["train", "--quick", "--no-progress", "--families", "1",
               "--heldout-families", "1", "--out", str(tmp_path / "t")])
    assert rc == 2 and "--families" in capsys.readouterr().err


def test_calibrate_executor_refuses_vllm_inputs(tmp_path, capsys):
    """--executor with --from-vllm-runs used to ignore the runs and calibrate the executor
    for minutes, writing a profile the user believed was fitted to their vLLM runs."""
    runs = tmp_path / "runs.csv"
    runs.write_text("max_loras\n1\n")
    rc = main(["calibrate", "--executor", "--from-vllm-runs", str(runs), "--budget", "0.01",
               "--quiet", "--out", str(tmp_path / "p.json")])
    assert rc == 2
    assert "--from-vllm-runs" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_make_adapters_rank_above_vllm_limit_is_an_input_error(tmp_path, capsys):
    """--ranks 1000000000 used to try to allocate the weights (out of memory, exit 70); vLLM
    serves no adapter above rank 512 anyway."""
    rc = main(["make-adapters", "--model", "tiny", "--n", "1", "--ranks", "1024",
               "--out", str(tmp_path / "a")])
    assert rc == 2
    assert "512" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_window_before_first_arrival_is_an_input_error(command, tmp_path, capsys):
    """--window-s 5 on a trace whose first request arrives at 100 s used to drop every
    request and print an empty run as the result (0 requests, "keeps up")."""
    tr = rate_class_trace(2, [1.0], duration_s=20, lengths=uniform_lengths(8, 16), seed=1)
    tr["arrival_s"] += 100.0
    path = tmp_path / "late.csv"
    tr.to_csv(path, index=False)
    argv = [command, "--trace", str(path), "--window-s", "5"]
    rc = main(argv + (["--no-progress"] if command == "simulate" else []))
    assert rc == 2
    err = capsys.readouterr().err
    assert "window_s" in err and "first arrival" in err
    # a window reaching the first arrival still runs
    assert main([command, "--trace", str(path), "--window-s", "110"]) == 0


def test_validate_refuses_a_profile_of_another_model(capsys, tmp_path):
    """`validate --profile llama31-8b-h100-64gb --model tiny` used to serve the tiny model and
    compare it with the twin pricing an 8B model on an H100: a table of "errors" that
    measure nothing, exit 0."""
    tr = rate_class_trace(2, [1.0], duration_s=2, lengths=uniform_lengths(8, 16), seed=1)
    path = tmp_path / "t.csv"
    tr.to_csv(path, index=False)
    rc = main(["validate", "--no-progress", "--profile", "llama31-8b-h100-64gb", "--model",
               "tiny", "--limit", "2", "--time-scale", "0.01", "--trace", str(path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--profile" in err and "layers 32 vs 2" in err


def test_json_stdout_is_standard_json_when_a_metric_has_no_sample(tmp_path, capsys):
    """`simulate --json` with nothing finished in the window printed `NaN` for TTFT/TPOT/E2E:
    not JSON (RFC 8259), so JavaScript/Go/Rust parsers rejected the whole document."""
    import json

    tr = rate_class_trace(2, [1.0], duration_s=5, lengths=uniform_lengths(8, 16), seed=1)
    tr["arrival_s"] = 0.0
    path = tmp_path / "t.csv"
    tr.to_csv(path, index=False)
    assert main(["simulate", "--no-progress", "--json", "--trace", str(path),
                 "--window-s", "0.0001"]) == 0

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    doc = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert doc["completed"] == 0 and doc["ttft_ms"]["mean"] is None


def test_servegen_too_many_requests_is_an_input_error(tmp_path, capsys):
    """`trace servegen --duration-s 1e12 --total-rate 1` tried to allocate 7 TiB
    (MemoryError, exit 70)."""
    from twin.workload import public

    try:
        public.shared_trace_path(public.SERVEGEN_RATE_FILE)
    except TwinInputError:
        pytest.skip("shared data (ServeGen) not available")
    rc = main(["trace", "servegen", "--tenants", "4", "--duration-s", "1e12", "--total-rate",
               "1", "--out", str(tmp_path / "s.parquet")])
    assert rc == 2
    assert "requests expected" in capsys.readouterr().err


def test_trace_selecting_no_request_is_an_input_error(tmp_path, capsys):
    """`trace azure --limit-s 0` (or a span/rate with no arrival) wrote a trace of 0 requests,
    exit 0 -- a file every other command then refuses."""
    out = tmp_path / "empty.csv"
    rc = main(["trace", "rate-classes", "--adapters", "1", "--rates", "0.001", "--duration-s",
               "0.001", "--lengths", "uniform", "--out", str(out)])
    assert rc == 2
    assert "no request" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("cmd", [["validate", "--profile", "cpu-tiny", "--model", "tiny"],
                                 ["execute", "--model", "tiny"]])
def test_cuda_on_a_cpu_only_torch_is_an_input_error(tmp_path, capsys, cmd, monkeypatch):
    """validate --device cuda on a torch without CUDA was torch's AssertionError, reported
    as a bug (exit 70); every executor path now says it in one line (exit 2)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,adapter,prompt_tokens,output_tokens\n0.0,a0,8,4\n")
    rc = main([cmd[0], "--trace", str(trace), *cmd[1:], "--device", "cuda"])
    assert rc == 2 and "CUDA is not available" in capsys.readouterr().err

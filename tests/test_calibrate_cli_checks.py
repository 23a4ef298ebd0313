"""``twin calibrate``'s checks before any work: the flags each mode reads (one table), and
the OUT.hardware.json it writes beside --out, checked like --out itself."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import twin.calibrate.vllm_runs as vllm_runs
import twin.cli.calibrate as cli_calibrate
from tests.shared_data import shared_file
from twin.cli import main
from twin.costs.hardware import read_calibration, save_calibration
from twin.errors import TwinInputError

RUNS = shared_file("vllm-h100", "real_runs_llama31_8b.csv")


@pytest.fixture
def no_work(monkeypatch):
    """Any fit or measurement started fails the test: the checks come first."""
    def never(*a, **k):
        pytest.fail("calibration started before its flags were checked")
    for mod, name in ((vllm_runs, "load_runs"), (cli_calibrate, "calibrate_executor"),
                      (cli_calibrate, "calibrate_split"), (cli_calibrate, "fit_fewrun")):
        monkeypatch.setattr(mod, name, never)


@pytest.mark.parametrize("mode, extra, refused", [
    # --few-run fits four multipliers: the full fit's inputs and options would be ignored
    (["--few-run"], ["--kv-capacity", "kv.csv"], "--kv-capacity"),
    (["--few-run"], ["--load-times", "l.csv"], "--load-times"),
    (["--few-run"], ["--terms", "const"], "--terms"),
    (["--few-run"], ["--hold", "decode_context=1e-8"], "--hold"),
    (["--few-run"], ["--decode-target", "tpot"], "--decode-target"),
    (["--few-run"], ["--request-delay"], "--request-delay"),
    (["--few-run"], ["--metrics-series-s", "fit"], "--metrics-series-s"),
    # the executor reads no run: the run fits' options would be ignored
    (["--executor"], ["--few-run"], "--few-run"),
    (["--executor"], ["--terms", "const"], "--terms"),
    (["--executor"], ["--hold", "decode_context=1e-8"], "--hold"),
    (["--executor"], ["--window-s", "30"], "--window-s"),
    (["--executor"], ["--experiment-set", "x"], "--experiment-set"),
    (["--executor"], ["--max-runs", "3"], "--max-runs"),
    (["--executor", "--policy", "split"], ["--threads", "2"], "--threads"),
    # without --executor the executor's flags would be ignored
    ([], ["--model", "smollm2"], "--model"),
    ([], ["--device", "cuda"], "--device"),
    ([], ["--threads", "4"], "--threads"),
    ([], ["--gemm"], "--gemm"),
    ([], ["--budget", "0"], "--budget"),
    ([], ["--repeats", "5"], "--repeats"),
    (["--few-run"], ["--policy", "slora"], "--policy"),
])
def test_a_flag_the_mode_does_not_read_is_refused(tmp_path, capsys, no_work, mode, extra,
                                                  refused):
    runs = tmp_path / "runs.csv"
    runs.write_text("a\n1\n")
    given = [] if "--executor" in mode else ["--from-vllm-runs", str(runs)]
    out = tmp_path / "p.json"
    assert main(["calibrate", *mode, *given, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert refused in err and "drop it" in err and "Traceback" not in err
    assert not out.exists()


def test_a_flag_at_its_default_is_not_taken_as_given(no_work):
    """The table compares with the parser's defaults: a mode's own flags and untouched
    defaults of the others pass."""
    parser = cli_calibrate.add_calibrate_parser(
        __import__("argparse").ArgumentParser().add_subparsers())
    for argv, mode in ((["--from-vllm-runs", "r.csv"], "vllm"),
                       (["--from-vllm-runs", "r.csv", "--few-run", "--window-s", "30"],
                        "few-run"),
                       (["--executor", "--threads", "2", "--gemm"], "executor"),
                       (["--executor", "--policy", "split", "--quick"], "split")):
        assert cli_calibrate.check_mode_flags(parser.parse_args(argv)) == mode
    with pytest.raises(TwinInputError, match="--budget"):   # 0 is given, not a default
        cli_calibrate.check_mode_flags(parser.parse_args(["--from-vllm-runs", "r.csv",
                                                          "--budget", "0"]))


def test_save_calibration_is_atomic_and_replaces_only_calibrations(tmp_path):
    mine = tmp_path / "notes.hardware.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(TwinInputError, match="not a twin output"):
        save_calibration({"step_s": 1e-3}, mine)
    assert mine.read_text() == '{"mine": 1}'
    ours = save_calibration({"step_s": 1e-3}, tmp_path / "a.hardware.json")
    save_calibration({"step_s": 2e-3}, ours)          # its own kind: replaced
    assert read_calibration(ours)[0] == {"step_s": 2e-3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.hardware.json",
                                                          "notes.hardware.json"]


@pytest.mark.skipif(RUNS is None, reason="shared vLLM run table absent")
def test_few_run_never_writes_its_hardware_json_over_an_input_or_a_users_file(tmp_path,
                                                                            capsys):
    """--out X.json also writes X.hardware.json: a user's file or an input there is refused
    before the fit (it used to be overwritten with a plain write), a previous one replaced."""
    df = pd.read_csv(RUNS)
    df = df[(df["experiment_set"] == "digital_twin_modelling") & (df["status"] == "ok")]
    table = tmp_path / "runs.csv"
    df.sort_values("rate_values_rps").head(2).to_csv(table, index=False)
    base = tmp_path / "base.json"
    assert main(["profile", "--model", "llama-3.1-8b", "--gpu", "h100-64gb", "--out",
                 str(base)]) == 0
    common = ["calibrate", "--few-run", "--base-profile", str(base), "--window-s", "20",
              "--iterations", "0", "--processes", "1", "--quiet"]
    side = tmp_path / "fr.hardware.json"
    side.write_text('{"mine": 1}')
    capsys.readouterr()
    assert main(common + ["--from-vllm-runs", str(table), "--out", str(tmp_path / "fr.json")]) == 2
    err = capsys.readouterr().err
    assert "fr.hardware.json" in err and "not a twin output" in err
    assert side.read_text() == '{"mine": 1}' and not (tmp_path / "fr.json").exists()
    inp = tmp_path / "inp.hardware.json"            # the runs, under the sidecar's name
    inp.write_bytes(table.read_bytes())
    assert main(common + ["--from-vllm-runs", str(inp), "--out", str(tmp_path / "inp.json")]) == 2
    assert "input" in capsys.readouterr().err and inp.read_bytes() == table.read_bytes()
    side.unlink()
    for _ in range(2):                               # a previous calibration is replaced
        assert main(common + ["--from-vllm-runs", str(table), "--out",
                              str(tmp_path / "fr.json")]) == 0
        assert json.loads(side.read_text())["schema"] == "twin.hardware/1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("hold, said", [("bogus=1", "unknown step-time term(s) ['bogus']"),
                                        ("decode_context=nan", "expected seconds >= 0"),
                                        ("const=-1e-3", "expected seconds >= 0")])
def test_a_held_term_is_checked_like_the_fitted_terms(tmp_path, capsys, no_work, hold, said):
    """--hold bogus=1 used to crash the fit (exit 70) where --terms bogus is a usage error."""
    runs = tmp_path / "runs.csv"
    runs.write_text("a\n1\n")
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--from-vllm-runs", str(runs), "--hold", hold,
              "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--hold" in err and said in err
    if "unknown" in said:
        assert "decode_context" in err   # the known terms are listed
    assert cli_calibrate.held_step_terms("decode_context=6.5536e-8, const=0") == {
        "decode_context": 6.5536e-8, "const": 0.0}


def test_few_run_says_which_iteration_it_kept_and_stores_plain_multipliers(tmp_path, capsys,
                                                                          monkeypatch):
    """The last iteration printed is not the result: the kept one is said, and the JSON
    holds plain multipliers (the fit's log ones labelled as such)."""
    import math

    from twin.costs.hardware import gpu_prior
    from twin.calibrate.fewrun import scaled

    hw0 = gpu_prior("h100-64gb")
    history = [{"iteration": i, "u": [0.0] * 4, "itl_smape_median": e,
                "throughput_smape_median": e, "ttft_smape_median": 50.0}
               for i, e in enumerate((30.0, 2.5, 9.0))]
    u = {"overhead": math.log(1.5), "memory": 0.0, "compute": math.log(0.9), "lora": 0.0}

    def fake_fit(runs, profile, hw, **kw):
        return {"hardware": scaled(hw, list(u.values())), "u": dict(u), "history": history,
                "kept": 1, "runs": [r.key for r in runs], "seconds": 0.0}
    monkeypatch.setattr(cli_calibrate, "fit_fewrun", fake_fit)
    base = tmp_path / "base.json"
    assert main(["profile", "--model", "llama-3.1-8b", "--gpu", "h100-64gb", "--out",
                 str(base)]) == 0
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps({
        "model_id": "meta-llama/Llama-3.1-8B", "request_rate": 4.0, "completed": 1200,
        "total_input_tokens": 267600, "total_output_tokens": 235200, "duration": 300.0,
        "mean_ttft_ms": 40.0, "mean_tpot_ms": 20.0, "mean_itl_ms": 20.5, "max_loras": 4,
        "max_cpu_loras": 8, "max_lora_rank": 16}))
    capsys.readouterr()
    out = tmp_path / "fr.json"
    assert main(["calibrate", "--few-run", "--base-profile", str(base), "--from-vllm-runs",
                 str(bench), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "kept iteration 1: ITL 2.5%, throughput 2.5%" in said
    side = json.loads((tmp_path / "fr.hardware.json").read_text())
    prov = json.loads(out.read_text())["provenance"]
    for doc in (side, prov):
        assert doc["multipliers"] == pytest.approx({g: math.exp(v) for g, v in u.items()})
        assert doc["log_multipliers"] == pytest.approx(u) and doc["kept_iteration"] == 1
    # the machine it was measured on, kept in the file itself (twin profile checks flags
    # by it even when the profile beside it is moved or deleted)
    assert side["machine"] == json.loads(out.read_text())["hardware"]
    out.unlink()
    rc = main(["profile", "--model", "qwen2.5-7b", "--gpu", "a100-40gb", "--gpu-calibration",
               str(tmp_path / "fr.hardware.json"), "--out", str(tmp_path / "q.json")])
    assert rc == 2 and "'--gpu'" in capsys.readouterr().err

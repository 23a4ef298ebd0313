"""Declared schemas and vLLM's refusals (issue 11, items 4, 6 and 7): each test names the
defect it catches; every one of them failed (wrong value, silent acceptance or a traceback)
before the schemas."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twin.cli import build_parser, main as twin_main
from twin.config import ServingConfig
from twin.errors import TwinInputError
from twin.costs.profile import Profile, load_profile, shipped_profiles
from twin.sim import simulate

PROFILE = "cpu-tiny"


def tiny_trace(n=40, adapters=("a0", "a1"), seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "arrival_s": np.sort(rng.uniform(0, 5, n)),
        "adapter": [adapters[i % len(adapters)] if adapters else None for i in range(n)],
        "prompt_tokens": rng.integers(4, 64, n),
        "output_tokens": rng.integers(1, 16, n)})


def small_config(**kw):
    base = dict(max_loras=2, max_cpu_loras=4, max_num_seqs=16, max_num_batched_tokens=256,
                max_model_len=256)
    return ServingConfig(**{**base, **kw})


def profile_dict(name=PROFILE):
    return json.loads(json.dumps(load_profile(name).to_dict()))


# -- item 4: boolean flags ---------------------------------------------------------------------

@pytest.mark.parametrize("word", ["flase", "2", "tru", ""])
def test_bool_flag_refuses_unknown_words(word, capsys):
    # old: any word but 1/true/yes/on silently became False
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["simulate", "--trace", "t.csv", "--enable-lora", word])
    assert e.value.code == 2
    assert "--enable-lora" in capsys.readouterr().err


@pytest.mark.parametrize("word,value", [("off", False), ("No", False), ("0", False),
                                        ("on", True), ("YES", True), ("1", True)])
def test_bool_flag_known_words(word, value):
    args = build_parser().parse_args(["simulate", "--trace", "t.csv", "--enable-lora", word])
    assert args.enable_lora is value


def test_enable_lora_false_with_adapter_requests_is_refused():
    # old: the adapter requests were served as base-model requests; vLLM answers them 404
    trace = tiny_trace(adapters=("a0", "a1", "a2"))
    with pytest.raises(TwinInputError) as e:
        simulate(trace, small_config(enable_lora=False), PROFILE)
    msg = str(e.value)
    assert "does not exist" in msg and f"{len(trace)} request(s)" in msg
    assert e.value.field == "adapter"
    # a base-model trace still runs without LoRA
    res = simulate(tiny_trace(adapters=()), small_config(enable_lora=False), PROFILE)
    assert res.summary["completed"] == 40


# -- item 6: settings vLLM refuses ---------------------------------------------------------------

@pytest.mark.parametrize("bs", [4, 24, 256])
def test_block_size_outside_vllm_blocksize_is_refused(bs, tmp_path):
    # old: any block_size >= 1 was accepted from a YAML file or --block-size
    p = tmp_path / "serve.yaml"
    p.write_text(f"block_size: {bs}\n")
    with pytest.raises(TwinInputError) as e:
        ServingConfig.from_yaml(p)
    assert e.value.field == "block_size" and "BlockSize" in str(e.value)
    for ok in (1, 8, 16, 32, 64, 128):
        assert ServingConfig.from_dict({"block_size": ok}).block_size == ok


def test_max_num_batched_tokens_below_max_num_seqs_is_refused():
    # old: accepted; vLLM's SchedulerConfig refuses it
    with pytest.raises(TwinInputError) as e:
        ServingConfig.from_dict({"max_num_seqs": 512, "max_num_batched_tokens": 256,
                                 "max_model_len": 256, "enable_chunked_prefill": "false"},
                                source="serve.yaml")
    assert e.value.file == "serve.yaml" and e.value.field == "max_num_batched_tokens"
    assert ("max_num_batched_tokens (256) must be greater than or equal to max_num_seqs (512)"
            in str(e.value))


def test_max_model_len_beyond_the_models_context_is_refused():
    # old: a profile could not even say its context (max_position_embeddings was an error)
    d = profile_dict()
    d["model"]["max_position_embeddings"] = 128
    prof = Profile.from_dict(d, source="p.json")
    with pytest.raises(TwinInputError) as e:
        simulate(tiny_trace(), small_config(max_model_len=256), prof)
    assert "User-specified max_model_len (256) is greater than the derived max_model_len" \
        in str(e.value)
    assert e.value.field == "max_model_len"
    res = simulate(tiny_trace(), small_config(max_model_len=128), prof)
    assert res.summary["completed"] == 40


@pytest.mark.parametrize("window", [0.0, -5.0, math.nan])
def test_window_s_not_positive_is_refused(window):
    # old: a zero/negative/NaN window ran and reported an empty or whole-trace measurement
    with pytest.raises(TwinInputError) as e:
        simulate(tiny_trace(), small_config(), PROFILE, window_s=window)
    assert e.value.field == "window_s"


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "abc"])
def test_window_s_flag_is_refused(text, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["simulate", "--trace", "t.csv", "--window-s", text])
    assert e.value.code == 2 and "--window-s" in capsys.readouterr().err


# -- item 7: loaders validate what they read -----------------------------------------------------

def test_yaml_null_value_is_an_input_error(tmp_path):
    # old: TypeError from int(None) in validate()
    p = tmp_path / "serve.yaml"
    p.write_text("max_loras: null\n")
    with pytest.raises(TwinInputError) as e:
        ServingConfig.from_yaml(p)
    assert e.value.file == str(p) and e.value.field == "max_loras" and "null" in str(e.value)


def test_a_setting_given_twice_in_two_spellings_is_refused(tmp_path, capsys):
    from twin.api import load_config
    from twin.cli import main

    p = tmp_path / "serve.yaml"
    p.write_text("max_loras: 2\nmax-loras: 3\n")   # vLLM's flag spelling beside the name
    for load in (ServingConfig.from_yaml, load_config):
        with pytest.raises(TwinInputError) as e:
            load(p)
        assert e.value.file == str(p) and e.value.field == "max_loras"
        assert "given twice" in str(e.value)
    assert ServingConfig.from_dict({"max-loras": 3}).max_loras == 3   # one spelling: fine
    trace = tmp_path / "t.csv"
    trace.write_text("request_id,arrival_s,adapter,prompt_tokens,output_tokens\n0,0,a,10,5\n")
    assert main(["simulate", "--trace", str(trace), "--config", str(p)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_an_error_in_settings_from_a_file_and_flags_names_where_the_value_was_set(
        tmp_path, capsys):
    """A flag's value overriding the file is not the file's: the error names the flag that
    set the faulty field (it named the file alone, for a value only the flag had; then
    every flag given, "--max-loras --max-num-seqs" for a bad --max-num-seqs), and the file
    with the flags for a value only the file set."""
    from twin.cli import main

    p = tmp_path / "b.yaml"
    p.write_text("max_loras: 4\nmax_num_seqs: 0\n")
    trace = tmp_path / "t.csv"
    trace.write_text("request_id,arrival_s,adapter,prompt_tokens,output_tokens\n0,0,a,10,5\n")
    assert main(["simulate", "--trace", str(trace), "--config", str(p),
                 "--max-cpu-loras", "2", "--max-num-seqs", "8"]) == 2
    assert "error: --max-cpu-loras, field 'max_cpu_loras'" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(trace), "--config", str(p), "--max-cpu-loras",
                 "8"]) == 2
    # a value only the file set: the file, with the flags merged over it (a check between
    # two settings may involve them)
    assert f"error: {p} with --max-cpu-loras, field 'max_num_seqs'" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(trace), "--max-num-seqs", "0", "--max-loras",
                 "2"]) == 2
    assert "error: --max-num-seqs, field 'max_num_seqs'" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(trace), "--config", str(p),
                 "--max-num-seqs", "8"]) == 0


def test_max_cpu_loras_follows_max_loras_only_when_not_given():
    """vLLM's max_cpu_loras defaults to max_loras; a config given none keeps that default
    through replace() (``ServingConfig().replace(max_loras=8)`` was refused: its
    materialized max_cpu_loras 1 < 8); one given a value keeps it."""
    assert ServingConfig().replace(max_loras=8).max_cpu_loras == 8
    follows = ServingConfig.from_dict({"max-loras": 4})
    assert follows.max_cpu_loras == 4 and follows == ServingConfig(max_loras=4, max_cpu_loras=4)
    assert follows.replace(max_loras=16).replace(policy="slora").max_cpu_loras == 16
    assert follows.replace(max_loras=2).max_cpu_loras == 2
    assert follows.replace(max_loras=2, max_cpu_loras=6).max_cpu_loras == 6
    given = ServingConfig.from_dict({"max_loras": 4, "max_cpu_loras": 6})
    assert given.replace(max_loras=2).max_cpu_loras == 6       # a given value stays
    with pytest.raises(TwinInputError, match=r"max_cpu_loras \(6\) must be >= max_loras"):
        given.replace(max_loras=8)
    assert copy.deepcopy(follows).replace(max_loras=9).max_cpu_loras == 9


def test_a_config_file_listing_lora_modules_preloads_them(tmp_path):
    """vLLM loads ``--lora-modules`` into host memory at start-up: the config file twin
    recommend exports lists them, and read back it must simulate the preloaded server the
    recommendation was verified on (it was read as loading each from disk on first use)."""
    from twin.ml.export import vllm_yaml

    verified = ServingConfig(max_loras=4, max_cpu_loras=8, preload_adapters=True)
    path = tmp_path / "vllm_config.yaml"
    path.write_text(vllm_yaml(verified, "my-model", ["a", "b"]))
    assert ServingConfig.from_yaml(path) == verified.replace(lora_modules=("a", "b"))
    bare = ServingConfig.from_dict({"max_loras": 4, "max_cpu_loras": 8})
    assert not bare.preload_adapters
    said = ServingConfig.from_dict({"lora-modules": ["a=/x"], "preload_adapters": False})
    assert not said.preload_adapters                      # an explicit setting wins


def test_a_config_file_preloads_only_the_lora_modules_it_lists(tmp_path, capsys):
    """A GPU's file from twin place lists that GPU's adapters: the server preloads those,
    and loads any other adapter of the trace from disk on first use, whichever way the
    file comes in (it preloaded the whole catalog: 0 disk loads where vLLM makes one per
    unlisted adapter; a path given to twin.simulate did, twin.load_config(path) and twin
    compare/fleet --config did not: the config could not carry the list)."""
    from twin import api
    from twin.cli import main
    from twin.workload.generate import rate_class_trace, uniform_lengths
    from twin.workload.schema import write_trace

    trace = rate_class_trace(4, (1.0,), duration_s=20, lengths=uniform_lengths(8, 64), seed=2)
    names = sorted(trace["adapter"].unique())
    assert len(names) == 4
    listed = tmp_path / "gpu.yaml"
    listed.write_text("max_loras: 4\nmax_cpu_loras: 4\nlora-modules:\n"
                      + "".join(f"  - {a}=/adapters/{a}\n" for a in names[:2]))
    path = write_trace(trace, tmp_path / "t.parquet")
    profile = "llama31-8b-h100-64gb-first-principles"
    config = api.load_config(listed)
    assert config.lora_modules == tuple(names[:2]) and config.preload_adapters
    for run in (api.simulate(path, listed, profile), api.simulate(path, config, profile),
                api.simulate_fleet(path, 1, config=listed, profile=profile).result):
        assert run.summary["adapter_loads"]["from_disk"] == 2   # the unlisted two, once each
    every = api.simulate(path, config.replace(lora_modules=None), profile)
    assert every.summary["adapter_loads"]["from_disk"] == 0
    for argv in (["simulate", "--config", str(listed), "--json", "--no-progress"],
                 ["simulate", "--lora-modules", *names[:2], "--max-loras", "4",
                  "--max-cpu-loras", "4", "--json", "--no-progress"]):
        assert main([*argv, "--trace", str(path), "--profile", profile]) == 0
        assert json.loads(capsys.readouterr().out)["adapter_loads"]["from_disk"] == 2


def test_writing_over_a_shipped_profile_is_said(tmp_path, capsys):
    from importlib import resources

    from twin.costs.profile import DEFAULT_PROFILE, warn_if_shipped

    shipped = Path(str(resources.files("twin.profiles")))
    assert warn_if_shipped(shipped / f"{DEFAULT_PROFILE}.json")
    err = capsys.readouterr().err
    assert "is the shipped profile" in err and "(or uses the default)" in err
    assert warn_if_shipped(shipped / "cpu-tiny.json")
    assert "(or uses the default)" not in capsys.readouterr().err
    for elsewhere in (tmp_path / f"{DEFAULT_PROFILE}.json", shipped / "mine.json"):
        assert not warn_if_shipped(elsewhere)
    assert capsys.readouterr().err == ""


def test_yaml_non_utf8_is_an_input_error(tmp_path):
    # old: UnicodeDecodeError
    p = tmp_path / "serve.yaml"
    p.write_bytes(b"max_loras: 8\n\xff\xfe\x00oops\n")
    with pytest.raises(TwinInputError) as e:
        ServingConfig.from_yaml(p)
    assert e.value.file == str(p) and "UTF-8" in str(e.value)


def test_profile_json_that_is_a_list_is_an_input_error(tmp_path):
    # old: AttributeError ('list' object has no attribute 'get')
    p = tmp_path / "p.json"
    p.write_text("[1, 2]")
    with pytest.raises(TwinInputError) as e:
        load_profile(p)
    assert e.value.file == str(p)


def test_missing_step_time_base_const_is_an_input_error():
    # old: silently 0 s per step, which flips starvation verdicts
    d = profile_dict()
    del d["step_time"]["base"]["const"]
    with pytest.raises(TwinInputError) as e:
        Profile.from_dict(d, source="p.json")
    assert e.value.file == "p.json" and e.value.field == "step_time.base.const"


@pytest.mark.parametrize("section,key,value", [
    ("memory", "gpu_memory_gib", -2.0),          # out of range
    ("memory", "gpu_memory_gib", "2"),           # wrongly typed (old: TypeError in a run)
    ("load_time", "disk_s_per_byte", -1e-9),     # a negative load time
    ("model", "layers", 2.5),                    # a fractional layer count
    ("step_time", "base", {"const": 0.001, "prefill_tokens": -1.0}),
])
def test_profile_out_of_range_or_wrongly_typed_is_an_input_error(section, key, value):
    d = profile_dict()
    d[section][key] = value
    with pytest.raises(TwinInputError) as e:
        Profile.from_dict(d, source="p.json")
    assert e.value.file == "p.json" and e.value.field.startswith(f"{section}.{key}")


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profiles_load_and_round_trip_exactly(name, tmp_path):
    from importlib import resources

    text = (resources.files("twin.profiles") / f"{name}.json").read_text()
    prof = load_profile(name)
    assert json.dumps(prof.to_dict(), indent=2) + "\n" == text   # byte for byte (save())
    again = load_profile(prof.save(tmp_path / f"{name}.json"))
    assert again.to_dict() == prof.to_dict()


def test_shipped_profile_reloaded_simulates_identically(tmp_path):
    prof = load_profile(PROFILE)
    again = load_profile(prof.save(tmp_path / "p.json"))
    a = simulate(tiny_trace(), small_config(), prof).summary
    b = simulate(tiny_trace(), small_config(), again).summary
    assert a == b


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"schema": "twin.recommender/1"}',
                                     b'{"schema": "twin.recommender/1", "models": {"m": 1}}',
                                     b"\xff\xfe"])
def test_corrupt_recommender_model_is_an_input_error(tmp_path, content):
    # old: JSONDecodeError / AttributeError / KeyError / TypeError
    from twin.ml.recommender import Recommender

    p = tmp_path / "model.json"
    p.write_bytes(content)
    with pytest.raises(TwinInputError) as e:
        Recommender.load(p)
    assert e.value.file == str(p)


def test_recommender_tree_index_out_of_range_is_an_input_error(tmp_path):
    # old: loaded, then IndexError (or a wrong prediction) at predict time
    from importlib import resources

    from twin.ml.recommender import Recommender

    d = json.loads((resources.files("twin.ml") / "recommender.json").read_text())
    first = next(iter(d["models"]))
    d["models"][first]["trees"][0]["left"][0] = 10 ** 6
    p = tmp_path / "model.json"
    p.write_text(json.dumps(d))
    with pytest.raises(TwinInputError) as e:
        Recommender.load(p)
    assert e.value.field == f"models.{first}.trees.0"


@pytest.mark.parametrize("text", ["0,abc", "8,abc", "4,0", ",", "2.5"])
def test_sweep_slots_bad_list_is_an_argparse_error(text, capsys):
    # old: the string was split and int()-ed at run time: ValueError traceback (0 accepted)
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["sweep", "--workloads", "w.yaml", "--out", "o",
                                   "--slots", text])
    assert e.value.code == 2 and "--slots" in capsys.readouterr().err


def test_sweep_slots_parsed_once():
    args = build_parser().parse_args(["sweep", "--workloads", "w.yaml", "--out", "o",
                                      "--slots", "1, 8,16,"])
    assert args.slots == (1, 8, 16)


@pytest.mark.parametrize("params,field", [
    ({"n_adapters": "abc"}, "n_adapters"),                      # old: ValueError
    ({"rates": [1.0, -2.0]}, "rates.1"),                        # old: accepted
    ({"lengths": {"kind": "uniform", "lo": 50, "hi": 10}}, "lengths"),   # old: accepted
    ({"ranks": [16, 1024]}, "ranks.1"),                         # old: accepted (fails later)
    ({"n_adapters": 2.5}, "n_adapters"),                        # old: silently 2
])
def test_workload_spec_bad_values_are_input_errors(tmp_path, params, field):
    import yaml

    from twin.ml.spec import WorkloadSpec

    p = tmp_path / "w.yaml"
    p.write_text(yaml.safe_dump({"family": "rate_classes", **params}))
    with pytest.raises(TwinInputError) as e:
        WorkloadSpec.from_yaml(p)
    assert e.value.file == str(p) and e.value.field == field


def _bench_json(tmp_path):
    res = {"request_rate": 4.0, "completed": 1000, "total_input_tokens": 223000,
           "total_output_tokens": 196000, "duration": 300.0, "mean_ttft_ms": 40.0,
           "mean_tpot_ms": 20.0, "mean_itl_ms": 20.5, "max_lora_rank": 16}
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(res))
    return p


def test_sidecar_runs_not_a_mapping_is_an_input_error(tmp_path):
    # old: AttributeError ('list' object has no attribute 'get')
    from twin.calibrate.vllm_runs import read_bench_results

    side = tmp_path / "side.yaml"
    side.write_text("max_loras: 4\nmax_cpu_loras: 8\nruns: [bench.json]\n")
    with pytest.raises(TwinInputError) as e:
        read_bench_results([_bench_json(tmp_path)], side)
    assert e.value.file == str(side) and e.value.field == "runs"


def test_sidecar_typo_is_an_input_error(tmp_path):
    # old: the misspelt key was ignored and max_cpu_loras silently defaulted
    from twin.calibrate.vllm_runs import read_bench_results

    side = {"max_loras": 4, "max_cpu_lora": 8}
    with pytest.raises(TwinInputError) as e:
        read_bench_results([_bench_json(tmp_path)], side)
    assert e.value.field == "max_cpu_lora"


def test_sidecar_preload_false_is_false(tmp_path):
    # old: bool("false") is True
    from twin.calibrate.vllm_runs import read_bench_results

    side = {"max_loras": 4, "max_cpu_loras": 4, "preload_adapters": "false"}
    (spec,) = read_bench_results([_bench_json(tmp_path)], side)
    assert spec.config.preload_adapters is False


# -- the CLI's last line of defence --------------------------------------------------------------

def _boom(args):
    raise RuntimeError("injected\nfailure")


@pytest.fixture
def broken_simulate(monkeypatch):
    import importlib

    cli = importlib.import_module("twin.cli.app")
    real = cli.build_parser

    def build(command=None):
        parser = real(command)
        sub = next(a for a in parser._actions if a.dest == "command")
        sub.choices["simulate"].set_defaults(func=_boom)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)


def test_internal_error_is_one_line_without_traceback(broken_simulate, capsys):
    # old: the RuntimeError escaped main() with a traceback
    rc = twin_main(["simulate", "--trace", "t.csv"])
    err = capsys.readouterr().err
    assert rc == 70
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("twin simulate: internal error (a bug): RuntimeError: injected failure")
    assert "--debug" in err


def test_debug_shows_the_traceback(broken_simulate, capsys):
    rc = twin_main(["simulate", "--trace", "t.csv", "--debug"])
    err = capsys.readouterr().err
    assert rc == 70 and "Traceback" in err and "_boom" in err


def test_input_error_stays_exit_2(tmp_path, capsys):
    p = tmp_path / "serve.yaml"
    p.write_text("block_size: 24\n")
    rc = twin_main(["simulate", "--trace", str(tmp_path / "none.csv"), "--config", str(p)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "block_size" in err


def test_serving_config_values_unchanged_by_validation():
    cfg = ServingConfig.from_dict({"max-loras": "8", "enable_lora": "on", "max_cpu_loras": None,
                                   "gpu_memory_utilization": 0.85})
    assert (cfg.max_loras, cfg.enable_lora, cfg.max_cpu_loras) == (8, True, 8)
    assert cfg.gpu_memory_utilization == 0.85
    assert ServingConfig.from_dict(cfg.to_dict()) == cfg
    assert copy.copy(cfg) == cfg


def test_executor_refuses_adapter_requests_without_enable_lora(tmp_path):
    # old: the executor served them on the base model
    pytest.importorskip("torch")
    from twin.executor.engine import execute

    with pytest.raises(TwinInputError) as e:
        execute(tiny_trace(), small_config(enable_lora=False), tmp_path / "no-model", None)
    assert "does not exist" in str(e.value) and e.value.field == "adapter"


def test_lora_module_names_reads_every_form_vllm_takes():
    from twin.config import lora_module_names

    assert lora_module_names(None) is None and lora_module_names([]) is None
    assert lora_module_names(["a=/x", " b = /y", '{"name": "c", "path": "/z"}',
                              {"name": "d", "path": "/w"}]) == ("a", "b", "c", "d")
    assert lora_module_names("solo=/p") == ("solo",)

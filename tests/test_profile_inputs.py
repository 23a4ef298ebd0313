"""``twin profile``'s inputs checked before a profile is written: explicit GPU numbers in
their units, a checkpoint's own quantization, and a GPU calibration's machine against the
flags that describe another."""

from __future__ import annotations

import json

import pytest

from twin.cli import main
from twin.costs.profile import load_profile
from twin.errors import TwinInputError


def _run(args, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:   # argparse's own refusals
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- explicit numbers: their units --------------------------------------------------------------

@pytest.mark.parametrize("flag,value,unit", [
    ("--hbm-bandwidth", "3.35", "bytes/s"),          # TB/s typed
    ("--hbm-bandwidth", "3.35e15", "bytes/s"),       # bits, or a typo
    ("--flops", "989", "FLOP/s"),                    # TFLOP/s typed
    ("--flops", "9.89e20", "FLOP/s"),
    ("--gpu-memory-gib", "80e9", "GiB"),             # bytes typed
    ("--gpu-memory-gib", "0.08", "GiB"),             # TB typed
    ("--link-bandwidth", "450", "bytes/s"),          # GB/s typed
])
def test_explicit_gpu_numbers_in_another_unit_are_refused(flag, value, unit, tmp_path, capsys):
    """--hbm-bandwidth 3.35 --flops 989 (TB/s and TFLOP/s) priced a step at ~6e9 s and
    --gpu-memory-gib 80e9 (bytes) gave 5.9e14 KV tokens; such values are refused naming the
    flag, the value and the unit."""
    out = tmp_path / "p.json"
    rc, _, err = _run(["profile", "--model", "qwen2.5-0.5b", "--gpu", "h100-80gb", "-tp", 2,
                       flag, value, "--out", out], capsys)
    assert rc == 2 and not out.exists()
    line = err.strip().splitlines()[-1]
    assert flag in line and repr(value) in line and unit in line


def test_explicit_gpu_numbers_in_their_units_are_read(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc, _, err = _run(["profile", "--model", "qwen2.5-0.5b", "--gpu-memory-gib", 80,
                       "--hbm-bandwidth", 3.35e12, "--flops", 9.89e14, "--link-bandwidth",
                       4.5e11, "-tp", 2, "--out", out], capsys)
    assert rc == 0, err
    hw = load_profile(out).hardware
    assert (hw["memory_gib"], hw["hbm_bytes_per_s"], hw["bf16_flops"],
            hw["link_bytes_per_s"]) == (80, 3.35e12, 9.89e14, 4.5e11)


# -- a checkpoint's own quantization (config.json quantization_config) ---------------------------

def _checkpoint(tmp_path, quantization_config, name="ckpt"):
    from twin.costs.model_config import BUILTIN
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(BUILTIN["llama-3.1-8b"],
                                                   quantization_config=quantization_config)))
    return d


def test_an_fp8_checkpoint_is_priced_as_fp8_weights(tmp_path, capsys):
    """vLLM detects an FP8 checkpoint from its config.json and serves it as --quantization
    fp8 would; the twin priced it as 16-bit weights (14.99 GiB of Llama-3.1-8B on an L4)."""
    ckpt = _checkpoint(tmp_path, {"quant_method": "fp8", "activation_scheme": "dynamic"})
    detected, given, plain = (tmp_path / n for n in ("d.json", "g.json", "p.json"))
    for out, extra in ((detected, []), (given, ["--quantization", "fp8"])):
        rc, _, err = _run(["profile", "--model", ckpt, "--gpu", "l4", *extra, "--out", out],
                          capsys)
        assert rc == 0, err
    assert _run(["profile", "--model", "llama-3.1-8b", "--gpu", "l4", "--quantization", "fp8",
                 "--out", plain], capsys)[0] == 0
    d, g, p = load_profile(detected), load_profile(given), load_profile(plain)
    assert d.hardware["quantization"] == "fp8"
    assert d.memory.to_dict() == g.memory.to_dict() == p.memory.to_dict()
    assert d.step_time.to_dict() == p.step_time.to_dict()


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes", "compressed-tensors"])
def test_a_checkpoint_quantized_otherwise_is_refused(method, tmp_path, capsys):
    """AWQ / GPTQ / bitsandbytes checkpoints are not priced as 16-bit weights: refused,
    naming the file, quantization_config.quant_method and what is supported."""
    ckpt = _checkpoint(tmp_path, {"quant_method": method, "bits": 4, "group_size": 128})
    out = tmp_path / "p.json"
    rc, _, err = _run(["profile", "--model", ckpt, "--gpu", "l4", "--out", out], capsys)
    assert rc == 2 and not out.exists() and err.count("\n") == 1
    assert "config.json" in err and "quantization_config.quant_method" in err
    assert method in err and "fp8" in err


def test_a_given_quantization_that_differs_from_the_checkpoints_is_refused(tmp_path):
    from twin.costs.model_config import load_model
    ckpt = _checkpoint(tmp_path, {"quant_method": "FP8"})
    assert load_model(ckpt)[1] == load_model(ckpt, "fp8")[1] == "fp8"
    assert load_model("llama-3.1-8b")[1] is None
    with pytest.raises(TwinInputError, match="quant_method") as exc:
        load_model(ckpt, "int8")
    assert exc.value.field == "--quantization" and exc.value.file.endswith("config.json")
    with pytest.raises(TwinInputError) as exc:
        load_model(_checkpoint(tmp_path, ["fp8"], "bad"))
    assert exc.value.field == "quantization_config"

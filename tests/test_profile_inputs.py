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


# -- a GPU calibration's machine against the flags ----------------------------------------------

def _calibration(tmp_path, profile, hw=None, **extra):
    """A calibration file as `twin calibrate` writes it: coefficients, and the profile of
    its machine next to it (what says which machine it was measured on)."""
    from twin.costs.hardware import save_calibration
    profile.save(tmp_path / "machine.json")
    hw = hw or {"step_s": 2e-3, "layer_s": 1e-4, "weight_s_per_byte": 1e-9,
                "dense_s_per_flop": 1e-11}
    return save_calibration(hw, tmp_path / "machine.hardware.json", profile="machine.json",
                            **extra)


@pytest.mark.parametrize("extra,flag", [
    (["--gpu", "h100-80gb"], "--gpu"),
    (["--hbm-bandwidth", "1e11", "--flops", "1e13", "--gpu-memory-gib", "80"], "--hbm-bandwidth"),
    (["--flops", "1e13"], "--flops"),
    (["--link-bandwidth", "1e11"], "--link-bandwidth"),
    (["--quantization", "fp8"], "--quantization"),
    (["--base-profile", "llama31-8b-h100-64gb"], "--base-profile"),
])
def test_a_cpu_calibration_refuses_flags_of_another_machine(extra, flag, tmp_path, capsys):
    """A CPU calibration with --gpu h100-80gb wrote a profile named for the H100 whose step
    time was the CPU's (24 ms a decode token); explicit rates were recorded and priced
    nothing; fp8 halved the weight bytes on a machine with no FP8 rate. Each is refused,
    naming the flag and the calibration's machine."""
    cal = _calibration(tmp_path, load_profile("cpu-tiny"))
    out = tmp_path / "p.json"
    rc, _, err = _run(["profile", "--model", "smollm2-360m", "--gpu-calibration", cal, *extra,
                       "--out", out], capsys)
    assert rc == 2 and not out.exists() and err.count("\n") == 1
    assert f"'{flag}'" in err and str(cal) in err
    assert load_profile("cpu-tiny").hardware["name"] in err
    # the calibration alone (a memory budget for the larger model) is the way to use it
    rc, _, err = _run(["profile", "--model", "smollm2-360m", "--gpu-calibration", cal,
                       "--gpu-memory-gib", 8, "--out", out], capsys)
    assert rc == 0, err
    assert load_profile(out).hardware["name"] == load_profile("cpu-tiny").hardware["name"]


def test_a_gpu_calibration_refuses_another_gpu_and_prices_its_own(tmp_path, capsys):
    """A calibration fitted on the 64 GB H100 with --gpu a100-40gb gave the A100 profile the
    H100's step-time coefficients; refused. Its own GPU reads its coefficients."""
    from twin.costs.first_principles import build_profile
    from twin.costs.hardware import coefficients, gpu_prior
    from twin.costs.model_config import load_model_shape

    hw = {**gpu_prior("h100-64gb"), "step_s": 4.2e-3}
    cal = _calibration(tmp_path, build_profile(gpu="h100-64gb"), hw)
    out = tmp_path / "p.json"
    for gpu in ("a100-40gb", "h100"):     # h100: the 80 GB SXM, another board
        rc, _, err = _run(["profile", "--model", "qwen2.5-7b", "--gpu", gpu,
                           "--gpu-calibration", cal, "--out", out], capsys)
        assert rc == 2 and not out.exists()
        assert "'--gpu'" in err and "h100-64gb" in err
    rc, _, err = _run(["profile", "--model", "qwen2.5-7b", "--gpu", "h100-64gb",
                       "--gpu-calibration", cal, "--out", out], capsys)
    assert rc == 0, err
    assert load_profile(out).step_time.base == pytest.approx(
        coefficients(hw, load_model_shape("qwen2.5-7b")))


@pytest.mark.parametrize("gpu", ["h100-64gb", "a100-80gb"])
@pytest.mark.parametrize("was,want", [(None, "fp8"), ("fp8", None)])
@pytest.mark.parametrize("with_gpu", [True, False])
def test_a_gpu_calibration_prices_other_weights_at_their_flop_rate(gpu, was, want, with_gpu,
                                                                   tmp_path, capsys):
    """--quantization fp8 with a calibration halved the weight bytes but kept the 16-bit
    FLOP rate (first principles price FP8 GEMMs at the FP8 rate): the dense term is rescaled
    by the catalogue's ratio of the two rates (1 on the A100, which has no FP8 tensor
    cores), so a calibration equal to the GPU's prior gives the prior of the other dtype."""
    from twin.costs.first_principles import build_profile
    from twin.costs.hardware import gpu_prior
    from twin.costs.model_config import load_model_shape

    cal = _calibration(tmp_path, build_profile(gpu=gpu, quantization=was),
                       gpu_prior(gpu, fp8=was == "fp8"))
    out = tmp_path / "p.json"
    rc, _, err = _run(["profile", "--model", "qwen2.5-7b", "--gpu-calibration", cal,
                       *(["--gpu", gpu] if with_gpu else []),
                       *(["--quantization", want] if want else []), "--out", out], capsys)
    assert rc == 0, err
    p = load_profile(out)
    fp = build_profile(load_model_shape("qwen2.5-7b"), gpu, quantization=want)
    assert p.hardware["quantization"] == want
    for k in ("prefill_tokens", "decode_tokens", "prefill_seqs", "lora_token_rank"):
        assert p.step_time.base[k] == pytest.approx(fp.step_time.base[k], rel=1e-9), k


def test_a_calibrations_gemm_table_does_not_price_other_weights(tmp_path, capsys):
    import numpy as np
    from twin.costs.first_principles import build_profile
    from twin.costs.gemm import GemmTable
    from twin.costs.hardware import gpu_prior

    m, kn = [1, 4, 16, 64], [256, 1024, 4096]
    M, K, N = np.meshgrid(m, kn, kn, indexing="ij")
    table = GemmTable(m, kn, kn, K * N * 2 / 2e12 + 2.0 * M * K * N / 5e14)
    cal = _calibration(tmp_path, build_profile(gpu="h100-80gb"),
                       {**gpu_prior("h100-80gb"), "dense_s_per_flop": 0.0, "gemm_scale": 1.0},
                       gemm=table)
    out = tmp_path / "p.json"
    rc, _, err = _run(["profile", "--model", "qwen2.5-7b", "--gpu-calibration", cal,
                       "--quantization", "fp8", "--out", out], capsys)
    assert rc == 2 and not out.exists() and "'--quantization'" in err and "GEMM" in err


def test_a_calibration_that_records_its_machine_is_checked_by_that_record(tmp_path, capsys):
    """A calibration file may say its machine itself (``machine``: the hardware record of
    the profile it was fitted with), with no profile next to it."""
    from twin.costs.first_principles import build_profile
    from twin.costs.hardware import gpu_prior, save_calibration

    cal = save_calibration(gpu_prior("h100-64gb"), tmp_path / "hw.json",
                           machine=build_profile(gpu="h100-64gb").hardware)
    out = tmp_path / "p.json"
    rc, _, err = _run(["profile", "--model", "qwen2.5-7b", "--gpu", "a100-40gb",
                       "--gpu-calibration", cal, "--out", out], capsys)
    assert rc == 2 and not out.exists() and "'--gpu'" in err and "h100-64gb" in err
    assert _run(["profile", "--model", "qwen2.5-7b", "--gpu", "h100-64gb",
                 "--gpu-calibration", cal, "--out", out], capsys)[0] == 0


# -- tensor parallelism from a one-device calibration -------------------------------------------

def test_a_one_gpu_calibration_prices_the_all_reduce_of_a_larger_tp(tmp_path, capsys):
    """A calibration measured on one GPU has no all-reduce terms (0): at
    --tensor-parallel-size 2 every all-reduce was priced free. They now come from the
    catalogue's link of its GPU, as in the prior (a TP-1 copy of the prior gives the
    prior's own TP-2 step time), and a CPU calibration, with no link, is refused."""
    from twin.costs.first_principles import build_profile
    from twin.costs.hardware import gpu_prior

    prior = gpu_prior("h100-64gb")
    one = {k: v for k, v in prior.items() if not k.startswith("allreduce")}
    base = {}
    for name, hw in (("full", prior), ("tp1", one)):
        (tmp_path / name).mkdir()
        cal = _calibration(tmp_path / name, build_profile(gpu="h100-64gb"), hw)
        out = tmp_path / f"{name}.json"
        rc, _, err = _run(["profile", "--model", "llama-3.1-8b", "--gpu-calibration", cal,
                           "--tensor-parallel-size", 2, "--out", out], capsys)
        assert rc == 0, err
        base[name] = load_profile(out).step_time.base
    assert base["tp1"] == pytest.approx(base["full"])   # the all-reduces priced, not free
    cpu = _calibration(tmp_path, load_profile("cpu-tiny"))
    out = tmp_path / "cpu.json"
    rc, _, err = _run(["profile", "--model", "smollm2-360m", "--gpu-calibration", cpu,
                       "--tensor-parallel-size", 2, "--out", out], capsys)
    assert rc == 2 and "'--tensor-parallel-size'" in err and not out.exists()


def test_a_cuda_calibration_named_by_torch_is_taken_as_the_gpu_given(tmp_path, capsys):
    """The executor on CUDA records torch's board name ("NVIDIA H100 80GB HBM3"), which the
    catalogue does not list: such a calibration was refused on its own GPU (--gpu, fp8 and
    --tensor-parallel-size 2 all "another machine"); --gpu now says which board it is."""
    from twin.costs.hardware import gpu_prior, save_calibration

    cal = save_calibration(gpu_prior("h100-80gb"), tmp_path / "cuda.hardware.json",
                           machine={"name": "NVIDIA H100 80GB HBM3", "device": "cuda:0"})
    out = tmp_path / "p.json"
    rc, _, err = _run(["profile", "--model", "llama-3.1-8b", "--gpu", "h100-80gb",
                       "--gpu-calibration", cal, "--tensor-parallel-size", 2, "--out", out],
                      capsys)
    assert rc == 0, err
    assert "catalogue GPU" in load_profile(out).provenance["gpu_calibration_machine"]


@pytest.mark.parametrize("qc, fp8", [
    ({"quant_method": "fbgemm_fp8"}, True),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "float"}, "targets": ["Linear"]}}}, True),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "int"}, "targets": ["Linear"]}}}, False)])
def test_fp8_checkpoints_in_other_formats_are_priced_as_fp8(qc, fp8, tmp_path, capsys):
    """FP8 checkpoints are mostly published as compressed-tensors (the *-FP8 ones) or
    fbgemm_fp8, which vLLM serves as FP8: priced so, where the first fix refused them; an
    int4 compressed-tensors one is still refused."""
    ckpt = _checkpoint(tmp_path, qc)
    out = tmp_path / "p.json"
    rc, _, err = _run(["profile", "--model", ckpt, "--gpu", "l4", "--out", out], capsys)
    if fp8:
        assert rc == 0, err
        assert load_profile(out).hardware["quantization"] == "fp8"
    else:
        assert rc == 2 and "quantization_config.quant_method" in err

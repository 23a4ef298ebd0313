"""``twin profile``'s inputs checked before a profile is written: explicit GPU numbers in
their units, a checkpoint's own quantization, and a GPU calibration's machine against the
flags that describe another."""

from __future__ import annotations

import pytest

from twin.cli import main
from twin.costs.profile import load_profile


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

"""Where a profile was measured, and whether that is this machine (issue 15).

A profile calibrated on the reference executor (``twin calibrate --executor``) prices
steps as *that* machine ran them: its CPU or GPU model, core count, torch version, torch
threads and dtype. Used on another machine to predict the executor there, it is wrong by
the speed difference (the shipped ``cpu-tiny`` profile on another 2-core box: 28.6% /
27.7% TTFT / ITL error where a fresh 42-s calibration gave 2.9% / 1.9%). So calibration
records the machine (:func:`machine_record`), and ``twin.api.simulate`` and ``twin
validate`` print one line on stderr when the profile describes another one
(:func:`warn_if_other_machine`).

Profiles fitted on real vLLM runs or built from first principles describe the GPU whose
serving they predict — the point of the twin is to run them elsewhere — so only executor
profiles are checked. Nothing here imports torch (its version is read from the installed
package's metadata; a GPU's name only when torch is already loaded).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from functools import lru_cache

__all__ = ["machine_mismatch", "machine_record", "this_machine", "warn_if_other_machine"]


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu_name() -> str | None:
    """This machine's first GPU, only when torch is already imported (never imported here:
    ``twin simulate`` stays off torch)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:   # a broken driver is not this check's business
        return None
    return None


def this_machine() -> dict:
    """This machine, in the terms :func:`machine_record` writes."""
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch": _torch_version(), "gpu": _gpu_name()}


def machine_record(device: str, gpu: str | None = None) -> dict:
    """What calibration writes into a profile's provenance beside ``torch``, ``threads``
    and ``dtype`` (which it records already): the CPU model and core count, and the GPU's
    name when the executor ran on one."""
    rec = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count()}
    if str(device).startswith("cuda"):
        rec["gpu"] = gpu
    return rec


def machine_mismatch(profile, here: dict | None = None) -> list[str]:
    """How the machine an executor profile was calibrated on differs from ``here`` (this
    machine by default), one phrase per difference; empty when it matches, when the profile
    does not say (older profiles lack the CPU model: what they record is compared) or when
    it is not an executor profile (see the module docstring)."""
    prov = getattr(profile, "provenance", None) or {}
    if not str(prov.get("method", "")).startswith("twin calibrate --executor"):
        return []
    hw = getattr(profile, "hardware", None) or {}
    here = this_machine() if here is None else here
    out = []
    was = prov.get("cpu_model")
    if was and here.get("cpu_model") and was != here["cpu_model"]:
        out.append(f"CPU {was!r}, here {here['cpu_model']!r}")
    cores = prov.get("cpu_count", hw.get("cpu_count"))
    if cores and here.get("cpu_count") and int(cores) != int(here["cpu_count"]):
        out.append(f"{cores} cores, here {here['cpu_count']}")
    threads = prov.get("threads", hw.get("threads"))
    if threads and here.get("cpu_count") and int(threads) > int(here["cpu_count"]):
        out.append(f"{threads} torch threads, here {here['cpu_count']} cores")
    was = prov.get("torch")
    if was and here.get("torch") and was != here["torch"]:
        out.append(f"torch {was}, here {here['torch']}")
    was = prov.get("gpu")
    if was and here.get("gpu") and was != here["gpu"]:
        out.append(f"GPU {was!r}, here {here['gpu']!r}")
    return out


_warned: set = set()


def warn_if_other_machine(profile, *, file=None, here: dict | None = None) -> bool:
    """Print one line on stderr (once per profile and difference in a process) when
    ``profile`` was calibrated on another machine; True when it was."""
    diff = machine_mismatch(profile, here)
    if not diff:
        return False
    key = (getattr(profile, "name", ""), tuple(diff))
    if key not in _warned:
        _warned.add(key)
        print(f"twin: warning: profile {getattr(profile, 'name', '')!r} was calibrated on "
              f"another machine ({'; '.join(diff)}): its step times describe that machine; "
              f"calibrate here first (twin calibrate --executor)",
              file=sys.stderr if file is None else file)
    return True

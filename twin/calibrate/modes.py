"""The modes of ``twin calibrate`` and the flags each reads: one table, so that a flag given
in a mode that does not read it is refused (named with the modes it belongs to), never
silently ignored -- e.g. ``--kv-capacity`` with ``--few-run`` would leave the user believing
the memory model was fitted, ``--device cuda`` without ``--executor`` that the GPU was
measured.
"""

from __future__ import annotations

from twin.errors import TwinInputError

__all__ = ["MODES", "FLAG_MODES", "RUNS", "mode_of", "check_flags"]

#: mode -> how the user asks for it
MODES = {"vllm": "the full fit on vLLM runs (without --few-run or --executor)",
         "few-run": "--few-run", "executor": "--executor", "split": "--executor --policy split"}
RUNS, _FITS, _EXEC = ("vllm", "few-run"), ("vllm", "few-run", "executor"), ("executor", "split")
#: argparse ``dest`` -> the modes that read it
FLAG_MODES = {
    "from_vllm_runs": RUNS, "bench_config": RUNS, "experiment_set": RUNS,
    "max_runs": RUNS, "window_s": RUNS, "iterations": RUNS, "processes": RUNS,
    "seed": RUNS, "base_profile": RUNS, "name": _FITS,
    "kv_capacity": ("vllm",), "load_times": ("vllm",), "terms": ("vllm",), "hold": ("vllm",),
    "decode_target": ("vllm",), "metrics_series_s": ("vllm",), "request_delay": ("vllm",),
    "few_run": ("few-run",), "executor": _EXEC, "model": _EXEC, "policy": _EXEC,
    "device": ("executor",), "dtype": ("executor",), "budget": ("executor",),
    "threads": ("executor",), "repeats": ("executor",), "statistic": ("executor",),
    "hardware_with": ("executor",), "gemm": ("executor",), "device_memory_gib": ("executor",),
    "clients_max": ("split",), "quick": ("split",),
}


def mode_of(args) -> str:
    """``vllm``, ``few-run``, ``executor`` or ``split``."""
    if getattr(args, "executor", False):
        return "split" if getattr(args, "policy", "vllm") == "split" else "executor"
    return "few-run" if getattr(args, "few_run", False) else "vllm"


def check_flags(args, parser) -> str:
    """The mode ``args`` ask for; a flag the mode does not read, given (not at ``parser``'s
    default, so a default is never taken for a flag), raises ``TwinInputError`` naming it
    and the mode(s) it belongs to."""
    mode = mode_of(args)
    defaults = vars(parser.parse_args([]))
    flag = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    given = [d for d, modes in FLAG_MODES.items() if mode not in modes
             and getattr(args, d, defaults.get(d)) not in (None, defaults.get(d))]
    if given:
        groups: dict = {}
        for d in given:
            groups.setdefault(FLAG_MODES[d], []).append(flag.get(d, d))
        where = "; ".join(f"{', '.join(ns)}: only {' or '.join(MODES[m] for m in ms)}"
                          for ms, ns in groups.items())
        names = [flag.get(d, d) for d in given]
        raise TwinInputError(f"{MODES[mode]} does not use {', '.join(names)} ({where}): "
                             f"drop {'it' if len(names) == 1 else 'them'}", field=names[0])
    return mode

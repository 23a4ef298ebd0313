"""``twin``: the command line. Each subcommand lives next to what it drives and registers
itself here through an ``add_*_parser(subparsers)`` function that sets ``func``."""

from __future__ import annotations

import argparse
import sys

from twin.errors import TwinInputError

_DESCRIPTION = """\
twin: a digital twin of multi-adapter (LoRA) LLM serving.

It answers, in seconds, what vLLM serving many LoRA adapters would do with a request
trace on a GPU: throughput, TTFT/TPOT/ITL, adapter loads, preemptions, KV usage, and
whether the configuration keeps up with its offered load.

Start with:
  twin simulate --trace traces/azure_conv_1h_32lora.parquet --max-loras 8 --plot --out runs/demo
"""

# subcommand modules, imported lazily so that `twin simulate` never imports torch
_SUBCOMMANDS = (
    ("twin.sim.cli", "add_simulate_parser"),
    ("twin.workload.cli", "add_trace_parser"),
    ("twin.executor.cli", "add_execute_parser"),
    ("twin.models.calibrate_cli", "add_calibrate_parser"),
    ("twin.validate_cli", "add_validate_parser"),
    ("twin.ml.cli", "add_ml_parsers"),
    ("twin.compare_cli", "add_compare_parser"),
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="twin", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"twin {__import__('twin').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, func in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("twin"):
                continue  # subcommand not built yet
            raise
        getattr(mod, func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TwinInputError as exc:
        print(f"twin {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"twin {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

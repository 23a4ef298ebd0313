"""``twin``: the command line. Each subcommand is a module of :mod:`twin.cli` that registers
itself here through an ``add_*_parser(subparsers)`` function that sets ``func``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import traceback

from twin.errors import TwinInputError

_DESCRIPTION = """\
twin: a digital twin of multi-adapter (LoRA) LLM serving.

It answers, in seconds, what vLLM serving many LoRA adapters would do with a request
trace on a GPU: throughput, TTFT/TPOT/ITL, adapter loads, preemptions, KV usage, and
whether the configuration keeps up with its offered load.

Start with:
  twin simulate --trace traces/azure_conv_1h_32lora.parquet --max-loras 8 --plot --out runs/demo
"""

# command -> the module that registers it (its ``add_*`` function). Only the module of the
# command being run is imported: each command pays for its own imports, not every other's
# (`twin profile` and `twin trace` load no simulator; `twin simulate` never imports torch).
# tests/test_cli_commands.py checks this table against what the modules register.
_REGISTRARS = {
    "twin.cli.simulate": "add_simulate_parser",
    "twin.cli.fleet": "add_fleet_parser",
    "twin.cli.trace": "add_trace_parser",
    "twin.cli.execute": "add_execute_parser",
    "twin.cli.calibrate": "add_calibrate_parser",
    "twin.cli.validate": "add_validate_parser",
    "twin.cli.ml": "add_ml_parsers",
    "twin.cli.compare": "add_compare_parser",
    "twin.cli.profile": "add_profile_parser",
}
COMMANDS = {
    "simulate": "twin.cli.simulate", "fleet": "twin.cli.fleet", "trace": "twin.cli.trace",
    "execute": "twin.cli.execute", "make-adapters": "twin.cli.execute",
    "calibrate": "twin.cli.calibrate", "validate": "twin.cli.validate",
    "sweep": "twin.cli.ml", "recommend": "twin.cli.ml", "place": "twin.cli.ml",
    "train": "twin.cli.ml", "compare": "twin.cli.compare", "profile": "twin.cli.profile",
}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option: the
    top-level options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command registered, or (``command`` known) only the modules
    that command needs, so a run imports no other command's dependencies."""
    parser = argparse.ArgumentParser(prog="twin", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"twin {__import__('twin').__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an internal error (any position)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(_REGISTRARS)
    for module in modules:
        getattr(importlib.import_module(module), _REGISTRARS[module])(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Bad input (``TwinInputError``) is one line and exit 2; any other
    exception is a bug in the twin: one line saying so and exit 70 (EX_SOFTWARE), with the
    traceback under ``--debug`` (accepted anywhere on the command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with _terminate_as_exit():
        return _run(args, debug)


@contextlib.contextmanager
def _terminate_as_exit():
    """While a command runs, SIGTERM (``timeout``, ``kill``, a scheduler's stop) unwinds
    like Ctrl-C does, so that its output's temporary folder and lock are removed
    (:mod:`twin.outputs`); without it the process died where it stood and left them.
    Forked workers keep the default (they die at once); the old handler comes back after."""
    pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() != pid:   # a forked worker: die as before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:   # not the main thread (a library caller's): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(args, debug: bool) -> int:
    try:
        return int(args.func(args) or 0)
    except TwinInputError as exc:
        if debug:
            traceback.print_exc()
        print(f"twin {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"twin {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:   # noqa: BLE001 - the last line of defence: no traceback
        if debug:
            traceback.print_exc()
        text = " ".join(str(exc).split())
        if len(text) > 300:
            text = text[:297] + "..."
        print(f"twin {args.command}: internal error (a bug): {type(exc).__name__}: {text}"
              + ("" if debug else " — rerun with --debug for the traceback"), file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())

"""``twin``: the command line, every command in one place.

Each command is a thin file over the package it drives (``simulate`` → ``twin.sim``,
``execute`` → ``twin.executor``, ``calibrate`` → ``twin.calibrate``, ``validate`` →
``twin.validate``, ``compare`` → ``twin.policies``, ``trace`` → ``twin.workload``, ``ml`` →
``twin.ml``); the shared vLLM serving flags are defined once in :mod:`twin.cli.config_flags`.
``main`` is the console entry point (``twin = "twin.cli:main"``); importing this package
imports no command module, so ``twin simulate`` never imports torch.
"""

from twin.cli.app import build_parser, main

__all__ = ["build_parser", "main"]

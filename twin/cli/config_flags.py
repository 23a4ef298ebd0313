"""The vLLM serving flags, defined once for every command that serves a trace (simulate,
execute, validate, compare): one flag per :class:`twin.config.ServingConfig` field, under
vLLM's own name, plus ``--config`` for a YAML file of them."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from twin.argtypes import strict_bool
from twin.config import ServingConfig, read_yaml_mapping, setting_names
from twin.costs.profile import Profile, load_profile
from twin.errors import TwinInputError
from twin.workload.schema import read_trace


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """vLLM serving flags (shared by simulate, execute, validate, compare)."""
    g = p.add_argument_group("serving configuration (vLLM names; default: vLLM's defaults)")
    g.add_argument("--config", type=Path, help="YAML file of vLLM settings")
    for f in dataclasses.fields(ServingConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = str(f.type)
        if f.name == "lora_modules":   # vLLM's: several name=path (or names)
            g.add_argument(flag, dest=f.name, default=None, nargs="+", metavar="NAME[=PATH]",
                           help="adapters loaded at start-up (with --preload-adapters, "
                                "which it turns on; default: every catalog adapter)")
        elif typ.startswith("bool"):
            g.add_argument(flag, dest=f.name, default=None, type=strict_bool,
                           metavar="{true,false}", help=f"default {f.default}")
        else:
            conv = int if typ.startswith("int") else float if typ.startswith("float") else str
            g.add_argument(flag, dest=f.name, default=None, type=conv,
                           help=f"default {f.default if f.default is not None else 'max_loras'}")


def given_config_flags(args) -> list[str]:
    """The serving flags given on the command line (``--config`` included), as typed."""
    given = ["--config"] if getattr(args, "config", None) else []
    return given + ["--" + f.name.replace("_", "-") for f in dataclasses.fields(ServingConfig)
                    if getattr(args, f.name, None) is not None]


def config_from_args(args, profile: Profile | None = None) -> ServingConfig:
    """The ServingConfig of ``--config`` (if any) with every flag given overriding it.
    ``profile``: the ``--profile`` already loaded by the caller (else it is read here, for
    the model's context only)."""
    # only the settings the file names: a default filled in here (max_model_len 131072)
    # would hide the model's context below; names, types and refusals are checked once,
    # on the merged settings (ServingConfig.from_dict names the file)
    base = _file_settings(args)
    if profile is None and hasattr(args, "profile"):
        profile = load_profile(args.profile)
    for f in dataclasses.fields(ServingConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            base[f.name] = v
    if "max_cpu_loras" not in base or base["max_cpu_loras"] is None:
        base.pop("max_cpu_loras", None)
    if base.get("max_model_len") is None and getattr(args, "profile", None):
        # not given: vLLM derives max_model_len from the model (max_position_embeddings),
        # so a model with a shorter context than the default runs instead of being refused
        context = profile.model.max_position_embeddings
        if context is not None:
            base["max_model_len"] = context
    # an error names where the settings came from: a flag's value is not the file's
    flags = " ".join(f for f in given_config_flags(args) if f != "--config")
    source = " with ".join(s for s in (str(args.config or ""), flags) if s)
    # engine settings (tensor parallelism, FP8) are checked against the profile's; a
    # command without a profile (the executor) refuses them
    try:
        return ServingConfig.from_dict(base, source=source or "flags",
                                       engine=None if profile is None else profile.hardware)
    except TwinInputError as e:   # named by where its field was set, not by every flag
        where = _set_by(e.field, args)
        if where is None or where == e.file:
            raise
        raise type(e)(e.detail, file=where, row=e.row, field=e.field) from None


def _set_by(name: str | None, args) -> str | None:
    """The flag that set setting ``name``; None when a flag did not (the file, a default, or
    not a setting: the error keeps naming the file with every flag merged over it, which a
    check between two settings may involve)."""
    if name in _SETTINGS and getattr(args, name, None) is not None:
        return "--" + name.replace("_", "-")
    return None


_SETTINGS = {f.name for f in dataclasses.fields(ServingConfig)}


def _file_settings(args) -> dict:
    """The settings ``--config`` names, by their names ({} without one)."""
    if not getattr(args, "config", None):
        return {}
    return setting_names(read_yaml_mapping(
        args.config, expected="a mapping of vLLM setting names to values"), str(args.config))


def read_limited_trace(args):
    """The ``--trace`` file, cut to its first ``--limit`` requests when that flag is given
    (the executor's commands serve a prefix of a long trace on a CPU)."""
    trace = read_trace(args.trace)
    if getattr(args, "limit", None) is not None:
        trace = trace.iloc[:max(args.limit, 0)].reset_index(drop=True)
    return trace


def add_prefix_caching_flag(p: argparse.ArgumentParser) -> None:
    """``--enable-prefix-caching`` / ``--no-enable-prefix-caching`` (vLLM's names), for the
    commands that build configurations from a base (sweep, recommend, place)."""
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None, help="vLLM's automatic prefix caching in every twin run "
                   "(default: the --base-config's value, else on, vLLM V1's default); "
                   "it matters only for a trace with hash_ids")


def with_prefix_caching(base: ServingConfig, args) -> ServingConfig:
    """``base`` with ``--[no-]enable-prefix-caching`` applied when it was given."""
    flag = getattr(args, "enable_prefix_caching", None)
    return base if flag is None else base.replace(enable_prefix_caching=bool(flag))


def ml_base(args, profile: Profile) -> ServingConfig:
    """The base configuration of sweep, recommend and place: the paper's, ``--base-config``
    over it (the model's context where the file sets no ``max_model_len``), then
    ``--[no-]enable-prefix-caching``."""
    from twin.ml.spec import base_config  # lazy: the ML stack only for the ML commands

    return with_prefix_caching(base_config(args.base_config,
                                           profile.model.max_position_embeddings,
                                           engine=profile.hardware), args)

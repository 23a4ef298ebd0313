"""The public Python API: the twin for notebooks and scripts, in five names.

``load_trace``, ``ServingConfig`` (and ``load_config``), ``load_profile``, ``simulate`` and
``recommend`` run what ``twin simulate`` and ``twin recommend`` run, on Python objects: a
trace as a DataFrame or a file, a configuration as a :class:`ServingConfig`, a dict (vLLM's
names) or a YAML file, a profile as a :class:`Profile`, a shipped name or a JSON file. They
return Python objects (a :class:`RunResult` of pandas tables and a summary dict; a
:class:`Recommendation`) and write nothing unless asked. Bad input raises
:class:`TwinInputError` naming the file, row and field, exactly as the commands report it.

This module sits at the top of the layers, beside :mod:`twin.cli` (which calls it): it
imports the layers below and nothing imports it but the CLI and ``twin/__init__`` (lazily,
so that ``import twin`` stays light; ``twin.__all__`` lists the public names). It never
imports torch.

    import twin
    trace = twin.load_trace("traces/azure_conv_1h_32lora.parquet")
    run = twin.simulate(trace, {"max_loras": 8, "max_cpu_loras": 32})
    run.summary["total_throughput"], run.requests.head()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from twin.config import ServingConfig, read_yaml_mapping, setting_names
from twin.costs.machine import warn_if_other_machine
from twin.costs.profile import Profile, load_profile
from twin.errors import TwinInputError
from twin.outputs import prepare, staged_dir
from twin.results.results import RunResult
from twin.policies import simulate_policy
from twin.workload.catalog import AdapterCatalog
from twin.workload.generate import powerlaw_trace, rate_class_trace  # noqa: F401 - re-exported
from twin.workload.sessions import session_trace  # noqa: F401 - re-exported
from twin.workload.schema import read_trace, refuse_empty_window, validate_trace

if TYPE_CHECKING:
    from twin.ml.recommender import Recommender
    from twin.ml.report import Recommendation

_PATH = (str, os.PathLike)


def _refuse(what: str, value, expected: str):
    raise TwinInputError(f"expected {expected}, got {type(value).__name__}", field=what)


def load_trace(trace: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """A validated trace (DESIGN §3: ``request_id, arrival_s, adapter, prompt_tokens,
    output_tokens``) from a DataFrame or a Parquet/CSV file, in canonical dtypes. A file
    with no requests is refused, as every command refuses it."""
    if isinstance(trace, pd.DataFrame):
        return validate_trace(trace, source="trace")
    if isinstance(trace, _PATH):
        return read_trace(trace)
    _refuse("trace", trace, "a DataFrame or the path of a .parquet/.csv trace")


def load_config(config: ServingConfig | dict | str | os.PathLike | None = None,
                model_context: int | None = None, *,
                profile: Profile | None = None) -> ServingConfig:
    """A :class:`ServingConfig` from itself, a dict of vLLM settings (``max_loras`` or
    ``max-loras``; settings the twin does not model, e.g. ``model``, are ignored as in a
    ``vllm serve --config`` file) or such a YAML file; ``None``: vLLM's defaults.
    ``model_context``: the model's context, which a dict, file or ``None`` that gives no
    ``max_model_len`` gets, as vLLM derives it (``twin simulate --profile`` does the same).
    ``profile``: the profile it will run on: its context (unless ``model_context``) and its
    engine, which engine settings the config states (tensor parallelism, FP8) must be."""
    if isinstance(config, ServingConfig):
        return config
    if profile is not None and model_context is None:
        model_context = profile.model.max_position_embeddings
    return _config_of(*_settings(config), model_context,
                      None if profile is None else profile.hardware)


def _settings(config: dict | str | os.PathLike | None) -> tuple[dict, str]:
    """The vLLM settings a dict or YAML file gives (``None``: none), by their names, and
    where they came from (what an error names)."""
    if config is None:
        d, source = {}, "config"
    elif isinstance(config, dict):
        d, source = config, "config"
    elif isinstance(config, _PATH):
        d = read_yaml_mapping(config, expected="a mapping of vLLM setting names to values")
        source = str(config)
    else:
        _refuse("config", config, "a ServingConfig, a dict of vLLM settings or a YAML path")
    return setting_names(d, source), source


def _config_of(d: dict, source: str, model_context: int | None,
               engine: dict | None = None) -> ServingConfig:
    """The config of settings ``d``; ``engine``: the hardware of the profile it runs on
    (``ServingConfig.from_dict``)."""
    if d.get("max_model_len") is None and model_context is not None:
        d = {**d, "max_model_len": model_context}
    return ServingConfig.from_dict(d, source=source, engine=engine)


def _profile(profile: Profile | str | os.PathLike | None) -> Profile:
    """A :class:`Profile` from itself, a shipped name or a JSON path (``None``: the default)."""
    if isinstance(profile, Profile):
        return profile
    if profile is None or isinstance(profile, _PATH):
        return load_profile(profile)
    _refuse("profile", profile, "a Profile, a shipped profile name or a JSON path")


def load_catalog(catalog: AdapterCatalog | pd.DataFrame | str | os.PathLike | None
                 ) -> AdapterCatalog | None:
    """An adapter catalog (columns ``adapter, rank``) from itself, a DataFrame or a
    CSV/Parquet file; ``None`` stays ``None`` (every adapter at ``max_lora_rank``)."""
    if catalog is None or isinstance(catalog, AdapterCatalog):
        return catalog
    if isinstance(catalog, pd.DataFrame):
        return AdapterCatalog(catalog)
    if isinstance(catalog, _PATH):
        return AdapterCatalog.read(catalog)
    _refuse("catalog", catalog, "an AdapterCatalog, a DataFrame or a CSV/Parquet path")


def _trace_and_source(trace) -> tuple[pd.DataFrame, str | None]:
    """The validated trace and the file it came from (None for a DataFrame)."""
    return load_trace(trace), (str(trace) if isinstance(trace, _PATH) else None)


def simulate(trace: pd.DataFrame | str | os.PathLike,
             config: ServingConfig | dict | str | os.PathLike | None = None,
             profile: Profile | str | os.PathLike | None = None, *,
             catalog: AdapterCatalog | pd.DataFrame | str | os.PathLike | None = None,
             window_s: float | None = None, record_steps: bool = False,
             progress: bool = False) -> RunResult:
    """Simulate ``trace`` served by vLLM with ``config`` on the hardware and base model of
    ``profile``: what ``twin simulate`` runs, with the same figures.

    ``window_s``: measure a fixed window as ``vllm bench serve`` with a time limit does
    (later arrivals dropped, unfinished requests reported as such); by default the run goes
    on until every request has finished. ``config.policy`` other than ``"vllm"`` (slora,
    merged, hybrid) runs that serving strategy. ``record_steps`` keeps the step log
    (``result.steps``). Returns a :class:`RunResult`: ``requests``, ``timeline`` (and
    ``steps``) DataFrames, ``summary`` (``vllm bench serve``'s metrics plus adapter loads,
    preemptions, KV usage and the starvation verdict), ``format_summary()``, ``save(dir)``.
    """
    profile = _profile(profile)
    config = load_config(config, profile=profile)
    trace, path = _trace_and_source(trace)
    source = path or "trace"
    window_s = refuse_empty_window(trace, window_s, source)
    catalog = load_catalog(catalog)
    # every serving strategy (config.policy): one vLLM server goes straight to the simulator
    warn_if_other_machine(profile)   # one stderr line: an executor profile from another box
    result = simulate_policy(trace, config, profile, catalog, window_s=window_s,
                             progress=progress, record_steps=record_steps, trace_source=source)
    if path is not None:
        result.meta["trace"] = path
    return result


def simulate_fleet(trace: pd.DataFrame | str | os.PathLike, replicas=2,
                   router: str = "round_robin", *,
                   config: ServingConfig | dict | str | os.PathLike | None = None,
                   profile: Profile | str | os.PathLike | None = None,
                   catalog: AdapterCatalog | pd.DataFrame | str | os.PathLike | None = None,
                   routing: pd.DataFrame | str | os.PathLike | None = None,
                   window_s: float | None = None, refresh_s: float = 0.0,
                   affinity_slack: int | None = None, workers: int = 1,
                   backend: str = "local", address: str | None = None,
                   progress: bool = False):
    """Simulate ``trace`` through ``router`` onto ``replicas`` (a count of ``config`` on
    ``profile``, or a list of :func:`fleet_replica`): what ``twin fleet`` runs. Returns a
    ``twin.fleet.FleetRun``: ``result`` (a RunResult whose requests carry the ``replica``
    that served each and whose summary has a ``fleet`` section), ``replicas`` (each
    replica's RunResult), ``format_summary()``, ``save(dir, plot=...)``."""
    from twin import fleet   # lazy: the fleet (and twin.ml's backends) only when asked for

    trace, path = _trace_and_source(trace)
    source = path or "trace"
    window_s = refuse_empty_window(trace, window_s, source)
    if isinstance(router, str):
        options = {"slack": affinity_slack} if (router == "adapter_affinity"
                                                and affinity_slack is not None) else {}
        router = fleet.make_router(router, table=routing, **options)
    profile = _profile(profile)
    if isinstance(replicas, (list, tuple)):   # configs (dicts, YAML paths) as replicas too
        replicas = [r if isinstance(r, fleet.Replica) else fleet_replica(r, fleet=profile)
                    for r in replicas]
    run = fleet.simulate_fleet(
        trace, replicas, router, profile=profile, config=load_config(config, profile=profile),
        catalog=load_catalog(catalog), window_s=window_s, refresh_s=refresh_s,
        workers=workers, backend=backend, address=address, progress=progress,
        trace_source=source)
    if path is not None:
        run.result.meta["trace"] = path
    return run


def fleet_replica(config: ServingConfig | dict | str | os.PathLike | None = None,
                  profile: Profile | str | os.PathLike | None = None, *,
                  fleet: Profile | None = None):
    """One replica of a fleet (``twin.fleet.Replica``): its config and profile (None: the
    fleet's, ``fleet``, else the default profile, whose model context a config without
    ``max_model_len`` gets and whose engine its engine settings are checked against). A
    dict or YAML file that lists ``lora-modules`` (the ``gpu-*/vllm_config.yaml`` twin
    place writes) serves those adapters: they are what the replica preloads, as vLLM loads
    the listed modules at start-up (``ServingConfig.lora_modules``)."""
    from twin.fleet import Replica   # lazy: as simulate_fleet

    prof = _profile(profile if profile is not None else fleet)
    return Replica(load_config(config, profile=prof), None if profile is None else prof)


def recommend(trace: pd.DataFrame | str | os.PathLike, *,
              catalog: AdapterCatalog | pd.DataFrame | str | os.PathLike | None = None,
              profile: Profile | str | os.PathLike | None = None,
              base: ServingConfig | dict | str | os.PathLike | None = None,
              objective: str = "throughput", slo: dict | None = None,
              window_s: float | None = None,
              model: Recommender | str | os.PathLike | None = None,
              max_runs: int | None = None, workers: int = 2, out: str | os.PathLike | None = None,
              plot: bool = True, model_name: str | None = None, optimizer: str = "auto",
              seed: int = 0) -> Recommendation:
    """The throughput-optimal (or goodput-optimal) non-starving vLLM configuration for
    ``trace``: what ``twin recommend`` runs, with the same figures. The recommender model
    (default: the shipped one) predicts every candidate; the best are verified by at most
    ``max_runs`` twin runs (default 4; 16 for goodput; ``workers`` in parallel).

    ``base``: the fixed settings (a ServingConfig as is; a dict over the paper's base,
    ``max_num_seqs`` 2048, ``max_num_batched_tokens`` 2048, adapters preloaded; a YAML path
    as ``--base-config`` reads it; default: the paper's base). ``slo``: ``{"ttft": ms,
    "tpot": ms}`` for ``objective="goodput"``. Returns a :class:`Recommendation`
    (``config``, ``ok``, ``candidates`` DataFrame, ``report()``, ``to_dict()``). ``out``:
    also write what the command writes there (``vllm_config.yaml``, ``vllm_args.txt``,
    ``recommendation.json`` and, with ``plot``, ``throughput_map.png``). Goodput only:
    ``optimizer`` ('auto', 'tpe', 'coordinate', 'exhaustive') and ``seed`` of the search over
    the enlarged space (:mod:`twin.ml.optimize`)."""
    # twin.ml's schemas cost ~0.15 s of start-up that simulate and `twin simulate` skip
    from twin.ml.export import write_recommendation   # lazy: twin.ml off simulate's path
    from twin.ml.recommender import Recommender   # lazy: twin.ml off simulate's path
    from twin.ml.recommend import recommend as _recommend   # lazy: as above

    with prepare(out, "recommend", inputs=_input_paths(trace, catalog, profile, base, model)):
        profile = _profile(profile)
        warn_if_other_machine(profile)   # one stderr line: an executor profile from another box
        trace, path = _trace_and_source(trace)
        catalog = load_catalog(catalog)
        if catalog is not None:   # as `twin recommend`: ranks vLLM can load at all
            catalog.check(trace, 512, path or "trace")   # an unknown adapter: the trace's row
        model = model if isinstance(model, Recommender) else Recommender.load(model)
        base = _base(base, profile)
        rec = _recommend(trace, catalog, profile=profile, model=model, base=base,
                         objective=objective, slo=slo, window_s=window_s, max_runs=max_runs,
                         workers=workers, optimizer=optimizer, seed=seed)
        if out is not None:
            with staged_dir(out, "recommend") as tmp:
                write_recommendation(tmp, rec, trace, catalog, profile=profile, model=model,
                                     base=base, model_name=model_name or profile.model.name,
                                     label=path or "a DataFrame trace", plot=plot)
    return rec


def _base(base, profile: Profile) -> ServingConfig:
    """The recommender's fixed settings (see :func:`recommend`); ``max_model_len``, unless
    given, is the model's context, as vLLM derives it (``twin.ml.spec.base_config``);
    engine settings are the profile's."""
    from twin.ml.spec import base_config   # lazy: twin.ml off simulate's path

    context, engine = profile.model.max_position_embeddings, profile.hardware
    if isinstance(base, ServingConfig):
        return base
    if base is None or isinstance(base, _PATH):
        return base_config(base, context, engine=engine)
    if isinstance(base, dict):
        given = setting_names(base, "base")
        d = base_config(None, None if "max_model_len" in given else context).to_dict()
        return ServingConfig.from_dict({**d, **given}, source="base",   # names, values checked
                                       engine=engine)
    _refuse("base", base, "a ServingConfig, a dict of vLLM settings or a YAML path")


def _input_paths(*values) -> list[Path]:
    """The files among the inputs: what ``out`` must never replace."""
    return [Path(v) for v in values if isinstance(v, _PATH) and os.path.exists(v)]

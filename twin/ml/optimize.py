"""The SLO search over the enlarged space: which optimizer runs, and Optuna's TPE.

:func:`optimize` spends what is left of the twin-run budget of a :class:`~twin.ml.trials.
Trials` after the ``max_loras`` search:

- ``exhaustive`` when every point of the space fits the budget (the exact optimum; asked
  for when it does not: refused, not run on a corner of the space);
- else ``tpe``: Optuna's TPE sampler (``TPESampler(seed=...)``, multivariate), when Optuna
  is installed (the ``search`` extra): the interpretable model is its prior (the
  configurations it predicts best are enqueued as the first trials, and the runs already
  made are told to the study), the twin its judge (every trial is a twin run, scored by
  :func:`twin.ml.trials.slo_value`); a study in SQLite (``study_db``) resumes: the runs it
  records are not made again, and count against ``max_runs``;
- else ``coordinate``: the deterministic coordinate walk
  (:func:`twin.ml.trials.coordinate_search`).

``optimizer="auto"`` picks in that order; the choice, and why, is returned (the report and
``recommendation.json`` show it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings

from twin.errors import TwinInputError
from twin.ml.search_space import KNOBS
from twin.ml.spec import digest
from twin.ml.trials import Trials, coordinate_search, exhaustive_search, slo_value

OPTIMIZERS = ("auto", "tpe", "coordinate", "exhaustive")
STUDY_NAME = "twin-recommend"


def optuna_version() -> str | None:
    """Optuna's version, or None when it is not installed (an optional dependency). From
    the package's metadata: importing optuna costs ~1-3 s, paid only when TPE runs."""
    if importlib.util.find_spec("optuna") is None:
        return None
    try:
        return importlib.metadata.version("optuna")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def exhaustive_over_budget(size: int, max_runs: int, left: int | None = None,
                           budget: int | None = None) -> TwinInputError:
    """The refusal of an exhaustive search over a space of ``size`` configurations that
    ``--max-runs`` cannot cover (``left`` not run yet of them, ``budget`` runs left; None:
    before any run, all of them and all of ``max_runs``)."""
    left, budget = (size if left is None else left), (max_runs if budget is None else budget)
    return TwinInputError(
        f"--optimizer exhaustive runs every configuration of the space: {size} ({left} not "
        f"run yet), more than the {budget} twin runs left of --max-runs {max_runs}; give "
        f"--max-runs {max_runs + left - budget} or more, or --optimizer auto (a search "
        "within the budget)", field="--optimizer")


def choose(optimizer: str, T: Trials) -> tuple[str, str]:
    """The optimizer to run and why."""
    if optimizer not in OPTIMIZERS:
        raise TwinInputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                             f"{optimizer!r}", field="--optimizer")
    left = T.space.size() - sum(1 for p, i in T.index.items()
                                if i in T.results and T.space.contains(p))
    if optimizer == "auto":
        if left <= T.budget():
            return "exhaustive", f"the space's {T.space.size()} points fit the budget"
        if optuna_version() is not None:
            return "tpe", f"space of {T.space.size()} points; optuna {optuna_version()}"
        return "coordinate", "optuna is not installed (pip install 'twin[search]')"
    if optimizer == "exhaustive" and left > T.budget():   # it would run a corner of it
        raise exhaustive_over_budget(T.space.size(), T.max_runs, left, T.budget())
    if optimizer == "tpe" and optuna_version() is None:
        raise TwinInputError("--optimizer tpe needs optuna: pip install 'twin[search]'",
                             field="--optimizer")
    return optimizer, "asked for"


def optimize(T: Trials, slo: dict, *, optimizer: str = "auto", seed: int = 0, prior=(),
             study_db: str | None = None, study_key=None, workers: int = 1) -> dict:
    """Spend ``T``'s budget with the chosen optimizer; returns what ran
    ({"optimizer", "why", "seed", "study_db"}). ``study_key``: what identifies the search
    (trace, SLOs, space, profile): a stored study resumes only the same search."""
    name, why = choose(optimizer, T)
    if name == "exhaustive":
        exhaustive_search(T)
    elif name == "tpe":
        study = f"{STUDY_NAME}-{digest(study_key)}" if study_key is not None else STUDY_NAME
        tpe_search(T, slo, seed=seed, prior=prior, study_db=study_db, batch=workers,
                   study_name=study)
    else:
        coordinate_search(T, slo)
    return {"optimizer": name, "why": why, "seed": seed if name == "tpe" else None,
            "study_db": study_db if name == "tpe" else None, "optuna": optuna_version()}


def tpe_search(T: Trials, slo: dict, *, seed: int, prior=(), study_db: str | None = None,
               batch: int = 1, study_name: str = STUDY_NAME) -> None:
    """Optuna TPE over ``T.space``'s knobs until the budget is spent: ``batch`` trials
    asked at a time and twin-run together; a point run before is told its result again
    (no run); stops after 20 asks in a row that bring no new point (a small space
    exhausted)."""
    import optuna  # lazy: optional dependency (pip install 'twin[search]')

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = T.space
    dists = {k: optuna.distributions.CategoricalDistribution(list(space.grids[k]))
             for k in space.knobs}
    with warnings.catch_warnings():   # multivariate TPE is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                             n_startup_trials=4)
    storage = f"sqlite:///{study_db}" if study_db else None
    study = optuna.create_study(direction="maximize", sampler=sampler, storage=storage,
                                study_name=study_name, load_if_exists=True)
    _resume(T, study, dists)
    told = {_key(t.params) for t in study.trials}
    for i in list(T.order):   # the runs made so far, told to the study
        params = _params(T, i, dists)
        if _key(params) not in told and all(params[k] in dists[k].choices for k in dists):
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=dists, value=slo_value(T.results[i], slo),
                user_attrs={"run": _attrs(T.results[i]), "search": str(T.cand.at[i, "search"])}))
            told.add(_key(params))
    for cfg in prior:   # the model's best predicted configurations first
        study.enqueue_trial(_params_of(space, cfg, dists), skip_if_exists=True)
    idle = 0
    while T.budget() > 0 and idle < 20:
        asked = [study.ask(dists) for _ in range(max(1, min(batch, T.budget())))]
        rows = [T.row(space.config(t.params), "tpe") for t in asked]
        new = T.run(rows)
        idle = 0 if new else idle + 1
        for t, i in zip(asked, rows):
            if i in T.results:
                t.set_user_attr("run", _attrs(T.results[i]))
                study.tell(t, slo_value(T.results[i], slo))
            else:
                study.tell(t, state=optuna.trial.TrialState.FAIL)


def _resume(T: Trials, study, dists) -> None:
    """Runs a stored study recorded (its SQLite file): into ``T`` as made, not run again."""
    for t in study.trials:
        run = t.user_attrs.get("run")
        if not run or set(t.params) != set(dists):
            continue
        i = T.row(T.space.config(t.params), str(t.user_attrs.get("search", "tpe")))
        if i not in T.results:
            T.results[i] = {**run, "resumed": True}
            T.order.append(i)


def _attrs(r: dict) -> dict:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}


def _params(T: Trials, i: int, dists) -> dict:
    return _params_of(T.space, T.cand.at[i, "_config"], dists)


def _params_of(space, cfg, dists) -> dict:
    p = dict(zip(KNOBS, space.point(cfg)))
    return {k: p[k] for k in dists}


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))

"""Sweeps: a workload family × configuration grid through the twin, in parallel, into an
append-only Parquet dataset.

Every (workload, config) point has a key: a hash of the workload spec (a trace file's
content for trace workloads), the configuration, the measured window, the profile's
content, the twin's version and the early-exit rule. Points are run in chunks (all the
configurations of one workload, so its trace is built once); each finished chunk is written
as one Parquet part file, atomically (temporary name, then rename). A killed sweep loses at
most the chunks in flight; running it again skips every key already on disk.

Backends (:mod:`twin.ml.backends`): a local process pool (default) and Ray
(``backend="ray"``, optional extra ``pip install 'twin[ray]'``), both running
:func:`run_chunk`, so their rows are equal. The store on disk is :mod:`twin.ml.store`.

Early exit: a point whose first ``probe_frac`` of the window already clearly starves is
recorded from that probe (``early_exit=True``, latencies left empty) instead of simulating
the whole window: achieved < ``threshold`` of offered, a waiting queue still growing, and
even an optimistic projection of the server's token rate (the last quarter's rate, rising
linearly at the pace it rose over the quarter before, minus a ``saturation_tol`` noise
floor) would not process ``projected_max`` of the window's offered tokens. The projection
matters: with few slots and many adapters the backlog itself raises throughput (bigger
same-adapter batches) for 10-20 minutes until it settles, so a slow start is not
starvation. Errors can only go one way -- a run that is not cut short is simulated in
full -- so early exit never makes a starving configuration look acceptable. Such runs are
most of a sweep's cost (see ``experiments/bench_sweep.py``, which checks every early-exit
verdict against the full run's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.costs.profile import Profile, load_profile
from twin.errors import ConfigError, TwinInputError
from twin.ml.backends import make_backend
from twin.ml.features import config_features, public, workload_features
from twin.ml.slo_stop import SloStop, stop_report
from twin.ml.spec import ConfigGrid, WorkloadSpec, digest, profile_digest
# read_sweep and comparable are re-exported: callers read a sweep where they run it
from twin.ml.store import SweepStore, adopt_store, comparable, read_sweep  # noqa: F401
from twin.outputs import open_store
from twin.results import crop_window
from twin.sim.engine import simulate
from twin.workload.schema import refuse_empty_window, window_runs_past


@dataclass(frozen=True)
class EarlyExit:
    """Stop a clearly starving run after a probe of the window's first ``probe_frac``."""

    enabled: bool = True
    probe_frac: float = 0.1
    min_probe_s: float = 60.0
    threshold: float = 0.75
    saturation_tol: float = 0.03
    projected_max: float = 0.8

    def probe_s(self, window_s: float | None) -> float | None:
        if not self.enabled or window_s is None:
            return None
        p = max(self.min_probe_s, self.probe_frac * window_s)
        return p if p <= 0.5 * window_s else None

    def identity(self):
        return dataclasses.asdict(self) if self.enabled else False


@dataclass(frozen=True)
class Task:
    spec: WorkloadSpec
    config: ServingConfig
    window_s: float | None
    key: str


def point_key(spec: WorkloadSpec, config: ServingConfig, window_s, profile_sha: str,
              early_exit: EarlyExit, twin_version: str | None = None,
              spec_identity: dict | None = None) -> str:
    twin_version = twin_version or __import__("twin").__version__
    return digest({"workload": spec_identity or spec.identity(),
                   "config": config.to_dict(), "window_s": window_s,
                   "profile": profile_sha, "twin": twin_version,
                   "early_exit": early_exit.identity()})


def spec_shape(spec: WorkloadSpec, built=None) -> tuple[int, int]:
    """(adapters served, largest rank) of a workload (``built``: its trace and catalog)."""
    p = spec.params
    if spec.family != "trace":
        return int(p["n_adapters"]), int(max(p["ranks"]))
    trace, catalog = built or spec.build()
    return len(catalog), int(catalog.table["rank"].max())


SPEC_WINDOW = "duration_s"   # plan()'s window by default: each workload's (spec_window)
TRACE_WINDOW_S = 3600.0      # a trace workload's by default, if it runs that long


def spec_window(spec: WorkloadSpec, window_s=SPEC_WINDOW, trace=None,
                source: str = "workloads") -> float | None:
    """The measured window of ``spec``'s points: ``window_s`` when given (None: to the last
    request), else (:data:`SPEC_WINDOW`) its ``duration_s`` (a trace workload's:
    :data:`TRACE_WINDOW_S`, or none when the trace ends sooner). One running far past the
    workload is refused (``refuse_empty_window``'s margin): its idle time would dilute the
    offered load and the rows read "keeps up". ``trace``: a trace workload's, if built."""
    if window_s is None:
        return None
    if spec.family == "trace":
        trace = spec.build()[0] if trace is None else trace
    else:   # a synthetic workload's requests arrive over [0, duration_s)
        trace = pd.DataFrame({"arrival_s": [0.0, float(spec.duration_s)]})
    last = float(trace["arrival_s"].max()) if len(trace) else 0.0
    if window_s == SPEC_WINDOW:
        fits = not window_runs_past(TRACE_WINDOW_S, last)
        return last if spec.family != "trace" else TRACE_WINDOW_S if fits else None
    try:
        return refuse_empty_window(trace, window_s, spec.describe())
    except TwinInputError as exc:
        dur = "" if spec.family == "trace" else f" (duration_s {last:g} s)"
        raise TwinInputError(f"workload {spec.describe()}{dur}: {exc.detail} (without "
                             "--window-s: each workload's own duration)", file=str(source),
                             field="--window-s") from None


def plan(workloads: Iterable[WorkloadSpec], grid: ConfigGrid | None = None, *,
         window_s: float | None | str = SPEC_WINDOW, profile=None,
         early_exit: EarlyExit = EarlyExit(), source: str = "workloads") -> list[Task]:
    """Every (workload, config) point of the grid, grouped by workload; each workload's
    window (in its keys) from :func:`spec_window` (``source``: the file, for errors)."""
    grid = grid or ConfigGrid()
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    psha = profile_digest(profile)
    shaped, tasks = [], []
    for spec in workloads:   # every window checked before any point is planned
        built = spec.build() if spec.family == "trace" else None
        shaped.append((spec, spec_window(spec, window_s, built and built[0], source),
                       spec_shape(spec, built)))
    for spec, w, (n, r) in shaped:
        ident = spec.identity()
        for cfg in grid.configs(n, r):
            tasks.append(Task(spec, cfg, w, point_key(spec, cfg, w, psha, early_exit,
                                                      spec_identity=ident)))
    return tasks


# -- running one point ------------------------------------------------------------------------

_METRICS = ("total_throughput", "offered_total_throughput", "achieved_over_offered",
            "request_throughput", "input_throughput", "output_throughput")
_LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def _flat(summary: dict, full: bool) -> dict:
    row = {k: float(summary[k]) for k in _METRICS}
    for lat in _LATENCIES:
        for stat in ("mean", "median", "p99"):
            row[f"{lat}_{stat}"] = float(summary[lat][stat]) if full else float("nan")
    row.update(completed=int(summary["completed"]), num_requests=int(summary["num_requests"]),
               preemptions=int(summary["preemptions"]),
               adapter_loads=int(summary["adapter_loads"]["from_disk"]
                                 + summary["adapter_loads"]["from_host"]),
               kv_capacity_tokens=int(summary["kv_cache"]["capacity_tokens"]),
               kv_usage_mean=float(summary["kv_cache"]["usage_mean"]),
               waiting_growth=int(summary["waiting_growth"]),
               starving=bool(summary["starving"]),
               starving_reason=str(summary["starving_reason"] or ""))
    return row


def _empty_metrics() -> dict:
    row = {k: float("nan") for k in _METRICS}
    for lat in _LATENCIES:
        for stat in ("mean", "median", "p99"):
            row[f"{lat}_{stat}"] = float("nan")
    row.update(completed=0, num_requests=0, preemptions=0, adapter_loads=0,
               kv_capacity_tokens=0, kv_usage_mean=float("nan"), waiting_growth=0,
               starving=True, starving_reason="config_error")
    return row


def simulate_point(trace: pd.DataFrame, catalog, config: ServingConfig, profile,
                   window_s: float | None, early_exit: EarlyExit = EarlyExit(),
                   slo: dict | None = None):
    """Run one point: the probe first where early exit applies, the full window unless the
    probe clearly starves. Returns (summary, full_run: bool, simulated_s, RunResult|None);
    raises ConfigError for a configuration vLLM would not start. ``slo`` ({'ttft': ms,
    'tpot': ms} on the p99s): the window's run stops once it is proven to miss one
    (:class:`twin.ml.slo_stop.SloStop`; ``full`` False, the RunResult's
    ``meta["slo_stop"]`` says what was proven and when)."""
    probe = early_exit.probe_s(window_s)
    if probe is not None:
        arr = trace["arrival_s"].to_numpy()
        head = trace.iloc[:int(np.searchsorted(arr, probe, side="right"))]
        if len(head) > 0:
            res = simulate(head, config, profile, catalog, window_s=probe)
            s = res.summary
            queue_grows = s["waiting_growth"] > max(50, 0.02 * s["num_requests"])
            if (s["achieved_over_offered"] < early_exit.threshold and queue_grows
                    and _projected_achieved(res.timeline, probe, window_s,
                                            s["offered_total_throughput"], early_exit)
                    < early_exit.projected_max):
                return s, False, probe, res
    rule = None
    if slo:   # the rows the engine's outcomes index: the window's
        w = crop_window(trace, window_s)
        rule = SloStop(slo, w["arrival_s"].to_numpy(), w["output_tokens"].to_numpy(),
                       every_s=min(SloStop.EVERY_S, (window_s or np.inf) / 100))
    res = simulate(trace, config, profile, catalog, window_s=window_s, stop=rule)
    if rule is not None and rule.stopped_s is not None:
        res.meta["slo_stop"] = {"stopped_s": rule.stopped_s, "proven": rule.proven,
                                "lower_bounds": rule.lower_bounds, "line": stop_report(rule),
                                "violation_lower_bound": rule.violation_lower_bound()}
        return res.summary, False, rule.stopped_s, res
    dur = window_s if window_s is not None else res.summary["duration_s"]
    return res.summary, True, dur, res


def _projected_achieved(timeline: pd.DataFrame, probe_s: float, window_s: float,
                        offered_tps: float, ee: EarlyExit) -> float:
    """Share of the window's offered tokens the server would process if its token rate,
    from the probe's last quarter on, kept rising linearly at the pace it rose over the
    quarter before (less a ``saturation_tol`` noise floor), capped at twice the offered
    rate. Optimistic on purpose: a saturated server's rate is flat; a server whose backlog
    is still raising its throughput is projected to catch up and is simulated in full."""
    t = timeline["time_s"].to_numpy(dtype=np.float64)
    tok = timeline["tokens"].to_numpy(dtype=np.float64)
    if len(t) < 4 or offered_tps <= 0:
        return 1.0
    a, b, c = (np.interp(x * probe_s, t, tok) for x in (0.5, 0.75, 1.0))
    q = 0.25 * probe_s
    r_prev, r_last = (b - a) / q, (c - b) / q
    slope = max(0.0, r_last - (1 + ee.saturation_tol) * r_prev) / q
    rest = np.linspace(0.0, window_s - probe_s, 257)
    rate = np.minimum(r_last + slope * rest, 2.0 * offered_tps)
    processed = c + float(np.sum(0.5 * (rate[1:] + rate[:-1]) * np.diff(rest)))
    return processed / (offered_tps * window_s)


def _row(spec: WorkloadSpec, wf: dict, config: ServingConfig, window_s, key: str, profile,
         psha: str, early_exit: EarlyExit, trace, catalog) -> dict:
    t0 = time.perf_counter()
    kv = profile.memory.kv_tokens(config)
    try:
        summary, full, sim_s, _ = simulate_point(trace, catalog, config, profile, window_s,
                                                 early_exit)
        metrics, starts = _flat(summary, full), True
    except ConfigError:
        metrics, starts, full, sim_s = _empty_metrics(), False, True, 0.0
    row = {"key": key, "workload_key": spec.key, "family_key": spec.family_key,
           "family": spec.family, "workload": json.dumps(spec.to_dict(), sort_keys=True),
           "window_s": float(window_s) if window_s is not None else float("nan"),
           "profile": profile.name, "profile_sha": psha,
           "twin_version": __import__("twin").__version__,
           "max_loras": int(config.max_loras), "max_cpu_loras": int(config.max_cpu_loras),
           "max_lora_rank": int(config.max_lora_rank), "max_num_seqs": int(config.max_num_seqs),
           "max_num_batched_tokens": int(config.max_num_batched_tokens),
           "config": json.dumps(config.to_dict(), sort_keys=True),
           "starts": starts, "early_exit": not full, "simulated_s": float(sim_s)}
    row.update(metrics)
    row.update({f"f_{k}": float(v) for k, v in public(wf).items()})
    row.update({f"c_{k}": v for k, v in config_features(wf, config.max_loras,
                                                         config.max_lora_rank, kv).items()})
    row["wall_s"] = time.perf_counter() - t0
    row["worker"] = os.getpid()
    return row


_PROFILE_CACHE: dict = {}


def _profile_from(d: dict):
    k = digest(d)
    if k not in _PROFILE_CACHE:
        _PROFILE_CACHE.clear()
        _PROFILE_CACHE[k] = Profile.from_dict(d)
    return _PROFILE_CACHE[k]


def run_chunk(payload: dict) -> list[dict]:
    """Run the points of one chunk (picklable payload; the unit of work of every backend)."""
    profile = _profile_from(payload["profile"])
    psha = payload["profile_sha"]
    ee = EarlyExit(**payload["early_exit"])
    rows, built = [], {}
    for item in payload["points"]:
        spec = WorkloadSpec.from_dict(item["spec"])
        config = ServingConfig.from_dict(item["config"])
        window_s = item["window_s"]
        bkey = (spec.key, window_s)
        if bkey not in built:
            built.clear()
            trace, catalog = spec.build()
            trace = crop_window(trace, window_s)
            dur = window_s if window_s is not None else (
                spec.duration_s or (float(trace["arrival_s"].max()) if len(trace) else 1.0))
            built[bkey] = (trace, catalog, workload_features(trace, catalog, dur))
        trace, catalog, wf = built[bkey]
        rows.append(_row(spec, wf, config, window_s, item["key"], profile, psha, ee, trace,
                         catalog))
    return rows


# -- the sweep ---------------------------------------------------------------------------------

@dataclass
class SweepReport:
    total: int
    skipped: int
    ran: int = 0
    chunks: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    path: str = ""
    rows: list = field(default_factory=list, repr=False)

    def line(self) -> str:
        return (f"{self.total} points: {self.skipped} already done, {self.ran} run in "
                f"{self.chunks} chunk(s), {self.wall_s:.1f} s wall, {self.cpu_s:.1f} s of "
                f"simulation -> {self.path}")


def _chunks(tasks: list[Task], max_points: int) -> list[list[Task]]:
    """Consecutive tasks of one workload, at most ``max_points`` per chunk."""
    out, cur = [], []
    for t in tasks:
        if cur and (t.spec.key != cur[-1].spec.key or t.window_s != cur[-1].window_s
                    or len(cur) >= max_points):
            out.append(cur)
            cur = []
        cur.append(t)
    if cur:
        out.append(cur)
    return out


def run_sweep(tasks: Sequence[Task], out: str | Path, **kw) -> SweepReport:
    """Run the points of ``tasks`` not yet in the dataset at ``out`` (see
    :func:`_run_sweep`), the store checked and locked through :mod:`twin.outputs`: an
    existing ``out`` must be a sweep store (it resumes) or an empty directory."""
    adopt_store(out)
    with open_store(out, "sweep"):
        return _run_sweep(tasks, out, **kw)


def _run_sweep(tasks: Sequence[Task], out: str | Path, *, profile=None,
              backend: str = "local", workers: int | None = None, address: str | None = None,
              early_exit: EarlyExit = EarlyExit(), chunk_points: int = 16,
              progress: bool = True, on_chunk: Callable[[list], None] | None = None,
              keep_rows: bool = False, window=None) -> SweepReport:
    """Run the points of ``tasks`` not yet in the dataset at ``out``; write one part file
    per finished chunk. ``tasks`` come from :func:`plan` with the same profile and early
    exit rule. ``on_chunk(rows)`` is called after each part is written. ``window``: the
    rule ``plan`` was given, checked against the store's as its profile is (None: not)."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    store = SweepStore(out)
    store.path.mkdir(parents=True, exist_ok=True)
    _store_meta(store.path / "sweep.json", profile, early_exit, window)
    store.clean_temp()
    done = store.done_keys()
    seen, todo = set(), []
    for t in tasks:
        if t.key not in done and t.key not in seen:
            seen.add(t.key)
            todo.append(t)
    report = SweepReport(total=len({t.key for t in tasks}), skipped=len({t.key for t in tasks}
                                                                       & done),
                         path=str(store.path))
    if not todo:
        return report
    pdict = profile.to_dict()
    psha = profile_digest(profile)
    payloads = [{"profile": pdict, "profile_sha": psha,
                 "early_exit": dataclasses.asdict(early_exit),
                 "points": [{"spec": t.spec.to_dict(), "config": t.config.to_dict(),
                             "window_s": t.window_s, "key": t.key} for t in chunk]}
                for chunk in _chunks(todo, chunk_points)]
    bar = None
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm only with a progress bar

        bar = tqdm(total=len(todo), unit="run", desc="sweep", smoothing=0.05)
    t0 = time.perf_counter()
    be = make_backend(backend, workers=workers, address=address)
    try:
        for rows in be.map_unordered(run_chunk, payloads):
            store.write_part(rows)
            report.ran += len(rows)
            report.chunks += 1
            report.cpu_s += sum(r["wall_s"] for r in rows)
            if keep_rows:
                report.rows.extend(rows)
            if bar is not None:
                bar.update(len(rows))
            if on_chunk is not None:
                on_chunk(rows)
    finally:
        if bar is not None:
            bar.close()
        report.wall_s = time.perf_counter() - t0
    return report


def _settings(m: dict) -> dict:
    """What a store's rows were run with, as its error names them."""
    ee = m.get("early_exit")
    return {"--profile": f"{m.get('profile')} (sha {m.get('profile_sha')})",
            "early exit": "off" if ee is False else "on" if ee == EarlyExit().identity()
            else json.dumps(ee),
            "--window-s": None if m.get("window_s") is None else "each workload's duration_s"
            if m["window_s"] == SPEC_WINDOW else f"{float(m['window_s']):g} s"}


def _store_meta(meta: Path, profile, early_exit: EarlyExit, window) -> None:
    """Write the store's ``sweep.json`` (what its rows were run with), or check a re-run
    against it: another profile, early-exit rule or window would append rows that are
    not comparable with those there (and leave ``sweep.json`` stale): refused."""
    now = {"profile": profile.name, "profile_sha": profile_digest(profile),
           "twin_version": __import__("twin").__version__,
           "early_exit": json.loads(json.dumps(early_exit.identity())), "window_s": window}
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            raise TwinInputError(f"unreadable sweep metadata ({exc}); use a new --out",
                                 file=str(meta)) from None
        was = _settings({**now, **{k: v for k, v in old.items() if v is not None}})
        now_s = _settings(now)
        diff = [k for k in was if now_s[k] is not None and was[k] != now_s[k]]
        if diff:
            raise TwinInputError(
                f"this store was swept with {'; '.join(f'{k} {was[k]}' for k in diff)}, this "
                f"run has {'; '.join(f'{k} {now_s[k]}' for k in diff)}: its rows would not "
                "be comparable with those stored; use a new --out", file=str(meta),
                field=diff[0])
        if window is None or old.get("window_s") is not None:
            return
        now = {**old, "window_s": window}   # a store from before windows were recorded
    tmp = meta.with_name(".sweep.json.tmp")
    tmp.write_text(json.dumps(now, indent=2) + "\n")
    os.replace(tmp, meta)

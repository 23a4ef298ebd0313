"""Validate the twin against the reference executor on the same trace and configuration.

``validate`` serves a trace for real (``twin.executor.execute``) and simulates it with a
calibrated profile (``twin.sim.simulate``), then compares the two in ``vllm bench serve``
terms: throughput, TTFT / TPOT / ITL / E2E mean and p99, adapter loads, preemptions, each
with its SMAPE = 2|a - b| / (|a| + |b|).

Both sides get the same KV capacity: the profile's memory model for the config (on CPU a
device-memory *budget*, see ``twin.calibrate.executor``), capped at what the trace
can ever use (the executor would otherwise zero gigabytes of unused cache), or exactly
``num_gpu_blocks`` when given (vLLM's ``--num-gpu-blocks-override``, e.g. to force
preemptions). ``max_model_len`` is capped at the model's context as vLLM derives it.

The speed anchor (:mod:`twin.validate.anchor`, opt-in: ``speed_anchor=True``): the anchor benchmark
runs before and after every executor run, and the twin compared is priced at the box's
speed during the runs (step times x anchor now / anchor at calibration); the raw twin,
priced as calibrated, is reported beside it (``twin_raw`` / ``smape_raw``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from twin.costs.machine import warn_if_other_machine
from twin.costs.profile import Profile, load_profile
from twin.errors import TwinInputError
from twin.executor.device import torch_device
from twin.executor.gc_heap import frozen_heap
from twin.outputs import check_out, json_document, staged_dir
from twin.results import crop_window
from twin.results.plot import plot_timeline
from twin.policies import simulate_policy
from twin.policies.deployment import scaled_profile
from twin.servers import kv_capacity_tokens
from twin.sim.replay import exact_kv_memory
from twin.validate.anchor import SpeedAnchor
from twin.validate.compare import compare, format_table, median_summary, run_spread
from twin.workload.catalog import AdapterCatalog
from twin.workload.schema import validate_trace

__all__ = ["Validation", "usable_blocks", "validate"]


@dataclass
class Validation:
    table: pd.DataFrame
    executor: object          # RunResult (the first run)
    twin: object              # RunResult (anchored: priced at the box's speed during the runs)
    num_blocks: int
    config: object            # the effective ServingConfig
    plot: Path | None = None
    executor_summaries: list = dataclasses.field(default_factory=list)   # every run's
    twin_raw: object = None   # RunResult priced as calibrated (== twin when not anchored)
    anchor: SpeedAnchor = dataclasses.field(default_factory=SpeedAnchor)
    profile: object = None    # the profile the twin was last simulated with

    _twin_inputs: dict = dataclasses.field(default_factory=dict, repr=False)

    def resimulate(self, profile) -> None:
        """Simulate the twin again with another profile of the same hardware (e.g. refitted
        on calibration rounds interleaved with the executor's runs) and compare anew. The
        KV capacity stays the one both sides were given."""
        if not isinstance(profile, Profile):
            profile = load_profile(profile)
        k = self._twin_inputs
        tprof = capacity_profile(profile, self.num_blocks, self.config)
        self.profile = profile

        def sim(p):
            return simulate_policy(k["trace"], self.config, p, k["catalog"],
                                   window_s=k["window_s"], trace_source=k["trace_source"])

        self.twin_raw = sim(tprof)
        ratio = self.anchor.ratio(profile)
        self.twin = self.twin_raw if ratio is None else sim(scaled_profile(tprof, ratio))
        self._compare()

    def _compare(self) -> None:
        raw = self.twin_raw.summary if self.twin_raw is not self.twin else None
        self.table = compare(median_summary(self.executor_summaries), self.twin.summary,
                             raw=raw)

    def serve_again(self, model, *, seed: int = 0) -> object:
        """Serve the trace once more on the executor (``model``: the loaded LlamaModel),
        with the same adapters, config and KV capacity as the first run, and compare the
        twin to the median of all runs. Returns the new run's result (its step log)."""
        from twin.executor.engine import execute   # lazy: needs torch

        k = self._twin_inputs
        r = anchored_run(self.anchor, lambda: execute(
            k["trace"], self.config, model, k.get("executor_catalog"),
            num_gpu_blocks=self.num_blocks, window_s=k["window_s"], seed=seed,
            trace_source=k["trace_source"]))
        if self.anchor.on and self.profile is not None:   # new samples move the ratio
            self.executor_summaries = list(self.executor_summaries) + [r.summary]
            self.resimulate(self.profile)
        else:
            self.recompare([r.summary])
        return r

    def recompare(self, more: list[dict]) -> None:
        """Add further executor runs' summaries and compare the twin to the median run."""
        self.executor_summaries = list(self.executor_summaries) + list(more)
        self._compare()

    @property
    def spread(self) -> dict:
        return run_spread(self.executor_summaries)

    def smape(self, key: str) -> float:
        """The (anchored) twin's SMAPE against the median executor run."""
        return float(self.table.set_index("key").loc[key, "smape"])

    def smape_raw(self, key: str) -> float:
        """The raw twin's (priced as calibrated, no anchor) SMAPE."""
        return float(self.table.set_index("key").loc[key, "smape_raw"])

    @property
    def anchor_info(self) -> dict:
        """The speed anchor: whether it was applied, its ratio, samples and why."""
        return self.anchor.info(self.profile) if self.profile is not None else {}

    def save(self, out, *, profile: str = "", threads=None, plot: bool = True) -> None:
        """Both runs, ``table.csv``, ``validation.json`` and the overlay plot under ``out``,
        written through :mod:`twin.outputs` (staged, then renamed; kind ``validate``)."""
        with staged_dir(out, "validate") as tmp:
            self.executor.write_into(tmp / "executor")
            self.twin.write_into(tmp / "twin")
            if self.twin_raw is not self.twin:
                self.twin_raw.write_into(tmp / "twin_raw")
            self.table.drop(columns="fmt").to_csv(tmp / "table.csv", index=False)
            (tmp / "validation.json").write_text(json_document(
                dict(self.to_dict(), profile=profile, threads=threads), indent=2) + "\n")
            if plot:
                plot_timeline(self.executor, tmp / "timeline_overlay.png", other=self.twin,
                              labels=("executor", "twin"))
                self.plot = Path(out) / "timeline_overlay.png"

    def format(self, title: str = "") -> str:
        return format_table(self.table, title, raw=self.twin_raw is not self.twin)

    def to_dict(self) -> dict:
        d = {"num_gpu_blocks": self.num_blocks, "config": self.config.to_dict(),
             "executor_runs": len(self.executor_summaries), "speed_anchor": self.anchor_info,
             "table": self.table.drop(columns="fmt").to_dict(orient="records")}
        if len(self.executor_summaries) > 1:
            d["executor_spread"] = self.spread
        return d


def usable_blocks(trace: pd.DataFrame, block_size: int, max_model_len: int) -> int:
    """Blocks the trace could ever hold at once (every request at full length), as the
    executor's own cap."""
    total = np.minimum(trace["prompt_tokens"].to_numpy(np.int64)
                       + trace["output_tokens"].to_numpy(np.int64), max_model_len)
    return max(int((-(-total // block_size)).sum()) + 1, -(-max_model_len // block_size))


_SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab")


def _check_profile_model(profile, m, model) -> None:
    """The profile must describe the model the executor serves: the twin prices steps,
    KV blocks and adapter bytes from the profile's shape, so an 8B/H100 profile compared
    with ``--model tiny`` yields a table of large "errors" that measure nothing."""
    diff = [f"{f} {getattr(profile.model, f)} vs {getattr(m.shape, f)}" for f in _SHAPE_FIELDS
            if getattr(profile.model, f) != getattr(m.shape, f)]
    if diff:
        raise TwinInputError(
            f"profile {profile.name!r} describes {profile.model.name} but --model "
            f"{model if isinstance(model, str) else 'given'} has another shape "
            f"({', '.join(diff)}); validate with a profile calibrated on this model "
            f"(twin calibrate --executor --model ...)", field="--profile")


def validate(trace: pd.DataFrame, config, profile, model="tiny", adapters=None, *,
             out: str | Path | None = None, threads: int | None = None,
             num_gpu_blocks: int | None = None, device: str = "cpu",
             window_s: float | None = None, progress: bool = False, seed: int = 0,
             warmup: bool = True, adapter_ranks=(8, 16), trace_source: str = "trace",
             plot: bool = True, repeats: int = 1,
             speed_anchor: bool = False) -> Validation:
    """Run ``trace`` with ``config`` on the executor and on the twin (``profile``) and
    compare them. ``model``: tiny / smollm2 / an HF directory / a loaded LlamaModel.
    ``repeats``: executor runs; the twin is compared to their per-metric median (a shared
    machine's speed drifts by +-10% over seconds) and their spread is reported.
    ``adapters``: a PEFT directory or catalog; None writes synthetic adapters (ranks
    ``adapter_ranks``, cycled) named after the trace's adapters. ``threads`` defaults to
    the profile's calibration threads; the model runs in the dtype the profile was
    calibrated in on the executor (bf16 steps cost differently from fp32).
    ``speed_anchor``: price the twin at the box's speed during the runs (module docstring;
    off by default); the raw twin is reported beside it either way."""
    if out is not None:   # a bad destination fails now, not after the executor's run
        check_out(out, "validate")
    if config.policy not in ("vllm", "slora"):
        raise TwinInputError(f"twin validate compares the vllm and slora policies (the "
                             f"memory layouts the executor implements), not {config.policy!r}",
                             file="config", field="policy")
    torch_device(device)   # a CUDA request on a CPU-only torch: an input error, now
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    warn_if_other_machine(profile)   # one stderr line: the profile describes another box
    trace = validate_trace(trace, source=trace_source)
    trace = crop_window(trace, window_s)
    with pinned_threads(profile, threads) as threads:
        m, model_dir = _executor_model(model, profile, device)
        _check_profile_model(profile, m, model)
        config = capped_context(config, m)
        catalog, twin_catalog = _catalogs(trace, config, adapters, model_dir,
                                          adapter_ranks=adapter_ranks, seed=seed)
        nb = _kv_blocks(trace, config, profile, m, twin_catalog, num_gpu_blocks)
        anchor = SpeedAnchor.for_profile(profile, m, model_dir, enabled=speed_anchor,
                                         threads=threads)
        ex, summaries = _serve(trace, config, m, catalog, nb, window_s=window_s,
                               progress=progress, seed=seed, trace_source=trace_source,
                               warmup=warmup, repeats=repeats, anchor=anchor)
    v = Validation(None, ex, None, nb, config, executor_summaries=summaries, anchor=anchor,
                   _twin_inputs={"trace": trace, "catalog": twin_catalog, "window_s": window_s,
                                 "trace_source": trace_source, "executor_catalog": catalog})
    v.resimulate(profile)   # the twin, on the same KV capacity
    if out is not None:
        v.save(out, profile=profile.name, threads=threads, plot=plot)
    return v


@contextlib.contextmanager
def pinned_threads(profile: Profile, threads: int | None):
    """torch's threads for the executor's runs, restored after; default: the profile's
    calibration threads (yields the count used, None: torch's own)."""
    import torch   # lazy: torch is an optional dependency, off `import twin`'s path

    if threads is None:
        threads = profile.provenance.get("threads") or profile.hardware.get("threads")
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield threads
    finally:
        torch.set_num_threads(old)


def capped_context(config, m):
    """The config as vLLM would run it on model ``m``: context capped at the model's."""
    return config.replace(max_model_len=min(config.max_model_len,
                                            m.shape.max_position_embeddings))


def _executor_model(model, profile: Profile, device: str):
    """(the executor's model, its directory or None): ``model`` itself when loaded, else
    loaded in the dtype the profile was calibrated in on the executor (fp32 otherwise)."""
    import torch   # lazy: torch is an optional dependency, off `import twin`'s path

    from twin.executor.model import LlamaModel   # lazy: needs torch
    from twin.executor.weights import resolve_model   # lazy: needs torch

    if isinstance(model, LlamaModel):
        return model, None
    prov = profile.provenance
    dtype = (prov.get("dtype", "float32") if str(prov.get("method", "")).startswith(
        "twin calibrate --executor") else "float32")
    model_dir = resolve_model(str(model))
    return LlamaModel.from_pretrained(model_dir, device=torch.device(device),
                                      dtype=getattr(torch, dtype)), model_dir


def _catalogs(trace: pd.DataFrame, config, adapters, model_dir, *, adapter_ranks, seed: int):
    """(the executor's adapter catalog, the twin's: adapter and rank), None without LoRA;
    without ``adapters``, synthetic ones named after the trace's are written (cached)."""
    from twin.executor.adapters import make_cached_adapters   # lazy: needs torch
    from twin.executor.inputs import resolve_catalog   # lazy: needs torch

    names = trace["adapter"].dropna().unique().tolist()
    if adapters is None and names and config.enable_lora:
        if model_dir is None:
            raise ValueError("pass adapters= with a loaded LlamaModel")
        adapters = make_cached_adapters(model_dir, len(names), adapter_ranks, names=names,
                                        seed=seed, prefix="validate-adapters")
    catalog = resolve_catalog(adapters, trace) if config.enable_lora else None
    twin_catalog = (AdapterCatalog(catalog.table[["adapter", "rank"]], source=catalog.source)
                    if catalog is not None and len(catalog) else None)
    return catalog, twin_catalog


def _kv_blocks(trace: pd.DataFrame, config, profile: Profile, m, twin_catalog,
               num_gpu_blocks: int | None) -> int:
    """One KV capacity for both sides, in blocks (see the module docstring)."""
    if num_gpu_blocks is not None:
        return int(num_gpu_blocks)
    B = config.block_size
    nb = kv_capacity_tokens(config, profile) // B
    nb = min(nb, usable_blocks(trace, B, config.max_model_len))
    if config.policy == "slora" and twin_catalog is not None:
        # the unified pool also holds the adapters' pages (exact rank)
        from twin.executor.slora import adapter_pages_for   # lazy: needs torch

        nb += sum(adapter_pages_for(m, config, twin_catalog.table["rank"]))
    return nb


def capacity_profile(profile: Profile, num_blocks: int, config) -> Profile:
    """``profile`` whose memory model yields exactly ``num_blocks`` KV blocks for
    ``config``: the twin gets the capacity the executor was given."""
    return dataclasses.replace(profile, memory=exact_kv_memory(
        num_blocks, config.block_size, config.gpu_memory_utilization,
        kv_bytes_per_token=profile.memory.kv_bytes_per_token))


def warm_up(trace: pd.DataFrame, config, m, catalog, nb: int, seed: int) -> None:
    """A short executor run of the trace's first requests at once (the first forwards of
    a process are slow): not measured."""
    from twin.executor.engine import execute   # lazy: needs torch

    if not len(trace):
        return
    w = trace.iloc[:min(4, len(trace))].assign(arrival_s=0.0)
    # shortened outputs: its hash ids (prompt + output) would name too many tokens
    w = w.assign(output_tokens=np.minimum(w["output_tokens"], 4)).drop(
        columns="hash_ids", errors="ignore")
    execute(w, config, m, catalog, num_gpu_blocks=nb, seed=seed)


def anchored_run(anchor: SpeedAnchor, run):
    """``run()`` (an executor run) between two speed-anchor samples, which its result's
    ``meta["speed_anchor_s"]`` logs (``before``, ``after``; None when the anchor is off)."""
    before = anchor.sample()
    r = run()
    r.meta["speed_anchor_s"] = {"before": before, "after": anchor.sample()}
    return r


def _serve(trace: pd.DataFrame, config, m, catalog, nb: int, *, window_s, progress: bool,
           seed: int, trace_source: str, warmup: bool, repeats: int, anchor: SpeedAnchor):
    """The executor's runs of the trace: (the first run's result, every run's summary),
    after a short warm-up (the first forwards of a process are slow), each run between
    two speed-anchor samples."""
    from twin.executor.engine import execute   # lazy: needs torch

    first, summaries = None, []
    with frozen_heap():   # one collection for the warm-up and every run (gc_heap)
        if warmup:
            warm_up(trace, config, m, catalog, nb, seed)
        for i in range(max(int(repeats), 1)):   # only the first run's step log is kept
            r = anchored_run(anchor, lambda: execute(
                trace, config, m, catalog, num_gpu_blocks=nb, window_s=window_s,
                progress=progress and i == 0, seed=seed, trace_source=trace_source))
            first = r if first is None else first
            summaries.append(r.summary)
    return first, summaries

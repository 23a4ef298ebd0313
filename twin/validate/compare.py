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
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from twin.results import crop_window, smape   # smape re-exported for callers

# (label, summary path, format)
METRICS = (
    ("total throughput (tok/s)", ("total_throughput",), "{:.1f}"),
    ("output throughput (tok/s)", ("output_throughput",), "{:.1f}"),
    ("request throughput (req/s)", ("request_throughput",), "{:.3f}"),
    ("completed requests", ("completed",), "{:.0f}"),
    ("TTFT mean (ms)", ("ttft_ms", "mean"), "{:.1f}"),
    ("TTFT p99 (ms)", ("ttft_ms", "p99"), "{:.1f}"),
    ("TPOT mean (ms)", ("tpot_ms", "mean"), "{:.2f}"),
    ("TPOT p99 (ms)", ("tpot_ms", "p99"), "{:.2f}"),
    ("ITL mean (ms)", ("itl_ms", "mean"), "{:.2f}"),
    ("ITL p99 (ms)", ("itl_ms", "p99"), "{:.2f}"),
    ("E2E mean (ms)", ("e2e_ms", "mean"), "{:.1f}"),
    ("E2E p99 (ms)", ("e2e_ms", "p99"), "{:.1f}"),
    ("adapter loads from disk", ("adapter_loads", "from_disk"), "{:.0f}"),
    ("adapter loads from host", ("adapter_loads", "from_host"), "{:.0f}"),
    ("adapter load time (s)", ("adapter_loads", "time_s"), "{:.3f}"),
    ("preemptions", ("preemptions",), "{:.0f}"),
    ("duration (s)", ("duration_s",), "{:.2f}"),
)
# short keys for JSON / the experiment table
KEYS = {
    "total throughput (tok/s)": "throughput", "TTFT mean (ms)": "ttft_mean",
    "TTFT p99 (ms)": "ttft_p99", "TPOT mean (ms)": "tpot_mean", "TPOT p99 (ms)": "tpot_p99",
    "ITL mean (ms)": "itl_mean", "ITL p99 (ms)": "itl_p99", "E2E mean (ms)": "e2e_mean",
    "E2E p99 (ms)": "e2e_p99", "adapter loads from disk": "loads_disk",
    "adapter loads from host": "loads_host", "preemptions": "preemptions",
}


def _get(summary: dict, path):
    v = summary
    for k in path:
        v = v[k]
    return float(v)


def compare(executor: dict, twin: dict) -> pd.DataFrame:
    """Side-by-side table of two summaries (``RunResult.summary``) with SMAPE per metric."""
    rows = []
    for label, path, fmt in METRICS:
        a, b = _get(executor, path), _get(twin, path)
        rows.append({"metric": label, "key": KEYS.get(label, label), "executor": a, "twin": b,
                     "smape": smape(a, b), "fmt": fmt})
    return pd.DataFrame(rows)


def median_summary(summaries: list[dict]) -> dict:
    """Per metric (``METRICS``) the median over several runs' summaries, in the same nested
    form, so ``compare`` can set the twin against the executor's typical run."""
    if len(summaries) == 1:
        return summaries[0]
    out: dict = {}
    for _, path, _ in METRICS:
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = float(np.median([_get(s, path) for s in summaries]))
    return out


def run_spread(summaries: list[dict]) -> dict:
    """The executor's own noise: per metric key, the median pairwise SMAPE between runs."""
    import itertools

    out = {}
    for label, path, _ in METRICS:
        vals = [_get(s, path) for s in summaries]
        pairs = [smape(a, b) for a, b in itertools.combinations(vals, 2)]
        out[KEYS.get(label, label)] = float(np.median(pairs)) if pairs else float("nan")
    return out


def format_table(table: pd.DataFrame, title: str = "") -> str:
    w = (30, 12, 12, 8)
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'metric':<{w[0]}}{'executor':>{w[1]}}{'twin':>{w[2]}}{'SMAPE':>{w[3]}}")
    lines.append("-" * sum(w))
    for r in table.itertuples():
        s = "" if np.isnan(r.smape) else f"{100 * r.smape:.1f}%"
        lines.append(f"{r.metric:<{w[0]}}{r.fmt.format(r.executor):>{w[1]}}"
                     f"{r.fmt.format(r.twin):>{w[2]}}{s:>{w[3]}}")
    return "\n".join(lines)


@dataclass
class Validation:
    table: pd.DataFrame
    executor: object          # RunResult (the first run)
    twin: object              # RunResult
    num_blocks: int
    config: object            # the effective ServingConfig
    plot: Path | None = None
    executor_summaries: list = dataclasses.field(default_factory=list)   # every run's

    _twin_inputs: dict = dataclasses.field(default_factory=dict, repr=False)

    def resimulate(self, profile) -> None:
        """Simulate the twin again with another profile of the same hardware (e.g. refitted
        on calibration rounds interleaved with the executor's runs) and compare anew. The
        KV capacity stays the one both sides were given."""
        from twin.costs.profile import Profile, load_profile
        from twin.policies import simulate_policy
        from twin.sim.replay import exact_kv_memory

        if not isinstance(profile, Profile):
            profile = load_profile(profile)
        k = self._twin_inputs
        tprof = dataclasses.replace(profile, memory=exact_kv_memory(
            self.num_blocks, self.config.block_size, self.config.gpu_memory_utilization,
            kv_bytes_per_token=profile.memory.kv_bytes_per_token))
        self.twin = simulate_policy(k["trace"], self.config, tprof, k["catalog"],
                                    window_s=k["window_s"], trace_source=k["trace_source"])
        self.table = compare(median_summary(self.executor_summaries), self.twin.summary)

    def recompare(self, more: list[dict]) -> None:
        """Add further executor runs' summaries and compare the twin to the median run."""
        self.executor_summaries = list(self.executor_summaries) + list(more)
        self.table = compare(median_summary(self.executor_summaries), self.twin.summary)

    @property
    def spread(self) -> dict:
        return run_spread(self.executor_summaries)

    def smape(self, key: str) -> float:
        return float(self.table.set_index("key").loc[key, "smape"])

    def save(self, out, *, profile: str = "", threads=None, plot: bool = True) -> None:
        """Both runs, ``table.csv``, ``validation.json`` and the overlay plot under ``out``,
        written through :mod:`twin.outputs` (staged, then renamed; kind ``validate``)."""
        from twin.outputs import staged_dir

        with staged_dir(out, "validate") as tmp:
            self.executor.write_into(tmp / "executor")
            self.twin.write_into(tmp / "twin")
            self.table.drop(columns="fmt").to_csv(tmp / "table.csv", index=False)
            (tmp / "validation.json").write_text(json.dumps(
                dict(self.to_dict(), profile=profile, threads=threads), indent=2) + "\n")
            if plot:
                from twin.results.plot import plot_timeline

                plot_timeline(self.executor, tmp / "timeline_overlay.png", other=self.twin,
                              labels=("executor", "twin"))
                self.plot = Path(out) / "timeline_overlay.png"

    def format(self, title: str = "") -> str:
        return format_table(self.table, title)

    def to_dict(self) -> dict:
        d = {"num_gpu_blocks": self.num_blocks, "config": self.config.to_dict(),
             "executor_runs": len(self.executor_summaries),
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
    from twin.errors import TwinInputError

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
             plot: bool = True, repeats: int = 1) -> Validation:
    """Run ``trace`` with ``config`` on the executor and on the twin (``profile``) and
    compare them. ``model``: tiny / smollm2 / an HF directory / a loaded LlamaModel.
    ``repeats``: executor runs; the twin is compared to their per-metric median (a shared
    machine's speed drifts by +-10% over seconds) and their spread is reported.
    ``adapters``: a PEFT directory or catalog; None writes synthetic adapters (ranks
    ``adapter_ranks``, cycled) named after the trace's adapters. ``threads`` defaults to
    the profile's calibration threads; the model runs in the dtype the profile was
    calibrated in on the executor (bf16 steps cost differently from fp32)."""
    import torch

    from twin.executor.adapters import make_cached_adapters
    from twin.executor.engine import execute, resolve_catalog
    from twin.executor.model import LlamaModel
    from twin.executor.weights import resolve_model
    from twin.costs.profile import Profile, load_profile
    from twin.servers import kv_capacity_tokens
    from twin.workload.catalog import AdapterCatalog
    from twin.workload.schema import validate_trace

    if out is not None:   # a bad destination fails now, not after the executor's run
        from twin.outputs import check_out

        check_out(out, "validate")
    if config.policy not in ("vllm", "slora"):
        from twin.errors import TwinInputError

        raise TwinInputError(f"twin validate compares the vllm and slora policies (the "
                             f"memory layouts the executor implements), not {config.policy!r}",
                             file="config", field="policy")
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    trace = validate_trace(trace, source=trace_source)
    trace = crop_window(trace, window_s)
    if threads is None:
        threads = profile.provenance.get("threads") or profile.hardware.get("threads")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if isinstance(model, LlamaModel):
            m = model
        else:
            prov = profile.provenance
            dtype = (prov.get("dtype", "float32") if str(prov.get("method", "")).startswith(
                "twin calibrate --executor") else "float32")
            m = LlamaModel.from_pretrained(resolve_model(str(model)), device=torch.device(device),
                                           dtype=getattr(torch, dtype))
        _check_profile_model(profile, m, model)
        model_dir = None if isinstance(model, LlamaModel) else resolve_model(str(model))
        # the config as vLLM would run it: context capped at the model's
        config = config.replace(max_model_len=min(config.max_model_len,
                                                  m.shape.max_position_embeddings))
        names = trace["adapter"].dropna().unique().tolist()
        if adapters is None and names and config.enable_lora:
            if model_dir is None:
                raise ValueError("pass adapters= with a loaded LlamaModel")
            adapters = make_cached_adapters(model_dir, len(names), adapter_ranks, names=names,
                                            seed=seed, prefix="validate-adapters")
        catalog = resolve_catalog(adapters, trace) if config.enable_lora else None
        twin_catalog = (AdapterCatalog(catalog.table[["adapter", "rank"]], source=catalog.source)
                        if catalog is not None and len(catalog) else None)
        # one KV capacity for both
        B = config.block_size
        if num_gpu_blocks is None:
            nb = kv_capacity_tokens(config, profile) // B
            nb = min(nb, usable_blocks(trace, B, config.max_model_len))
            if config.policy == "slora" and twin_catalog is not None:
                # the unified pool also holds the adapters' pages (exact rank)
                from twin.executor.slora import adapter_pages_for

                nb += sum(adapter_pages_for(m, config, twin_catalog.table["rank"]))
        else:
            nb = int(num_gpu_blocks)
        if warmup and len(trace):   # the first forwards of a process are slow
            w = trace.iloc[:min(4, len(trace))].assign(arrival_s=0.0)
            w = w.assign(output_tokens=np.minimum(w["output_tokens"], 4))
            execute(w, config, m, catalog, num_gpu_blocks=nb, seed=seed)
        ex = execute(trace, config, m, catalog, num_gpu_blocks=nb, window_s=window_s,
                     progress=progress, seed=seed, trace_source=trace_source)
        summaries = [ex.summary] + [
            execute(trace, config, m, catalog, num_gpu_blocks=nb, window_s=window_s,
                    seed=seed, trace_source=trace_source).summary
            for _ in range(max(int(repeats), 1) - 1)]
    finally:
        torch.set_num_threads(old_threads)
    v = Validation(None, ex, None, nb, config, executor_summaries=summaries,
                   _twin_inputs={"trace": trace, "catalog": twin_catalog, "window_s": window_s,
                                 "trace_source": trace_source})
    v.resimulate(profile)   # the twin, on the same KV capacity
    if out is not None:
        v.save(out, profile=profile.name, threads=threads, plot=plot)
    return v

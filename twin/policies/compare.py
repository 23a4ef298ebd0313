"""Run one trace under several serving strategies and say which wins, and why.

``compare`` simulates each strategy's deployment, tabulates throughput, TTFT/TPOT, GPUs,
the memory split (weights / KV / adapters per GPU) and starvation, breaks each run's cost
down into the few mechanisms that differ between strategies, and picks a winner:

1. strategies that keep up with the offered load (no starvation, every adapter served)
   beat those that do not;
2. among those that keep up: fewer GPUs, then lower TTFT p99, then lower TPOT p99;
   strategies on as many GPUs whose TTFT and TPOT p99 are within ``TIE_BAND`` of the
   winner's are named as tied with it (a p99 a few % apart is within the twin's error:
   the choice between them rests on something else, memory or simplicity);
3. if none keeps up: the highest completed throughput per GPU.

Cost mechanisms (each a fraction, the largest is a strategy's *dominant cost*):

- ``unserved``: offered tokens whose adapter got no server (static deployments);
- ``replication``: GPUs beyond the fewest any strategy needed that kept up (one weight
  copy per adapter);
- ``adapter loads``: time spent loading adapters / time spent in steps;
- ``skip rule``: time during which the oldest waiting request was held back by the
  ``max_loras`` slots (vLLM's LoRA rule; the run's ``waiting_held_by``,
  ``twin.results.queue_head``);
- ``KV capacity``: time during which it was held back for lack of KV blocks (or of
  reserve, for S-LoRA's conservative admission), or by a preemption;
- ``LoRA compute``: step time added by the LoRA matmuls and adapter-weight reads (at the
  padded rank for vLLM, the exact ranks for S-LoRA);
- ``time-slicing``: compute lost by replicas that share a GPU, 1 − 1/slowdown;
- ``transfers`` (split): clients' step time spent moving activations over the link;
- ``base queueing`` (split): clients' step time spent waiting behind other clients' (and
  fine-tuning jobs') batches at the shared base executor, beyond their own compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from twin.config import require_serving_config
from twin.costs.profile import Profile, load_profile
from twin.costs.step_time import FEATURES, StepFeatures, derived_features
from twin.errors import TwinInputError
from twin.policies import get_policy
from twin.policies.deployment import MERGED, SLORA, PolicyRun
from twin.policies.split import SPLIT
from twin.results import crop_window
from twin.results.extrapolation import describe
from twin.results.notes import edge_counted
from twin.workload.schema import validate_trace

DEFAULT_POLICIES = ("vllm", "slora", "merged", "hybrid")
#: p99s this close (relative) are a tie: the twin's latency error is several % (README_validate)
TIE_BAND = 0.05
#: strategies' offered loads this close (relative) are printed as one figure
OFFERED_ALIKE = 0.005
_LORA = [FEATURES.index(k) for k in ("lora_token_rank", "adapters", "adapter_rank", "lora_slots",
                                     "lora_active", "lora_slot_tokens",
                                     "lora_slot_tokens_capped", "adapters_squared",
                                     "adapter_tokens_capped")]


@dataclass
class Comparison:
    runs: dict[str, PolicyRun]
    table: pd.DataFrame
    costs: dict[str, dict[str, float]]
    winner: str | None
    verdict: str
    offered_tps: float   # the largest strategy's (``offered_text``); each: the table's
    meta: dict = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)   # within TIE_BAND of the winner

    def offered_text(self, brief: bool = False) -> str:
        """The offered load: one figure when every strategy measured it alike (a window:
        the tokens arriving in it per second of it), else the strategies' range: run to
        completion, a span ends at the last arrival or, later, when the last request
        would have finished without queueing (``load_spans``), which differs by strategy.
        ``brief``: without saying why (a plot's title)."""
        o = self.table["offered_tok_per_s"]
        if len(o) == 0 or o.max() <= (1 + OFFERED_ALIKE) * o.min():
            return f"offered: {self.offered_tps:.0f} tok/s"
        return f"offered: {o.min():.0f}-{o.max():.0f} tok/s" + ("" if brief else (
            " (run to completion: each strategy's %offer is over its own span, to the last "
            "arrival or later when the last request was still in service)"))

    def format(self) -> str:
        return (format_table(self.table) + "\n\n" + format_deployments(self) + "\n\n"
                + self.verdict)


def compare(trace, config, profile=None, catalog=None, *, policies=DEFAULT_POLICIES,
            gpus: int | None = None, window_s: float | None = None, options: dict | None = None,
            trace_source: str = "trace", on_run=None) -> Comparison:
    """Simulate ``trace`` under each strategy in ``policies`` (names, ``Policy`` objects, or
    ``(label, name or Policy)`` pairs to run variants side by side); ``options`` are passed
    to the strategies' constructors (e.g. ``k``, ``dynamic``, ``admission``); ``gpus`` fixes
    every strategy's GPU count."""
    if not policies:
        raise TwinInputError("name at least one strategy to compare", field="--policies")
    require_serving_config(config)
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    trace = crop_window(validate_trace(trace, source=trace_source), window_s)
    pols = [p if isinstance(p, tuple) else (None, p) for p in policies]
    pols = [(label, get_policy(p, **(options or {})) if isinstance(p, str) else p)
            for label, p in pols]
    for _, pol in pols:     # every strategy's catalog check before any runs
        if catalog is not None:
            pol.check_catalog(trace, config, catalog, trace_source)
    runs: dict[str, PolicyRun] = {}
    for label, pol in pols:
        label = label or (pol.name if pol.name not in runs else f"{pol.name}#{len(runs)}")
        run = pol.simulate(trace, config.replace(policy=pol.name), profile, catalog, gpus=gpus,
                           window_s=window_s, record_steps=True, trace_source=trace_source)
        runs[label] = run
        if on_run is not None:
            on_run(label, run)
    table = pd.DataFrame([_row(name, run) for name, run in runs.items()])
    offered = float(table["offered_tok_per_s"].max())
    keep_up = table[~table["starving"]]
    min_gpus = int(keep_up["gpus"].min()) if len(keep_up) else None
    costs = {name: cost_breakdown(run, config, profile, catalog, min_gpus)
             for name, run in runs.items()}
    table["dominant_cost"] = [_dominant(costs[n]) for n in table["policy"]]
    winner = _winner(table) if offered > 0 else None   # nothing offered: nothing to rank
    tied = _tied(table, winner)
    verdict = explain(table, costs, winner, runs, config, tied)
    meta = {"gpus": gpus, "window_s": window_s, "profile": profile.name}
    return Comparison(runs=runs, table=table, costs=costs, winner=winner, verdict=verdict,
                      tied=tied, offered_tps=offered, meta=meta)


def _row(name: str, run: PolicyRun) -> dict:
    s = run.result.summary
    d = s["deployment"]
    mem = run.memory_split()["per_gpu"]
    return {
        "policy": name, "gpus": int(run.gpus), "servers": d["servers"],
        "adapters_served": d["served_adapters"],
        "adapters_unserved": d["unserved_adapters"],
        "req_per_s": s["request_throughput"], "total_tok_per_s": s["total_throughput"],
        "offered_tok_per_s": s["offered_total_throughput"],
        "pct_offered": 100 * s["achieved_over_offered"],
        "ttft_p50_ms": s["ttft_ms"]["median"], "ttft_p99_ms": s["ttft_ms"]["p99"],
        "tpot_p50_ms": s["tpot_ms"]["median"], "tpot_p99_ms": s["tpot_ms"]["p99"],
        "weights_gib_per_gpu": mem["weights_gib"], "kv_gib_per_gpu": mem["kv_gib"],
        "adapters_gib_per_gpu": mem["adapters_gib"],
        "activations_gib_per_gpu": mem["activations_gib"],
        "rejected": int(s.get("rejected_requests", 0)), "extrapolated": s.get("extrapolated"),
        "preemptions": s["preemptions"], "adapter_loads": s["adapter_loads"]["from_disk"]
        + s["adapter_loads"]["from_host"],
        "starving": bool(s["starving"]), "starving_reason": s["starving_reason"],
        # split's fine-tuning job: tokens trained per second of the run (None: no job)
        "finetune_tok_per_s": s.get("split", {}).get("finetune_tokens_per_s"),
        # a trace with hash_ids: the share of prompt tokens its prefix cache served (None:
        # the trace names no tokens)
        "prefix_cache_hit_rate": (s["prefix_cache_hit_rate"] if s.get("enable_prefix_caching")
                                  else 0.0) if "prefix_cache_queries" in s else None,
    }


# -- costs -------------------------------------------------------------------------------------
def cost_breakdown(run: PolicyRun, config, profile, catalog=None, min_gpus=None) -> dict:
    """The mechanisms of the module docstring, each as a fraction (see there)."""
    s = run.result.summary
    req = run.result.requests
    tok = req["prompt_tokens"].to_numpy(np.int64) + req["output_tokens"].to_numpy(np.int64)
    unserved = float(tok[req["status"].to_numpy() == "unserved"].sum() / max(tok.sum(), 1))
    busy = sum(r.busy_s for r in run.servers if r.result is not None and not np.isnan(r.busy_s))
    loads = s["adapter_loads"]["time_s"] / busy if busy > 0 else 0.0
    held = s.get("waiting_held_by")   # the recorder's tally, servers weighted by busy time
    skip, kv = (held["max_loras"], held["kv_cache"]) if held else (0.0, 0.0)
    lora = _lora_compute_share(run, config, profile, catalog)
    served = [r for r in run.servers if r.result is not None and len(r.rows)]
    w = np.array([len(r.rows) for r in served], dtype=float)
    slow = np.array([r.slowdown for r in served], dtype=float)
    slicing = float(np.average(1 - 1 / slow, weights=w)) if len(served) else 0.0
    repl = 0.0
    if min_gpus and run.gpus > min_gpus:
        repl = 1.0 - min_gpus / run.gpus
    split = s.get("split", {})
    return {"unserved": unserved, "replication": repl, "adapter loads": float(loads),
            "skip rule": skip, "KV capacity": kv, "LoRA compute": lora,
            "time-slicing": slicing, "transfers": split.get("transfer_share", 0.0),
            "base queueing": split.get("base_queue_share", 0.0)}


def _lora_compute_share(run: PolicyRun, config, profile, catalog) -> float:
    """Share of step time due to LoRA features, over the dynamic servers' recorded steps
    (a sample of them), with the LoRA token share of each server's traffic."""
    total = extra = 0.0
    st = profile.step_time
    rng = np.random.default_rng(0)
    for r in run.servers:
        if r.result is None or r.spec.kind == MERGED or r.result.steps is None:
            continue
        steps = r.result.steps
        if not len(steps):
            continue
        rq = r.result.requests
        has = rq["adapter"].notna().to_numpy()
        share = float(has.mean()) if len(rq) else 0.0
        ctx = float(rq["prompt_tokens"].mean() + rq["output_tokens"].mean() / 2)
        if r.spec.kind in (SLORA, SPLIT):   # exact ranks, no slots
            ranks = _ranks(rq.loc[has, "adapter"], catalog, config)
            rank = float(ranks.mean()) if len(ranks) else 0.0
            slots = None
        else:
            rank, slots = config.max_lora_rank, config.max_loras
        idx = np.arange(len(steps))
        if len(idx) > 4000:
            idx = np.sort(rng.choice(idx, 4000, replace=False))
        sub = steps.iloc[idx]
        for pre, dec, ad, k in zip(sub["prefill_tokens"].to_numpy(), sub["decode_seqs"].to_numpy(),
                                   sub["adapters"].to_numpy(), sub["steps"].to_numpy()):
            lt = (pre + dec) * share
            sl = (slots if slots is not None else ad) if lt else 0
            # prefill_seqs, after_idle, prefill_ctx_seqs: not in the step log (0)
            f = list(StepFeatures(
                const=1.0, prefill_tokens=pre, decode_tokens=dec, decode_context=dec * ctx,
                prefill_context=pre * ctx / 2, lora_token_rank=lt * rank, adapters=ad,
                adapter_rank=ad * rank, lora_slots=sl, lora_active=1.0 if lt else 0.0,
                prefill_seqs=0, after_idle=0.0, **derived_features(pre + dec, sl, ad)))
            t = st(f)
            for i in _LORA:
                f[i] = 0
            total += t * k
            extra += (t - st(f)) * k
    return float(extra / total) if total > 0 else 0.0


def _ranks(adapters: pd.Series, catalog, config) -> np.ndarray:
    if catalog is None:
        return np.full(len(adapters), config.max_lora_rank, dtype=float)
    return np.array([catalog.rank(a) for a in adapters.astype(str)], dtype=float)


def _dominant(costs: dict) -> str:
    name, v = max(costs.items(), key=lambda kv: kv[1])
    return f"{name} ({100 * v:.0f}%)" if v >= 0.005 else "none"


# -- verdict ------------------------------------------------------------------------------------
def _winner(table: pd.DataFrame) -> str | None:
    if not len(table):
        return None
    ok = table[~table["starving"] & (table["adapters_unserved"] == 0)]
    if len(ok):
        best = ok.sort_values(["gpus", "ttft_p99_ms", "tpot_p99_ms"], na_position="last")
        return str(best["policy"].iloc[0])
    per_gpu = table["total_tok_per_s"] / table["gpus"].clip(lower=1)
    return str(table["policy"].iloc[int(np.argmax(per_gpu.to_numpy()))])


def _tied(table: pd.DataFrame, winner: str | None) -> list[str]:
    """The strategies that keep up on as many GPUs as ``winner`` with TTFT and TPOT p99
    each within ``TIE_BAND`` of the winner's, relative to the larger of the two (none when
    the winner does not keep up)."""
    ok = table[~table["starving"] & (table["adapters_unserved"] == 0)].set_index("policy")
    if winner not in ok.index:
        return []
    w = ok.loc[winner]
    near = [(ok[k] - w[k]).abs() <= TIE_BAND * np.maximum(ok[k].abs(), abs(w[k]))
            for k in ("ttft_p99_ms", "tpot_p99_ms")]
    return [str(n) for n in ok.index[near[0] & near[1] & (ok["gpus"] == w["gpus"])] if n != winner]


_WHY = {
    "unserved": "{pct} of the offered tokens belong to adapters that got no replica "
                "({n} adapters unserved on {gpus} GPU(s); {k} replica(s) fit per GPU)",
    "replication": "it needs {gpus} GPUs, one full weight copy per replica, where {best} GPU(s) suffice",
    "adapter loads": "{pct} of its step time goes to loading adapters ({loads} loads)",
    "skip rule": "for {pct} of the time the oldest waiting request was held back by the "
                 "max_loras={ml} slots (skip rule), so queues build up",
    "KV capacity": "for {pct} of the time the oldest waiting request was held back for lack "
                   "of KV blocks ({pre} preemptions)",
    "LoRA compute": "LoRA matmuls and adapter-weight reads add {pct} to every step",
    "time-slicing": "replicas sharing a GPU lose {pct} of their compute to time-slicing",
    "transfers": "its clients spend {pct} of their step time moving activations to and "
                 "from the base executor",
    "base queueing": "its clients spend {pct} of their step time queued behind other "
                     "batches at the shared base executor",
}


def _why(name: str, costs: dict, row, run: PolicyRun, config, best_gpus) -> str:
    """The dominant cost in words, and the runner-up when it matters (>= 5%)."""
    ranked = sorted(costs.items(), key=lambda kv: -kv[1])
    if ranked[0][1] < 0.005:
        return "no significant overhead"
    d = run.result.summary["deployment"]
    parts = []
    for j, (key, v) in enumerate(ranked[:2]):
        if j and v < 0.05:
            break
        parts.append(f"{key}: " + _WHY[key].format(
            pct=f"{100 * v:.0f}%", n=d["unserved_adapters"], gpus=row["gpus"],
            k=d["replicas_per_gpu"], best=best_gpus, loads=row["adapter_loads"],
            ml=config.max_loras, pre=row["preemptions"]))
    return "; then ".join(parts)


def explain(table: pd.DataFrame, costs: dict, winner: str | None, runs: dict, config,
            tied=()) -> str:
    rejected = int(table["rejected"].max())   # (compare() runs at least one strategy)
    refused = (f"{rejected} request(s) are longer than max_model_len {config.max_model_len}:"
               " vLLM refuses them, so they count in no strategy's offered load or throughput")
    if winner is None:
        return f"No winner: {refused + ', and nothing else' if rejected else 'nothing'} " \
            "was offered."
    t = table.set_index("policy")
    w = t.loc[winner]
    keep = t[~t["starving"] & (t["adapters_unserved"] == 0)]
    best_gpus = int(keep["gpus"].min()) if len(keep) else int(w["gpus"])
    if winner in keep.index:
        head = (f"Winner: {winner} — keeps up with the offered load on {int(w['gpus'])} GPU(s) "
                f"with TTFT p99 {w['ttft_p99_ms']:.0f} ms and TPOT p99 {w['tpot_p99_ms']:.1f} ms.")
    else:
        head = (f"Winner: {winner} — no strategy keeps up; {winner} completes the most per GPU "
                f"({w['total_tok_per_s'] / max(w['gpus'], 1):.0f} tok/s/GPU, "
                f"{w['pct_offered']:.0f}% of offered).")
    if tied:
        head += (f" Tied with {', '.join(tied)}: TTFT and TPOT p99 within "
                 f"{100 * TIE_BAND:.0f}% on as many GPUs, inside the twin's own error; choose "
                 "between them on memory or simplicity.")
    lines = [head, f"  {winner}'s largest remaining cost: "
             f"{_why(winner, costs[winner], w, runs[winner], config, best_gpus)}."]
    if rejected:
        lines.append(f"  Note: {refused}.")
    for name in t.index:
        if name == winner:
            continue
        r = t.loc[name]
        status = ("starves" if r["starving"] else
                  "keeps up" if r["adapters_unserved"] == 0 else "leaves adapters unserved")
        lines.append(f"  {name} ({status}, {int(r['gpus'])} GPU(s), TTFT p99 "
                     f"{r['ttft_p99_ms']:.0f} ms): "
                     f"{_why(name, costs[name], r, runs[name], config, best_gpus)}.")
    for name, ext in t["extrapolated"].items():   # priced past the profile's calibration
        note = describe(ext)
        if note:
            lines.append(f"  Note on {name}: {note}.")
    lines += _edge_note(runs)
    lines += _prefix_note(t)
    return "\n".join(lines)


def _edge_note(runs: dict) -> list[str]:
    """Strategies STARVING by throughput only because a short window ends with requests in
    service (:func:`twin.results.notes.window_edge_note`, one line for them all)."""
    edge = {n: (edge_counted(r.result.summary), r.result.summary) for n, r in runs.items()}
    edge = {n: (c, s) for n, (c, s) in edge.items() if c is not None}
    if not edge:
        return []
    lo, hi = (f"{100 * f(s['in_service_share'] for _, s in edge.values()):.0f}"
              for f in (min, max))
    window = next(iter(edge.values()))[1]["duration_s"]
    return [f"  Note: the STARVING verdict of {', '.join(edge)} may be the {window:.0f}-s "
            f"window's edge: the requests still in service at its end hold "
            f"{lo if lo == hi else f'{lo}-{hi}'}% of the offered tokens, and counted as served "
            f"they bring each to >= {100 * min(c for c, _ in edge.values()):.1f}% of offered; "
            "measure a longer window, or give none to run to the last request."]


def _prefix_note(t: pd.DataFrame) -> list[str]:
    """When the trace names its tokens and the strategies' prefix caches differ (S-LoRA's
    server and a merged replica without caching have none): who reused what."""
    rates = t["prefix_cache_hit_rate"].dropna()
    if len(rates) < 2 or rates.max() - rates.min() < 0.01:
        return []
    parts = ", ".join(f"{n} {100 * v:.0f}%" for n, v in rates.items())
    return [f"  Note: prefix-cache hits differ ({parts} of prompt tokens): a strategy without "
            "prefix caching (S-LoRA's server has none) recomputes every shared prompt, part "
            "of its TTFT above."]


# -- output ------------------------------------------------------------------------------------
_COLUMNS = [
    ("policy", "policy", "{}"), ("gpus", "GPUs", "{:d}"),
    ("adapters_served", "served", "{:d}"), ("req_per_s", "req/s", "{:.2f}"),
    ("total_tok_per_s", "tok/s", "{:.0f}"), ("pct_offered", "%offer", "{:.0f}"),
    ("ttft_p50_ms", "TTFT p50", "{:.0f}"), ("ttft_p99_ms", "TTFT p99", "{:.0f}"),
    ("tpot_p50_ms", "TPOT p50", "{:.1f}"), ("tpot_p99_ms", "TPOT p99", "{:.1f}"),
    ("kv_gib_per_gpu", "KV GiB", "{:.1f}"), ("adapters_gib_per_gpu", "LoRA GiB", "{:.2f}"),
    ("weights_gib_per_gpu", "W GiB", "{:.1f}"), ("rejected", "rejected", "{:d}"),
    ("starving", "verdict", "{}"),
    ("dominant_cost", "dominant cost", "{}"),
]


def format_table(table: pd.DataFrame) -> str:
    """Fixed-width text table (times in ms, memory in GiB per GPU)."""
    cells = [[h for _, h, _ in _COLUMNS]]
    for _, r in table.iterrows():
        row = []
        for key, _, fmt in _COLUMNS:
            v = r[key]
            if key == "starving":
                v = ("unserved" if r["adapters_unserved"] else "STARVING") if v else "keeps up"
                row.append(v)
            elif isinstance(v, float) and np.isnan(v):
                row.append("-")
            else:
                row.append(fmt.format(int(v) if fmt == "{:d}" else v))
        cells.append(row)
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(x.ljust(w) if i in (0, len(c) - 1) else x.rjust(w)
                             for i, (x, w) in enumerate(zip(c, widths))))
        if j == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def format_deployments(cmp: Comparison) -> str:
    """One line per strategy: servers, GPUs, replicas per GPU, unserved adapters."""
    lines = ["Deployments:"]
    for name, run in cmp.runs.items():
        d = run.result.summary["deployment"]
        kinds: dict = {}
        for s in d["per_server"]:
            kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
        servers = ", ".join(f"{n} {k}" for k, n in kinds.items())
        line = f"  {name}: {servers} server(s) on {d['gpus']} GPU(s)"
        if d.get("merged_adapters"):
            line += f", {', '.join(d['merged_adapters'])} merged on dedicated GPU(s)"
        elif "merged" in kinds:
            line += f", {d['replicas_per_gpu']} merged replica(s) fit per GPU"
            if "gpus_for_all_adapters" in d:
                line += f" ({d['gpus_for_all_adapters']} GPUs would serve every adapter)"
        job = run.result.summary.get("split", {})
        if "finetune_tokens" in job:
            line += (f"; fine-tuning job: {job['finetune_tokens']} tokens in "
                     f"{job['finetune_steps']} step(s) of {job['finetune_tokens_per_step']}, "
                     f"{job['finetune_tokens_per_s']:.1f} tok/s over the run (target "
                     f"{job['finetune_target_tokens_per_s']:g})")
        if d["unserved_adapters"]:
            names = ", ".join(d["unserved_adapter_names"][:5])
            more = "…" if d["unserved_adapters"] > 5 else ""
            line += (f"; {d['unserved_adapters']} adapters unserved ({names}{more}), "
                     f"{d['unserved_requests']} requests")
        lines.append(line)
    return "\n".join(lines)

"""What :func:`twin.ml.recommend.recommend` and :func:`twin.ml.placement.place` return:
:class:`Recommendation` and :class:`Placement` (with one :class:`GPUPlan` per GPU), each with
its one-screen explanation (``report``) and, for a recommendation, its JSON (``to_dict``).
Kept apart from the searches so that the search code reads as the algorithm only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from twin.config import ServingConfig
from twin.ml.explain import explanation_lines
from twin.ml.prefix_info import prefix_lines
# slo_violation: imported from here by the searches
from twin.ml.slo_verdict import _SLO_P99, _UNIT, slo_violation, verdict_lines  # noqa: F401
from twin.ml.ties import tie_text

#: How far the model's latency prediction may be from the twin before the report says they
#: disagree, for a model that records no error of its own (``latency_error``, saved by
#: ``twin train`` since issue 16; the p90 of its held-out SMAPE is used): a factor of 2
#: either way (SMAPE 66.7 %).
DEFAULT_LATENCY_SMAPE = 200.0 / 3
def _smape(a: float, b: float) -> float:
    return 200.0 * abs(a - b) / max(abs(a) + abs(b), 1e-12)


def stated_latency_error(model) -> tuple[dict, str]:
    """{metric: SMAPE %} beyond which a model-vs-twin p99 pair disagrees, and where it
    comes from: the p90 of the model's held-out SMAPE (``model.latency_error``: nine pairs
    in ten on unseen families lie within it), else :data:`DEFAULT_LATENCY_SMAPE`."""
    err = getattr(model, "latency_error", None) or {}
    stated = {m: float(err[m]["smape_p90"]) for m in _SLO_P99.values() if m in err}
    if stated:
        return stated, (f"beyond the p90 of the model's held-out SMAPE (median "
                        + ", ".join(f"{_UNIT[m][0]} {err[m]['smape_median']:.0f}%"
                                    for m in stated) + ")")
    return {}, "the model records no latency error; default: a factor of 2 (SMAPE 66.7%)"


def latency_disagreements(cand: pd.DataFrame, model) -> dict:
    """The model's p99 TTFT/TPOT predictions against the twin runs of the same
    configurations: each pair's SMAPE and whether it lies beyond the model's stated error
    (:func:`stated_latency_error`)."""
    stated, source = stated_latency_error(model)
    rows = []
    for _, r in cand.iterrows():
        for m in _SLO_P99.values():
            p, v = r.get(f"pred_{m}"), r.get(f"ver_{m}")
            if p is None or v is None or not (np.isfinite(p) and np.isfinite(v)) \
                    or not r.get("ver_starts"):
                continue
            e = _smape(float(p), float(v))
            lim = float(stated.get(m, DEFAULT_LATENCY_SMAPE))
            rows.append({"max_loras": int(r["max_loras"]), "metric": m, "predicted": float(p),
                         "verified": float(v), "smape_pct": e, "stated_smape_pct": lim,
                         "beyond": bool(e > lim)})
    return {"source": source, "pairs": rows, "beyond": sum(x["beyond"] for x in rows)}


def disagreement_lines(d: dict) -> list[str]:
    """The report's lines for :func:`latency_disagreements`: the pairs beyond the error."""
    L = []
    for x in d["pairs"]:
        if not x["beyond"]:
            continue
        name, unit, nd = _UNIT[x["metric"]]
        ratio = x["verified"] / max(x["predicted"], 1e-9)
        L.append(f"model vs twin DISAGREE at max_loras={x['max_loras']}: {name} predicted "
                 f"{x['predicted']:.{nd}f} {unit}, twin {x['verified']:.{nd}f} {unit} "
                 f"(x{ratio:.2f}, SMAPE {x['smape_pct']:.0f}% > {x['stated_smape_pct']:.0f}%, "
                 f"{d['source']}): trust the twin's figures")
    return L


_SHORT = {"max_loras": "max_loras", "max_cpu_loras": "cpu", "max_lora_rank": "rank",
          "max_num_batched_tokens": "mbt", "max_num_seqs": "seqs",
          "gpu_memory_utilization": "gmu"}


def _knob_text(cfg, knobs) -> str:
    """A twin run's knobs for the report (the searched ones; short names past max_loras)."""
    knobs = knobs or ("max_loras", "max_num_batched_tokens", "max_num_seqs")
    return " ".join(f"{_SHORT.get(k, k)}={getattr(cfg, k):g}" for k in knobs)


def search_line(s: dict) -> str:
    """"search: tpe (why) over N points (knobs), seed 0": which optimizer ran."""
    sp = s.get("space", {})
    seed = f", seed {s['seed']}" if s.get("seed") is not None else ""
    return (f"search: {s['optimizer']} ({s['why']}){seed} over {sp.get('size')} "
            f"configurations of {', '.join(sp.get('knobs', []))}; {len(s.get('trials', []))} "
            "twin runs (run names: cpu=max_cpu_loras rank=max_lora_rank "
            "mbt=max_num_batched_tokens seqs=max_num_seqs gmu=gpu_memory_utilization)")


def of_offered(v: dict, workload_offered: float) -> str:
    """A verified run's share of its offered load, with that load when it is not the
    workload's figure: a run to completion measures it over its own span (to the last
    arrival or later, while the last request was in service: ``load_spans``)."""
    text = f"{100 * v['achieved']:.1f}% of offered"
    own = v.get("offered")
    if own is not None and abs(own - workload_offered) > 0.005 * max(workload_offered, 1e-9):
        text += f" {own:.0f} tok/s over the run's span"
    return text

def servers_text(servers: int, gpus_per_server: int = 1, *, bare: bool = False) -> str:
    """``servers`` servers in GPUs: "3 GPU(s)" ("3" with ``bare``, after "fewest GPUs:"),
    or with tensor parallelism "2 server(s) x 4 GPUs (tensor parallel) = 8 GPUs". One
    text for placements, costs and recommendations."""
    if gpus_per_server == 1:
        return str(servers) if bare else f"{servers} GPU(s)"
    return (f"{servers} server(s) x {gpus_per_server} GPUs (tensor parallel) = "
            f"{servers * gpus_per_server} GPUs")



@dataclass
class Recommendation:
    """A verified configuration (``config``, None when none keeps up), the prediction it
    started from and every candidate's predicted and verified figures (``candidates``)."""

    config: ServingConfig | None
    ok: bool                       # a verified non-starving configuration was found
    objective: str
    slo: dict | None
    workload: dict
    candidates: pd.DataFrame
    predicted: dict
    verified: dict | None
    predicted_config: ServingConfig | None
    runs: int
    predict_ms: float
    total_s: float
    window_s: float
    to_completion: bool = False    # verified by runs to the last request, not over window_s
    warnings: list = field(default_factory=list)
    tie: dict | None = None        # verified configurations within the twin's error (declared_tie)
    slo_verdict: dict | None = None     # goodput: did a verified run meet the SLOs (slo_verdict)
    disagreements: dict | None = None   # goodput: model vs twin p99s (latency_disagreements)
    fewest_gpus: dict | None = None     # SLOs missed on one GPU: Placement.summary() with them
    search: dict | None = None          # goodput: space, optimizer, trials (twin.ml.optimize)
    explanation: dict | None = None     # the features that drove the model's pick (explain)
    prefix: dict | None = None          # trace with hash_ids: twin.ml.prefix_info

    def report(self) -> str:
        w = self.workload
        L = [f"workload: {int(w['n_adapters'])} adapters, {w['total_rate']:.2f} req/s, offered "
             f"{w['offered_tps']:.0f} tok/s, prompt/output mean {w['prompt_mean']:.0f}/"
             f"{w['output_mean']:.0f}, ranks {int(w['rank_min'])}..{int(w['rank_max'])}, "
             f"window {self.window_s:.0f} s"
             + (" (twin runs to the last request)" if self.to_completion else "")]
        pc = self.predicted_config
        if pc is not None:
            p = self.predicted
            L.append(f"predicted: max_loras={pc.max_loras} -> throughput {p['throughput']:.0f} "
                     f"tok/s ({100 * p['achieved']:.1f}% of offered), P(starving) "
                     f"{p['p_starve']:.2f}, TTFT p99 {p['ttft_p99']:.0f} ms, TPOT p50 "
                     f"{p['tpot_p50']:.1f} ms  [{len(self.candidates)} candidates in "
                     f"{self.predict_ms:.1f} ms]")
        c = self.candidates
        stopped = c.get("ver_slo_proven", c["ver_throughput"])   # twin.ml.slo_stop
        tried = c[c["ver_throughput"].notna() | stopped.notna()]
        knobs = tuple((self.search or {}).get("space", {}).get("knobs", ()))
        if self.search is not None:
            L.append(search_line(self.search))
        for _, r in tried.iterrows():
            st = ("does not start" if not r["ver_starts"] else
                  "STARVING" if r["ver_starving"] else "keeps up")
            if r.get("ver_full") is False and not isinstance(r.get("ver_slo_proven"), str):
                # the early exit's probe: a starving run's first minutes, not the window
                name = (f"max_loras={int(r['max_loras']):>3}" if self.slo_verdict is None
                        else _knob_text(r["_config"], knobs))
                L.append(f"  twin run {name}: {st} in its first "
                         f"{r['ver_simulated_s']:.0f} s ({100 * r['ver_achieved']:.1f}% of "
                         f"the offered load there; stopped early, not a full run)")
                continue
            if self.slo_verdict is None:
                L.append(f"  twin run max_loras={int(r['max_loras']):>3}: "
                         f"{r['ver_throughput']:.0f} tok/s ({100 * r['ver_achieved']:.1f}%), "
                         f"TTFT p99 {r['ver_ttft_p99']:.0f} ms  {st}")
                continue
            if isinstance(r.get("ver_slo_proven"), str):   # twin.ml.slo_stop
                L.append(f"  twin run {_knob_text(r['_config'], knobs)}: stopped early, "
                         f"{r['ver_slo_proven']}: misses the SLOs (not a full run)")
                continue
            L.append(f"  twin run {_knob_text(r['_config'], knobs)}: "
                     f"{r['ver_throughput']:.0f} tok/s ({100 * r['ver_achieved']:.1f}%), p99 "
                     f"TTFT {r['ver_ttft_p99']:.0f} ms TPOT {r['ver_tpot_p99']:.1f} ms, "
                     f"goodput {r['ver_goodput']:.0f} tok/s  {st}")
        if self.ok:
            v = self.verified
            c = self.config
            L.append(f"recommended: max_loras={c.max_loras} max_cpu_loras={c.max_cpu_loras} "
                     f"max_lora_rank={c.max_lora_rank} max_num_seqs={c.max_num_seqs} "
                     f"max_num_batched_tokens={c.max_num_batched_tokens} "
                     f"gpu_memory_utilization={c.gpu_memory_utilization:g}")
            L.append(f"verified:  throughput {v['throughput']:.0f} tok/s "
                     f"({of_offered(v, w['offered_tps'])}), TTFT p50/p99 "
                     f"{v['ttft_p50']:.0f}/{v['ttft_p99']:.0f} ms, TPOT p50/p99 "
                     f"{v['tpot_p50']:.1f}/{v['tpot_p99']:.1f} ms"
                     + (f", goodput {v['goodput']:.0f} tok/s" if self.objective == "goodput"
                        else ""))
            if self.tie:
                L.append(tie_text(self.tie))
        elif self.slo_verdict is None or not (self.slo_verdict["keeping_up"]
                                              or self.slo_verdict.get("stopped_early")):
            L.append("no verified configuration keeps up with this load on one GPU: split the "
                     "adapters over GPUs with `twin place`")
        if self.slo_verdict is not None:
            L += verdict_lines(self.slo_verdict)
        if self.fewest_gpus is not None:
            f = self.fewest_gpus
            tp = f.get("gpus_per_server", 1)
            L.append(f"fewest GPUs meeting the SLOs: {servers_text(f['gpus'], tp, bare=True)} "
                     f"(twin place --slo, {f['verify_runs']} twin runs)" if f["ok"] else
                     f"no placement on up to {servers_text(f['gpus'], tp)} meets the SLOs "
                     f"({f['verify_runs']} twin runs)")
            L += [f"  gpu {g['gpu']}: {g['adapters']} adapters, {g['config']}, verified p99 "
                  f"TTFT {g['ttft_p99']:.0f} ms TPOT {g['tpot_p99']:.1f} ms"
                  for g in f["per_gpu"] if g["config"]]
        if self.disagreements is not None:
            L += disagreement_lines(self.disagreements)
        L += explanation_lines(self.explanation)
        L += prefix_lines(self.prefix)
        again = len((self.search or {}).get("reruns") or ())
        L.append(f"{self.runs} twin run(s)" + (f" (+ {again} stopped early, run again in full)"
                                               if again else "")
                 + f", {self.total_s:.2f} s end to end")
        L += [f"warning: {x}" for x in self.warnings]
        return "\n".join(L)

    def to_dict(self) -> dict:
        cand = self.candidates.drop(columns=["_config"]).replace({np.nan: None})
        return {"ok": self.ok, "objective": self.objective, "slo": self.slo,
                "config": self.config.to_dict() if self.config else None,
                "vllm_args": self.config.vllm_args() if self.config else None,
                "predicted_config": self.predicted_config.to_dict() if self.predicted_config
                else None, "predicted": self.predicted, "verified": self.verified,
                "workload": self.workload, "window_s": self.window_s,
                "to_completion": self.to_completion, "runs": self.runs,
                "predict_ms": self.predict_ms, "total_s": self.total_s,
                "warnings": self.warnings, "tie": self.tie, "search": self.search,
                "explanation": self.explanation, "prefix_caching": self.prefix,
                "candidates": cand.to_dict(orient="records"),
                **({"slo_check": self.slo_verdict, "model_vs_twin": self.disagreements,
                    "fewest_gpus": self.fewest_gpus}
                   if self.slo_verdict is not None else {})}


@dataclass
class GPUPlan:
    gpu: int
    units: list                    # adapters, replicas "name#j/r", or BASE_UNIT
    adapters: list                 # the adapter names this GPU serves
    recommendation: Recommendation | None = None


#: ``Placement.split_why`` in words
_SPLIT_TEXT = {"traffic": "traffic alone exceeds one GPU",
               "balance": "to even the GPUs' offered tokens under the SLOs",
               "spread": "every adapter on every GPU: whole adapters missed the SLOs"}


@dataclass
class Placement:
    gpus: list
    routing: pd.DataFrame
    ok: bool
    total_s: float
    verify_runs: int
    attempts: list
    replicas: dict
    curve: list = field(default_factory=list)   # per GPU count tried: worst p99s (SLO search)
    #: GPUs each server spans (the profile's tensor_parallel_size): ``gpus`` lists servers
    gpus_per_server: int = 1
    #: why each replicated adapter was split: "traffic", "balance" or "spread"
    split_why: dict = field(default_factory=dict)

    @property
    def total_gpus(self) -> int:
        return len(self.gpus) * self.gpus_per_server

    def servers_text(self, n: int | None = None, *, bare: bool = False) -> str:
        """``n`` servers (default: this placement's) in GPUs: :func:`servers_text`."""
        return servers_text(len(self.gpus) if n is None else n, self.gpus_per_server,
                            bare=bare)

    def report(self) -> str:
        unit = "gpu" if self.gpus_per_server == 1 else "server"
        L = [f"{self.servers_text()}{'' if self.ok else ' (NOT all verified)'}: "
             f"{self.verify_runs} twin runs, {self.total_s:.1f} s"]
        rep = {a: r for a, r in self.replicas.items() if r > 1}
        for why, text in _SPLIT_TEXT.items():
            mine = sorted(a for a in rep if self.split_why.get(a, "traffic") == why)
            if mine:
                L.append(f"  replicated ({text}): " + ", ".join(f"{a} x{rep[a]}" for a in mine))
        for g in self.gpus:
            r = g.recommendation
            if r is None:   # the search ended before this GPU's share was run
                L.append(f"  {unit} {g.gpu}: {len(g.adapters)} adapters: not verified (no "
                         "twin run of its share)")
                continue
            if r.ok:
                v, c = r.verified, r.config
                slo = r.slo_verdict is not None
                knobs = (f" max_num_batched_tokens={c.max_num_batched_tokens} "
                         f"max_num_seqs={c.max_num_seqs}" if slo else "")
                L.append(f"  {unit} {g.gpu}: {len(g.adapters)} adapters, offered "
                         f"{v.get('offered', r.workload['offered_tps']):.0f} tok/s -> "
                         f"max_loras={c.max_loras} max_cpu_loras={c.max_cpu_loras} "
                         f"max_lora_rank={c.max_lora_rank}{knobs}: verified "
                         f"{v['throughput']:.0f} tok/s ({100 * v['achieved']:.1f}%), TTFT "
                         f"p99 {v['ttft_p99']:.0f} ms"
                         + (f", TPOT p99 {v['tpot_p99']:.1f} ms: SLOs met" if slo else ""))
            elif r.slo_verdict is not None and (r.slo_verdict["keeping_up"]
                                                or r.slo_verdict.get("stopped_early")):
                L.append(f"  {unit} {g.gpu}: {len(g.adapters)} adapters: misses the SLOs in "
                         "every verified configuration")
            else:
                L.append(f"  {unit} {g.gpu}: {len(g.adapters)} adapters: STARVING in every "
                         "verified configuration")
        L.append("  attempts: " + "; ".join(self.attempts))
        warned = {w for g in self.gpus if g.recommendation is not None
                  for w in g.recommendation.warnings}
        L += [f"warning: {w}" for w in sorted(warned)]
        return "\n".join(L)

    def summary(self) -> dict:
        """The GPU count and each GPU's verified configuration, for a recommendation that
        names the fewest GPUs meeting its SLOs."""
        per = []
        for g in self.gpus:
            r = g.recommendation
            ok = r is not None and r.ok
            c = r.config if ok else None
            per.append({"gpu": g.gpu, "adapters": len(g.adapters), "ok": ok,
                        "config": (f"max_loras={c.max_loras} max_cpu_loras={c.max_cpu_loras} "
                                   f"max_num_batched_tokens={c.max_num_batched_tokens} "
                                   f"max_num_seqs={c.max_num_seqs}") if ok else None,
                        "ttft_p99": r.verified["ttft_p99"] if ok else None,
                        "tpot_p99": r.verified["tpot_p99"] if ok else None})
        return {"gpus": len(self.gpus), "gpus_per_server": self.gpus_per_server,
                "total_gpus": self.total_gpus, "ok": self.ok, "verify_runs": self.verify_runs,
                "total_s": self.total_s, "per_gpu": per}

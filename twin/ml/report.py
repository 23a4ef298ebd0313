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
    warnings: list = field(default_factory=list)

    def report(self) -> str:
        w = self.workload
        L = [f"workload: {int(w['n_adapters'])} adapters, {w['total_rate']:.2f} req/s, offered "
             f"{w['offered_tps']:.0f} tok/s, prompt/output mean {w['prompt_mean']:.0f}/"
             f"{w['output_mean']:.0f}, ranks {int(w['rank_min'])}..{int(w['rank_max'])}, "
             f"window {self.window_s:.0f} s"]
        pc = self.predicted_config
        if pc is not None:
            p = self.predicted
            L.append(f"predicted: max_loras={pc.max_loras} -> throughput {p['throughput']:.0f} "
                     f"tok/s ({100 * p['achieved']:.1f}% of offered), P(starving) "
                     f"{p['p_starve']:.2f}, TTFT p99 {p['ttft_p99']:.0f} ms, TPOT p50 "
                     f"{p['tpot_p50']:.1f} ms  [{len(self.candidates)} candidates in "
                     f"{self.predict_ms:.1f} ms]")
        tried = self.candidates.dropna(subset=["ver_throughput"])
        for _, r in tried.iterrows():
            st = ("does not start" if not r["ver_starts"] else
                  "STARVING" if r["ver_starving"] else "keeps up")
            L.append(f"  twin run max_loras={int(r['max_loras']):>3}: {r['ver_throughput']:.0f} "
                     f"tok/s ({100 * r['ver_achieved']:.1f}%), TTFT p99 "
                     f"{r['ver_ttft_p99']:.0f} ms  {st}")
        if self.ok:
            v = self.verified
            c = self.config
            L.append(f"recommended: max_loras={c.max_loras} max_cpu_loras={c.max_cpu_loras} "
                     f"max_lora_rank={c.max_lora_rank} max_num_seqs={c.max_num_seqs} "
                     f"max_num_batched_tokens={c.max_num_batched_tokens}")
            L.append(f"verified:  throughput {v['throughput']:.0f} tok/s "
                     f"({100 * v['achieved']:.1f}% of offered), TTFT p50/p99 "
                     f"{v['ttft_p50']:.0f}/{v['ttft_p99']:.0f} ms, TPOT p50/p99 "
                     f"{v['tpot_p50']:.1f}/{v['tpot_p99']:.1f} ms"
                     + (f", goodput {v['goodput']:.0f} tok/s" if self.objective == "goodput"
                        else ""))
        else:
            L.append("no verified configuration keeps up with this load on one GPU: split the "
                     "adapters over GPUs with `twin place`")
        L.append(f"{self.runs} twin run(s), {self.total_s:.2f} s end to end")
        L += [f"warning: {x}" for x in self.warnings]
        return "\n".join(L)

    def to_dict(self) -> dict:
        cand = self.candidates.drop(columns=["_config"]).replace({np.nan: None})
        return {"ok": self.ok, "objective": self.objective, "slo": self.slo,
                "config": self.config.to_dict() if self.config else None,
                "vllm_args": self.config.vllm_args() if self.config else None,
                "predicted_config": self.predicted_config.to_dict() if self.predicted_config
                else None, "predicted": self.predicted, "verified": self.verified,
                "workload": self.workload, "window_s": self.window_s, "runs": self.runs,
                "predict_ms": self.predict_ms, "total_s": self.total_s,
                "warnings": self.warnings, "candidates": cand.to_dict(orient="records")}


@dataclass
class GPUPlan:
    gpu: int
    units: list                    # adapters, replicas "name#j/r", or BASE_UNIT
    adapters: list                 # the adapter names this GPU serves
    recommendation: Recommendation | None = None


@dataclass
class Placement:
    gpus: list
    routing: pd.DataFrame
    ok: bool
    total_s: float
    verify_runs: int
    attempts: list
    replicas: dict

    def report(self) -> str:
        L = [f"{len(self.gpus)} GPU(s){'' if self.ok else ' (NOT all verified)'}: "
             f"{self.verify_runs} twin runs, {self.total_s:.1f} s"]
        rep = {a: r for a, r in self.replicas.items() if r > 1}
        if rep:
            L.append("  replicated (traffic alone exceeds one GPU): " + ", ".join(
                f"{a} x{r}" for a, r in sorted(rep.items())))
        for g in self.gpus:
            r = g.recommendation
            if r is None:
                continue
            if r.ok:
                v, c = r.verified, r.config
                L.append(f"  gpu {g.gpu}: {len(g.adapters)} adapters, offered "
                         f"{r.workload['offered_tps']:.0f} tok/s -> max_loras={c.max_loras} "
                         f"max_cpu_loras={c.max_cpu_loras} max_lora_rank={c.max_lora_rank}: "
                         f"verified {v['throughput']:.0f} tok/s ({100 * v['achieved']:.1f}%), "
                         f"TTFT p99 {v['ttft_p99']:.0f} ms")
            else:
                L.append(f"  gpu {g.gpu}: {len(g.adapters)} adapters: STARVING in every "
                         "verified configuration")
        L.append("  attempts: " + "; ".join(self.attempts))
        return "\n".join(L)

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

#: The twin's throughput error when a profile records none of its own: its held-out median
#: throughput SMAPE against real vLLM runs (``experiments/reproduce_vllm_h100.py``, 1.3 %).
DEFAULT_TIE_BAND = 0.013


def tie_band(profile) -> tuple[float, str]:
    """How close two throughputs must be for the twin to call them a tie, and where that
    figure comes from. It is the twin's own measured throughput error: the median SMAPE that
    the profile's calibration records on its fit runs
    (``provenance.step_time.throughput_smape_median``), else :data:`DEFAULT_TIE_BAND`.
    Ranking two configurations closer than this would claim a precision the twin has not
    shown, so they are reported as a tie, both named, rather than one picked silently."""
    st = ((getattr(profile, "provenance", None) or {}).get("step_time") or {})
    e = st.get("throughput_smape_median") if isinstance(st, dict) else None
    if isinstance(e, (int, float)) and np.isfinite(e) and e > 0:
        return float(e) / 100.0, (f"profile {profile.name}: median throughput SMAPE on its "
                                  "fit runs")
    return DEFAULT_TIE_BAND, "default: the twin's held-out throughput SMAPE vs real vLLM runs"


def within_band(values: dict, band: float) -> list:
    """The keys whose value is within ``band`` (relative) of the largest, best first."""
    if not values:
        return []
    top = max(values.values())
    near = [k for k, v in values.items() if v >= top * (1 - band)]
    return sorted(near, key=lambda k: -values[k])


def declared_tie(values: dict, band: float, source: str, picked) -> dict | None:
    """A tie among verified configurations ({max_loras: objective}) within ``band`` of the
    best, or None when only one is that close. ``picked`` is the one recommended."""
    near = within_band(values, band)
    if len(near) < 2:
        return None
    spread = 1.0 - min(values[k] for k in near) / max(values[k] for k in near)
    return {"max_loras": sorted(int(k) for k in near), "band": band, "band_source": source,
            "spread": spread, "picked": int(picked)}


def tie_text(tie: dict) -> str:
    """"tie: max_loras=8 and 16 within 3.8% ..." for the report."""
    ml = [str(m) for m in tie["max_loras"]]
    names = ", ".join(ml[:-1]) + " and " + ml[-1]
    return (f"tie: max_loras={names} within {100 * tie['band']:.1f}% (the twin's throughput "
            f"error; {tie['band_source']}): they differ by {100 * tie['spread']:.2f}%, which "
            f"the twin cannot resolve; max_loras={tie['picked']} is the one recommended, "
            f"{'the others are' if len(ml) > 2 else 'the other is'} as good within that error")


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
    tie: dict | None = None        # verified configurations within the twin's error (declared_tie)

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
            if self.tie:
                L.append(tie_text(self.tie))
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
                "warnings": self.warnings, "tie": self.tie,
                "candidates": cand.to_dict(orient="records")}


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

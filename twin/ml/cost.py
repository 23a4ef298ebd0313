"""The cost objective: the fewest GPUs (and dollars per hour) that meet latency SLOs at the
trace's load, with each GPU's configuration and the routing.

:func:`cost_plan` is :func:`twin.ml.placement.place` with the SLOs (every GPU's own twin
run must meet them; each GPU's configuration searched over the enlarged space by
:func:`twin.ml.recommend.recommend`), started from the one-GPU recommendation, and capped at
``max_gpus``. Its cost curve is the worst verified p99 TTFT/TPOT over the GPUs of each GPU
count tried (a count that failed shows what its first failing GPU could at best reach).
Price: ``gpu_price`` dollars per GPU-hour, given by the user (no price list is shipped:
cloud prices change and differ by region and commitment).
"""

from __future__ import annotations

from dataclasses import dataclass

from twin.ml.placement import place
from twin.ml.recommend import recommend
from twin.ml.report import Placement, Recommendation


@dataclass
class CostPlan:
    """The fewest GPUs meeting ``slo`` (``gpus`` None when no count up to ``max_gpus``
    does), their placement, the price and the cost curve."""

    slo: dict
    gpus: int | None
    max_gpus: int
    placement: Placement
    one_gpu: Recommendation
    offered_tps: float
    gpu_price: float | None = None

    @property
    def ok(self) -> bool:
        return self.gpus is not None

    @property
    def per_hour(self) -> float | None:
        return self.gpus * self.gpu_price if (self.ok and self.gpu_price) else None

    @property
    def per_mtok(self) -> float | None:
        """Dollars per million tokens served at the trace's offered load."""
        ph = self.per_hour
        return ph / (self.offered_tps * 3600 / 1e6) if ph and self.offered_tps > 0 else None

    def report(self) -> str:
        slo = ", ".join(f"p99 {k.upper()} <= {v:g} ms" for k, v in self.slo.items() if v)
        pl = self.placement
        if self.ok:
            L = [f"fewest GPUs meeting the SLOs ({slo}) at the trace's load "
                 f"({self.offered_tps:.0f} tok/s offered): {self.gpus}"]
            if self.per_hour is not None:
                L.append(f"cost: {self.gpus} x ${self.gpu_price:g}/GPU-hour = "
                         f"${self.per_hour:.2f}/hour (${self.per_mtok:.3f} per million "
                         "tokens at this load)")
        else:
            L = [f"NO placement on up to {self.max_gpus} GPUs meets the SLOs ({slo}) at the "
                 f"trace's load ({self.offered_tps:.0f} tok/s offered): raise --max-gpus or "
                 "relax the SLOs"]
        L.append(pl.report())
        L.append("cost curve (worst GPU's verified p99s per GPU count tried):")
        for c in pl.curve:
            tag = "SLOs met" if c["met"] else (f"missed (first failing GPU's best; "
                                               f"{c['gpus_verified']} GPU(s) verified)")
            L.append(f"  {c['gpus']:>3} GPU(s): p99 TTFT {c['ttft_p99']:.0f} ms, p99 TPOT "
                     f"{c['tpot_p99']:.1f} ms  {tag}")
        return "\n".join(L)

    def to_dict(self) -> dict:
        return {"objective": "cost", "ok": self.ok, "slo": self.slo, "gpus": self.gpus,
                "max_gpus": self.max_gpus, "gpu_price_per_hour": self.gpu_price,
                "per_hour": self.per_hour, "per_million_tokens": self.per_mtok,
                "offered_tps": self.offered_tps, "curve": self.placement.curve,
                "placement": self.placement.summary(),
                "attempts": self.placement.attempts}


def cost_plan(trace, catalog=None, *, slo: dict, profile=None, model=None, base=None,
              window_s: float | None = None, max_gpus: int = 8, max_runs: int | None = None,
              workers: int = 2, gpu_price: float | None = None, optimizer: str = "auto",
              seed: int = 0, knobs=None, one_gpu: Recommendation | None = None) -> CostPlan:
    """The fewest GPUs meeting ``slo`` at ``trace``'s load (up to ``max_gpus``).
    ``one_gpu``: the goodput recommendation already made for the whole trace on one GPU
    (made here when not given). ``optimizer``, ``seed``, ``knobs``: each GPU's search
    (:func:`twin.ml.recommend.recommend`)."""
    kw = {"optimizer": optimizer, "seed": seed, "knobs": knobs}
    if one_gpu is None:
        one_gpu = recommend(trace, catalog, profile=profile, model=model, base=base,
                            objective="goodput", slo=slo, window_s=window_s,
                            max_runs=max_runs, workers=workers, **kw)
    pl = place(trace, catalog, profile=profile, model=model, base=base, window_s=window_s,
               max_gpus=max_gpus, max_runs=max_runs, workers=workers, objective="goodput",
               slo=slo, known=one_gpu, search_kw=kw)
    return CostPlan(slo=dict(slo), gpus=len(pl.gpus) if pl.ok else None, max_gpus=max_gpus,
                    placement=pl, one_gpu=one_gpu,
                    offered_tps=float(one_gpu.workload["offered_tps"]), gpu_price=gpu_price)

"""The cost objective: the fewest GPUs (and dollars per hour) that meet latency SLOs at the
trace's load, with each GPU's configuration and the routing.

:func:`cost_plan` is :func:`twin.ml.placement.place` with the SLOs (every GPU's own twin
run must meet them; each GPU's configuration searched over the enlarged space by
:func:`twin.ml.recommend.recommend`), started from the one-GPU recommendation, and capped at
``max_gpus``. Its cost curve is the worst verified p99 TTFT/TPOT over the GPUs of each GPU
count tried (a count that failed shows what its first failing GPU could at best reach).
Price: ``gpu_price`` dollars per GPU-hour given by the user, else the public on-demand
list price of the profile's GPU (:data:`twin.costs.gpus.GPU_PRICES`: one provider's, with
its source and date, which the report prints: list prices change and differ by provider,
region and commitment), else none ($ figures left out, and the report says why).
"""

from __future__ import annotations

from dataclasses import dataclass

from twin.costs.gpus import list_price
from twin.costs.profile import load_profile
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
    #: where ``gpu_price`` came from ("--gpu-price", a list price's source and date, or None)
    price_source: str | None = None
    #: the placement run as one fleet with the SLOs (``twin.fleet.verify.check_placement``;
    #: set by ``twin recommend``, None when not run)
    fleet_check: dict | None = None

    @property
    def ok(self) -> bool:
        return self.gpus is not None

    @property
    def total_gpus(self) -> int | None:
        """The GPUs the servers span (``gpus`` counts servers, each a tensor-parallel
        group of ``placement.gpus_per_server``)."""
        return self.gpus * self.placement.gpus_per_server if self.ok else None

    @property
    def per_hour(self) -> float | None:
        return self.total_gpus * self.gpu_price if (self.ok and self.gpu_price) else None

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
                 f"({self.offered_tps:.0f} tok/s offered): "
                 + pl.servers_text(bare=True)]
            if self.per_hour is not None:
                L.append(f"cost: {self.total_gpus} x ${self.gpu_price:g}/GPU-hour = "
                         f"${self.per_hour:.2f}/hour (${self.per_mtok:.3f} per million "
                         f"tokens at this load); price: {self.price_source}")
            else:
                L.append(f"cost: no price ({self.price_source or 'none given'}): give "
                         "--gpu-price DOLLARS_PER_GPU_HOUR for $/hour")
        else:
            L = [f"NO placement on up to {pl.servers_text(self.max_gpus)} meets the SLOs "
                 f"({slo}) at the trace's load ({self.offered_tps:.0f} tok/s offered): raise "
                 "--max-gpus or relax the SLOs"]
        L.append(pl.report())
        L.append("cost curve (worst GPU's verified p99s per GPU count tried):")
        for c in pl.curve:
            tag = "SLOs met" if c["met"] else (f"missed (first failing GPU's best; "
                                               f"{c['gpus_verified']} GPU(s) verified)")
            L.append(f"  {pl.servers_text(c['gpus']):>9}: p99 TTFT {c['ttft_p99']:.0f} ms, "
                     f"p99 TPOT {c['tpot_p99']:.1f} ms  {tag}")
        return "\n".join(L)

    def to_dict(self) -> dict:
        return {"objective": "cost", "ok": self.ok, "slo": self.slo, "gpus": self.gpus,
                "gpus_per_server": self.placement.gpus_per_server,
                "total_gpus": self.total_gpus,
                "max_gpus": self.max_gpus, "gpu_price_per_hour": self.gpu_price,
                "gpu_price_source": self.price_source,
                "per_hour": self.per_hour, "per_million_tokens": self.per_mtok,
                "offered_tps": self.offered_tps, "curve": self.placement.curve,
                "placement": self.placement.summary(),
                "attempts": self.placement.attempts, "fleet_check": self.fleet_check}


def cost_plan(trace, catalog=None, *, slo: dict, profile=None, model=None, base=None,
              window_s: float | None = None, max_gpus: int = 8, max_runs: int | None = None,
              workers: int = 2, gpu_price: float | None = None, optimizer: str = "auto",
              seed: int = 0, knobs=None, one_gpu: Recommendation | None = None) -> CostPlan:
    """The fewest GPUs meeting ``slo`` at ``trace``'s load (up to ``max_gpus``).
    ``one_gpu``: the goodput recommendation already made for the whole trace on one GPU
    (made here when not given). ``optimizer``, ``seed``, ``knobs``: each GPU's search
    (:func:`twin.ml.recommend.recommend`)."""
    kw = {"optimizer": optimizer, "seed": seed, "knobs": knobs}
    gpu_price, price_source = price_of(profile, gpu_price)
    if one_gpu is None:
        one_gpu = recommend(trace, catalog, profile=profile, model=model, base=base,
                            objective="goodput", slo=slo, window_s=window_s,
                            max_runs=max_runs, workers=workers, **kw)
    pl = place(trace, catalog, profile=profile, model=model, base=base, window_s=window_s,
               max_gpus=max_gpus, max_runs=max_runs, workers=workers, objective="goodput",
               slo=slo, known=one_gpu, search_kw=kw)
    return CostPlan(slo=dict(slo), gpus=len(pl.gpus) if pl.ok else None, max_gpus=max_gpus,
                    placement=pl, one_gpu=one_gpu,
                    offered_tps=float(one_gpu.workload["offered_tps"]), gpu_price=gpu_price,
                    price_source=price_source)


def price_of(profile, gpu_price: float | None) -> tuple[float | None, str]:
    """(dollars per GPU-hour, where it came from): ``gpu_price`` when given, else the list
    price of ``profile``'s GPU (:func:`twin.costs.gpus.list_price`), else (None, why)."""
    if gpu_price is not None:
        return float(gpu_price), "--gpu-price"
    prof = profile if hasattr(profile, "hardware") else load_profile(profile)
    lp = list_price(prof.hardware)
    if lp is None:
        return None, (f"no public list price for the GPU of profile {prof.name!r} in "
                      "twin/costs/gpus.py")
    return lp["usd_per_hour"], (f"public on-demand list price ({lp['source']}, as of "
                                f"{lp['as_of']}; twin/costs/gpus.py), not a quote: "
                                "--gpu-price for yours")

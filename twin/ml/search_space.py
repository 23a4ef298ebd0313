"""The configuration space the recommender searches: one place for the knob grids.

Shared by the search (:mod:`twin.ml.recommend`, :mod:`twin.ml.optimize`) and by the
evaluation (branch ``sloeval``: ``experiments/train_recommender.py`` runs an exhaustive twin
search over the same space to score the picks) -- so both judge the same space; change the
grids here only.

Knobs (vLLM's names), in the order the coordinate search walks them:

- ``max_loras``: GPU adapter slots; the slot grid below the adapter count, and the count.
- ``max_cpu_loras``: adapters kept in host memory (the twin's host LRU cache); between
  ``max_loras`` and the adapters served (below the count, a request of an evicted adapter
  waits for a load from disk). A value below a point's ``max_loras`` is raised to it.
- ``max_lora_rank``: the rank every slot is padded to; vLLM's allowed values from the
  largest adapter rank up (padding costs KV memory and LoRA step time in the twin's cost
  model: :mod:`twin.costs.memory`, :mod:`twin.costs.step_time`).
- ``max_num_batched_tokens``, ``max_num_seqs``: the step's token budget and the running
  requests' cap (latency knobs).
- ``gpu_memory_utilization``: the share of GPU memory vLLM takes (KV capacity through the
  profile's memory model).

Which knobs an objective searches (:data:`OBJECTIVE_KNOBS`): ``throughput`` only
``max_loras`` (the paper's question); ``goodput`` and ``cost`` all of them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from twin.config import ALLOWED_LORA_RANKS, ServingConfig
from twin.ml.spec import SLOTS_GRID, config_for, pad_rank, slot_candidates

KNOBS = ("max_loras", "max_cpu_loras", "max_lora_rank", "max_num_batched_tokens",
         "max_num_seqs", "gpu_memory_utilization")
#: The latency knobs' values (the base configuration's own value is added).
LATENCY_GRID = {"max_num_batched_tokens": (2048, 4096, 8192, 16384),
                "max_num_seqs": (64, 128, 256, 512, 1024, 2048)}
GPU_MEMORY_UTILIZATION = (0.80, 0.85, 0.90, 0.95)
RANK_STEPS = 3            # max_lora_rank: the largest adapter rank padded, and 2 values above
OBJECTIVE_KNOBS = {"throughput": ("max_loras",), "goodput": KNOBS, "cost": KNOBS}
#: ``max_loras`` and the latency knobs: the space the SLO evaluation searches exhaustively
#: (:mod:`twin.ml.slo_bench`) and the latency heads' training sweep samples
#: (:mod:`twin.ml.latency_sweep`)
LATENCY_KNOBS = ("max_loras", *LATENCY_GRID)


def at_base_latency_knobs(cfg, base) -> bool:
    """Whether ``cfg`` keeps ``base``'s latency knobs (every :data:`LATENCY_GRID` knob)."""
    return all(int(getattr(cfg, k)) == int(getattr(base, k)) for k in LATENCY_GRID)


@dataclass(frozen=True)
class SearchSpace:
    """Candidate values per knob (``grids``: knob -> sorted tuple), over ``base``'s other
    settings. A point is a tuple of values in :data:`KNOBS` order (knobs not in ``grids``
    keep the base's value)."""

    base: ServingConfig
    grids: dict

    def config(self, point) -> ServingConfig:
        """The configuration of a point (tuple in KNOBS order, or a mapping knob -> value);
        ``max_cpu_loras`` is raised to ``max_loras`` when below it."""
        d = dict(zip(KNOBS, point)) if not isinstance(point, dict) else dict(point)
        d = {k: v for k, v in d.items() if k in KNOBS}
        ml = int(d.get("max_loras", self.base.max_loras))
        d["max_cpu_loras"] = max(ml, int(d.get("max_cpu_loras", self.base.max_cpu_loras)))
        cast = {k: (float(v) if k == "gpu_memory_utilization" else int(v)) for k, v in d.items()}
        return self.base.replace(**cast)

    def point(self, cfg: ServingConfig) -> tuple:
        """The point of a configuration (every knob, in KNOBS order)."""
        return tuple(round(float(getattr(cfg, k)), 4) if k == "gpu_memory_utilization"
                     else int(getattr(cfg, k)) for k in KNOBS)

    @property
    def knobs(self) -> tuple:
        """The knobs searched (more than one candidate value), in KNOBS order."""
        return tuple(k for k in KNOBS if len(self.grids.get(k, ())) > 1)

    def size(self) -> int:
        """Distinct configurations (after raising max_cpu_loras to max_loras), counted
        without building them."""
        g = self.grids
        ml = g.get("max_loras", (self.base.max_loras,))
        cpu = g.get("max_cpu_loras", (self.base.max_cpu_loras,))
        pairs = len({(m, max(m, c)) for m in ml for c in cpu})
        return pairs * math.prod(len(g[k]) for k in KNOBS[2:] if k in g)

    def contains(self, point) -> bool:
        """Is a point (KNOBS order) one of the space's?"""
        d = dict(zip(KNOBS, point))
        if d["max_cpu_loras"] < d["max_loras"]:
            return False
        cpu = self.grids.get("max_cpu_loras", (self.base.max_cpu_loras,))
        if d["max_cpu_loras"] not in cpu and not (d["max_cpu_loras"] == d["max_loras"]
                                                 and min(cpu) <= d["max_loras"]):
            return False
        return all(d[k] in v for k, v in self.grids.items() if k != "max_cpu_loras")

    def points(self):
        """Every distinct point, in grid order (for an exhaustive search: sloeval)."""
        names = [k for k in KNOBS if k in self.grids]
        seen = set()
        for vals in itertools.product(*(self.grids[k] for k in names)):
            p = self.point(self.config(dict(zip(names, vals))))
            if p not in seen:
                seen.add(p)
                yield p

    def restrict(self, **grids) -> "SearchSpace":
        """The same space with some knobs' grids replaced (a value tuple, or one value)."""
        g = dict(self.grids)
        for k, v in grids.items():
            if k not in KNOBS:
                raise ValueError(f"unknown knob {k!r}; knobs: {', '.join(KNOBS)}")
            g[k] = tuple(sorted(set(v if isinstance(v, (tuple, list)) else (v,))))
        return SearchSpace(self.base, g)

    def to_dict(self) -> dict:
        return {"knobs": list(self.knobs), "grids": {k: list(v) for k, v in self.grids.items()},
                "size": self.size()}


def search_space(n_adapters: int, max_rank: int, base: ServingConfig,
                 objective: str = "goodput", knobs=None) -> SearchSpace:
    """The space for a workload of ``n_adapters`` adapters whose largest rank is
    ``max_rank``, around ``base``; only :data:`OBJECTIVE_KNOBS`'s knobs vary (``knobs``:
    fewer of them; the others keep the base's value). The point of the paper's candidates
    (``max_cpu_loras`` = adapters, rank = the largest padded, the rest the base's) is
    always in it."""
    n = max(1, int(n_adapters))
    first = config_for(base, 1, n, max_rank)   # the base with the workload's cpu/rank
    r0 = pad_rank(int(max_rank))
    ranks = tuple(r for r in ALLOWED_LORA_RANKS if r >= r0)[:RANK_STEPS]
    full = {
        "max_loras": tuple(slot_candidates(n)),
        "max_cpu_loras": tuple(sorted({m for m in SLOTS_GRID if m < n} | {n})),
        "max_lora_rank": ranks,
        **{k: tuple(sorted(set(v) | {int(getattr(base, k))})) for k, v in LATENCY_GRID.items()},
        "gpu_memory_utilization": tuple(sorted(set(GPU_MEMORY_UTILIZATION)
                                               | {round(base.gpu_memory_utilization, 4)})),
    }
    keep = OBJECTIVE_KNOBS[objective]
    if knobs is not None:
        bad = sorted(set(knobs) - set(KNOBS))
        if bad:
            raise ValueError(f"unknown knob(s) {', '.join(bad)}; knobs: {', '.join(KNOBS)}")
        keep = tuple(k for k in keep if k in knobs)
    grids = {k: (v if k in keep else (_base_value(first, k),)) for k, v in full.items()}
    return SearchSpace(first, grids)


def _base_value(cfg: ServingConfig, knob: str):
    v = getattr(cfg, knob)
    return round(float(v), 4) if knob == "gpu_memory_utilization" else int(v)


def space_configs(n_adapters: int, max_rank: int, base: ServingConfig, profile,
                  knobs=None) -> list[ServingConfig]:
    """Every configuration of the goodput space over ``knobs`` that vLLM would start (KV
    cache holding ``max_model_len``, as :func:`twin.ml.recommender.candidate_table`
    requires), in grid order."""
    space = search_space(n_adapters, max_rank, base, "goodput", knobs=knobs)
    cfgs = [space.config(p) for p in space.points()]
    return [c for c in cfgs if profile.memory.kv_tokens(c) >= c.max_model_len]

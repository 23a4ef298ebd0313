"""Step time as a function of the batch: ``t = base·f + max(memory·f, compute·f) + Σ curves``.

``f`` holds a few physically meaningful batch features (``FEATURES``). With ``memory`` and
``compute`` zero the model is linear (what calibration fits); with them set it is a
roofline (what the first-principles profile uses). ``curves`` (optional, :class:`Curve`)
are measured functions of a sum of features: the dense GEMM time of a step as a function
of its token count, whose FLOP rate depends on the size (``twin.costs.gemm``). During a run
of pure decode steps every feature is constant except the attended context, which grows by
the number of sequences each step, so the time of ``k`` such steps has a closed form
(:meth:`decode_run`; a curve's value is constant along the run).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import NamedTuple

from twin.costs.dispersion import check_autocorrelation, check_dispersion


class StepFeatures(NamedTuple):
    """A scheduled step's batch features, the step-time model's inputs (``FEATURES``)."""

    const: float             # 1 per step: scheduling, sampling, launches
    prefill_tokens: int      # tokens of prefill chunks
    decode_tokens: int       # decode sequences (one token each)
    decode_context: int      # sum of attended tokens over decode sequences (KV reads)
    prefill_context: int     # sum over prefill chunks of n * (start + n) (attention work;
    #                          start counts prefix-cache hits: a cached prefix is attended
    #                          context, never computed tokens, which prefill_tokens counts)
    lora_token_rank: float   # tokens with an adapter x rank (LoRA matmuls)
    adapters: int            # distinct adapters in the batch (their weights are read)
    adapter_rank: float      # distinct adapters x rank (bytes of adapter weights read)
    lora_slots: int          # adapter slots the LoRA kernel grid spans, when any token has one
    lora_active: int         # 1 when any token has an adapter (the LoRA kernels launch at all)
    prefill_seqs: int        # prefill chunks (per-sequence attention calls and bookkeeping)
    after_idle: float        # 1 for the first step after the engine waited idle for an arrival
    lora_slot_tokens: float  # the step's tokens x lora_slots: vLLM's Triton LoRA kernels launch
    #                          thread blocks for every (token block, slot) pair, a slot
    #                          without tokens exiting early (a launch cost ~ tokens x max_loras)
    prefill_ctx_seqs: int = 0  # prefill chunks attending earlier tokens (a prefix-cache hit or
    #                          an earlier chunk): the executor gathers their context from the
    #                          paged cache under a mask, a fixed cost per chunk beyond
    #                          prefill_context (issue 17: a hit's short suffix beside decodes)
    # min(tokens, LORA_GRID_TOKEN_CAP) x lora_slots: the same grid cost as lora_slot_tokens
    # where it shows, in small (decode) steps; in a large step the empty slots' early-exiting
    # blocks run beside the blocks doing real LoRA work and hide behind them (saturates with
    # step size)
    lora_slot_tokens_capped: float = 0.0
    # the step's tokens beyond the dense GEMMs' ridge (DENSE_RIDGE_TOKENS): below it a step's
    # linear layers are bound by the weight read, a per-step cost; past it by FLOPs, a cost
    # per token
    tokens_past_ridge: float = 0.0
    # distinct adapters squared: each active adapter's LoRA kernel blocks span the token
    # blocks of the whole batch (vLLM's lora_shrink / lora_expand grid: cdiv(tokens, BLOCK_M)
    # blocks per active LoRA, those past its own tokens exiting), and in a light step the
    # batch's tokens grow with its adapters, so the cost grows ~ adapters²; the real H100
    # runs' step times at their measured batches want it (experiments/README_validate.md)
    adapters_squared: float = 0.0
    # adapters x min(tokens, LORA_GRID_TOKEN_CAP): the same grid cost counted as it is
    # launched, saturating where a large step's real LoRA work hides it
    adapter_tokens_capped: float = 0.0
    # waiting requests vLLM's scheduler passed over this step: its waiting loop visits every
    # waiting request once the step's adapters fill max_loras (the skip rule pops and puts
    # back each one whose adapter is not among them; Python work per request, inside the
    # step, while the engine core waits). The twin counts them where the loop stops with the
    # step's adapters at max_loras (``WaitingQueue.passed_over``); the real H100 runs' step
    # times at their measured queues want it (experiments/README_validate.md)
    waiting_skipped: float = 0.0


FEATURES = StepFeatures._fields
#: the step size (tokens) past which ``lora_slot_tokens_capped`` stops growing; a module
#: constant (not a coefficient) so the features stay linear in the fitted weights. 1024: of
#: the caps screened on the real H100 runs (256, 1024; experiments/grid_cap_screen.py,
#: README_validate "the capped grid") the one that kept the linear term's ITL below
#: saturation and removed most of its over-charge of the 2048-token steps
LORA_GRID_TOKEN_CAP = 1024
#: the step size (tokens) from which a step's dense layers cost FLOPs per token
#: (``tokens_past_ridge``); below it they cost one read of the weights, a per-step cost
#: (``const``). A module constant, as ``LORA_GRID_TOKEN_CAP``, so the features stay linear in
#: the fitted weights; one value for every GPU (a per-GPU ridge is not built). 512: of the
#: ridges screened on the real H100 runs (384, 512, 768; experiments/README_validate.md,
#: "the dense ridge") the one with the lowest held-out ITL. An H100's own ridge (bf16 FLOP/s
#: over HBM bytes/s) is ~300-500 tokens, and at 512 tokens a 4096-wide projection's 128x128
#: output tiles first overfill one wave of its 132 SMs
DENSE_RIDGE_TOKENS = 512
_new = tuple.__new__   # builds a StepFeatures without the generated __new__'s argument parsing


def after_idle(f: StepFeatures) -> StepFeatures:
    """``f`` with the after-idle flag set: the first step after an idle wait runs on cold
    caches and clocks (measured ~1 ms extra on a CPU; light load's TTFT is mostly such
    steps)."""
    return f._replace(after_idle=1.0)


def lora_grid(tokens: float, slots: float) -> tuple[float, float]:
    """``(lora_slot_tokens, lora_slot_tokens_capped)`` of a step of ``tokens`` tokens whose
    LoRA kernel grid spans ``slots`` slots (0 when no token has an adapter)."""
    return tokens * slots, min(tokens, LORA_GRID_TOKEN_CAP) * slots


def past_ridge(tokens: float) -> float:
    """``tokens_past_ridge`` of a step of ``tokens`` tokens."""
    return tokens - DENSE_RIDGE_TOKENS if tokens > DENSE_RIDGE_TOKENS else 0


def derived_features(tokens: float, slots: float, adapters: float) -> dict:
    """The features that follow from a step's token count, the slots its LoRA kernel grid
    spans and its distinct adapters, by name: for the hand-built steps
    (``twin.ml.queueing``, ``twin.calibrate.executor_fit``, ``twin.policies.compare``),
    the same values :func:`step_features` computes inline."""
    grid, capped = lora_grid(tokens, slots)
    return {"lora_slot_tokens": grid, "lora_slot_tokens_capped": capped,
            "tokens_past_ridge": past_ridge(tokens), "adapters_squared": adapters * adapters,
            "adapter_tokens_capped": adapters * min(tokens, LORA_GRID_TOKEN_CAP)}


def step_features(plan, token_rank: float, adapter_rank: float, lora_slots: int) -> StepFeatures:
    """Features of a scheduled step (``twin.sched.StepPlan``), given how the server counts
    LoRA ranks: ``token_rank`` per adapter token, ``adapter_rank`` summed over the batch's
    adapters and the ``lora_slots`` the kernel grid spans (see :func:`features` for vLLM's
    padded count, :class:`ExactRankFeatures` for S-LoRA's exact one)."""
    lt = plan.decode_lora + plan.prefill_lora_tokens
    slots = lora_slots if lt else 0
    tokens = plan.prefill_tokens + plan.decode_n
    a = plan.adapters
    capped = tokens if tokens < LORA_GRID_TOKEN_CAP else LORA_GRID_TOKEN_CAP
    return _new(StepFeatures, (   # derived_features, inline
        1.0, plan.prefill_tokens, plan.decode_n, plan.decode_ctx, plan.prefill_ctx,
        lt * token_rank, a, adapter_rank, slots, 1 if lt else 0, plan.prefill_n,
        0.0, tokens * slots, plan.prefill_ctx_n, capped * slots,
        tokens - DENSE_RIDGE_TOKENS if tokens > DENSE_RIDGE_TOKENS else 0, a * a, a * capped,
        plan.waiting_skipped))


def features(plan, max_lora_rank: int, max_loras: int) -> StepFeatures:
    """vLLM's count: every adapter padded to ``max_lora_rank``, the LoRA kernel's grid
    spanning all ``max_loras`` slots."""
    return step_features(plan, max_lora_rank, plan.adapters * max_lora_rank, max_loras)


class PaddedRankFeatures:
    """vLLM's count (:func:`features`) as a server's featurizer: the same features, one
    call less per step than a ``partial`` of :func:`features` (a step is priced ~10^5
    times per simulated hour)."""

    __slots__ = ("max_lora_rank", "max_loras")

    def __init__(self, max_lora_rank: int, max_loras: int):
        self.max_lora_rank, self.max_loras = max_lora_rank, max_loras

    def __call__(self, plan) -> StepFeatures:
        rank = self.max_lora_rank
        return step_features(plan, rank, plan.adapters * rank, self.max_loras)


class ExactRankFeatures:
    """S-LoRA's count over a unified pool (``twin.sched.unified_pool.UnifiedAdapterPool``):
    LoRA FLOPs at the running requests' mean rank, weight bytes at the batch's adapters'
    own ranks, the kernel grid spanning the batch's adapters (no slots, no padding)."""

    __slots__ = ("pool",)

    def __init__(self, pool):
        self.pool = pool

    def __call__(self, plan) -> StepFeatures:
        pool = self.pool
        return step_features(plan, pool.mean_running_rank(), pool.rank_sum, plan.adapters)


class Curve:
    """Seconds as a measured function of ``x = sum of features``: log-log interpolation
    between the points ``(x_i, s_i)`` (constant FLOP rate between neighbours' rates), linear
    in ``x`` beyond them (the edge's rate), 0 at ``x <= 0``."""

    __slots__ = ("features", "idx", "x", "s", "_lx", "_ls")

    def __init__(self, features, x, s):
        unknown = set(features) - set(FEATURES)
        if unknown or not features:
            raise ValueError(f"a curve needs step features, got {list(features)}; "
                             f"known: {FEATURES}")
        if len(x) != len(s) or not x or any(v <= 0 for v in (*x, *s)) \
                or any(b <= a for a, b in zip(x, x[1:])):
            raise ValueError("a curve needs as many positive seconds as positive, increasing x")
        self.features = tuple(features)
        self.idx = tuple(FEATURES.index(k) for k in features)
        self.x, self.s = tuple(map(float, x)), tuple(map(float, s))
        self._lx, self._ls = tuple(map(math.log, self.x)), tuple(map(math.log, self.s))

    def at(self, v: float) -> float:
        x, s = self.x, self.s
        if v <= 0:
            return 0.0
        if v >= x[-1]:
            return s[-1] * v / x[-1]
        if v <= x[0]:
            return s[0] * v / x[0]
        i = bisect_right(x, v) - 1
        lx, ls = self._lx, self._ls
        return math.exp(ls[i] + (math.log(v) - lx[i]) / (lx[i + 1] - lx[i]) * (ls[i + 1] - ls[i]))

    def __call__(self, f) -> float:
        return self.at(sum(f[i] for i in self.idx))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "x": list(self.x), "s": list(self.s)}


@dataclass
class StepTimeModel:
    base: dict
    memory: dict | None = None
    compute: dict | None = None
    curves: list | None = None     # [{"features": [...], "x": [...], "s": [...]}]: Curve
    # measured / predicted step time as equally likely multipliers (twin.costs.dispersion):
    # the spread an executor calibration saw; read by ITL percentiles only, never by a price
    dispersion: list | None = None
    # its correlation from a step to the next 1..MAX_LAG steps (twin.costs.dispersion):
    # read by TTFT percentiles only, a TTFT spanning several steps
    autocorrelation: list | None = None

    def __post_init__(self):
        if self.dispersion is not None:
            self.dispersion = list(check_dispersion(self.dispersion))
        if self.autocorrelation is not None:
            self.autocorrelation = list(check_autocorrelation(self.autocorrelation))
        for part in (self.base, self.memory or {}, self.compute or {}):
            unknown = set(part) - set(FEATURES)
            if unknown:
                raise ValueError(f"unknown step-time feature(s) {sorted(unknown)}; "
                                 f"known: {FEATURES}")
        self._b = tuple(float(self.base.get(k, 0.0)) for k in FEATURES)
        self._m = tuple(float((self.memory or {}).get(k, 0.0)) for k in FEATURES)
        self._c = tuple(float((self.compute or {}).get(k, 0.0)) for k in FEATURES)
        self._roof = any(self._m) or any(self._c)
        # sparse forms: the twin prices ~10^5 steps per simulated hour
        self._sb, self._sm, self._sc = (tuple((i, w) for i, w in enumerate(v) if w)
                                        for v in (self._b, self._m, self._c))
        ctx = FEATURES.index("decode_context")
        self._slopes = (self._b[ctx], self._m[ctx], self._c[ctx])
        self._curves = tuple(c if isinstance(c, Curve) else Curve(**c) for c in self.curves or ())
        self._linear = not self._roof and not self._curves   # what calibration fits
        if ctx in {i for c in self._curves for i in c.idx}:
            raise ValueError("a curve of decode_context would break the decode runs' closed form")

    def prices(self, feature: str) -> bool:
        """Whether any part of the model (base, roofline, curves) charges ``feature``."""
        i = FEATURES.index(feature)
        return bool(self._b[i] or self._m[i] or self._c[i]
                    or any(i in c.idx for c in self._curves))

    def to_dict(self) -> dict:
        # zero terms are left out, except ``const``: the profile schema requires it (a fit
        # on a fast machine can put the per-step constant at exactly 0)
        d = {"base": {k: v for k, v in self.base.items() if v or k == "const"}}
        d["base"].setdefault("const", 0.0)
        if self.memory:
            d["memory"] = {k: v for k, v in self.memory.items() if v}
        if self.compute:
            d["compute"] = {k: v for k, v in self.compute.items() if v}
        if self._curves:
            d["curves"] = [c.to_dict() for c in self._curves]
        if self.dispersion is not None:   # profiles without one write back unchanged
            d["dispersion"] = list(self.dispersion)
        if self.autocorrelation is not None:
            d["autocorrelation"] = list(self.autocorrelation)
        return d

    def __call__(self, f) -> float:
        """Seconds of a step of features ``f``: a :class:`StepFeatures`, or any sequence in
        ``FEATURES`` order. Its length is not checked: this prices every step of a run
        (~10^5 per simulated hour), and the twin's featurizers build whole
        ``StepFeatures``; a short tuple built by hand either lacks only zero-weight fields
        (the same price) or raises IndexError. Build one with ``StepFeatures(...)``, whose
        constructor requires every field without a default."""
        t = 0.0
        for i, w in self._sb:
            t += w * f[i]
        if self._roof:
            m = c = 0.0
            for i, w in self._sm:
                m += w * f[i]
            for i, w in self._sc:
                c += w * f[i]
            t += m if m > c else c
        for curve in self._curves:
            t += curve(f)
        return t

    def _lines(self, f0):
        """(intercept, slope-per-step) of base, memory and compute parts in a decode run."""
        out = []
        for sparse, slope in zip((self._sb, self._sm, self._sc), self._slopes):
            v = 0.0
            for i, w in sparse:
                v += w * f0[i]
            out.append((v, slope))
        return out

    def decode_run(self, f0, ctx_step: int, k: int) -> tuple[float, float, float]:
        """Total time of ``k`` pure-decode steps whose first step has features ``f0`` and
        whose attended context grows by ``ctx_step`` per step.

        Returns (total, first step's time, last step's time).
        """
        if self._linear:   # one line (the general form below, without its empty parts)
            b0 = 0.0
            for i, w in self._sb:
                b0 += w * f0[i]
            bs = self._slopes[0] * ctx_step
            return k * b0 + bs * k * (k - 1) / 2, b0, b0 + bs * (k - 1)
        (b0, bs), (m0, ms), (c0, cs) = self._lines(f0)
        bs *= ctx_step
        ms *= ctx_step
        cs *= ctx_step
        if self._curves:   # constant along the run: no curve reads decode_context
            b0 += sum(curve(f0) for curve in self._curves)
        total = k * b0 + bs * k * (k - 1) / 2
        first = b0
        last = b0 + bs * (k - 1)
        if self._roof:
            total += _sum_max_lines(m0, ms, c0, cs, k)
            first += max(m0, c0)
            last += max(m0 + ms * (k - 1), c0 + cs * (k - 1))
        return total, first, last

    def steps_within(self, f0, ctx_step: int, k_max: int, horizon: float) -> int:
        """Smallest j in [1, k_max] with run time(j) >= horizon (k_max if none)."""
        if self.decode_run(f0, ctx_step, k_max)[0] < horizon:
            return k_max
        lo, hi = 0, k_max   # time(lo) < horizon <= time(hi)
        if self._linear:
            lo, hi = self._linear_bracket(f0, ctx_step, hi, horizon)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.decode_run(f0, ctx_step, mid)[0] >= horizon:
                hi = mid
            else:
                lo = mid
        return hi

    def _linear_bracket(self, f0, ctx_step: int, k_max: int, horizon: float) -> tuple[int, int]:
        """:meth:`steps_within`'s bracket ``(lo, hi)`` narrowed around the root of a linear
        run's quadratic time (a cut run is priced at every arrival that may change the
        schedule). With ``b0 > 0`` and a slope >= 0 the run's time is nondecreasing in
        its steps, also as computed in floating point (each operation of
        :meth:`decode_run`'s line rounds monotonically), so the smallest ``j`` with
        ``time(j) >= horizon`` is the only one where the answer turns, and the bisection
        finds it from any bracket: the same ``j`` as from ``(0, k_max)``, in two prices
        instead of ``log2(k_max)``. Otherwise the bracket stays ``(0, k_max)``."""
        b0 = self.decode_run(f0, ctx_step, 1)[1]   # the line's first step, as it prices it
        bs = self._slopes[0] * ctx_step
        if not (b0 > 0 and bs >= 0 and 0 < horizon < math.inf):
            return 0, k_max
        # b0 j + bs j (j - 1) / 2 = horizon, the root without cancellation on either side
        c = b0 - bs / 2
        d = math.sqrt(c * c + 2 * bs * horizon)
        root = 2 * horizon / (c + d) if c >= 0 else (d - c) / bs
        if not root < k_max:   # NaN too
            return 0, k_max
        j = max(1, math.ceil(root))
        lo, hi = 0, k_max
        if self.decode_run(f0, ctx_step, j)[0] >= horizon:
            hi = j
            if j > 1 and self.decode_run(f0, ctx_step, j - 1)[0] < horizon:
                lo = j - 1
        else:
            lo = j
            if self.decode_run(f0, ctx_step, j + 1)[0] >= horizon:
                hi = j + 1
        return lo, hi


def _sum_max_lines(a0: float, a1: float, b0: float, b1: float, k: int) -> float:
    """sum_{i<k} max(a0 + a1 i, b0 + b1 i) in closed form (one crossing at most)."""
    def s(c0, c1, lo, hi):  # sum over i in [lo, hi)
        n = hi - lo
        return c0 * n + c1 * (lo + hi - 1) * n / 2 if n > 0 else 0.0

    if a1 == b1:
        return s(max(a0, b0), a1, 0, k)
    x = (b0 - a0) / (a1 - b1)   # a(x) == b(x)
    cut = min(max(int(math.ceil(x)), 0), k)
    # past the crossing the steeper line dominates, before it the flatter one
    flat, steep = ((a0, a1), (b0, b1)) if a1 < b1 else ((b0, b1), (a0, a1))
    return s(*flat, 0, cut) + s(*steep, cut, k)

"""What a step-time calibration from vLLM runs says about itself before a profile is
written: whether the runs could determine the terms it fitted, and how far it still is
from its own runs. A fit of seven coefficients to one run fits that run and nothing else
(on a probe: 1.5% ITL error in-sample, 2,907 tok/s predicted where a held-out run
measured 8,248); a fit no iteration improved writes back its starting values. Both were
written as ``fitted`` without a word; these checks put a warning in the log and in the
profile's provenance (``step_time.warnings``), and leave the decision to the user.
"""

from __future__ import annotations

#: a fit still this far from its own runs (median SMAPE, %) is said to miss them
MISS_ITL_PCT, MISS_THROUGHPUT_PCT = 25.0, 10.0


def run_settings(run) -> tuple:
    """What makes two runs different measurements: the serving settings, the adapters'
    ranks and rates and the request pool (a run repeated is one measurement, twice)."""
    return (tuple(sorted(run.config.to_dict().items())), tuple(sorted(run.ranks.items())),
            tuple(sorted(run.rates.items())), tuple(run.pool_means))


def fit_warnings(runs, n_terms: int, history: list[dict], best: int | None = None) -> list[str]:
    """Warnings on a step-time fit of ``n_terms`` free terms to ``runs`` (RunSpecs), from
    its iterations' ``history`` (entries with ``itl_smape_median`` and
    ``throughput_smape_median``); ``best``: the iteration kept (default: the least sum of
    the two)."""
    out = []
    distinct = len({run_settings(r) for r in runs})
    if len(runs) > distinct:
        out.append(f"{len(runs) - distinct} of the {len(runs)} runs repeat another run's "
                   "settings: they count once")
    if distinct < n_terms:
        out.append(f"{distinct} distinct run(s) for {n_terms} free step-time terms: the fit is "
                   "under-determined, its coefficients fit these runs and may be far off "
                   "elsewhere; calibrate on runs at several max_loras values and rates")
    if not history:
        return out
    if best is None:
        score = [h["itl_smape_median"] + h["throughput_smape_median"] for h in history]
        best = min(range(len(history)), key=score.__getitem__)
    if best == 0 and len(history) > 1:
        out.append("no iteration improved on the starting coefficients: the profile keeps "
                   "the base profile's step time")
    b = history[best]
    if b["itl_smape_median"] > MISS_ITL_PCT or b["throughput_smape_median"] > MISS_THROUGHPUT_PCT:
        out.append(f"the fit misses its own runs by {b['itl_smape_median']:.0f}% mean ITL and "
                   f"{b['throughput_smape_median']:.0f}% throughput (median SMAPE): check that "
                   "the runs are of this model and GPU, and their workloads")
    return out

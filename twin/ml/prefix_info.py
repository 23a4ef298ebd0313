"""What a recommendation says about prefix caching (issue 17, item 6).

The shipped recommender was trained on traces without ``hash_ids`` and on twin runs with no
prefix to reuse: its features do not see the shared-prefix fraction
(:func:`twin.ml.features.prefix_features` exists, unwired, because the model's feature
schema is fixed), so for a prefix-heavy trace its throughput and latency predictions are
those of the same load with no cache. The twin runs that verify the candidates do serve the
trace with the configuration's ``enable_prefix_caching``, so they, not the prediction,
decide. :func:`prefix_info` gives what the report shows: the caching setting, the trace's
shared-prefix fraction (the ideal-cache hit share of its prompt tokens) and, once verified,
the pick's hit rate in its twin run.
"""

from __future__ import annotations

import pandas as pd

from twin.config import ServingConfig
from twin.ml.features import prefix_features

#: the warning of a recommendation for a trace with hash_ids
MODEL_UNAWARE = ("the model's prediction does not see prefix caching (trained on traces "
                 "without hash_ids): read it as the load with no cache; the twin runs, "
                 "which serve the trace with enable_prefix_caching={}, decide")


def prefix_info(trace: pd.DataFrame, base: ServingConfig) -> dict | None:
    """For a trace with ``hash_ids``: {enable_prefix_caching, prefix_share,
    sessions_per_adapter, model_aware: False}; None for a trace without them."""
    if "hash_ids" not in trace.columns:
        return None
    return {"enable_prefix_caching": bool(base.enable_prefix_caching),
            **prefix_features(trace), "model_aware": False}


def unaware_warning(info: dict | None) -> str | None:
    """The warning that the model's prediction does not see caching (a trace with
    ``hash_ids``); None otherwise."""
    return None if info is None else MODEL_UNAWARE.format(info["enable_prefix_caching"])


def with_verified(info: dict | None, results: dict, best: int | None) -> dict | None:
    """``info`` with the verified pick's (``results[best]``) prefix-cache hit rate (None
    when nothing was verified, or the run had no prefix counters)."""
    if info is None:
        return None
    rate = results[best].get("prefix_cache_hit_rate") if best is not None else None
    return {**info, "verified_hit_rate": None if rate is None else float(rate)}


def prefix_lines(info: dict | None) -> list[str]:
    """The report's prefix-caching line (none for a trace without hash_ids)."""
    if info is None:
        return []
    hit = info.get("verified_hit_rate")
    return [f"prefix caching: enable_prefix_caching={info['enable_prefix_caching']}, "
            f"trace's shared-prefix fraction {100 * info['prefix_share']:.1f}% of prompt "
            f"tokens ({info['sessions_per_adapter']:.1f} sessions/adapter); verified pick's "
            "hit rate " + ("n/a" if hit is None else f"{100 * hit:.1f}%")
            + "; the model's prediction is unaware of caching, the twin runs decide"]

"""The recommender's model: gradient-boosted trees, as plain arrays, that predict for a
(workload, configuration) point the achieved share of the offered load, the probability of
starvation and the TTFT / TPOT percentiles.

The shipped model (``twin/ml/recommender.json``, rebuilt by
``experiments/train_recommender.py``) is checked against its schema when loaded, so
prediction cannot index out of range. :func:`candidate_table` predicts every candidate
``max_loras`` of one workload (the configurations vLLM would start), :func:`served_map` the
same over rate-proportional subsets of its adapters (the throughput map's plot). Prediction
only: the twin runs that verify a prediction are :mod:`twin.ml.verify`, the search that
uses both :mod:`twin.ml.recommend`, placement over GPUs :mod:`twin.ml.placement`.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from twin.config import ServingConfig
from twin.errors import TwinInputError
from twin.ml.ensemble import PackedTrees
from twin.ml.features import ROW_FEATURES, config_features, workload_features
from twin.ml.latency import HEAD_FEATURES as MODEL_FEATURES
from twin.ml.queueing import queue_features, within_trained
from twin.ml.spec import PAPER_BASE
from twin.ml.spec import SERVED_GRID, config_for, profile_digest, slot_candidates
from twin.outputs import staged_file
from twin.schemas import Int, Number, Schema, validate
from twin.workload.catalog import AdapterCatalog

SCHEMA = "twin.recommender/1"
SHIPPED_MODEL = "recommender.json"
STARVING_P = 0.5          # predicted starving when P(starving) >= this ...
ACHIEVED_MIN = 0.9        # ... or predicted achieved/offered below this (the paper's rule)


# -- the model JSON's schema: trees whose arrays agree, so prediction cannot index out of range --
class TreeSchema(Schema):
    feature: list[Int]
    threshold: list[Number]
    left: list[Int]
    right: list[Int]
    value: list[Number]

    @model_validator(mode="after")
    def _consistent(self):
        n = len(self.left)
        if n == 0 or any(len(a) != n for a in (self.feature, self.threshold, self.right,
                                                self.value)):
            raise ValueError("feature, threshold, left, right and value must have the same, "
                             "non-zero length")
        for i, (lo, hi) in enumerate(zip(self.left, self.right)):
            if lo >= 0 and not (lo < n and 0 <= hi < n):
                raise ValueError(f"node {i}: children ({lo}, {hi}) outside the tree's {n} nodes")
        return self


class EnsembleSchema(Schema):
    kind: Literal["tree_ensemble"] = "tree_ensemble"
    features: Annotated[list[str], Field(min_length=1)]
    base: Number
    link: Literal["identity", "logistic", "exp"]
    max_depth: Annotated[Int, Field(ge=0)]
    trees: list[TreeSchema]

    @model_validator(mode="after")
    def _features_in_range(self):
        nf = len(self.features)
        for k, t in enumerate(self.trees):
            if any(not 0 <= f < nf for f, lo in zip(t.feature, t.left) if lo >= 0):
                raise ValueError(f"tree {k}: a split on a feature index outside 0..{nf - 1}")
        return self


class HeadErrorSchema(Schema):
    smape_median: Annotated[Number, Field(ge=0)]
    smape_p90: Annotated[Number, Field(ge=0)]
    rows: Annotated[Int, Field(ge=0)]


class LatencyErrorSchema(Schema):
    """The p99 heads' SMAPE (%) on held-out families (:func:`twin.ml.latency.heldout_error`)."""
    ttft_p99: HeadErrorSchema
    tpot_p99: HeadErrorSchema
    families: Int = 0
    folds: Int = 0
    on: str = ""


class RecommenderSchema(Schema):
    schema_: Literal["twin.recommender/1"] = Field(alias="schema")
    meta: dict = {}
    models: Annotated[dict[str, EnsembleSchema], Field(min_length=1)]
    # optional: models saved before it was recorded load without it (no stated error)
    latency_error: LatencyErrorSchema | None = None


class Recommender:
    """The fitted models (exported tree ensembles), their provenance and, when recorded,
    the latency heads' held-out error (``latency_error``: {'ttft_p99': {'smape_median',
    'smape_p90', 'rows'}, 'tpot_p99': ..., ...}; None for a model saved without it)."""

    def __init__(self, models: dict[str, dict], meta: dict | None = None,
                 latency_error: dict | None = None):
        self.models = models
        self.meta = dict(meta or {})
        self.latency_error = latency_error
        self.packed_ = PackedTrees(models)
        # MODEL_FEATURES; a model saved before some of the latency features (ROW_FEATURES
        # and a leading part of the rest) still loads and predicts with its own
        self.features = list(self.packed_.features)
        # the latency knobs' range in the training sweep (queueing features are priced
        # within it); a model that does not record it was trained at the paper's values
        self.trained_knobs = self.meta.get("trained_knobs") or {
            k: [PAPER_BASE[k], PAPER_BASE[k]] for k in ("max_num_batched_tokens",
                                                        "max_num_seqs")}
        if not (len(ROW_FEATURES) <= len(self.features) <= len(MODEL_FEATURES)
                and self.features == list(MODEL_FEATURES)[:len(self.features)]):
            raise TwinInputError("recommender model features do not match this twin "
                                 "version; retrain with experiments/train_recommender.py",
                                 field="features")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Recommender":
        if path is None:
            res = resources.files("twin.ml") / SHIPPED_MODEL
            if not res.is_file():
                raise TwinInputError("no shipped recommender model; build one with "
                                     "python experiments/train_recommender.py",
                                     file=f"twin/ml/{SHIPPED_MODEL}")
            data, source = res.read_bytes(), f"twin/ml/{SHIPPED_MODEL}"
        else:
            p = Path(path)
            if not p.is_file():
                raise TwinInputError("model file not found", file=str(p))
            data, source = p.read_bytes(), str(p)
        try:
            d = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise TwinInputError(f"not a recommender model JSON: {exc}", file=source) from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise TwinInputError(f"unsupported model schema {got!r}; expected {SCHEMA!r}",
                                 file=source, field="schema")
        validate(RecommenderSchema, d, source)
        try:
            return cls(d["models"], d.get("meta", {}), d.get("latency_error"))
        except TwinInputError as exc:
            raise TwinInputError(exc.detail, file=source, field=exc.field) from None

    def save(self, path: str | Path) -> Path:
        def rnd(o):  # 7 significant digits keep the file small and the predictions exact enough
            if isinstance(o, float):
                return float(f"{o:.7g}") if math.isfinite(o) else (1e300 if o > 0 else -1e300)
            if isinstance(o, list):
                return [rnd(x) for x in o]
            if isinstance(o, dict):  # thresholds are already as short as routing allows
                return {k: (v if k == "threshold" else rnd(v)) for k, v in o.items()}
            return o
        # through twin.outputs: replaces only a twin recommender model (its schema field)
        with staged_file(path, "recommender") as tmp:
            err = {"latency_error": self.latency_error} if self.latency_error else {}
            tmp.write_text(json.dumps({"schema": SCHEMA, "meta": self.meta, **err,
                                       "models": rnd(self.models)}, separators=(",", ":"))
                           + "\n")
        return Path(path)

    def predict_rows(self, X: pd.DataFrame) -> pd.DataFrame:
        """Predictions for feature rows (columns: the model's ``features``)."""
        out = self.packed_.predict(X[self.features])
        return pd.DataFrame(out, index=X.index)

    def profile_warning(self, profile) -> str | None:
        sha = self.meta.get("profile_sha")
        if sha and sha != profile_digest(profile):
            return (f"the model was trained on profile {self.meta.get('profile')!r} "
                    f"({sha}); this profile ({profile.name}) differs: predictions may be off "
                    "(verification still holds). Retrain: python experiments/train_recommender.py "
                    f"--profile {profile.name}")
        return None


# -- candidates and their predictions --------------------------------------------------------

def catalog_max_rank(catalog, default: int = 16) -> int:
    """The largest adapter rank of ``catalog`` (``default`` for none)."""
    if catalog is None or not len(catalog):
        return default
    return int(catalog.table["rank"].max())


def candidate_table(model: Recommender, wf: dict, base: ServingConfig, profile,
                    max_rank: int) -> pd.DataFrame:
    """One row per candidate ``max_loras`` that starts: configuration, features,
    predictions (achieved, p_starve, throughput, latencies) and ``pred_ok``."""
    n = int(wf["n_adapters"]) or 1
    cfgs = [config_for(base, m, n, max_rank) for m in slot_candidates(n)]
    cfgs = [c for c in cfgs if profile.memory.kv_tokens(c) >= c.max_model_len]
    if not cfgs:
        raise TwinInputError(
            f"no max_loras value starts: even max_loras=1 at max_lora_rank {max_rank} leaves "
            f"the KV cache too small for max_model_len {base.max_model_len}; lower "
            "max_model_len in the base configuration", field="max_model_len")
    return config_table(model, wf, cfgs, profile)


def config_table(model: Recommender, wf: dict, configs: list, profile) -> pd.DataFrame:
    """One row per configuration of ``configs`` (of one workload, features ``wf``): its
    features and predictions, as :func:`candidate_table`'s rows."""
    rows = []
    for cfg in configs:
        r = {k: wf[k] for k in ROW_FEATURES if k in wf}
        r.update(config_features(wf, cfg.max_loras, cfg.max_lora_rank,
                                 profile.memory.kv_tokens(cfg)))
        r.update(queue_features(wf, within_trained(cfg, model.trained_knobs), profile))
        r["_config"] = cfg
        rows.append(r)
    c = pd.DataFrame(rows)
    pred = model.predict_rows(c)
    c["pred_achieved"] = np.clip(pred["achieved"].to_numpy(), 0.0, 1.0)
    c["pred_p_starve"] = pred["p_starve"].to_numpy()
    c["pred_throughput"] = c["pred_achieved"] * wf["offered_tps"]
    for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"):
        c[f"pred_{k}"] = pred[k].to_numpy()
    c["pred_ok"] = (c["pred_p_starve"] < STARVING_P) & (c["pred_achieved"] >= ACHIEVED_MIN)
    return c.reset_index(drop=True)


# -- served-adapters map (for the plot) ------------------------------------------------------

def proportional_subset(names_by_rate: list[str], k: int) -> list[str]:
    """``k`` adapters spread evenly over the rate-sorted list (keeps the rate mix)."""
    n = len(names_by_rate)
    if k >= n:
        return list(names_by_rate)
    idx = np.unique(np.floor((np.arange(k) + 0.5) * n / k).astype(int))
    return [names_by_rate[i] for i in idx]


def served_map(model: Recommender, trace: pd.DataFrame, catalog, *, profile, base: ServingConfig,
               window_s: float) -> pd.DataFrame:
    """Predicted throughput and starvation over (max_loras, served adapters): served
    adapters are rate-proportional subsets of the trace's adapters (grid values below the
    adapter count, and the count itself)."""
    counts = trace["adapter"].value_counts()
    names = sorted(catalog.adapters, key=lambda a: (-int(counts.get(a, 0)), a))
    N = len(names)
    rows = []
    for k in sorted({s for s in SERVED_GRID if s < N} | {N}):
        sub = proportional_subset(names, k)
        keep = trace["adapter"].isin(sub).to_numpy()
        base_rows = trace["adapter"].isna().to_numpy()
        if base_rows.any():  # base-model traffic scaled with the share of adapters served
            sel = np.flatnonzero(base_rows)
            keep[sel[(np.arange(len(sel)) * k) % N < k]] = True
        t = trace[keep]
        cat = AdapterCatalog(catalog.table[catalog.table["adapter"].isin(sub)])
        wf = workload_features(t, cat, window_s)
        c = candidate_table(model, wf, base, profile, catalog_max_rank(cat, base.max_lora_rank))
        c["served"] = k
        rows.append(c[["served", "max_loras", "pred_throughput", "pred_achieved",
                       "pred_p_starve", "pred_ok"]])
    return pd.concat(rows, ignore_index=True)

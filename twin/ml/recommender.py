"""Recommend a serving configuration, and place adapters on the fewest GPUs.

The shipped model (``twin/ml/recommender.json``, rebuilt by
``experiments/train_recommender.py``) holds gradient-boosted trees, as plain arrays,
that predict for a (workload, configuration) point the achieved share of the offered load,
the probability of starvation and the TTFT / TPOT percentiles. :func:`recommend`

1. computes the trace's features and the candidate configurations (``max_loras`` over the
   slot grid up to the adapter count; ``max_cpu_loras`` = adapters served;
   ``max_lora_rank`` = the largest rank present; the rest from a base configuration),
   dropping those whose KV cache cannot hold ``max_model_len`` (vLLM would not start);
2. predicts every candidate and picks the best one predicted not to starve;
3. verifies it with twin runs and refines it by a small local search over neighbouring
   ``max_loras`` values (the prediction and its upper neighbour first, in parallel, then
   the neighbours of the best verified point whose predicted score is close), so the
   answer is a configuration the twin has actually seen keep up.

:func:`place` splits a trace's adapters over GPUs: the fewest groups whose ML-estimated
best configuration keeps up (load-balanced greedy partition, one more GPU at a time; an
adapter whose traffic alone would starve a GPU split into replicas), each group then
verified by :func:`recommend`; a failed verification adds a GPU (or a replica), and a
verified placement is then tried with one GPU fewer while the twin still verifies it (the
model errs on the safe side, so this recovers GPUs it over-provisioned).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from twin.config import ServingConfig
from twin.errors import ConfigError, TwinInputError
from twin.ml.dataset import TIE_TOL
from twin.ml.features import ROW_FEATURES, config_features, public, workload_features
from twin.ml.models import PackedTrees
from twin.ml.spec import SERVED_GRID, config_for, paper_base, slot_candidates
from twin.ml.sweep import EarlyExit, profile_digest, simulate_point
from twin.results import crop_window
from twin.schemas import Int, Number, Schema, validate

SCHEMA = "twin.recommender/1"
SHIPPED_MODEL = "recommender.json"
STARVING_P = 0.5          # predicted starving when P(starving) >= this ...
ACHIEVED_MIN = 0.9        # ... or predicted achieved/offered below this (the paper's rule)
NEIGHBOUR_TOL = 0.02      # goodput: explore a neighbour predicted within 2 % of the best


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


class RecommenderSchema(Schema):
    schema_: Literal["twin.recommender/1"] = Field(alias="schema")
    meta: dict = {}
    models: Annotated[dict[str, EnsembleSchema], Field(min_length=1)]


class Recommender:
    """The fitted models (exported tree ensembles) and their provenance."""

    def __init__(self, models: dict[str, dict], meta: dict | None = None):
        self.models = models
        self.meta = dict(meta or {})
        self.packed_ = PackedTrees(models)
        if list(self.packed_.features) != list(ROW_FEATURES):
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
            return cls(d["models"], d.get("meta", {}))
        except TwinInputError as exc:
            raise TwinInputError(exc.detail, file=source, field=exc.field) from None

    def save(self, path: str | Path) -> Path:
        from twin.outputs import staged_file

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
            tmp.write_text(json.dumps({"schema": SCHEMA, "meta": self.meta,
                                       "models": rnd(self.models)}, separators=(",", ":"))
                           + "\n")
        return Path(path)

    def predict_rows(self, X: pd.DataFrame) -> pd.DataFrame:
        """Predictions for feature rows (columns ``ROW_FEATURES``)."""
        out = self.packed_.predict(X[list(ROW_FEATURES)])
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

def _max_rank(catalog, default: int = 16) -> int:
    if catalog is None or not len(catalog):
        return default
    return int(catalog.table["rank"].max())


def candidate_table(model: Recommender, wf: dict, base: ServingConfig, profile,
                    max_rank: int) -> pd.DataFrame:
    """One row per candidate ``max_loras`` that starts: configuration, features,
    predictions (achieved, p_starve, throughput, latencies) and ``pred_ok``."""
    n = int(wf["n_adapters"]) or 1
    rows = []
    for m in slot_candidates(n):
        cfg = config_for(base, m, n, max_rank)
        kv = profile.memory.kv_tokens(cfg)
        if kv < cfg.max_model_len:
            continue
        r = {k: wf[k] for k in ROW_FEATURES if k in wf}
        r.update(config_features(wf, m, cfg.max_lora_rank, kv))
        r["_config"] = cfg
        rows.append(r)
    if not rows:
        raise TwinInputError(
            f"no max_loras value starts: even max_loras=1 at max_lora_rank {max_rank} leaves "
            f"the KV cache too small for max_model_len {base.max_model_len}; lower "
            "max_model_len in the base configuration", field="max_model_len")
    c = pd.DataFrame(rows)
    pred = model.predict_rows(c)
    c["pred_achieved"] = np.clip(pred["achieved"].to_numpy(), 0.0, 1.0)
    c["pred_p_starve"] = pred["p_starve"].to_numpy()
    c["pred_throughput"] = c["pred_achieved"] * wf["offered_tps"]
    for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"):
        c[f"pred_{k}"] = pred[k].to_numpy()
    c["pred_ok"] = (c["pred_p_starve"] < STARVING_P) & (c["pred_achieved"] >= ACHIEVED_MIN)
    return c.reset_index(drop=True)


def _pred_score(c: pd.DataFrame, objective: str, slo: dict | None) -> np.ndarray:
    score = c["pred_throughput"].to_numpy().copy()
    if objective == "goodput" and slo:
        meets = np.ones(len(c), dtype=bool)
        if slo.get("ttft"):
            meets &= c["pred_ttft_p99"].to_numpy() <= slo["ttft"]
        if slo.get("tpot"):
            meets &= c["pred_tpot_p99"].to_numpy() <= slo["tpot"]
        score = np.where(meets, score, 0.5 * score)
    return score


# -- verification runs -----------------------------------------------------------------------

_CTX: dict = {}


def goodput(requests: pd.DataFrame, duration_s: float, slo: dict | None) -> float:
    """Tokens/s of completed requests meeting the SLOs (TTFT and TPOT in ms)."""
    d = requests[requests["status"] == "finished"]
    ok = np.ones(len(d), dtype=bool)
    if slo and slo.get("ttft"):
        ok &= (d["first_token_s"] - d["arrival_s"]).to_numpy() * 1000 <= slo["ttft"]
    if slo and slo.get("tpot"):
        g = d["generated_tokens"].to_numpy()
        tpot = np.where(g > 1, (d["finish_s"] - d["first_token_s"]).to_numpy()
                        / np.maximum(g - 1, 1), 0.0) * 1000
        ok &= tpot <= slo["tpot"]
    tokens = d["prompt_tokens"].to_numpy()[ok].sum() + d["generated_tokens"].to_numpy()[ok].sum()
    return float(tokens / max(duration_s, 1e-9))


def _verify(item):
    i, cfg = item
    trace, catalog, profile, window_s, slo, ee = (_CTX[k] for k in (
        "trace", "catalog", "profile", "window_s", "slo", "early_exit"))
    t0 = time.perf_counter()
    try:
        s, full, sim_s, res = simulate_point(trace, catalog, cfg, profile, window_s, ee)
    except ConfigError:
        return i, {"starts": False, "starving": True, "wall_s": time.perf_counter() - t0}
    out = {"starts": True, "full": full, "starving": bool(s["starving"]),
           "starving_reason": s["starving_reason"],
           "throughput": float(s["total_throughput"]),
           "offered": float(s["offered_total_throughput"]),
           "achieved": float(s["achieved_over_offered"]),
           "ttft_p50": s["ttft_ms"]["median"], "ttft_p99": s["ttft_ms"]["p99"],
           "tpot_p50": s["tpot_ms"]["median"], "tpot_p99": s["tpot_ms"]["p99"],
           "e2e_p50": s["e2e_ms"]["median"], "preemptions": int(s["preemptions"])}
    out["goodput"] = goodput(res.requests, sim_s, slo) if (full and slo) else out["throughput"]
    out["wall_s"] = time.perf_counter() - t0
    return i, out


class _Verifier:
    """Runs twin verifications, in parallel (forked workers inherit the trace)."""

    def __init__(self, trace, catalog, profile, window_s, slo, early_exit, workers: int):
        _CTX.update(trace=trace, catalog=catalog, profile=profile, window_s=window_s, slo=slo,
                    early_exit=early_exit)
        self.workers = max(1, int(workers))
        self.pool = None

    def run(self, items):
        if self.workers <= 1 or len(items) <= 1:
            return [_verify(it) for it in items]
        if self.pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            if "fork" not in mp.get_all_start_methods():
                return [_verify(it) for it in items]
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"))
        return list(self.pool.map(_verify, items))

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        _CTX.clear()


# -- recommend -------------------------------------------------------------------------------

@dataclass
class Recommendation:
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


def _prepare(trace, profile, model, base, window_s, catalog):
    """Defaults shared by recommend and place: the profile and model loaded, the paper's
    base config, the trace cut to its window, a catalog at the base rank if none given."""
    from twin.costs.profile import Profile, load_profile
    from twin.workload.catalog import AdapterCatalog

    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    model = model or Recommender.load()
    base = base or paper_base()
    window = _trace_window(trace, window_s)
    trace = crop_window(trace, window)
    if catalog is None:
        names = sorted(trace["adapter"].dropna().unique().tolist())
        catalog = AdapterCatalog.uniform(names, base.max_lora_rank)
    return profile, model, base, window, trace, catalog


def _trace_window(trace: pd.DataFrame, window_s: float | None) -> float:
    if window_s is not None:
        return float(window_s)
    return float(max(1.0, math.ceil(float(trace["arrival_s"].max())))) if len(trace) else 1.0


def recommend(trace: pd.DataFrame, catalog=None, *, profile=None, model: Recommender | None = None,
              base: ServingConfig | None = None, objective: str = "throughput",
              slo: dict | None = None, window_s: float | None = None, max_runs: int = 4,
              workers: int = 2, early_exit: EarlyExit = EarlyExit(),
              verifier: _Verifier | None = None) -> Recommendation:
    """The best non-starving configuration for ``trace``, predicted then verified by twin
    runs (at most ``max_runs``). ``objective``: 'throughput' or 'goodput' (tokens/s of
    requests meeting ``slo`` = {'ttft': ms, 'tpot': ms})."""
    t_start = time.perf_counter()
    if objective not in ("throughput", "goodput"):
        raise TwinInputError(f"objective must be throughput or goodput, got {objective!r}",
                             field="--objective")
    if objective == "goodput" and not slo:
        raise TwinInputError("the goodput objective needs --slo ttft=MS,tpot=MS",
                             field="--slo")
    profile, model, base, window, trace, catalog = _prepare(
        trace, profile, model, base, window_s, catalog)
    if not len(catalog):
        raise TwinInputError("the trace names no adapter: nothing to recommend for LoRA "
                             "serving", field="adapter")
    warnings = [w for w in [model.profile_warning(profile)] if w]
    wf = workload_features(trace, catalog, window)
    max_rank = _max_rank(catalog, base.max_lora_rank)
    t0 = time.perf_counter()
    cand = candidate_table(model, wf, base, profile, max_rank)
    score = _pred_score(cand, objective, slo)
    predict_ms = 1000 * (time.perf_counter() - t0)
    start = _predicted_best(cand, score)
    for col in ("ver_starts", "ver_starving", "ver_throughput", "ver_achieved", "ver_goodput",
                "ver_ttft_p50", "ver_ttft_p99", "ver_tpot_p50", "ver_tpot_p99"):
        cand[col] = np.nan
    cand["ver_starts"] = cand["ver_starts"].astype(object)
    cand["ver_starving"] = cand["ver_starving"].astype(object)
    own = verifier is None
    ver = verifier or _Verifier(trace, catalog, profile, window, slo, early_exit, workers)
    results: dict[int, dict] = {}
    key = "goodput" if objective == "goodput" else "throughput"

    def run(idxs):
        idxs = [i for i in dict.fromkeys(idxs) if 0 <= i < len(cand) and i not in results]
        idxs = idxs[:max(0, max_runs - len(results))]
        for i, out in ver.run([(i, cand.at[i, "_config"]) for i in idxs]):
            results[i] = out
        return bool(idxs)

    try:
        n = len(cand)
        first = [start, start + 1] if start + 1 < n else [start, start - 1]
        run(first)
        while len(results) < max_runs:
            good = [i for i, r in results.items() if r["starts"] and not r["starving"]]
            if not good:
                rest = [i for i in range(n) if i not in results]
                # least likely to starve first; ties to more slots
                rest.sort(key=lambda i: (cand.at[i, "pred_p_starve"] >= STARVING_P,
                                         -cand.at[i, "pred_achieved"], -i))
                nxt = rest[:2]
            else:
                b = _best(results, good, key)
                nxt = [j for j in (b - 1, b + 1) if 0 <= j < n and j not in results
                       and _promising(cand, score, results, b, j, objective)]
            if not nxt or not run(nxt):
                break
    finally:
        if own:
            ver.close()
    for i, r in results.items():
        cand.at[i, "ver_starts"] = r["starts"]
        cand.at[i, "ver_starving"] = r["starving"]
        for k in ("throughput", "achieved", "goodput", "ttft_p50", "ttft_p99", "tpot_p50",
                  "tpot_p99"):
            cand.at[i, f"ver_{k}"] = r.get(k, np.nan)
    good = [i for i, r in results.items() if r["starts"] and not r["starving"]]
    best = _best(results, good, key) if good else None
    pr = cand.iloc[start]
    predicted = {"max_loras": int(pr["max_loras"]), "throughput": float(pr["pred_throughput"]),
                 "achieved": float(pr["pred_achieved"]), "p_starve": float(pr["pred_p_starve"]),
                 "ttft_p50": float(pr["pred_ttft_p50"]), "ttft_p99": float(pr["pred_ttft_p99"]),
                 "tpot_p50": float(pr["pred_tpot_p50"]), "tpot_p99": float(pr["pred_tpot_p99"])}
    return Recommendation(
        config=cand.at[best, "_config"] if best is not None else None, ok=best is not None,
        objective=objective, slo=slo, workload=public(wf), candidates=cand,
        predicted=predicted, verified=results[best] if best is not None else None,
        predicted_config=pr["_config"], runs=len(results), predict_ms=predict_ms,
        total_s=time.perf_counter() - t_start, window_s=window, warnings=warnings)


def _predicted_best(cand: pd.DataFrame, score: np.ndarray) -> int:
    """The candidate to verify first: among those predicted to keep up, the highest
    predicted score, ties (within ``TIE_TOL``) to the lowest predicted p99 TTFT; if none is
    predicted to keep up, the least likely to starve."""
    ok = np.flatnonzero(cand["pred_ok"].to_numpy())
    if not len(ok):
        return int(np.argmin(cand["pred_p_starve"].to_numpy()))
    top = score[ok].max()
    near = ok[score[ok] >= top * (1 - TIE_TOL)]
    return int(near[np.argmin(cand["pred_ttft_p99"].to_numpy()[near])])


def _best(results: dict, good: list, key: str) -> int:
    """The best verified point: the highest objective; among points within
    ``TIE_TOL`` of it, the lowest p99 TTFT (then fewer slots)."""
    top = max(results[i][key] for i in good)
    near = [i for i in good if results[i][key] >= top * (1 - TIE_TOL)]
    return min(near, key=lambda i: (_nan_inf(results[i].get("ttft_p99")), i))


def _nan_inf(x) -> float:
    return float("inf") if x is None or not np.isfinite(x) else float(x)


def _promising(cand, score, results, b: int, j: int, objective: str) -> bool:
    """Is neighbour ``j`` of the best verified point ``b`` worth a twin run? For
    throughput: when predicted to beat b's verified achieved share by more than the tie
    tolerance (a point near 100 % cannot be beaten), or when b's TTFT could improve
    (j has more slots and is predicted to keep up). For goodput: when its predicted score
    is within ``NEIGHBOUR_TOL`` of b's."""
    if objective == "goodput":
        return bool(score[j] >= score[b] * (1 - NEIGHBOUR_TOL))
    gain = cand.at[j, "pred_achieved"] - results[b]["achieved"]
    if gain > TIE_TOL:
        return True
    return bool(j > b and cand.at[j, "pred_ok"] and results[b]["achieved"] < 0.97)


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
    from twin.workload.catalog import AdapterCatalog

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
        c = candidate_table(model, wf, base, profile, _max_rank(cat, base.max_lora_rank))
        c["served"] = k
        rows.append(c[["served", "max_loras", "pred_throughput", "pred_achieved",
                       "pred_p_starve", "pred_ok"]])
    return pd.concat(rows, ignore_index=True)


# -- placement -------------------------------------------------------------------------------

BASE_UNIT = "(base model)"


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


class _Units:
    """Placement units: an adapter's traffic, a replica's share of it (every r-th request,
    unit ``name#j/r``), or the base model's traffic; their request indices and loads."""

    def __init__(self, trace: pd.DataFrame, catalog):
        self.trace = trace
        self.catalog = catalog
        ad = trace["adapter"].astype(object).where(trace["adapter"].notna(), BASE_UNIT)
        codes, uniq = pd.factorize(ad)
        order = np.argsort(codes, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(codes, minlength=len(uniq)))]
        self.by_adapter = {u: order[bounds[i]:bounds[i + 1]] for i, u in enumerate(uniq)}
        for a in catalog.adapters:  # adapters of the catalog without traffic
            self.by_adapter.setdefault(a, np.zeros(0, dtype=np.int64))
        self.tok = (trace["prompt_tokens"].to_numpy(np.int64)
                    + trace["output_tokens"].to_numpy(np.int64))
        self.replicas = {a: 1 for a in self.by_adapter}
        self._build()

    def _build(self):
        self.index, self.adapter_of = {}, {}
        for a, ix in self.by_adapter.items():
            r = self.replicas[a]
            if r == 1:
                self.index[a], self.adapter_of[a] = ix, a
                continue
            for j in range(r):
                u = f"{a}#{j + 1}/{r}"
                self.index[u], self.adapter_of[u] = ix[j::r], a
        self.load = {u: int(self.tok[ix].sum()) for u, ix in self.index.items()}
        self.units = sorted(self.index, key=lambda u: (-self.load[u], u))

    def split(self, adapter: str, r: int) -> None:
        self.replicas[adapter] = r
        self._build()

    def unit_of(self, adapter: str) -> str:
        r = self.replicas[adapter]
        return adapter if r == 1 else f"{adapter}#1/{r}"

    def adapters(self, units) -> list:
        return sorted({self.adapter_of[u] for u in units} - {BASE_UNIT})

    def sub(self, units):
        from twin.workload.catalog import AdapterCatalog

        ix = np.sort(np.concatenate([self.index[u] for u in units]))
        names = self.adapters(units)
        cat = AdapterCatalog(self.catalog.table[self.catalog.table["adapter"].isin(names)]
                             .reset_index(drop=True))
        return self.trace.iloc[ix].reset_index(drop=True), cat


def _partition(U: _Units, rank: dict, k: int) -> list[list]:
    """Longest-processing-time partition of the units into ``k`` groups: each unit goes to
    the least loaded group, never beside another replica of its adapter when avoidable,
    and, between equally loaded groups, where its rank is already covered (less padding)."""
    groups = [[] for _ in range(k)]
    tot = [0] * k
    mx = [0] * k
    has = [set() for _ in range(k)]
    for u in U.units:
        a = U.adapter_of[u]
        r = rank.get(a, 0)
        g = min(range(k), key=lambda j: (a in has[j], tot[j], max(0, r - mx[j]), j))
        groups[g].append(u)
        tot[g] += U.load[u]
        mx[g] = max(mx[g], r)
        has[g].add(a)
    return [g for g in groups if g]


def place(trace: pd.DataFrame, catalog=None, *, profile=None, model: Recommender | None = None,
          base: ServingConfig | None = None, window_s: float | None = None,
          max_gpus: int = 64, max_runs: int = 4, workers: int = 2,
          early_exit: EarlyExit = EarlyExit()) -> Placement:
    """The fewest GPUs, and an adapter -> GPU assignment, with no GPU starving.

    An adapter whose traffic alone is predicted (or verified) to starve one GPU is split
    into replicas, each taking every r-th of its requests (the routing table's weights)."""
    t0 = time.perf_counter()
    profile, model, base, window, trace, catalog = _prepare(
        trace, profile, model, base, window_s, catalog)
    U = _Units(trace, catalog)
    rank = {a: catalog.rank(a) for a in catalog.adapters}
    attempts: list[str] = []

    def predicted_ok(units) -> bool:
        t, cat = U.sub(units)
        if not len(cat):
            return True
        wf = workload_features(t, cat, window)
        c = candidate_table(model, wf, base, profile, _max_rank(cat, base.max_lora_rank))
        return bool(c["pred_ok"].any())

    runs = 0
    verified: dict[tuple, Recommendation] = {}

    def verified_ok(units) -> bool:
        nonlocal runs
        key = tuple(sorted(units))
        if key not in verified:
            t, cat = U.sub(units)
            verified[key] = recommend(t, cat, profile=profile, model=model, base=base,
                                      window_s=window, max_runs=max_runs, workers=workers,
                                      early_exit=early_exit)
            runs += verified[key].runs
        return verified[key].ok

    # hot adapters (by load, hottest first): one the model doubts fits a GPU alone is run
    # alone on the twin; if it starves, it gets replicas until one replica's share keeps up.
    # The first adapter that fits alone ends the scan: the rest are lighter.
    known_ok_load = 0  # the largest load a twin run has seen one GPU keep up with
    for a in [u for u in U.units if u != BASE_UNIT]:
        if predicted_ok([a]):
            break
        if verified_ok([a]):
            known_ok_load = max(known_ok_load, U.load[a])
            break
        r = 1
        while r < max_gpus and not verified_ok([U.unit_of(a)]):
            r += 1
            U.split(a, r)
        known_ok_load = max(known_ok_load, U.load[U.unit_of(a)])
        attempts.append(f"{a} alone starves a GPU: {r} replicas")
    total_load = sum(U.load.values())
    # the model may be pessimistic out of its training range (e.g. one very hot adapter
    # share): never start above the GPU count that loads of verified size would need
    k_cap = (max(1, math.ceil(total_load / known_ok_load)) if known_ok_load
             else len(U.units))

    def verify(groups) -> list | None:
        """Twin-verify every group (recommend: runs + local search); the first failing
        group, or None."""
        for g in groups:
            if not U.adapters(g):  # base-model traffic only: not a LoRA server
                continue
            if not verified_ok(g):
                return g
        return None

    groups: list = [U.units]
    ok = False
    k = 1
    heaviest = max(U.load.values()) if U.load else 0
    while k <= max_gpus:  # up: the first k predicted to keep up, then verified
        groups = _partition(U, rank, k)
        if (k < min(k_cap, len(U.units))
                and not all(predicted_ok(g) for g in groups)):
            attempts.append(f"{k} GPU(s): predicted to starve")
            k += 1
            continue
        failed = verify(groups)
        if failed is None:
            attempts.append(f"{k} GPU(s): verified")
            ok = True
            break
        attempts.append(f"{k} GPU(s): verification failed")
        alone = [u for u in failed if u != BASE_UNIT]
        if len(alone) == 1 and U.load[alone[0]] >= 0.5 * heaviest:
            a = U.adapter_of[alone[0]]  # a hot adapter (share) alone starves: a replica more
            U.split(a, U.replicas[a] + 1)
            attempts.append(f"{a}: {U.replicas[a]} replicas")
        k += 1
    if not ok:  # report the last partition tried, consistent with the units
        groups = _partition(U, rank, min(k, max_gpus))
    while ok and k > 1:  # down: the model may be pessimistic; fewer GPUs, verified
        saved = dict(U.replicas)
        for a, r in saved.items():
            if r > k - 1:
                U.split(a, k - 1)
        fewer = _partition(U, rank, k - 1)
        if verify(fewer) is not None:
            attempts.append(f"{k - 1} GPU(s): verification failed")
            U.replicas = saved
            U._build()
            break
        k -= 1
        groups = fewer
        attempts.append(f"{k} GPU(s): verified")
    plans = [GPUPlan(i, g, U.adapters(g), verified.get(tuple(sorted(g))))
             for i, g in enumerate(groups)]
    ok = all(p.recommendation is None or p.recommendation.ok for p in plans)
    rows = []
    for p in plans:
        for u in p.units:
            a = U.adapter_of[u]
            n = len(U.index[u])
            rows.append({"adapter": a, "gpu": p.gpu, "weight": 1.0 / U.replicas[a],
                         "replicas": U.replicas[a], "rank": rank.get(a, np.nan),
                         "requests": n, "offered_tps": U.load[u] / window})
    routing = (pd.DataFrame(rows)
               .groupby(["adapter", "gpu"], as_index=False)
               .agg(weight=("weight", "sum"), replicas=("replicas", "first"),
                    rank=("rank", "first"), requests=("requests", "sum"),
                    offered_tps=("offered_tps", "sum")))
    routing["rate_rps"] = routing["requests"] / window
    return Placement(plans, routing, ok, time.perf_counter() - t0, runs, attempts,
                     dict(U.replicas))

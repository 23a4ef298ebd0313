"""Training the recommender: workloads, sweeps, models, held-out evaluation.

:func:`sample_workloads` draws workload *families* (the paper's rate classes with their
per-adapter rates fixed, or S-LoRA power-law popularity) with 2–3 adapter counts each,
over rank sets, ShareGPT length mixes (rescaled means, incl. Azure-like long prompts) and
burstiness. Held-out families come from a different seed, so evaluation is on workloads
the models never saw. :func:`fit_recommender` fits the shipped tree ensembles;
:func:`compare_models` scores the interpretable models and xgboost with ``GroupKFold`` by
family; :func:`heldout_report` compares ``recommend`` with exhaustive twin search.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from twin.ml.dataset import TIE_TOL, best_of, family_table, row_table, workload_table
from twin.ml.estimators import (EBMRegressor, MonotoneLinearRegressor, SimplifiedTreeRegressor,
                                TreeEnsemble, XGBRegressorModel, evaluate, plot_importances,
                                smape)
from twin.ml.features import ROW_FEATURES, WORKLOAD_FEATURES
from twin.ml.ensemble import reindexed
from twin.ml.latency import (HEAD_FEATURES, fit_heads, heldout_error, latency_rows,
                              with_queue_features)
from twin.ml.queueing import KNOBS
from twin.ml.recommend import recommend
from twin.ml.recommender import Recommender
from twin.ml.spec import SLOTS_GRID, WorkloadSpec, profile_digest
from twin.results import crop_window

LENGTH_MIXES = ({"kind": "sharegpt", "means": [223.0, 196.0]},
                {"kind": "sharegpt", "means": [120.0, 300.0]},
                {"kind": "sharegpt", "means": [500.0, 150.0]},
                {"kind": "sharegpt", "means": [350.0, 350.0]},
                {"kind": "sharegpt", "means": [1100.0, 220.0], "max_prompt": 4096,
                 "max_total": 8192})
RANK_SETS = ([8], [16], [32], [8, 16], [16, 32], [8, 16, 32], [8, 8, 32])
RATE_SHAPES = ((1, 1, 1), (4, 2, 1), (8, 2, 1), (16, 4, 1), (64, 8, 1), (128, 32, 1),
               (512, 64, 1))
N_SIZES = (8, 16, 32, 48, 64, 96, 128, 192, 256, 384)


def sample_workloads(n_families: int, *, seed: int = 0, window_s: float = 600.0,
                     lengths=LENGTH_MIXES, rate_range=(3.0, 45.0), sizes=N_SIZES,
                     per_family=(2, 3)) -> list[WorkloadSpec]:
    """Workload families around one GPU's capacity (aggregate rate log-uniform in
    ``rate_range`` req/s at the family's middle size), 2–3 adapter counts each."""
    rng = np.random.default_rng([seed, 11])
    specs = []
    for _ in range(n_families):
        ranks = list(RANK_SETS[rng.integers(len(RANK_SETS))])
        lens = dict(lengths[rng.integers(len(lengths))])
        k = int(rng.integers(per_family[0], per_family[1] + 1))
        ns = sorted(int(x) for x in rng.choice(sizes, size=k, replace=False))
        n_mid = float(np.exp(np.mean(np.log(ns))))
        R = float(np.exp(rng.uniform(*np.log(rate_range))))
        wseed = int(rng.integers(1 << 30))
        if rng.random() < 0.6:
            shape = np.asarray(RATE_SHAPES[rng.integers(len(RATE_SHAPES))], dtype=float)
            mean_rate = R / n_mid
            rates = [float(f"{x:.4g}") for x in shape / shape.mean() * mean_rate]
            gamma = rng.random() < 0.25
            for n in ns:
                specs.append(WorkloadSpec("rate_classes", dict(
                    n_adapters=n, rates=rates, ranks=ranks, duration_s=window_s,
                    lengths=lens, arrival="gamma" if gamma else "poisson",
                    cv=2.0 if gamma else 1.0, seed=wseed + n)))
        else:
            alpha = float(f"{rng.uniform(0.2, 1.0):.3g}")
            cv = float([1.0, 1.0, 2.0, 3.0][rng.integers(4)])
            for n in ns:
                tr = float(f"{np.exp(rng.uniform(*np.log(rate_range))):.4g}")
                specs.append(WorkloadSpec("powerlaw", dict(
                    n_adapters=n, total_rate=tr, alpha=alpha, cv=cv, ranks=ranks,
                    duration_s=window_s, lengths=lens, seed=wseed + n)))
    return specs


# -- the shipped model -------------------------------------------------------------------------

def fit_recommender(sweep: pd.DataFrame, profile, *, n_estimators: int = 200,
                    latency_estimators: int | None = None, meta: dict | None = None,
                    latency_error: bool = True,
                    latency_sweep: pd.DataFrame | None = None) -> Recommender:
    """Tree ensembles for achieved/offered, P(starving) and TTFT/TPOT percentiles
    (:mod:`twin.ml.latency`: calibrated heads, and with ``latency_error`` their p99 error on
    held-out families, recorded in the model). ``latency_sweep``: more rows for the latency
    heads alone (:mod:`twin.ml.latency_sweep`: the same training workloads at other latency
    knobs and windows); the achieved and starvation models keep ``sweep``'s grid."""
    both = sweep if latency_sweep is None else pd.concat([sweep, latency_sweep],
                                                         ignore_index=True)
    rows_all = both[both["starts"]]
    both_rows = row_table(both)   # sweep's rows first, in order: row_table keeps row order
    rows = both_rows.iloc[:int(sweep["starts"].sum())]
    X = rows[list(ROW_FEATURES)]
    models = {}   # achieved / starving on the rows' features; the latency heads see more
    models["achieved"] = reindexed(TreeEnsemble("regressor", n_estimators=n_estimators,
                                                max_depth=3).fit(X, rows["achieved"]).to_dict(),
                                   HEAD_FEATURES)
    models["p_starve"] = reindexed(TreeEnsemble("classifier", n_estimators=n_estimators,
                                                max_depth=3).fit(X, rows["starving"]).to_dict(),
                                   HEAD_FEATURES)
    full = latency_rows(both_rows, profile)   # the queueing features, computed once
    models.update(fit_heads(full, latency_estimators))
    err = heldout_error(full, n_estimators=latency_estimators) if latency_error else None
    m = {"profile": profile.name, "profile_sha": profile_digest(profile),
         "twin_version": __import__("twin").__version__, "rows": int(len(rows)),
         "workloads": int(rows["workload_key"].nunique()),
         "families": int(rows["family_key"].nunique()),
         "window_s": float(rows["window_s"].iloc[0]) if len(rows) else None,
         "latency_rows": int(len(full)),
         "latency_windows_s": sorted(float(w) for w in full["window_s"].unique()),
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "trained_knobs": {k: [int(rows_all[k].min()), int(rows_all[k].max())]
                           for k in KNOBS} if len(rows_all) else None}
    m.update(meta or {})
    return Recommender(models, m, latency_error=err)


# -- model comparison --------------------------------------------------------------------------

def _model_zoo(quick: bool, grid=None):
    zoo = {
        "simplified_tree": lambda: SimplifiedTreeRegressor(max_depth=4, min_samples_leaf=10,
                                                           grid=grid),
        "monotone_linear": lambda: MonotoneLinearRegressor(),
        "gbt_shipped": lambda: TreeEnsemble("regressor", n_estimators=200, max_depth=3),
    }
    try:
        import xgboost  # noqa: F401  # lazy: probes for the optional extra
        zoo["xgboost"] = lambda: XGBRegressorModel(n_estimators=200 if quick else 400)
    except ImportError:
        pass
    try:
        import interpret  # noqa: F401  # lazy: probes for the optional extra
        zoo["ebm"] = lambda: EBMRegressor(interactions=0 if quick else 3,
                                          outer_bags=2 if quick else 4)
    except ImportError:
        pass
    return zoo


def compare_models(sweep: pd.DataFrame, out: Path, *, quick: bool = False,
                   n_splits: int = 5) -> pd.DataFrame:
    """Score models on held-out families (GroupKFold): per-row achieved/offered and
    throughput, per-workload best ``max_loras`` and max throughput, per-family max served
    adapters. Writes ``model_scores.csv``, the simplified trees (text + PNG) and a
    feature-importance plot."""
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    rows = row_table(sweep)
    X = rows[list(ROW_FEATURES)]
    zoo = _model_zoo(quick)
    # per-row: achieved share (throughput = achieved x offered), on all families
    s, oof = evaluate(zoo, X, rows["achieved"], rows["family_key"], n_splits=n_splits,
                      target="row: achieved/offered")
    tables.append(s)
    imp = {name: make().fit(X, rows["achieved"]).feature_importances_
           for name, make in zoo.items()}
    plot_importances(imp, ROW_FEATURES, out / "feature_importances.png",
                     title="feature importances: achieved/offered per (workload, config) "
                           "-- the recommender's starvation model")
    thr = rows["throughput"].to_numpy()
    for name, p in oof.items():
        sm = smape(thr, np.minimum(p, 1.05) * rows["offered_tps"].to_numpy())
        tables.append(pd.DataFrame([{"target": "row: throughput (achieved x offered)",
                                     "model": name, "smape_median": float(np.median(sm)),
                                     "smape_mean": float(np.mean(sm)),
                                     "smape_p90": float(np.percentile(sm, 90)),
                                     "rows": len(thr)}]))
    # starvation: classification accuracy of "achieved < 0.9" from the regressors
    for name, p in oof.items():
        acc = float(np.mean((p < 0.9) == (rows["achieved"].to_numpy() < 0.9)))
        tables.append(pd.DataFrame([{"target": "row: starving (accuracy)", "model": name,
                                     "accuracy": acc, "rows": len(p)}]))
    # per-workload: the paper's best slots and max throughput
    wt = workload_table(sweep)
    wt = wt[~wt["starving_all"]].reset_index(drop=True)
    Xw = wt[list(WORKLOAD_FEATURES)]
    importances = {}
    for target, grid in (("best_max_loras", SLOTS_GRID), ("max_throughput", None)):
        if len(wt) < 10:
            break
        zw = _model_zoo(quick, grid=grid if target == "best_max_loras" else None)
        s, _ = evaluate(zw, Xw, wt[target], wt["family_key"], n_splits=n_splits,
                        target=f"workload: {target}")
        tables.append(s)
        tree = SimplifiedTreeRegressor(max_depth=4, min_samples_leaf=10,
                                       grid=grid).fit(Xw, wt[target])
        (out / f"tree_{target}.txt").write_text(tree.export_text() + "\n")
        tree.plot(out / f"tree_{target}.png", title=f"simplified tree: {target}")
        if target == "max_throughput":
            for name, make in zw.items():
                importances[name] = make().fit(Xw, wt[target]).feature_importances_
    if importances:
        plot_importances(importances, WORKLOAD_FEATURES,
                         out / "feature_importances_max_throughput.png",
                         title="feature importances: max throughput per workload")
    # per-family: the most adapters served without starving (paper's features only + ours)
    ft = family_table(sweep[sweep["family"] == "rate_classes"])
    ft = ft[ft["workloads"] >= 2].reset_index(drop=True)
    fam_feats = [f for f in WORKLOAD_FEATURES if f not in ("n_adapters", "total_rate",
                                                          "offered_tps")]
    if len(ft) >= 10:
        zf = _model_zoo(quick)
        s, _ = evaluate(zf, ft[fam_feats], ft["max_served"], ft["family_key"],
                        n_splits=n_splits, target="family: max_served")
        tables.append(s)
        tree = SimplifiedTreeRegressor(max_depth=3, min_samples_leaf=5,
                                       grid=(0,) + N_SIZES).fit(ft[fam_feats], ft["max_served"])
        (out / "tree_max_served.txt").write_text(tree.export_text() + "\n")
        tree.plot(out / "tree_max_served.png", title="simplified tree: max served adapters")
    scores = pd.concat(tables, ignore_index=True)
    scores.to_csv(out / "model_scores.csv", index=False)
    return scores


# -- held-out evaluation -------------------------------------------------------------------------

def heldout_report(heldout: pd.DataFrame, model: Recommender, profile, *, window_s: float,
                   base=None, workers: int = 2, model_path: Path | None = None) -> pd.DataFrame:
    """For each held-out workload: exhaustive best (from its full-grid sweep) vs the
    recommendation verified by the twin (end-to-end time includes loading the model)."""
    out = []
    for wk, g in heldout.groupby("workload_key", sort=True):
        spec = WorkloadSpec.from_dict(json.loads(g["workload"].iloc[0]))
        trace, catalog = spec.build()
        trace = crop_window(trace, window_s)
        best = best_of(g)                        # strict maximum: the gap's reference
        pick = best_of(g, tie_tol=TIE_TOL)       # what recommend aims at (ties -> lower TTFT)
        t0 = time.perf_counter()
        m = Recommender.load(model_path) if model_path else model
        rec = recommend(trace, catalog, profile=profile, model=m, base=base,
                        window_s=window_s, workers=workers)
        e2e = time.perf_counter() - t0
        r = {"workload_key": wk, "workload": spec.describe(),
             "n_adapters": int(g["max_cpu_loras"].iloc[0]),
             "offered_tps": float(g["offered_total_throughput"].dropna().iloc[0])
             if g["offered_total_throughput"].notna().any() else np.nan,
             "exhaustive_ok": best is not None,
             "exhaustive_max_loras": int(best["max_loras"]) if best is not None else None,
             "exhaustive_best_max_loras": int(pick["max_loras"]) if pick is not None else None,
             "exhaustive_throughput": float(best["total_throughput"]) if best is not None
             else np.nan, "exhaustive_runs": int(len(g)),
             "rec_ok": rec.ok, "rec_max_loras": rec.config.max_loras if rec.ok else None,
             "predicted_max_loras": rec.predicted["max_loras"],
             "rec_throughput": rec.verified["throughput"] if rec.ok else np.nan,
             "rec_starving": (not rec.ok) if best is not None else False,
             "rec_runs": rec.runs, "e2e_s": e2e, "predict_ms": rec.predict_ms}
        r["gap_pct"] = (100 * (r["exhaustive_throughput"] - r["rec_throughput"])
                        / r["exhaustive_throughput"] if best is not None and rec.ok else np.nan)
        out.append(r)
    return pd.DataFrame(out)


def predict_latency_ms(model: Recommender, heldout: pd.DataFrame, profile,
                       reps: int = 200) -> float:
    """Median time to predict one workload's candidate set (all models; its features,
    the queueing ones included, computed beforehand)."""
    rows = row_table(heldout)
    wk = rows["workload_key"].iloc[0]
    X = with_queue_features(rows[rows["workload_key"] == wk], profile)[list(HEAD_FEATURES)]
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.predict_rows(X)
        ts.append(time.perf_counter() - t0)
    return 1000 * float(np.median(ts))

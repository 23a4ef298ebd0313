"""From sweep rows to learning tables.

Three granularities:

- **rows** (:func:`row_table`): one (workload, configuration) point: workload and
  configuration features, and what the twin measured: achieved / offered throughput, the
  starvation flag, total throughput, TTFT / TPOT / E2E percentiles. The recommender's
  models learn these and rank candidate configurations with them.
- **workloads** (:func:`workload_table`): one workload with every configuration of the
  grid run: the best non-starving ``max_loras`` (highest throughput; within 0.5 % of it,
  lowest p99 TTFT), the highest throughput, latencies at the best point, the fewest slots
  that do not starve, and whether every configuration starves.
- **families** (:func:`family_table`): workloads that differ only in their adapter count
  (the paper's unit): the most adapters served without starvation ("max served"), the best
  slots there and the throughput there — the paper's three targets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.ml.features import CONFIG_FEATURES, ROW_FEATURES, WORKLOAD_FEATURES

ROW_TARGETS = ("achieved", "starving", "throughput", "ttft_p50", "ttft_p99", "tpot_p50",
               "tpot_p99", "e2e_p50")
WORKLOAD_TARGETS = ("best_max_loras", "max_throughput", "min_ok_max_loras", "starving_all",
                    "best_ttft_p99", "best_tpot_p50")
FAMILY_TARGETS = ("max_served", "best_max_loras_at_max", "max_throughput_at_max")


def feature_frame(df: pd.DataFrame, names=ROW_FEATURES) -> pd.DataFrame:
    """The model features of sweep rows (columns ``f_*`` and ``c_*``) under their names."""
    out = {}
    for n in names:
        col = f"c_{n}" if n in CONFIG_FEATURES else f"f_{n}"
        out[n] = df[col].astype(float).to_numpy()
    return pd.DataFrame(out, index=df.index)


def row_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration that starts: features, targets, ``workload_key`` and
    ``family_key`` (groups for held-out splits) and ``full`` (latencies measured)."""
    d = sweep[sweep["starts"]].copy()
    X = feature_frame(d)
    t = pd.DataFrame({
        "achieved": d["achieved_over_offered"].clip(upper=1.05),
        "starving": d["starving"].astype(bool),
        "throughput": d["total_throughput"],
        "ttft_p50": d["ttft_ms_median"], "ttft_p99": d["ttft_ms_p99"],
        "tpot_p50": d["tpot_ms_median"], "tpot_p99": d["tpot_ms_p99"],
        "e2e_p50": d["e2e_ms_median"],
    }, index=d.index)
    meta = d[["key", "workload_key", "family_key", "workload", "window_s", "config"]].copy()
    meta["full"] = ~d["early_exit"].astype(bool)
    return pd.concat([meta, X, t], axis=1).reset_index(drop=True)


def best_of(group: pd.DataFrame, objective: str = "total_throughput",
            tie_tol: float = 0.0) -> pd.Series | None:
    """The best non-starving row of one workload's configurations (None if all starve).

    ``tie_tol=0``: the highest ``objective`` (ties to fewer ``max_loras``): the
    exhaustive-search optimum. ``tie_tol>0``: among rows within ``tie_tol`` of the highest,
    the lowest p99 TTFT, as :func:`twin.ml.recommend.recommend` chooses (the twin often
    serves every request in several configurations: equal throughput, very different
    latency)."""
    ok = group[group["starts"] & ~group["starving"].astype(bool)]
    if ok.empty:
        return None
    top = ok[objective].max()
    if tie_tol > 0:
        near = ok[ok[objective] >= top * (1 - tie_tol)]
        return near.sort_values(["ttft_ms_p99", "max_loras"]).iloc[0]
    ok = ok.sort_values([objective, "max_loras"], ascending=[False, True])
    return ok.iloc[0]


#: throughputs within 0.5 % tie; the lower p99 TTFT wins (as recommend decides)
TIE_TOL = 0.005


def workload_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """One row per workload: features and the exhaustive-search targets over its grid."""
    rows = []
    for wk, g in sweep.groupby("workload_key", sort=True):
        first = g.iloc[0]
        r = {"workload_key": wk, "family_key": first["family_key"],
             "workload": first["workload"], "configs": int(g["starts"].sum())}
        r.update({n: float(first[f"f_{n}"]) for n in WORKLOAD_FEATURES})
        best = best_of(g, tie_tol=TIE_TOL)
        ok = g[g["starts"] & ~g["starving"].astype(bool)]
        r["starving_all"] = best is None
        r["best_max_loras"] = float(best["max_loras"]) if best is not None else np.nan
        r["max_throughput"] = float(ok["total_throughput"].max()) if best is not None else np.nan
        r["min_ok_max_loras"] = float(ok["max_loras"].min()) if len(ok) else np.nan
        r["best_ttft_p99"] = float(best["ttft_ms_p99"]) if best is not None else np.nan
        r["best_tpot_p50"] = float(best["tpot_ms_median"]) if best is not None else np.nan
        r["offered_tps"] = float(first["f_offered_tps"])
        rows.append(r)
    return pd.DataFrame(rows)


def family_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """One row per family (workloads equal but for adapter count and seed): the paper's
    targets, with the features of the workload at the most adapters served."""
    wt = workload_table(sweep)
    rows = []
    for fk, g in (wt.groupby("family_key", sort=True) if len(wt) else ()):
        g = g.sort_values("n_adapters")
        ok = g[~g["starving_all"]]
        at = ok.iloc[-1] if len(ok) else g.iloc[0]
        r = {"family_key": fk, "workloads": len(g)}
        r.update({n: float(at[n]) for n in WORKLOAD_FEATURES})
        r["max_served"] = float(at["n_adapters"]) if len(ok) else 0.0
        r["best_max_loras_at_max"] = float(at["best_max_loras"]) if len(ok) else np.nan
        r["max_throughput_at_max"] = float(at["max_throughput"]) if len(ok) else np.nan
        rows.append(r)
    # no family (e.g. a sweep without rate-class workloads): an empty table, same columns
    return pd.DataFrame(rows, columns=["family_key", "workloads", *WORKLOAD_FEATURES,
                                       "max_served", "best_max_loras_at_max",
                                       "max_throughput_at_max"])

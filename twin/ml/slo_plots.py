"""Plots of the SLO search, from twin runs only: the SLO frontier over the two knobs that
mattered most for the workload, with the recommended point, and the cost curve (GPUs vs
p99 TTFT) of the cost objective.

Which two knobs: :func:`top_knobs` ranks the searched knobs by how much of the spread of the
runs' (log) p99 TTFT their values explain (the between-group share of the variance, eta²),
from the runs made -- the workload's own answer, not a fixed pair.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _plt():
    import matplotlib  # lazy: plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: plotting only
    return plt


def top_knobs(trials: pd.DataFrame, knobs, n: int = 2) -> list[str]:
    """The ``n`` knobs whose values explain most of the runs' log p99 TTFT spread."""
    y = np.log(trials["ttft_p99"].astype(float).clip(lower=1e-3))
    ok = np.isfinite(y)
    t, y = trials[ok], y[ok]
    score = {}
    for k in knobs:
        if t[k].nunique() < 2 or y.var() <= 0:
            continue
        means = y.groupby(t[k]).transform("mean")
        score[k] = float(((means - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    order = sorted(score, key=lambda k: (-score[k], list(knobs).index(k)))
    return (order + [k for k in knobs if k not in order])[:n]


def plot_slo_frontier(search: dict, slo: dict, path, chosen=None):
    """The verified runs over the two knobs that mattered most (categorical axes, several
    runs per cell spread apart), coloured by p99 TTFT (log), circles meeting the SLOs,
    crosses missing them, the recommended configuration starred."""
    plt = _plt()
    from matplotlib.colors import LogNorm  # lazy: plotting only

    t = pd.DataFrame(search.get("trials", []))
    t = t[t["starts"].astype(bool)] if len(t) else t
    knobs = list(search.get("space", {}).get("knobs", [])) or ["max_loras"]
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    if not len(t):
        ax.text(0.5, 0.5, "no twin run started", ha="center", transform=ax.transAxes)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
    kx, ky = (top_knobs(t, knobs) + ["max_loras", "max_loras"])[:2]
    xs, ys = sorted(t[kx].unique()), sorted(t[ky].unique())
    cell: dict = {}
    X, Y = [], []
    for _, r in t.iterrows():
        c = (xs.index(r[kx]), ys.index(r[ky]))
        j = cell.get(c, 0)
        cell[c] = j + 1
        X.append(c[0] + 0.12 * ((j % 5) - 2))
        Y.append(c[1] + 0.12 * ((j // 5) - 0.5))
    # a run stopped once proven to miss (twin.ml.slo_stop): its proven lower bound
    early = np.array([r.get("slo_violated_early") is not None
                      and r.get("slo_violated_early") == True   # noqa: E712 (NaN: not set)
                      for _, r in t.iterrows()], dtype=bool)
    ttft = np.array([_bound(r, "ttft_p99") if e else r["ttft_p99"]
                     for e, (_, r) in zip(early, t.iterrows())], dtype=float).clip(min=1.0)
    met = np.array([_meets(r, slo) for _, r in t.iterrows()])
    norm = LogNorm(vmin=max(1.0, np.nanmin(ttft)), vmax=max(2.0, np.nanmax(ttft)))
    X, Y = np.array(X), np.array(Y)
    sc = ax.scatter(X[met], Y[met], c=ttft[met], norm=norm, cmap="viridis_r", marker="o",
                    s=60, edgecolors="black", label="twin run: meets the SLOs")
    full = ~met & ~early
    ax.scatter(X[full], Y[full], c=ttft[full], norm=norm, cmap="viridis_r", marker="X", s=60,
               label="twin run: misses them (or starves)")
    if early.any():
        ax.scatter(X[early], Y[early], c=ttft[early], norm=norm, cmap="viridis_r", marker="^",
                   s=50, edgecolors="grey", label="stopped early: misses them (p99 >= colour)")
    if chosen is not None and getattr(chosen, kx) in xs and getattr(chosen, ky) in ys:
        ax.plot(xs.index(getattr(chosen, kx)), ys.index(getattr(chosen, ky)), marker="*",
                color="gold", ms=20, mec="black", ls="", label="recommended (verified)")
    fig.colorbar(sc, ax=ax).set_label("p99 TTFT (ms, twin)", fontsize=8)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([f"{v:g}" for v in xs], fontsize=8)
    ax.set_yticks(range(len(ys)))
    ax.set_yticklabels([f"{v:g}" for v in ys], fontsize=8)
    ax.set_xlabel(kx)
    ax.set_ylabel(ky)
    s = ", ".join(f"p99 {k.upper()} <= {v:g} ms" for k, v in slo.items() if v)
    ax.set_title(f"SLO frontier ({s}): {len(t)} verified twin runs, {search['optimizer']}\n"
                 f"axes: the two knobs that moved p99 TTFT most", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=7,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bound(r, m: str) -> float:
    """A stopped run's proven lower bound of p99 ``m`` (NaN: none)."""
    lb = r.get("p99_lower_bounds")
    v = lb.get(m) if isinstance(lb, dict) else None
    return float(v) if v is not None else np.nan


def _meets(r, slo: dict) -> bool:
    if not r.get("full", False) or r.get("starving", True):
        return False
    return all(float(r.get(f"{k}_p99") or np.inf) <= v for k, v in slo.items() if v)


def plot_cost_curve(curve: list, slo: dict, path, chosen: int | None = None):
    """GPUs vs the worst GPU's verified p99 TTFT (log), the SLO as a line, the fewest GPUs
    meeting it starred; counts that failed drawn hollow (their first failing GPU's best)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    g = np.array([c["gpus"] for c in curve])
    v = np.array([min(c["ttft_p99"], 1e9) for c in curve], dtype=float)
    met = np.array([c["met"] for c in curve], dtype=bool)
    ax.plot(g, v, color="gray", lw=1)
    ax.plot(g[met], v[met], "o", color="tab:green", label="every GPU meets the SLOs")
    ax.plot(g[~met], v[~met], "o", mfc="none", color="tab:red",
            label="misses (first failing GPU's best p99)")
    if slo.get("ttft"):
        ax.axhline(slo["ttft"], color="black", ls="--", lw=1, label="TTFT SLO")
    if chosen is not None and chosen in set(g.tolist()):
        ax.plot(chosen, v[list(g).index(chosen)], "*", color="gold", ms=18, mec="black",
                label="fewest GPUs")
    ax.set_yscale("log")
    ax.set_xticks(sorted(set(g.tolist())))
    ax.set_xlabel("GPUs")
    ax.set_ylabel("p99 TTFT, worst GPU (ms, twin)")
    ax.set_title("cost curve: GPUs vs p99 TTFT at the trace's load", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

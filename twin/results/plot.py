"""Timeline plot of a run: throughput, running/waiting requests, KV usage, adapter loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib   # lazy: matplotlib (~30 MB) only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # lazy: as above, after the Agg backend is chosen

    return plt


def _throughput(tl, points: int = 100):
    """(times, tokens/s) from a timeline's cumulative tokens, ~``points`` windows."""
    t = tl["time_s"].to_numpy()
    window = max((t[-1] - t[0]) / points, 1e-9)
    edges = np.arange(t[0], t[-1] + window, window)
    tok = np.interp(edges, t, tl["tokens"].to_numpy())
    return edges[1:], np.diff(tok) / window


def plot_replicas(results, labels, path: str | Path, title: str = "") -> Path:
    """A fleet's timeline, one line per replica (``results``: their RunResults):
    throughput, waiting requests and cumulative adapter loads over time."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for res, label in zip(results, labels):
        tl = res.timeline
        if len(tl) < 2:
            continue
        axes[0].plot(*_throughput(tl), lw=0.8, label=label)
        axes[1].plot(tl["time_s"], tl["waiting"], lw=0.8)
        axes[2].plot(tl["time_s"], tl["adapter_loads"], lw=0.8)
    for ax, name in zip(axes, ("tokens/s", "waiting requests", "adapter loads (cumulative)")):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("time (s)")
    axes[0].set_title(title, fontsize=9)
    if len(results) <= 16:
        axes[0].legend(loc="upper left", fontsize=7, ncol=4)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(result, path: str | Path, other=None, labels=("twin", "other")) -> Path:
    """Four stacked panels over time; with ``other`` (a second RunResult) both are overlaid."""
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
    runs = [(result, labels[0], "C0")] + ([(other, labels[1], "C3")] if other is not None else [])
    for res, label, color in runs:
        tl = res.timeline
        t = tl["time_s"].to_numpy()
        if len(t) < 2:
            continue
        axes[0].plot(*_throughput(tl), color=color, label=label)
        axes[1].plot(t, tl["running"], color=color, label=f"{label} running")
        axes[1].plot(t, tl["waiting"], color=color, ls="--", label=f"{label} waiting")
        axes[2].plot(t, 100 * tl["kv_usage"], color=color, label=label)
        axes[3].plot(t, tl["adapter_loads"], color=color, label=f"{label} loads")
        axes[3].plot(t, tl["preemptions"], color=color, ls=":", label=f"{label} preemptions")
    axes[0].set_ylabel("tokens/s")
    axes[1].set_ylabel("requests")
    axes[2].set_ylabel("KV usage (%)")
    axes[3].set_ylabel("cumulative")
    axes[3].set_xlabel("time (s)")
    s = result.summary
    verdict = "STARVING" if s["starving"] else "keeps up"
    axes[0].set_title(f"{s['total_throughput']:.0f} tok/s total, "
                      f"{100 * s['achieved_over_offered']:.0f}% of offered ({verdict}); "
                      f"TTFT mean {s['ttft_ms']['mean']:.0f} ms, ITL mean {s['itl_ms']['mean']:.1f} ms")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

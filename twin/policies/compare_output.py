"""What ``twin compare`` writes: the table, the summary and the four-panel plot of a
:class:`~twin.policies.compare.Comparison`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twin.outputs import json_document
from twin.policies.compare import Comparison


def plot_comparison(cmp: Comparison, path, title: str = "") -> str:
    """Four panels: throughput vs offered, TTFT p50/p99, TPOT p50/p99, memory per GPU."""
    import matplotlib  # lazy: matplotlib only for a plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend

    t = cmp.table
    x = np.arange(len(t))
    names = [f"{p}\n{g} GPU" for p, g in zip(t["policy"], t["gpus"])]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    colors = ["C2" if p == cmp.winner else "C0" for p in t["policy"]]
    a = ax[0, 0]
    a.bar(x, t["total_tok_per_s"], color=colors)
    # each strategy's own offered load (run to completion its span is its own)
    a.scatter(x, t["offered_tok_per_s"], marker="_", s=900, color="k", zorder=3,
              label="offered")
    for i, (s, pct) in enumerate(zip(t["starving"], t["pct_offered"])):
        a.text(i, t["total_tok_per_s"].iloc[i], f"{pct:.0f}%" + (" !" if s else ""),
               ha="center", va="bottom", fontsize=8)
    a.set_ylabel("total tokens/s")
    a.set_title("throughput (green: winner, !: starving)")
    a.legend(fontsize=8)
    for a, key, label in ((ax[0, 1], "ttft", "TTFT (ms)"), (ax[1, 0], "tpot", "TPOT (ms)")):
        w = 0.38
        a.bar(x - w / 2, t[f"{key}_p50_ms"], w, label="p50")
        a.bar(x + w / 2, t[f"{key}_p99_ms"], w, label="p99")
        a.set_yscale("log")
        a.set_ylabel(label)
        a.legend(fontsize=8)
    a = ax[1, 1]
    bottom = np.zeros(len(t))
    for key, label, c in (("weights_gib_per_gpu", "weights", "C7"),
                          ("activations_gib_per_gpu", "activations", "C8"),
                          ("adapters_gib_per_gpu", "adapters", "C3"),
                          ("kv_gib_per_gpu", "KV cache", "C0")):
        v = t[key].to_numpy(dtype=float)
        a.bar(x, v, bottom=bottom, label=label, color=c)
        bottom += v
    a.set_ylabel("GiB per GPU")
    a.set_title("memory split (adapters: slots or mean resident pages)")
    a.legend(fontsize=8)
    for a in ax.flat:
        a.set_xticks(x)
        a.set_xticklabels(names, fontsize=8)
        a.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_comparison(cmp: Comparison, out, *, trace, config, gpus=None) -> None:
    """What ``twin compare`` writes into ``out``: table.csv, summary.json (config, winner,
    verdict, costs, table, each deployment) and compare.png. ``trace``: the trace's path."""
    out, trace = Path(out), Path(trace)
    cmp.table.to_csv(out / "table.csv", index=False)
    (out / "summary.json").write_text(json_document({
        "trace": str(trace), "config": config.to_dict(), "gpus": gpus,
        "winner": cmp.winner, "tied": cmp.tied, "verdict": cmp.verdict, "costs": cmp.costs,
        "table": cmp.table.to_dict(orient="records"),
        "deployments": {n: r.result.summary["deployment"] for n, r in cmp.runs.items()},
    }, indent=2) + "\n")
    plot_comparison(cmp, out / "compare.png",
                    title=f"{trace.name}: {cmp.offered_text(brief=True)}")

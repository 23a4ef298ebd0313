"""Which features drove the model's pick: tree-path attribution on the shipped ensembles.

The recommender's models are gradient-boosted trees whose internal nodes keep their value
(the mean update of the samples that reached them), so a prediction splits exactly into a
base and one term per feature: along each tree's path, every split moves the value from a
node to its child, and that move is charged to the split's feature (Saabas' attribution;
the terms sum to the prediction's raw score). :func:`explain` gives the largest terms for
the model's predicted-best configuration: the report's "why" line, and
``recommendation.json``'s ``explanation``.
"""

from __future__ import annotations

import numpy as np

TARGETS = {"achieved": "achieved share of the offered load",
           "ttft_p99": "log p99 TTFT"}


def contributions(model_dict: dict, x: dict) -> tuple[float, dict]:
    """(raw base score, {feature: summed contribution}) of one ensemble (exported dict)
    for the feature values ``x``; base + the sum of contributions = the raw prediction."""
    feats = model_dict["features"]
    base = float(model_dict["base"])
    out: dict = {}
    for t in model_dict["trees"]:
        node, left, value = 0, t["left"], t["value"]
        base += float(value[0])
        while left[node] >= 0:
            f = t["feature"][node]
            v = float(np.float32(x.get(feats[f], np.nan)))
            child = left[node] if v <= t["threshold"][node] else t["right"][node]
            out[feats[f]] = out.get(feats[f], 0.0) + float(value[child]) - float(value[node])
            node = child
    return base, out


def explain(model, row, top: int = 5) -> dict:
    """The ``top`` features that moved each of :data:`TARGETS`' predictions most for the
    candidate ``row`` (its feature columns), with the feature's value and its term."""
    x = {k: row[k] for k in row.index if not str(k).startswith(("pred_", "ver_", "_"))} \
        if hasattr(row, "index") else dict(row)
    out = {"method": "tree-path attribution (Saabas) on the shipped gradient-boosted trees",
           "max_loras": int(x.get("max_loras", 0)), "targets": {}}
    for target, what in TARGETS.items():
        m = getattr(model, "models", {}).get(target)
        if not isinstance(m, dict) or "trees" not in m:   # not a tree ensemble: no terms
            continue
        base, c = contributions(m, x)
        order = sorted(c, key=lambda f: (-abs(c[f]), f))[:top]
        out["targets"][target] = {
            "what": what, "base": base, "raw": base + sum(c.values()),
            "features": [{"feature": f, "value": _num(x.get(f)), "contribution": c[f]}
                         for f in order]}
    return out


def explanation_lines(e: dict | None) -> list[str]:
    """The report's lines: per target, the features that drove the prediction."""
    if not e or not e.get("targets"):
        return []
    L = [f"why the model picked max_loras={e['max_loras']} ({e['method']}):"]
    for t in e["targets"].values():
        terms = ", ".join(f"{x['feature']}={_fmt(x['value'])} ({x['contribution']:+.3f})"
                          for x in t["features"])
        L.append(f"  {t['what']}: {terms}")
    return L


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fmt(v) -> str:
    return "?" if v is None else f"{v:.3g}"

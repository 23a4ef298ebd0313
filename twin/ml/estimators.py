"""Estimators fitted on the twin's sweeps, scikit-learn style (``fit``/``predict``, parameters in
``__init__``, fitted attributes ending in ``_``).

Interpretable:
- :class:`SimplifiedTreeRegressor`: one shallow regression tree whose leaves are snapped
  (optionally to a grid, e.g. the ``max_loras`` grid) and whose sibling leaves with equal
  values are merged, bottom-up — the "simplified tree" of arXiv 2508.08343; readable as
  text and as a PNG.
- :class:`EBMRegressor`: an Explainable Boosting Machine (``interpret-core``).
- :class:`MonotoneLinearRegressor`: least squares with sign-constrained coefficients.

Accurate: :class:`XGBRegressorModel` (xgboost) and :class:`TreeEnsemble` (scikit-learn
gradient boosting, exported to plain JSON arrays and evaluated by :class:`PackedTrees` in
numpy: the recommender ships this one, so recommending needs neither xgboost nor pickle;
both live in :mod:`twin.ml.ensemble`, re-exported here with the other estimators).

Each heavy library (scikit-learn, interpret, xgboost, matplotlib) is imported inside the
method that needs it, so importing this module costs numpy and pandas only.

:func:`evaluate` scores models on held-out *workloads* (``GroupKFold`` over a group key):
SMAPE (2|a−b|/(|a|+|b|)) median / mean / p90, R², fit time and prediction time per row.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from twin.ml.ensemble import PackedTrees, TreeEnsemble, as_array, column_names, split_threshold
from twin.results import smape   # re-exported: the one definition

__all__ = ["SimplifiedTreeRegressor", "EBMRegressor", "MonotoneLinearRegressor",
           "XGBRegressorModel", "TreeEnsemble", "PackedTrees", "split_threshold", "smape",
           "evaluate", "plot_importances"]


# -- the simplified tree ------------------------------------------------------------------------

class SimplifiedTreeRegressor:
    """A shallow regression tree with equal sibling leaves merged.

    ``grid``: leaf values are snapped to the nearest grid value (e.g. ``max_loras`` values)
    before merging; otherwise they are rounded to ``round_sig`` significant digits. Fitted:
    ``feature_``, ``threshold_``, ``left_``, ``right_``, ``value_`` (node arrays, -1 = leaf),
    ``n_leaves_``, ``feature_names_in_``, ``feature_importances_``.
    """

    def __init__(self, max_depth: int = 4, min_samples_leaf: int = 10, grid=None,
                 round_sig: int = 2, random_state: int = 0):
        self.max_depth, self.min_samples_leaf = max_depth, min_samples_leaf
        self.grid, self.round_sig, self.random_state = grid, round_sig, random_state

    def get_params(self, deep=True):
        return {"max_depth": self.max_depth, "min_samples_leaf": self.min_samples_leaf,
                "grid": self.grid, "round_sig": self.round_sig,
                "random_state": self.random_state}

    def set_params(self, **p):
        for k, v in p.items():
            setattr(self, k, v)
        return self

    def _snap(self, v: float) -> float:
        if self.grid is not None:
            g = np.asarray(self.grid, dtype=np.float64)
            return float(g[np.argmin(np.abs(g - v))])
        if v == 0 or not np.isfinite(v):
            return float(v)
        return float(np.round(v, -int(np.floor(np.log10(abs(v)))) + self.round_sig - 1))

    def fit(self, X, y):
        from sklearn.tree import DecisionTreeRegressor  # lazy: scikit-learn only to fit

        Xa = as_array(X)
        self.feature_names_in_ = np.array(column_names(X, Xa.shape[1]), dtype=object)
        tree = DecisionTreeRegressor(max_depth=self.max_depth,
                                     min_samples_leaf=self.min_samples_leaf,
                                     random_state=self.random_state)
        tree.fit(Xa, np.asarray(y, dtype=np.float64))
        t = tree.tree_
        feat, thr = t.feature.copy(), t.threshold.copy()
        left, right = t.children_left.copy(), t.children_right.copy()
        value = np.array([self._snap(v) for v in t.value[:, 0, 0]])
        samples = t.n_node_samples.copy()

        def merge(i):  # post-order: collapse a split whose two children are equal leaves
            if left[i] < 0:
                return
            merge(left[i])
            merge(right[i])
            li, ri = left[i], right[i]
            if left[li] < 0 and left[ri] < 0 and value[li] == value[ri]:
                value[i] = value[li]
                left[i] = right[i] = -1
                feat[i] = -2
        merge(0)
        # compact the reachable nodes
        order, stack = [], [0]
        while stack:
            i = stack.pop()
            order.append(i)
            if left[i] >= 0:
                stack += [right[i], left[i]]
        idx = {old: new for new, old in enumerate(order)}
        self.feature_ = np.array([feat[o] if left[o] >= 0 else -2 for o in order])
        self.threshold_ = np.array([thr[o] if left[o] >= 0 else np.nan for o in order])
        self.left_ = np.array([idx[left[o]] if left[o] >= 0 else -1 for o in order])
        self.right_ = np.array([idx[right[o]] if left[o] >= 0 else -1 for o in order])
        self.value_ = np.array([value[o] for o in order])
        self.samples_ = np.array([samples[o] for o in order])
        self.n_leaves_ = int((self.left_ < 0).sum())
        imp = np.zeros(Xa.shape[1])
        imp_full = tree.feature_importances_
        used = set(self.feature_[self.feature_ >= 0].tolist())
        for f in used:
            imp[f] = imp_full[f]
        self.feature_importances_ = imp / imp.sum() if imp.sum() > 0 else imp
        return self

    def predict(self, X) -> np.ndarray:
        Xa = as_array(X).astype(np.float32).astype(np.float64)
        node = np.zeros(len(Xa), dtype=np.int64)
        rows = np.arange(len(Xa))
        for _ in range(self.max_depth + 1):
            inner = self.left_[node] >= 0
            if not inner.any():
                break
            f = np.where(inner, self.feature_[node], 0)
            go_left = Xa[rows, f] <= np.where(inner, self.threshold_[node], np.inf)
            node = np.where(inner, np.where(go_left, self.left_[node], self.right_[node]), node)
        return self.value_[node]

    def export_text(self, fmt: str = "{:.4g}") -> str:
        """The tree as indented if/else text."""
        names = self.feature_names_in_
        lines = []

        def walk(i, depth):
            pad = "|   " * depth
            if self.left_[i] < 0:
                lines.append(f"{pad}|--> {fmt.format(self.value_[i])}  "
                             f"({self.samples_[i]} samples)")
                return
            name, t = names[self.feature_[i]], fmt.format(self.threshold_[i])
            lines.append(f"{pad}|-- {name} <= {t}")
            walk(self.left_[i], depth + 1)
            lines.append(f"{pad}|-- {name} >  {t}")
            walk(self.right_[i], depth + 1)
        walk(0, 0)
        return "\n".join(lines)

    def plot(self, path, title: str = "", fmt: str = "{:.4g}"):
        """Draw the tree to a PNG."""
        import matplotlib  # lazy: plotting only

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: plotting only

        pos, leaves = {}, [0]

        def place(i, depth):
            if self.left_[i] < 0:
                pos[i] = (leaves[0], -depth)
                leaves[0] += 1
                return
            place(self.left_[i], depth + 1)
            place(self.right_[i], depth + 1)
            pos[i] = ((pos[self.left_[i]][0] + pos[self.right_[i]][0]) / 2, -depth)
        place(0, 0)
        w = max(6.0, 1.9 * leaves[0])
        h = max(3.0, 1.3 * (1 - min(y for _, y in pos.values())))
        fig, ax = plt.subplots(figsize=(w, h))
        for i, (x, y) in pos.items():
            if self.left_[i] >= 0:
                for c, lab in ((self.left_[i], "yes"), (self.right_[i], "no")):
                    cx, cy = pos[c]
                    ax.plot([x, cx], [y, cy], color="0.6", lw=1, zorder=1)
                    ax.text((x + cx) / 2, (y + cy) / 2, lab, fontsize=7, color="0.4",
                            ha="center")
                name = self.feature_names_in_[self.feature_[i]]
                txt = f"{name}\n<= {fmt.format(self.threshold_[i])}"
                fc = "#dde8f5"
            else:
                txt = f"{fmt.format(self.value_[i])}\n(n={self.samples_[i]})"
                fc = "#f5e6cc"
            ax.text(x, y, txt, ha="center", va="center", fontsize=8, zorder=2,
                    bbox=dict(boxstyle="round", fc=fc, ec="0.5"))
        ax.set_xlim(-0.8, leaves[0] - 0.2)
        ax.set_ylim(min(y for _, y in pos.values()) - 0.6, 0.6)
        ax.axis("off")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def to_dict(self) -> dict:
        return {"kind": "simplified_tree", "features": list(self.feature_names_in_),
                "feature": self.feature_.tolist(), "threshold":
                [None if not np.isfinite(t) else float(t) for t in self.threshold_],
                "left": self.left_.tolist(), "right": self.right_.tolist(),
                "value": self.value_.tolist(), "samples": self.samples_.tolist(),
                "max_depth": self.max_depth}

    @classmethod
    def from_dict(cls, d: dict) -> "SimplifiedTreeRegressor":
        m = cls(max_depth=d["max_depth"])
        m.feature_names_in_ = np.array(d["features"], dtype=object)
        m.feature_ = np.array(d["feature"])
        m.threshold_ = np.array([np.nan if t is None else t for t in d["threshold"]])
        m.left_, m.right_ = np.array(d["left"]), np.array(d["right"])
        m.value_, m.samples_ = np.array(d["value"], dtype=np.float64), np.array(d["samples"])
        m.n_leaves_ = int((m.left_ < 0).sum())
        return m


# -- EBM, monotone linear, xgboost -----------------------------------------------------------

class EBMRegressor:
    """An Explainable Boosting Machine (``interpret-core``), kept small for speed."""

    def __init__(self, interactions: int = 5, max_bins: int = 64, outer_bags: int = 4,
                 random_state: int = 0):
        self.interactions, self.max_bins = interactions, max_bins
        self.outer_bags, self.random_state = outer_bags, random_state

    def get_params(self, deep=True):
        return {"interactions": self.interactions, "max_bins": self.max_bins,
                "outer_bags": self.outer_bags, "random_state": self.random_state}

    def fit(self, X, y):
        try:
            from interpret.glassbox import ExplainableBoostingRegressor  # lazy: optional extra
        except ImportError:
            raise ImportError("EBMRegressor needs interpret-core: pip install 'twin[ml]'") from None
        Xa = as_array(X)
        self.feature_names_in_ = np.array(column_names(X, Xa.shape[1]), dtype=object)
        self.model_ = ExplainableBoostingRegressor(
            feature_names=list(self.feature_names_in_), interactions=self.interactions,
            max_bins=self.max_bins, outer_bags=self.outer_bags, n_jobs=1,
            random_state=self.random_state)
        self.model_.fit(Xa, np.asarray(y, dtype=np.float64))
        imp = np.zeros(Xa.shape[1])
        for term, v in zip(self.model_.term_features_, self.model_.term_importances()):
            for f in term:
                imp[f] += v / len(term)
        self.feature_importances_ = imp / imp.sum() if imp.sum() > 0 else imp
        return self

    def predict(self, X) -> np.ndarray:
        return self.model_.predict(as_array(X))


class MonotoneLinearRegressor:
    """Least squares on standardised features with coefficient signs constrained:
    ``monotone[i]`` = +1 (non-decreasing), -1 (non-increasing) or 0 (free). Fitted:
    ``coef_`` (original units), ``intercept_``."""

    def __init__(self, monotone: Sequence[int] | None = None):
        self.monotone = monotone

    def get_params(self, deep=True):
        return {"monotone": self.monotone}

    def fit(self, X, y):
        from sklearn.linear_model import LinearRegression  # lazy: scikit-learn only to fit

        Xa = as_array(X)
        self.feature_names_in_ = np.array(column_names(X, Xa.shape[1]), dtype=object)
        mono = np.zeros(Xa.shape[1]) if self.monotone is None else np.asarray(self.monotone)
        self.mean_, self.scale_ = Xa.mean(0), Xa.std(0)
        self.scale_[self.scale_ == 0] = 1.0
        Z = (Xa - self.mean_) / self.scale_
        cols, signs, src = [], [], []
        for j in range(Z.shape[1]):
            for s in ([mono[j]] if mono[j] != 0 else [1.0, -1.0]):
                cols.append(s * Z[:, j])
                signs.append(s)
                src.append(j)
        lr = LinearRegression(positive=True).fit(np.column_stack(cols), np.asarray(y, float))
        beta = np.zeros(Z.shape[1])
        for c, s, j in zip(lr.coef_, signs, src):
            beta[j] += c * s
        self.coef_ = beta / self.scale_
        self.intercept_ = float(lr.intercept_ - (beta * self.mean_ / self.scale_).sum())
        a = np.abs(beta)
        self.feature_importances_ = a / a.sum() if a.sum() > 0 else a
        return self

    def predict(self, X) -> np.ndarray:
        return as_array(X) @ self.coef_ + self.intercept_


class XGBRegressorModel:
    """xgboost's gradient-boosted trees (optional extra ``twin[ml]``)."""

    def __init__(self, n_estimators: int = 300, max_depth: int = 5, learning_rate: float = 0.05,
                 subsample: float = 0.9, random_state: int = 0):
        self.n_estimators, self.max_depth = n_estimators, max_depth
        self.learning_rate, self.subsample = learning_rate, subsample
        self.random_state = random_state

    def get_params(self, deep=True):
        return {"n_estimators": self.n_estimators, "max_depth": self.max_depth,
                "learning_rate": self.learning_rate, "subsample": self.subsample,
                "random_state": self.random_state}

    def fit(self, X, y):
        try:
            from xgboost import XGBRegressor  # lazy: optional extra
        except ImportError:
            raise ImportError("XGBRegressorModel needs xgboost: pip install 'twin[ml]'") from None
        Xa = as_array(X)
        self.feature_names_in_ = np.array(column_names(X, Xa.shape[1]), dtype=object)
        self.model_ = XGBRegressor(n_estimators=self.n_estimators, max_depth=self.max_depth,
                                   learning_rate=self.learning_rate, subsample=self.subsample,
                                   n_jobs=1, random_state=self.random_state, tree_method="hist")
        self.model_.fit(Xa, np.asarray(y, dtype=np.float64))
        self.feature_importances_ = self.model_.feature_importances_
        return self

    def predict(self, X) -> np.ndarray:
        return self.model_.predict(as_array(X)).astype(np.float64)


# -- evaluation on held-out workloads ----------------------------------------------------------

def evaluate(models: dict[str, Callable[[], object]], X: pd.DataFrame, y, groups, *,
             n_splits: int = 5, log_target: bool = False,
             target: str = "") -> tuple[pd.DataFrame, dict]:
    """``GroupKFold`` over ``groups`` (workloads or families): every fold's test rows come
    from workloads the model never saw. ``models`` maps a name to a factory. Returns
    (one row per model: SMAPE median/mean/p90, R², fit seconds, predict µs per row;
    {name: out-of-fold predictions})."""
    from sklearn.metrics import r2_score  # lazy: scikit-learn only to evaluate
    from sklearn.model_selection import GroupKFold  # lazy: scikit-learn only to evaluate

    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    k = min(n_splits, len(np.unique(groups)))
    rows, oof = [], {}
    for name, make in models.items():
        pred = np.full(len(y), np.nan)
        fit_s = pred_s = 0.0
        for tr, te in GroupKFold(n_splits=k).split(X, y, groups):
            m = make()
            yt = np.log(np.maximum(y[tr], 1e-6)) if log_target else y[tr]
            t0 = time.perf_counter()
            m.fit(X.iloc[tr], yt)
            fit_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            p = m.predict(X.iloc[te])
            pred_s += time.perf_counter() - t0
            pred[te] = np.exp(p) if log_target else p
        s = smape(y, pred)
        rows.append({"target": target, "model": name, "smape_median": float(np.median(s)),
                     "smape_mean": float(np.mean(s)), "smape_p90": float(np.percentile(s, 90)),
                     "r2": float(r2_score(y, pred)), "fit_s": fit_s,
                     "predict_us_per_row": 1e6 * pred_s / len(y), "rows": len(y),
                     "groups": int(len(np.unique(groups)))})
        oof[name] = pred
    return pd.DataFrame(rows), oof


def plot_importances(importances: dict[str, np.ndarray], feature_names, path, title=""):
    """Horizontal bars of feature importances, one panel per model."""
    import matplotlib  # lazy: plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: plotting only

    k = len(importances)
    names = list(feature_names)
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 0.28 * len(names) + 1.2), sharey=True,
                             squeeze=False)
    order = np.argsort(np.mean([np.asarray(v) for v in importances.values()], axis=0))
    for ax, (model, imp) in zip(axes[0], importances.items()):
        imp = np.asarray(imp)
        ax.barh(np.arange(len(names)), imp[order], color="#4c72b0")
        ax.set_title(model, fontsize=9)
        ax.set_yticks(np.arange(len(names)))
        ax.set_yticklabels([names[i] for i in order], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

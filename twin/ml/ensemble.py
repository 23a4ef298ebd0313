"""The recommender's shipped estimator: scikit-learn gradient-boosted trees
(:class:`TreeEnsemble`) exported to plain JSON arrays and evaluated by :class:`PackedTrees`
in numpy.

Apart from the other estimators (:mod:`twin.ml.estimators`) because recommending reads only
the exported arrays: this module imports scikit-learn only inside :meth:`TreeEnsemble.fit`,
so ``twin recommend`` needs neither scikit-learn, xgboost nor pickle.
"""

from __future__ import annotations

import numpy as np


def as_array(X) -> np.ndarray:
    return np.asarray(X.to_numpy() if hasattr(X, "to_numpy") else X, dtype=np.float64)


def column_names(X, n: int) -> list[str]:
    return list(X.columns) if hasattr(X, "columns") else [f"x{i}" for i in range(n)]


def split_threshold(t: float) -> float:
    """The shortest decimal that splits float32 feature values as threshold ``t`` does.

    Trees compare float32 features (``x <= t``; sklearn's thresholds are midpoints of
    float32 training values). Rounding a threshold to a fixed number of digits can cross a
    value that recurs exactly (a per-adapter rate of 1/60 req/s sits just above a 7-digit
    rounded threshold) and reroute it, so a saved model predicted differently from the
    fitted one; any decimal in [largest float32 <= t, smallest float32 > t) routes alike."""
    if not np.isfinite(t):
        return float(t)
    a = np.float32(t)
    if a > t:
        a = np.nextafter(a, np.float32(-np.inf))
    b = np.nextafter(a, np.float32(np.inf))
    for digits in range(1, 18):
        d = float(f"{t:.{digits}g}")
        if a <= d < b:
            return d
    return float(t)


class TreeEnsemble:
    """Gradient-boosted regression trees (``kind='regressor'``) or a binary classifier
    (``kind='classifier'``, predicts P(class 1)) from scikit-learn, exportable with
    :meth:`to_dict` to plain arrays that :class:`PackedTrees` evaluates without sklearn.
    ``log_target``: fit log(y) (positive targets spanning decades, e.g. latencies)."""

    def __init__(self, kind: str = "regressor", n_estimators: int = 200, max_depth: int = 3,
                 learning_rate: float = 0.08, subsample: float = 0.9, log_target: bool = False,
                 random_state: int = 0):
        self.kind, self.n_estimators, self.max_depth = kind, n_estimators, max_depth
        self.learning_rate, self.subsample, self.log_target = learning_rate, subsample, log_target
        self.random_state = random_state

    def get_params(self, deep=True):
        return {k: getattr(self, k) for k in ("kind", "n_estimators", "max_depth",
                                              "learning_rate", "subsample", "log_target",
                                              "random_state")}

    def fit(self, X, y, sample_weight=None):
        from sklearn.ensemble import (  # lazy: scikit-learn only to fit, not to predict
            GradientBoostingClassifier, GradientBoostingRegressor)

        Xa = as_array(X)
        self.feature_names_in_ = np.array(column_names(X, Xa.shape[1]), dtype=object)
        y = np.asarray(y, dtype=np.float64)
        kw = dict(n_estimators=self.n_estimators, max_depth=self.max_depth,
                  learning_rate=self.learning_rate, subsample=self.subsample,
                  random_state=self.random_state)
        if self.kind == "classifier":
            self.model_ = GradientBoostingClassifier(**kw).fit(Xa, y.astype(int),
                                                               sample_weight=sample_weight)
            raw = self.model_.decision_function(Xa)
        else:
            yt = np.log(np.maximum(y, 1e-6)) if self.log_target else y
            self.model_ = GradientBoostingRegressor(**kw).fit(Xa, yt, sample_weight=sample_weight)
            raw = self.model_.predict(Xa)
        trees = [e[0] for e in self.model_.estimators_]
        tree_sum = np.sum([t.predict(Xa.astype(np.float32)) for t in trees], axis=0)
        self.base_ = float(np.mean(raw - self.learning_rate * tree_sum))
        self.feature_importances_ = self.model_.feature_importances_
        return self

    def _raw(self, X):
        Xa = as_array(X)
        return (self.model_.decision_function(Xa) if self.kind == "classifier"
                else self.model_.predict(Xa))

    def predict(self, X) -> np.ndarray:
        raw = self._raw(X)
        if self.kind == "classifier":
            return 1.0 / (1.0 + np.exp(-raw))
        return np.exp(raw) if self.log_target else raw

    def to_dict(self) -> dict:
        trees = []
        for e in self.model_.estimators_:
            t = e[0].tree_
            trees.append({"feature": t.feature.tolist(),
                          "threshold": [split_threshold(x) for x in t.threshold.tolist()],
                          "left": t.children_left.tolist(), "right": t.children_right.tolist(),
                          "value": (t.value[:, 0, 0] * self.learning_rate).tolist()})
        link = "logistic" if self.kind == "classifier" else ("exp" if self.log_target else
                                                             "identity")
        return {"kind": "tree_ensemble", "features": list(self.feature_names_in_),
                "base": self.base_, "link": link, "max_depth": self.max_depth, "trees": trees}


def reindexed(model: dict, features) -> dict:
    """An exported ensemble (:meth:`TreeEnsemble.to_dict`) over the longer feature list
    ``features`` (a superset of its own, in any order): the same trees, their split indices
    remapped, so that models fitted on different features can be packed together."""
    pos = {f: i for i, f in enumerate(features)}
    old = model["features"]
    trees = [{**t, "feature": [pos[old[f]] if lo >= 0 else f
                               for f, lo in zip(t["feature"], t["left"])]}
             for t in model["trees"]]
    return {**model, "features": list(features), "trees": trees}


class PackedTrees:
    """Several exported tree ensembles evaluated together, in numpy: one pass over all
    trees of all models (leaves loop to themselves, so a fixed number of steps suffices)."""

    def __init__(self, models: dict[str, dict]):
        self.names = list(models)
        feats = [tuple(m["features"]) for m in models.values()]
        if len(set(feats)) > 1:
            raise ValueError("packed models must share their features")
        self.features = list(feats[0]) if feats else []
        F, T, L, R, V, roots, owner = [], [], [], [], [], [], []
        off = 0
        self.base = np.array([m["base"] for m in models.values()])
        self.link = [m["link"] for m in models.values()]
        self.depth = max((m["max_depth"] for m in models.values()), default=1)
        for k, m in enumerate(models.values()):
            for t in m["trees"]:
                left = np.asarray(t["left"])
                n = len(left)
                leaf = left < 0
                idx = np.arange(n) + off
                F.append(np.where(leaf, 0, np.asarray(t["feature"])))
                T.append(np.where(leaf, np.inf, np.asarray(t["threshold"], dtype=np.float64)))
                L.append(np.where(leaf, idx, left + off))
                R.append(np.where(leaf, idx, np.asarray(t["right"]) + off))
                V.append(np.asarray(t["value"], dtype=np.float64))
                roots.append(off)
                owner.append(k)
                off += n
        self.F = np.concatenate(F).astype(np.int64)
        self.T = np.concatenate(T)
        self.L = np.concatenate(L).astype(np.int64)
        self.R = np.concatenate(R).astype(np.int64)
        self.V = np.concatenate(V)
        self.roots = np.asarray(roots, dtype=np.int64)
        owner = np.asarray(owner)
        self.starts = np.r_[0, np.flatnonzero(np.diff(owner)) + 1]

    def predict(self, X) -> dict[str, np.ndarray]:
        """{model name: predictions} for the rows of ``X`` (columns in ``features`` order)."""
        Xa = as_array(X).astype(np.float32).astype(np.float64)
        n = len(Xa)
        node = np.broadcast_to(self.roots, (n, len(self.roots))).copy()
        rows = np.arange(n)[:, None]
        for _ in range(self.depth):
            go_left = Xa[rows, self.F[node]] <= self.T[node]
            node = np.where(go_left, self.L[node], self.R[node])
        raw = np.add.reduceat(self.V[node], self.starts, axis=1) + self.base
        out = {}
        for k, name in enumerate(self.names):
            r = raw[:, k]
            link = self.link[k]
            out[name] = (1.0 / (1.0 + np.exp(-r)) if link == "logistic"
                         else np.exp(r) if link == "exp" else r)
        return out

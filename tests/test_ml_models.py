"""Models: scikit-learn conventions, the simplified tree, exported ensembles, evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twin.ml.estimators import (MonotoneLinearRegressor, PackedTrees, SimplifiedTreeRegressor,
                                TreeEnsemble, evaluate, plot_importances, smape)
from twin.ml.features import workload_features


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.uniform(0, 1, size=(300, 4)), columns=["a", "b", "c", "d"])
    y = 3 * X["a"] + np.where(X["b"] > 0.5, 1.0, 0.0) + rng.normal(0, 0.05, 300)
    return X, y.to_numpy()


def _conventions(model, X, y):
    public_before = {k for k in vars(model) if not k.startswith("_")}
    assert all(not k.endswith("_") for k in public_before), "no fitted state before fit"
    assert model.fit(X, y) is model
    fitted = {k for k in vars(model) if not k.startswith("_")} - public_before
    assert fitted and all(k.endswith("_") for k in fitted), fitted
    p = model.predict(X)
    assert p.shape == (len(X),) and np.isfinite(p).all()
    return p


@pytest.mark.parametrize("make", [
    lambda: SimplifiedTreeRegressor(max_depth=3),
    lambda: MonotoneLinearRegressor(monotone=[1, 1, 0, 0]),
    lambda: TreeEnsemble(n_estimators=30),
    lambda: TreeEnsemble(kind="classifier", n_estimators=30),
])
def test_fit_predict_conventions(make, data):
    X, y = data
    m = make()
    yy = (y > np.median(y)).astype(int) if getattr(m, "kind", "") == "classifier" else y
    p = _conventions(m, X, yy)
    assert len(m.feature_importances_) == X.shape[1]
    if getattr(m, "kind", "") == "classifier":
        assert ((p >= 0) & (p <= 1)).all()


def test_optional_models_follow_conventions(data):
    X, y = data
    from twin.ml.estimators import EBMRegressor, XGBRegressorModel
    for mod, make in (("interpret", lambda: EBMRegressor(interactions=0, outer_bags=1)),
                      ("xgboost", lambda: XGBRegressorModel(n_estimators=30))):
        pytest.importorskip(mod)
        _conventions(make(), X, y)


def test_simplified_tree_merges_equal_leaves():
    # y depends on a alone; a deep tree would also split on b, whose leaves snap equal
    rng = np.random.default_rng(1)
    X = pd.DataFrame({"a": rng.uniform(0, 1, 400), "b": rng.uniform(0, 1, 400)})
    y = np.where(X["a"] > 0.5, 16.0, 8.0) + rng.normal(0, 0.3, 400)
    full = SimplifiedTreeRegressor(max_depth=4, min_samples_leaf=5, round_sig=6).fit(X, y)
    simple = SimplifiedTreeRegressor(max_depth=4, min_samples_leaf=5, grid=(8, 16, 32)).fit(X, y)
    assert simple.n_leaves_ == 2 < full.n_leaves_
    assert set(simple.predict(X)) == {8.0, 16.0}
    assert np.all(simple.predict(X) == np.where(X["a"] > 0.5, 16.0, 8.0))
    text = simple.export_text()
    assert "a <=" in text and "b <=" not in text
    again = SimplifiedTreeRegressor.from_dict(simple.to_dict())
    assert np.array_equal(again.predict(X), simple.predict(X))


def test_tree_png_and_importances(tmp_path, data):
    X, y = data
    t = SimplifiedTreeRegressor(max_depth=2).fit(X, y)
    assert t.plot(tmp_path / "t.png").stat().st_size > 1000
    plot_importances({"tree": t.feature_importances_,
                      "lin": MonotoneLinearRegressor().fit(X, y).feature_importances_},
                     X.columns, tmp_path / "imp.png")
    assert (tmp_path / "imp.png").stat().st_size > 1000


def test_monotone_linear_respects_signs():
    rng = np.random.default_rng(2)
    X = pd.DataFrame(rng.normal(size=(200, 2)), columns=["x", "z"])
    y = -2 * X["x"] + X["z"]
    m = MonotoneLinearRegressor(monotone=[1, 0]).fit(X, y)
    assert m.coef_[0] >= -1e-9          # constrained non-decreasing: clipped at 0
    assert m.coef_[1] > 0.5             # free


def test_exported_ensembles_predict_like_sklearn(data):
    X, y = data
    reg = TreeEnsemble(n_estimators=40, log_target=True).fit(X, np.exp(y / 3))
    clf = TreeEnsemble(kind="classifier", n_estimators=40).fit(X, (y > 1.5).astype(int))
    packed = PackedTrees({"reg": reg.to_dict(), "clf": clf.to_dict()})
    out = packed.predict(X)
    np.testing.assert_allclose(out["reg"], reg.predict(X), rtol=1e-9)
    np.testing.assert_allclose(out["clf"], clf.predict(X), rtol=1e-9, atol=1e-12)


def test_evaluate_holds_out_whole_groups(data):
    X, y = data
    groups = np.repeat(np.arange(10), 30)
    seen = []

    class Spy(MonotoneLinearRegressor):
        def fit(self, X, y):
            seen.append(set(X.index))
            return super().fit(X, y)
    table, oof = evaluate({"spy": Spy}, X, y, groups, n_splits=5, target="y")
    assert len(seen) == 5
    for train_idx in seen:
        held = set(range(len(X))) - train_idx
        assert not {groups[i] for i in held} & {groups[i] for i in train_idx}
    row = table.iloc[0]
    assert {"smape_median", "r2", "predict_us_per_row"} <= set(table.columns)
    assert np.isfinite(oof["spy"]).all() and row["r2"] > 0.8


def test_smape():
    assert smape([1, 0], [1, 0]).tolist() == [0.0, 0.0]
    assert smape([1], [3])[0] == pytest.approx(1.0)


def test_workload_features_paper_and_extras():
    from twin.workload.catalog import AdapterCatalog
    from twin.workload.generate import rate_class_trace

    tr = rate_class_trace(12, (1.0, 0.5, 0.25), duration_s=300, seed=0)
    cat = AdapterCatalog(pd.DataFrame({"adapter": [f"lora-{i}" for i in range(12)],
                                       "rank": [8, 16, 32] * 4}))
    f = workload_features(tr, cat, 300)
    assert f["n_adapters"] == 12 and f["rank_max"] == 32 and f["rank_min"] == 8
    assert f["rate_max"] == pytest.approx(1.0, rel=0.3)
    assert f["rate_min"] == pytest.approx(0.25, rel=0.5)
    assert 0.8 < f["arrival_cv"] < 1.2 and 0.8 < f["adapter_cv"] < 1.2
    assert 0 < f["gini"] < 0.5 and 0.1 < f["top10_share"] < 0.5
    assert f["offered_tps"] == pytest.approx(
        (tr["prompt_tokens"].sum() + tr["output_tokens"].sum()) / 300)

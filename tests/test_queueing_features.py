"""The latency heads' queueing features (``twin.ml.queueing``) move as queueing says they
must, and models fitted on different features pack together unchanged
(``twin.ml.ensemble.reindexed``); models saved before those features still load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twin.costs.profile import load_profile
from twin.ml.ensemble import PackedTrees, TreeEnsemble, reindexed
from twin.ml.features import ROW_FEATURES, workload_features
from twin.ml.queueing import QUEUE_FEATURES, prefill_s, queue_features
from twin.ml.recommender import MODEL_FEATURES, Recommender
from twin.ml.spec import paper_base
from twin.workload.generate import rate_class_trace, uniform_lengths


@pytest.fixture(scope="module")
def profile():
    return load_profile(None)


def _wf(scale: float, n: int = 16, prompt=(8, 1024)):
    tr = rate_class_trace(n, tuple(scale * r for r in (1.0, 0.5, 0.25)), duration_s=120,
                          lengths=uniform_lengths(*prompt), seed=3)
    return workload_features(tr, None, 120.0)


def test_more_load_means_more_busy_adapters_batch_and_utilisation(profile):
    cfg = paper_base().replace(max_loras=4, max_cpu_loras=16)
    light, heavy = (queue_features(_wf(s), cfg, profile) for s in (0.2, 1.0))
    assert set(light) == set(QUEUE_FEATURES)
    for k in ("busy_adapters", "slot_pressure", "decode_batch", "utilisation"):
        assert heavy[k] > light[k], k
    assert light["busy_adapters"] <= 16 and heavy["busy_adapters"] <= 16


def test_more_slots_relieve_slot_pressure_not_the_prefill_floor(profile):
    wf = _wf(1.0)
    few, many = (queue_features(wf, paper_base().replace(max_loras=m, max_cpu_loras=16),
                                profile) for m in (2, 16))
    assert many["slot_pressure"] < few["slot_pressure"] / 4
    assert many["prefill_p99_ms"] == pytest.approx(few["prefill_p99_ms"], rel=0.2)


def test_prefill_floor_grows_with_the_prompt_and_the_chunks(profile):
    assert prefill_s(profile, 4000, 2048, 16, 8) > prefill_s(profile, 500, 2048, 16, 8)
    # 4,000 tokens in chunks of 512: 8 steps, each with its constant, vs 1 step of 8,192
    assert prefill_s(profile, 4000, 512, 16, 8) > prefill_s(profile, 4000, 8192, 16, 8)
    short, long_ = (queue_features(_wf(0.5, prompt=p), paper_base().replace(
        max_loras=16, max_cpu_loras=16), profile) for p in ((8, 256), (1024, 4096)))
    assert long_["prefill_p99_ms"] > 2 * short["prefill_p99_ms"]


def test_loaded_prefill_shares_the_token_budget_with_the_running_batch(profile):
    from twin.ml.queueing import loaded_prefill_s

    alone = prefill_s(profile, 4000, 2048, 16, 8)
    assert loaded_prefill_s(profile, 4000, 2048, 0, 300, 16, 8) == pytest.approx(alone,
                                                                                  rel=0.3)
    # decodes take the budget first: more of them, more (and slower) steps for the prompt
    light, heavy = (loaded_prefill_s(profile, 4000, 2048, b, 300, 16, 8) for b in (64, 1900))
    assert heavy > 3 * light > 3 * 0.5 * alone
    # a larger budget leaves the prompt more room beside the same batch
    assert loaded_prefill_s(profile, 4000, 16384, 1900, 300, 16, 8) < heavy / 3
    wf = _wf(1.0, prompt=(512, 4096))
    small, big = (queue_features(wf, paper_base().replace(
        max_loras=16, max_cpu_loras=16, max_num_batched_tokens=m), profile)
        for m in (2048, 16384))
    assert big["prefill_p99_loaded_ms"] < small["prefill_p99_loaded_ms"]
    assert small["prefill_p99_loaded_ms"] >= small["prefill_p99_ms"]


def test_models_on_different_features_pack_together_unchanged():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(300, 3)), columns=["a", "b", "c"])
    y = 2 * X["a"] + X["c"] ** 2
    m = TreeEnsemble(n_estimators=20).fit(X, y)
    wide = ["z", "c", "b", "a", "q"]
    packed = PackedTrees({"m": reindexed(m.to_dict(), wide)})
    X2 = X.assign(z=rng.normal(size=300), q=5.0)[wide]
    np.testing.assert_allclose(packed.predict(X2)["m"], m.predict(X), rtol=1e-9, atol=1e-9)


def _cut(model: Recommender, n: int) -> dict:
    """``model``'s ensembles as if saved with its first ``n`` features only."""
    return {k: {**m, "features": list(MODEL_FEATURES)[:n], "trees": [
        {**t, "feature": [f if f < n else 0 for f in t["feature"]]}
        for t in m["trees"]]} for k, m in model.models.items()}


def test_shipped_model_sees_the_queueing_features_and_an_older_model_still_loads():
    shipped = Recommender.load()
    assert shipped.features == list(MODEL_FEATURES)
    assert set(QUEUE_FEATURES) <= set(shipped.features)
    X = pd.DataFrame(np.ones((2, len(MODEL_FEATURES))), columns=list(MODEL_FEATURES))
    # models saved before the queueing features (ROW_FEATURES alone), or before the later
    # ones (a leading part of them), predict with their own
    for n in (len(ROW_FEATURES), len(MODEL_FEATURES) - 1):
        back = Recommender(_cut(shipped, n), shipped.meta)
        assert back.features == list(MODEL_FEATURES)[:n]
        assert set(back.predict_rows(X)) == set(shipped.models)
    # a feature list that is not this twin's is refused
    odd = {k: {**m, "features": list(reversed(m["features"]))}
           for k, m in shipped.models.items()}
    with pytest.raises(Exception, match="features do not match"):
        Recommender(odd, shipped.meta)


def test_knobs_are_priced_within_the_trained_range(profile):
    from twin.ml.queueing import within_trained
    from twin.ml.recommender import config_table

    model = Recommender.load()
    lo, hi = model.trained_knobs["max_num_seqs"]
    base = paper_base().replace(max_loras=8, max_cpu_loras=16)
    assert within_trained(base.replace(max_num_seqs=hi + 100), model.trained_knobs) \
        .max_num_seqs == hi
    assert within_trained(base.replace(max_num_seqs=64), None).max_num_seqs == 64
    wf = _wf(1.0)
    other = base.replace(max_num_seqs=64, max_num_batched_tokens=8192)
    t = config_table(model, wf, [base, other], profile)
    if lo == hi == base.max_num_seqs:   # a model that saw one max_num_seqs only
        for k in QUEUE_FEATURES:   # (kv_tokens, a row feature, still moves with the knobs)
            assert t.at[0, k] == t.at[1, k], k
    else:   # trained over the latency sweep's grids: the knobs move the features
        assert lo <= 64 and model.trained_knobs["max_num_batched_tokens"][1] >= 8192
        assert t.at[0, "decode_batch"] != t.at[1, "decode_batch"]
        assert t.at[0, "prefill_p99_loaded_ms"] != t.at[1, "prefill_p99_loaded_ms"]

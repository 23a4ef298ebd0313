"""The shipped recommender was trained on the shipped calibrated profile: a change to that
profile's JSON (even its provenance text, which the digest covers) must come with a retrain,
or every `twin recommend` on defaults prints a false "trained on a different profile" warning."""
from __future__ import annotations

from twin.costs.profile import load_profile
from twin.ml.recommender import Recommender


def test_shipped_recommender_matches_the_default_profile():
    model = Recommender.load()
    profile = load_profile(model.meta["profile"])
    assert model.profile_warning(profile) is None


def test_a_changed_profile_is_warned_about():
    model = Recommender.load()
    profile = load_profile(model.meta["profile"])
    profile.provenance = dict(profile.provenance, method="something else")
    assert "differs" in (model.profile_warning(profile) or "")

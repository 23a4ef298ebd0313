"""The shipped recommender was trained on the shipped calibrated profile: a change to what
that profile prices must come with a retrain, or every `twin recommend` on defaults prints a
false "trained on a different profile" warning. Its provenance (how it was fitted, the client
cap a calibration replays) prices nothing, so the digest leaves it out."""
from __future__ import annotations

from twin.costs.profile import Profile, load_profile
from twin.ml.recommender import Recommender


def test_shipped_recommender_matches_the_default_profile():
    model = Recommender.load()
    profile = load_profile(model.meta["profile"])
    assert model.profile_warning(profile) is None


def test_a_changed_step_time_is_warned_about():
    model = Recommender.load()
    d = load_profile(model.meta["profile"]).to_dict()
    base = d["step_time"]["base"]
    d["step_time"]["base"] = dict(base, const=base["const"] * 1.01)
    assert "differs" in (model.profile_warning(Profile.from_dict(d)) or "")


def test_a_changed_provenance_is_not():
    model = Recommender.load()
    profile = load_profile(model.meta["profile"])
    profile.provenance = dict(profile.provenance, method="something else",
                              client={"max_in_flight": 1})
    assert model.profile_warning(profile) is None

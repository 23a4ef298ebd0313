"""Cost and memory models and the versioned Profile that carries them."""

from twin.models.profile import Profile, load_profile

__all__ = ["Profile", "load_profile"]

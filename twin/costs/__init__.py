"""The cost models (profile, memory, step time, load time, first principles) and the
versioned Profile that carries them; they import nothing of the twin but its errors and schemas. Fitting a
profile from measurements lives in :mod:`twin.calibrate`."""

from twin.costs.profile import Profile, load_profile

__all__ = ["Profile", "load_profile"]

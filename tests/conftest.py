"""Shared pytest setup: Hypothesis settings profiles.

``default`` keeps the whole suite inside its time budget; ``thorough`` is for a
longer local or nightly run: ``HYPOTHESIS_PROFILE=thorough pytest tests``.
No deadlines anywhere: timing must never decide whether a test passes (the first
call of a Numba kernel compiles it, which can take seconds).
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])

settings.register_profile("default", max_examples=150, **_COMMON)
settings.register_profile("thorough", max_examples=3000, **_COMMON)
settings.register_profile("ci", max_examples=150, derandomize=True, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


"""Shared test settings: a deterministic Hypothesis profile, as Twisted's own suite uses."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "pop3srv",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("pop3srv")

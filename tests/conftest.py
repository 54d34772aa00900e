"""Shared test set-up: 8 simulated CPU devices (for sharding / pmap tests), hypothesis, and the
tolerance audit (``TOLERANCE_AUDIT=DIR``; how tolerances are chosen: ``tests/tolerances.py``)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tolerances  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
tolerances.install()


def pytest_runtest_teardown(item, nextitem):
    tolerances.flush()

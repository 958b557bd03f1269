import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def examples(factor: float = 1.0) -> int:
    """``max_examples`` for a costly property: ``factor`` × the loaded profile's count (ci/dev 25,
    thorough 300), at least 5, so every property follows ``HYPOTHESIS_PROFILE``."""
    return max(5, round(settings.default.max_examples * factor))


def rel_tol(value: float, rtol: float = 1e-7, atol: float = 1e-12, scale: float = 1.0) -> float:
    """Numerical slack for objectives of size ``value`` on a problem of size ``scale``
    (``problem.scale``: float64 round-off is a tiny multiple of it, whatever the objective)."""
    return rtol * abs(value) + atol * scale


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path

"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

# Property tests check values, never speed: no per-example deadline (a loaded machine
# takes seconds for what a quiet one does in milliseconds).
settings.register_profile("cromss", deadline=None)
settings.load_profile("cromss")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local 2-CPU Ray cluster on 127.0.0.1 for the whole session (a running one is reused)."""
    import ray

    from local_ray import start_test_ray

    started = not ray.is_initialized()
    if started:
        start_test_ray(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()

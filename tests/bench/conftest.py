"""Shared set-up of the benchmark smoke tests."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """The scripts set torch's thread count for their process (``--threads``); put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

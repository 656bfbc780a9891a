"""Shared set-up for the method tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one intra-op thread: the tensors here are tiny, and extra threads only contend on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

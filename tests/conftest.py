"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: tiny models gain nothing from more, and shared CI cores lose a lot
    to spinning threads; subprocesses get OMP_NUM_THREADS=1 to match (same numerics)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

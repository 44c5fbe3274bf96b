"""The examples' tests run with one torch thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The example models are small: one thread is as fast, and far steadier on CPU cores shared
    with other jobs (two OpenMP threads wait on each other there, 10-40x slower). The examples
    set their own --threads; the session's count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Method tests run single-threaded: tiny matrices on a busy 2-core box; multi-threaded MKL SVDs were
measured 10-70x slower than single-threaded there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

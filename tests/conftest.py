import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_seeded():
    """One intra-op thread (env workers share 2 cores; OpenMP spin-waits otherwise) and a seed."""
    torch.set_num_threads(1)
    torch.manual_seed(0)

import os

import pytest
import torch

import leanvit  # noqa: F401  (registers the models)

if os.environ.get('PYTEST_XDIST_WORKER'):
    # One intra-op thread per xdist worker: the workers already fill the cores.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The commands choose torch's threads for the whole process (``leanvit.threads``); later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

import os

import pytest
import torch

import leanvit  # noqa: F401  (registers the models)

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')

if os.environ.get('PYTEST_XDIST_WORKER'):
    # One intra-op thread per xdist worker: the workers already fill the cores.
    torch.set_num_threads(1)


@pytest.fixture
def fixtures_dir() -> str:
    return FIXTURES

import os

import torch

import leanvit  # noqa: F401  (registers the models)

if os.environ.get('PYTEST_XDIST_WORKER'):
    # One intra-op thread per xdist worker: the workers already fill the cores.
    torch.set_num_threads(1)

"""Training and distillation: one readable loop (engine.py), its configuration (config.py) and trustworthy
checkpoints (checkpoints.py).

``TrainConfig`` loads without torch; the rest is imported on first use, so the command line answers fast.
"""

import importlib

from leanvit.train.config import TrainConfig

_LAZY = {'train': 'leanvit.train.engine', 'CheckpointManager': 'leanvit.train.checkpoints',
         'evaluate_model': 'leanvit.train.evaluation'}

__all__ = ['CheckpointManager', 'TrainConfig', 'evaluate_model', 'train']


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(_LAZY[name]), name)

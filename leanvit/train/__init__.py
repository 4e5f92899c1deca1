"""Training and distillation: one readable loop (engine.py) and trustworthy checkpoints (checkpoints.py)."""

from leanvit.train.checkpoints import CheckpointManager
from leanvit.train.engine import TrainConfig, evaluate, train

__all__ = ['CheckpointManager', 'TrainConfig', 'evaluate', 'train']

"""Training and distillation: one readable loop (engine.py) and trustworthy checkpoints (checkpoints.py)."""

from leanvit.train.checkpoints import CheckpointManager
from leanvit.train.engine import TrainConfig, train
from leanvit.train.evaluation import evaluate_model

__all__ = ['CheckpointManager', 'TrainConfig', 'evaluate_model', 'train']

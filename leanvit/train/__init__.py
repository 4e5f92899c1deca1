"""The paper-agnostic training engine: one readable loop (``engine``), its configuration (``config``), the run
directory it writes (``run_directory``), evaluation, knowledge distillation on logits, and the protocol through which
a method adds its own loss terms (``objectives``)."""

from leanvit.train.config import TrainConfig
from leanvit.train.engine import train
from leanvit.train.evaluation import evaluate_model
from leanvit.train.run_directory import CheckpointManager

__all__ = ['CheckpointManager', 'TrainConfig', 'evaluate_model', 'train']

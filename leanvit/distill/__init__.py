"""Distillation: losses (see :mod:`leanvit.distill.losses` for which normalisation reproduces which paper) and
precomputed teacher logits."""

from leanvit.distill.losses import (
    KD_LOSSES,
    deit_hard,
    deit_soft,
    distillation_loss,
    kl_batchmean,
    soft_cross_entropy,
)
from leanvit.distill.teacher_logits import compute_teacher_logits, load_teacher_logits, save_teacher_logits

__all__ = ['KD_LOSSES', 'compute_teacher_logits', 'deit_hard', 'deit_soft', 'distillation_loss', 'kl_batchmean',
           'load_teacher_logits', 'save_teacher_logits', 'soft_cross_entropy']

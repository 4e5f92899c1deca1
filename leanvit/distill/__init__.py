"""Distillation losses; see :mod:`leanvit.distill.losses` for which normalisation reproduces which paper."""

from leanvit.distill.losses import (
    KD_LOSSES, deit_hard, deit_soft, distillation_loss, kl_batchmean, soft_cross_entropy,
)

__all__ = ['KD_LOSSES', 'deit_hard', 'deit_soft', 'distillation_loss', 'kl_batchmean', 'soft_cross_entropy']

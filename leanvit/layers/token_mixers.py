"""MetaFormer token mixers: the PoolFormer pooling mixer and the RIFormer affine mixer, with its exact fold.

Both return ``mix(x) - x``: the block adds the input back through its residual, so a mixer that returned ``x`` would
count it twice (PoolFormer, Sec. 3.1).
"""

import torch
import torch.nn.functional as F
from torch import nn


class PoolingTokenMixer(nn.Module):
    """PoolFormer's mixer: 3 x 3 average pooling (padding excluded from the mean) minus the identity."""

    def __init__(self, dim: int | None = None, pool_size: int = 3):
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.pool_size, 1, self.pool_size // 2, count_include_pad=False) - x


class ChannelAffine(nn.Module):
    """Per-channel ``weight * x + bias`` on a (B, C, H, W) map, with the parameters of a depthwise 1 x 1 convolution
    (``weight`` [C, 1, 1, 1], ``bias`` [C]): what ``nn.Conv2d(C, C, 1, groups=C)`` computes, as one elementwise
    multiply-add (not a convolution, so it is not counted as MACs either). Starts as the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class AffineTokenMixer(nn.Module):
    """RIFormer's training-time mixer (Sec. 3.3): a per-channel affine ``s * x + t`` minus the identity.

    ``affine.weight`` [C, 1, 1, 1] is s and ``affine.bias`` is t: the official mmpretrain layout, a depthwise 1 x 1
    convolution (`ChannelAffine`). The mixer exists in training only: the deploy form folds it into the preceding
    norm (`fold_affine_into_norm`).

    The official code leaves the initial values to a config whose truncated-normal init makes s almost 0 (the mixer
    starts as -x). leanvit starts at s = 1, t = 0: the mixer adds nothing, so training starts from the
    token-mixer-free network the paper is about and the affine learns only what helps.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.affine = ChannelAffine(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(x) - x


def fold_affine_into_norm(
        norm_weight: torch.Tensor,
        norm_bias: torch.Tensor,
        affine_weight: torch.Tensor,
        affine_bias: torch.Tensor,
        layer_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one norm equal to ``AffineTokenMixer(norm(x))`` (times ``layer_scale`` if given).

    With the norm's per-channel weight g and bias b, ``s * (g * n + b) + t - (g * n + b)`` for the normalised n is
    ``g (s - 1) * n + b (s - 1) + t``: the same normalisation with weight g (s - 1) and bias b (s - 1) + t. A layer
    scale l multiplies both. Exact up to float rounding, for any input.
    """
    scale_minus_one = affine_weight.reshape(-1) - 1
    weight, bias = norm_weight * scale_minus_one, norm_bias * scale_minus_one + affine_bias.reshape(-1)
    if layer_scale is not None:
        weight, bias = weight * layer_scale.reshape(-1), bias * layer_scale.reshape(-1)
    return weight, bias

"""Building blocks shared by two or more leanvit model families."""

from leanvit.layers.attention import GroupAttention
from leanvit.layers.conv import DepthwiseMultiplierConv, fold_batchnorm
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import ConvMlp, Mlp, pointwise_conv, unpadded_hidden
from leanvit.layers.token_mixers import (
    AffineTokenMixer,
    PoolingTokenMixer,
    fold_affine_into_norm,
)

__all__ = [
    'AffineTokenMixer', 'ConvMlp', 'DepthwiseMultiplierConv', 'GroupAttention', 'Mlp', 'PoolingTokenMixer',
    'check_input_size', 'fold_affine_into_norm', 'fold_batchnorm', 'pointwise_conv', 'unpadded_hidden',
]

"""Building blocks shared by two or more leanvit model families."""

from leanvit.layers.attention import GroupAttention
from leanvit.layers.conv import DepthwiseMultiplierConv, fold_batchnorm
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import Mlp, unpadded_hidden

__all__ = ['DepthwiseMultiplierConv', 'GroupAttention', 'fold_batchnorm', 'Mlp', 'check_input_size', 'unpadded_hidden']

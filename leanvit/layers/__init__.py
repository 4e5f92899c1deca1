"""Building blocks shared by two or more leanvit model families."""

from leanvit.layers.attention import GroupAttention
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import Mlp, unpadded_hidden

__all__ = ['GroupAttention', 'Mlp', 'check_input_size', 'unpadded_hidden']

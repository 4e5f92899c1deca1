"""Building blocks shared by two or more leanvit model families."""

from leanvit.layers.attention import GroupAttention
from leanvit.layers.input_checks import check_input_size

__all__ = ['GroupAttention', 'check_input_size']

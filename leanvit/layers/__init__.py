"""Building blocks of leanvit's model families, each used by two or more of them or by a method."""

from leanvit.layers.attention import GroupAttention
from leanvit.layers.conv import fold_batchnorm, fold_conv_norm_act, folded_conv
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import ConvMlp, Mlp
from leanvit.layers.pos_embed import resample_pos_embed
from leanvit.layers.shared import SharedWeightStage
from leanvit.layers.token_mixers import AffineTokenMixer, PoolingTokenMixer, fold_affine_into_norm

__all__ = [
    'AffineTokenMixer', 'ConvMlp', 'GroupAttention', 'Mlp', 'PoolingTokenMixer', 'SharedWeightStage',
    'check_input_size', 'fold_affine_into_norm', 'fold_batchnorm', 'fold_conv_norm_act', 'folded_conv',
    'resample_pos_embed',
]

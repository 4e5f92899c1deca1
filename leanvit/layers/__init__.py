"""Building blocks shared by two or more leanvit model families.

The model families import these from their modules (``leanvit.layers.mlp``), not from this package: importing timm
registers leanvit's models (see ``leanvit/__init__.py``), and when that happens while this package is initialising,
the models must not need its names yet. timm is imported first for the same reason.
"""

import timm  # noqa: F401  (registers leanvit's models before the names below exist; see above)

from leanvit.layers.attention import GroupAttention
from leanvit.layers.conv import fold_batchnorm, fold_conv_norm_act, folded_conv
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import ConvMlp, Mlp
from leanvit.layers.shared import SharedWeightStage
from leanvit.layers.token_mixers import (
    AffineTokenMixer,
    PoolingTokenMixer,
    fold_affine_into_norm,
)

__all__ = [
    'AffineTokenMixer', 'ConvMlp', 'GroupAttention', 'Mlp', 'PoolingTokenMixer', 'SharedWeightStage',
    'check_input_size', 'fold_affine_into_norm', 'fold_batchnorm', 'fold_conv_norm_act', 'folded_conv',
]

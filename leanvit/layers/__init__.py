"""Building blocks that two or more of leanvit's families share, or a family and a method; a block only one family
uses lives in that family's model file (SReT's `GroupAttention` in ``leanvit.models.sret``, RIFormer's token mixers
in ``leanvit.models.riformer``), so that each paper's idea reads in one file.

- `SharedWeightStage`: blocks applied several times each (SReT's recursion, MiniViT's weight multiplexing).
- `fold_batchnorm`, `folded_conv`, `fold_conv_norm_act`: exact BatchNorm folds for ``reparameterize()`` (GLiT's local
  module, SReT's stem).
- `Mlp`: the token MLP (SReT, GLiT, MiniViT, GFNet; RIFormer with 1 x 1 convs).
- `resample_pos_embed`: the official fine-tuning's position-embedding resize (SReT, Mini-DeiT, GFNet).
- `check_input_size`: the input check every family runs.
"""

from leanvit.layers.conv import fold_batchnorm, fold_conv_norm_act, folded_conv
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import Mlp
from leanvit.layers.pos_embed import resample_pos_embed
from leanvit.layers.shared import SharedWeightStage

__all__ = [
    'Mlp', 'SharedWeightStage', 'check_input_size', 'fold_batchnorm', 'fold_conv_norm_act', 'folded_conv',
    'resample_pos_embed',
]

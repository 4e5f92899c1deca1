"""The MLPs of leanvit's blocks: timm's ``Mlp`` (``fc1`` -> activation -> dropout -> ``fc2`` -> dropout, with an
identity ``norm`` between), whose parameter names are the official codes' and whose forward calls each layer as a
module, so hooks, module swaps, ``torch.fx`` and fine-tuning see ``fc1``, ``act`` and ``fc2``.

- `Mlp`: over tokens (SReT, GLiT, MiniViT, GFNet).
- `ConvMlp`: the MetaFormer MLP over the channels of a (B, C, H, W) map (PoolFormer, RIFormer), timm's ``Mlp`` with
  ``use_conv=True`` (1 x 1 convs ``fc1`` and ``fc2``). Not timm's ``ConvMlp``: that one normalises before its
  activation, has a single dropout (none after ``fc2``) and defaults to ReLU.
"""

from functools import partial

from timm.layers import Mlp

__all__ = ['ConvMlp', 'Mlp']

ConvMlp = partial(Mlp, use_conv=True)

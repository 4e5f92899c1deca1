"""The MLP of leanvit's token blocks (SReT, GLiT, MiniViT, GFNet): timm's ``Mlp`` (``fc1`` -> activation -> dropout
-> ``fc2`` -> dropout, with an identity ``norm`` between), whose parameter names are the official codes' and whose
forward calls each layer as a module, so hooks, module swaps, ``torch.fx`` and fine-tuning see ``fc1``, ``act`` and
``fc2``. RIFormer uses it with 1 x 1 convs (``ConvMlp`` in ``leanvit.models.riformer``).
"""

from timm.layers import Mlp

__all__ = ['Mlp']

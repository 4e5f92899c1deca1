"""MLPs: the transformer MLP over tokens and the MetaFormer MLP over the channels of a feature map.

The forwards call their layers as any PyTorch model does, so hooks, module swaps, ``torch.fx`` and fine-tuning see
``fc1``, ``act`` and ``fc2``, in training and after ``timm.utils.model.reparameterize_model`` alike.
"""

import torch
from torch import nn


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout, with timm's parameter names (``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))


class ConvMlp(nn.Module):
    """MetaFormer MLP on a (B, C, H, W) map: 1 x 1 conv ``fc1`` -> activation -> dropout -> ``fc2`` -> dropout.

    Parameter names and shapes are timm's ``Mlp(use_conv=True)`` and the official PoolFormer/RIFormer ones.
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))

"""Exact folds of a BatchNorm into the convolution before it, for inference (``reparameterize()``).

A fold replaces the conv and the norm by one conv computing ``bn(conv(x))`` with the norm's running statistics: the
same function, one pass over the map less, and the norm's parameters gone from the inference model.
"""

from collections import OrderedDict

import torch
from timm.layers import ConvNormAct
from torch import nn


def fold_batchnorm(conv: nn.Conv1d | nn.Conv2d,
                   bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution (1-D or 2-D) equal to ``bn(conv(x))`` with the norm's running statistics."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale.view(-1, *[1] * (conv.weight.dim() - 1)), (bias - bn.running_mean) * scale + bn.bias


@torch.no_grad()
def folded_conv(conv: nn.Conv1d | nn.Conv2d, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Conv1d | nn.Conv2d:
    """A new convolution like ``conv``, with a bias, computing ``bn(conv(x))`` in eval mode (`fold_batchnorm`)."""
    weight, bias = fold_batchnorm(conv, bn)
    folded = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                        device=weight.device, dtype=weight.dtype)
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    return folded


def fold_conv_norm_act(layer: ConvNormAct) -> nn.Sequential:
    """timm's ``ConvNormAct`` (conv, BatchNorm, activation) as ``Sequential(conv=folded conv, act=activation)``.

    The conv keeps its state_dict keys (``conv.weight``, ``conv.bias``); the norm's are gone.
    """
    conv, bn = layer.conv, layer.bn
    if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d) or \
            not isinstance(getattr(layer, 'aa', None), (type(None), nn.Identity)) or \
            not isinstance(getattr(bn, 'drop', None), (type(None), nn.Identity)):
        raise ValueError(f'fold_conv_norm_act folds a Conv2d followed by a BatchNorm and an activation, got {layer}')
    return nn.Sequential(OrderedDict(conv=folded_conv(conv, bn), act=getattr(bn, 'act', nn.Identity())))

"""Convolution helpers shared by model families, and CPU inference forms of convolutions.

As in `leanvit.layers.mlp`, models hold plain convolutions; ``reparameterize()`` swaps them once for the forms below,
each of which returns the layer it stands for from ``canonical()``.
"""

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from leanvit.layers.mlp import inplace_activation


def fold_batchnorm(conv: nn.Conv1d | nn.Conv2d,
                   bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution (1-D or 2-D) equal to ``bn(conv(x))`` with the norm's running statistics."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale.view(-1, *[1] * (conv.weight.dim() - 1)), (bias - bn.running_mean) * scale + bn.bias


def depthwise_multiplier(conv: nn.Module) -> int:
    """m for a depthwise convolution from C to m * C channels (``nn.Conv2d(C, m * C, k, groups=C)``), else 0."""
    if type(conv) is not nn.Conv2d or conv.groups != conv.in_channels or conv.out_channels % conv.in_channels:
        return 0
    return conv.out_channels // conv.in_channels


class DepthwiseMultiplierConv(nn.Module):
    """Inference form of a depthwise convolution from C to m * C channels (``nn.Conv2d(C, m * C, k, groups=C)``,
    output channel c * m + i reads input channel c, m > 1): m depthwise convolutions with one output per input
    channel, interleaved.

    Why: oneDNN has fast CPU kernels only for depthwise convolutions with one output per input channel. Timed on
    SReT-T's two stage transitions (batch 16, 2 threads, their channels-last inputs, best of 31 interleaved rounds),
    this form took 0.52-0.56 of the time of the multiplier-2 kernel (repeating the input channels instead was up
    to 20x slower). The transitions are under 1 % of SReT-T's time, so the whole model's gain is within noise.
    ``weight`` (m, C, 1, k, k) and ``bias`` (m, C) hold the convolution's parameters, one depthwise kernel per output
    of each input channel.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.multiplier = depthwise_multiplier(conv)
        if self.multiplier < 2 or conv.padding_mode != 'zeros' or conv.bias is None:
            raise ValueError(f'DepthwiseMultiplierConv stands for a depthwise conv with channel multiplier > 1, zero '
                             f'padding and a bias, got {conv}')
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = \
            conv.kernel_size, conv.stride, conv.padding, conv.dilation
        # Output channel c * m + i -> kernel [i, c]: each branch's kernels contiguous, sliced once here.
        self.weight = nn.Parameter(conv.weight.detach().unflatten(0, (self.in_channels, self.multiplier))
                                   .transpose(0, 1).contiguous())
        self.bias = nn.Parameter(conv.bias.detach().unflatten(0, (self.in_channels, self.multiplier)).t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [F.conv2d(x, self.weight[i], self.bias[i], self.stride, self.padding, self.dilation,
                            self.in_channels) for i in range(self.multiplier)]
        return torch.stack(outputs, dim=2).flatten(1, 2)

    @torch.no_grad()
    def canonical(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, groups=self.in_channels, device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(self.weight.transpose(0, 1).flatten(0, 1))
        conv.bias.copy_(self.bias.t().flatten())
        return conv

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, multiplier={self.multiplier}')


class FoldedConvNormAct(nn.Module):
    """Inference form of timm's ``ConvNormAct`` with a BatchNorm: the norm's running statistics folded into the conv
    (`fold_batchnorm`), the convolution run channels-last and the activation in place.

    Why: one pass over the feature map instead of two for conv and norm, and oneDNN's convolutions with few channels
    (a stem's) are much faster on channels-last inputs. Timed on SReT-T's stem (batch 16, 224 x 224, 2 threads,
    median of interleaved rounds), the three folded channels-last layers took 0.62-0.65 of the time of the three
    ConvNormAct, and the whole re-parameterized model ran 11-15 % slower with the canonical stem. The output is
    channels-last, which makes the next layer's conversion free.
    """

    def __init__(self, layer: ConvNormAct):
        super().__init__()
        conv, bn, aa = layer.conv, layer.bn, getattr(layer, 'aa', None)
        if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d) or \
                not isinstance(aa, (type(None), nn.Identity)):
            raise ValueError(f'FoldedConvNormAct folds a Conv2d followed by a BatchNorm, got {layer}')
        weight, bias = fold_batchnorm(conv, bn)
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                              device=weight.device, dtype=weight.dtype)
        self.conv.weight, self.conv.bias = nn.Parameter(weight), nn.Parameter(bias)
        act = getattr(bn, 'act', nn.Identity())
        self.act_type = type(act)
        self.act = inplace_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x.contiguous(memory_format=torch.channels_last)))

    @torch.no_grad()
    def canonical(self) -> ConvNormAct:
        """A ``ConvNormAct`` computing the same function, its BatchNorm the identity (the true parameter count)."""
        conv = self.conv
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1] or \
                conv.padding[0] != conv.padding[1]:
            raise NotImplementedError('canonical() of a non-square folded conv')
        act_kwargs = dict(inplace=False) if self.act_type is nn.ReLU else None
        layer = ConvNormAct(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                            conv.padding[0], conv.dilation[0], conv.groups, bias=True, act_layer=self.act_type,
                            act_kwargs=act_kwargs, device=conv.weight.device, dtype=conv.weight.dtype)
        layer.conv.weight, layer.conv.bias = conv.weight, conv.bias
        layer.bn.running_var.fill_(1 - layer.bn.eps)  # with weight 1, bias 0 and mean 0: the identity
        return layer.eval()


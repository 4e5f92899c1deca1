"""MLPs: the transformer MLP over tokens and the MetaFormer MLP over the channels of a feature map.

The forwards call their layers as any PyTorch model does, so hooks, module swaps, ``torch.fx`` and fine-tuning see
``fc1``, ``act`` and ``fc2``. ``reparameterize()`` (which ``timm.utils.model.reparameterize_model`` calls) swaps them,
in place and once, for the CPU inference forms below; each of those has a ``canonical()`` method that returns the
layer it stands for, which is how the profiler counts a re-parameterized model as the architecture it is.
"""

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn

HIDDEN_ALIGNMENT = 8


class PaddedLinear(nn.Linear):
    """An ``nn.Linear`` zero-padded to wider inputs and/or outputs: the inference form of `Mlp`'s layers.

    Why: oneMKL's CPU GEMM is slower when an output width is not a multiple of 8. SReT-T's hidden widths are 230, 460
    and 921; timed on the tokens of each stage (batch 16, 224 x 224, 2 threads, 31 interleaved rounds), fc1 and fc2
    together took 1.25-1.3x as long at those widths as at 232, 464 and 928, and the whole re-parameterized model ran
    about 10 % slower without the padding. Zero rows of fc1 give hidden units that
    are exactly zero after an activation with act(0) = 0, and they meet zero columns of fc2, so the pair computes the
    unpadded one up to float summation order.

    ``weight`` holds the padded shape (out_features, in_features); ``true_in_features`` / ``true_out_features`` are
    the layer's own.
    """

    def __init__(self, in_features: int, out_features: int, true_in_features: int, true_out_features: int,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.true_in_features = true_in_features
        self.true_out_features = true_out_features

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, in_features: int | None = None,
                    out_features: int | None = None) -> 'PaddedLinear':
        in_features, out_features = in_features or linear.in_features, out_features or linear.out_features
        padded = cls(in_features, out_features, linear.in_features, linear.out_features, linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        extra_in, extra_out = in_features - linear.in_features, out_features - linear.out_features
        padded.weight.copy_(F.pad(linear.weight, (0, extra_in, 0, extra_out)))
        if linear.bias is not None:
            padded.bias.copy_(F.pad(linear.bias, (0, extra_out)))
        return padded

    @torch.no_grad()
    def canonical(self) -> nn.Linear:
        """The unpadded ``nn.Linear``."""
        linear = nn.Linear(self.true_in_features, self.true_out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(self.weight[:self.true_out_features, :self.true_in_features])
        if self.bias is not None:
            linear.bias.copy_(self.bias[:self.true_out_features])
        return linear

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, true_in_features={self.true_in_features}, ' \
               f'true_out_features={self.true_out_features}'


class InplaceGELU(nn.GELU):
    """GELU written into its input's buffer: the inference form of an MLP's activation.

    Why: the hidden activation is the largest tensor of a transformer block, and on CPU every fresh allocation of it
    costs page faults. Timed in SReT-T (batch 16, 224 x 224, 2 threads, interleaved rounds), the re-parameterized
    model ran about 7 % slower with the out-of-place GELU. The input is the fresh output of ``fc1``, which nothing
    else reads; a hook on ``fc1`` sees its output overwritten. An inference form: training uses ``nn.GELU``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_(x, approximate=self.approximate)

    def canonical(self) -> nn.GELU:
        return nn.GELU(self.approximate)


def inplace_activation(act: nn.Module) -> nn.Module:
    """The in-place inference form of ``act`` if it has one (GELU, ReLU), else ``act`` itself."""
    if type(act) is nn.GELU:
        return InplaceGELU(act.approximate)
    if type(act) is nn.ReLU:
        return nn.ReLU(inplace=True)
    return act


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

    @torch.no_grad()
    def reparameterize(self):
        """Switch to the CPU inference form, in place: the hidden width zero-padded to a multiple of 8
        (`PaddedLinear`, only behind an activation that maps 0 to 0) and the activation in place (`InplaceGELU`)."""
        hidden = self.fc1.out_features
        padding = -hidden % HIDDEN_ALIGNMENT
        if padding and type(self.act) in (nn.GELU, nn.ReLU) and type(self.fc1) is type(self.fc2) is nn.Linear:
            self.fc1 = PaddedLinear.from_linear(self.fc1, out_features=hidden + padding)
            self.fc2 = PaddedLinear.from_linear(self.fc2, in_features=hidden + padding)
        self.act = inplace_activation(self.act)


class PointwiseLinear(nn.Module):
    """A 1 x 1 convolution (stride 1, no padding, no groups) computed on an NCHW map as one batched matrix product:
    the inference form of `ConvMlp`'s layers.

    Why: oneDNN runs a 1 x 1 convolution on an NCHW input by reordering it to a blocked layout and back; the product
    ``W @ x.view(B, C, H * W)`` needs no reorder. Timed on RIFormer-S12's MLPs (fc1 and fc2, batch 16, 2 threads,
    interleaved rounds), the product took about half the time of the convolutions on the 56 x 56 and 28 x 28 maps
    and 0.75-0.8 on the 14 x 14 map, but 1.2-1.5x as long on 7 x 7 and 10 x 10 maps (about equal at 12 x 12), where
    the per-image products are too small: maps under ``MIN_PIXELS`` keep the convolution, and so do channels-last
    inputs, fast in that layout. ``weight`` [out, in, 1, 1] and ``bias`` are the conv's own parameters (same names
    and shapes, so the state_dict is the conv's).
    """

    MIN_PIXELS = 14 * 14

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not self.accepts(conv):
            raise ValueError(f'PointwiseLinear computes plain 1 x 1 convolutions only, got {conv}')
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight, self.bias = conv.weight, conv.bias

    @staticmethod
    def accepts(conv: nn.Module) -> bool:
        return type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and \
            conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_linear(x, self.weight, self.bias, self.MIN_PIXELS)

    def canonical(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)
        conv.weight, conv.bias = self.weight, self.bias
        return conv

    def extra_repr(self) -> str:
        return f'{self.in_channels}, {self.out_channels}, bias={self.bias is not None}'


@register_notrace_function  # timm's FX feature extractor keeps it as one call
def pointwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     min_pixels: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1 x 1 ``weight``, as `PointwiseLinear` computes it."""
    batch, in_channels, height, width = x.shape
    if height * width < min_pixels or not x.is_contiguous():
        return F.conv2d(x, weight, bias)
    out_channels = weight.shape[0]
    weight = weight.view(1, out_channels, in_channels).expand(batch, -1, -1)
    x = x.view(batch, in_channels, height * width)
    out = torch.bmm(weight, x) if bias is None else torch.baddbmm(bias.view(1, -1, 1), weight, x)
    return out.view(batch, out_channels, height, width)


torch.fx.wrap('pointwise_linear')  # symbolic tracing keeps the shape-dependent choice as one call


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

    @torch.no_grad()
    def reparameterize(self):
        """Switch to the CPU inference form, in place: the 1 x 1 convs as batched matrix products
        (`PointwiseLinear`) and the activation in place (`InplaceGELU`)."""
        for name in ('fc1', 'fc2'):
            if PointwiseLinear.accepts(getattr(self, name)):
                setattr(self, name, PointwiseLinear(getattr(self, name)))
        self.act = inplace_activation(self.act)

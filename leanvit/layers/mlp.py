"""MLPs: the transformer MLP over tokens, and the MetaFormer MLP over the channels of a feature map."""

import contextlib
import contextvars

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn

HIDDEN_ALIGNMENT = 8
_pad_hidden = contextvars.ContextVar('leanvit_pad_hidden', default=True)


@contextlib.contextmanager
def unpadded_hidden():
    """Run MLPs at their true hidden width, e.g. so that the profiler counts the architecture's MACs."""
    token = _pad_hidden.set(False)
    try:
        yield
    finally:
        _pad_hidden.reset(token)


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout, with timm's parameter names (``fc1``, ``fc2``).

    The forward pads the hidden width to a multiple of 8 with zero weights: oneMKL's CPU GEMM runs up to twice as
    slow when an output width is not a multiple of 8, and SReT-T's hidden widths are 230, 460 and 921. Zero rows in
    fc1 give hidden units that are exactly zero (the activation maps 0 to 0) and meet zero columns in fc2, so the
    result is unchanged up to float summation order, and gradients reach only the true weights. Parameters keep
    their true shapes: checkpoints and parameter counts are unaffected.
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)
        self.hidden_padding = -hidden_dim % HIDDEN_ALIGNMENT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        pad = self.hidden_padding
        if pad and _pad_hidden.get():
            w1, b1, w2 = F.pad(w1, (0, 0, 0, pad)), F.pad(b1, (0, pad)), F.pad(w2, (0, pad))
        x = self.drop1(_activate(self.act, F.linear(x, w1, b1)))
        return self.drop2(F.linear(x, w2, self.fc2.bias))


def _activate(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Without autograd a GELU runs in place, sparing the allocation of the largest activation (fresh allocations
    # cost page faults on CPU). A module with hooks is called normally, so the hooks see it.
    if isinstance(act, nn.GELU) and not torch.is_grad_enabled() and not _has_hooks(act):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


@register_notrace_function  # timm's FX feature extractor keeps it as one call
def pointwise_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a 1 x 1 convolution; on a contiguous NCHW map computed as one batched matrix product.

    oneDNN runs a 1 x 1 convolution on an NCHW input by reordering it to a blocked layout and back, which makes it
    1.1-2.9x slower than the plain product ``W @ x.view(B, C, H * W)`` on CPU (RIFormer-S12 shapes, batch 16). A
    channels-last input keeps the convolution, which is fast in that layout, and so does a conv with forward hooks
    (so that taps on it see it) or one that is not a plain 1 x 1 (stride 1, no padding, no groups).
    """
    plain = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
    if not x.is_contiguous() or not plain or _has_hooks(conv):
        return conv(x)
    batch, _, height, width = x.shape
    weight = conv.weight.view(1, conv.out_channels, conv.in_channels).expand(batch, -1, -1)
    out = torch.bmm(weight, x.view(batch, conv.in_channels, height * width))
    if conv.bias is not None:
        bias = conv.bias.to(out.dtype).view(1, -1, 1)  # under autocast the product is half precision: keep it so
        out = out.add_(bias) if not torch.is_grad_enabled() else out + bias
    return out.view(batch, conv.out_channels, height, width)


torch.fx.wrap('pointwise_conv')


class ConvMlp(nn.Module):
    """MetaFormer MLP on a (B, C, H, W) map: 1 x 1 conv ``fc1`` -> activation -> dropout -> ``fc2`` -> dropout.

    Parameter names and shapes are timm's ``Mlp(use_conv=True)`` and the official PoolFormer/RIFormer ones; the
    forward is `pointwise_conv` (faster on CPU) with the in-place activation of `Mlp`.
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(_activate(self.act, pointwise_conv(x, self.fc1)))
        return self.drop2(pointwise_conv(x, self.fc2))

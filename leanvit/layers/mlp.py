"""Transformer MLP whose hidden width runs padded to a multiple of 8."""

import contextlib
import contextvars

import torch
import torch.nn.functional as F
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
    their true shapes: checkpoints and parameter counts are unaffected. Without autograd a GELU runs in place, sparing
    the allocation of the largest activation (fresh allocations cost page faults on CPU).
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
        x = F.linear(x, w1, b1)
        if isinstance(self.act, nn.GELU) and not torch.is_grad_enabled():
            x = torch.ops.aten.gelu_(x, approximate=self.act.approximate)
        else:
            x = self.act(x)
        x = self.drop1(x)
        return self.drop2(F.linear(x, w2, self.fc2.bias))

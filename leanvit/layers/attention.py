"""Multi-head self-attention over token groups (sliced group self-attention, SReT Sec. 3.3).

With ``groups == 1`` this is standard multi-head self-attention, so families that need plain global attention
use the same module.
"""

import torch
import torch.nn.functional as F
from torch import nn


class GroupAttention(nn.Module):
    """Multi-head self-attention computed independently inside contiguous groups of tokens.

    The token sequence (B, N, C) is cut into ``groups`` contiguous slices of N / groups tokens each (raster order,
    not 2-D windows) and attention runs inside each slice: the attention cost drops by the group count. An optional
    token permutation is applied before slicing and undone before the output projection, so that a second pass of
    the same weights groups different tokens together and information still mixes across the whole image.

    Args:
        dim: Token channels C.
        num_heads: Attention heads; ``dim`` must be divisible by it.
        qkv_bias: Bias on the fused query/key/value projection.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'attention dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, groups: int = 1, permutation: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within ``groups`` slices of ``x`` (B, N, C), after gathering tokens by ``permutation`` if given."""
        B, N, C = x.shape
        if permutation is not None:
            x = x.index_select(1, permutation)  # several times faster than x[:, permutation] on CPU
        # 'b (g n) (three h d) -> three (b g) h n d': the slice index g joins the batch, so one fused
        # attention call covers every group.
        qkv = self.qkv(x).reshape(B * groups, N // groups, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        # '(b g) h n d -> b (g n) (h d)'
        x = x.transpose(1, 2).reshape(B, N, C)
        if permutation is not None:
            # The projection acts per token, so restoring the order before it changes nothing numerically
            # and keeps the module's output aligned with its input.
            x = x.index_select(1, torch.argsort(permutation))
        return self.proj_drop(self.proj(x))

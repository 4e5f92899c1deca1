"""MiniViT: weight multiplexing for DeiT and Swin.

Paper: Jinnian Zhang, Houwen Peng, Kan Wu, Mengchen Liu, Bin Xiao, Jianlong Fu, Lu Yuan, "MiniViT: Compressing Vision
Transformers with Weight Multiplexing", CVPR 2022, https://arxiv.org/abs/2204.07154
Official code (two code bases, Mini-DeiT and Mini-Swin): https://github.com/microsoft/Cream/tree/main/MiniViT

The idea in one screen (paper Sec. 3.2):
- Weight sharing: consecutive layers of a stage run one block's weights (attention qkv and proj, the MLP, Swin's
  relative position bias table). `MultiplexedStage` holds each distinct block once (`leanvit.layers.SharedWeightStage`)
  and applies it ``repeats`` times.
- Weight transformation: every applied layer keeps its own small modules (`LayerTransforms`), so the layers that
  share weights still compute different functions: its LayerNorms; a head mixing of the attention logits before the
  softmax and of the probabilities after it (`HeadMixing`, an H x H matrix per layer); and an MLP transformation, a
  LayerNorm then a residual depthwise 7 x 7 convolution on the token map before the MLP (`LocalConv`).
- Weight distillation (Sec. 3.3) is a training objective, not part of the model (`leanvit.train.distillation`).

Each part is an option, so the paper's ablation is one flag each: ``share`` (layers per distinct block; 12 shares one
block across all of DeiT's layers), ``separate_norms``, ``attn_transform``, ``local_conv``. The official Mini-DeiT has
no depthwise conv; its released checkpoints use a per-layer contextual relative position encoding on the keys
instead (iRPE, `ImageRPE`), which the authors say plays the MLP transformation's role: ``rpe=True`` (the default of
the ``mini_deit_*`` models, so that the released weights load); ``rpe=False, local_conv=True`` is the paper's form.
Choices where the official code is silent or differs: docs/minivit.md, "leanvit choices".
"""

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerType,
    PatchEmbed,
    calculate_drop_path_rates,
    get_act_layer,
    get_norm_layer,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging, window_partition, window_reverse
from torch import nn

from leanvit.io.weights import register_converter, unwrap_state_dict
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import Mlp
from leanvit.layers.pos_embed import resample_pos_embed
from leanvit.layers.shared import SharedWeightStage
from leanvit.models._registry import PaperCfg
from leanvit.models._staged import LinearHeadClassifier, StagedClassifier

__all__ = ['HeadMixing', 'ImageRPE', 'LayerTransforms', 'LocalConv', 'MiniDeiT', 'MiniSwin', 'MultiplexedBlock',
           'MultiplexedStage']

torch.fx.wrap('check_input_size')
LOCAL_KERNEL = 7  # the paper's depthwise kernel, whatever the window size (official Mini-Swin)


class HeadMixing(nn.Module):
    """The attention transformation (paper Sec. 3.2, Eq. 5): ``out[g] = sum_h W[g, h] attn[h] (+ b[g])`` over the
    head axis of a (B, H, N, M) attention map, an H x H matrix per layer (talking-heads attention).

    ``weight`` is (H, H). Mini-Swin has a bias (a ``Linear(H, H)`` there), Mini-DeiT none (a 1 x 1 ``Conv2d`` there).
    """

    def __init__(self, num_heads: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, num_heads))
        self.bias = nn.Parameter(torch.zeros(num_heads)) if bias else None
        trunc_normal_(self.weight, std=.02)  # official init; `identity_` starts a compressed student at no mixing

    @torch.no_grad()
    def identity_(self) -> 'HeadMixing':
        nn.init.eye_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        return self

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        # One batched (H, H) @ (H, N * M) product over the map as it lies: the official 1 x 1 convolution runs as a
        # convolution of an H-channel image (slow in oneDNN for so few channels), the official Linear needs the map
        # permuted, and a broadcast matmul becomes one (B * N * M, H) @ (H, H) product with two transposing copies.
        B, H = attn.shape[:2]
        flat = attn.reshape(B, H, -1)
        weight = self.weight.expand(B, H, H)
        mixed = torch.bmm(weight, flat) if self.bias is None else torch.baddbmm(self.bias.view(1, H, 1), weight, flat)
        return mixed.view_as(attn)


def piecewise_index(offset: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """iRPE's piecewise bucket of a relative offset (Wu et al., "Rethinking and Improving Relative Position Encoding
    for Vision Transformer", ICCV 2021, Eq. 18): exact within ``alpha``, logarithmic beyond, clipped at
    ``int(beta)``."""
    offset = offset.double()
    far = torch.sign(offset) * (alpha + torch.log(offset.abs().clamp(min=alpha) / alpha)
                                / math.log(gamma / alpha) * (beta - alpha)).round().clamp(max=beta)
    return torch.where(offset.abs() <= alpha, offset.round(), far).long()


def product_bucket_ids(grid_size: tuple[int, int], alpha: float = 1.9, beta: float = 3.8,
                       gamma: float = 15.2) -> torch.Tensor:
    """(N, N) bucket of every (query, key) pair of a grid, iRPE's 'product' method: the row and column offsets
    (query minus key) are bucketed on their own, then combined into one of (2 int(beta) + 1)² buckets."""
    rows, cols = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    side = 2 * int(beta) + 1
    row_bucket = piecewise_index(rows[:, None] - rows[None, :], alpha, beta, gamma) + int(beta)
    col_bucket = piecewise_index(cols[:, None] - cols[None, :], alpha, beta, gamma) + int(beta)
    return row_bucket * side + col_bucket


class ImageRPE(nn.Module):
    """The official Mini-DeiT's per-layer relative position encoding: iRPE, contextual mode on the keys, product
    method, shared across heads (Wu et al., ICCV 2021; official ``irpe.py``, ``get_deit_rpe_config``).

    For queries and keys (B, H, N, d) and the logit scale it returns the logits with the iRPE term,
    ``scale (q_i · k_j + q_i · r[bucket(i, j)])``, where ``r`` is the table ``lookup_table_weight`` (1, d, buckets),
    zero at init, and the bucket depends on the 2-D offset between the tokens (`product_bucket_ids`). The token grid
    is fixed by the model's image size.

    Why the product is computed here: the per-bucket scores ``q · r`` (B·H, N, buckets) are read for every (query,
    key) pair by one gather whose index is the (N, N) bucket map broadcast over the batch (a stride-0 view, no
    (B, H, N, N) index in memory), and the q kᵀ product is accumulated into that fresh tensor in place (``baddbmm_``):
    no pass of its own for the term, no copy of it into the product's output (an ``index_select`` of flat indices
    followed by ``baddbmm`` makes both). The scale goes to ``r`` (49 x d) and to the product's ``alpha``, not to q.
    """

    def __init__(self, head_dim: int, grid_size: tuple[int, int], alpha: float = 1.9, beta: float = 3.8,
                 gamma: float = 15.2):
        super().__init__()
        buckets = (2 * int(beta) + 1) ** 2
        self.lookup_table_weight = nn.Parameter(torch.zeros(1, head_dim, buckets))
        self.register_buffer('bucket_ids', product_bucket_ids(grid_size, alpha, beta, gamma), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        B, H, N, _ = q.shape
        q, k = q.flatten(0, 1), k.flatten(0, 1)  # (B·H, N, d): the layout both products need, made once
        per_bucket = q @ (self.lookup_table_weight[0] * scale)  # (B·H, N, buckets)
        logits = per_bucket.gather(-1, self.bucket_ids.expand((B * H, N, N)))
        return logits.baddbmm_(q, k.transpose(1, 2), alpha=scale).view(B, H, N, N)


class LocalConv(nn.Module):
    """The MLP transformation of Mini-Swin (paper Sec. 3.2, Eq. 6; official ``local_norm_list`` /
    ``local_conv_list``): ``x <- LN(x); x <- x + DWConv7x7(x)`` on the (B, H, W, C) token map. The LayerNorm's output
    replaces its input (there is no residual around it), as in the official code."""

    def __init__(self, dim: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.norm = norm_layer(dim)
        self.conv = nn.Conv2d(dim, dim, LOCAL_KERNEL, padding=LOCAL_KERNEL // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)
        return (x + self.conv(x)).permute(0, 2, 3, 1)

    @torch.no_grad()
    def identity_(self) -> 'LocalConv':
        """A conv that adds nothing; the norm stays (the caller copies a teacher's into it)."""
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        return self


class LayerTransforms(nn.Module):
    """Everything one applied layer does not share with the other layers of its block (paper Sec. 3.2).

    Any part may be absent (None): the norms when ``separate_norms`` is off (the block holds them), the head mixings
    without ``attn_transform``, ``rpe`` outside the official Mini-DeiT form, ``local`` without ``local_conv``.
    """

    def __init__(self, dim: int, num_heads: int, *, separate_norms: bool, attn_transform: bool, mixing_bias: bool,
                 local_conv: bool, rpe_grid: tuple[int, int] | None, drop_path: float,
                 norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.norm1 = norm_layer(dim) if separate_norms else None
        self.mix_logits = HeadMixing(num_heads, mixing_bias) if attn_transform else None
        self.mix_probs = HeadMixing(num_heads, mixing_bias) if attn_transform else None
        self.rpe = ImageRPE(dim // num_heads, rpe_grid) if rpe_grid is not None else None
        self.norm2 = norm_layer(dim) if separate_norms else None
        self.local = LocalConv(dim, norm_layer) if local_conv else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()


def relative_position_index(window: int, table_window: int) -> torch.Tensor:
    """(N, N) row of Swin's relative position bias table for every pair of tokens in a ``window`` x ``window``
    window, the table holding every offset of a ``table_window`` window: a map smaller than the configured window
    attends in one smaller window, which uses the table's central offsets."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    side = 2 * table_window - 1
    row_offset = rows[:, None] - rows[None, :] + table_window - 1
    return row_offset * side + cols[:, None] - cols[None, :] + table_window - 1


class MultiplexedAttention(nn.Module):
    """Multi-head self-attention whose weights several layers share; each layer brings its `LayerTransforms`.

    ``logits = (q / sqrt(d)) kᵀ (+ relative position bias) (+ the iRPE term, `ImageRPE`)``, then the layer's
    ``mix_logits``, the window mask, softmax, ``mix_probs``, ``@ v``: the official order of both code bases. Without
    head mixing or iRPE the logits never need materialising and the fused kernel runs (plain Swin and DeiT attention).

    How it differs from timm's ``Attention``: its ``qkv`` and ``proj`` serve several layers, each of which brings its
    own `LayerTransforms`, whose head mixings act on the attention map itself (before and after the softmax) and
    whose iRPE adds a term to the logits; a window size adds Swin's relative position bias table and takes the
    shifted-window mask. With none of these (global attention, no head mixing, no iRPE) it computes
    ``timm.layers.Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)`` exactly, with
    the same state_dict keys (``qkv.*``, ``proj.*``).

    Attention dropout is a rate (``attn_drop_rate``), given to the fused kernel or applied to the explicit attention
    map, not a module: a dropout module the fused kernel bypasses would be a leaf that the forward never calls, and
    leanvit calls every leaf module.

    Args:
        dim: Token channels; ``num_heads`` must divide it.
        num_heads: Attention heads.
        window_size: Swin's window (a shared relative position bias table per window offset); None for global
            attention over all tokens (DeiT).
        table_window_size: The window the bias table is sized for, if larger (the configured one, where a small map
            shrinks the window).
        attn_drop: Dropout rate on the attention weights (in training).
        proj_drop: Dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | None = None, table_window_size: int | None = None,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'attention dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        if window_size is not None:
            table_window_size = table_window_size or window_size
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * table_window_size - 1) ** 2, num_heads))
            self.register_buffer('relative_position_index', relative_position_index(window_size, table_window_size),
                                 persistent=False)
            trunc_normal_(self.relative_position_bias_table, std=.02)
        else:
            self.relative_position_bias_table = None
        self.attn_drop_rate = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self) -> torch.Tensor | None:
        if self.relative_position_bias_table is None:
            return None
        size = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(size, size, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, transforms: LayerTransforms, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C), with B counting windows for Swin; ``mask`` (windows, N, N) or None."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias()
        if transforms.mix_logits is None and transforms.rpe is None:
            if mask is not None:  # (windows, N, N) -> (b w) 1 N N, the order of window_partition
                mask = mask.unsqueeze(1).repeat(B // mask.shape[0], 1, 1, 1)
            attn_bias = bias if mask is None else (mask if bias is None else bias + mask)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                               dropout_p=self.attn_drop_rate if self.training else 0.)
        else:
            if transforms.rpe is not None:
                attn = transforms.rpe(q, k, self.scale)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            if transforms.mix_logits is not None:
                attn = transforms.mix_logits(attn)
            if mask is not None:  # broadcast over the images of the batch: '(b w) h n m' order of window_partition
                windows = mask.shape[0]
                attn = (attn.view(-1, windows, self.num_heads, N, N) + mask.view(1, windows, 1, N, N)).view_as(attn)
            attn = attn.softmax(dim=-1)
            if transforms.mix_probs is not None:
                attn = transforms.mix_probs(attn)
            x = F.dropout(attn, self.attn_drop_rate, self.training) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class MultiplexedBlock(nn.Module):
    """A pre-norm transformer block whose weights (attention and MLP) serve several layers (paper Sec. 3.2).

    One application on a (B, H, W, C) token map, with the applying layer's ``transforms``: ``x + attn(norm1(x))``,
    the layer's MLP transformation, then ``x + mlp(norm2(x))``. Swin applications partition the map into windows,
    shifted by ``shift``; DeiT attends over the whole map.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int | None, separate_norms: bool,
                 table_window_size: int | None = None, grid_size: tuple[int, int] | None = None,
                 proj_drop: float = 0., attn_drop: float = 0.,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.window_size = window_size
        # Fixed by the map the stage is built for: decided here, not per forward (and so no branch for FX to trace).
        self.padding = (-grid_size[0] % window_size, -grid_size[1] % window_size) if window_size and grid_size \
            else (0, 0)
        self.norm1 = None if separate_norms else norm_layer(dim)
        self.attn = MultiplexedAttention(dim, num_heads, window_size, table_window_size, attn_drop, proj_drop)
        self.norm2 = None if separate_norms else norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: torch.Tensor, transforms: LayerTransforms, shift: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, W, C = x.shape
        y = (transforms.norm1 or self.norm1)(x)
        if self.window_size is None:
            y = self.attn(y.reshape(B, H * W, C), transforms).reshape(B, H, W, C)
        else:
            window = (self.window_size, self.window_size)
            # A map that does not split into windows is padded at the bottom and right, as timm's Swin does.
            pad_h, pad_w = self.padding
            if pad_h or pad_w:
                y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
            if shift:
                y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            y = window_partition(y, window).reshape(-1, self.window_size ** 2, C)
            y = window_reverse(self.attn(y, transforms, mask).reshape(-1, *window, C), window, H + pad_h, W + pad_w)
            if shift:
                y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
            if pad_h or pad_w:
                y = y[:, :H, :W].contiguous()
        x = x + transforms.drop_path(y)
        if transforms.local is not None:
            x = transforms.local(x)
        return x + transforms.drop_path(self.mlp((transforms.norm2 or self.norm2)(x)))


def shifted_window_mask(grid_size: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """(windows, N, N) additive mask of Swin's shifted windows: -100 between tokens that the cyclic shift brought
    together from different regions (Liu et al., "Swin Transformer", ICCV 2021, Sec. 3.2; the official value)."""
    H, W = grid_size
    regions = torch.zeros(1, H, W, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bounds):
        for j, cols in enumerate(bounds):
            regions[:, rows, cols, :] = i * 3 + j
    regions = window_partition(regions, (window, window)).reshape(-1, window * window)
    differ = regions.unsqueeze(1) != regions.unsqueeze(2)
    return torch.zeros(differ.shape).masked_fill(differ, -100.)


class MultiplexedStage(SharedWeightStage):
    """``distinct`` blocks, each applied ``repeats`` times in a row, every applied layer with its own
    `LayerTransforms` (``layers``, one per layer in depth order). Works on (B, H, W, C) token maps.

    Swin's rule: layer ``l`` of the stage runs shifted windows when ``l`` is odd (counted over applications, as if
    the layers were not shared), unless the map fits in one window (then the window shrinks to the map and nothing
    shifts). ``official_mask``: the official Mini-Swin passes the shifted-window mask to every layer of a block that
    has a shift, also to its un-shifted applications; its released checkpoints were trained so, and this reproduces
    them. Off, only shifted layers are masked, as in Swin.
    """

    def __init__(self, in_dim: int, dim: int, grid_size: tuple[int, int], depth: int, distinct: int, num_heads: int,
                 mlp_ratio: float, window_size: int | None, *, separate_norms: bool, attn_transform: bool,
                 mixing_bias: bool, local_conv: bool, rpe: bool, official_mask: bool, downsample: bool,
                 drop_path_rates: list[float], proj_drop: float, attn_drop: float,
                 norm_layer: Callable[[int], nn.Module], act_layer: Callable[[], nn.Module]):
        if distinct < 1 or depth % distinct:
            raise ValueError(f'{distinct} distinct blocks cannot share a stage of depth {depth} evenly; expected a '
                             f'divisor of {depth}')
        shift, table_window_size = 0, window_size
        if window_size is not None:
            if min(grid_size) <= window_size:  # one window covers the map: nothing to shift (Swin)
                window_size = min(grid_size)
            else:
                shift = window_size // 2
        repeats = depth // distinct
        super().__init__(
            [MultiplexedBlock(dim, num_heads, mlp_ratio, window_size, separate_norms, table_window_size, grid_size,
                              proj_drop, attn_drop, norm_layer, act_layer) for _ in range(distinct)],
            repeats=repeats,
            per_application=lambda index, repeat: LayerTransforms(
                dim, num_heads, separate_norms=separate_norms, attn_transform=attn_transform,
                mixing_bias=mixing_bias, local_conv=local_conv, rpe_grid=grid_size if rpe else None,
                drop_path=drop_path_rates[index * repeats + repeat], norm_layer=norm_layer),
            per_application_name='layers',
            downsample=PatchMerging(in_dim, dim, norm_layer=norm_layer) if downsample else None,
        )
        self.grid_size = grid_size
        self.shift = shift
        self.official_mask = official_mask
        padded = tuple(math.ceil(size / window_size) * window_size for size in grid_size) if shift else None
        mask = shifted_window_mask(padded, window_size, shift) if shift else None
        self.register_buffer('shift_mask', mask, persistent=False)

    def forward_application(self, x: torch.Tensor, index: int, repeat: int) -> torch.Tensor:
        layer = index * self.repeats + repeat
        shift = self.shift if layer % 2 else 0
        mask = self.shift_mask if shift or self.official_mask else None
        return self.blocks[index](x, self.layers[layer], shift, mask)


def _init_weights(module: nn.Module):
    # Official init of both code bases: truncated normal (std 0.02) linear weights with zero biases, unit LayerNorms.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MiniDeiT(LinearHeadClassifier):
    """Mini-DeiT: DeiT with weight multiplexing, the official Mini-DeiT's layout (no class token, average pooling of
    the final-norm tokens, a position embedding (1, N, C)).

    Args:
        share: Layers per distinct block (consecutive layers share one block's weights); must divide ``depth``.
            2 is the paper's Mini-DeiT, ``depth`` shares one block across all layers (Mini-DeiT-B at 8.67 M).
        separate_norms: Each layer has its own LayerNorms (paper); off, the layers of a block share them.
        attn_transform: Head mixing before and after the softmax, per layer.
        local_conv: The paper's MLP transformation (LayerNorm + residual depthwise 7 x 7 conv per layer).
        rpe: The official Mini-DeiT's per-layer iRPE on the keys (what its released checkpoints need).
        img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth, num_heads, mlp_ratio, drop_rate,
        pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, norm_layer, act_layer: as timm's
            VisionTransformer (``global_pool`` 'avg' or ''; drop path rises linearly over the applied layers).
    """

    layer_fmt = 'NHWC'
    uniform_width = True

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            mlp_ratio: float = 4.,
            share: int = 2,
            separate_norms: bool = True,
            attn_transform: bool = True,
            local_conv: bool = False,
            rpe: bool = True,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: LayerType | None = None,
            act_layer: LayerType | None = None,
    ):
        super().__init__()
        if share < 1 or depth % share:
            raise ValueError(f'share={share} layers per block does not divide depth {depth}; expected a divisor')
        norm_layer = get_norm_layer(norm_layer) or partial(nn.LayerNorm, eps=1e-6)
        act_layer = get_act_layer(act_layer) or nn.GELU
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.output_fmt = 'NLC'  # forward_features gives tokens, as timm's VisionTransformer
        self.global_pool = self.check_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt='NHWC')
        self.img_size = self.patch_embed.img_size
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.stages = nn.Sequential(MultiplexedStage(
            embed_dim, embed_dim, grid, depth, depth // share, num_heads, mlp_ratio, None,
            separate_norms=separate_norms, attn_transform=attn_transform, local_conv=local_conv, mixing_bias=False,
            rpe=rpe, official_mask=False, downsample=False, drop_path_rates=rates, proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate, norm_layer=norm_layer, act_layer=act_layer))
        # Intermediates are the outputs of the distinct blocks (after their last application), as pruning can only
        # drop whole blocks.
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'stages.0.blocks.{i}')
                             for i in range(depth // share)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^pos_embed|^patch_embed', blocks=[(r'^stages\.0\.(?:blocks|layers)\.(\d+)', None),
                                                             (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.stages[0].grad_checkpointing = enable

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(check_input_size(x, self.in_chans, self.img_size))
        return self.pos_drop(x + self.pos_embed.view(1, *self.patch_embed.grid_size, -1))

    def _intermediate_layers(self) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        # The distinct blocks, each with all its applications: pruning can only drop whole blocks.
        stage = self.stages[0]
        return [partial(stage.forward_block, index=i) for i in range(len(stage.blocks))]

    def _truncate_layers(self, num_layers: int):
        self.stages[0].truncate(num_layers)

    def _format_final(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens after the final norm."""
        return self.norm(self.stages(self._forward_stem(x)).flatten(1, 2))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


class MiniSwin(StagedClassifier):
    """Mini-Swin: Swin Transformer with weight multiplexing (official Mini-Swin), timm's Swin layout (NHWC maps,
    patch merging opening each later stage, ``head.fc``).

    Args:
        distinct_blocks: Distinct (shared) blocks per stage, each dividing its stage's depth: (1, 1, 9, 1) for
            Swin-S/B (pairs of layers share), (1, 1, 1, 1) for Swin-T (one block per stage).
        separate_norms, attn_transform, local_conv: The three parts of weight transformation (paper Sec. 3.2), as in
            `MiniDeiT`; Mini-Swin uses all three.
        official_mask: Reproduce the official Mini-Swin's shifted-window mask on un-shifted layers (see
            `MultiplexedStage`); its released checkpoints need it.
        img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depths, num_heads, window_size,
        mlp_ratio, drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, norm_layer, act_layer: as timm's
            SwinTransformer.
    """

    layer_fmt = 'NHWC'

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: tuple[int, ...] = (2, 2, 6, 2),
            num_heads: tuple[int, ...] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            distinct_blocks: tuple[int, ...] = (1, 1, 1, 1),
            separate_norms: bool = True,
            attn_transform: bool = True,
            local_conv: bool = True,
            official_mask: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: LayerType | None = None,
            act_layer: LayerType | None = None,
    ):
        super().__init__()
        for name, values in (('num_heads', num_heads), ('distinct_blocks', distinct_blocks)):
            if len(values) != len(depths):
                raise ValueError(f'{name} has {len(values)} entries; expected one per stage ({len(depths)})')
        norm_layer = get_norm_layer(norm_layer) or nn.LayerNorm
        act_layer = get_act_layer(act_layer) or nn.GELU
        self.num_classes = num_classes
        self.in_chans = in_chans
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.output_fmt = 'NHWC'  # forward_features gives maps, as timm's SwinTransformer
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=norm_layer,
                                      output_fmt='NHWC')
        self.img_size = self.patch_embed.img_size
        grid = self.patch_embed.grid_size
        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stages, self.feature_info = [], []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i > 0:
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
            stages.append(MultiplexedStage(
                dims[max(i - 1, 0)], dim, grid, depth, distinct_blocks[i], num_heads[i], mlp_ratio, window_size,
                separate_norms=separate_norms, attn_transform=attn_transform, local_conv=local_conv, mixing_bias=True,
                rpe=False,
                official_mask=official_mask, downsample=i > 0, drop_path_rates=rates[sum(depths[:i]):][:depth],
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer, act_layer=act_layer))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(dims[-1])
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt='NHWC')
        # The official code leaves the depthwise convs at PyTorch's default init; a truncated normal (std 0.02) with
        # zero bias, as every other layer here, starts each MLP transformation near x + 0 (docs/minivit.md).
        self.apply(_init_weights)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.groups > 1:
                trunc_normal_(module.weight, std=.02)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith('relative_position_bias_table')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^patch_embed', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)),
            (r'^stages\.(\d+)\.(?:blocks|layers)\.(\d+)', None),
            (r'^norm', (99999,)),
        ])

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(check_input_size(x, self.in_chans, self.img_size))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) map after the final norm (timm's Swin layout)."""
        return self.norm(self.stages(self._forward_stem(x)))


def _split_applications(key: str, marker: str) -> tuple[str, int, str] | None:
    """'a.b.{marker}.{r}.rest' -> ('a.b', r, 'rest'), or None if ``marker`` is not in ``key``."""
    head, sep, tail = key.partition(f'.{marker}.')
    if not sep:
        return None
    repeat, _, rest = tail.partition('.')
    return head, int(repeat), rest


# Official per-layer modules and their names here: official name -> (leanvit name, how to reshape the value).
_DEIT_PER_LAYER = {'norm1.instances': 'norm1', 'norm2.instances': 'norm2', 'attn.rpe_k.instances': 'rpe',
                   'attn.conv_l.instances': 'mix_logits', 'attn.conv_w.instances': 'mix_probs'}
_SWIN_PER_LAYER = {'norm1_list': 'norm1', 'norm2_list': 'norm2', 'proj_l': 'mix_logits', 'proj_w': 'mix_probs',
                   'local_norm_list': 'local.norm', 'local_conv_list': 'local.conv'}


def _convert_per_layer(key: str, value: torch.Tensor, per_layer: dict, block_prefix: str, stage: str, block: int,
                       repeats: int) -> tuple[str, torch.Tensor]:
    """A key under an official block: per-layer modules to ``{stage}.layers.{l}``, the rest to the shared block."""
    for marker, name in per_layer.items():
        found = _split_applications(key, marker)
        if found is not None:
            _, repeat, rest = found
            if name.startswith('mix_') and value.ndim == 4:  # a 1 x 1 conv's (H, H, 1, 1) weight
                value = value[:, :, 0, 0]
            return f'{stage}.layers.{block * repeats + repeat}.{name}.{rest}', value
    return f'{stage}.blocks.{block}.{key[len(block_prefix):]}', value


@register_converter(MiniDeiT, MiniSwin)
def checkpoint_filter_fn(state_dict: dict, model: MiniDeiT | MiniSwin) -> dict:
    """Official Mini-DeiT or Mini-Swin checkpoint (github.com/DominickZhang/MiniViT-model-zoo releases) -> leanvit
    names; leanvit's own state_dicts pass through (docs/minivit.md, "Official checkpoints").

    Mini-DeiT: ``blocks.{i}.block.`` + shared weights, or ``{norm1,norm2}.instances.{r}``,
    ``attn.{rpe_k,conv_l,conv_w}.instances.{r}`` for layer ``l = i * share + r``. Mini-Swin: ``layers.{s}.blocks.{b}.``
    + shared weights or ``{norm1_list,norm2_list,proj_l,proj_w,local_norm_list,local_conv_list}.{r}``;
    ``layers.{s}.downsample`` opens stage ``s + 1`` here; ``head`` is ``head.fc``. The official index buffers and
    masks are recomputed, not loaded.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith('stages.') for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key.endswith(('relative_position_index', 'attn_mask')):
            continue
        if key.startswith('blocks.'):  # Mini-DeiT
            _, block, _, rest = key.split('.', 3)
            prefix = f'blocks.{block}.block.'
            new_key, value = _convert_per_layer(key, value, _DEIT_PER_LAYER, prefix, 'stages.0', int(block),
                                                model.stages[0].repeats)
        elif key.startswith('layers.') and '.blocks.' in key:  # Mini-Swin
            _, stage, _, block, _ = key.split('.', 4)
            prefix = f'layers.{stage}.blocks.{block}.'
            new_key, value = _convert_per_layer(key, value, _SWIN_PER_LAYER, prefix, f'stages.{stage}', int(block),
                                                model.stages[int(stage)].repeats)
        elif key.startswith('layers.') and '.downsample.' in key:
            _, stage, rest = key.split('.', 2)
            new_key = f'stages.{int(stage) + 1}.{rest}'
        elif key.startswith('head.') and isinstance(model, MiniSwin):
            new_key = 'head.fc.' + key[len('head.'):]
        else:
            new_key = key
        out[new_key] = value
    if isinstance(model, MiniDeiT) and 'pos_embed' in out and out['pos_embed'].shape != model.pos_embed.shape:
        out['pos_embed'] = _resize_pos_embed(out['pos_embed'], model.patch_embed.grid_size)
    return out


def _resize_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(1, N, C) square position embedding -> (1, H * W, C), bicubic, as the 384 fine-tunes start (paper Sec. 4)."""
    side = math.isqrt(pos_embed.shape[1])
    if side * side != pos_embed.shape[1]:
        raise ValueError(f'pos_embed of {pos_embed.shape[1]} tokens is not a square grid; cannot resize it to '
                         f'{grid_size[0]}x{grid_size[1]}')
    return resample_pos_embed(pos_embed, grid_size, (side, side))


def _create_mini_deit(variant: str, pretrained: bool = False, **kwargs) -> MiniDeiT:
    # features_only gives every distinct block's output unless out_indices picks some.
    out_indices = kwargs.pop('out_indices', None)
    return build_model_with_cfg(
        MiniDeiT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


def _create_mini_swin(variant: str, pretrained: bool = False, **kwargs) -> MiniSwin:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        MiniSwin, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


_ZOO = 'https://github.com/DominickZhang/MiniViT-model-zoo/releases/download/v1.0.0/'


def _cfg(file: str = '', swin: bool = False, **kwargs) -> PaperCfg:
    return PaperCfg(**{
        'url': _ZOO + file if file else '', 'input_size': (3, 224, 224), 'pool_size': (7, 7) if swin else (14, 14),
        'crop_pct': 0.9 if swin else 0.875, 'interpolation': 'bicubic',
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc' if swin else 'head', 'num_classes': 1000,
        # The Mini-DeiT code derives from DeiT (Apache-2.0), the Mini-Swin code from Swin (MIT).
        'license': 'mit' if swin else 'apache-2.0', 'origin_url': 'https://github.com/microsoft/Cream/tree/main/MiniViT',
        'paper_ids': 'arXiv:2204.07154',
        'paper_name': 'MiniViT: Compressing Vision Transformers with Weight Multiplexing', **kwargs})


# Figures: paper Tables 3 and 4 and the official README (docs/minivit.md, "Variants and figures"); parameter counts are
# exact counts of the official models. The 384 fine-tune of Mini-DeiT-B has a larger position embedding (another
# architecture, as timm's ViT *_384); Mini-Swin-B 384 has a larger window and so a larger bias table (likewise).
default_cfgs = generate_default_cfgs({
    'mini_deit_tiny_patch16_224.in1k': _cfg('mini_deit_tiny_patch16_224.pth', paper_params=3_090_304,
                                            paper_gmacs=1.277, paper_top1=73.0),
    'mini_deit_small_patch16_224.in1k': _cfg('mini_deit_small_patch16_224.pth', paper_params=11_450_824,
                                             paper_gmacs=4.651, paper_top1=80.9),
    'mini_deit_base_patch16_224.in1k': _cfg('mini_deit_base_patch16_224.pth', paper_params=44_098_408,
                                            paper_gmacs=17.69, paper_top1=83.2),
    'mini_deit_base_patch16_384.in1k': _cfg('mini_deit_base_patch16_384.pth', input_size=(3, 384, 384),
                                            pool_size=(24, 24), crop_pct=1.0, paper_params=44_390_248,
                                            paper_gmacs=56.78, paper_top1=84.9),
    'mini_swin_tiny_patch4_window7_224.in1k': _cfg('mini-swin-tiny-12m.pth', swin=True,
                                                   paper_params=12_001_765, paper_gmacs=4.60, paper_top1=81.3),
    'mini_swin_small_patch4_window7_224.in1k': _cfg('mini-swin-small-26m.pth', swin=True,
                                                    paper_params=26_463_205, paper_gmacs=8.93, paper_top1=83.9),
    'mini_swin_base_patch4_window7_224.in1k': _cfg('mini-swin-base-46m.pth', swin=True,
                                                   paper_params=46_444_852, paper_gmacs=15.71, paper_top1=84.5),
    'mini_swin_base_patch4_window12_384.in1k': _cfg('mini-swin-base-224to384.pth', swin=True,
                                                    input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0,
                                                    paper_params=46_512_532, paper_gmacs=48.58, paper_top1=85.5),
})

_DEIT_TI = dict(embed_dim=192, depth=12, num_heads=3)
_DEIT_S = dict(embed_dim=384, depth=12, num_heads=6)
_DEIT_B = dict(embed_dim=768, depth=12, num_heads=12)
_SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), distinct_blocks=(1, 1, 1, 1))
_SWIN_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), distinct_blocks=(1, 1, 9, 1))
_SWIN_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), distinct_blocks=(1, 1, 9, 1))


@register_model
def mini_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MiniDeiT:
    """Mini-DeiT-Ti: 3,090,304 params, 1.28 GMACs, 73.0 % top-1; pairs of layers share a block."""
    return _create_mini_deit('mini_deit_tiny_patch16_224', pretrained, **(_DEIT_TI | kwargs))


@register_model
def mini_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> MiniDeiT:
    return _create_mini_deit('mini_deit_small_patch16_224', pretrained, **(_DEIT_S | kwargs))


@register_model
def mini_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> MiniDeiT:
    """Mini-DeiT-B: 44,098,408 params; ``share=12`` (one block for all layers) gives 8,674,408."""
    return _create_mini_deit('mini_deit_base_patch16_224', pretrained, **(_DEIT_B | kwargs))


@register_model
def mini_deit_base_patch16_384(pretrained: bool = False, **kwargs) -> MiniDeiT:
    return _create_mini_deit('mini_deit_base_patch16_384', pretrained, **(_DEIT_B | dict(img_size=384) | kwargs))


@register_model
def mini_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> MiniSwin:
    """Mini-Swin-T: one block per stage, 12.00 M params, 4.60 GMACs, 81.3 % top-1."""
    return _create_mini_swin('mini_swin_tiny_patch4_window7_224', pretrained, **(_SWIN_T | kwargs))


@register_model
def mini_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> MiniSwin:
    return _create_mini_swin('mini_swin_small_patch4_window7_224', pretrained, **(_SWIN_S | kwargs))


@register_model
def mini_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> MiniSwin:
    """Mini-Swin-B: 46.44 M params; without the parts of weight transformation 45.82 / 45.80 / 45.78 M."""
    return _create_mini_swin('mini_swin_base_patch4_window7_224', pretrained, **(_SWIN_B | kwargs))


@register_model
def mini_swin_base_patch4_window12_384(pretrained: bool = False, **kwargs) -> MiniSwin:
    return _create_mini_swin('mini_swin_base_patch4_window12_384', pretrained,
                             **(_SWIN_B | dict(img_size=384, window_size=12) | kwargs))


# Only appended here (not in the table above): register_model reads a name's cfg when the entrypoint is declared.
default_cfgs.update(generate_default_cfgs({
    'test_mini_deit': PaperCfg(input_size=(3, 32, 32), pool_size=(4, 4), first_conv='patch_embed.proj',
                               classifier='head'),
    'test_mini_swin': PaperCfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=0.9, first_conv='patch_embed.proj',
                               classifier='head.fc'),
}))


@register_model
def test_mini_deit(pretrained: bool = False, **kwargs) -> MiniDeiT:
    """Tiny Mini-DeiT for fast tests: 32 x 32 input, 4 x 4 tokens of width 48, 4 layers sharing 2 blocks."""
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, mlp_ratio=2.)
    return _create_mini_deit('test_mini_deit', pretrained, **(args | kwargs))


@register_model
def test_mini_swin(pretrained: bool = False, **kwargs) -> MiniSwin:
    """Tiny Mini-Swin for fast tests: 64 x 64 input, maps 16 / 8 / 4 / 2 in windows of 4 (shifted in the first two
    stages, clipped in the last), a stage of 4 layers sharing 2 blocks."""
    args = dict(img_size=64, embed_dim=16, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), window_size=4,
                distinct_blocks=(1, 1, 2, 1), mlp_ratio=2.)
    return _create_mini_swin('test_mini_swin', pretrained, **(args | kwargs))

"""GFNet: Global Filter Networks.

Paper: Yongming Rao, Wenliang Zhao, Zheng Zhu, Jiwen Lu, Jie Zhou, "Global Filter Networks for Image Classification",
NeurIPS 2021, https://arxiv.org/abs/2107.00645 (hierarchical models extended in T-PAMI 2023)
Official code and checkpoints (MIT): https://github.com/raoyongming/GFNet

The idea in one screen (paper Sec. 3.2):
- The global filter layer replaces self-attention: a 2D real FFT over the token grid, an elementwise product with a
  learned complex filter (one value per frequency and channel), an inverse FFT (`GlobalFilter`). It is a depthwise
  circular convolution with a kernel as large as the feature map, at O(HW log HW) cost.
- The block is x + MLP(LN2(GlobalFilter(LN1(x)))): one residual around filter and MLP together (`GlobalFilterBlock`).
- `GFNet` is isotropic (ViT-like, 16x16 patches, 14x14 tokens at 224). `GFNetHierarchical` (GFNet-H) has four stages
  at strides 4 / 8 / 16 / 32 joined by 2x2 stride-2 convs, with a learned layer scale on each block's branch. Both
  add an absolute position embedding after the patch embedding and classify the average of the final-norm tokens.

The filter has one entry per frequency of the token grid, so its size (and the position embedding's) follows
``img_size``; official checkpoints of another resolution are resized on load the way the official fine-tuning script
does it (bicubic, corners aligned, for the filters; bicubic for the position embedding).

Layout: tokens stay a (B, H, W, C) grid inside the network, which both the FFT and the LayerNorms want; the patch
convs see NCHW. Module names follow the official code, so its checkpoints load key for key but two: the position
embedding changes shape, from (1, H*W, C) to (1, H, W, C), and the classifier ``head`` is ``head.fc`` of timm's
``ClassifierHead``, the head module of leanvit's other map models. ``forward_features`` returns NCHW maps, as timm's
convolutional models do.
"""

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    LayerType,
    calculate_drop_path_rates,
    get_act_layer,
    get_norm_layer,
)
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from leanvit.io.weights import register_converter, unwrap_state_dict
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import Mlp
from leanvit.layers.pos_embed import resample_pos_embed
from leanvit.models._registry import PaperCfg
from leanvit.models._staged import PoolingHeadClassifier

__all__ = ['GFNet', 'GFNetHierarchical', 'GlobalFilter', 'GlobalFilterBlock']

# FX symbolic tracing keeps the input check as one call in the graph instead of failing on its branches.
torch.fx.wrap('check_input_size')
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class GlobalFilter(nn.Module):
    """Global filter layer (paper Sec. 3.2): irfft2(K ⊙ rfft2(x)) over the (H, W) token grid, per channel.

    ``complex_weight`` is K stored as (H, W // 2 + 1, dim, 2) real/imaginary pairs, the official layout: a real input
    has a Hermitian-symmetric spectrum, so only the non-negative frequencies of the last axis are kept. Both FFTs use
    norm='ortho', as the official code. The FFTs run in float32 (half-precision FFTs need power-of-two sizes on
    CUDA); the result is cast back to the input's dtype.
    """

    def __init__(self, dim: int, grid_size: tuple[int, int]):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.complex_weight = nn.Parameter(torch.randn(grid_size[0], grid_size[1] // 2 + 1, dim, 2) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        if torch.onnx.is_in_onnx_export():
            return self.forward_as_products(x)
        dtype = x.dtype
        spectrum = torch.fft.rfft2(x.float(), dim=(1, 2), norm='ortho')
        spectrum = spectrum * torch.view_as_complex(self.complex_weight.float())
        return torch.fft.irfft2(spectrum, s=self.grid_size, dim=(1, 2), norm='ortho').to(dtype)

    def forward_as_products(self, x: torch.Tensor) -> torch.Tensor:
        """The same filter with each transform written as products with the DFT matrices of the fixed grid.

        What an ONNX export records: ONNX Runtime's DFT kernel is a direct O(n^2) transform outside its GEMM
        library, and GFNet's grids (56, 28, 14, 7) are not powers of two, so the file ran at a tenth of eager
        PyTorch; as matrix products (a few more MACs than an FFT, all in GEMMs) it runs at eager speed or better.
        The matrices are constants of the graph. Real and imaginary parts are kept as separate real tensors.
        """
        height, width = self.grid_size
        cos_h, sin_h = _dft_matrices(height, height)  # (H, H): full transform along the rows
        cos_w, sin_w = _dft_matrices(width // 2 + 1, width)  # (K, W): the non-negative frequencies of the columns
        # irfft along the columns: bins 1 .. K-1 stand for their conjugates too (all but the Nyquist bin of an even
        # width), and both ortho norms together divide by H * W.
        twice = torch.full((width // 2 + 1, 1), 2., dtype=torch.float64)
        twice[0] = 1.
        if width % 2 == 0:
            twice[-1] = 1.
        inverse_real, inverse_imag = twice * cos_w / (height * width), -twice * sin_w / (height * width)
        cos_h, sin_h, cos_w, sin_w, inverse_real, inverse_imag = (
            m.to(x.device, torch.float32) for m in (cos_h, sin_h, cos_w, sin_w, inverse_real, inverse_imag))
        dtype = x.dtype
        x = x.float().permute(0, 3, 1, 2)  # (B, C, H, W)
        real, imag = x @ cos_w.t(), -(x @ sin_w.t())  # rfft along W: (B, C, H, K)
        real, imag = cos_h @ real + sin_h @ imag, cos_h @ imag - sin_h @ real  # fft along H
        weight = self.complex_weight.float().permute(2, 0, 1, 3)  # (C, H, K, 2)
        weight_real, weight_imag = weight[..., 0], weight[..., 1]
        real, imag = real * weight_real - imag * weight_imag, real * weight_imag + imag * weight_real
        real, imag = cos_h @ real - sin_h @ imag, cos_h @ imag + sin_h @ real  # inverse fft along H
        x = real @ inverse_real + imag @ inverse_imag  # inverse rfft along W: (B, C, H, W)
        return x.permute(0, 2, 3, 1).to(dtype)


def _dft_matrices(frequencies: int, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2 pi k n / points for k < frequencies, n < points, in float64: (frequencies, points)."""
    angle = 2 * math.pi * torch.outer(torch.arange(frequencies, dtype=torch.float64),
                                      torch.arange(points, dtype=torch.float64)) / points
    return torch.cos(angle), torch.sin(angle)


class GlobalFilterBlock(nn.Module):
    """x + drop_path(gamma * MLP(LN2(GlobalFilter(LN1(x))))) on a (B, H, W, C) grid (paper Sec. 3.2).

    Args:
        dim: Channels.
        grid_size: (H, W) token grid, which fixes the filter size.
        mlp_ratio: MLP hidden width / dim.
        proj_drop: Dropout inside the MLP.
        drop_path: Stochastic depth rate.
        layer_scale_init: Initial value of the per-channel branch scale ``gamma`` (GFNet-H); None for no scale.
        norm_layer: Norm on the (B, H, W, C) grid; act_layer: MLP activation.
    """

    def __init__(
            self,
            dim: int,
            grid_size: tuple[int, int],
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale_init: float | None = None,
            norm_layer: Callable[[int], nn.Module] = LayerNorm,
            act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.filter = GlobalFilter(dim, grid_size)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.mlp(self.norm2(self.filter(self.norm1(x))))
        if self.gamma is not None:
            branch = branch * self.gamma
        return x + self.drop_path(branch)


class PatchConv(nn.Module):
    """Non-overlapping patch projection: a k x k stride-k conv whose output is a (B, H, W, C) token grid.

    Serves as the patch embedding (image in, NCHW) and as GFNet-H's 2x2 downsampling (tokens in, NHWC).
    """

    def __init__(self, in_dim: int, out_dim: int, patch_size: int, tokens_in: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, patch_size, stride=patch_size)
        self.tokens_in = tokens_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens_in:
            x = x.permute(0, 3, 1, 2)
        return self.proj(x).permute(0, 2, 3, 1)


class _GFNetBase(PoolingHeadClassifier):
    """What both GFNet layouts share: final norm, classifier head, grad checkpointing, weight init.

    Subclasses build ``patch_embed``, ``pos_embed`` and ``blocks``, set ``img_size``, ``in_chans`` and
    ``feature_info``, then call ``_init_head`` and ``_init_weights``. Intermediates come as NCHW or NHWC maps;
    ``forward_features`` gives NCHW.
    """

    layer_fmt = 'NHWC'
    layers_attr = 'blocks'

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                   norm_layer: Callable[[int], nn.Module]):
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.grad_checkpointing = False
        self.norm = norm_layer(num_features)
        # The blocks' layout: the head pools (or classifies every location) over the channel-last grid.
        self.head = ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt='NHWC')

    def _init_weights(self):
        # As the official code: N(0, 0.02) Linear weights with zero bias, unit LayerNorms, N(0, 0.02) position
        # embedding; convs keep PyTorch's defaults and filters their N(0, 0.02) draw. The official code calls timm's
        # trunc_normal_(std=.02), whose default bounds are +-2, i.e. +-100 std: the same distribution as normal_,
        # which draws it in one pass where trunc_normal_ takes several.
        nn.init.normal_(self.pos_embed, std=.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'pos_embed'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, H, W) features -> logits; with global_pool='' the classifier is applied at every location, giving
        (B, num_classes, H, W)."""
        x = self.head(x.permute(0, 2, 3, 1), pre_logits=pre_logits)
        return _to_nchw(x) if self.head.global_pool.is_identity() else x

    def _format_final(self, x: torch.Tensor) -> torch.Tensor:
        return _to_nchw(x)


def _grid(img_size: tuple[int, int], stride: int) -> tuple[int, int]:
    if img_size[0] % stride or img_size[1] % stride:
        raise ValueError(f'img_size {img_size} must be divisible by {stride}, the stride of the coarsest token grid')
    return img_size[0] // stride, img_size[1] // stride


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


class GFNet(_GFNetBase):
    """Isotropic GFNet (GFNet-Ti / XS / S / B): patch embedding, ``depth`` global filter blocks, norm, pool, linear.

    Args:
        img_size: Input resolution; fixes the token grid, the filters and the position embedding.
        patch_size: Patch (and token grid) stride.
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 gives a model that returns pooled features.
        global_pool: 'avg' (official), another pool type of timm's ``ClassifierHead``, or '' (no pooling,
            per-location logits).
        embed_dim: Token channels.
        depth: Blocks.
        mlp_ratio: MLP hidden width / embed_dim.
        drop_rate: Dropout before the classifier (official ``dropcls``).
        pos_drop_rate: Dropout after adding the position embedding (official ``drop_rate``).
        proj_drop_rate: Dropout inside the MLPs (official ``drop_rate``).
        drop_path_rate: Stochastic depth, rising linearly from 0 at the first block to this at the last.
        norm_layer: Norm of the blocks and the final norm (a class or a name timm's ``get_norm_layer`` knows; default
            LayerNorm with eps 1e-6).
        act_layer: Activation of the MLPs (a class or a name timm's ``get_act_layer`` knows; default GELU).
    """

    uniform_width = True

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 384,
            depth: int = 12,
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: LayerType | None = None,
            act_layer: LayerType | None = None,
    ):
        super().__init__()
        norm_layer = get_norm_layer(norm_layer) or LayerNorm
        act_layer = get_act_layer(act_layer) or nn.GELU
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        grid = _grid(self.img_size, patch_size)
        self.patch_embed = PatchConv(in_chans, embed_dim, patch_size, tokens_in=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            GlobalFilterBlock(embed_dim, grid, mlp_ratio, proj_drop_rate, rates[i], norm_layer=norm_layer,
                              act_layer=act_layer) for i in range(depth)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]
        self._init_head(embed_dim, num_classes, global_pool, drop_rate, norm_layer)
        self._init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^pos_embed|^patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(check_input_size(x, self.in_chans, self.img_size)) + self.pos_embed)

    def _forward_layer(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm features (B, C, H / patch_size, W / patch_size)."""
        x = self._forward_stem(x)
        for block in self.blocks:
            x = self._forward_layer(block, x)
        return _to_nchw(self.norm(x))


class GFNetHierarchical(_GFNetBase):
    """GFNet-H: four stages of global filter blocks at strides 4 / 8 / 16 / 32.

    ``patch_embed.0`` is the 4x4 stride-4 patch embedding and ``patch_embed.1..3`` the 2x2 stride-2 downsampling convs
    opening stages 1..3; ``blocks.i`` holds stage i's blocks. The names are the official ones.

    Args:
        img_size: Input resolution (divisible by 32); fixes the token grids, filters and position embedding.
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 gives a model that returns pooled features.
        global_pool: 'avg' (official), another pool type of timm's ``ClassifierHead``, or '' (no pooling,
            per-location logits).
        embed_dims: Channels per stage.
        depths: Blocks per stage.
        mlp_ratio: MLP hidden width / stage width.
        layer_scale_init: Initial value of each block's branch scale (official ``init_values``); None for none.
        drop_rate: Dropout before the classifier (official ``dropcls``).
        pos_drop_rate: Dropout after adding the position embedding (official ``drop_rate``).
        proj_drop_rate: Dropout inside the MLPs (official ``drop_rate``).
        drop_path_rate: Stochastic depth, rising linearly over all blocks of all stages.
        norm_layer, act_layer: As in `GFNet`.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: tuple[int, ...] = (64, 128, 256, 512),
            depths: tuple[int, ...] = (3, 3, 10, 3),
            mlp_ratio: float = 4.,
            layer_scale_init: float | None = 1e-3,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: LayerType | None = None,
            act_layer: LayerType | None = None,
    ):
        super().__init__()
        norm_layer = get_norm_layer(norm_layer) or LayerNorm
        act_layer = get_act_layer(act_layer) or nn.GELU
        if len(embed_dims) != len(depths):
            raise ValueError(f'embed_dims has {len(embed_dims)} entries and depths {len(depths)}; expected one each '
                             f'per stage')
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        num_stages = len(depths)
        _grid(self.img_size, 4 * 2 ** (num_stages - 1))
        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        patch_embed, blocks, self.feature_info = [], [], []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            stride = 4 * 2 ** i
            grid = _grid(self.img_size, stride)
            if i == 0:
                patch_embed.append(PatchConv(in_chans, dim, 4, tokens_in=False))
            else:
                patch_embed.append(PatchConv(embed_dims[i - 1], dim, 2, tokens_in=True))
            first = sum(depths[:i])
            blocks.append(nn.Sequential(*[
                GlobalFilterBlock(dim, grid, mlp_ratio, proj_drop_rate, rates[first + j], layer_scale_init,
                                  norm_layer, act_layer)
                for j in range(depth)]))
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f'blocks.{i}'))
        self.patch_embed = nn.ModuleList(patch_embed)
        self.pos_embed = nn.Parameter(torch.zeros(1, *_grid(self.img_size, 4), embed_dims[0]))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.ModuleList(blocks)
        self._init_head(embed_dims[-1], num_classes, global_pool, drop_rate, norm_layer)
        self._init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^pos_embed|^patch_embed\.0\.', blocks=r'^(?:patch_embed|blocks)\.(\d+)' if coarse else [
            (r'^patch_embed\.(\d+)', (0,)),
            (r'^blocks\.(\d+)\.(\d+)', None),
            (r'^norm', (99999,)),
        ])

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed[0](check_input_size(x, self.in_chans, self.img_size)) + self.pos_embed)

    def _forward_stage(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Stage ``index``: its 2x2 downsampling conv (the first stage's patch embedding is the stem), its blocks."""
        if index:
            x = self.patch_embed[index](x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks[index], x)
        return self.blocks[index](x)

    def _intermediate_layers(self) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        return [partial(self._forward_stage, index=i) for i in range(len(self.blocks))]

    def _truncate_layers(self, num_layers: int):
        self.patch_embed = self.patch_embed[:num_layers]
        self.blocks = self.blocks[:num_layers]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm features (B, C, H / 32, W / 32) of the last stage."""
        x = self._forward_stem(x)
        for i in range(len(self.blocks)):
            x = self._forward_stage(x, i)
        return _to_nchw(self.norm(x))


@register_converter(GFNet, GFNetHierarchical)
def checkpoint_filter_fn(state_dict: dict, model: GFNet | GFNetHierarchical) -> dict:
    """Convert an official GFNet / GFNet-H state_dict (github.com/raoyongming/GFNet) to leanvit's layout.

    Keys map one to one: the official names but the classifier's, ``head.*`` -> ``head.fc.*``. The official
    (1, H*W, C) position embedding becomes (1, H, W, C). Position embedding and filters of another resolution are
    resized to the model's as the official fine-tuning script does (a 224 checkpoint into a 384 model): the position
    embedding bicubically, each complex filter's real and imaginary parts bicubically with aligned corners. A leanvit
    state_dict passes through (resized likewise).
    """
    state_dict = unwrap_state_dict(state_dict)
    targets = {name: p.shape for name, p in model.named_parameters()}
    out = {}
    for key, value in state_dict.items():
        if key.startswith('head.') and not key.startswith('head.fc.'):
            key = 'head.fc.' + key[len('head.'):]
        target = targets.get(key)
        if key == 'pos_embed' and target is not None:
            value = _resize_pos_embed(value, target)
        elif key.endswith('filter.complex_weight') and target is not None and value.shape != target:
            value = _resize_filter(key, value, target)
        out[key] = value
    return out


def _resize_pos_embed(pos_embed: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """An official (1, H*W, C) or a leanvit (1, H, W, C) position embedding as the model's (1, H', W', C)."""
    if pos_embed.ndim == 3:
        side = math.isqrt(pos_embed.shape[1])
        if side * side != pos_embed.shape[1]:
            raise ValueError(f'official pos_embed {tuple(pos_embed.shape)} is not a square token grid; expected '
                             f'(1, H*W, C) with H == W')
        pos_embed = pos_embed.reshape(1, side, side, -1)
    grid = tuple(target[1:3])
    if pos_embed.shape[1:3] == grid:
        return pos_embed
    return resample_pos_embed(pos_embed.flatten(1, 2), grid, pos_embed.shape[1:3]).reshape(1, *grid, -1)


def _resize_filter(key: str, weight: torch.Tensor, target: torch.Size) -> torch.Tensor:
    if weight.ndim != 4 or weight.shape[2:] != target[2:]:
        raise ValueError(f'{key}: checkpoint filter {tuple(weight.shape)} cannot be resized to the model\'s '
                         f'{tuple(target)}; expected (h, w, {target[2]}, 2)')
    h, w, dim, _ = weight.shape
    grid = weight.reshape(1, h, w, dim * 2).permute(0, 3, 1, 2).float()
    resized = F.interpolate(grid, size=tuple(target[:2]), mode='bicubic', align_corners=True)
    return resized.permute(0, 2, 3, 1).reshape(target).to(weight.dtype).contiguous()


def _create_gfnet(variant: str, pretrained: bool = False, **kwargs) -> GFNet:
    # features_only gives every block's output unless out_indices picks some (timm's ViTs take the last 3).
    out_indices = kwargs.pop('out_indices', None)
    return build_model_with_cfg(
        GFNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _create_gfnet_h(variant: str, pretrained: bool = False, **kwargs) -> GFNetHierarchical:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        GFNetHierarchical, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_TSINGHUA = 'https://cloud.tsinghua.edu.cn/f/{}/?dl=1'


def _cfg(cloud_id: str, hierarchical: bool, **kwargs) -> PaperCfg:
    return PaperCfg(**{
        'input_size': (3, 224, 224), 'pool_size': (7, 7) if hierarchical else (14, 14), 'crop_pct': 0.9,
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.0.proj' if hierarchical else 'patch_embed.proj', 'classifier': 'head.fc',
        'num_classes': 1000, 'license': 'mit', 'origin_url': _TSINGHUA.format(cloud_id),
        'paper_ids': 'arXiv:2107.00645', 'paper_name': 'Global Filter Networks for Image Classification', **kwargs})


# Official weights live on Tsinghua Cloud / Google Drive, whose share links timm cannot fetch by name; download them
# and pass pretrained_cfg_overlay=dict(file=...) or use leanvit.load_checkpoint. paper_params: the official model
# code's exact count at 224; GMACs and top-1: official README.
default_cfgs = generate_default_cfgs({
    'gfnet_ti.in1k': _cfg('3d0c1579aa524a0a99dd', False, paper_params=7_511_784, paper_gmacs=1.3, paper_top1=74.6),
    'gfnet_xs.in1k': _cfg('e0ab5b1583954a1fa9b2', False, paper_params=15_985_768, paper_gmacs=2.8, paper_top1=78.6),
    'gfnet_s.in1k': _cfg('e5561fa070c44d9399bf', False, paper_params=24_869_608, paper_gmacs=4.5, paper_top1=80.0),
    'gfnet_b.in1k': _cfg('2fbf264597af4d72afb3', False, paper_params=43_120_616, paper_gmacs=7.9, paper_top1=80.7),
    'gfnet_h_ti.in1k': _cfg('b22dd45eccbe462cbbfb', True, paper_params=15_085_096, paper_gmacs=2.0,
                            paper_top1=80.1),
    'gfnet_h_s.in1k': _cfg('5229cb4d1daf48e69675', True, paper_params=32_162_632, paper_gmacs=4.5, paper_top1=81.5),
    'gfnet_h_b.in1k': _cfg('954c5af21e824ba6b40c', True, paper_params=53_744_200, paper_gmacs=8.4, paper_top1=82.9),
})

# Official model definitions (main_gfnet.py); the drop-path rates are those the official definitions fix.
_TI = dict(embed_dim=256, depth=12)
_XS = dict(embed_dim=384, depth=12)
_S = dict(embed_dim=384, depth=19, drop_path_rate=0.15)
_B = dict(embed_dim=512, depth=19, drop_path_rate=0.25)
_H_TI = dict(embed_dims=(64, 128, 256, 512), depths=(3, 3, 10, 3), layer_scale_init=1e-3, drop_path_rate=0.1)
_H_S = dict(embed_dims=(96, 192, 384, 768), depths=(3, 3, 10, 3), layer_scale_init=1e-5, drop_path_rate=0.2)
_H_B = dict(embed_dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), layer_scale_init=1e-6, drop_path_rate=0.4)


@register_model
def gfnet_ti(pretrained: bool = False, **kwargs) -> GFNet:
    """GFNet-Ti: 7.5 M params, 1.3 GMACs, 12 blocks of width 256."""
    return _create_gfnet('gfnet_ti', pretrained, **(_TI | kwargs))


@register_model
def gfnet_xs(pretrained: bool = False, **kwargs) -> GFNet:
    """GFNet-XS: 16.0 M params, 2.8 GMACs, 12 blocks of width 384."""
    return _create_gfnet('gfnet_xs', pretrained, **(_XS | kwargs))


@register_model
def gfnet_s(pretrained: bool = False, **kwargs) -> GFNet:
    """GFNet-S: 24.9 M params, 4.5 GMACs, 19 blocks of width 384."""
    return _create_gfnet('gfnet_s', pretrained, **(_S | kwargs))


@register_model
def gfnet_b(pretrained: bool = False, **kwargs) -> GFNet:
    """GFNet-B: 43.1 M params, 7.9 GMACs, 19 blocks of width 512."""
    return _create_gfnet('gfnet_b', pretrained, **(_B | kwargs))


@register_model
def gfnet_h_ti(pretrained: bool = False, **kwargs) -> GFNetHierarchical:
    """GFNet-H-Ti: 15.1 M params, 2.0 GMACs, stages 3-3-10-3 of widths 64-128-256-512."""
    return _create_gfnet_h('gfnet_h_ti', pretrained, **(_H_TI | kwargs))


@register_model
def gfnet_h_s(pretrained: bool = False, **kwargs) -> GFNetHierarchical:
    """GFNet-H-S: 32.2 M params, 4.5 GMACs, stages 3-3-10-3 of widths 96-192-384-768."""
    return _create_gfnet_h('gfnet_h_s', pretrained, **(_H_S | kwargs))


@register_model
def gfnet_h_b(pretrained: bool = False, **kwargs) -> GFNetHierarchical:
    """GFNet-H-B (RIFormer's default teacher): 53.7 M params, 8.4 GMACs, stages 3-3-27-3 of widths 96-192-384-768."""
    return _create_gfnet_h('gfnet_h_b', pretrained, **(_H_B | kwargs))


# Only appended here (not in the table above): register_model reads a name's cfg when the entrypoint is declared.
default_cfgs.update(generate_default_cfgs({
    'test_gfnet': PaperCfg(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=0.9, first_conv='patch_embed.proj',
                           classifier='head.fc'),
    'test_gfnet_h': PaperCfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=0.9, first_conv='patch_embed.0.proj',
                             classifier='head.fc'),
}))


@register_model
def test_gfnet(pretrained: bool = False, **kwargs) -> GFNet:
    """Tiny isotropic GFNet for fast tests: 32 x 32 input, 2 global filter blocks of width 32 on a 4 x 4 map."""
    return _create_gfnet('test_gfnet', pretrained, **(dict(img_size=32, patch_size=8, embed_dim=32, depth=2) | kwargs))


@register_model
def test_gfnet_h(pretrained: bool = False, **kwargs) -> GFNetHierarchical:
    """Tiny GFNet-H for fast tests: 64 x 64 input, maps 16 / 8 / 4 / 2, stages 1-1-2-1 of widths 16-24-32-48."""
    args = dict(img_size=64, embed_dims=(16, 24, 32, 48), depths=(1, 1, 2, 1), layer_scale_init=1e-3)
    return _create_gfnet_h('test_gfnet_h', pretrained, **(args | kwargs))

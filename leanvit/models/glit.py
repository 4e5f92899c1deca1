"""GLiT: vision transformers whose blocks mix global attention heads with local convolution heads.

Paper: Boyu Chen, Peixia Li, Chuming Li, Baopu Li, Lei Bai, Chen Lin, Ming Sun, Junjie Yan, Wanli Ouyang, "GLiT: Neural
Architecture Search for Global and Local Image Transformer", ICCV 2021, https://arxiv.org/abs/2107.02960
Official code (GLiT-Tiny retraining only): https://github.com/bychen515/GLiT

The idea in one screen (paper Sec. 3.1-3.2):
- A DeiT backbone whose heads are shared out, block by block, between global self-attention and a local module: the
  normed tokens are split by channels, the first ``global_heads / num_heads`` of them go to multi-head attention
  (`GlobalAttention`, head width scaled by the "qkv ratio"), the rest to a Conformer-style convolution module over
  the token sequence (`ConvModule`: pointwise conv + GLU, depthwise conv, BatchNorm, Swish, pointwise conv), and the
  two outputs are concatenated back (`GLMixer`). The block is otherwise DeiT's (`GLBlock`).
- Which block gets how many global heads, and the sizes inside each module, were found by a hierarchical
  evolutionary search over a weight-sharing supernet; the result for DeiT-Tiny widths is GLiT-Tiny (`GLIT_TINY`).
- An architecture is plain data (`BlockArch` per block, saved as JSON or YAML) checked against the search space
  (`SearchSpace`), so any architecture of the space builds: ``timm.create_model('glit_custom', arch='best.json')``.
Choices where the official code is silent: docs/glit.md.
"""

import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    LayerType,
    PatchEmbed,
    calculate_drop_path_rates,
    get_act_layer,
    get_norm_layer,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from torch import nn

from leanvit.io.weights import register_converter, unwrap_state_dict
from leanvit.layers.conv import folded_conv
from leanvit.layers.input_checks import check_input_size
from leanvit.layers.mlp import Mlp
from leanvit.models._registry import PaperCfg
from leanvit.models._staged import LinearHeadClassifier

__all__ = ['BlockArch', 'ConvModule', 'GLBlock', 'GLIT_TINY', 'GLMixer', 'GLiT', 'GlobalAttention', 'SearchSpace',
           'load_architecture']

torch.fx.wrap('check_input_size')


@dataclasses.dataclass(frozen=True)
class BlockArch:
    """One block's choices: ``global_heads`` of the model's heads attend globally, the rest are the local module;
    ``qkv_ratio`` scales the global heads' width, ``expansion`` and ``kernel_size`` size the local module."""
    global_heads: int
    mlp_ratio: float = 4.
    qkv_ratio: float = 1.
    expansion: int = 1
    kernel_size: int = 31

    @classmethod
    def from_dict(cls, record, where: str) -> 'BlockArch':
        """The block a JSON / YAML mapping describes, each field's type checked; a ValueError names ``where`` (file
        and block) and the field otherwise. Whether the values lie in a search space is `SearchSpace.check`'s."""
        fields = {f.name: getattr(f.type, '__name__', f.type) for f in dataclasses.fields(cls)}
        if not isinstance(record, dict) or 'global_heads' not in record or set(record) - set(fields):
            raise ValueError(f'{where} must be a mapping with global_heads and any of '
                             f'{sorted(set(fields) - {"global_heads"})}, got {record!r}')
        for name, value in record.items():
            # Bounded, so that no later arithmetic on a crafted value overflows a float.
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e12
            if fields[name] == 'int' and not (number and isinstance(value, int)):
                raise ValueError(f'{where}: {name} must be an integer, got {value!r:.40} ({type(value).__name__})')
            if fields[name] == 'float' and not (number and math.isfinite(value)):
                raise ValueError(f'{where}: {name} must be a number, got {value!r:.40} ({type(value).__name__})')
        return cls(**record)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """GLiT's search space (paper Sec. 3.3; the released encoding of the official code). High level: the global
    heads of every block, in thirds of the heads. Low level, by block type: all global (qkv ratio, MLP ratio), all
    local (kernel, expansion; MLP ratio fixed), mixed (expansion, MLP ratio; kernel and qkv ratio fixed)."""
    qkv_ratios: tuple[float, ...] = (0.5, 1., 2.)
    mlp_ratios: tuple[float, ...] = (2., 4., 6.)
    kernel_sizes: tuple[int, ...] = (17, 31, 45)
    expansions: tuple[int, ...] = (1, 2, 4)
    local_mlp_ratio: float = 4.
    mixed_kernel_size: int = 31
    mixed_qkv_ratio: float = 1.

    def global_head_choices(self, num_heads: int) -> tuple[int, ...]:
        return tuple(sorted({num_heads * third // 3 for third in range(4)}))

    def check(self, arch: Sequence[BlockArch], num_heads: int) -> None:
        """Raise a ValueError naming the first block and choice outside the space."""
        heads = self.global_head_choices(num_heads)
        for i, block in enumerate(arch):
            allowed = self.allowed(block, num_heads)
            if block.global_heads not in heads:
                raise ValueError(f'block {i}: global_heads {block.global_heads} is not one of {list(heads)} '
                                 f'(thirds of {num_heads} heads)')
            for name, values in allowed.items():
                if getattr(block, name) not in values:
                    raise ValueError(f'block {i} ({self.kind(block, num_heads)}): {name} {getattr(block, name)} is '
                                     f'not one of {list(values)}')

    def all_blocks(self, num_heads: int) -> tuple[BlockArch, ...]:
        """Every block of the space, for a block of ``num_heads`` heads."""
        blocks = []
        for heads in self.global_head_choices(num_heads):
            allowed = self.allowed(BlockArch(heads), num_heads)
            blocks += [BlockArch(heads, **dict(zip(allowed, values)))
                       for values in itertools.product(*allowed.values())]
        return tuple(blocks)

    def default_block(self, global_heads: int, num_heads: int) -> BlockArch:
        """The block of ``global_heads`` global heads with every low-level choice at the middle of its range (the
        high-level search's fixed choices; GLiT does not say which it used)."""
        probe = BlockArch(global_heads)
        middle = {name: values[len(values) // 2] for name, values in self.allowed(probe, num_heads).items()}
        return BlockArch(global_heads, **middle)

    def sample_block(self, global_heads: int, num_heads: int, rng) -> BlockArch:
        """A block of ``global_heads`` global heads with each low-level choice drawn uniformly by ``rng``."""
        probe = BlockArch(global_heads)
        return BlockArch(global_heads, **{name: rng.choice(values)
                                          for name, values in self.allowed(probe, num_heads).items()})

    @staticmethod
    def kind(block: BlockArch, num_heads: int) -> str:
        return 'global' if block.global_heads == num_heads else 'local' if block.global_heads == 0 else 'mixed'

    def allowed(self, block: BlockArch, num_heads: int) -> dict[str, tuple]:
        kind = self.kind(block, num_heads)
        if kind == 'global':
            return dict(qkv_ratio=self.qkv_ratios, mlp_ratio=self.mlp_ratios)
        if kind == 'local':
            return dict(kernel_size=self.kernel_sizes, expansion=self.expansions, mlp_ratio=(self.local_mlp_ratio,))
        return dict(expansion=self.expansions, mlp_ratio=self.mlp_ratios, kernel_size=(self.mixed_kernel_size,),
                    qkv_ratio=(self.mixed_qkv_ratio,))


def _global(qkv_ratio: float, mlp_ratio: float) -> BlockArch:
    return BlockArch(3, mlp_ratio=mlp_ratio, qkv_ratio=qkv_ratio)


def _local(kernel_size: int, expansion: int) -> BlockArch:
    return BlockArch(0, mlp_ratio=4., expansion=expansion, kernel_size=kernel_size)


def _mixed(global_heads: int, expansion: int, mlp_ratio: float) -> BlockArch:
    return BlockArch(global_heads, mlp_ratio=mlp_ratio, expansion=expansion)


# The searched GLiT-Tiny (official glit_models.py, decoded from its base_arch / arch lists; paper Fig. 4).
GLIT_TINY = (
    _global(0.5, 4), _local(31, 2), _mixed(1, 4, 6), _global(1, 4), _local(45, 4), _mixed(1, 4, 6),
    _global(1, 2), _mixed(1, 4, 2), _local(45, 4), _global(1, 4), _local(31, 4), _global(2, 6),
)


def load_architecture(source: str | Path | Sequence[BlockArch | dict]) -> tuple[BlockArch, ...]:
    """An architecture from a JSON or YAML file (a list of blocks, or ``{'blocks': [...]}``), or from a list of
    `BlockArch` / dicts. Raises ValueError naming the file and the first bad block."""
    where = 'architecture'
    if isinstance(source, (str, Path)):
        where, text = str(source), Path(source).read_text()
        try:
            if str(source).endswith(('.yaml', '.yml')):
                import yaml
                source = yaml.safe_load(text)
            else:
                source = json.loads(text)
        except Exception as e:  # noqa: BLE001 - json and yaml raise their own error types
            raise ValueError(f'{where} is not valid {"YAML" if where.endswith(("yaml", "yml")) else "JSON"}: '
                             f'{" ".join(str(e).split())}') from None
    if isinstance(source, dict):
        source = source.get('blocks')
    if not isinstance(source, (list, tuple)) or not source:
        raise ValueError(f'{where} must be a non-empty list of blocks (or {{"blocks": [...]}})')
    return tuple(block if isinstance(block, BlockArch) else BlockArch.from_dict(block, f'{where}: block {i}')
                 for i, block in enumerate(source))


class GlobalAttention(nn.Module):
    """Multi-head self-attention over ``dim`` channels with ``num_heads`` heads of width ``head_dim``: GLiT's
    global heads (official ``Vit_Attention`` / the global part of ``Mix_Attention``). ``head_dim`` is the model's
    head width times the qkv ratio, so the qkv ratio widens the heads, not their number.

    How it relates to timm's ``Attention``: it computes ``timm.layers.Attention(dim, num_heads,
    attn_head_dim=head_dim, qkv_bias=True, attn_drop=attn_drop)`` exactly, with the same state_dict keys (``qkv.*``,
    ``proj.*``); what is GLiT's own is outside it, in `GLMixer`: ``dim`` is the global heads' share of the block's
    channels, the rest going to the local module. It is not timm's module for one reason: timm's holds its attention
    dropout as an ``nn.Dropout`` that the fused kernel bypasses, a leaf module the forward never calls, and leanvit
    calls every leaf module (so that a hook on any of them fires). Attention dropout is a rate (``attn_drop_rate``)
    given to the fused kernel, as in leanvit's other attention modules.

    Args:
        dim: Channels in and out (the global heads' share of the block's channels).
        num_heads: Attention heads.
        head_dim: Width of each head, independent of ``dim / num_heads``.
        attn_drop: Dropout rate on the attention weights (in training).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, attn_drop: float = 0.):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.attn_drop_rate = attn_drop
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop_rate if self.training else 0.)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class ConvModule(nn.Module):
    """GLiT's local heads: Conformer's convolution module without its LayerNorm (Gulati et al., Interspeech 2020),
    over the token sequence as a 1-D signal (class token first, patches in raster order, as the official code):
    pointwise conv to ``2 * expansion * dim`` -> GLU -> depthwise conv (``kernel_size``, same padding) ->
    BatchNorm -> Swish -> pointwise conv back to ``dim``. Every conv has a bias, as officially.

    The depthwise conv pads its input explicitly rather than through ``padding=``: the same function, and oneDNN's
    depthwise 1-D kernel is several times slower with padding of its own.
    """

    def __init__(self, dim: int, expansion: int, kernel_size: int, act_layer: Callable[[], nn.Module] = nn.SiLU):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be odd for same padding, got {kernel_size}')
        hidden = expansion * dim
        self.pw1 = nn.Conv1d(dim, 2 * hidden, 1)
        self.dw = nn.Conv1d(hidden, hidden, kernel_size, groups=hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.act = act_layer()
        self.pw2 = nn.Conv1d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.pw1(x.transpose(1, 2)), dim=1)
        x = self.dw(F.pad(x, (self.dw.kernel_size[0] // 2,) * 2))
        return self.pw2(self.act(self.norm(x))).transpose(1, 2)

    def reparameterize(self):
        """Inference form, in place: the BatchNorm folded into the depthwise conv (`folded_conv`)."""
        if isinstance(self.norm, nn.BatchNorm1d):
            self.dw, self.norm = folded_conv(self.dw, self.norm), nn.Identity()


class GLMixer(nn.Module):
    """The token mixer of a GL-block (paper Sec. 3.1): the first channels of the normed tokens to the global heads,
    the last to the local module, the two outputs concatenated [global, local]; no projection after."""

    def __init__(self, dim: int, num_heads: int, arch: BlockArch, conv_act_layer: Callable[[], nn.Module] = nn.SiLU):
        super().__init__()
        head_dim = dim // num_heads
        self.global_dim = dim * arch.global_heads // num_heads
        self.local_dim = dim - self.global_dim
        self.attn = GlobalAttention(self.global_dim, arch.global_heads, int(head_dim * arch.qkv_ratio)) \
            if self.global_dim else None
        self.local = ConvModule(self.local_dim, arch.expansion, arch.kernel_size, conv_act_layer) \
            if self.local_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.local is None:
            return self.attn(x)
        if self.attn is None:
            return self.local(x)
        return torch.cat([self.attn(x[..., :self.global_dim]), self.local(x[..., self.global_dim:])], dim=-1)


class GLBlock(nn.Module):
    """DeiT's pre-norm block with a `GLMixer` as token mixer: ``x + mixer(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, arch: BlockArch, drop_path: float = 0., proj_drop: float = 0.,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, act_layer: Callable[[], nn.Module] = nn.GELU,
                 conv_act_layer: Callable[[], nn.Module] = nn.SiLU):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mixer = GLMixer(dim, num_heads, arch, conv_act_layer)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * arch.mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class GLiT(LinearHeadClassifier):
    """GLiT: DeiT's layout (class token, learned position embedding, classification from the final-norm class token)
    with one `GLBlock` per entry of ``arch``.

    Intermediates are the blocks' patch tokens, as NCHW maps or NLC tokens (class token dropped); ``norm`` applies the
    final norm to them.

    Args:
        arch: The blocks' choices: a sequence of `BlockArch` or dicts, or a JSON / YAML file (`load_architecture`).
        search_space: The space ``arch`` must lie in (`SearchSpace()`, GLiT's); None checks nothing.
        global_pool: 'token' (the class token, official) or 'avg' (the mean of the patch tokens).
        conv_act_layer: Activation of the local modules (default Swish, i.e. SiLU).
        block_fn: Builds each block, called with `GLBlock`'s arguments by keyword (the supernet's blocks are one).
        img_size, patch_size, in_chans, num_classes, embed_dim, num_heads, drop_rate, pos_drop_rate, proj_drop_rate,
        drop_path_rate, norm_layer, act_layer: as timm's VisionTransformer.
    """

    POOLS = ('token', 'avg', '')
    layer_fmt = 'NLC'
    uniform_width = True
    layers_attr = 'blocks'

    def __init__(
            self,
            arch: str | Path | Sequence[BlockArch | dict] = GLIT_TINY,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 192,
            num_heads: int = 3,
            search_space: SearchSpace | None = SearchSpace(),
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: LayerType | None = None,
            act_layer: LayerType | None = None,
            conv_act_layer: LayerType | None = None,
            block_fn: Callable[..., nn.Module] = GLBlock,
    ):
        super().__init__()
        arch = load_architecture(arch)
        if embed_dim % num_heads or num_heads % 3:
            raise ValueError(f'embed_dim {embed_dim} and num_heads {num_heads}: heads must divide the width and come '
                             f'in thirds (GLiT shares heads out in thirds)')
        if search_space is not None:
            search_space.check(arch, num_heads)
        norm_layer = get_norm_layer(norm_layer) or partial(nn.LayerNorm, eps=1e-6)
        act_layer = get_act_layer(act_layer) or nn.GELU
        conv_act_layer = get_act_layer(conv_act_layer) or nn.SiLU
        self.arch = arch
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = self.check_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.output_fmt = 'NLC'
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.img_size = self.patch_embed.img_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = calculate_drop_path_rates(drop_path_rate, len(arch))
        self.blocks = nn.Sequential(*[
            block_fn(dim=embed_dim, num_heads=num_heads, arch=block, drop_path=rates[i], proj_drop=proj_drop_rate,
                     norm_layer=norm_layer, act_layer=act_layer, conv_act_layer=conv_act_layer)
            for i, block in enumerate(arch)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=self.patch_embed.patch_size[0], module=f'blocks.{i}')
                             for i in range(len(arch))]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^cls_token|^pos_embed|^patch_embed', blocks=[(r'^blocks\.(\d+)', None),
                                                                        (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(check_input_size(x, self.in_chans, self.img_size))
        return self.pos_drop(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed)

    def _forward_layer(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x)
        return block(x)

    def _format_intermediate(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens:]
        return x.transpose(1, 2).reshape(x.shape[0], -1, *self.patch_embed.grid_size) if output_fmt == 'NCHW' else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, C) tokens after the final norm, the class token first."""
        x = self._forward_stem(x)
        for block in self.blocks:
            x = self._forward_layer(block, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def _init_weights(module: nn.Module):
    # Official init: truncated normal (std 0.02) linear weights with zero biases, unit LayerNorms; convolutions and
    # BatchNorms keep PyTorch's defaults. A linear layer that is no nn.Linear (the supernet's sliced layers) sets
    # init_as_linear, so that its init is this one too, drawn in the order `apply` visits the modules.
    if isinstance(module, nn.Linear) or getattr(module, 'init_as_linear', False):
        trunc_normal_(module.weight, std=.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# Official local-module names (a Sequential) and leanvit's.
_LOCAL_NAMES = {'net.1.': 'local.pw1.', 'net.3.conv.': 'local.dw.', 'net.4.': 'local.norm.', 'net.6.': 'local.pw2.'}


@register_converter(GLiT)
def checkpoint_filter_fn(state_dict: dict, model: GLiT) -> dict:
    """Official GLiT checkpoint -> leanvit names (docs/glit.md, "Official checkpoints"); leanvit's pass through.

    ``blocks.{i}.0.`` (a leftover of the supernet's candidate list) becomes ``blocks.{i}.``; the mixer is
    ``mixer``: ``attn.qkv`` / ``attn.proj`` -> ``mixer.attn.*``, ``attn.net.{1,3.conv,4,6}`` ->
    ``mixer.local.{pw1,dw,norm,pw2}``.
    """
    state_dict = unwrap_state_dict(state_dict)
    if not any(key.startswith('blocks.') and '.0.attn.' in key for key in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key.startswith('blocks.'):
            _, block, _, rest = key.split('.', 3)
            if rest.startswith('attn.net.'):
                local = rest[len('attn.'):]
                prefix = next(p for p in _LOCAL_NAMES if local.startswith(p))
                rest = 'mixer.' + _LOCAL_NAMES[prefix] + local[len(prefix):]
            elif rest.startswith('attn.'):
                rest = 'mixer.' + rest
            key = f'blocks.{block}.{rest}'
        out[key] = value
    return out


def _create_glit(variant: str, pretrained: bool = False, **kwargs) -> GLiT:
    # features_only gives every block's output unless out_indices picks some (timm's ViTs take the last 3).
    out_indices = kwargs.pop('out_indices', None)
    return build_model_with_cfg(
        GLiT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


def _cfg(**kwargs) -> PaperCfg:
    return PaperCfg(**{
        'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': 0.875, 'interpolation': 'bicubic',
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'num_classes': 1000, 'license': 'apache-2.0',
        'origin_url': 'https://github.com/bychen515/GLiT', 'paper_ids': 'arXiv:2107.02960',
        'paper_name': 'GLiT: Neural Architecture Search for Global and Local Image Transformer', **kwargs})


# Figures: the official model's exact parameter count; MACs with every op counted (the official README's 1.33 G leaves
# out half of the GLU's first convolution, docs/glit.md); top-1 of the official README. The official weights are on
# Google Drive (README of the official repository), which timm cannot fetch.
default_cfgs = generate_default_cfgs({
    'glit_tiny_patch16_224.in1k': _cfg(paper_params=7_264_456, paper_gmacs=1.473, paper_top1=76.4),
    'glit_custom': _cfg(),
})


@register_model
def glit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> GLiT:
    """GLiT-Tiny: the searched architecture at DeiT-Tiny widths, 7,264,456 params, 1.47 GMACs, 76.4 % top-1."""
    return _create_glit('glit_tiny_patch16_224', pretrained, **(dict(arch=GLIT_TINY) | kwargs))


@register_model
def glit_custom(pretrained: bool = False, **kwargs) -> GLiT:
    """Any architecture of the search space: ``arch=`` a JSON / YAML file or a list of blocks; DeiT-Tiny widths
    unless ``embed_dim`` / ``num_heads`` say otherwise (DeiT-S: 384 / 6, DeiT-B: 768 / 12)."""
    return _create_glit('glit_custom', pretrained, **kwargs)


# Only appended here (not in the table above): register_model reads a name's cfg when the entrypoint is declared.
default_cfgs.update(generate_default_cfgs({
    'test_glit': PaperCfg(input_size=(3, 32, 32), first_conv='patch_embed.proj', classifier='head'),
}))


@register_model
def test_glit(pretrained: bool = False, **kwargs) -> GLiT:
    """Tiny GLiT for fast tests: 32 x 32 input, 4 x 4 tokens of width 48, one global, one local and one mixed block."""
    args = dict(arch=(_global(0.5, 2), _local(17, 2), _mixed(1, 1, 2)), img_size=32, patch_size=8, embed_dim=48,
                num_heads=3)
    return _create_glit('test_glit', pretrained, **(args | kwargs))

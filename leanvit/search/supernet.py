"""GLiT's weight-sharing supernet and its single-path sampler (paper Sec. 3.3; the official code never shipped them).

Every block of `GLiTSupernet` holds one module per part at the largest size the search space allows (the global
heads' qkv at the largest qkv ratio, the local module at the largest expansion and kernel, the MLP at the largest
ratio), and an architecture runs as slices of them: ``global_heads`` heads of width ``qkv_ratio * head_dim`` read the
first channels, the local module the last ones through the first ``expansion * channels`` hidden channels and the
central ``kernel_size`` taps of the depthwise kernel, the MLP the first ``mlp_ratio * dim`` hidden units. So every
candidate of the space shares its weights with every other (weight entanglement, as AutoFormer, Chen et al., ICCV
2021, rather than one copy per candidate), `GLiTSupernet.extract` cuts any candidate out as a plain `GLiT`, and the
supernet's size does not grow with the number of choices.

`PathSampling` trains it single-path (SPOS, Guo et al., ECCV 2020): before each training forward it draws one
architecture uniformly (per block: the number of global heads, then each low-level choice of that block type) and
runs it; after the forward the model is back on its default path, which evaluation sees.
"""

import copy
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from leanvit.models._registry import register_converter
from leanvit.checkpoint import unwrap_state_dict
from leanvit.models.glit import BlockArch, GLiT, SearchSpace, _cfg, load_architecture

__all__ = ['GLiTSupernet', 'PathSampling', 'SuperBlock', 'glit_supernet', 'sample_architecture']


class SuperGlobalAttention(nn.Module):
    """Global heads of every size: qkv and proj at all heads and the largest head width; an architecture takes the
    first ``global_heads`` heads, the first ``global_dim`` input channels and the first ``width`` units of each head."""

    def __init__(self, dim: int, num_heads: int, max_head_dim: int):
        super().__init__()
        self.dim, self.num_heads, self.max_head_dim = dim, num_heads, max_head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * max_head_dim)
        self.proj = nn.Linear(num_heads * max_head_dim, dim)

    def weights(self, heads: int, width: int) -> dict[str, torch.Tensor]:
        """The slices a `GlobalAttention` of ``heads`` heads of ``width`` over ``dim * heads / num_heads`` channels
        holds, under its parameter names."""
        dim = self.dim * heads // self.num_heads
        qkv_w = self.qkv.weight.view(3, self.num_heads, self.max_head_dim, self.dim)[:, :heads, :width, :dim]
        qkv_b = self.qkv.bias.view(3, self.num_heads, self.max_head_dim)[:, :heads, :width]
        proj_w = self.proj.weight.view(self.dim, self.num_heads, self.max_head_dim)[:dim, :heads, :width]
        return {'qkv.weight': qkv_w.reshape(-1, dim), 'qkv.bias': qkv_b.reshape(-1),
                'proj.weight': proj_w.reshape(dim, -1), 'proj.bias': self.proj.bias[:dim]}

    def forward(self, x: torch.Tensor, heads: int, width: int) -> torch.Tensor:
        w = self.weights(heads, width)
        B, N, _ = x.shape
        qkv = F.linear(x, w['qkv.weight'], w['qkv.bias'])
        q, k, v = qkv.reshape(B, N, 3, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return F.linear(x.transpose(1, 2).reshape(B, N, heads * width), w['proj.weight'], w['proj.bias'])


class SuperConvModule(nn.Module):
    """The local module of every size (`leanvit.models.glit.ConvModule` at the largest expansion and kernel): an
    architecture with ``channels`` local channels (the model's last ones) uses the first ``expansion * channels``
    hidden channels and the central ``kernel_size`` taps of each depthwise kernel, as Once-for-All's elastic kernels
    (Cai et al., ICLR 2020) without their kernel transformation."""

    def __init__(self, dim: int, max_expansion: int, max_kernel_size: int, act_layer: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.dim, self.hidden = dim, max_expansion * dim
        self.pw1 = nn.Conv1d(dim, 2 * self.hidden, 1)
        self.dw = nn.Conv1d(self.hidden, self.hidden, max_kernel_size, groups=self.hidden)
        self.norm = nn.BatchNorm1d(self.hidden)
        self.act = act_layer()
        self.pw2 = nn.Conv1d(self.hidden, dim, 1)

    def weights(self, channels: int, expansion: int, kernel_size: int) -> dict[str, torch.Tensor]:
        """The slices a `ConvModule(channels, expansion, kernel_size)` holds, under its parameter names."""
        hidden, first = expansion * channels, self.dim - channels
        trim = (self.dw.kernel_size[0] - kernel_size) // 2
        pw1_w = self.pw1.weight.view(2, self.hidden, self.dim, 1)[:, :hidden, first:]
        pw1_b = self.pw1.bias.view(2, self.hidden)[:, :hidden]
        out = {'pw1.weight': pw1_w.reshape(2 * hidden, channels, 1), 'pw1.bias': pw1_b.reshape(-1),
               'dw.weight': self.dw.weight[:hidden, :, trim:trim + kernel_size], 'dw.bias': self.dw.bias[:hidden],
               'pw2.weight': self.pw2.weight[first:, :hidden], 'pw2.bias': self.pw2.bias[first:]}
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            out[f'norm.{name}'] = getattr(self.norm, name)[:hidden]
        return out

    def forward(self, x: torch.Tensor, channels: int, expansion: int, kernel_size: int) -> torch.Tensor:
        w = self.weights(channels, expansion, kernel_size)
        x = F.glu(F.conv1d(x.transpose(1, 2), w['pw1.weight'], w['pw1.bias']), dim=1)
        x = F.conv1d(F.pad(x, (kernel_size // 2,) * 2), w['dw.weight'], w['dw.bias'], groups=expansion * channels)
        norm = self.norm
        # Slices of the running statistics are views: training updates the slice in place. Momentum None (as set by
        # BatchNorm recalibration) is a cumulative average, as in nn.BatchNorm1d.
        momentum = norm.momentum
        if norm.training and momentum is None:
            norm.num_batches_tracked.add_(1)
            momentum = 1. / float(norm.num_batches_tracked)
        x = F.batch_norm(x, w['norm.running_mean'], w['norm.running_var'], w['norm.weight'], w['norm.bias'],
                         norm.training, momentum or 0., norm.eps)
        return F.conv1d(self.act(x), w['pw2.weight'], w['pw2.bias']).transpose(1, 2)


class SuperMlp(nn.Module):
    """The MLP at the largest ratio; an architecture uses the first ``mlp_ratio * dim`` hidden units."""

    def __init__(self, dim: int, max_hidden: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, max_hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(max_hidden, dim)

    def weights(self, hidden: int) -> dict[str, torch.Tensor]:
        return {'fc1.weight': self.fc1.weight[:hidden], 'fc1.bias': self.fc1.bias[:hidden],
                'fc2.weight': self.fc2.weight[:, :hidden], 'fc2.bias': self.fc2.bias}

    def forward(self, x: torch.Tensor, hidden: int) -> torch.Tensor:
        w = self.weights(hidden)
        return F.linear(self.act(F.linear(x, w['fc1.weight'], w['fc1.bias'])), w['fc2.weight'], w['fc2.bias'])


class SuperBlock(nn.Module):
    """Every `GLBlock` of the search space in one: ``arch`` (a `BlockArch`, set by `GLiTSupernet.set_arch`) says
    which one the forward runs. The norms are shared by all candidates, as in the official retraining model."""

    def __init__(self, dim: int, num_heads: int, space: SearchSpace, arch: BlockArch, drop_path: float = 0.,
                 norm_layer: type[nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU,
                 conv_act_layer: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.dim, self.num_heads, self.arch = dim, num_heads, arch
        self.head_dim = dim // num_heads
        self.norm1 = norm_layer(dim)
        self.attn = SuperGlobalAttention(
            dim, num_heads, int(self.head_dim * max((*space.qkv_ratios, space.mixed_qkv_ratio))))
        self.local = SuperConvModule(dim, int(max(space.expansions)),
                                     int(max((*space.kernel_sizes, space.mixed_kernel_size))), conv_act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = SuperMlp(dim, int(dim * max((*space.mlp_ratios, space.local_mlp_ratio))), act_layer)

    def sizes(self, arch: BlockArch) -> tuple[int, int]:
        """(channels of the global heads, width of each global head) of ``arch``."""
        return self.dim * arch.global_heads // self.num_heads, int(self.head_dim * arch.qkv_ratio)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        arch = self.arch
        global_dim, width = self.sizes(arch)
        if global_dim == self.dim:
            return self.attn(x, arch.global_heads, width)
        local_dim = self.dim - global_dim
        if global_dim == 0:
            return self.local(x, local_dim, arch.expansion, arch.kernel_size)
        return torch.cat([self.attn(x[..., :global_dim], arch.global_heads, width),
                          self.local(x[..., global_dim:], local_dim, arch.expansion, arch.kernel_size)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mix(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x), int(self.dim * self.arch.mlp_ratio)))

    def candidate_state(self, arch: BlockArch) -> dict[str, torch.Tensor]:
        """The state of the `GLBlock` of ``arch`` (its parameter and buffer names), sliced from this block."""
        global_dim, width = self.sizes(arch)
        state = {f'norm{i}.{name}': value for i in (1, 2)
                 for name, value in getattr(self, f'norm{i}').state_dict().items()}
        if global_dim:
            state |= {f'mixer.attn.{k}': v for k, v in self.attn.weights(arch.global_heads, width).items()}
        if global_dim < self.dim:
            local = self.local.weights(self.dim - global_dim, arch.expansion, arch.kernel_size)
            state |= {f'mixer.local.{k}': v for k, v in local.items()}
            state['mixer.local.norm.num_batches_tracked'] = self.local.norm.num_batches_tracked.clone()
        state |= {f'mlp.{k}': v for k, v in self.mlp.weights(int(self.dim * arch.mlp_ratio)).items()}
        return state


class GLiTSupernet(GLiT):
    """GLiT's weight-sharing supernet over a `SearchSpace`: a `GLiT` whose blocks are `SuperBlock` s. It is a normal
    timm-contract model that computes the architecture it is set to (`set_arch`; by default every block mixed, one
    third of its heads global, low-level choices in the middle of their ranges, so that the default path uses every
    module). `PathSampling` (objective ``path_sampling``) trains it; `extract` cuts a candidate out as a `GLiT`.

    Args:
        depth: Number of blocks.
        space: The search space (`SearchSpace()`, GLiT's).
        Every other argument: as `GLiT` (``embed_dim=384, num_heads=6`` and ``768, 12`` give DeiT-S / DeiT-B widths).
    """

    def __init__(self, depth: int = 12, space: SearchSpace = SearchSpace(), num_heads: int = 3, **kwargs):
        self.space = space
        arch = [space.default_block(num_heads // 3, num_heads)] * depth
        super().__init__(arch=arch, num_heads=num_heads, search_space=space, **kwargs)

    def _block(self, dim: int, num_heads: int, arch: BlockArch, drop_path: float, proj_drop: float, norm_layer,
               act_layer, conv_act_layer) -> nn.Module:
        if proj_drop:
            raise ValueError('the supernet has no dropout inside its blocks (proj_drop_rate must be 0)')
        return SuperBlock(dim, num_heads, self.space, arch, drop_path, norm_layer, act_layer, conv_act_layer)

    @property
    def num_heads(self) -> int:
        return self.blocks[0].num_heads

    def set_arch(self, arch: Sequence[BlockArch | dict]) -> 'GLiTSupernet':
        """Run ``arch`` from now on (checked against the space: one block per supernet block)."""
        arch = load_architecture(arch)
        if len(arch) != len(self.blocks):
            raise ValueError(f'the supernet has {len(self.blocks)} blocks, the architecture {len(arch)}')
        self.space.check(arch, self.num_heads)
        for block, choice in zip(self.blocks, arch):
            block.arch = choice
        self.arch = arch
        return self

    def extract(self, arch: Sequence[BlockArch | dict]) -> GLiT:
        """The `GLiT` of ``arch`` with this supernet's weights (and BatchNorm statistics): it computes what the
        supernet computes on that path."""
        arch = load_architecture(arch)
        self.space.check(arch, self.num_heads)
        model = GLiT(arch=arch, img_size=self.img_size, patch_size=self.patch_embed.patch_size, in_chans=self.in_chans,
                     num_classes=self.num_classes, global_pool=self.global_pool, embed_dim=self.embed_dim,
                     num_heads=self.num_heads, search_space=self.space, norm_layer=type(self.norm),
                     conv_act_layer=type(self.blocks[0].local.act))
        # The supernet's own norm layers (with their eps), whatever norm_layer built them.
        model.norm = copy.deepcopy(self.norm)
        for block, source in zip(model.blocks, self.blocks):
            block.norm1, block.norm2 = copy.deepcopy(source.norm1), copy.deepcopy(source.norm2)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith('blocks.')}
        for i, choice in enumerate(arch):
            state |= {f'blocks.{i}.{k}': v for k, v in self.blocks[i].candidate_state(choice).items()}
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return model.train(self.training)


@register_converter(GLiTSupernet)
def supernet_filter_fn(state_dict: dict, model: GLiTSupernet) -> dict:
    """A supernet checkpoint is leanvit's own (no official one exists): unwrapped from a training checkpoint only."""
    return unwrap_state_dict(state_dict)


def sample_architecture(space: SearchSpace, depth: int, num_heads: int, rng: random.Random,
                        global_heads: Sequence[int] | None = None) -> tuple[BlockArch, ...]:
    """An architecture drawn uniformly block by block: the global heads (unless ``global_heads`` fixes them), then
    each low-level choice the block type allows."""
    heads = global_heads or [rng.choice(space.global_head_choices(num_heads)) for _ in range(depth)]
    return tuple(space.sample_block(g, num_heads, rng) for g in heads)


class PathSampling:
    """SPOS path sampling as an engine objective (``objectives: {path_sampling: {}}``): before each training forward
    of the supernet, one architecture drawn uniformly (`sample_architecture`); after it, the default path again.

    The draws are a function of ``seed`` and the draw count, which the run's checkpoints keep, so a resumed run draws
    what an uninterrupted one would, and every process of a distributed run draws the same path (so that DDP averages
    gradients of one architecture). The objective adds no loss term.
    """

    def __init__(self, model: GLiTSupernet, seed: int = 0):
        if not isinstance(model, GLiTSupernet):
            raise ValueError(f'path_sampling trains a GLiT supernet (model glit_supernet), not {type(model).__name__}')
        self.model, self.seed, self.draws = model, seed, 0
        self.default = model.arch
        self._hooks = [model.register_forward_pre_hook(self._sample), model.register_forward_hook(self._restore)]

    def _sample(self, model: GLiTSupernet, args):
        if model.training:
            rng = random.Random(f'{self.seed}:{self.draws}')
            self.draws += 1
            model.set_arch(sample_architecture(model.space, len(model.blocks), model.num_heads, rng))

    def _restore(self, model: GLiTSupernet, args, output):
        if model.training:
            model.set_arch(self.default)

    def loss(self) -> torch.Tensor:
        return torch.zeros(())

    def state_dict(self) -> dict:
        return {'draws': self.draws, 'seed': self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state.get('draws', 0))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


default_cfgs = generate_default_cfgs({'glit_supernet': _cfg()})


@register_model
def glit_supernet(pretrained: bool = False, **kwargs) -> GLiTSupernet:
    """GLiT's supernet at DeiT-Tiny widths (12 blocks, 192 wide, 3 heads); ``embed_dim=384, num_heads=6`` or
    ``768, 12`` for the DeiT-S / DeiT-B spaces (GLiT-Small / Base were never published)."""
    out_indices = kwargs.pop('out_indices', None)
    return build_model_with_cfg(GLiTSupernet, 'glit_supernet', pretrained, pretrained_filter_fn=supernet_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)
